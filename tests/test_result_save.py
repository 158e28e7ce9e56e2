"""BoraResult.save / load_result: the user's folders are theirs, a killed save leaves one whole
result, and the JSON files are strict."""

import json
import math
import os

import pytest
import torch

import bora_pyro
from bora_pyro.files import FolderError
from bora_pyro.testing import char_tokenizer, tiny_causal_lm
from tests.test_files import _refuse_constant, _run_killed_after, _tree
from tests.tiny_result import tiny_result


def _load(path):
    return bora_pyro.load_result(path, model=tiny_causal_lm("llama"), tokenizer=char_tokenizer(), device="cpu")


def test_save_refuses_the_users_folder_and_leaves_it_as_it_was(tmp_path, monkeypatch):
    result = tiny_result()
    project = tmp_path / "proj"
    project.mkdir()
    (project / "data.jsonl").write_text('{"task": "a", "text": "b"}\n')
    (project / "notes.md").write_text("mine")
    before = _tree(tmp_path)
    with pytest.raises(FolderError, match="proj'? holds files bora_pyro did not write"):
        result.save(project, overwrite=True)
    monkeypatch.chdir(project)
    with pytest.raises(FolderError, match="working directory"):
        result.save(".", overwrite=True)
    assert _tree(tmp_path) == before


def test_save_over_an_earlier_result_needs_overwrite(tmp_path):
    old, new = tiny_result(seed=1), tiny_result(seed=2)
    path = old.save(tmp_path / "run")
    with pytest.raises(FolderError, match="pass overwrite=True"):
        new.save(path)
    assert torch.equal(_load(path).task_adapters, old.task_adapters)
    assert new.save(path, overwrite=True) == path
    assert torch.equal(_load(path).task_adapters, new.task_adapters)


def test_a_save_killed_at_any_operation_leaves_one_whole_result(tmp_path):
    old, new = tiny_result(seed=1), tiny_result(seed=2)
    path = tmp_path / "run"
    old.save(path)
    total = _run_killed_after(math.inf, lambda: new.save(path, overwrite=True))
    assert total > 15
    seen = set()
    for k in range(total + 1):
        old.save(path, overwrite=True)
        _run_killed_after(k, lambda: new.save(path, overwrite=True))
        loaded = _load(path)  # reads the earlier result kept beside the folder if the swap was cut
        which = next(name for name, r in (("old", old), ("new", new)) if torch.equal(loaded.task_adapters, r.task_adapters))
        expected = old if which == "old" else new
        assert torch.equal(loaded.global_adapter, expected.global_adapter), k
        assert loaded.tau == expected.tau and loaded.tasks == expected.tasks, k
        seen.add(which)
        new.save(path, overwrite=True)  # the next save repairs what the kill left
        assert sorted(os.listdir(tmp_path)) == ["run"], k
    assert seen == {"old", "new"}


def test_json_files_are_strict_and_non_finite_numbers_round_trip(tmp_path):
    result = tiny_result(tau=float("inf"), pooled=True)  # the pooled limit: tau = inf in history
    result.history = {"step": [0, 1], "train_nll": [2.0, 1.5], "val_nll": [math.nan, 1.25],
                      "tau": [[math.inf, math.inf]] * 2}
    result.fit_args = {"best_value": math.inf, "lr": 1e-3}
    path = result.save(tmp_path / "run")
    for file in ("config.json", "history.json", "corpus.json", ".bora_pyro"):
        json.loads((path / file).read_text(), parse_constant=_refuse_constant)
    loaded = _load(path)
    assert loaded.tau == {"A": math.inf, "B": math.inf} and loaded.config.tau == math.inf
    assert math.isnan(loaded.history["val_nll"][0]) and loaded.history["val_nll"][1] == 1.25
    assert loaded.history["tau"] == [[math.inf, math.inf]] * 2 and loaded.history["step"] == [0, 1]
    assert loaded.fit_args == {"best_value": math.inf, "lr": 1e-3}
