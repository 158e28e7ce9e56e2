"""Ten thousand tasks: sparse steps on the tiny LM, from `fit_map` and from `bora fit`, in seconds;
and the sparse step reaches the dense step's optimum on the tiny LM."""

import json
import string

import numpy as np
import pandas as pd
import pytest
import torch
from torch.overrides import TorchFunctionMode

import bora_pyro
from bora_pyro.data import build_corpus
from bora_pyro.cli import main
from bora_pyro.testing import char_tokenizer, synthetic_corpus_frame, tiny_causal_lm

TASKS = 10_000


def _frame(num_tasks=TASKS, docs=2, seed=0):
    rng = np.random.default_rng(seed)
    letters = np.array(list(string.ascii_lowercase + " "))
    return pd.DataFrame({
        "task": [f"t{d}" for d in range(num_tasks) for _ in range(docs)],
        "text": ["".join(rng.choice(letters, 8)) for _ in range(num_tasks * docs)],
    })


SETTINGS = dict(rank=2, alpha=4.0, target_modules=["q_proj", "v_proj"], tau=100.0, max_steps=3, batch_size=8,
                device="cpu", progress=False)


@pytest.fixture(scope="module")
def corpus():
    """Tokenising 20,000 documents takes most of the time (about 10 s here): done once."""
    return build_corpus(_frame(), char_tokenizer(), max_length=12, test_size=0.0,
                                       validation_size=0.0, seed=0)


def _tiny():
    return tiny_causal_lm("llama", hidden_size=16, num_layers=1)


@pytest.mark.parametrize("storage", ["host", "device"])
def test_ten_thousand_tasks_from_fit_map(corpus, storage):
    result = bora_pyro.fit_map(corpus, model=_tiny(), tokenizer=char_tokenizer(), adapter_storage=storage,
                               **SETTINGS)
    theta, Theta = result.task_adapters, result.global_adapter
    assert theta.shape[0] == TASKS and theta.device.type == "cpu"
    moved = (theta != Theta).any(1)  # offsets of tasks never in a batch stay 0
    assert 0 < int(moved.sum()) <= 3 * 8
    assert torch.isfinite(theta).all()


def test_ten_thousand_tasks_with_a_learned_tau_from_fit_svi(corpus, monkeypatch):
    """SVI with a learned tau, variational EM at every step: each step's M-step reads the lazy
    averages' running sums, never the 10,000 rows (`variational_em_tau` is not called), and
    writes the averages of its own tasks only (at most 8 per step)."""
    from bora_pyro.inference import svi

    monkeypatch.setattr(svi, "variational_em_tau", lambda *a, **k: pytest.fail("the M-step read all D rows"))
    written, advance = [], svi.LazyMovingAverage.advance

    def counted(self, moved, loc, log_scale):
        written.append(0 if moved is None else len(moved[0]))
        return advance(self, moved, loc, log_scale)

    monkeypatch.setattr(svi.LazyMovingAverage, "advance", counted)
    settings = {**SETTINGS, "tau": "learn", "tau_init": 100.0, "tau_warmup": 0, "init_scale": 1e-3}
    result = bora_pyro.fit_svi(corpus, model=_tiny(), tokenizer=char_tokenizer(), adapter_storage="host", **settings)
    assert result.task_adapters.shape[0] == TASKS and torch.isfinite(result.task_adapters).all()
    taus = [t for tau in result.history["tau"] for t in tau]
    assert len(written) == 2 and all(0 < k <= 8 for k in written), written  # after the first step, which starts them
    assert all(np.isfinite(taus)) and all(t != 100.0 for t in taus), taus


class _TaskRows(TorchFunctionMode):
    """Records every torch call whose result has ``rows`` rows (a ``[D, ...]`` tensor), except the
    in-place updates of the tensors in ``allowed`` (they return themselves)."""

    def __init__(self, rows, allowed):
        super().__init__()
        self.rows, self.allowed, self.calls = rows, {t.data_ptr() for t in allowed}, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (isinstance(out, torch.Tensor) and out.dim() and out.shape[0] == self.rows
                and out.data_ptr() not in self.allowed):
            self.calls.append(getattr(func, "__name__", str(func)))
        return out


