"""Diagonal curvatures: closed forms of a linear softmax model, and the Monte-Carlo Fisher against
the exact diagonal Fisher of a tiny LM."""

from dataclasses import dataclass

import pytest
import torch
from torch.overrides import TorchFunctionMode

from bora_pyro.data import IGNORE_INDEX, build_corpus
from bora_pyro.inference.curvature import (
    MonteCarloFisher,
    empirical_fisher_diagonal,
    exact_fisher_diagonal,
    hessian_diagonal,
    lm_logits,
    sample_targets,
)
from bora_pyro.models import MultiTaskLM
from bora_pyro.testing import char_tokenizer, synthetic_corpus_frame, tiny_causal_lm
from tests.conftest import assert_close

# ---- a linear softmax model: logits[n, t] = W_{task(n)} x[n, t], W = theta_d viewed as [K, J] --


@dataclass
class LinearBatch:
    x: torch.Tensor         # [B, T, J]
    y: torch.Tensor         # [B, T], IGNORE_INDEX where unscored
    task_ids: torch.Tensor  # [B]


K, J = 3, 4


def _linear_logits(rows, batch):
    W = rows.view(rows.shape[0], K, J)
    return torch.einsum("btj,bkj->btk", batch.x, W), batch.y


def _linear_problem(D=3, docs=(2, 3, 5), T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    task_ids = torch.repeat_interleave(torch.arange(D), torch.tensor(docs))
    x = torch.randn(len(task_ids), T, J, generator=g)
    y = torch.randint(0, K, (len(task_ids), T), generator=g)
    y[:, -2:] = IGNORE_INDEX  # unscored positions must not count
    theta = 0.7 * torch.randn(D, K * J, generator=g)
    return theta, LinearBatch(x, y, task_ids)


def _linear_closed_forms(theta, batch):
    """Per task ``[D, K*J]``: true Fisher (= Hessian, the logits being linear) and empirical Fisher."""
    D = theta.shape[0]
    W = theta.double().view(D, K, J)[batch.task_ids]                      # [B, K, J]
    x = batch.x.double()
    p = torch.einsum("btj,bkj->btk", x, W).softmax(-1)                    # [B, T, K]
    scored = (batch.y != IGNORE_INDEX).double()[..., None]                # [B, T, 1]
    fisher = torch.einsum("btk,btj->bkj", p * (1 - p) * scored, x * x)    # sum_t x_j^2 p_k (1 - p_k)
    onehot = torch.nn.functional.one_hot(batch.y.clamp_min(0), K).double()
    grad = torch.einsum("btk,btj->bkj", (p - onehot) * scored, x)         # per-document gradient
    by_task = lambda v: torch.zeros(D, K * J, dtype=torch.float64).index_add_(0, batch.task_ids, v.flatten(1))
    return by_task(fisher), by_task(grad.square())


def test_exact_references_equal_the_closed_forms_of_a_linear_softmax_model():
    theta, batch = _linear_problem()
    fisher, empirical = _linear_closed_forms(theta, batch)
    # Two batches (a split of the documents) must sum to the full-data value.
    halves = [LinearBatch(batch.x[i], batch.y[i], batch.task_ids[i]) for i in (slice(0, 4), slice(4, None))]
    assert_close(exact_fisher_diagonal(_linear_logits, theta, halves), fisher, rtol=1e-5, atol=1e-7)
    assert_close(hessian_diagonal(_linear_logits, theta, halves), fisher, rtol=1e-5, atol=1e-7)
    assert_close(empirical_fisher_diagonal(_linear_logits, theta, halves), empirical, rtol=1e-5, atol=1e-7)


def test_monte_carlo_fisher_converges_to_the_closed_form_of_a_linear_softmax_model():
    theta, batch = _linear_problem()
    fisher, empirical = _linear_closed_forms(theta, batch)
    mc = MonteCarloFisher(torch.bincount(batch.task_ids), K * J, beta=1.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(4000):  # minibatches of 3 of the 10 documents: each drawn about 1200 times
        i = torch.randperm(len(batch.task_ids), generator=g)[:3]
        mc.update(_linear_logits, theta, LinearBatch(batch.x[i], batch.y[i], batch.task_ids[i]), generator=g)
    h = mc.curvature().double()
    # The relative standard error of an entry is about 4%; allow 12%.
    assert_close(h, fisher, rtol=0.12, atol=1e-3 * float(fisher.max()))
    # ... and it estimates the true Fisher, not the empirical one (here they differ by > 30%).
    assert float(((empirical - fisher).abs() / fisher).median()) > 0.3


def test_sampled_targets_keep_unscored_positions_and_follow_the_predictive():
    logits = torch.log(torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]])).expand(2000, 2, 3).contiguous()
    targets = torch.tensor([[0, IGNORE_INDEX]]).expand(2000, 2)
    draws = sample_targets(logits, targets, generator=torch.Generator().manual_seed(0))
    assert bool((draws[:, 1] == IGNORE_INDEX).all())
    freq = torch.bincount(draws[:, 0], minlength=3).double() / 2000
    assert_close(freq, [0.7, 0.2, 0.1], atol=0.03, rtol=0)  # 3 standard errors of 2000 draws


