"""The optimisation loop shared by MAP and SVI: learning-rate schedule, progress bar, validation,
early stopping, divergence checks and the history. The inference method lives in a `Stepper` (`map.py`, `svi.py`)."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Iterator

import pyro
import torch
from pyro.infer import ELBO
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from .. import distributed
from ..config import SPARSE_TASKS_PER_DOC, TrainConfig
from ..data import IGNORE_INDEX
from ..models.bora import BoraModel, TaskSubsample
from ..runtime import autocast, autocast_dtype, resolve_device
from .rows import LazyAdamW, resolve_storage

if TYPE_CHECKING:
    from .checkpoint import Checkpointing

__all__ = ["FitState", "Stepper", "sparse_steps", "run_steps", "initial_tau", "eval_interval", "lr_factor", "lr_scheduler", "base_lr", "READ_EVERY"]

#: Steps between two reads of the step values (loss, gradient norm, NLL, tau) from the compute
#: device; `run_steps` also reads them at the first step, before each validation and checkpoint,
#: and at the last step.
READ_EVERY = 25


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
        token; NaN when not evaluated), ``tau`` (list per group), ``seconds`` (host wall time of
        the optimiser step, tau update included; on a GPU the steps between two reads of the
        values (`READ_EVERY`) run ahead of the device, and the step of each read absorbs the
        wait, so only sums over a read interval are the device's time).
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


def eval_interval(train: TrainConfig, steps: int) -> int:
    """Steps between validation evaluations of a run of ``steps``: ``train.eval_every``, or
    ten per run when it is ``None``."""
    return train.eval_every if train.eval_every is not None else max(1, steps // 10)


def lr_factor(schedule: str, step: int, total: int, warmup: int) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total``: a linear warm-up
    over ``warmup`` steps, then ``"constant"`` 1, or ``"cosine"`` / ``"linear"`` from 1 to 0.1."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0 - 0.9 * progress


def lr_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, steps: int) -> LambdaLR:
    """``train.lr_schedule`` after ``train.warmup_steps`` of warm-up over a run of ``steps``, as
    a `torch.optim.lr_scheduler.LambdaLR` (step k runs at ``lr * lr_factor(..., k, ...)``; its
    ``state_dict`` goes into checkpoints)."""
    schedule, warmup = train.lr_schedule, train.warmup_steps

    def factor(step: int) -> float:
        return lr_factor(schedule, step, steps, warmup)

    return LambdaLR(optimizer, factor)


def base_lr(model: BoraModel, train: TrainConfig) -> float:
    """The learning rate before the schedule: ``train.lr``, or ``train.lr_per_tau * tau`` (the
    paper's trick, one fixed finite tau only)."""
    if train.lr_per_tau is None:
        return train.lr
    if model.mode != "fixed" or model.num_groups != 1:
        raise ValueError(
            "lr_per_tau (learning rate proportional to tau, as in the paper) needs one fixed, "
            f"finite, positive tau; this model has tau mode {model.mode!r} with "
            f"{model.num_groups} group(s). Pass lr= instead, or one fixed tau."
        )
    return train.lr_per_tau * float(model.fixed_tau[0])


def sparse_steps(model: BoraModel, train: TrainConfig) -> bool:
    """Whether a fit's steps touch only the minibatch's tasks (``train.task_step``; ``"auto"``:
    sparse above `SPARSE_TASKS_PER_DOC` tasks per minibatch document or with the tables on the
    host). Never for a pooled model or under data parallelism."""
    return model.mode != "pooled" and not distributed.active() and (train.task_step == "sparse" or (
        train.task_step == "auto" and model.docs_per_task is not None
        and (model.num_tasks > SPARSE_TASKS_PER_DOC * train.batch_size or train.adapter_storage == "host")))


class Stepper:
    """One inference method: a guide, an ELBO, AdamW over the guide's parameters and its
    learning-rate schedule, all set by a `TrainConfig`.

    Subclasses build the guide (`build_guide`) and may update tau after each step
    (`after_step`); `snapshot` returns the current state as CPU tensors; `state_dict` and
    `load_state_dict` carry everything that evolves during a run (for checkpoints).

    Parameters
    ----------
    model
        The `BoraModel`; its ``num_docs`` training documents and ``train`` give the run's
        length (`TrainConfig.total_steps`).
    elbo
        The Pyro ELBO whose ``differentiable_loss`` is minimised.
    train
        ``lr``, ``lr_per_tau``, ``lr_schedule``, ``warmup_steps``, ``weight_decay`` (AdamW),
        ``device``, ``autocast`` (the base model's precision), ``task_step`` and
        ``adapter_storage`` are read here; the subclasses and `run_steps` read the rest.

    With ``task_step="sparse"`` (and a model with task adapters) a step touches only the tasks
    of its minibatch: the guide keeps its ``[D, P]`` tables on `storage` (``guide.tables``),
    `LazyAdamW` updates the gathered rows, and the model and guide run with the batch's
    `TaskSubsample` (docs/many-tasks.md).
    """

    #: Name shown on the progress bar.
    name = "BoRA"
    #: ``[D, P]`` tables of the guide (task adapters or offsets; under SVI also the log-scales).
    tables_per_task = 1

    def __init__(self, model: BoraModel, elbo: ELBO, train: TrainConfig):
        if not isinstance(train, TrainConfig):
            raise ValueError(f"train must be a TrainConfig, got {type(train).__name__}.")
        self.train = train
        self.steps = train.total_steps(model.num_docs)
        self.device = resolve_device(train.device)
        self.amp_dtype = autocast_dtype(train.autocast, self.device)
        self.model = model.to(self.device)
        self.elbo = elbo
        self.lr = base_lr(model, train)
        self.tau = initial_tau(model).to(self.device)
        self.guide = None
        self.optimizer = None
        self.scheduler = None
        #: Whether steps touch only the batch's tasks (`TaskSubsample`), and where the tables live.
        self.sparse = sparse_steps(model, train)
        if distributed.active() and (train.task_step == "sparse" or train.adapter_storage == "host"):
            raise ValueError(
                f"task_step={train.task_step!r} / adapter_storage={train.adapter_storage!r}: sparse steps "
                "are not combined with data parallelism (each rank's batch holds other tasks, whose rows "
                "would need their own all-reduce); pass task_step='dense' and adapter_storage='device' "
                "(or 'auto'), or train on one process."
            )
        self.storage = None
        if self.sparse:
            nbytes = 3 * self.tables_per_task * model.num_tasks * model.num_params * 4  # values + 2 moments
            self.storage = resolve_storage(train.adapter_storage, self.device, nbytes)
        self._prepared: tuple | None = None
        #: Learning rate of the last step, and its gradient norm (a 0-dim tensor on the compute
        #: device, read by `run_steps` with the loss).
        self.last_lr, self.last_grad_norm = math.nan, torch.tensor(math.nan)
        #: Whether the next step runs with Pyro's validation (when it is on): the first step of
        #: a run does, the others skip its checks, which read values back from the device.
        self.validate_next = True

    @property
    def learn(self) -> bool:
        return self.model.mode == "learn"

    def amp(self):
        """The autocast context of the base model (a no-op in fp32)."""
        return autocast(self.device, self.amp_dtype)

    def model_kwargs(self) -> dict:
        """The precision to condition on when it is learned (empirical Bayes / variational EM)."""
        return {"tau": self.tau} if self.learn else {}

    def build_guide(self) -> torch.nn.Module:
        raise NotImplementedError

    def param_groups(self) -> list[dict]:
        """One optimiser group per role (task adapters, global adapter, scales); a sparse
        guide's tables are groups with ``rows=True`` (see `LazyAdamW`)."""
        groups = [{"params": [p], "name": n} for n, p in self.guide.named_parameters()]
        return groups + [{"params": [t], "name": n, "rows": True} for n, t in self._tables().items()]

    def _tables(self) -> dict[str, torch.Tensor]:
        return dict(getattr(self.guide, "tables", {}))

    def setup(self, first_batch) -> None:
        """Warm-up call: builds the guide's parameters, then the optimiser and its schedule (a
        sparse guide builds its tables in its constructor: no warm-up call)."""
        with pyro.settings.context(module_local_params=True):
            self.guide = self.build_guide().to(self.device)
            if not self.sparse:
                with torch.no_grad(), self.amp():
                    self.guide(first_batch, **self.model_kwargs())
        groups = self.param_groups()
        for g in groups:
            g.setdefault("lr", self.lr)
        if self.sparse:
            self.optimizer = LazyAdamW(groups, compute=self.device, lr=self.lr, weight_decay=self.train.weight_decay)
        else:
            self.optimizer = _adamw(groups, lr=self.lr, weight_decay=self.train.weight_decay)
        self.scheduler = lr_scheduler(self.optimizer, self.train, self.steps)

    def prepare(self, batch):
        """``batch`` on the compute device; for sparse steps also its `TaskSubsample`, read
        from the task ids while they are still on the host (no device sync), kept for `step`.
        A batch with `TaskGroups` (``batch.groups``) shares their ``local`` index with the
        subsample (both list the tasks in order of first appearance), which tells the model
        that its adapters are already the K rows of the batch's tasks."""
        moved = batch.to(self.device)
        if self.sparse:
            tasks = self.model.subsample_tasks(batch.task_ids, self.device)
            if getattr(moved, "groups", None) is not None:
                tasks = replace(tasks, local=moved.groups.local)
            self._prepared = (moved, tasks)
        return moved

    def task_subsample(self, batch) -> TaskSubsample:
        """The `TaskSubsample` of ``batch`` (the one `prepare` computed, else computed now)."""
        if self._prepared is not None and self._prepared[0] is batch:
            return self._prepared[1]
        return self.model.subsample_tasks(batch.task_ids, self.device)

    def step(self, batch) -> torch.Tensor:
        """One optimiser step on a minibatch and one step of the schedule, without reading
        anything back from the compute device.

        Returns the loss (negative ELBO estimate) as a 0-dim tensor on the compute device;
        `last_grad_norm` is the gradient's total 2-norm, likewise (`run_steps` reads both every
        few steps). Only the first step of a run runs with Pyro's validation (`validate_next`);
        a forward pass that produced non-finite values there (which Pyro's validation reports
        as a constraint violation) returns NaN for both, for `run_steps` to report the
        divergence. Later steps let non-finite values through to the loss.
        """
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        kwargs = self.model_kwargs()
        if self.sparse:
            kwargs["tasks"] = tasks = self.task_subsample(batch)
            rows = self.optimizer.gather(tasks.host_index)
            self.guide.gathered = {name: rows[id(t)] for name, t in self._tables().items()}
        checks = nullcontext() if self.validate_next else pyro.validation_enabled(False)
        self.validate_next = False
        try:
            with checks, pyro.settings.context(module_local_params=True), self.amp():
                loss = self.elbo.differentiable_loss(self.model, self.guide, batch, **kwargs)
        except ValueError as err:
            if not _invalid_values(err):
                raise
            self.last_grad_norm = torch.full((), math.nan, device=self.device)
            return self.last_grad_norm.clone()
        loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        distributed.all_reduce_gradients(params)  # data parallel: the mean over ranks
        self.after_backward()
        grads = [p.grad for p in params if p.grad is not None]
        if self.sparse:
            grads += self.optimizer.gathered_grads()
        grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=loss.device)
        self.optimizer.step()
        self.scheduler.step()
        # data parallel: the global batch's loss is the mean of the ranks' (see bora_pyro.distributed)
        self.last_grad_norm = grad_norm.detach()
        return distributed.sum_over_ranks(loss.detach()) / distributed.world_size()

    def after_backward(self) -> None:
        """Hook between backward and the optimiser step (e.g. to read gradients)."""

    def after_step(self, step: int) -> None:
        """Hook after each step (e.g. to update a learned tau)."""

    def reads_tables(self, step: int) -> bool:
        """Whether `after_step` of ``step`` reads a sparse guide's tables, so that `run_steps`
        applies `LazyAdamW`'s queued write-back first: by default with a learned tau."""
        return self.learn

    def point(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``([D, P], [P])``: the task adapters and global adapter to evaluate (MAP / means)."""
        raise NotImplementedError

    @torch.no_grad()
    def is_finite(self) -> bool:
        """Whether every guide parameter is finite (one host synchronisation)."""
        tensors = list(self.guide.parameters()) + list(self._tables().values())
        flags = [torch.isfinite(p).all() for p in tensors]
        return bool(torch.stack(flags).all()) if flags else True

    def state_dict(self) -> dict:
        """What a checkpoint needs to continue exactly: guide parameters, optimiser and schedule
        state, tau.

        Returns
        -------
        dict
            ``guide`` (``{name: tensor}`` of the guide's parameters), ``optimizer`` (AdamW's
            ``state_dict``), ``scheduler`` (the `LambdaLR`'s), ``tau`` (``[G]``); subclasses
            add their running statistics. The tensors are the live ones, not copies.
        """
        return {
            "guide": {name: p.detach() for name, p in self._named_tensors().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "tau": self.tau,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict` (possibly read back from JSON) after `setup`."""
        params = self._named_tensors()
        saved = state["guide"]
        shapes = {n: tuple(p.shape) for n, p in params.items()}
        saved_shapes = {n: tuple(t.shape) for n, t in saved.items()}
        if shapes != saved_shapes:
            raise ValueError(
                f"The checkpoint's guide parameters {saved_shapes} do not match this model's "
                f"{shapes}; resume with the model, data and settings of the interrupted run."
            )
        if "scheduler" not in state:
            raise ValueError(
                "The checkpoint holds no learning-rate schedule state (written by an older "
                "bora_pyro); start afresh with another checkpoint_dir."
            )
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])
        optim = state["optimizer"]
        self.optimizer.load_state_dict({
            "state": {int(k): v for k, v in optim["state"].items()},  # JSON made the keys strings
            "param_groups": [dict(g, betas=tuple(g["betas"])) for g in optim["param_groups"]],
        })
        self.scheduler.load_state_dict(dict(state["scheduler"]))
        self.tau = state["tau"].to(self.device, self.tau.dtype).clone()

    def _named_tensors(self) -> dict[str, torch.Tensor]:
        """The guide's parameters and tables by name."""
        return {**dict(self.guide.named_parameters()), **self._tables()}

    def snapshot(self) -> dict[str, torch.Tensor | None]:
        theta, theta_g = self.point()
        return {
            "task_adapters": theta.detach().float().cpu().clone(),
            "global_adapter": theta_g.detach().float().cpu().clone(),
            "tau": self.tau.detach().cpu().clone(),
            "task_scales": None,
        }