def test_ten_thousand_tasks_with_a_learned_tau_from_fit_map(corpus, monkeypatch):
    """MAP with the evidence update of tau and the sampled Fisher, host storage: the curvature
    passes run on the K rows of their step (the sampler never sees D rows) and create no
    ``[D, ...]`` tensor besides their in-place sums into the accumulators, which live with the
    tables; only the evidence updates read all D rows."""
    from bora_pyro.inference import curvature
    from bora_pyro.inference.map import MAPStepper

    sampled, created, steppers = [], [], []
    per_document, after_step = curvature.per_document_gradients, MAPStepper.after_step

    def counted(logits_fn, task_adapters, batch, **kw):
        sampled.append(task_adapters.shape[0])
        return per_document(logits_fn, task_adapters, batch, **kw)

    def watched(self, step):
        steppers[:] = [self]
        if self._is_update(step + 1):
            return after_step(self, step)
        with _TaskRows(TASKS, [self.mc_fisher.sq, self.mc_fisher.seen]) as mode:
            after_step(self, step)
        created.extend(mode.calls)

    monkeypatch.setattr(curvature, "per_document_gradients", counted)
    monkeypatch.setattr(MAPStepper, "after_step", watched)
    settings = {**SETTINGS, "tau": "learn", "tau_init": 100.0, "max_steps": 6, "tau_warmup": 2,
                "tau_update_every": 2, "tau_curvature_batches": 2}
    result = bora_pyro.fit_map(corpus, model=_tiny(), tokenizer=char_tokenizer(), adapter_storage="host", **settings)
    stepper = steppers[0]
    assert stepper.sparse and stepper.storage.type == "cpu"
    assert stepper.mc_fisher.sq.device == stepper.mc_fisher.seen.device == stepper.storage
    assert [u["step"] for u in result.history["tau_update"]] == [3, 5]
    assert len(sampled) == 4 and all(0 < k <= 8 for k in sampled), sampled  # after steps 2, 3, 4, 5
    assert not created, created
    taus = [t for u in result.history["tau_update"] for t in u["tau"]]
    assert all(np.isfinite(taus)) and all(t != 100.0 for t in taus), taus


def _host_and_device_fits(method, curvature, device="cpu"):
    corpus = build_corpus(synthetic_corpus_frame((8, 12, 16, 6, 9)), char_tokenizer(), max_length=24, seed=0)
    return {storage: bora_pyro.fit_map(
        corpus, model=_tiny(), tokenizer=char_tokenizer(), rank=2, alpha=4.0, tau="learn", tau_init=100.0,
        max_steps=30, batch_size=4, lr=1e-2, tau_warmup=5, tau_update_every=5, tau_method=method,
        tau_curvature=curvature, task_step="sparse", adapter_storage=storage, device=device, progress=False,
        patience=None) for storage in ["host", "device"]}


@pytest.mark.parametrize("method, curvature", [("evidence", "fisher"), ("evidence", "empirical"),
                                               ("validation", "fisher")])
def test_learned_tau_with_host_storage_matches_device_storage(method, curvature):
    """Sparse learned-tau MAP on the tiny LM (the evidence with the sampled Fisher and with the
    empirical curvature, and the validation method): adapters in host memory give the same tau
    updates and adapters, bit for bit, as adapters on the compute device (here both the CPU: the
    same arithmetic on the same values)."""
    results = _host_and_device_fits(method, curvature)
    host, device = results["host"], results["device"]
    assert len(host.history["tau_update"]) == 5
    assert host.history["tau_update"] == device.history["tau_update"]
    assert torch.equal(host.task_adapters, device.task_adapters)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_validation_tau_with_host_storage_on_cuda_matches_device_storage():
    """On a GPU the validation method's probe sums and ``dTheta/dtau`` are in host memory with host
    storage and on the GPU with device storage (other arithmetic): the tau updates agree to 1e-4
    relative, the adapters to 1e-4 absolute."""
    results = _host_and_device_fits("validation", "fisher", device="cuda")
    host, device = results["host"], results["device"]
    host_tau = [t for u in host.history["tau_update"] for t in u["tau"]]
    device_tau = [t for u in device.history["tau_update"] for t in u["tau"]]
    assert len(host.history["tau_update"]) == 5
    assert host_tau == pytest.approx(device_tau, rel=1e-4)
    torch.testing.assert_close(host.task_adapters, device.task_adapters, atol=1e-4, rtol=0)


