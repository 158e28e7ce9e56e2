"""MAP inference for BoRA: a delta guide, Pyro's ELBO (which for a delta guide is the log joint)
and AdamW, with the precision learned by the evidence fixed point (`precision`)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import pyro
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoDelta
from pyro.infer.autoguide.initialization import init_to_value
from tqdm.auto import tqdm

from ..models.bora import SITE_GLOBAL, SITE_TASKS, BoraModel
from .precision import FisherEstimate, evidence_update

__all__ = ["MAPState", "optimise_map", "map_guide"]


@dataclass
class MAPState:
    """What a MAP run leaves: the adapters, the precisions and the history.

    Attributes
    ----------
    task_adapters
        ``[D, P]`` fp32 on the CPU (in the pooled limit every row equals the global adapter).
    global_adapter
        ``[P]`` (with tau = 0 there is no global adapter in the model; this is then the mean of
        the task adapters, the limit of its MAP value as tau -> 0).
    tau
        ``[G]`` precisions, one per group (``0`` or ``inf`` in the limits).
    history
        Lists per recorded step: ``step``, ``loss`` (negative log joint estimate per document),
        ``train_nll`` (per scored token, of the batch), ``val_nll`` (per token; NaN when not
        evaluated), ``tau`` (list per group).
    best_step
        Step whose state was kept (the best validation value with early stopping, else the last).
    """

    task_adapters: torch.Tensor
    global_adapter: torch.Tensor
    tau: torch.Tensor
    history: dict[str, list] = field(default_factory=dict)
    best_step: int = 0
    stopped_early: bool = False


def map_guide(model: BoraModel, init_global: torch.Tensor) -> AutoDelta:
    """A delta guide over the model's latent sites, every task adapter starting at ``init_global``."""
    values = {
        SITE_GLOBAL: init_global.clone(),
        SITE_TASKS: init_global.expand(model.num_tasks, -1).clone(),
    }
    return AutoDelta(model, init_loc_fn=init_to_value(values=values))


