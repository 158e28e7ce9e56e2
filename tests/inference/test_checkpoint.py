"""Checkpoints that survive a kill: atomic writes, exact resumption, refused mismatches."""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import bora_pyro
from bora_pyro.data import build_corpus
from bora_pyro.files import FolderError, write_marker
from bora_pyro.inference import checkpoint as ckpt
from bora_pyro.inference.fit import _endless_batches
from bora_pyro.inference.loop import Stepper
from bora_pyro.testing import char_tokenizer, synthetic_corpus_frame, tiny_causal_lm

ROOT = Path(__file__).resolve().parents[2]
STEPS = 40


def _corpus(sizes=(8, 12, 16)):
    return build_corpus(synthetic_corpus_frame(sizes), char_tokenizer(), max_length=32, seed=0)


def _fit(method, corpus=None, **kwargs):
    """A tiny fit with a learned tau; 20 training documents in batches of 3, so that epochs
    (6 batches) and checkpoints (every 5 steps) do not line up. Also run by the killed child."""
    settings = dict(
        model=tiny_causal_lm("llama", hidden_size=16, num_layers=1), tokenizer=char_tokenizer(),
        tau="learn", rank=2, alpha=4, max_steps=STEPS, batch_size=3, lr=1e-2, eval_every=7,
        device="cpu", progress=False, seed=3,
    )
    settings.update(kwargs)
    if method == "map":
        return bora_pyro.fit_map(corpus or _corpus(), tau_init=100.0, **settings)
    return bora_pyro.fit_svi(corpus or _corpus(), **settings)


@pytest.fixture(autouse=True)
def _one_thread():
    # The killed child runs on one thread too: the same reductions, hence bit-identical numbers.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_references = {}


def _reference(method):
    if method not in _references:
        _references[method] = _fit(method)
    return _references[method]


def _assert_same_fit(result, reference):
    assert torch.equal(result.task_adapters, reference.task_adapters)
    assert torch.equal(result.global_adapter, reference.global_adapter)
    assert result.tau == reference.tau
    if reference.task_scales is not None:
        assert torch.equal(result.task_scales, reference.task_scales)
    assert result.fit_args == reference.fit_args
    assert set(result.history) == set(reference.history)
    for key in result.history:
        if key == "tau_update":  # one record (dict) per evidence update
            assert result.history[key] == reference.history[key]
        elif key != "seconds":
            np.testing.assert_array_equal(np.asarray(result.history[key], dtype=float),
                                          np.asarray(reference.history[key], dtype=float), err_msg=key)


def _interrupt_at(monkeypatch, call):
    """Make the ``call``-th optimiser step raise, as a kill between checkpoints would stop it."""
    original, calls = Stepper.step, [0]

    def step(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Stepper, "step", step)


@pytest.mark.parametrize("method", ["map", "svi"])
def test_killed_run_resumes_to_the_uninterrupted_result(method, tmp_path):
    folder = tmp_path / "checkpoints"
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, time, torch\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "torch.set_num_threads(1)\n"
        "from bora_pyro.inference.loop import Stepper\n"
        "from tests.inference.test_checkpoint import _fit\n"
        "original = Stepper.step\n"
        "def slow_step(self, *args, **kwargs):  # leaves time to kill it between checkpoints\n"
        "    loss = original(self, *args, **kwargs)\n"
        "    time.sleep(0.05)\n"
        "    return loss\n"
        "Stepper.step = slow_step\n"
        f"_fit({method!r}, checkpoint_dir={str(folder)!r}, checkpoint_every=5)\n"
    )
    child = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while (latest := ckpt.latest_checkpoint(folder)) is None or int(latest.name[5:]) < 9:
            if child.poll() is not None:
                pytest.fail(f"the child ended before a checkpoint at step 10: {child.stderr.read().decode()}")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint at step 10 within 300 s")
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    survivor = ckpt.load_checkpoint(folder)
    assert 9 <= survivor.step < STEPS - 1  # killed mid-run, the remaining steps still to do

    torch.manual_seed(12345)  # the resumed run must restore the global RNG, not inherit this one
    resumed = _fit(method, resume=folder)
    _assert_same_fit(resumed, _reference(method))
    assert [p.name for p in folder.iterdir()] == [f"step-{STEPS - 1:08d}"]
    # Resuming a finished run returns the same result without further steps.
    _assert_same_fit(_fit(method, resume=folder), _reference(method))


