"""MAP inference for BoRA: a point (delta) guide, Pyro's ELBO (for a point guide, the log joint)
and AdamW, with a learned precision set by the evidence fixed point (`precision`)."""

from __future__ import annotations

from typing import Callable, Iterator

import pyro
import torch
from pyro.infer import Trace_ELBO
from torch import nn

from ..models.bora import SITE_GLOBAL, SITE_TASKS, BoraModel
from ..models.prior import PointMass
from .checkpoint import Checkpointing
from .loop import FitState, Stepper, run_steps
from .precision import FisherEstimate, evidence_update

__all__ = ["MAPStepper", "PointGuide", "optimise_map", "PARAMETERIZATIONS"]

#: How the MAP guide parameterises the task adapters (see `PointGuide`).
PARAMETERIZATIONS = ("centered", "offset")


class PointGuide(nn.Module):
    """The MAP guide: one point for each latent site, ``task_adapters [D, P]`` and
    ``global_adapter [P]`` (whichever the model's tau mode has), every task starting at
    ``init_global``. Its sites are `PointMass` distributions, so the ELBO is the log joint.

    ``parameterization`` (with both sites, i.e. a finite tau > 0):

    ``"offset"`` (default)
        The optimiser moves ``Theta`` and the offsets ``delta_d = theta_d - Theta``. The
        objective and its optimum are the same as with ``"centered"`` (a linear map with unit
        Jacobian), but ``Theta`` receives every document's likelihood gradient directly, so it
        learns what the tasks share as fast as a pooled adapter would, and the offsets learn
        what is particular to each task.
    ``"centered"``
        The optimiser moves the task adapters ``theta_d`` and ``Theta``. ``Theta`` then learns
        only through the prior's pull towards the task adapters, which is slow when tau is large
        (a stiff coupling). On Shakespeare (100 steps, docs/reproduction.md) it under-fitted at
        every tau: test perplexity 67.8 at tau = 1e3 and 92.2 at tau = 1e5, against 59.4 and
        57.8 at tau = 1e3 and 1e4 with ``"offset"``. It can converge faster when tau is much
        smaller than the likelihood's curvature (then the direction that moves ``Theta``
        against all offsets is only weakly curved, which slows ``"offset"``).
    """

    def __init__(self, model: BoraModel, init_global: torch.Tensor, parameterization: str = "offset"):
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(
                f"parameterization={parameterization!r} is not valid; choose one of {PARAMETERIZATIONS}."
            )
        self.num_tasks = model.num_tasks
        init = init_global.detach().float()
        has_tasks, has_global = model.mode != "pooled", model.mode != "independent"
        offsets = has_tasks and has_global and parameterization == "offset"
        self.global_adapter = nn.Parameter(init.clone()) if has_global else None
        self.task_adapters = (
            nn.Parameter(init.expand(model.num_tasks, -1).clone()) if has_tasks and not offsets else None
        )
        self.task_offsets = nn.Parameter(torch.zeros(model.num_tasks, init.shape[-1])) if offsets else None

    @property
    def task_parameter(self) -> nn.Parameter | None:
        """The ``[D, P]`` parameter whose gradient is the gradient in the task adapters."""
        return self.task_offsets if self.task_offsets is not None else self.task_adapters

    def values(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(task adapters [D, P] or None, global adapter [P] or None)``, differentiable."""
        theta = self.task_adapters
        if self.task_offsets is not None:
            theta = self.global_adapter + self.task_offsets
        return theta, self.global_adapter

    def forward(self, batch, *, tau=None) -> dict[str, torch.Tensor]:
        theta, theta_g = self.values()
        out = {}
        if theta_g is not None:
            out[SITE_GLOBAL] = pyro.sample(SITE_GLOBAL, PointMass(theta_g))
        if theta is not None:
            with pyro.plate("tasks", self.num_tasks, dim=-1):
                out[SITE_TASKS] = pyro.sample(SITE_TASKS, PointMass(theta))
        return out


class MAPStepper(Stepper):
    """MAP steps; with a learned tau, evidence updates from a running diagonal Fisher estimate.

    Parameters
    ----------
    model, init_global, lr, weight_decay, device, autocast_dtype
        See `optimise_map`.
    batch_fraction
        ``B / N`` (the Fisher estimate's scale); needed when tau is learned.
    tau_update_every, tau_warmup
        Steps between evidence updates, and steps before the first one.
    parameterization
        ``"offset"`` or ``"centered"``: what the optimiser moves (see `PointGuide`).
    """

    name = "BoRA MAP"

    def __init__(
        self,
        model: BoraModel,
        *,
        init_global: torch.Tensor,
        lr: float,
        weight_decay: float = 0.0,
        batch_fraction: float | None = None,
        tau_update_every: int = 50,
        tau_warmup: int = 0,
        parameterization: str = "offset",
        device: torch.device | str = "cpu",
        autocast_dtype: torch.dtype | None = None,
    ):
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(
                f"parameterization={parameterization!r} is not valid; choose one of {PARAMETERIZATIONS}."
            )
        self.parameterization = parameterization
        super().__init__(model, Trace_ELBO(), lr=lr, weight_decay=weight_decay, device=device,
                         autocast_dtype=autocast_dtype)
        if self.learn and batch_fraction is None:
            raise ValueError("Learning tau under MAP needs batch_fraction = batch size / training documents.")
        self.init_global = init_global.to(self.device)
        self.tau_update_every, self.tau_warmup = max(1, int(tau_update_every)), int(tau_warmup)
        self.fisher = (
            FisherEstimate((model.num_tasks, model.num_params), batch_fraction=batch_fraction, device=self.device)
            if self.learn else None
        )
        self._task_param = None

    def build_guide(self):
        return PointGuide(self.model, self.init_global, self.parameterization)

    def param_groups(self):
        groups = super().param_groups()
        for g in groups:
            g["name"] = SITE_TASKS if g["params"][0] is self.guide.task_parameter else SITE_GLOBAL
        self._task_param = self.guide.task_parameter
        return groups

    def after_backward(self) -> None:
        if self.fisher is not None and self._task_param is not None and self._task_param.grad is not None:
            self.fisher.update(self._task_param.grad)

    def after_step(self, step: int) -> None:
        done = step + 1
        if self.learn and done > self.tau_warmup and (done - self.tau_warmup) % self.tau_update_every == 0:
            theta, theta_g = self.point()
            self.tau = evidence_update(
                theta, theta_g, self.fisher.curvature(), self.tau, self.model.group_index,
                prior=self.model.config.tau_prior,
            )

    def state_dict(self) -> dict:
        """`Stepper.state_dict` plus, with a learned tau, ``fisher`` (``mean``, ``sq``, ``count``)."""
        state = super().state_dict()
        if self.fisher is not None:
            state["fisher"] = {"mean": self.fisher.mean, "sq": self.fisher.sq, "count": self.fisher.count}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict` after `setup`."""
        super().load_state_dict(state)
        if self.fisher is not None:
            self.fisher.mean.copy_(state["fisher"]["mean"])
            self.fisher.sq.copy_(state["fisher"]["sq"])
            self.fisher.count = int(state["fisher"]["count"])

    @torch.no_grad()
    def point(self) -> tuple[torch.Tensor, torch.Tensor]:
        theta, theta_g = self.guide.values()
        if theta is None:
            theta = theta_g.expand(self.model.num_tasks, -1)
        elif theta_g is None:
            theta_g = theta.mean(0)
        return theta.detach().float(), theta_g.detach().float()


def optimise_map(
    model: BoraModel,
    batches: Iterator,
    *,
    init_global: torch.Tensor,
    steps: int,
    lr: float = 1e-3,
    lr_schedule: str = "cosine",
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    lr_per_tau: float | None = None,
    batch_fraction: float | None = None,
    tau_update_every: int = 50,
    tau_warmup: int | None = None,
    parameterization: str = "offset",
    validate: Callable[[torch.Tensor], float] | None = None,
    eval_every: int | None = None,
    patience: int | None = None,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
    checkpointing: Checkpointing | None = None,
) -> FitState:
    """Maximise the posterior density of the adapters (and, if learned, the evidence for tau).

    Parameters
    ----------
    model
        The `BoraModel`.
    batches
        An endless iterator of training minibatches (``.to(device)``, ``task_ids``, ``doc_index``).
    init_global
        ``[P]`` initial global adapter; every task adapter starts there.
    steps
        Number of optimiser steps.
    lr, lr_schedule, warmup_steps, weight_decay
        AdamW settings. ``weight_decay`` must stay 0 for a true MAP (the prior is the
        regulariser); any other value adds decoupled decay on top.
    lr_per_tau
        The paper's trick: learning rate ``lr_per_tau * tau`` (fixed finite tau only).
    batch_fraction
        ``B / N``, needed to learn tau (the Fisher estimate's scale).
    tau_update_every, tau_warmup
        With a learned tau: steps between evidence updates, and steps before the first one
        (default: a fifth of ``steps``; the Fisher estimate needs B != 0 first).
    parameterization
        ``"offset"`` (default) or ``"centered"``: see `PointGuide`.
    validate, eval_every, patience
        ``validate(task_adapters) -> validation NLL per token``, run every ``eval_every`` steps
        and at the end; the best state is kept, and after ``patience`` evaluations without
        improvement the run stops early.
    device, autocast_dtype
        Where to run, and e.g. ``torch.bfloat16`` for autocast of the base model on CUDA.
    progress
        Show a progress bar.
    checkpointing
        Periodic checkpoints and the one to resume from (see `run_steps`).
    """
    if lr_per_tau is not None:
        if model.mode != "fixed" or model.num_groups != 1:
            raise ValueError(
                "lr_per_tau (learning rate proportional to tau, as in the paper) needs one fixed, "
                f"finite, positive tau; this model has tau mode {model.mode!r} with "
                f"{model.num_groups} group(s)."
            )
        lr = lr_per_tau * float(model.fixed_tau[0])
    stepper = MAPStepper(
        model, init_global=init_global, lr=lr, weight_decay=weight_decay,
        batch_fraction=batch_fraction, tau_update_every=tau_update_every,
        tau_warmup=steps // 5 if tau_warmup is None else tau_warmup,
        parameterization=parameterization, device=device, autocast_dtype=autocast_dtype,
    )
    return run_steps(
        stepper, batches, steps=steps, lr_schedule=lr_schedule, warmup_steps=warmup_steps,
        validate=validate, eval_every=eval_every, patience=patience, progress=progress,
        checkpointing=checkpointing,
    )