def _lr_factor(schedule: str, step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "linear":
        return 1.0 - 0.9 * min(1.0, progress)
    raise ValueError(f"lr_schedule={schedule!r} is not valid; choose 'constant', 'cosine' or 'linear'.")


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
    validate: Callable[[torch.Tensor], float] | None = None,
    eval_every: int | None = None,
    patience: int | None = None,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
    desc: str = "BoRA MAP",
) -> MAPState:
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
    validate, eval_every, patience
        ``validate(task_adapters) -> validation NLL per token``, run every ``eval_every`` steps
        and at the end; the best state is kept, and after ``patience`` evaluations without
        improvement the run stops early.
    device, autocast_dtype
        Where to run, and e.g. ``torch.bfloat16`` for autocast of the base model on CUDA.
    progress
        Show a progress bar.
    """
    device = torch.device(device)
    model = model.to(device)
    init_global = init_global.to(device)
    learn = model.mode == "learn"
    D, P = model.num_tasks, model.num_params
    if learn and batch_fraction is None:
        raise ValueError("Learning tau under MAP needs batch_fraction = batch size / training documents.")
    tau = model.fixed_tau.clone()
    if model.mode == "independent":
        tau = torch.zeros_like(tau)
    elif model.mode == "pooled":
        tau = torch.full_like(tau, math.inf)
    tau_warmup = steps // 5 if tau_warmup is None else tau_warmup

    if lr_per_tau is not None:
        if model.mode != "fixed" or model.num_groups != 1:
            raise ValueError(
                "lr_per_tau (learning rate proportional to tau, as in the paper) needs one fixed, "
                f"finite, positive tau; this model has tau mode {model.mode!r}."
            )
        lr = lr_per_tau * float(tau[0])

    elbo = Trace_ELBO()
    kwargs = lambda: {"tau": tau} if learn else {}  # noqa: E731
    amp = (
        torch.autocast(device.type, dtype=autocast_dtype)
        if autocast_dtype is not None else contextlib.nullcontext()
    )
    history: dict[str, list] = {"step": [], "loss": [], "train_nll": [], "val_nll": [], "tau": []}

    with pyro.settings.context(module_local_params=True):
        guide = map_guide(model, init_global).to(device)
        first = next(batches).to(device)
        with torch.no_grad(), amp:
            guide(first, **kwargs())  # warm-up: builds the guide's parameters
        groups = []
        for name, param in guide.named_parameters():
            role = SITE_TASKS if name.startswith(SITE_TASKS) else SITE_GLOBAL
            groups.append({"params": [param], "lr": lr, "name": role})
        optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
        task_param = next(
            (p for n, p in guide.named_parameters() if n.startswith(SITE_TASKS)), None
        )
        fisher = (
            FisherEstimate((D, P), batch_fraction=batch_fraction, device=device) if learn else None
        )

        def current() -> tuple[torch.Tensor, torch.Tensor]:
            with torch.no_grad():
                values = guide.median()
            theta_g = values.get(SITE_GLOBAL)
            if SITE_TASKS in values:
                theta = values[SITE_TASKS]
                if theta_g is None:
                    theta_g = theta.mean(0)
            else:
                theta = theta_g.expand(D, -1)
            return theta.detach().float(), theta_g.detach().float()

        best = (math.inf, None, 0)
        bad_evals = 0
        stopped_early = False
        bar = tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True)
        batch = first
        for step in bar:
            if step > 0:
                batch = next(batches).to(device)
            factor = _lr_factor(lr_schedule, step, steps, warmup_steps)
            for g in optimizer.param_groups:
                g["lr"] = lr * factor
            optimizer.zero_grad(set_to_none=True)
            with amp:
                loss = elbo.differentiable_loss(model, guide, batch, **kwargs())
            loss.backward()
            if fisher is not None and task_param is not None and task_param.grad is not None:
                fisher.update(task_param.grad)
            optimizer.step()

            n_tokens = _scored_tokens(batch)
            train_nll = model.last_nll / n_tokens if n_tokens else math.nan
            history["step"].append(step)
            history["loss"].append(float(loss.detach()) / model.num_docs)
            history["train_nll"].append(train_nll)

            if learn and step + 1 > tau_warmup and (step + 1 - tau_warmup) % tau_update_every == 0:
                theta, theta_g = current()
                tau = evidence_update(
                    theta, theta_g, fisher.curvature(), tau, model.group_index,
                    prior=model.config.tau_prior,
                )
            history["tau"].append(tau.tolist())

            val = math.nan
            last = step == steps - 1
            if validate is not None and eval_every and ((step + 1) % eval_every == 0 or last):
                theta, theta_g = current()
                val = float(validate(theta))
                if val < best[0]:
                    best = (val, (theta.cpu().clone(), theta_g.cpu().clone(), tau.cpu().clone()), step)
                    bad_evals = 0
                else:
                    bad_evals += 1
            history["val_nll"].append(val)
            postfix = {"nll/tok": f"{train_nll:.3f}"}
            if best[1] is not None:
                postfix["best val ppl"] = f"{math.exp(best[0]):.2f}"
            if learn:
                postfix["tau"] = ",".join(f"{t:.3g}" for t in tau.tolist())
            bar.set_postfix(postfix, refresh=False)
            if patience is not None and bad_evals >= patience:
                stopped_early = True
                break
        bar.close()

        if best[1] is not None:
            theta, theta_g, tau_best = best[1]
            best_step = best[2]
        else:
            theta, theta_g = current()
            theta, theta_g, tau_best = theta.cpu(), theta_g.cpu(), tau.cpu()
            best_step = history["step"][-1]
    return MAPState(
        task_adapters=theta.contiguous().clone(),
        global_adapter=theta_g.clone(),
        tau=tau_best.clone(),
        history=history,
        best_step=best_step,
        stopped_early=stopped_early,
    )


def _scored_tokens(batch) -> int:
    labels = getattr(batch, "labels", None)
    if labels is None:
        return 0
    return int((labels[:, 1:] != -100).sum())