def _invalid_values(err: ValueError) -> bool:
    """Whether ``err`` is torch.distributions' argument validation finding NaN values (the
    message Pyro raises when a forward pass produced them)."""
    message = str(err)
    return message.startswith("Expected parameter") and "found invalid values" in message


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
    validate: Callable[[torch.Tensor], float | tuple[float, dict[str, float]]] | None = None,
    checkpointing: Checkpointing | None = None,
    on_step: Callable[[dict[str, float], int], None] | None = None,
) -> FitState:
    """Run ``stepper.steps`` optimiser steps of ``stepper`` on ``batches``, validating and keeping
    the best state; the settings come from ``stepper.train`` (a `TrainConfig`).

    ``validate(task_adapters [D, P]) -> NLL per token`` runs every ``train.eval_every`` steps
    (``None``: a tenth of the run) and at the end; the state with the lowest value is returned,
    and the run stops early after ``train.patience`` evaluations in a row that do not improve
    on the best one (``None``: never). ``validate`` may also return ``(nll, {task: nll})``, the
    NLL per token overall and per task; the overall value is the one compared.

    ``on_step(metrics, step)`` (e.g. `bora_pyro.tracking.Trackers.log_metrics`) is called for
    every step, in order, when its values are read (see below), so it adds no host
    synchronisation: ``loss``, ``train_nll``, ``lr``, ``step_seconds`` and ``tau/<group>``;
    after a validation also ``val_nll`` and ``val_perplexity``, and
    ``val_perplexity_per_task/<task>`` when ``validate`` gives per-task values. Non-finite
    values (a tau of ``inf``) are left out.

    Reads from the device: the steps leave their loss, gradient norm, NLL, scored-token count
    and tau on the compute device, and the loop reads them, for every step since the last
    read, in one transfer at the first step, every `READ_EVERY` steps, before each validation
    and checkpoint, and at the last step; the history holds every step's values. A non-finite
    loss or gradient stops the run at the next read with a `FloatingPointError` that names the
    first such step and its learning rate (the steps after it, up to the read, ran on
    non-finite values and are discarded). No checkpoint holds a non-finite state.

    With ``checkpointing`` (see `bora_pyro.inference.checkpoint`) the full state is written every
    ``checkpointing.every`` steps, at the last step and on early stopping; ``batches`` must then
    have ``state_dict`` / ``load_state_dict``. With ``checkpointing.resume`` the run continues
    after the resumed checkpoint's step, exactly as it would have without the interruption.
    """
    train, steps, model = stepper.train, stepper.steps, stepper.model
    eval_every = eval_interval(train, steps)
    if checkpointing is not None:
        checkpointing.start(batches)
    first = stepper.prepare(next(batches))
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
               desc=stepper.name, disable=not (train.progress and distributed.is_main()), dynamic_ncols=True)
    #: ``(step, lr, seconds, values on the device)`` of the steps not yet read
    pending: list[tuple[int, float, float, torch.Tensor]] = []

    def read() -> list[tuple[int, float, float, list[float]]]:
        """The pending steps with their values on the host (one transfer); raises for the
        first non-finite step."""
        rows = torch.stack([values for *_, values in pending]).tolist() if pending else []
        done = [(step, lr, seconds, row) for (step, lr, seconds, _), row in zip(pending, rows)]
        pending.clear()
        for step, lr, _, (loss, grad_norm, *_) in done:
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                bar.close()
                raise FloatingPointError(_divergence_message(stepper, step, loss, grad_norm, lr, checkpointing))
        return done

    def record(done, val_per_task: dict[str, float] | None = None) -> None:
        """Append read steps to the history and report them (``val_per_task``: the last one
        was just validated; its ``val_nll`` is already set)."""
        for k, (step, lr, seconds, (loss, _, nll, n_tokens, *tau)) in enumerate(done):
            last = k == len(done) - 1
            history["step"].append(step)
            history["loss"].append(loss / model.num_docs)
            history["train_nll"].append(nll / n_tokens if n_tokens else math.nan)
            history["tau"].append(tau)
            history["seconds"].append(seconds)
            history["val_nll"].append(math.nan)
            if on_step is not None and not (last and val_per_task is not None):
                on_step(_step_metrics(history, model.group_names, lr, {}), step)

    batch = first
    for step in bar:
        if step > start:
            batch = stepper.prepare(next(batches))
        started = time.perf_counter()
        loss = stepper.step(batch)
        head = _step_values(stepper, batch, loss)
        if stepper.sparse and stepper.reads_tables(step):  # apply LazyAdamW's write-back first
            stepper.optimizer.flush()
        failed = None
        try:
            stepper.after_step(step)  # e.g. the tau update's Monte-Carlo Fisher
        except (FloatingPointError, RuntimeError, ValueError) as err:
            failed = err
        tau = stepper.tau.detach().to(head.device, torch.float64).reshape(-1)
        if failed is not None:  # a non-finite step before it is the cause: report that one
            pending.append((step, stepper.last_lr, 0.0, torch.cat([head, tau])))
            read()
            if not isinstance(failed, FloatingPointError):
                raise failed
            bar.close()
            raise FloatingPointError(_divergence_message(
                stepper, step, math.nan, math.nan, stepper.last_lr, checkpointing, finite=True))
        pending.append((step, stepper.last_lr, time.perf_counter() - started, torch.cat([head, tau])))
        validating = validate is not None and ((step + 1) % eval_every == 0 or step == steps - 1)
        due = checkpointing is not None and checkpointing.due(step, steps, stopped_early)
        if not (validating or due or step == start or step == steps - 1 or (step + 1 - start) % READ_EVERY == 0):
            continue
        if stepper.sparse:  # validation, snapshots and checkpoints read the tables
            stepper.optimizer.flush()
        done = read()
        val, val_per_task = math.nan, {}
        record(done, val_per_task if validating else None)
        if validating:
            val = validate(stepper.point()[0])
            if isinstance(val, tuple):
                val, val_per_task = val
            val = float(val)
            history["val_nll"][-1] = val
            if val < best_value:
                best_value, best_state, best_step = val, stepper.snapshot(), step
                bad_evals = 0
            else:
                bad_evals += 1
                stopped_early = train.patience is not None and bad_evals >= train.patience
            if on_step is not None:
                on_step(_step_metrics(history, model.group_names, done[-1][1], val_per_task), step)
        postfix = {"nll/tok": f"{history['train_nll'][-1]:.3f}"}
        if best_state is not None:
            postfix["best val ppl"] = f"{math.exp(best_value):.2f}"
        if stepper.learn:
            postfix["tau"] = ",".join(f"{t:.3g}" for t in history["tau"][-1])
        bar.set_postfix(postfix, refresh=False)
        if checkpointing is not None and checkpointing.due(step, steps, stopped_early):
            if not stepper.is_finite():
                bar.close()
                raise FloatingPointError(_divergence_message(
                    stepper, step, math.nan, math.nan, stepper.last_lr, checkpointing, finite=True))
            if distributed.is_main():  # every rank holds the same state
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


