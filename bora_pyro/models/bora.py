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

With a `TaskSubsample` (``forward(batch, tasks=...)``, the sparse step of docs/many-tasks.md)
only the K tasks present in the batch have a ``task_adapters`` site (a subsampled ``tasks``
plate), and each task's prior term is split over its ``N_d`` training documents: a minibatch
holding ``n_d`` of them carries ``(N / B) (n_d / N_d)`` of task ``d``'s prior::

    (N / B) [ sum_{d present} (n_d / N_d) log N(theta_d; Theta, tau^-1)
              + sum_{n in b} log p_LM(doc_n | theta_{task(n)}) ]

again an unbiased estimate of the full-data log joint (each document carries ``1 / N_d`` of its
task's prior), whose cost follows the K tasks present rather than D.

The limits are exact, not approximations with a tiny or huge tau: ``tau = 0`` drops ``Theta``
and gives every task a flat prior (independent LoRA per task); ``tau = inf`` drops the task
sites and applies ``Theta`` to every task (one pooled LoRA).

The likelihood is pluggable (any ``log_likelihood(adapters, batch) -> [B]``), so the same prior
and inference code can be checked on a Gaussian hierarchical model with a closed-form posterior.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Protocol

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions import constraints
from torch import nn

from ..config import TAU_INIT, BoraConfig
from .prior import TaskPrior

__all__ = [
    "BoraModel", "TaskSubsample", "lm_log_likelihood", "SITE_GLOBAL", "SITE_TASKS", "SITE_PRECISION",
]

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


@dataclass
class TaskSubsample:
    """The tasks of one minibatch, for a step that touches only them (`BoraModel.subsample_tasks`).

    Attributes
    ----------
    index
        ``[K]`` distinct task ids present, in order of first appearance in the batch, on the
        compute device.
    host_index
        The same on the CPU (to gather rows stored in host memory without a device sync).
    local
        ``[B]`` position in ``index`` of each document's task (on the compute device), so that
        ``index[local]`` are the batch's task ids; ``arange(B)`` when the B tasks are distinct.
    scale
        ``[K]`` factor of each present task's ``task_adapters`` site under the subsampled
        ``tasks`` plate (which itself scales by ``D / K``): ``(N / B) (n_d / N_d) (K / D)``, so
        that the site's log density counts ``(N / B) (n_d / N_d)`` times.
    """

    index: torch.Tensor
    host_index: torch.Tensor
    local: torch.Tensor
    scale: torch.Tensor

    def __len__(self) -> int:
        return int(self.host_index.shape[0])


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
    docs_per_task
        ``[D]`` training documents of each task ``N_d`` (sum N), needed by the sparse step
        (`subsample_tasks`); `build_bora` takes it from the corpus.
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
        docs_per_task: torch.Tensor | np.ndarray | None = None,
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
        self.docs_per_task = None
        if docs_per_task is not None:
            counts = torch.as_tensor(np.asarray(docs_per_task), dtype=torch.float64)
            if counts.shape != (self.num_tasks,) or int(counts.sum()) != self.num_docs:
                raise ValueError(
                    f"docs_per_task must hold one count per task (D={self.num_tasks}) summing to "
                    f"num_docs={self.num_docs}; got shape {tuple(counts.shape)} and sum {float(counts.sum()):g}."
                )
            self.docs_per_task = counts

    def subsample_tasks(self, task_ids: torch.Tensor, device: torch.device | str | None = None) -> TaskSubsample:
        """The `TaskSubsample` of a minibatch with task ids ``task_ids`` (``[B]``, best on the
        CPU: read on the host, they cost no device sync).

        Raises
        ------
        ValueError
            When the model was built without ``docs_per_task``.
        """
        if self.docs_per_task is None:
            raise ValueError(
                "The sparse step (task_step='sparse') splits each task's prior over its training "
                "documents and needs their counts: build the model with docs_per_task=[N_1..N_D] "
                "(build_bora does, from a corpus), or pass task_step='dense'."
            )
        ids = task_ids.detach().cpu().numpy()
        present, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")            # first-appearance order
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        local = rank[inverse.reshape(-1)]
        index = torch.from_numpy(present[order].astype(np.int64))
        counts = torch.from_numpy(np.bincount(local, minlength=len(order))).double()
        B, K, D = len(ids), len(order), self.num_tasks
        weight = (self.num_docs / B) * counts / self.docs_per_task[index]
        device = task_ids.device if device is None else torch.device(device)
        return TaskSubsample(
            index=index.to(device, non_blocking=True), host_index=index,
            local=torch.from_numpy(local.astype(np.int64)).to(device, non_blocking=True),
            scale=(weight * K / D).float().to(device, non_blocking=True),
        )

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
        return torch.full((G,), TAU_INIT if config.tau_init is None else config.tau_init)

    @property
    def num_groups(self) -> int:
        return len(self.group_names)

    def precision_prior(self) -> dist.Distribution:
        """The Gamma hyperprior over the ``[G]`` learned precisions."""
        a, b = self.tau_prior_params
        if self.config.tau_prior[1] == 0.0:  # Gamma(a, 0) is improper: a flat-ish log-prior a-1 log tau.
            return dist.ImproperUniform(constraints.positive, (), (self.num_groups,))
        return dist.Gamma(a, b).expand([self.num_groups]).to_event(1)

    def forward(
        self, batch: _Batch, *, tau: torch.Tensor | None = None, tasks: TaskSubsample | None = None,
    ) -> torch.Tensor:
        """Run the model on one minibatch; returns the adapters applied (``[D, P]``, ``[K, P]``
        with ``tasks``, or ``[P]``).

        Parameters
        ----------
        batch
            Has ``task_ids [B]`` and ``doc_index [B]`` (and whatever ``log_likelihood`` reads).
        tau
            ``[G]``. With a learned precision, the value to condition on (the ``precision`` site
            is then observed, as in empirical Bayes / variational EM); ``None`` leaves it latent.
            Ignored for fixed precisions.
        tasks
            Only the tasks present, each task's prior split over its documents (see the module
            docstring); ``None``: every task, the prior counted once.
        """
        D, P = self.num_tasks, self.num_params
        if tasks is not None and self.mode != "pooled":
            adapters = self._present_tasks(tasks, tau)
            # the adapters are now the [K, P] rows of the present tasks, in first-appearance
            # order, as are the batch's host-computed groups (when it has them)
            groups = getattr(batch, "groups", None)
            batch = replace(batch, task_ids=tasks.local, **({} if groups is None else {"groups": groups.as_rows()}))
        elif self.mode == "independent":
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

    def _present_tasks(self, tasks: TaskSubsample, tau: torch.Tensor | None) -> torch.Tensor:
        """``[K, P]``: the sites of the sparse step (the global adapter, tau, the present tasks)."""
        K, P = len(tasks), self.num_params
        theta_g = None
        if self.mode != "independent":
            theta_g = pyro.sample(SITE_GLOBAL, dist.ImproperUniform(constraints.real, (), (P,)))
            if self.mode == "learn":
                tau = pyro.sample(SITE_PRECISION, self.precision_prior(), obs=tau)
            else:
                tau = self.fixed_tau
        with pyro.plate("tasks", self.num_tasks, subsample=tasks.index, dim=-1), poutine.scale(scale=tasks.scale):
            if theta_g is None:
                return pyro.sample(SITE_TASKS, dist.ImproperUniform(constraints.real, (), (P,)))
            return pyro.sample(SITE_TASKS, TaskPrior(theta_g, tau, self.group_index, K))

    @property
    def last_nll_tensor(self) -> torch.Tensor:
        """`last_nll` as a 0-dim tensor on the compute device (reading it costs no host sync)."""
        return self._last_nll

    @property
    def last_nll(self) -> float:
        """Unscaled negative log-likelihood of the last batch, for progress reports."""
        return float(self._last_nll)
