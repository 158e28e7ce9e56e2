r"""Learning the precision tau under MAP: the evidence (Laplace / MacKay) fixed point.

The naive joint MAP over ``(theta, Theta, tau)`` is degenerate: the ``(D P / 2) log tau`` term
rewards collapsing every ``theta_d`` onto ``Theta`` and tau drifts to infinity (full pooling).
Instead tau maximises the Laplace approximation of the marginal likelihood ``p(data | tau)``
with the adapters integrated out. With ``h_{di}`` the diagonal curvature of the negative
log-likelihood of task ``d`` in parameter ``i``, setting the derivative to zero gives, per
precision group ``g``::

    tau_g = (gamma_g + 2 (a - 1)) / (S_g + 2 b)
    S_g     = sum_d sum_{i in g} (theta_di - Theta_i)^2
    gamma_g = (1 - 1/D) sum_d sum_{i in g} h_di / (h_di + tau_g)

where ``Gamma(a, b)`` is the hyperprior and ``gamma_g`` counts the parameters that the data
determine (``h >> tau`` counts one, ``h << tau`` zero). The ``1 - 1/D`` factor accounts for
``Theta`` being estimated from the same D adapters (one degree of freedom per parameter); with
it the fixed point is exactly the marginal-likelihood maximiser of a Gaussian hierarchical model
with equal curvatures.

``h`` comes from `bora_pyro.inference.curvature`: by default (``tau_curvature="fisher"``) a
Monte-Carlo estimate of the diagonal *true* Fisher at the current adapters, taken afresh before
each update (`curvature.MonteCarloFisher`, see `bora_pyro.inference.map.MAPStepper`). The
alternative kept here, `FisherEstimate` (``tau_curvature="empirical"``), is a diagonal empirical
Fisher from the minibatch gradients the optimiser computes anyway: for minibatches of B out of N
documents, the gradient ``G`` of the scaled log joint has ``Var(G_i) ~ (N / B) sum_n g_ni^2``,
so ``h ~ (B / N) Var(G)`` with the variance tracked by exponential moving averages (no extra
forward or backward pass). It is biased twice: the empirical Fisher is not the Fisher away from
the optimum, and the moving averages remember the larger gradients of earlier steps (up to
orders of magnitude at the end of a run: docs/learned-precision.md).
"""

from __future__ import annotations

import torch

__all__ = ["FisherEstimate", "evidence_terms", "evidence_update"]


class FisherEstimate:
    """Running diagonal empirical Fisher of the task adapters from minibatch gradients.

    Parameters
    ----------
    shape
        Shape of the task adapters, ``(D, P)``.
    batch_fraction
        ``B / N``: documents per minibatch over training documents.
    beta
        Decay of the moving averages (``0.98`` averages over about 50 steps).
    """

    def __init__(self, shape, *, batch_fraction: float, beta: float = 0.98, device=None):
        self.mean = torch.zeros(shape, device=device)
        self.sq = torch.zeros(shape, device=device)
        self.beta = float(beta)
        self.batch_fraction = float(batch_fraction)
        self.count = 0

    @torch.no_grad()
    def update(self, grad: torch.Tensor) -> None:
        """Add one minibatch gradient of the negative log joint w.r.t. the task adapters."""
        self.mean.mul_(self.beta).add_(grad, alpha=1 - self.beta)
        self.sq.mul_(self.beta).addcmul_(grad, grad, value=1 - self.beta)
        self.count += 1

    def curvature(self) -> torch.Tensor:
        """``h`` ``[D, P]``: ``(B / N) * Var(G)`` with bias-corrected moving averages."""
        if self.count == 0:
            raise RuntimeError("FisherEstimate.curvature() needs at least one gradient.")
        correction = 1 - self.beta**self.count
        mean, sq = self.mean / correction, self.sq / correction
        return (sq - mean.square()).clamp_min(0) * self.batch_fraction


@torch.no_grad()
def evidence_terms(
    task_adapters: torch.Tensor,
    global_adapter: torch.Tensor,
    curvature: torch.Tensor,
    tau: torch.Tensor,
    group_index: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gamma [G], S [G])`` of the evidence fixed point (see the module doc) at ``tau [G]``.

    ``gamma_g = (1 - 1/D) sum_d sum_{i in g} h_di / (h_di + tau_g)`` (the number of
    well-determined parameters) and ``S_g = sum_d sum_{i in g} (theta_di - Theta_i)^2``, with
    ``task_adapters [D, P]``, ``global_adapter [P]``, ``curvature`` ``h`` ``[D, P]`` and
    ``group_index [P]``.
    """
    D = task_adapters.shape[0]
    G = tau.shape[0]
    tau_p = tau[group_index]  # [P]
    determined = (curvature / (curvature + tau_p)).sum(0) * (1 - 1 / D)  # [P]
    sq = (task_adapters - global_adapter).square().sum(0)  # [P]
    gamma = torch.zeros(G, dtype=sq.dtype, device=sq.device).index_add_(0, group_index, determined.to(sq.dtype))
    S = torch.zeros(G, dtype=sq.dtype, device=sq.device).index_add_(0, group_index, sq)
    return gamma, S


@torch.no_grad()
def evidence_update(
    task_adapters: torch.Tensor,
    global_adapter: torch.Tensor,
    curvature: torch.Tensor,
    tau: torch.Tensor,
    group_index: torch.Tensor,
    *,
    prior: tuple[float, float] = (1.0, 0.0),
    max_factor: float = 10.0,
) -> torch.Tensor:
    """One step of the evidence fixed point for the ``[G]`` precisions (see the module doc).

    Parameters
    ----------
    task_adapters, global_adapter
        ``[D, P]`` and ``[P]``: the current MAP values.
    curvature
        ``[D, P]`` diagonal curvature ``h`` of each task's negative log-likelihood.
    tau
        ``[G]`` current precisions (``gamma`` depends on them).
    group_index
        ``[P]`` group of each parameter.
    prior
        ``(a, b)`` of the Gamma hyperprior.
    max_factor
        Damping: one step changes each tau by at most this factor.

    Returns
    -------
    ``[G]`` new precisions.
    """
    a, b = prior
    gamma, S = evidence_terms(task_adapters, global_adapter, curvature, tau, group_index)
    numerator = (gamma + 2 * (a - 1)).clamp_min(1e-12)
    denominator = (S + 2 * b).clamp_min(1e-30)
    new = numerator / denominator
    return torch.minimum(torch.maximum(new, tau / max_factor), tau * max_factor)