def _step_values(stepper: Stepper, batch, loss) -> torch.Tensor:
    """``[4]`` float64 on the compute device: the step's loss, gradient norm, unscaled NLL of
    the batch and its scored tokens (summed over ranks under data parallelism), not read."""
    device, f64 = stepper.device, torch.float64
    nll = stepper.model.last_nll_tensor.to(device, f64)
    n_tokens = _scored_tokens(batch)
    n_tokens = torch.zeros((), dtype=f64, device=device) if n_tokens is None else n_tokens.to(device, f64)
    if distributed.active():  # the global batch's NLL per token
        nll, n_tokens = distributed.sum_over_ranks(torch.stack([nll, n_tokens])).unbind()
    return torch.stack([torch.as_tensor(loss, dtype=f64, device=device),
                        torch.as_tensor(stepper.last_grad_norm, dtype=f64, device=device), nll, n_tokens])


def _step_metrics(history: dict[str, list], groups: list[str], lr: float,
                  val_per_task: dict[str, float]) -> dict[str, float]:
    """The last step of ``history`` as ``{name: value}`` for `run_steps`' ``on_step``: finite
    values only, validation perplexities as ``exp(NLL per token)``."""
    metrics = {"loss": history["loss"][-1], "train_nll": history["train_nll"][-1], "lr": lr,
               "step_seconds": history["seconds"][-1]}
    metrics.update({f"tau/{g}": t for g, t in zip(groups, history["tau"][-1])})
    val = history["val_nll"][-1]
    if not math.isnan(val):
        perplexity = {"val_perplexity": val,
                      **{f"val_perplexity_per_task/{t}": v for t, v in val_per_task.items()}}
        metrics["val_nll"] = val
        metrics.update({k: math.exp(v) if v < 700 else math.inf for k, v in perplexity.items()})
    return {k: float(v) for k, v in metrics.items() if math.isfinite(v)}


