import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from bora_pyro.models.layout import AdapterLayout
from bora_pyro.models.lora import MultiTaskLM, MultiTaskLoRALinear, find_target_modules
from bora_pyro.testing import tiny_causal_lm


def _random_adapters(layout: AdapterLayout, num_tasks: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.2 * torch.randn(num_tasks, layout.size, generator=g)


def _peft_model_for(base, lm: MultiTaskLM, theta: torch.Tensor, family: str):
    """A plain single-adapter PEFT LoRA model holding the adapter ``theta`` [P]."""
    layout = lm.layout
    kinds = sorted({name.rsplit(".", 1)[-1] for name, _, _ in layout.modules})
    config = LoraConfig(
        r=layout.rank, lora_alpha=layout.alpha, lora_dropout=0.0, target_modules=kinds,
        fan_in_fan_out=(family == "gpt2"),
    )
    peft_model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, _, _ in layout.modules:
            module = peft_model.base_model.model.get_submodule(name)
            module.lora_A["default"].weight.copy_(layout.view(theta, name, "A"))
            module.lora_B["default"].weight.copy_(layout.view(theta, name, "B"))
    return peft_model.eval()


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "qwen2"])
def test_batched_forward_equals_single_adapter_peft_per_task(family):
    base = tiny_causal_lm(family)
    reference_base = copy.deepcopy(base)
    lm = MultiTaskLM(base, rank=4, alpha=8)
    D = 3
    theta = _random_adapters(lm.layout, D)
    g = torch.Generator().manual_seed(2)
    input_ids = torch.randint(4, 100, (7, 11), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 8:] = 0
    task_ids = torch.tensor([0, 2, 1, 0, 2, 2, 1])
    with torch.no_grad():
        mixed = lm(input_ids, attention_mask, adapters=theta, task_ids=task_ids)
        for d in range(D):
            rows = task_ids == d
            peft_model = _peft_model_for(reference_base, lm, theta[d], family)
            expected = peft_model(input_ids=input_ids[rows], attention_mask=attention_mask[rows]).logits
            torch.testing.assert_close(mixed[rows], expected, rtol=1e-5, atol=1e-5)
            # The adapter must matter, or the comparison above proves nothing.
            plain = reference_base(input_ids=input_ids[rows], attention_mask=attention_mask[rows]).logits
            assert (plain - expected).abs().max() > 1e-3


def test_single_adapter_for_all_rows_equals_gathered_copies():
    lm = MultiTaskLM(tiny_causal_lm("llama"), rank=2, alpha=4)
    theta = _random_adapters(lm.layout, 1)[0]
    ids = torch.randint(4, 100, (3, 6))
    with torch.no_grad():
        shared = lm(ids, adapters=theta)
        gathered = lm(ids, adapters=theta.expand(2, -1), task_ids=torch.tensor([1, 0, 1]))
    torch.testing.assert_close(shared, gathered, rtol=1e-5, atol=1e-6)


