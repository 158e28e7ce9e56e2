r"""Learning the precision tau under MAP from the validation likelihood (``tau_method="validation"``).

Empirical Bayes by the *predictive* criterion: tau is moved, during the fit, to lower the
validation NLL per token ``V`` of the adapters it induces. The gradient ``dV / d log tau`` is
``dV/dtheta`` times the adapters' response to tau, read one of two ways (``tau_gradient``):

- ``"trajectory"`` (the default where it is implemented: dense steps, offset
  parameterisation): the response of the run itself, from two shadow fits at ``tau k`` and
  ``tau / k`` that follow it step by step (`ShadowTrajectories`). A run kept by early stopping
  is not at an optimum of its training objective, and at its kept state the implicit gradient
  below asks for more pooling by construction; the trajectory's response is what the envelope
  theorem asks for there (docs/learned-precision.md, section 11).
- ``"implicit"``: the implicit function theorem at the MAP (Larsen et al. 1996, *Design and
  regularization of neural networks: the optimal use of a validation set*; Lorraine et al.
  2020, *Optimizing millions of hyperparameters by implicit differentiation*), below.

Both use the diagonal curvature ``h_d`` of each task's training NLL in place of its Hessian.

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

The gradient is estimated on ``tau_val_batches`` validation minibatches per update
(`ValidationProbe`, default 1): for each, one forward and one backward pass to the per-document
adapter rows give the validation gradient of each task present and, squared, the curvature
(``h_d = N_d`` times the average per-document squared gradient, running over the last few
minibatches; tasks without a validation document in them take the pooled average); the
minibatches' gradients are averaged. log tau then takes one Adam step (`LogTauAdam`): the
gradient's scale changes by orders of magnitude along a run, its sign and relative size are what
matter. Four minibatches instead of one mended one split of the `cpu` configuration and
broke two (docs/learned-precision.md, section 9: with the noise averaged out, the early
updates agree on too little pooling), so one stays the default.

Which rows it needs. ``V`` is the NLL of the validation minibatch, which does not depend on the
adapter of a task without a document in it: ``dV/dtheta_d = 0`` for those tasks, so the sum over
``d`` in ``dV / d log tau_g`` has terms only for the K tasks of the minibatch, and each of them
needs only its own ``delta_d``, ``h_d`` and the shared ``dTheta/dtau`` (`implicit_tau_gradient`
on K rows is exact). ``dTheta/dtau`` is different: the global adapter responds to tau through
every task's offset, ``mean_d(r_d delta_d) / mean_d(r_d h_d)`` over all D tasks, so it is
computed over all D rows, where the tables live, in row blocks (`global_response`); it is a
``[P]`` vector. With sparse steps (docs/many-tasks.md) the validation pass itself runs on the K
gathered rows.

Where it holds and where it does not: the implicit function theorem speaks of the MAP *for
each tau*. Near convergence (the Gaussian models of the tests, a 300-step tiny-LM fit) it moves
tau to the validation optimum. Far from one, the offsets are still growing towards the data and
the validation gradient says that growing them helps, whatever tau will be best once the run
has ended: a short-horizon bias towards too little pooling. On the 100-step Shakespeare `cpu`
configuration it learned A = 2,108, B = 235 and a test perplexity of 65.09, against 60.41 for
the evidence and 57.77 for the grid's best tau (docs/learned-precision.md, section 4). Run to
early stopping with updates tied to the evaluations and starting at tau = 1e4, its test
perplexity is at most 4.4% above the grid's best on six splits of two corpora (mean 1.015x;
section 10), and it is the default (``tau_method="auto"`` runs it whenever the fit has
validation documents). Read during a run, the gradient can also point to more pooling than the
converged fits want (KJV, section 10): at the kept state of an early-stopped run the validation
gradient's share along the data term's pull is uphill, so the prior's pull (shrinkage) reads as
downhill whatever tau the fits at other taus would prefer. `ShadowTrajectories` reads the
response along the run instead (section 11).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from ..data import IGNORE_INDEX
from .curvature import lm_logits, next_token_targets, per_document_gradients

__all__ = ["PROBE_BETA", "global_response", "implicit_tau_gradient", "shift_adam_moments", "LogTauAdam",
           "ShadowTrajectories", "ValidationData", "ValidationProbe"]


#: `ValidationProbe`'s default decay of its running curvature per minibatch: about the last 3.
PROBE_BETA = 0.7


@dataclass(frozen=True)
class ValidationData:
    """What ``tau_method="validation"`` reads besides the model.

    Attributes
    ----------
    gradients
        ``(rows [R, P], batch) -> (grads [B, P], count)``: the gradient of each validation
        document's NLL in its adapter ``rows[batch.task_ids[n]]`` (observed labels), and the
        number of scored units (tokens) in the batch; `V` is the batch's NLL over ``count``.
        ``rows`` are all D task adapters (dense steps) or the K of the batch's tasks, with
        ``batch.task_ids`` their positions among the K (sparse steps).
    batches
        Endless validation minibatches (``.to(device)``, ``task_ids``), with ``state_dict`` /
        ``load_state_dict`` for checkpoints; with sparse steps dataclasses (their task ids are
        replaced with `dataclasses.replace`), with `TaskGroups` as ``groups`` or without.
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

        def gradients(rows, batch):
            grads = per_document_gradients(logits_fn, rows, batch, sampled=False)
            return grads, int((next_token_targets(batch.labels) != IGNORE_INDEX).sum())

        return cls(gradients, batches, docs_per_task)


