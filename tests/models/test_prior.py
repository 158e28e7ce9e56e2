"""The fused prior equals Normal(Theta, tau^-1/2) entry by entry: values, gradients, KL."""

import pyro.distributions as dist
import pytest
import torch
from torch.distributions import kl_divergence

from bora_pyro.models.prior import PointMass, TaskPrior, weighted_squared_deviation


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(0)
    D, P = 5, 37
    group_index = torch.randint(0, 3, (P,), generator=g)
    tau = torch.tensor([4.0, 90.0, 0.5], dtype=torch.float64)
    loc = torch.randn(P, generator=g, dtype=torch.float64)
    x = loc + torch.randn(D, P, generator=g, dtype=torch.float64) * tau.rsqrt()[group_index]
    return x, loc, tau, group_index


def _reference(x, loc, tau, group_index):
    return dist.Normal(loc, tau.rsqrt()[group_index]).to_event(1).log_prob(x)


def test_log_prob_and_its_gradients_equal_the_normal_ones(problem):
    x, loc, tau, gi = problem
    args = [t.clone().requires_grad_() for t in (x, loc, tau)]
    ref_args = [t.clone().requires_grad_() for t in (x, loc, tau)]
    weights = torch.arange(1.0, 6.0, dtype=torch.float64)  # a non-uniform upstream gradient
    lp = TaskPrior(args[1], args[2], gi, num_tasks=5).log_prob(args[0])
    ref = _reference(ref_args[0], ref_args[1], ref_args[2], gi)
    assert lp.shape == (5,)
    torch.testing.assert_close(lp, ref, rtol=1e-12, atol=1e-10)
    (lp * weights).sum().backward()
    (ref * weights).sum().backward()
    for mine, theirs in zip(args, ref_args):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-10, atol=1e-10)


def test_fused_deviation_with_leading_dims_falls_back_to_the_plain_expression(problem):
    x, loc, _, _ = problem
    w = torch.rand(x.shape[-1], dtype=torch.float64)
    batched = weighted_squared_deviation(x.expand(2, -1, -1), loc, w)
    torch.testing.assert_close(batched[1], weighted_squared_deviation(x, loc, w))
    torch.testing.assert_close(batched[0], ((x - loc) ** 2 * w).sum(-1))


def test_kl_of_a_mean_field_normal_is_the_sum_of_normal_kls(problem):
    x, loc, tau, gi = problem
    sigma = torch.rand(x.shape, dtype=torch.float64) * 0.3 + 0.01
    mu, s, t = x.clone().requires_grad_(), sigma.clone().requires_grad_(), tau.clone().requires_grad_()
    q = dist.Normal(mu, s).to_event(1)
    mine = kl_divergence(q, TaskPrior(loc, t, gi, num_tasks=5))
    mu2, s2, t2 = x.clone().requires_grad_(), sigma.clone().requires_grad_(), tau.clone().requires_grad_()
    ref = kl_divergence(dist.Normal(mu2, s2), dist.Normal(loc, t2.rsqrt()[gi])).sum(-1)
    torch.testing.assert_close(mine, ref, rtol=1e-12, atol=1e-10)
    mine.sum().backward()
    ref.sum().backward()
    for a, b in ((mu, mu2), (s, s2), (t, t2)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-10)


def test_samples_have_the_prior_moments(problem):
    _, loc, tau, gi = problem
    torch.manual_seed(0)
    draws = TaskPrior(loc, tau, gi, num_tasks=5).rsample((4000,))
    assert draws.shape == (4000, 5, loc.shape[0])
    z = (draws.mean((0, 1)) - loc) / (tau.rsqrt()[gi] / (20000 ** 0.5))
    assert z.abs().max() < 4.5  # standardised means of 37 entries
    ratio = draws.var((0, 1)) * tau[gi]
    assert ((ratio - 1).abs() < 0.1).all()


def test_point_mass_samples_its_value_with_log_density_zero():
    v = torch.randn(3, 4, requires_grad=True)
    p = PointMass(v)
    assert p.batch_shape == (3,) and p.event_shape == (4,)
    s = p.rsample()
    assert s is v or torch.equal(s, v)
    assert torch.equal(p.log_prob(s), torch.zeros(3))
    s.sum().backward()
    assert torch.equal(v.grad, torch.ones(3, 4))