def test_interrupted_write_leaves_the_last_complete_checkpoint(monkeypatch, tmp_path):
    folder = tmp_path / "checkpoints"
    _interrupt_at(monkeypatch, 14)
    with pytest.raises(KeyboardInterrupt):
        _fit("map", checkpoint_dir=folder, checkpoint_every=5)
    monkeypatch.undo()
    assert [p.name for p in folder.iterdir()] == ["step-00000009"]
    # What a kill during the write of step 14 leaves: a temporary folder with its marker (written
    # first), a partial tensors file and no checkpoint.json.
    partial = folder / ".tmp-step-00000014-0a1b2c3d"
    partial.mkdir()
    write_marker(partial, "checkpoint", files=["checkpoint.json", "state.safetensors"])
    data = (folder / "step-00000009" / "state.safetensors").read_bytes()
    (partial / "state.safetensors").write_bytes(data[: len(data) // 2])
    # The user's own entries, some with names like ours: never read as checkpoints, never removed.
    user = {"step-00000017/notes.txt", "step-1/data.txt", ".tmp-cache/x.bin", "notes.md"}
    for name in user:
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text("mine")
    assert ckpt.latest_checkpoint(folder).name == "step-00000009"
    assert ckpt.load_checkpoint(folder).step == 9

    resumed = _fit("map", resume=folder)
    _assert_same_fit(resumed, _reference("map"))
    left = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    final = f"step-{STEPS - 1:08d}"
    assert left == user | {f"{final}/{name}" for name in (".bora_pyro", "checkpoint.json", "state.safetensors")}
    ckpt.remove_checkpoints(folder)  # ours only: the folder stays, with the user's files
    assert {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} == user
    for name in user:
        (folder / name).unlink()
    ckpt.remove_checkpoints(folder)
    assert {p.name for p in folder.iterdir()} == {"step-00000017", "step-1", ".tmp-cache"}  # empty, but theirs


def test_a_foreign_folder_with_the_name_of_the_next_checkpoint_is_refused(tmp_path):
    (tmp_path / "step-00000004").mkdir()
    (tmp_path / "step-00000004" / "mine.txt").write_text("mine")
    with pytest.raises(FolderError, match="step-00000004.*not a checkpoint bora_pyro wrote"):
        ckpt.save_checkpoint(tmp_path, {"x": torch.ones(1)}, step=4, every=5, settings={})
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000004"]
    assert (tmp_path / "step-00000004" / "mine.txt").read_text() == "mine"


def _refuse_constant(name):
    raise ValueError(f"bare {name} in a JSON file")


def test_non_finite_numbers_are_strict_json_and_read_back(tmp_path):
    state = {"loop": {"history": {"val_nll": [math.nan, 1.5], "tau": [[math.inf, 2.0]]},
                      "best_value": math.inf}, "lr": [1e-3]}
    path = ckpt.save_checkpoint(tmp_path, state, step=0, every=1, settings={"tau": math.inf})
    text = (path / "checkpoint.json").read_text()
    json.loads(text, parse_constant=_refuse_constant)
    loaded = ckpt.load_checkpoint(tmp_path)
    assert math.isnan(loaded.state["loop"]["history"]["val_nll"][0])
    assert loaded.state["loop"]["history"]["val_nll"][1] == 1.5
    assert loaded.state["loop"]["history"]["tau"] == [[math.inf, 2.0]]
    assert loaded.state["loop"]["best_value"] == math.inf and loaded.state["lr"] == [1e-3]
    # The settings compare equal to the same settings of a new call (a pooled fit's tau = inf).
    planned = ckpt.make_checkpointing(None, None, tmp_path, steps=5, settings={"tau": math.inf})
    assert planned.resume.step == 0


def test_a_run_with_a_nan_validation_loss_checkpoints_strict_json(tmp_path):
    # eval_every=7 leaves NaN in val_nll at the steps without evaluation.
    _fit("map", max_steps=5, checkpoint_dir=tmp_path, checkpoint_every=5)
    text = (ckpt.latest_checkpoint(tmp_path) / "checkpoint.json").read_text()
    json.loads(text, parse_constant=_refuse_constant)
    history = ckpt.load_checkpoint(tmp_path).state["loop"]["history"]
    assert all(math.isnan(v) for v in history["val_nll"][:4])


def test_failed_write_keeps_the_previous_checkpoint(monkeypatch, tmp_path):
    state = {"x": torch.arange(6.0).reshape(2, 3), "n": 1, "nested": [{"y": torch.ones(2)}, None]}
    first = ckpt.save_checkpoint(tmp_path, state, step=4, every=5, settings={"steps": 10})

    def dies_halfway(tensors, path):
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_file", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, state, step=9, every=5, settings={"steps": 10})
    assert [p.name for p in tmp_path.iterdir()] == [first.name]
    loaded = ckpt.load_checkpoint(tmp_path)
    assert loaded.step == 4 and loaded.every == 5 and loaded.settings == {"steps": 10}
    assert torch.equal(loaded.state["x"], state["x"]) and loaded.state["n"] == 1
    assert torch.equal(loaded.state["nested"][0]["y"], torch.ones(2)) and loaded.state["nested"][1] is None


def test_batch_stream_resumes_at_any_position():
    split = _corpus().split("train")  # 20 documents: 6 batches of 3 per epoch
    expected = [b.doc_index for b in _take(_endless_batches(split, 3, seed=7), 20)]
    for consumed in range(14):
        stream = _endless_batches(split, 3, seed=7)
        _take(stream, consumed)
        resumed = _endless_batches(split, 3, seed=0)  # the seed is overridden by the state
        resumed.load_state_dict(stream.state_dict())
        for want, got in zip(expected[consumed:], _take(resumed, 20 - consumed)):
            assert torch.equal(want, got.doc_index), consumed


def _take(stream, n):
    return [next(stream) for _ in range(n)]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("short") / "checkpoints"
    _fit("map", max_steps=5, checkpoint_dir=folder, checkpoint_every=5)
    return folder


@pytest.mark.parametrize("change, message", [
    (dict(max_steps=6), r"steps=5 \(this call: 6\)"),
    (dict(batch_size=4), r"batch_size=3 \(this call: 4\)"),
    (dict(tau=50.0), r"config.tau='learn' \(this call: 50.0\)"),
    (dict(sizes=(8, 12, 20)), r"train_docs=20 \(this call: 22\)"),
    (dict(method="svi"), r"method='map' \(this call: 'svi'\)"),
])
def test_resume_with_other_settings_is_refused(short_run, change, message):
    change = dict(change)
    method = change.pop("method", "map")
    corpus = _corpus(change.pop("sizes")) if "sizes" in change else None
    with pytest.raises(ValueError, match=message) as info:
        _fit(method, corpus, resume=short_run, **{"max_steps": 5, **change})
    assert "resume=" in str(info.value) and "interrupted run's settings" in str(info.value)


def test_checkpoint_arguments_are_checked(short_run, tmp_path):
    with pytest.raises(ValueError, match="checkpoint_every=5 needs checkpoint_dir"):
        _fit("map", max_steps=5, checkpoint_every=5)
    with pytest.raises(ValueError, match="checkpoint_every must be a positive integer"):
        _fit("map", max_steps=5, checkpoint_dir=tmp_path, checkpoint_every=0)
    with pytest.raises(ValueError, match="already holds a checkpoint of another run"):
        _fit("map", max_steps=5, checkpoint_dir=short_run)
    with pytest.raises(ValueError, match="holds no complete checkpoint"):
        _fit("map", max_steps=5, resume=tmp_path)


def test_a_checkpoint_write_killed_at_any_operation_leaves_a_whole_one_and_the_users_files(tmp_path):
    from tests.test_files import _run_killed_after, _tree

    user = tmp_path / "step-1"
    user.mkdir()
    (user / "mine.txt").write_text("mine")
    (tmp_path / ".tmp-cache").mkdir()
    mine = _tree(tmp_path)

    def save(step):
        return ckpt.save_checkpoint(tmp_path, {"x": torch.full((3,), float(step))}, step=step, every=5, settings={})

    save(4)
    total = _run_killed_after(math.inf, lambda: save(9))
    assert total > 5
    seen = set()
    for k in range(total + 1):
        save(4)
        _run_killed_after(k, lambda: save(9))
        loaded = ckpt.load_checkpoint(tmp_path)
        assert loaded.step in (4, 9) and torch.equal(loaded.state["x"], torch.full((3,), float(loaded.step))), k
        seen.add(loaded.step)
        save(14)  # the next write removes what the kill left, and only that
        assert _tree(tmp_path) == {**mine, **{k: v for k, v in _tree(tmp_path).items() if k.startswith("step-00000014")}}, k
        assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-cache", "step-00000014", "step-1"], k
        ckpt.remove_checkpoints(tmp_path)
    assert seen == {4, 9}


@pytest.mark.parametrize("method", ["map", "svi"])
def test_sparse_steps_resume_bit_identically(method, monkeypatch, tmp_path):
    """task_step='sparse' (tables outside the guide's parameters, lazy AdamW's per-row state,
    host storage): an interrupted run resumed from its checkpoint ends with the uninterrupted
    run's result, bit for bit (learned tau: MAP evidence updates, SVI variational EM)."""
    sparse = dict(task_step="sparse", adapter_storage="host")
    reference = _fit(method, **sparse)
    folder = tmp_path / "checkpoints"
    _interrupt_at(monkeypatch, 14)
    with pytest.raises(KeyboardInterrupt):
        _fit(method, checkpoint_dir=folder, checkpoint_every=5, **sparse)
    monkeypatch.undo()
    _assert_same_fit(_fit(method, resume=folder, **sparse), reference)
    dense = _reference(method)
    assert not torch.equal(reference.task_adapters, dense.task_adapters)  # the sparse steps did run