def test_monte_carlo_fisher_bookkeeping_and_errors():
    mc = MonteCarloFisher([10, 20, 5], 2, beta=0.5)
    with pytest.raises(RuntimeError, match="needs at least one update"):
        mc.curvature()
    mc.add(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([0, 0]))
    mc.add(torch.tensor([[8.0, 0.0]]), torch.tensor([1]))
    # task 0: (0.5 * (1 + 3), 0.5 * (2 + 4)) / (0.5 * 2) per document, times 10 documents
    assert_close(mc.curvature(), [[20.0, 30.0], [160.0, 0.0], [0.0, 0.0]], rtol=1e-6, atol=0)
    assert mc.seen_tasks.tolist() == [True, True, False]
    restored = MonteCarloFisher([10, 20, 5], 2, beta=0.5)
    restored.load_state_dict(mc.state_dict())
    assert_close(restored.curvature(), mc.curvature(), rtol=0, atol=0)
    # Unseen task 2 from the pooled per-document average of the three documents seen:
    # (0.5 * (1 + 3) + 8, 0.5 * (2 + 4) + 0) / (0.5 * 2 + 1), times its 5 documents.
    assert_close(mc.curvature(fill_unseen=True), [[20.0, 30.0], [160.0, 0.0], [25.0, 7.5]], rtol=1e-6, atol=0)
    mc.reset()
    assert mc.count == 0 and not mc.seen_tasks.any()
    with pytest.raises(RuntimeError, match="needs at least one update"):
        mc.curvature()
    with pytest.raises(ValueError, match="beta must be in"):
        MonteCarloFisher([1], 2, beta=0.0)
    with pytest.raises(ValueError, match="docs_per_task"):
        MonteCarloFisher([[1, 2]], 2)