def _sum_by_group(per_param: torch.Tensor, group_index: torch.Tensor, groups: int) -> torch.Tensor:
    """``[G]``: the ``[P]`` entries of ``per_param`` summed within each precision group."""
    return torch.zeros(groups, dtype=per_param.dtype, device=per_param.device).index_add_(0, group_index, per_param)


@torch.no_grad()
def global_response(
    blocks: Iterable[tuple[torch.Tensor, torch.Tensor]],
    tau: torch.Tensor,
    group_index: torch.Tensor,
    *,
    min_determined: float = 1e-3,
) -> torch.Tensor:
    """``[P]``: ``dTheta/dtau = - mean_d(r_d delta_d) / mean_d(r_d h_d)``, ``r_d = 1 / (h_d + tau)``
    (module docstring), over every task, accumulated block by block.

    Parameters
    ----------
    blocks
        ``(offsets [b, P], curvature [b, P])`` pairs: ``delta_d = theta_d - Theta`` and ``h_d``
        of every one of the D tasks exactly once, in blocks of rows (one block: all D rows).
        The sums are taken on the blocks' device, in their dtype.
    tau
        ``[G]`` current precisions (finite, > 0).
    group_index
        ``[P]`` group of each parameter.
    min_determined
        Floor of ``mean_d h / (h + tau)``: an entry that no task's data determine has no
        defined ``dTheta/dtau`` (and a zero validation gradient).
    """
    tau_p = weighted = determined = None
    count = 0
    for offsets, curvature in blocks:
        if tau_p is None:
            tau_p = tau.to(curvature.device, curvature.dtype)[group_index.to(curvature.device)]  # [P]
        r = 1.0 / (curvature + tau_p)  # [b, P]
        part_w, part_h = (offsets * r).sum(0), (curvature * r).sum(0)
        weighted = part_w if weighted is None else weighted.add_(part_w)
        determined = part_h if determined is None else determined.add_(part_h)
        count += offsets.shape[0]
    if count == 0:
        raise ValueError("global_response(): blocks is empty; pass the (offsets, curvature) of every task.")
    return -(weighted / count) / (determined / count).clamp_min(min_determined)


@torch.no_grad()
def implicit_tau_gradient(
    offsets: torch.Tensor,
    curvature: torch.Tensor,
    tau: torch.Tensor,
    group_index: torch.Tensor,
    validation_gradient: torch.Tensor,
    *,
    d_global: torch.Tensor | None = None,
    min_determined: float = 1e-3,
) -> torch.Tensor:
    """``[G]``: ``dV / d log tau_g`` by the implicit function theorem (module docstring).

    With ``d_global`` given the rows may be any subset of the tasks that holds every task with a
    nonzero validation gradient (e.g. the K tasks of the validation minibatch): the other tasks'
    terms of the sum over ``d`` are zero, so the result is the same as on all D rows.

    Parameters
    ----------
    offsets
        ``[R, P]``: ``delta_d = theta_d - Theta`` at the current MAP of the R tasks given.
    curvature
        ``[R, P]`` diagonal curvature ``h_d`` of each of those tasks' training NLL.
    tau
        ``[G]`` current precisions (finite, > 0).
    group_index
        ``[P]`` group of each parameter.
    validation_gradient
        ``[R, P]``: ``dV / dtheta_d`` (zero rows for tasks without validation data in the estimate).
    d_global
        ``[P]`` ``dTheta/dtau`` over all D tasks (`global_response`); ``None``: computed from the
        rows given, which must then be all D tasks.
    min_determined
        See `global_response`.
    """
    tau_p = tau.to(curvature.dtype)[group_index]  # [P]
    if d_global is None:
        d_global = global_response([(offsets, curvature)], tau, group_index, min_determined=min_determined)
    r = 1.0 / (curvature + tau_p)  # [R, P]
    d_task = r * (tau_p * d_global - offsets)  # [R, P]
    per_param = tau_p * (validation_gradient * d_task).sum(0)  # [P]
    return _sum_by_group(per_param, group_index, tau.shape[0])


