"""PEFT export and import: folders PEFT loads with the same logits, and the way back."""

import copy
import json
import re

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import bora_pyro
from bora_pyro.data import build_corpus
from bora_pyro.export import export_peft, load_peft_adapter, safe_folder_names
from bora_pyro.files import FolderError
from bora_pyro.models.layout import AdapterLayout
from bora_pyro.models.lora import MultiTaskLM
from bora_pyro.testing import char_tokenizer, synthetic_corpus_frame, tiny_causal_lm
from tests.tiny_result import TASKS, tiny_result

ATOL = 1e-4  # fp32 logits, PEFT vs bora_pyro


def _ids(n=3, length=9, seed=2):
    return torch.randint(4, 100, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_peft_loads_each_exported_task_with_the_same_logits(family, tmp_path):
    result = tiny_result(family)
    reference = tiny_causal_lm(family)  # same seed: the unwrapped base model
    paths = export_peft(result, tmp_path)
    assert set(paths) == set(TASKS) | {"<global>"}
    ids = _ids()
    with torch.no_grad():
        plain = reference(input_ids=ids).logits
        for task, folder in paths.items():
            peft_model = PeftModel.from_pretrained(copy.deepcopy(reference), folder).eval()
            expected = peft_model(input_ids=ids).logits
            got = result.logits(ids, task)
            assert (got - expected).abs().max() < ATOL, task
            assert (plain - expected).abs().max() > 1e-2  # the adapter matters
    config = json.loads((paths["OPHELIA"] / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"]) == (4, 8.0)
    assert config["fan_in_fan_out"] is (family == "gpt2")


def test_load_peft_adapter_of_an_export_is_the_adapter_exactly(tmp_path):
    result = tiny_result("gpt2")
    paths = result.export_peft(tmp_path)
    layout = result.lm.layout
    for d, task in enumerate(result.tasks):
        torch.testing.assert_close(load_peft_adapter(paths[task], layout), result.task_adapters[d], rtol=0, atol=0)
    torch.testing.assert_close(load_peft_adapter(paths["<global>"], layout), result.global_adapter, rtol=0, atol=0)


def test_folder_names_are_safe_unique_and_indexed(tmp_path):
    result = tiny_result("llama")
    paths = export_peft(result, tmp_path, include_global=False)
    assert paths["HAMLET (Hamlet)"].name == "HAMLET_Hamlet"
    assert paths["hamlet_hamlet"].name == "hamlet_hamlet_2"  # HAMLET_Hamlet taken, ignoring case
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["tasks"] == {task: path.name for task, path in paths.items()}
    assert index["global"] is None and not (tmp_path / "_global").exists()
    for path in paths.values():
        assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    names = ["a/b", "a b", "..", "", "CON", "x" * 300, "Été / été", "_global", "index.json"]
    safe = safe_folder_names(names)
    assert len({s.lower() for s in safe} | {"_global", "index.json"}) == len(names) + 2
    assert all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,104}", s) for s in safe), safe
    assert safe[:3] == ["a_b", "a_b_2", "task"] and safe[4] == "CON_"


def test_export_a_subset_and_an_unknown_task_is_a_clear_error(tmp_path):
    result = tiny_result("llama")
    paths = export_peft(result, tmp_path, tasks=["OPHELIA"])
    assert set(paths) == {"OPHELIA", "<global>"}
    with pytest.raises(ValueError, match="OPHELA"):
        export_peft(result, tmp_path, tasks=["OPHELA"])


def test_pooled_result_exports_every_task_as_the_global_adapter(tmp_path):
    result = tiny_result("llama", tau=float("inf"), pooled=True)
    paths = export_peft(result, tmp_path)
    assert set(paths) == set(TASKS) | {"<global>"}
    for task in TASKS:
        torch.testing.assert_close(load_peft_adapter(paths[task], result.lm.layout), result.global_adapter, rtol=0, atol=0)
    assert json.loads((tmp_path / "index.json").read_text())["tau"] == {"A": "inf", "B": "inf"}


def test_mismatched_layouts_are_clear_errors(tmp_path):
    result = tiny_result("llama")
    folder = export_peft(result, tmp_path)["OPHELIA"]
    modules = result.lm.layout.modules
    first = modules[0][0]
    with pytest.raises(ValueError, match=rf"{re.escape(first)}.*shape \(4, 32\).*\(2, 32\)"):
        load_peft_adapter(folder, AdapterLayout(modules, rank=2, alpha=8))
    q_only = [m for m in modules if m[0].endswith("q_proj")]
    with pytest.raises(ValueError, match="does not adapt"):
        load_peft_adapter(folder, AdapterLayout(q_only, rank=4, alpha=8))
    more = modules + [("lm_head", 32, 104)]
    with pytest.raises(ValueError, match="no LoRA weights for module 'lm_head'"):
        load_peft_adapter(folder, AdapterLayout(more, rank=4, alpha=8))
    with pytest.raises(ValueError, match="AdapterLayout"):
        load_peft_adapter(folder, result)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_peft_adapter(tmp_path / "nowhere", result.lm.layout)


def test_a_folder_saved_by_peft_with_another_alpha_is_read_exactly(tmp_path):
    base = tiny_causal_lm("llama")
    config = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(base), config).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    lm = MultiTaskLM(base, rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
    theta = load_peft_adapter(tmp_path / "peft", lm.layout)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(lm(ids, adapters=theta), peft_model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(synthetic_corpus_frame((8, 8)), char_tokenizer(), max_length=32, seed=0)


def _fit(corpus, **kw):
    return bora_pyro.fit_map(
        corpus, model=tiny_causal_lm("llama"), tokenizer=char_tokenizer(), tau=100.0, rank=4, alpha=8,
        max_steps=1, batch_size=4, lr=1e-9, device="cpu", progress=False, **kw,
    )


def test_fit_map_starts_from_init_adapter(corpus, tmp_path):
    source = tiny_result("llama")
    folder = export_peft(source, tmp_path)["OPHELIA"]
    start = source.task_adapters[1]
    for init in (folder, str(folder), start):
        fitted = _fit(corpus, init_adapter=init)
        torch.testing.assert_close(fitted.global_adapter, start, rtol=0, atol=1e-6)
        torch.testing.assert_close(fitted.task_adapters, start.expand(2, -1), rtol=0, atol=1e-6)
    default = _fit(corpus)
    assert (default.global_adapter - start).abs().max() > 0.1
    with pytest.raises(ValueError, match=r"init_adapter has shape \(5,\)"):
        _fit(corpus, init_adapter=torch.zeros(5))
    with pytest.raises(ValueError, match="init_adapter must be"):
        _fit(corpus, init_adapter=3)


def test_export_writes_only_a_folder_it_owns(tmp_path):
    result = tiny_result("llama")
    user = tmp_path / "mine"
    user.mkdir()
    (user / "adapter_config.json").write_text("{}")  # the user's own adapter, say
    with pytest.raises(FolderError, match="holds files bora_pyro did not write"):
        export_peft(result, user, overwrite=True)
    assert [p.name for p in user.iterdir()] == ["adapter_config.json"] and (user / "adapter_config.json").read_text() == "{}"
    run = result.save(tmp_path / "run")
    with pytest.raises(FolderError, match="holds a bora_pyro result, not a peft"):
        export_peft(result, run, overwrite=True)

    out = tmp_path / "export"
    export_peft(result, out, tasks=["OPHELIA"])
    with pytest.raises(FolderError, match=r"pass overwrite=True"):
        result.export_peft(out)
    paths = result.export_peft(out, include_global=False, overwrite=True)  # replaced whole
    assert sorted(p.name for p in out.iterdir()) == sorted([".bora_pyro", "index.json", *(p.name for p in paths.values())])
    json.loads((out / "index.json").read_text(), parse_constant=lambda name: pytest.fail(f"bare {name}"))
