r"""Learning the precision tau under MAP from the validation likelihood (``tau_method="validation"``).

Empirical Bayes by the *predictive* criterion: tau is moved, during the fit, to lower the
validation NLL per token ``V`` of the MAP adapters it induces. The gradient ``dV / d log tau``
comes from the implicit function theorem at the MAP (Larsen et al. 1996, *Design and
regularization of neural networks: the optimal use of a validation set*; Lorraine et al. 2020,
*Optimizing millions of hyperparameters by implicit differentiation*), with the diagonal
curvature ``h_d`` of each task's training NLL in place of its Hessian.

At the MAP of ``sum_d NLL_d(theta_d) + sum_d tau/2 ||theta_d - Theta||^2`` (flat on ``Theta``)
the task adapters and the global one satisfy, with ``delta_d = theta_d - Theta``::

    g_d(theta_d) + tau delta_d = 0          (each task d)
    sum_d delta_d = 0                        (Theta)

Differentiating in tau, with ``g_d' = h_d`` (diagonal) and ``r_d = 1 / (h_d + tau)`` elementwise::

    dtheta_d/dtau = r_d (tau dTheta/dtau - delta_d)
    dTheta/dtau   = - mean_d(r_d delta_d) / mean_d(r_d h_d)

and ``dV / d log tau_g = tau_g sum_d sum_{i in g} (dV/dtheta_di) (dtheta_di/dtau)`` for each
precision group ``g``. In words: where a task's offset ``delta_d`` points the way the validation
gradient says is downhill (the offset carries signal that generalises), shrinking it would hurt,
and tau falls; where the offset points uphill (the task fitted noise of its own documents), tau
rises. For a Gaussian likelihood the curvature is exact and so is this gradient
(`tests/inference/test_hyper.py` checks it against finite differences of the closed-form MAP).

The gradient is estimated on one validation minibatch per update (`ValidationProbe`): one
forward and one backward pass to the per-document adapter rows give the validation gradient of
each task present and, squared, the curvature (``h_d = N_d`` times the average per-document
squared gradient, running over updates; tasks without a validation document in the recent
batches take the pooled average). log tau then takes one Adam step (`LogTauAdam`): the
gradient's scale changes by orders of magnitude along a run, its sign and relative size are what
matter.

Where it holds and where it does not: the implicit function theorem speaks of the MAP *for
each tau*. Near convergence (the Gaussian models of the tests, a 300-step tiny-LM fit) it moves
tau to the validation optimum. Far from one, the offsets are still growing towards the data and
the validation gradient says that growing them helps, whatever tau will be best once the run
has ended: a short-horizon bias towards too little pooling. On the 100-step Shakespeare `cpu`
configuration it learned A = 2,108, B = 235 and a test perplexity of 65.09, against 60.41 for
the evidence and 57.77 for the grid's best tau (docs/learned-precision.md, section 4). So the
evidence stays the default and this method is an option for runs that converge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from ..data import IGNORE_INDEX
from .curvature import MonteCarloFisher, lm_logits, next_token_targets, per_document_gradients

__all__ = ["implicit_tau_gradient", "LogTauAdam", "ValidationData", "ValidationProbe"]


@dataclass(frozen=True)
class ValidationData:
    """What ``tau_method="validation"`` reads besides the model.

    Attributes
    ----------
    gradients
        ``(task_adapters [D, P], batch) -> (grads [B, P], count)``: the gradient of each
        validation document's NLL in its task's adapter (observed labels), and the number of
        scored units (tokens) in the batch; `V` is the batch's NLL over ``count``.
    batches
        Endless validation minibatches (``.to(device)``, ``task_ids``), with ``state_dict`` /
        ``load_state_dict`` for checkpoints.
    docs_per_task
        ``[D]`` training documents of each task.
    """

    gradients: Callable[[torch.Tensor, Any], tuple[torch.Tensor, int]]
    batches: Iterator
    docs_per_task: Sequence[int] | torch.Tensor

    @classmethod
    def for_lm(cls, lm, batches: Iterator, docs_per_task) -> ValidationData:
        """The validation data of a `MultiTaskLM` (`curvature.lm_logits`); count = scored tokens."""
        logits_fn = lm_logits(lm)

        def gradients(task_adapters, batch):
            grads = per_document_gradients(logits_fn, task_adapters, batch, sampled=False)
            return grads, int((next_token_targets(batch.labels) != IGNORE_INDEX).sum())

        return cls(gradients, batches, docs_per_task)


@torch.no_grad()
def implicit_tau_gradient(
    task_adapters: torch.Tensor,
    global_adapter: torch.Tensor,
    curvature: torch.Tensor,
    tau: torch.Tensor,
    group_index: torch.Tensor,
    validation_gradient: torch.Tensor,
    *,
    min_determined: float = 1e-3,
) -> torch.Tensor:
    """``[G]``: ``dV / d log tau_g`` by the implicit function theorem (module docstring).

    Parameters
    ----------
    task_adapters, global_adapter
        ``[D, P]`` and ``[P]``: the current MAP values.
    curvature
        ``[D, P]`` diagonal curvature ``h`` of each task's training NLL.
    tau
        ``[G]`` current precisions (finite, > 0).
    group_index
        ``[P]`` group of each parameter.
    validation_gradient
        ``[D, P]``: ``dV / dtheta_d`` (zero rows for tasks without validation data in the estimate).
    min_determined
        Floor of ``mean_d h / (h + tau)`` in ``dTheta/dtau``: an entry that no task's data
        determine has no defined ``dTheta/dtau`` (and a zero validation gradient).
    """
    tau_p = tau.to(curvature.dtype)[group_index]  # [P]
    delta = task_adapters - global_adapter  # [D, P]
    r = 1.0 / (curvature + tau_p)  # [D, P]
    determined = (curvature * r).mean(0).clamp_min(min_determined)  # [P]
    d_global = -(delta * r).mean(0) / determined  # [P]
    d_task = r * (tau_p * d_global - delta)  # [D, P]
    per_param = tau_p * (validation_gradient * d_task).sum(0)  # [P]
    return torch.zeros(tau.shape[0], dtype=per_param.dtype, device=per_param.device).index_add_(
        0, group_index, per_param
    )


class LogTauAdam:
    """Adam on ``log tau`` (one entry per precision group), with bounds.

    Parameters
    ----------
    tau
        ``[G]`` starting precisions.
    lr
        Step size in ``log tau`` (Adam's steps are at most about ``lr`` each).
    betas
        Adam's decays; short, since a run holds only 10-20 updates.
    bounds
        ``(low, high)``: tau stays inside.
    """

    def __init__(self, tau: torch.Tensor, *, lr: float, betas=(0.5, 0.8), bounds=(1e-2, 1e9), eps: float = 1e-30):
        self.log_tau = tau.detach().double().log().clone()
        self.lr = float(lr)
        self.betas = tuple(float(b) for b in betas)
        self.bounds = (float(bounds[0]), float(bounds[1]))
        self.eps = float(eps)
        self.m = torch.zeros_like(self.log_tau)
        self.v = torch.zeros_like(self.log_tau)
        self.count = 0

    @property
    def tau(self) -> torch.Tensor:
        return self.log_tau.exp().float()

    def step(self, grad: torch.Tensor) -> torch.Tensor:
        """One descent step on ``V`` with ``grad = dV / d log tau`` ``[G]``; returns the new tau."""
        b1, b2 = self.betas
        g = grad.detach().double().to(self.log_tau.device)
        self.count += 1
        self.m.mul_(b1).add_(g, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(g, g, value=1 - b2)
        m_hat = self.m / (1 - b1**self.count)
        v_hat = self.v / (1 - b2**self.count)
        self.log_tau.sub_(self.lr * m_hat / (v_hat.sqrt() + self.eps))
        self.log_tau.clamp_(min=math.log(self.bounds[0]), max=math.log(self.bounds[1]))
        return self.tau

    def state_dict(self) -> dict:
        return {"log_tau": self.log_tau.clone(), "m": self.m.clone(), "v": self.v.clone(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        for name in ("log_tau", "m", "v"):
            getattr(self, name).copy_(state[name])
        self.count = int(state["count"])


class ValidationProbe:
    """Validation gradient and curvature of each task from one pass over a validation minibatch.

    Parameters
    ----------
    gradients
        ``(task_adapters, batch) -> (per-document gradients [B, P], count)`` (`ValidationData`).
    docs_per_task
        ``[D]`` training documents ``N_d`` of each task (the curvature is of the training NLL).
    num_params
        P.
    beta
        Decay of the running curvature per probe (``0.7``: about the last 3 probes).
    device
        Where the ``[D, P]`` accumulators live.
    """

    def __init__(self, gradients, docs_per_task, num_params: int, *, beta: float = 0.7, device=None):
        self.gradients = gradients
        self.curvature_estimate = MonteCarloFisher(docs_per_task, num_params, beta=beta, device=device)
        self.num_tasks = len(self.curvature_estimate.docs_per_task)

    def __call__(self, task_adapters: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(validation gradient [D, P], curvature h [D, P])`` at ``task_adapters [D, P]``.

        The gradient is that of the batch's NLL per scored unit; the curvature ``h_d`` is
        ``N_d`` times the running average of the squared per-document gradients of task ``d``'s
        validation documents (held-out labels, so not the optimistic empirical Fisher of the
        documents the adapters were fitted to), the pooled average for tasks not yet seen.
        """
        grads, count = self.gradients(task_adapters, batch)  # [B, P]
        self.curvature_estimate.add(grads.square(), batch.task_ids)
        val_grad = torch.zeros(self.num_tasks, grads.shape[1], dtype=grads.dtype, device=grads.device)
        val_grad.index_add_(0, batch.task_ids, grads / max(1, count))
        return val_grad, self.curvature_estimate.curvature(fill_unseen=True)

    def state_dict(self) -> dict:
        return self.curvature_estimate.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.curvature_estimate.load_state_dict(state)
