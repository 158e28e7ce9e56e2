r"""The hierarchical prior over all task adapters as ONE distribution with a fused log density.

``theta_d ~ Normal(Theta, tau_{g(i)}^{-1/2})`` for every entry ``i`` of every task ``d`` is a
``[D, P]`` site; with ``D * P`` in the tens or hundreds of millions, what costs time is memory
traffic, not arithmetic. `torch.distributions.Normal` spends several ``[D, P]`` temporaries per
evaluation (difference, square, division, the log-scale broadcast) and as many again in the
backward pass, and validates its arguments with further passes. `TaskPrior` computes

    log p(theta) = -1/2 sum_d sum_i w_i (theta_di - Theta_i)^2 + D/2 sum_g P_g log tau_g - D P/2 log 2 pi

with ``w = tau[group_index]`` through one custom autograd function: one ``[D, P]`` temporary in
the forward pass (squared in place, reduced by a matrix-vector product) and one in the backward
pass (scaled in place). The analytic KL of a mean-field Normal guide to it, used by
``TraceMeanField_ELBO`` under SVI, is registered too.

Every operation is exact: the values equal those of ``Normal(Theta, tau^-1/2).to_event(1)``
(checked in tests/models/test_prior.py).
"""

from __future__ import annotations

import math

import torch
from pyro.distributions import Independent, Normal, TorchDistribution, constraints
from torch.distributions import kl

__all__ = ["TaskPrior", "PointMass", "weighted_squared_deviation"]


class _WeightedSquaredDeviation(torch.autograd.Function):
    """``s_d = sum_i w_i (x_di - m_i)^2`` for ``x [D, P]``, ``m [P]``, ``w [P]``: ``[D]``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, m: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, m, w)
        diff = x - m
        diff.square_()
        return diff @ w

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, m, w = ctx.saved_tensors
        need_x, need_m, need_w = ctx.needs_input_grad
        grad_x = grad_m = grad_w = None
        diff = x - m
        if need_w:
            grad_w = grad @ diff.square()
        if need_x or need_m:
            diff.mul_(w).mul_(2 * grad.unsqueeze(-1))  # d s_d / d x_di = 2 w_i (x_di - m_i)
            grad_x = diff if need_x else None
            grad_m = -diff.sum(0) if need_m else None
        return grad_x, grad_m, grad_w


def weighted_squared_deviation(x: torch.Tensor, m: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``[D]``: ``sum_i w_i (x_di - m_i)^2`` for ``x [D, P]`` (fused; any leading shape falls back
    to the plain expression)."""
    if x.dim() == 2 and m.dim() == 1 and w.dim() == 1:
        return _WeightedSquaredDeviation.apply(x, m.to(x.dtype), w.to(x.dtype))
    return ((x - m) ** 2 * w).sum(-1)


class TaskPrior(TorchDistribution):
    """``Normal(loc, tau[group_index]^-1/2)`` independently over ``[num_tasks, P]``.

    Batch shape ``[num_tasks]`` (the ``tasks`` plate), event shape ``[P]``.

    Parameters
    ----------
    loc
        ``[P]``, the global adapter.
    tau
        ``[G]`` precisions (positive, finite).
    group_index
        ``LongTensor [P]``, the group of each entry.
    num_tasks
        D.
    """

    arg_constraints = {}
    support = constraints.independent(constraints.real, 1)
    has_rsample = True

    def __init__(self, loc: torch.Tensor, tau: torch.Tensor, group_index: torch.Tensor, num_tasks: int,
                 validate_args: bool | None = False):
        self.loc, self.tau, self.group_index = loc, tau, group_index
        self.num_tasks = int(num_tasks)
        super().__init__(torch.Size([self.num_tasks]), loc.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        if batch_shape == self.batch_shape:
            return self
        if len(batch_shape) != 1:
            raise NotImplementedError("TaskPrior has one batch dimension, the tasks.")
        return TaskPrior(self.loc, self.tau, self.group_index, batch_shape[0], validate_args=self._validate_args)

    @property
    def scale(self) -> torch.Tensor:
        """``[P]`` prior standard deviation of each entry."""
        return self.tau.rsqrt()[self.group_index].to(self.loc.dtype)

    @property
    def mean(self) -> torch.Tensor:
        return self.loc.expand(self.batch_shape + self.event_shape)

    @property
    def variance(self) -> torch.Tensor:
        return (self.scale ** 2).expand(self.batch_shape + self.event_shape)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + eps * self.scale

    def _log_normaliser(self) -> torch.Tensor:
        """``sum_i (1/2 log w_i - 1/2 log 2 pi)`` for one task, computed per group."""
        counts = torch.bincount(self.group_index, minlength=self.tau.shape[-1]).to(self.tau.dtype)
        P = self.group_index.shape[0]
        return 0.5 * (counts * self.tau.log()).sum() - 0.5 * P * math.log(2 * math.pi)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        w = self.tau[self.group_index]
        return -0.5 * weighted_squared_deviation(value, self.loc, w) + self._log_normaliser().to(value.dtype)


@kl.register_kl(Independent, TaskPrior)
def _kl_mean_field_task_prior(q: Independent, p: TaskPrior) -> torch.Tensor:
    """``[D]``: ``KL(prod_i Normal(mu_di, sigma_di) || TaskPrior)`` in closed form::

        1/2 sum_i [ w_i sigma_di^2 + w_i (mu_di - Theta_i)^2 - 1 - log w_i - 2 log sigma_di ]
    """
    base = q.base_dist
    if not isinstance(base, Normal) or q.reinterpreted_batch_ndims != 1:
        raise NotImplementedError
    mu, sigma = base.loc, base.scale
    w = p.tau[p.group_index].to(mu.dtype)
    P = mu.shape[-1]
    log_w = (torch.bincount(p.group_index, minlength=p.tau.shape[-1]).to(p.tau.dtype) * p.tau.log()).sum()
    return 0.5 * (
        weighted_squared_deviation(mu, p.loc, w) + sigma.square() @ w - P - log_w.to(mu.dtype)
        - 2 * sigma.log().sum(-1)
    )


class PointMass(TorchDistribution):
    """A point at ``v`` (its last ``event_dim`` dimensions are the event): what a MAP guide
    samples. Its log density, with respect to counting measure at the point, is 0. Unlike
    ``Delta`` it does not compare every sampled entry with ``v`` to say so, which for a
    ``[D, P]`` site costs full passes over memory each step."""

    arg_constraints = {}
    support = constraints.real
    has_rsample = True

    def __init__(self, v: torch.Tensor, event_dim: int = 1):
        self.v = v
        split = v.dim() - event_dim
        super().__init__(v.shape[:split], v.shape[split:], validate_args=False)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        if batch_shape == self.batch_shape:
            return self
        return PointMass(self.v.expand(batch_shape + self.event_shape), event_dim=len(self.event_shape))

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        return self.v.expand(self._extended_shape(sample_shape))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return value.new_zeros(value.shape[: value.dim() - len(self.event_shape)])

    @property
    def mean(self) -> torch.Tensor:
        return self.v