class _Calls(TorchFunctionMode):
    """Counts the torch functions and tensor methods called, by name."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_monte_carlo_fisher_without_decay_touches_only_the_batch_rows():
    """beta = 1: no multiply over the D rows, and the sums equal plain cumulative sums exactly;
    beta < 1 decays both accumulators once per update."""
    grads = [torch.rand(4, 3, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    ids = [torch.tensor([0, 2, 2, 5]), torch.tensor([1, 1, 0, 3]), torch.tensor([5, 4, 0, 0])]
    for beta, multiplies in [(1.0, 0), (0.5, 2)]:
        mc = MonteCarloFisher([3] * 6, 3, beta=beta)
        with _Calls() as calls:
            mc.add(grads[0], ids[0])
        assert calls.names.count("mul_") == multiplies, calls.names
    mc = MonteCarloFisher([3] * 6, 3, beta=1.0)
    sq, seen = torch.zeros(6, 3), torch.zeros(6)
    for g, i in zip(grads, ids):
        mc.add(g, i)
        sq.index_add_(0, i, g)
        seen.index_add_(0, i, torch.ones(4))
    assert torch.equal(mc.sq, sq) and torch.equal(mc.seen, seen)


def test_monte_carlo_fisher_accumulates_on_its_own_device():
    """The accumulators stay where they were put (e.g. host memory beside host-stored adapter
    tables) and `add` moves the minibatch's gradients and task ids there. Here they are on the
    ``meta`` device (shapes only) and the gradients on the CPU: without the move, ``index_add_``
    would refuse to mix devices."""
    mc = MonteCarloFisher([3, 4, 5], 2, beta=1.0, device="meta")
    mc.add(torch.ones(2, 2), torch.tensor([0, 2]))
    assert mc.sq.device.type == mc.seen.device.type == "meta" and mc.count == 1
    assert mc.curvature(fill_unseen=True).device.type == "meta"


# ---- a tiny LM ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lm_problem():
    tok = char_tokenizer()
    corpus = build_corpus(synthetic_corpus_frame((4, 6, 10), words_per_doc=(2, 4)), tok, max_length=32,
                          test_size=0.2, validation_size=0.0, seed=0)
    base = tiny_causal_lm("llama", hidden_size=16, num_layers=1)
    base.set_attn_implementation("eager")  # double backward through attention
    lm = MultiTaskLM(base, rank=1, alpha=2)
    g = torch.Generator().manual_seed(0)
    train = corpus.split("train")
    theta = lm.layout.init_global(generator=g) + 0.5 * torch.randn(train.num_tasks, lm.num_params, generator=g)
    return lm, train, theta


def test_monte_carlo_fisher_converges_to_the_exact_fisher_of_a_tiny_lm(tiny_lm_problem):
    lm, train, theta = tiny_lm_problem
    logits_fn = lm_logits(lm)
    # The exact reference, summed over two batches, equals the full batch's below.
    halves = [train.batch(list(range(0, 7))), train.batch(list(range(7, len(train))))]
    exact = exact_fisher_diagonal(logits_fn, theta, halves)
    assert bool((exact > 0).all())
    full = train.batch(list(range(len(train))))
    assert_close(exact_fisher_diagonal(logits_fn, theta, [full]), exact, rtol=1e-4, atol=1e-6 * float(exact.max()))
    mc = MonteCarloFisher(train.docs_per_task, lm.num_params, beta=1.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(500):
        mc.update(logits_fn, theta, full, generator=g)
    h = mc.curvature().double()
    rel = (h - exact).abs() / exact
    # 500 draws per document (seeds 0-2 gave a median error of 2.6-3.1%, a largest of 10-12%,
    # task totals within 3.2%): the typical entry within 5%, each within 25%, totals within 6%.
    assert float(rel.median()) < 0.05, float(rel.median())
    assert float(rel.max()) < 0.25, float(rel.max())
    assert_close(h.sum(1), exact.sum(1), rtol=0.06, atol=0)


def test_hessian_diagonal_of_a_tiny_lm_matches_finite_differences_of_the_gradient(tiny_lm_problem):
    lm, train, theta = tiny_lm_problem
    logits_fn = lm_logits(lm)
    batch = train.batch(list(range(len(train))))
    hess = hessian_diagonal(logits_fn, theta, [batch])
    from bora_pyro.inference.curvature import per_document_gradients

    def task_gradient(t):
        grad = per_document_gradients(logits_fn, t, batch, sampled=False).double()
        return torch.zeros(t.shape, dtype=torch.float64).index_add_(0, batch.task_ids, grad)

    eps = 1e-3  # the NLL is far from quadratic here: at eps = 1e-2 some entries are 70% off
    for i in (0, 5, 40, 77, 130, 200, 255):  # A and B entries of several modules
        step = torch.zeros_like(theta)
        step[:, i] = eps
        fd = (task_gradient(theta + step)[:, i] - task_gradient(theta - step)[:, i]) / (2 * eps)
        # central differences in fp32 (in fp64 they agree to 0.4% at eps = 1e-3): 3% or 0.02
        assert_close(hess[:, i], fd, rtol=3e-2, atol=2e-2)