def _divergence_message(stepper: Stepper, step: int, loss: float, grad_norm: float, lr: float,
                        checkpointing: Checkpointing | None, *, finite: bool = False) -> str:
    """What diverged at ``step`` (its ``loss`` and ``grad_norm``, or with ``finite`` the adapters
    after a step whose values were finite), at learning rate ``lr``, and what to try."""
    train = stepper.train
    what = (
        "the adapters are no longer finite" if finite
        else f"the loss is {loss}" if not math.isfinite(loss)
        else f"the gradient norm is {grad_norm}"
    )
    lower = f"lr_per_tau={train.lr_per_tau / 10:g}" if train.lr_per_tau is not None else f"lr={train.lr / 10:g}"
    warmup = max(1, stepper.steps // 10, 2 * train.warmup_steps)
    hints = [f"a lower learning rate (e.g. {lower})",
             f"{'a longer' if train.warmup_steps else 'a'} linear warm-up (e.g. warmup_steps={warmup})"]
    if stepper.amp_dtype is not None:
        hints.append("the base model in fp32 (autocast=None)")
    else:
        hints.append("a smaller alpha (the base model already runs in fp32)")
    message = (
        f"Training diverged at step {step} (0-based) of {stepper.steps}: {what}, at learning rate "
        f"{lr:.3g}. Try " + ", ".join(hints[:-1]) + f" or {hints[-1]}."
    )
    if checkpointing is not None:
        message += (
            f" The checkpoints in {str(checkpointing.directory)!r} hold only finite states; "
            f"resume={str(checkpointing.directory)!r} continues from the newest one."
        )
    return message


def _scored_tokens(batch) -> torch.Tensor | None:
    """Scored (predicted) tokens of ``batch``, a 0-dim tensor on its device (not read), or
    ``None`` for a batch without labels."""
    labels = getattr(batch, "labels", None)
    if labels is None:
        return None
    return (labels[:, 1:] != IGNORE_INDEX).sum()
