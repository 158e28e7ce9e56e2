"""load_result checks every file against config.json and names the file and the field."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import bora_pyro
from bora_pyro import BoraConfig
from bora_pyro.testing import char_tokenizer, tiny_causal_lm
from tests.tiny_result import tiny_result


@pytest.fixture
def saved(tmp_path):
    """A saved SVI-like result (with task_scales): 3 tasks, tau groups A and B."""
    result = tiny_result()
    result.method = "svi"
    result.task_scales = torch.full_like(result.task_adapters, 0.1)
    return result.save(tmp_path / "run")


def _load(path):
    return bora_pyro.load_result(path, model=tiny_causal_lm("llama"), tokenizer=char_tokenizer(), device="cpu")


def _edit_tensors(path, **changes):
    tensors = load_file(path / "adapters.safetensors")
    for key, value in changes.items():
        if value is None:
            del tensors[key]
        else:
            tensors[key] = value(tensors[key]) if callable(value) else value
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / "adapters.safetensors")


def _edit_config(path, edit):
    meta = json.loads((path / "config.json").read_text())
    edit(meta)
    (path / "config.json").write_text(json.dumps(meta))


def test_the_saved_result_loads(saved):
    loaded = _load(saved)
    assert loaded.method == "svi" and loaded.task_scales.shape == loaded.task_adapters.shape


@pytest.mark.parametrize("change, message", [
    (dict(task_adapters=lambda t: t[:-1]), r"tensor 'task_adapters' has shape \[2, P\], expected \[3, P\]"),
    (dict(global_adapter=lambda t: t[:-5]), r"tensor 'global_adapter' has shape \[P-5\], expected \[P\]"),
    (dict(task_scales=lambda t: t[:, :7]), r"tensor 'task_scales' has shape \[3, 7\], expected \[3, P\]"),
    (dict(tau=torch.ones(5, dtype=torch.float64)), r"tensor 'tau' has shape \[5\], expected \[2\].*2 precision groups \['A', 'B'\]"),
    (dict(task_adapters=lambda t: t.to(torch.int32)), r"tensor 'task_adapters' has dtype torch.int32, expected a floating"),
    (dict(global_adapter=lambda t: torch.where(torch.arange(len(t)) == 3, float("nan"), t)),
     r"tensor 'global_adapter' holds 1 NaN or infinite value"),
    (dict(task_adapters=lambda t: t.index_fill(1, torch.tensor([0, 1]), float("inf"))),
     r"tensor 'task_adapters' holds 6 NaN or infinite value"),
    (dict(tau=torch.tensor([1.0, float("nan")], dtype=torch.float64)), r"tensor 'tau' is \[1.0, nan\]; precisions must be >= 0"),
    (dict(task_scales=lambda t: -t), r"'task_scales' holds negative standard deviations"),
    (dict(task_scales=None), r"lacks the tensor\(s\) \['task_scales'\] \(method='svi'\)"),
    (dict(extra=torch.ones(2)), r"unexpected tensor\(s\) \['extra'\]"),
])
def test_bad_tensors_are_named(saved, change, message):
    P = load_file(saved / "adapters.safetensors")["global_adapter"].shape[0]
    _edit_tensors(saved, **change)
    message = message.replace("P-5", str(P - 5)).replace("P", str(P))
    with pytest.raises(ValueError, match=re.escape(str(saved / "adapters.safetensors")) + ".*" + message):
        _load(saved)


def test_a_truncated_safetensors_file_is_named(saved):
    data = (saved / "adapters.safetensors").read_bytes()
    (saved / "adapters.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(str(saved / "adapters.safetensors")) + " cannot be read as safetensors"):
        _load(saved)
    (saved / "corpus.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
    (saved / "adapters.safetensors").write_bytes(data)
    with pytest.raises(ValueError, match="corpus.safetensors cannot be read as safetensors"):
        _load(saved)


@pytest.mark.parametrize("file", ["config.json", "history.json", "corpus.json"])
def test_a_broken_json_file_is_named(saved, file):
    text = (saved / file).read_text()
    (saved / file).write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=re.escape(str(saved / file)) + r" is not valid JSON \(.* at line \d+, column \d+\)"):
        _load(saved)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("tasks"), r"lacks the field 'tasks'"),
    (lambda m: m.pop("layout"), r"lacks the field 'layout'"),
    (lambda m: m.update(tasks="OPHELIA"), r"field 'tasks' must be a JSON list"),
    (lambda m: m.update(tasks=["a", "a", "b"]), r"field 'tasks' must be a non-empty list of distinct names"),
    (lambda m: m.update(method="hmc"), r"field 'method' is 'hmc'"),
    (lambda m: m.update(format_version=99), r"field 'format_version' is 99.*upgrade bora_pyro"),
    (lambda m: m["config"].pop("rank"), r"field 'config' lacks \['rank'\]"),
    (lambda m: m["config"].update(rnak=4),
     r"field 'config': Unknown model setting\(s\) \['rnak'\] for BoraConfig; valid: \['alpha'"),
    (lambda m: m["config"].update(rank=2), r"field 'layout' has rank 4, alpha 8, but field 'config' has rank 2"),
    (lambda m: m["config"].update(precision_groups="shared"), r"field 'tau_groups' is \['A', 'B'\], but precision_groups='shared'"),
    (lambda m: m.update(tau_groups=["A", "B", "C"]), r"field 'tau_groups' is \['A', 'B', 'C'\]"),
    (lambda m: m["layout"].pop("modules"), r"field 'layout' is not an adapter layout \(KeyError"),
])
def test_a_bad_config_json_names_the_field(saved, edit, message):
    _edit_config(saved, edit)
    with pytest.raises(ValueError, match=re.escape(str(saved / "config.json")) + ".*" + message):
        _load(saved)


def test_a_history_that_is_not_lists_is_named(saved):
    (saved / "history.json").write_text('{"step": 3}')
    with pytest.raises(ValueError, match=r"history.json: field 'step' must be a list"):
        _load(saved)


def test_config_from_dict_lists_unknown_and_valid_keys():
    config = BoraConfig(rank=4, tau=float("inf"))
    assert BoraConfig.from_dict(config.to_dict()) == config
    assert BoraConfig.from_dict({"rank": 2}).rank == 2  # missing fields take their defaults
    with pytest.raises(ValueError, match=r"Unknown model setting\(s\) \['rnak', 'zeta'\] for BoraConfig; valid: \['alpha'"):
        BoraConfig.from_dict({"rnak": 4, "zeta": 1, "alpha": 2})
    with pytest.raises(ValueError, match="needs a dict, got list"):
        BoraConfig.from_dict([("rank", 4)])