def test_no_adapters_and_zero_B_give_the_base_model():
    base = tiny_causal_lm("gpt2")
    reference = copy.deepcopy(base)
    lm = MultiTaskLM(base, rank=4, alpha=8)
    ids = torch.randint(4, 100, (2, 5))
    theta0 = lm.layout.init_global(generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        torch.testing.assert_close(lm(ids), expected)
        torch.testing.assert_close(lm(ids, adapters=theta0), expected)


def test_autodetected_targets_per_family():
    llama = find_target_modules(tiny_causal_lm("llama"))
    assert {n.rsplit(".", 1)[-1] for n in llama} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    gpt2 = find_target_modules(tiny_causal_lm("gpt2"))
    assert {n.rsplit(".", 1)[-1] for n in gpt2} == {"c_attn", "c_proj", "c_fc"}
    opt = find_target_modules(tiny_causal_lm("opt"))
    assert not any("lm_head" in n or "embed" in n for n in opt)
    assert len(llama) == 14 and len(gpt2) == 8


def test_target_override_and_unknown_target_error():
    model = tiny_causal_lm("llama")
    names = find_target_modules(model, ["v_proj", "q_proj"])
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                     "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    with pytest.raises(ValueError, match=r"c_attn.*Valid module kinds.*q_proj"):
        find_target_modules(model, ["c_attn"])


def test_gradients_flow_only_to_the_rows_tasks_and_base_stays_frozen():
    lm = MultiTaskLM(tiny_causal_lm("llama"), rank=2, alpha=4)
    theta = _random_adapters(lm.layout, 4).requires_grad_(True)
    ids = torch.randint(4, 100, (3, 6))
    labels = ids.clone()
    nll = lm.sequence_nll(ids, torch.ones_like(ids), labels, adapters=theta, task_ids=torch.tensor([0, 2, 0]))
    nll.sum().backward()
    per_task = theta.grad.abs().sum(-1)
    assert per_task[0] > 0 and per_task[2] > 0
    assert per_task[1] == 0 and per_task[3] == 0
    assert all(not p.requires_grad for p in lm.base_model.parameters())


def test_sequence_nll_matches_hf_loss():
    base = tiny_causal_lm("llama")
    reference = copy.deepcopy(base)
    lm = MultiTaskLM(base, rank=2, alpha=4)
    ids = torch.randint(4, 100, (2, 9))
    labels = ids.clone()
    labels[:, :3] = -100
    with torch.no_grad():
        nll = lm.sequence_nll(ids, torch.ones_like(ids), labels)
        for n in range(2):
            hf = reference(input_ids=ids[n : n + 1], labels=labels[n : n + 1]).loss  # mean over 6 tokens
            torch.testing.assert_close(nll[n], hf * 6, rtol=1e-5, atol=1e-5)


def test_rewrapping_replaces_wrappers_and_unwrap_restores():
    base = tiny_causal_lm("llama")
    MultiTaskLM(base, rank=2, alpha=16.0)
    lm = MultiTaskLM(base, rank=4, alpha=16.0)
    wrappers = [m for m in base.modules() if isinstance(m, MultiTaskLoRALinear)]
    assert len(wrappers) == 14 and all(w.rank == 4 for w in wrappers)
    lm.unwrap()
    assert not any(isinstance(m, MultiTaskLoRALinear) for m in base.modules())


def test_bad_adapter_width_is_a_clear_error():
    lm = MultiTaskLM(tiny_causal_lm("llama"), rank=2, alpha=16.0)
    with pytest.raises(ValueError, match="P="):
        lm(torch.randint(4, 100, (1, 4)), adapters=torch.zeros(5))


def test_same_layout_shares_wrappers_and_other_layout_invalidates_old_lm():
    base = tiny_causal_lm("llama")
    first = MultiTaskLM(base, rank=2, alpha=4)
    second = MultiTaskLM(base, rank=2, alpha=4)
    assert second.context is first.context
    ids = torch.randint(4, 100, (1, 4))
    theta = _random_adapters(first.layout, 1)[0]
    with torch.no_grad():
        torch.testing.assert_close(first(ids, adapters=theta), second(ids, adapters=theta))
    MultiTaskLM(base, rank=4, alpha=4)
    with pytest.raises(RuntimeError, match="re-wrapped"):
        first(ids, adapters=theta)


def test_per_token_tasks_equal_per_row_tasks_and_reach_only_present_tasks():
    """A packed layout with one document per row must give the padded per-row result."""
    lm = MultiTaskLM(tiny_causal_lm("qwen2"), rank=2, alpha=4)
    theta = _random_adapters(lm.layout, 4).requires_grad_(True)
    ids = torch.randint(4, 100, (3, 6), generator=torch.Generator().manual_seed(5))
    task_ids = torch.tensor([2, 0, 2])
    per_row = lm(ids, torch.ones_like(ids), adapters=theta, task_ids=task_ids)
    segments = torch.arange(3).unsqueeze(1).expand(3, 6)
    per_token = lm(ids, adapters=theta, task_ids=task_ids, position_ids=torch.arange(6).expand(3, 6),
                   segment_ids=segments)
    torch.testing.assert_close(per_token, per_row, rtol=1e-5, atol=1e-5)
    per_token.sum().backward()
    present = theta.grad.abs().sum(-1) > 0
    assert present.tolist() == [True, False, True, False]