def test_ten_thousand_tasks_with_a_validation_tau_from_fit_map(corpus, monkeypatch):
    """MAP with ``tau_method="validation"``, sparse steps and host storage at 10,000 tasks: each
    update's pass runs on the K rows of its validation batch's tasks, and the update creates no
    ``[D, ...]`` tensor at all (``dTheta/dtau`` is summed over row blocks, here of 1,000 rows or
    fewer) besides its in-place sums into the probe's accumulators, which live with the tables.
    A few seconds, most of it the fixture's tokenisation."""
    from bora_pyro.data import TaskCorpus
    from bora_pyro.inference import hyper, map as map_module
    from bora_pyro.inference.map import MAPStepper

    validation = corpus.train.select(np.arange(0, corpus.train.num_docs, 200))  # 100 documents of 100 tasks
    validation.name = "validation"
    with_validation = TaskCorpus(corpus.tasks, {"train": corpus.train, "validation": validation,
                                                "test": corpus.test},
                                 pad_token_id=corpus.pad_token_id, start_token_id=corpus.start_token_id)
    passes, created, steppers = [], [], []
    per_document, update = hyper.per_document_gradients, MAPStepper._validation_update

    def counted(logits_fn, task_adapters, batch, **kw):
        passes.append(task_adapters.shape[0])
        return per_document(logits_fn, task_adapters, batch, **kw)

    def watched(self, step):
        steppers[:] = [self]
        assert map_module.RESPONSE_BLOCK // self.model.num_params <= 1000
        with _TaskRows(TASKS, [self.probe.sq, self.probe.seen]) as mode:
            update(self, step)
        created.extend(mode.calls)

    monkeypatch.setattr(hyper, "per_document_gradients", counted)
    monkeypatch.setattr(MAPStepper, "_validation_update", watched)
    monkeypatch.setattr(map_module, "RESPONSE_BLOCK", 1 << 16)
    settings = {**SETTINGS, "tau": "learn", "tau_method": "validation", "tau_init": 100.0, "max_steps": 6,
                "tau_warmup": 2, "tau_update_every": 2}
    result = bora_pyro.fit_map(with_validation, model=_tiny(), tokenizer=char_tokenizer(), adapter_storage="host",
                               **settings)
    stepper = steppers[0]
    assert stepper.sparse and stepper.storage.type == "cpu"
    assert stepper.probe.sq.device == stepper.probe.seen.device == stepper.storage
    assert [u["step"] for u in result.history["tau_update"]] == [3, 5]
    assert len(passes) == 2 and all(0 < k <= 8 for k in passes), passes
    assert not created, created
    taus = [t for u in result.history["tau_update"] for t in u["tau"]]
    assert all(np.isfinite(taus)) and all(t != 100.0 for t in taus), taus


def test_ten_thousand_tasks_from_the_command_line(tmp_path, capsys):
    folder = tmp_path / "tiny"
    _tiny().save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    data = tmp_path / "many.jsonl"
    _frame().to_json(data, orient="records", lines=True)
    out = tmp_path / "run"
    code = main(["fit", str(data), "--model", str(folder), "--steps", "3", "--batch-size", "8", "--rank", "2",
                 "--targets", "q_proj", "v_proj", "--tau", "100", "--max-length", "12",
                 "--test-size", "0", "--validation-size", "0", "--device", "cpu", "--adapter-storage", "host",
                 "--out", str(out)])
    assert code == 0
    capsys.readouterr()
    saved = bora_pyro.load_result(out)
    assert saved.task_adapters.shape[0] == TASKS
    assert json.loads((out / "config.json").read_text())["fit_args"]["adapter_storage"] == "host"


def _log_joint(result, corpus):
    """Full-data log joint at the fitted adapters (prior + summed token log-likelihood)."""
    from bora_pyro.evaluation import per_task_nll

    nll, _, _ = per_task_nll(result.lm, result.task_adapters, corpus.split("train"), num_tasks=corpus.num_tasks,
                             batch_size=16, device="cpu", autocast_dtype=None)
    tau = result.tau["all"]
    prior = -0.5 * tau * float((result.task_adapters - result.global_adapter).square().sum())
    return prior - float(nll.sum())


def test_sparse_step_reaches_the_dense_optimum_on_the_tiny_lm():
    """Minibatches of 4 documents of 3 tasks, 400 steps: the full-data log joint at the sparse
    and dense results agree within 1% (their difference is the minibatch noise of either run);
    and both improve on the start by far more than that."""
    corpus = build_corpus(synthetic_corpus_frame((8, 12, 16)), char_tokenizer(), max_length=24,
                                         seed=0)
    common = dict(model=tiny_causal_lm("llama", hidden_size=16, num_layers=1), tokenizer=char_tokenizer(),
                  rank=2, alpha=4.0, tau=10.0, precision_groups="shared", max_steps=400, batch_size=4, lr=1e-2,
                  lr_schedule="linear", patience=None, device="cpu", progress=False)
    sparse = bora_pyro.fit_map(corpus, task_step="sparse", **common)
    dense = bora_pyro.fit_map(corpus, task_step="dense", **common)
    start = bora_pyro.fit_map(corpus, task_step="dense", **{**common, "max_steps": 1, "lr": 1e-9})
    a, b, s = _log_joint(sparse, corpus), _log_joint(dense, corpus), _log_joint(start, corpus)
    assert abs(a - b) < 0.01 * abs(b), (a, b)
    assert min(a, b) - s > 10 * abs(a - b), (a, b, s)