@torch.no_grad()
def shift_adam_moments(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, steps, delta: torch.Tensor,
                       betas=(0.9, 0.999)) -> None:
    r"""Shift Adam(W)'s moments, in place, for a loss whose gradient has just changed by ``delta``.

    A change of tau changes the prior's gradient on the offsets ``delta_d = theta_d - Theta`` by
    ``(tau_new - tau_old) delta_d``, exactly and for every later step. Adam's second moment
    averages the squared gradient over about ``1 / (1 - beta2)`` steps (1000), so after a k-fold
    rise of tau the entries the prior dominates see a gradient k times larger than the one
    their second moment remembers, and take steps up to k times Adam's usual size until it
    catches up. This moves the moments to those of the new gradient, keeping the variance they
    estimate::

        m^ = m / (1 - beta1^t),  v^ = v / (1 - beta2^t)          (the bias-corrected moments)
        m^' = m^ + delta,        v^' = max(v^ - m^^2, 0) + m^'^2

    and stores them back with the same bias factors (so Adam's next step reads ``m^'`` and
    ``v^'``). With a constant gradient ``g`` this gives exactly the moments of a constant
    ``g + delta``. Rows whose step count is 0 (never updated) are left alone.

    Parameters
    ----------
    exp_avg, exp_avg_sq
        ``[R, P]`` Adam's raw moments (as `torch.optim.AdamW` and `rows.LazyAdamW` store them).
    steps
        Adam's step count: a number or 0-dim tensor, or ``[R]`` per row (`rows.LazyAdamW`).
    delta
        ``[R, P]`` change of the loss gradient.
    betas
        Adam's ``(beta1, beta2)``.
    """
    beta1, beta2 = betas
    t = torch.as_tensor(steps, dtype=torch.float64, device=exp_avg.device)
    t = t.reshape(-1, 1) if t.dim() else t
    bias1 = (1 - torch.pow(torch.tensor(beta1, dtype=torch.float64, device=t.device), t)).to(exp_avg.dtype)
    bias2 = (1 - torch.pow(torch.tensor(beta2, dtype=torch.float64, device=t.device), t)).to(exp_avg.dtype)
    seen = bias1 > 0
    m_hat = exp_avg / bias1.clamp_min(torch.finfo(exp_avg.dtype).tiny)
    v_hat = exp_avg_sq / bias2.clamp_min(torch.finfo(exp_avg.dtype).tiny)
    variance = (v_hat - m_hat.square()).clamp_min_(0)
    m_new = m_hat + delta.to(exp_avg.dtype)
    exp_avg.copy_(torch.where(seen, m_new * bias1, exp_avg))
    exp_avg_sq.copy_(torch.where(seen, (variance + m_new.square()) * bias2, exp_avg_sq))


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
    gate
        0 (default): plain Adam. ``K > 0``: each step is multiplied by ``max(0, 1 - K c s^2 /
        m^2)``, the positive-part shrinkage towards 0 of the gradients' weighted mean ``m``
        (`_gate`), so that gradients whose mean does not stand out of their spread move log
        tau little (Adam alone turns them into a random walk of steps of about ``lr``).
    gate_beta
        Decay of the gate's weighted mean and variance.
    """

    def __init__(self, tau: torch.Tensor, *, lr: float, betas=(0.5, 0.8), bounds=(1e-2, 1e9), eps: float = 1e-30,
                 gate: float = 0.0, gate_beta: float = 0.8):
        self.log_tau = tau.detach().double().log().clone()
        self.lr = float(lr)
        self.betas = tuple(float(b) for b in betas)
        self.bounds = (float(bounds[0]), float(bounds[1]))
        self.eps = float(eps)
        self.gate = float(gate)
        self.gate_beta = float(gate_beta)
        self.m = torch.zeros_like(self.log_tau)
        self.v = torch.zeros_like(self.log_tau)
        #: the gate's weighted mean and second moment of the gradient (decay ``gate_beta``)
        self.gm = torch.zeros_like(self.log_tau)
        self.gw = torch.zeros_like(self.log_tau)
        self.last_gate = torch.ones_like(self.log_tau)
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
        factor = self._gate(g)
        self.log_tau.sub_(self.lr * factor * m_hat / (v_hat.sqrt() + self.eps))
        self.log_tau.clamp_(min=math.log(self.bounds[0]), max=math.log(self.bounds[1]))
        return self.tau

    def _gate(self, g: torch.Tensor) -> torch.Tensor:
        """The step's factor in ``[0, 1]``: 1 without a gate, else the positive-part shrinkage
        ``max(0, 1 - gate * c s^2 / m^2)`` of the gradient's weighted mean ``m`` (decay
        ``gate_beta``) towards 0, with ``s^2`` the gradients' weighted variance and ``c`` the
        sum of the squared weights (``c s^2``: the variance of ``m`` for independent
        gradients). 0 at the first update (no variance yet)."""
        if self.gate <= 0:
            return self.last_gate
        b, t = self.gate_beta, self.count
        self.gm.mul_(b).add_(g, alpha=1 - b)
        self.gw.mul_(b).addcmul_(g, g, value=1 - b)
        if t == 1:
            self.last_gate = torch.zeros_like(self.log_tau)
            return self.last_gate
        mean = self.gm / (1 - b**t)
        c = (1 - b) * (1 + b**t) / ((1 + b) * (1 - b**t))
        var = (self.gw / (1 - b**t) - mean**2).clamp_min(0) / (1 - c)
        self.last_gate = (1 - self.gate * c * var / mean.pow(2).clamp_min(1e-300)).clamp(0, 1)
        return self.last_gate

    def state_dict(self) -> dict:
        return {"log_tau": self.log_tau.clone(), "m": self.m.clone(), "v": self.v.clone(), "count": self.count,
                "gm": self.gm.clone(), "gw": self.gw.clone()}

    def load_state_dict(self, state: dict) -> None:
        for name in ("log_tau", "m", "v", "gm", "gw"):
            if name in state:
                getattr(self, name).copy_(state[name])
        self.count = int(state["count"])


class ShadowTrajectories:
    r"""``d theta_t / d log tau`` along the run itself, from two shadow fits at ``tau k`` and ``tau / k``
    (``tau_gradient="trajectory"``).

    The implicit gradient assumes that the adapters sit at the training optimum of the current
    tau. A run kept by early stopping does not: at its kept state the validation gradient's
    share along the data term's pull is uphill (fitting further would overfit), so the prior's
    pull (shrinkage) reads as downhill, and the implicit gradient asks for more pooling even
    where fits at a higher tau end worse (docs/learned-precision.md, section 10). By the
    envelope theorem, the derivative of the early-stopped validation loss ``V(theta_{t*}(tau))``
    is ``dV/dtheta . dtheta_t/dtau`` at the kept step ``t*``, with the stopping step held: the
    sensitivity of the *trajectory*, not of an optimum.

    Two shadow copies of the dense, offset-parameterised fit follow the run, one at precision
    ``tau k`` and one at ``tau / k`` (whatever tau is at the time), each with its own AdamW
    moments, stepped with the same minibatches and learning rates as the run. A shadow's data
    gradient is the run's, moved to the shadow's adapters by the diagonal curvature ``h_d`` of
    each task's training NLL (the `ValidationProbe`'s): ``g + h_d (theta^s_d - theta_d)``; its
    prior gradient is exact. No forward or backward pass is added: ``O(D P)`` elementwise work
    per step. The sensitivity is the central difference
    ``(theta^+ - theta^-) / (2 log k)``, and ``dV / d log tau_g`` its product with the validation
    gradient summed over the entries of group ``g`` (the diagonal curvature decouples the
    entries, so each entry responds only to its own group's tau).
    """

    def __init__(self, offsets: torch.Tensor, theta_g: torch.Tensor, *, factor: float = 1.2):
        if not float(factor) > 1.0:
            raise ValueError(f"factor must be > 1, got factor={factor!r}; e.g. 1.2.")
        self.factor = float(factor)
        self.offsets = [offsets.detach().float().clone() for _ in range(2)]
        self.globals = [theta_g.detach().float().clone() for _ in range(2)]
        self.moments = [
            {"m_d": torch.zeros_like(offsets, dtype=torch.float32), "v_d": torch.zeros_like(offsets, dtype=torch.float32),
             "m_g": torch.zeros_like(theta_g, dtype=torch.float32), "v_g": torch.zeros_like(theta_g, dtype=torch.float32)}
            for _ in range(2)
        ]
        self.count = 0

    @staticmethod
    def _adamw(param, grad, m, v, *, lr, betas, eps, weight_decay, count):
        b1, b2 = betas
        if weight_decay:
            param.mul_(1 - lr * weight_decay)
        m.mul_(b1).add_(grad, alpha=1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (v / (1 - b2**count)).sqrt_().add_(eps)
        param.addcdiv_(m, denom, value=-lr / (1 - b1**count))

    @torch.no_grad()
    def step(self, grad_offsets, grad_global, offsets, theta_g, tau_p, curvature, *, task_opt: dict, global_opt: dict):
        """Step both shadows with the run's gradients ``grad_offsets [D, P]``, ``grad_global [P]``
        taken at the run's ``offsets`` and ``theta_g`` (before its step), at ``tau_p [P]`` per
        entry, with the curvature ``[D, P]`` and the run's AdamW settings of each parameter
        (``lr``, ``betas``, ``eps``, ``weight_decay``)."""
        self.count += 1
        data = grad_offsets - tau_p * offsets
        for s, power in enumerate((1.0, -1.0)):
            moved = curvature * ((self.globals[s] - theta_g) + (self.offsets[s] - offsets))  # [D, P]
            g_d = data + moved + (tau_p * self.factor**power) * self.offsets[s]
            g_g = grad_global + moved.sum(0)
            mom = self.moments[s]
            self._adamw(self.offsets[s], g_d, mom["m_d"], mom["v_d"], count=self.count, **task_opt)
            self._adamw(self.globals[s], g_g, mom["m_g"], mom["v_g"], count=self.count, **global_opt)

    def sensitivity(self) -> torch.Tensor:
        """``[D, P]``: ``d theta_d / d log tau`` of every task adapter, the central difference."""
        plus = self.globals[0] + self.offsets[0]
        minus = self.globals[1] + self.offsets[1]
        return (plus - minus) / (2 * math.log(self.factor))

    def gradient(self, validation_gradient: torch.Tensor, group_index: torch.Tensor, groups: int) -> torch.Tensor:
        """``[G]`` ``dV / d log tau_g``: the validation gradient ``[D, P]`` times the sensitivity,
        summed over the tasks and the entries of each group."""
        per_param = (validation_gradient * self.sensitivity()).sum(0)
        return _sum_by_group(per_param, group_index, groups)

    def state_dict(self) -> dict:
        return {"offsets": self.offsets, "globals": self.globals, "moments": self.moments, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        for s in range(2):
            self.offsets[s].copy_(state["offsets"][s])
            self.globals[s].copy_(state["globals"][s])
            for k, v in state["moments"][s].items():
                self.moments[s][k].copy_(v)
        self.count = int(state["count"])


class ValidationProbe:
    r"""Validation gradient of the tasks of a validation minibatch, and a running curvature of
    every task, from one forward and backward pass per minibatch.

    Each call adds the squared per-document gradients of the minibatch's documents to running
    sums per task (exponential moving averages over calls), and the curvature of task ``d`` is
    its training document count times the average per-document squared gradient::

        S_d <- beta S_d + sum_{n in b, task d} g_n^2,    c_d <- beta c_d + |b cap d|
        h_d  = N_d S_d / c_d                    (tasks seen)
        h_d  = N_d sum_e S_e / sum_e c_e        (tasks not seen yet: the pooled average)

    The gradients use held-out labels, so this is not the optimistic empirical Fisher of the
    documents the adapters were fitted to.

    Parameters
    ----------
    gradients
        ``(rows, batch) -> (per-document gradients [B, P], count)`` (`ValidationData`): document
        ``n``'s adapter is ``rows[batch.task_ids[n]]``.
    docs_per_task
        ``[D]`` training documents ``N_d`` of each task (the curvature is of the training NLL).
    num_params
        P.
    beta
        Decay of the running sums per call, in ``(0, 1]`` (``0.7``: about the last 3 calls).
    device
        Where the ``[D, P]`` and ``[D]`` sums live: with the adapter tables (host memory with
        ``adapter_storage="host"``). Each call decays them in place there and adds its ``B``
        documents' rows; nothing of size D goes to the compute device.
    """

    def __init__(self, gradients, docs_per_task, num_params: int, *, beta: float = PROBE_BETA, device=None):
        counts = torch.as_tensor(docs_per_task, dtype=torch.float32)
        if counts.dim() != 1 or bool((counts < 0).any()):
            raise ValueError(
                f"docs_per_task must be a 1-d sequence of non-negative document counts, got {docs_per_task!r}."
            )
        if not 0.0 < float(beta) <= 1.0:
            raise ValueError(f"beta must be in (0, 1], got beta={beta!r}; e.g. 0.7, or 1.0 for a plain average.")
        self.gradients = gradients
        self.beta = float(beta)
        self.num_tasks = len(counts)
        self.docs_per_task = counts.to(device)
        #: ``[D, P]`` running sums ``S`` and ``[D]`` counts ``c`` (see above).
        self.sq = torch.zeros(self.num_tasks, int(num_params), device=device)
        self.seen = torch.zeros(self.num_tasks, device=device)
        self.count = 0
        self._pooled = None

    def __call__(self, rows: torch.Tensor, batch, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``[R, P]``: the validation gradient of each row of ``rows`` (zero for rows without a
        document in ``batch``), the gradient of the batch's NLL per scored unit.

        Parameters
        ----------
        rows
            ``[R, P]`` adapters: all D tasks (``batch.task_ids`` are task ids), or the K tasks of
            the batch (``batch.task_ids`` are positions among them).
        batch
            The validation minibatch, on the compute device.
        task_ids
            ``[B]`` task id of each document, the rows of the running sums; default
            ``batch.task_ids`` (when ``rows`` are all D tasks).
        """
        grads, count = self.gradients(rows, batch)  # [B, P]
        self.add(grads.square(), batch.task_ids if task_ids is None else task_ids)
        val_grad = torch.zeros(rows.shape[0], grads.shape[1], dtype=grads.dtype, device=grads.device)
        return val_grad.index_add_(0, batch.task_ids, grads / max(1, count))

    @torch.no_grad()
    def add(self, squared_gradients: torch.Tensor, task_ids: torch.Tensor) -> None:
        """Decay the sums and add ``[B, P]`` squared gradients of documents of tasks ``task_ids
        [B]`` (both moved to the sums' device first)."""
        task_ids = task_ids.to(self.sq.device)
        self.sq.mul_(self.beta)
        self.seen.mul_(self.beta)
        self.sq.index_add_(0, task_ids, squared_gradients.to(self.sq.device, self.sq.dtype))
        self.seen.index_add_(0, task_ids, torch.ones(task_ids.shape, dtype=self.seen.dtype, device=self.seen.device))
        self.count += 1
        self._pooled = None

    @torch.no_grad()
    def curvature(self, rows: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        """``[R, P]`` curvature ``h`` of tasks ``rows`` (a slice or ``[R]`` task ids on the sums'
        device; default all D), on the sums' device. The pooled average is summed over all D
        tasks once per call of the probe."""
        if self.count == 0:
            raise RuntimeError("ValidationProbe.curvature() needs at least one call of the probe.")
        tiny = torch.finfo(self.seen.dtype).tiny
        if self._pooled is None:
            self._pooled = self.sq.sum(0) / self.seen.sum().clamp_min(tiny)
        sq, seen = self.sq[rows], self.seen[rows]
        per_doc = torch.where((seen > 0)[:, None], sq / seen.clamp_min(tiny)[:, None], self._pooled)
        return per_doc * self.docs_per_task[rows][:, None]

    def state_dict(self) -> dict:
        """``sq``, ``seen`` and ``count``, to checkpoint."""
        return {"sq": self.sq, "seen": self.seen, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict`."""
        self.sq.copy_(state["sq"])
        self.seen.copy_(state["seen"])
        self.count = int(state["count"])
        self._pooled = None
