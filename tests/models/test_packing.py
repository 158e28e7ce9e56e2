"""Packed batches give the numbers of padded ones: per-document NLL and its gradient w.r.t. the
[D, P] task adapters, for the four architectures, with documents of several tasks in one row;
and the minibatch (hence the N / B scaling of the likelihood) does not change with packing."""

import numpy as np
import pyro.poutine as poutine
import pytest
import torch

from bora_pyro.config import BoraConfig
from bora_pyro.data import build_corpus
from bora_pyro.data.splits import TaskSplit
from bora_pyro.inference.fit import _endless_batches
from bora_pyro.models import build_bora
from bora_pyro.models.lora import MultiTaskLM
from bora_pyro.testing import char_tokenizer, synthetic_corpus_frame, tiny_causal_lm

D = 3
#: fp32 tolerance of the packed-vs-padded comparisons (the issue's bar).
ATOL = 1e-4


def _split(num_docs=10, seed=0):
    """Documents of 2..17 tokens over D tasks; every third one has a 3-token prompt."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 18, size=num_docs)
    lengths[num_docs // 2] = 17  # one long document, so that padding is visible
    tokens = rng.integers(4, 100, size=int(lengths.sum()))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens[offsets[:-1]] = 1  # start token
    label_starts = np.where((np.arange(num_docs) % 3 == 0) & (lengths > 4), 4, 1)
    task_ids = rng.integers(0, D, size=num_docs)
    return TaskSplit("train", tokens, offsets, label_starts, task_ids, num_tasks=D, pad_token_id=0)


def _adapters(lm, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (0.2 * torch.randn(D, lm.num_params, generator=g)).requires_grad_(True)


def _nll_and_grad(lm, batch, theta):
    theta.grad = None
    nll = lm.batch_nll(batch, theta)
    nll.sum().backward()
    return nll.detach(), theta.grad.clone()


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "qwen2"])
def test_packed_nll_and_gradients_equal_padded(family):
    split = _split()
    indices = [4, 0, 7, 5, 2, 9, 1, 3]
    padded = split.batch(indices)
    packed = split.batch(indices, pack=True, row_tokens=24)
    # several documents, of more than one task, share a row
    mixed = [set(packed.task_ids[packed.segment_ids[r][packed.segment_ids[r] >= 0]].tolist())
             for r in range(packed.num_rows)]
    assert packed.num_rows < len(indices) and max(len(tasks) for tasks in mixed) >= 2
    lm = MultiTaskLM(tiny_causal_lm(family), rank=4, alpha=8)
    theta = _adapters(lm)
    nll_padded, grad_padded = _nll_and_grad(lm, padded, theta)
    nll_packed, grad_packed = _nll_and_grad(lm, packed, theta)
    torch.testing.assert_close(nll_packed, nll_padded, rtol=0, atol=ATOL)
    torch.testing.assert_close(grad_packed, grad_padded, rtol=0, atol=ATOL)
    assert grad_padded.abs().amax(-1).min() > 1e-2  # every task is in the batch and has a gradient
    # one adapter for every document, and the base model, too
    shared = theta.detach()[1]
    with torch.no_grad():
        torch.testing.assert_close(lm.batch_nll(packed, shared), lm.batch_nll(padded, shared), rtol=0, atol=ATOL)
        torch.testing.assert_close(lm.batch_nll(packed), lm.batch_nll(padded), rtol=0, atol=ATOL)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_packed_equals_padded_with_eager_attention(family):
    base = tiny_causal_lm(family)
    base.set_attn_implementation("eager")
    split = _split(seed=2)
    indices = list(range(8))
    lm = MultiTaskLM(base, rank=4, alpha=8)
    theta = _adapters(lm).detach()
    with torch.no_grad():
        padded = lm.batch_nll(split.batch(indices), theta)
        packed = lm.batch_nll(split.batch(indices, pack=True, row_tokens=30), theta)
    torch.testing.assert_close(packed, padded, rtol=0, atol=ATOL)


def test_attention_does_not_cross_documents():
    """Changing one document changes the NLL of that document only, even in a shared row."""
    split = _split(num_docs=4, seed=3)
    lm = MultiTaskLM(tiny_causal_lm("opt"), rank=2, alpha=4)  # OPT ignores packed position_ids
    theta = _adapters(lm).detach()
    batch = split.batch([0, 1, 2, 3], pack=True, row_tokens=10_000)
    assert batch.num_rows == 1
    changed = batch.input_ids.clone()
    first = (batch.segment_ids[0] == 0).nonzero().flatten()
    changed[0, first[1:]] = (changed[0, first[1:]] + 1) % 100 + 4
    with torch.no_grad():
        before = lm.batch_nll(batch, theta)
        batch.input_ids = changed
        after = lm.batch_nll(batch, theta)
    assert (after[0] - before[0]).abs() > 1e-3
    torch.testing.assert_close(after[1:], before[1:], rtol=0, atol=1e-5)


def test_packing_needs_a_mask_taking_attention():
    base = tiny_causal_lm("llama")
    base.config._attn_implementation = "flash_attention_2"
    lm = MultiTaskLM(base, rank=2, alpha=4)
    batch = _split().batch([0, 1], pack=True)
    with pytest.raises(ValueError, match=r"attn_implementation='flash_attention_2'.*'sdpa'.*packing=False"):
        lm.batch_nll(batch)


def test_position_and_segment_ids_go_together():
    lm = MultiTaskLM(tiny_causal_lm("llama"), rank=2, alpha=4)
    batch = _split().batch([0, 1], pack=True)
    with pytest.raises(ValueError, match="position_ids and segment_ids go together"):
        lm(batch.input_ids, position_ids=batch.position_ids)


def test_packing_keeps_the_minibatches_and_the_scaled_log_joint():
    """The likelihood estimate (N / B) * sum_{n in batch} log p(doc_n) is unbiased because every
    step's B documents are a uniform draw without replacement; packing changes the layout of the
    same B documents, not which ones: same doc_index sequence, same Pyro log joint."""
    corpus = build_corpus(synthetic_corpus_frame((6, 9, 12)), char_tokenizer(), max_length=40, seed=0)
    train = corpus.split("train")
    padded = _endless_batches(train, 4, seed=5)
    packed = _endless_batches(train, 4, seed=5, pack=True)
    steps = 2 * (len(train) // 4) + 1  # more than an epoch
    pairs = [(next(padded), next(packed)) for _ in range(steps)]
    for a, b in pairs:
        assert b.packed and torch.equal(a.doc_index, b.doc_index) and torch.equal(a.task_ids, b.task_ids)
    config = BoraConfig(rank=2, alpha=4, tau=50.0)
    lm, model = build_bora(tiny_causal_lm("llama"), corpus, config, seed=0)
    g = torch.Generator().manual_seed(0)
    Theta = 0.1 * torch.randn(lm.num_params, generator=g)
    values = {"global_adapter": Theta, "task_adapters": Theta + 0.05 * torch.randn(corpus.num_tasks, lm.num_params, generator=g)}
    conditioned = poutine.condition(model, data=values)
    for a, b in pairs[:2]:
        with torch.no_grad():
            lp_padded = poutine.trace(conditioned).get_trace(a).log_prob_sum()
            lp_packed = poutine.trace(conditioned).get_trace(b).log_prob_sum()
        torch.testing.assert_close(lp_packed, lp_padded, rtol=1e-6, atol=ATOL * len(train) / 4)
