"""The Pyro model's log joint against its closed form, and the exact tau = 0 / inf limits."""

import math

import pyro.poutine as poutine
import pytest
import torch

from bora_pyro.config import BoraConfig
from bora_pyro.data import build_corpus
from bora_pyro.models import build_bora
from bora_pyro.models.lora import MultiTaskLM
from bora_pyro.testing import char_tokenizer, synthetic_corpus_frame, tiny_causal_lm


@pytest.fixture(scope="module")
def setup():
    corpus = build_corpus(synthetic_corpus_frame((6, 9, 12)), char_tokenizer(), max_length=40, seed=0)
    lm = MultiTaskLM(tiny_causal_lm("llama"), rank=2, alpha=4)
    train = corpus.split("train")
    batch = next(train.batches(5, shuffle=True, generator=torch.Generator().manual_seed(0)))
    return corpus, lm, train, batch


def _model(lm, corpus, train, tau, groups="shared"):
    config = BoraConfig(rank=lm.layout.rank, alpha=lm.layout.alpha, tau=tau, precision_groups=groups)
    built, model = build_bora(lm.base_model, corpus, config, seed=0)
    assert built.layout == lm.layout and model.num_docs == len(train)  # the same wrappers, re-used
    return model


def _log_joint(model, batch, values, **kw):
    trace = poutine.trace(poutine.condition(model, data=values)).get_trace(batch, **kw)
    return trace, trace.log_prob_sum()


def _token_loglik(lm, adapters, batch):
    """Summed token log-probabilities per row, computed by hand from the logits."""
    task_ids = batch.task_ids if adapters.dim() == 2 else None
    logits = lm(batch.input_ids, batch.attention_mask, adapters=adapters, task_ids=task_ids)
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    target = batch.labels[:, 1:]
    mask = target != -100
    picked = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def test_log_joint_is_gaussian_prior_plus_scaled_token_loglik(setup):
    corpus, lm, train, batch = setup
    D, P = corpus.num_tasks, lm.num_params
    g = torch.Generator().manual_seed(3)
    Theta = 0.1 * torch.randn(P, generator=g)
    theta = Theta + 0.05 * torch.randn(D, P, generator=g)
    tau = torch.tensor([40.0, 7.0])
    model = _model(lm, corpus, train, "learn", groups="ab")
    _, lp = _log_joint(
        model, batch, {"global_adapter": Theta, "task_adapters": theta}, tau=tau
    )
    _, group_index = lm.layout.group_index("ab")
    prec = tau[group_index].double()
    prior = (0.5 * torch.log(prec / (2 * math.pi)) - 0.5 * prec * (theta - Theta).double() ** 2).sum()
    hyper = torch.distributions.Gamma(1.0, 1e-3).log_prob(tau.double()).sum()
    scale = len(train) / len(batch)
    with torch.no_grad():
        lik = _token_loglik(lm, theta, batch).sum()
    torch.testing.assert_close(lp.double(), prior + hyper + scale * lik, rtol=1e-6, atol=1e-3)


def test_tau_inf_is_one_pooled_adapter_exactly(setup):
    corpus, lm, train, batch = setup
    Theta = 0.1 * torch.randn(lm.num_params)
    model = _model(lm, corpus, train, math.inf)
    trace, lp = _log_joint(model, batch, {"global_adapter": Theta})
    assert "task_adapters" not in trace.nodes
    with torch.no_grad():
        lik = _token_loglik(lm, Theta, batch).sum()
    torch.testing.assert_close(lp.double(), len(train) / len(batch) * lik, rtol=1e-6, atol=1e-4)


def test_tau_zero_is_independent_adapters_exactly(setup):
    corpus, lm, train, batch = setup
    D, P = corpus.num_tasks, lm.num_params
    theta = (0.1 * torch.randn(D, P)).requires_grad_(True)
    model = _model(lm, corpus, train, 0.0)
    trace, lp = _log_joint(model, batch, {"task_adapters": theta})
    assert "global_adapter" not in trace.nodes
    lik = _token_loglik(lm, theta, batch).sum()
    torch.testing.assert_close(lp.double(), len(train) / len(batch) * lik, rtol=1e-6, atol=1e-4)
    # No coupling: the gradient for one task does not depend on another task's adapter.
    (grad,) = torch.autograd.grad(lp, theta)
    other = theta.detach().clone()
    other[1:] += 0.5
    other.requires_grad_(True)
    _, lp2 = _log_joint(model, batch, {"task_adapters": other})
    (grad2,) = torch.autograd.grad(lp2, other)
    torch.testing.assert_close(grad[0], grad2[0])


def test_fixed_tau_per_group_must_name_every_group(setup):
    corpus, lm, train, _ = setup
    with pytest.raises(ValueError, match=r"one value for each precision group \['A', 'B'\]"):
        _model(lm, corpus, train, {"A": 1.0}, groups="ab")
