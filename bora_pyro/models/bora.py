r"""The BoRA generative model as a Pyro program.

For tasks ``d = 1..D`` with flat LoRA adapters ``theta_d`` (length P) and a global adapter
``Theta``::

    Theta            ~ 1                                     (flat, improper; as in the paper)
    tau_g            ~ Gamma(a, b)                           (only when tau is learned; one per group)
    theta_d | Theta  ~ Normal(Theta, tau_{g(i)}^{-1/2})      for each entry i, independently over d
    doc_n  | theta   ~ p_LM(doc_n | theta_{task(n)})         for each training document n

so that the log joint of a minibatch ``b`` of ``B`` out of ``N`` training documents is::

    sum_d log N(theta_d; Theta, tau^-1) + (N / B) * sum_{n in b} log p_LM(doc_n | theta_{task(n)})

(+ log Gamma(tau) when learned), an unbiased estimate of the full-data log joint; the
``N / B`` factor is the scale of Pyro's subsampled ``plate("documents", N, subsample=...)``.

The limits are exact, not approximations with a tiny or huge tau: ``tau = 0`` drops ``Theta``
and gives every task a flat prior (independent LoRA per task); ``tau = inf`` drops the task
sites and applies ``Theta`` to every task (one pooled LoRA).

The likelihood is pluggable (any ``log_likelihood(adapters, batch) -> [B]``), so the same prior
and inference code can be checked on a Gaussian hierarchical model with a closed-form posterior.
"""

from __future__ import annotations

from typing import Callable, Protocol

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import nn

from ..config import BoraConfig
from .prior import TaskPrior

__all__ = ["BoraModel", "lm_log_likelihood", "SITE_GLOBAL", "SITE_TASKS", "SITE_PRECISION"]

SITE_GLOBAL = "global_adapter"
SITE_TASKS = "task_adapters"
SITE_PRECISION = "precision"
SITE_LIKELIHOOD = "log_likelihood"


class _Batch(Protocol):
    task_ids: torch.Tensor   # [B]
    doc_index: torch.Tensor  # [B], indices into the N training documents


def lm_log_likelihood(lm) -> Callable[[torch.Tensor, _Batch], torch.Tensor]:
    """The LM likelihood: ``log p(doc_n | adapter of its task)`` for each document of a batch
    (padded or packed), ``[B]`` (`MultiTaskLM.batch_nll`).

    ``adapters`` is ``[D, P]`` (per task) or ``[P]`` (one adapter for every document).
    """

    def log_likelihood(adapters: torch.Tensor, batch) -> torch.Tensor:
        return -lm.batch_nll(batch, adapters)

    return log_likelihood


class BoraModel(nn.Module):
    """The hierarchical model over ``num_tasks`` adapters of ``num_params`` entries each.

    Parameters
    ----------
    log_likelihood
        ``f(adapters, batch) -> [B]``: log-likelihood of each document of the batch given the
        adapters (``[D, P]``, or ``[P]`` in the pooled limit), e.g. `lm_log_likelihood`.
    num_tasks, num_params
        D and P.
    num_docs
        N, the number of training documents (the size of the ``documents`` plate).
    config
        Gives ``tau`` (its mode), ``precision_groups`` and ``tau_prior``.
    group_index
        ``LongTensor [P]``: the precision group of each parameter (from
        `AdapterLayout.group_index`); ``None`` means one group.
    group_names
        Names of the groups, in index order.
    """

    def __init__(
        self,
        log_likelihood: Callable[[torch.Tensor, _Batch], torch.Tensor],
        *,
        num_tasks: int,
        num_params: int,
        num_docs: int,
        config: BoraConfig,
        group_index: torch.Tensor | None = None,
        group_names: list[str] | None = None,
    ):
        super().__init__()
        self.log_likelihood = log_likelihood
        self.num_tasks, self.num_params, self.num_docs = int(num_tasks), int(num_params), int(num_docs)
        self.config = config
        self.mode = config.mode
        if group_index is None:
            group_index, group_names = torch.zeros(num_params, dtype=torch.long), ["all"]
        self.group_names = list(group_names)
        self.register_buffer("group_index", group_index.long(), persistent=False)
        self.register_buffer("fixed_tau", self._fixed_tau(config), persistent=False)
        a, b = config.tau_prior
        self.register_buffer("tau_prior_params", torch.tensor([a, b]), persistent=False)
        self._last_nll = torch.tensor(float("nan"))

    def _fixed_tau(self, config: BoraConfig) -> torch.Tensor:
        G = len(self.group_names)
        if isinstance(config.tau, dict):
            if set(config.tau) != set(self.group_names):
                raise ValueError(
                    f"tau={config.tau} must give one value for each precision group "
                    f"{self.group_names} (precision_groups={config.precision_groups!r})."
                )
            return torch.tensor([config.tau[g] for g in self.group_names])
        if isinstance(config.tau, float):
            return torch.full((G,), config.tau)
        return torch.full((G,), config.tau_init)

    @property
    def num_groups(self) -> int:
        return len(self.group_names)

    def precision_prior(self) -> dist.Distribution:
        """The Gamma hyperprior over the ``[G]`` learned precisions."""
        a, b = self.tau_prior_params
        if float(b) == 0.0:  # Gamma(a, 0) is improper: a flat-ish log-prior a-1 log tau.
            return dist.ImproperUniform(constraints.positive, (), (self.num_groups,))
        return dist.Gamma(a, b).expand([self.num_groups]).to_event(1)

    def forward(self, batch: _Batch, *, tau: torch.Tensor | None = None) -> torch.Tensor:
        """Run the model on one minibatch; returns the adapters applied (``[D, P]`` or ``[P]``).

        Parameters
        ----------
        batch
            Has ``task_ids [B]`` and ``doc_index [B]`` (and whatever ``log_likelihood`` reads).
        tau
            ``[G]``. With a learned precision, the value to condition on (the ``precision`` site
            is then observed, as in empirical Bayes / variational EM); ``None`` leaves it latent.
            Ignored for fixed precisions.
        """
        D, P = self.num_tasks, self.num_params
        if self.mode == "independent":
            with pyro.plate("tasks", D, dim=-1):
                adapters = pyro.sample(
                    SITE_TASKS, dist.ImproperUniform(constraints.real, (), (P,))
                )
        else:
            theta_g = pyro.sample(SITE_GLOBAL, dist.ImproperUniform(constraints.real, (), (P,)))
            if self.mode == "pooled":
                adapters = theta_g
            else:
                if self.mode == "learn":
                    tau = pyro.sample(SITE_PRECISION, self.precision_prior(), obs=tau)
                else:
                    tau = self.fixed_tau
                with pyro.plate("tasks", D, dim=-1):
                    # Normal(theta_g, tau^-1/2 per group), its log density one fused expression
                    adapters = pyro.sample(SITE_TASKS, TaskPrior(theta_g, tau, self.group_index, D))
        with pyro.plate("documents", self.num_docs, subsample=batch.doc_index, dim=-1):
            log_lik = self.log_likelihood(adapters, batch)
            pyro.factor(SITE_LIKELIHOOD, log_lik)
        self._last_nll = log_lik.detach().sum().neg()  # read (and synchronised) only on demand
        return adapters

    @property
    def last_nll(self) -> float:
        """Unscaled negative log-likelihood of the last batch, for progress reports."""
        return float(self._last_nll)
