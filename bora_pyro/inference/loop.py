"""The optimisation loop shared by MAP and SVI: learning-rate schedule, progress bar, validation,
early stopping and the history. The inference method lives in a `Stepper` (`map.py`, `svi.py`)."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

import pyro
import torch
from pyro.infer import ELBO
from tqdm.auto import tqdm

from ..data import IGNORE_INDEX
from ..models.bora import BoraModel

if TYPE_CHECKING:
    from .checkpoint import Checkpointing

__all__ = ["FitState", "Stepper", "run_steps", "initial_tau", "lr_factor"]


@dataclass
class FitState:
    """What a run leaves: adapters, precisions, history (and posterior scales under SVI).

    Attributes
    ----------
    task_adapters
        ``[D, P]`` fp32 on the CPU: MAP values, or posterior means under SVI (in the pooled limit
        every row equals the global adapter).
    global_adapter
        ``[P]`` (with tau = 0 the model has no global adapter; this is then the mean of the task
        adapters, the limit of its MAP value as tau -> 0).
    tau
        ``[G]`` precisions, one per group (``0`` or ``inf`` in the limits).
    task_scales
        ``[D, P]`` posterior standard deviations of the task adapters (SVI), else ``None``.
    history
        Lists per step: ``step``, ``loss`` (the negative ELBO / log joint estimate, per
        training document), ``train_nll`` (per scored token, of the batch), ``val_nll`` (per
        token; NaN when not evaluated), ``tau`` (list per group), ``seconds`` (wall time of the
        optimiser step, tau update included; loss.item() synchronises a GPU, so it is exact).
    best_step
        Step whose state was kept (best validation value with early stopping, else the last).
    """

    task_adapters: torch.Tensor
    global_adapter: torch.Tensor
    tau: torch.Tensor
    task_scales: torch.Tensor | None = None
    history: dict[str, list] = field(default_factory=dict)
    best_step: int = 0
    stopped_early: bool = False


def initial_tau(model: BoraModel) -> torch.Tensor:
    """``[G]`` starting precisions: the fixed values, ``tau_init``, or 0 / inf in the limits."""
    tau = model.fixed_tau.clone()
    if model.mode == "independent":
        return torch.zeros_like(tau)
    if model.mode == "pooled":
        return torch.full_like(tau, math.inf)
    return tau


def lr_factor(schedule: str, step: int, total: int, warmup: int) -> float:
    """Multiplier of the base learning rate at ``step``: linear warm-up, then the schedule."""
    if schedule not in ("constant", "cosine", "linear"):
        raise ValueError(f"lr_schedule={schedule!r} is not valid; choose 'constant', 'cosine' or 'linear'.")
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0 - 0.9 * progress


class Stepper:
    """One inference method: a guide, an ELBO and an AdamW optimiser over the guide's parameters.

    Subclasses build the guide (`build_guide`) and may update tau after each step
    (`after_step`); `snapshot` returns the current state as CPU tensors; `state_dict` and
    `load_state_dict` carry everything that evolves during a run (for checkpoints).
    """

    #: Name shown on the progress bar.
    name = "BoRA"

    def __init__(
        self,
        model: BoraModel,
        elbo: ELBO,
        *,
        lr: float,
        weight_decay: float = 0.0,
        device: torch.device | str = "cpu",
        autocast_dtype: torch.dtype | None = None,
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.elbo = elbo
        self.lr = lr
        self.weight_decay = weight_decay
        self.tau = initial_tau(model).to(self.device)
        self.amp = (
            (lambda: torch.autocast(self.device.type, dtype=autocast_dtype))
            if autocast_dtype is not None else contextlib.nullcontext
        )
        self.guide = None
        self.optimizer = None

    @property
    def learn(self) -> bool:
        return self.model.mode == "learn"

    def model_kwargs(self) -> dict:
        """The precision to condition on when it is learned (empirical Bayes / variational EM)."""
        return {"tau": self.tau} if self.learn else {}

    def build_guide(self) -> torch.nn.Module:
        raise NotImplementedError

    def param_groups(self) -> list[dict]:
        """One optimiser group per role (task adapters, global adapter, scales)."""
        return [{"params": [p], "name": n} for n, p in self.guide.named_parameters()]

    def setup(self, first_batch) -> None:
        """Warm-up call: builds the guide's parameters, then the optimiser over them."""
        with pyro.settings.context(module_local_params=True):
            self.guide = self.build_guide().to(self.device)
            with torch.no_grad(), self.amp():
                self.guide(first_batch, **self.model_kwargs())
        groups = self.param_groups()
        for g in groups:
            g.setdefault("lr", self.lr)
            g["base_lr"] = g["lr"]
        self.optimizer = _adamw(groups, lr=self.lr, weight_decay=self.weight_decay)

    def step(self, batch, lr_multiplier: float = 1.0) -> float:
        """One optimiser step on a minibatch; returns the loss (negative ELBO estimate)."""
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * lr_multiplier
        self.optimizer.zero_grad(set_to_none=True)
        with pyro.settings.context(module_local_params=True), self.amp():
            loss = self.elbo.differentiable_loss(self.model, self.guide, batch, **self.model_kwargs())
        loss.backward()
        self.after_backward()
        self.optimizer.step()
        return float(loss.detach())

    def after_backward(self) -> None:
        """Hook between backward and the optimiser step (e.g. to read gradients)."""

    def after_step(self, step: int) -> None:
        """Hook after each step (e.g. to update a learned tau)."""

    def point(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``([D, P], [P])``: the task adapters and global adapter to evaluate (MAP / means)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """What a checkpoint needs to continue exactly: guide parameters, optimiser state, tau.

        Returns
        -------
        dict
            ``guide`` (``{name: tensor}`` of the guide's parameters), ``optimizer`` (AdamW's
            ``state_dict``), ``tau`` (``[G]``); subclasses add their running statistics. The
            tensors are the live ones, not copies.
        """
        return {
            "guide": {name: p.detach() for name, p in self.guide.named_parameters()},
            "optimizer": self.optimizer.state_dict(),
            "tau": self.tau,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict` (possibly read back from JSON) after `setup`."""
        params = dict(self.guide.named_parameters())
        saved = state["guide"]
        shapes = {n: tuple(p.shape) for n, p in params.items()}
        saved_shapes = {n: tuple(t.shape) for n, t in saved.items()}
        if shapes != saved_shapes:
            raise ValueError(
                f"The checkpoint's guide parameters {saved_shapes} do not match this model's "
                f"{shapes}; resume with the model, data and settings of the interrupted run."
            )
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])
        optim = state["optimizer"]
        self.optimizer.load_state_dict({
            "state": {int(k): v for k, v in optim["state"].items()},  # JSON made the keys strings
            "param_groups": [dict(g, betas=tuple(g["betas"])) for g in optim["param_groups"]],
        })
        self.tau = state["tau"].to(self.device, self.tau.dtype).clone()

    def snapshot(self) -> dict[str, torch.Tensor | None]:
        theta, theta_g = self.point()
        return {
            "task_adapters": theta.detach().float().cpu().clone(),
            "global_adapter": theta_g.detach().float().cpu().clone(),
            "tau": self.tau.detach().cpu().clone(),
            "task_scales": None,
        }


def _adamw(groups: list[dict], **kwargs) -> torch.optim.AdamW:
    """AdamW, fused (one kernel over each parameter instead of several elementwise passes: about 5x
    faster on a [D, P] tensor on the CPU) where torch supports it, else the foreach version."""
    params = [p for g in groups for p in g["params"]]
    if all(p.dtype in (torch.float32, torch.float64) and p.device.type in ("cpu", "cuda") for p in params):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError):  # an older torch without fused AdamW on this device
            pass
    return torch.optim.AdamW(groups, **kwargs)


def run_steps(
    stepper: Stepper,
    batches: Iterator,
    *,
    steps: int,
    lr_schedule: str = "cosine",
    warmup_steps: int = 0,
    validate: Callable[[torch.Tensor], float] | None = None,
    eval_every: int | None = None,
    patience: int | None = None,
    progress: bool = True,
    checkpointing: Checkpointing | None = None,
) -> FitState:
    """Run ``steps`` optimiser steps of ``stepper`` on ``batches``, validating and keeping the best.

    ``validate(task_adapters [D, P]) -> NLL per token`` runs every ``eval_every`` steps and at the
    end; the state with the lowest value is returned, and after ``patience`` evaluations without
    improvement the run stops early.

    With ``checkpointing`` (see `bora_pyro.inference.checkpoint`) the full state is written every
    ``checkpointing.every`` steps, at the last step and on early stopping; ``batches`` must then
    have ``state_dict`` / ``load_state_dict``. With ``checkpointing.resume`` the run continues
    after the resumed checkpoint's step, exactly as it would have without the interruption.
    """
    lr_factor(lr_schedule, 0, steps, warmup_steps)  # validates the schedule name
    model = stepper.model
    if checkpointing is not None:
        checkpointing.start(batches)
    first = next(batches).to(stepper.device)
    stepper.setup(first)
    history: dict[str, list] = {
        "step": [], "loss": [], "train_nll": [], "val_nll": [], "tau": [], "seconds": [],
    }
    best_value, best_state, best_step = math.inf, None, 0
    bad_evals, stopped_early = 0, False
    start = 0
    if checkpointing is not None and checkpointing.resume is not None:
        loop = checkpointing.restore(stepper)
        history, best_value, best_state = loop["history"], loop["best_value"], loop["best_state"]
        best_step, bad_evals, stopped_early = loop["best_step"], loop["bad_evals"], loop["stopped_early"]
        start = checkpointing.resume.step + 1
    bar = tqdm(range(start, start if stopped_early else steps), initial=start, total=steps,
               desc=stepper.name, disable=not progress, dynamic_ncols=True)
    batch = first
    for step in bar:
        if step > start:
            batch = next(batches).to(stepper.device)
        started = time.perf_counter()
        loss = stepper.step(batch, lr_factor(lr_schedule, step, steps, warmup_steps))
        stepper.after_step(step)
        history["seconds"].append(time.perf_counter() - started)
        n_tokens = _scored_tokens(batch)
        train_nll = model.last_nll / n_tokens if n_tokens else math.nan
        history["step"].append(step)
        history["loss"].append(loss / model.num_docs)
        history["train_nll"].append(train_nll)
        history["tau"].append(stepper.tau.tolist())
        val = math.nan
        if validate is not None and eval_every and ((step + 1) % eval_every == 0 or step == steps - 1):
            val = float(validate(stepper.point()[0]))
            if val < best_value:
                best_value, best_state, best_step = val, stepper.snapshot(), step
                bad_evals = 0
            else:
                bad_evals += 1
        history["val_nll"].append(val)
        postfix = {"nll/tok": f"{train_nll:.3f}"}
        if best_state is not None:
            postfix["best val ppl"] = f"{math.exp(best_value):.2f}"
        if stepper.learn:
            postfix["tau"] = ",".join(f"{t:.3g}" for t in stepper.tau.tolist())
        bar.set_postfix(postfix, refresh=False)
        if patience is not None and bad_evals >= patience:
            stopped_early = True
        if checkpointing is not None and checkpointing.due(step, steps, stopped_early):
            checkpointing.save(step, stepper=stepper, batches=batches, loop={
                "history": history, "best_value": best_value, "best_state": best_state,
                "best_step": best_step, "bad_evals": bad_evals, "stopped_early": stopped_early,
            })
        if stopped_early:
            break
    bar.close()
    if best_state is None:
        best_state, best_step = stepper.snapshot(), history["step"][-1]
    return FitState(
        task_adapters=best_state["task_adapters"].contiguous(),
        global_adapter=best_state["global_adapter"],
        tau=best_state["tau"],
        task_scales=best_state["task_scales"],
        history=history,
        best_step=best_step,
        stopped_early=stopped_early,
    )


def _scored_tokens(batch) -> int:
    labels = getattr(batch, "labels", None)
    if labels is None:
        return 0
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
