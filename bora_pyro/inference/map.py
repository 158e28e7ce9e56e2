"""MAP inference for BoRA: a point (delta) guide, Pyro's ELBO (for a point guide, the log joint)
and AdamW, with a learned precision set by the evidence fixed point (`precision`)."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Iterator

import pyro
import pyro.poutine as poutine
import torch
from torch import nn

from .. import checks, distributed
from ..config import PARAMETERIZATIONS, VALIDATION_TAU_INIT, TrainConfig
from ..data.batches import task_groups
from ..models.bora import SITE_GLOBAL, SITE_TASKS, BoraModel, TaskSubsample
from ..models.prior import PointMass
from .checkpoint import Checkpointing
from .elbo import SyncFreeTraceELBO
from .loop import FitState, Stepper, eval_interval, run_steps
from .curvature import FisherSampler, MonteCarloFisher
from .hyper import (
    PROBE_BETA, LogTauAdam, ShadowTrajectories, ValidationData, ValidationProbe, global_response, implicit_tau_gradient,
    shift_adam_moments,
)
from .precision import FisherEstimate, evidence_terms, evidence_update
from .rows import host_table

__all__ = ["MAPStepper", "PointGuide", "optimise_map", "resolve_tau_gradient", "resolve_tau_method", "CURVATURE_BUDGET"]

#: Name of the ``[D, P]`` table of task offsets (``parameterization="offset"``).
SITE_OFFSETS = "task_offsets"

#: Default share of a run's steps spent on the extra passes of ``tau_curvature="fisher"``.
CURVATURE_BUDGET = 0.15
#: Default updates per evaluation period of ``tau_method="validation"`` (each costs one forward
#: and backward pass on each of ``tau_val_batches`` validation minibatches):
#: ``tau_update_every = eval_every / 2.5``, so that
#: tau has moved before the evaluations that pick the kept state (docs/learned-precision.md,
#: section 8).
VALIDATION_UPDATES_PER_EVAL = 2.5
#: Entries per row block of the validation method's sum over every task with sparse steps
#: (`MAPStepper._response_blocks`): 2^22 float32 entries, 16 MiB per temporary.
RESPONSE_BLOCK = 1 << 22


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

    Sparse steps (``storage`` given, see docs/many-tasks.md): the ``[D, P]`` task parameter is
    not an ``nn.Parameter`` but a table in `tables` on the ``storage`` device, optimised by
    `rows.LazyAdamW`; a step gathers the rows of its K tasks into `gathered` (``[K, P]`` leaves
    on the compute device) and `forward` with a `TaskSubsample` samples only those tasks.
    """

    def __init__(self, model: BoraModel, init_global: torch.Tensor, parameterization: str = "offset", *,
                 storage: torch.device | None = None):
        super().__init__()
        checks.choice("parameterization", parameterization, PARAMETERIZATIONS)
        self.num_tasks = model.num_tasks
        init = init_global.detach().float()
        has_tasks, has_global = model.mode != "pooled", model.mode != "independent"
        offsets = has_tasks and has_global and parameterization == "offset"
        self.global_adapter = nn.Parameter(init.clone()) if has_global else None
        task_init = torch.zeros(model.num_tasks, init.shape[-1]) if offsets else init.expand(model.num_tasks, -1)
        #: ``{name: [D, P] table}`` of a sparse guide (plain tensors on the storage device).
        self.tables: dict[str, torch.Tensor] = {}
        #: ``{name: [K, P] leaf}``: the rows of the current step's tasks (set by the stepper).
        self.gathered: dict[str, torch.Tensor] = {}
        self.task_adapters = self.task_offsets = None
        self.task_name = SITE_OFFSETS if offsets else SITE_TASKS
        if has_tasks and storage is not None:
            self.tables[self.task_name] = host_table(task_init, storage, init.device)
        elif has_tasks:
            setattr(self, "task_offsets" if offsets else "task_adapters", nn.Parameter(task_init.clone()))
        self.offsets = offsets

    @property
    def task_parameter(self) -> torch.Tensor | None:
        """The ``[D, P]`` parameter (or table) whose gradient is the gradient in the task adapters."""
        if self.tables:
            return self.tables[self.task_name]
        return self.task_offsets if self.task_offsets is not None else self.task_adapters

    def values(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(task adapters [D, P] or None, global adapter [P] or None)``, differentiable (for a
        sparse guide, the table on its storage device, not differentiable)."""
        theta = self.task_parameter
        if self.offsets and theta is not None:
            theta = self.global_adapter.to(theta.device) + theta
        return theta, self.global_adapter

    def forward(self, batch, *, tau=None, tasks: TaskSubsample | None = None) -> dict[str, torch.Tensor]:
        theta_g = self.global_adapter
        out = {}
        if theta_g is not None:
            out[SITE_GLOBAL] = pyro.sample(SITE_GLOBAL, PointMass(theta_g))
        if self.task_parameter is None:
            return out
        if tasks is None:
            theta, _ = self.values()
            with pyro.plate("tasks", self.num_tasks, dim=-1):
                out[SITE_TASKS] = pyro.sample(SITE_TASKS, PointMass(theta))
            return out
        rows = self.gathered[self.task_name]
        theta = theta_g + rows if self.offsets else rows
        with pyro.plate("tasks", self.num_tasks, subsample=tasks.index, dim=-1), poutine.scale(scale=tasks.scale):
            out[SITE_TASKS] = pyro.sample(SITE_TASKS, PointMass(theta))
        return out


def resolve_tau_method(method: str, has_validation: bool) -> str:
    """The method ``tau_method`` names: ``"auto"`` is ``"validation"`` when the fit has
    validation documents and ``"evidence"`` otherwise; the others are themselves."""
    if method != "auto":
        return method
    return "validation" if has_validation else "evidence"


def resolve_tau_gradient(gradient: str, sparse: bool, parameterization: str) -> str:
    """The gradient ``tau_gradient`` names: ``"auto"`` is ``"trajectory"`` (the shadow fits of
    `hyper.ShadowTrajectories`) on dense steps with the offset parameterisation and
    ``"implicit"`` otherwise; ``"trajectory"`` where the shadows are not implemented raises."""
    shadows_fit = not sparse and parameterization == "offset"
    if gradient == "auto":
        return "trajectory" if shadows_fit else "implicit"
    if gradient == "trajectory" and not shadows_fit:
        raise ValueError(
            "tau_gradient='trajectory' is implemented for dense steps with the offset "
            "parameterisation; pass task_step='dense' and parameterization='offset', or "
            "tau_gradient='implicit'."
        )
    return gradient


class MAPStepper(Stepper):
    r"""MAP steps; with a learned tau, updates of tau by ``train.tau_method``
    (`resolve_tau_method`: ``"auto"``, the default, is the validation method when there are
    validation documents, else the evidence).

    ``"validation"``
        Every ``tau_update_every`` steps after ``tau_warmup`` (default: tied to the
        evaluations, `VALIDATION_UPDATES_PER_EVAL` = 2.5 per ``eval_every`` steps, the first
        after the first evaluation or a fifth of the run, whichever comes first; with the
        ``cpu`` sweep's evaluations every 25 steps, every 10 steps after 25), one forward and
        backward pass on each of ``train.tau_val_batches`` validation minibatches gives each
        present task's validation gradient and curvature (`hyper.ValidationProbe`), and log tau
        takes one Adam step (``train.tau_lr``) down the gradient of the validation NLL,
        averaged over the minibatches: with ``train.tau_gradient="trajectory"`` (what
        ``"auto"`` picks with dense steps and the offset parameterisation) the validation
        gradient times the response of two shadow fits at ``tau * 1.2`` and ``tau / 1.2``
        (`hyper.ShadowTrajectories`, stepped in `after_backward` with each step's gradients,
        ``O(D P)`` per step), else the implicit gradient (`hyper.implicit_tau_gradient`). Each
        update appends ``{"step", "tau", "grad"}`` (``grad = dV / d log tau`` per group) to
        `tau_updates`, with the trajectory gradient also ``"grad_implicit"`` (the implicit one
        at the same state, for comparison).
        Cost: ``tau_val_batches`` passes without optimiser step per ``eval_every / 2.5`` steps
        (one pass per ten steps at the ``cpu`` sweep's schedule and the default 1). With
        sparse steps each pass runs on the K rows of its minibatch's tasks and the ``[D, P]``
        work (once per update) stays with the tables
        (`_sparse_validation_gradient`). Updates spread over the whole run (15 per
        ``max_steps``) came after the kept state of runs that stop early, and tau was still
        rising there (docs/learned-precision.md, sections 7 and 8). The implicit gradient
        assumes a converged MAP; on short runs it can favour too little pooling (section 4).
    ``"evidence"``
        The Laplace evidence fixed point (`precision.evidence_update`), described below.

    The curvature ``h`` of each evidence update (``train.tau_curvature``):

    ``"fisher"`` (default)
        The diagonal true Fisher at the current adapters, estimated afresh for each update by
        `curvature.MonteCarloFisher` (accumulators reset after every update): on the minibatch
        of each of the last ``M`` steps before the update (``train.tau_curvature_batches``,
        default: as many as add up to `CURVATURE_BUDGET` = 15% of the run's steps over all
        updates, at least 1; at most ``tau_update_every``), after its optimiser step, one extra forward and backward pass with
        the scored tokens replaced by draws from the model (``fisher_sampler``). A task without
        a document in those ``M`` minibatches gets ``N_d`` times the average per-document
        Fisher of the documents seen (`MonteCarloFisher.curvature` with ``fill_unseen``). The
        draws come from the stepper's own generator (seeded by ``train.seed``, in
        `state_dict`), so a resumed run draws what an uninterrupted one would.
    ``"empirical"``
        The running empirical Fisher of the minibatch gradients (`precision.FisherEstimate`, no
        extra pass). On a tiny LM it errs by large factors that differ between tasks: its moving
        averages remember the larger gradients of earlier steps, and the empirical Fisher is
        biased away from the optimum (docs/learned-precision.md).

    Each evidence update appends ``{"step", "tau", "gamma", "S"}`` (the step after which it ran, the new
    ``[G]`` precisions, and ``gamma`` and ``S`` per group at the previous ones, see
    `precision.evidence_terms`) to `tau_updates`, which `optimise_map` returns as
    ``history["tau_update"]``.

    Cost of ``"fisher"``: ``M`` forward and backward passes (no optimiser step, no prior, no
    AdamW) per update. With the default schedule (20 updates per run after a fifth of it,
    i.e. 16 updates) and the default ``M``, at most 15% of the run's steps in extra passes
    (``M = max(1, floor(0.15 steps / 16))``): 16% for runs under 107 steps (``M = 1``),
    e.g. 16 passes in the 100 steps of the ``cpu`` sweep configuration, and 14-15% for runs
    of 500 steps and more.

    Parameters
    ----------
    model
        The `BoraModel`.
    train
        The `TrainConfig`; besides what `Stepper` reads: ``parameterization`` (what the
        optimiser moves, see `PointGuide`), ``batch_size`` (the empirical estimate's scale is
        ``batch_size / model.num_docs``), ``tau_update_every`` and ``tau_warmup`` (steps between
        updates of a learned tau and steps before the first one; defaults: above for the
        validation method; for the evidence 20 updates per run after a fifth of it, since at
        the standard initialisation ``B = 0`` every curvature of the A entries is exactly
        zero), ``tau_method``, ``tau_lr``, ``tau_curvature`` and ``tau_curvature_batches``.
    init_global
        ``[P]`` initial global adapter; every task adapter starts there.
    fisher_sampler
        Sampled-observation gradients and document counts (`curvature.FisherSampler`), needed
        with a learned tau and ``tau_curvature="fisher"``.
    """

    name = "BoRA MAP"

    def __init__(
        self, model: BoraModel, train: TrainConfig, *, init_global: torch.Tensor,
        fisher_sampler: FisherSampler | None = None,
        validation: ValidationData | None = None,
    ):
        super().__init__(model, SyncFreeTraceELBO(), train)
        self.parameterization = train.parameterization
        self.init_global = init_global.to(self.device)
        self.tau_method = resolve_tau_method(train.tau_method, validation is not None)
        by_validation = self.tau_method == "validation"
        if by_validation:
            eval_every = eval_interval(train, self.steps)
            every = max(1, round(eval_every / VALIDATION_UPDATES_PER_EVAL))
            warmup = min(eval_every, self.steps // 5)
        else:
            every, warmup = max(1, self.steps // 20), self.steps // 5
        self.tau_update_every = train.tau_update_every if train.tau_update_every is not None else every
        self.tau_warmup = train.tau_warmup if train.tau_warmup is not None else warmup
        self.curvature_kind = train.tau_curvature
        self.fisher, self.mc_fisher, self.generator = None, None, None
        self.fisher_sampler = fisher_sampler
        self.probe, self.validation_batches, self.log_tau = None, None, None
        #: Where the ``[D, P]`` curvature accumulators live and the tau updates' ``[D, P]`` work
        #: runs: with the tables (host memory with ``adapter_storage="host"``), so that device
        #: bytes do not grow with D.
        self.table_device = self.storage if self.storage is not None else self.device
        if self.learn and train.tau_shift_moments and self.sparse:
            raise ValueError(
                "tau_shift_moments=True is implemented for dense steps only (sparse steps scale the "
                "prior of each step's tasks, and keep their moments per row); pass task_step='dense', "
                "or tau_shift_moments=False."
            )
        if self.learn and by_validation:
            if validation is None:
                raise ValueError(
                    "tau_method='validation' needs validation "
                    "documents; keep a validation split (validation_size > 0, the default 0.1), "
                    "or pass tau_method='evidence' (the Laplace evidence, no "
                    "validation data)."
                )
            #: validation minibatches per update; the probe's running curvature decays per
            #: minibatch, so its memory is kept at about the last 3 updates' minibatches.
            self.val_batches = train.tau_val_batches
            self.probe = ValidationProbe(
                validation.gradients, validation.docs_per_task, model.num_params,
                beta=PROBE_BETA ** (1.0 / self.val_batches), device=self.table_device,
            )
            self.validation_batches = validation.batches
            if model.config.tau_init is None:  # the validation method's own start (config.VALIDATION_TAU_INIT)
                self.tau = torch.full_like(self.tau, VALIDATION_TAU_INIT)
            self.log_tau = LogTauAdam(self.tau, lr=train.tau_lr, gate=train.tau_gate)
        #: ``tau_gradient="trajectory"``: the shadow fits (created at the first step).
        self.shadows = None
        self.by_trajectory = self.learn and by_validation and resolve_tau_gradient(
            train.tau_gradient, self.sparse, train.parameterization) == "trajectory"
        updates = max(0, self.steps - self.tau_warmup) // self.tau_update_every
        batches = train.tau_curvature_batches
        if batches is None:
            batches = max(1, int(CURVATURE_BUDGET * self.steps / max(1, updates)))
        self.curvature_batches = min(batches, self.tau_update_every)
        if not self.learn or by_validation:
            pass
        elif self.curvature_kind == "empirical":
            self.fisher = FisherEstimate(
                (model.num_tasks, model.num_params), batch_fraction=train.batch_size / model.num_docs,
                device=self.table_device,
            )
        else:
            if fisher_sampler is None:
                raise ValueError(
                    "tau_curvature='fisher' (the default with tau='learn') needs a fisher_sampler "
                    "(sampled-observation gradients, e.g. curvature.FisherSampler.for_lm(lm, "
                    "docs_per_task)); pass one, or tau_curvature='empirical'."
                )
            self.mc_fisher = MonteCarloFisher(
                fisher_sampler.docs_per_task, model.num_params, beta=1.0, device=self.table_device
            )
            self.generator = torch.Generator(self.device).manual_seed(train.seed)
        #: One record per evidence update (see the class docstring).
        self.tau_updates: list[dict] = []
        self._task_param = None
        self._batch = None
        self._curvature, self._curvature_at = None, -1
        #: ``(tau, tau[group_index])`` on the compute device, for the shadows' steps
        self._tau_p = (None, None)

    def build_guide(self):
        return PointGuide(self.model, self.init_global, self.parameterization, storage=self.storage)

    def param_groups(self):
        groups = super().param_groups()
        for g in groups:
            g["name"] = SITE_TASKS if g["params"][0] is self.guide.task_parameter else SITE_GLOBAL
        self._task_param = self.guide.task_parameter
        return groups

    def step(self, batch) -> float:
        self._batch = batch
        return super().step(batch)

    def after_backward(self) -> None:
        if self.by_trajectory:
            self._step_shadows()
        if self.fisher is None or self._task_param is None:
            return
        if self.sparse:  # the gathered rows' gradient, zero for the absent tasks (O(D P), with the tables)
            leaf = self.guide.gathered.get(self.guide.task_name)
            if leaf is not None and leaf.grad is not None:
                grad = torch.zeros(self._task_param.shape, device=self.table_device)
                index = self.task_subsample(self._batch).host_index.to(self.table_device)
                self.fisher.update(grad.index_copy_(0, index, leaf.grad.to(self.table_device)))
        elif self._task_param.grad is not None:
            self.fisher.update(self._task_param.grad)

    def _step_shadows(self) -> None:
        """Step the shadow fits of ``tau_gradient="trajectory"`` with this step's gradients, before
        the run's own step (`hyper.ShadowTrajectories`)."""
        offsets, theta_g = self.guide.task_offsets, self.guide.global_adapter
        if offsets.grad is None or theta_g.grad is None:
            return
        if self.shadows is None:
            self.shadows = ShadowTrajectories(offsets, theta_g)
        if self.probe.count == 0:  # a first curvature before the first update
            theta, _ = self.point()
            with self.amp():
                self.probe(theta, next(self.validation_batches).to(self.device))
        if self._curvature_at != self.probe.count:
            self._curvature, self._curvature_at = self.probe.curvature().to(self.device), self.probe.count
        settings = {}
        for g in self.optimizer.param_groups:  # read every step: the schedule moves the learning rates
            for p in g["params"]:
                if p is offsets or p is theta_g:
                    settings[id(p)] = {"lr": g["lr"], "betas": g["betas"], "eps": g["eps"],
                                       "weight_decay": g["weight_decay"]}
        if self._tau_p[0] is not self.tau:  # per-entry precisions, rebuilt only when tau changes
            self._tau_p = (self.tau, self.tau.to(self.device)[self.model.group_index.to(self.device)])
        self.shadows.step(offsets.grad, theta_g.grad, offsets.detach(), theta_g.detach(), self._tau_p[1],
                          self._curvature, task_opt=settings[id(offsets)], global_opt=settings[id(theta_g)])

    def _is_update(self, done: int) -> bool:
        """Whether an evidence update runs after ``done`` completed steps."""
        return done > self.tau_warmup and (done - self.tau_warmup) % self.tau_update_every == 0

    def reads_tables(self, step: int) -> bool:
        """Only the tau updates read the tables (`point`); the curvature passes read the step's rows."""
        return self.learn and self._is_update(step + 1)

    def after_step(self, step: int) -> None:
        if not self.learn:
            return
        done = step + 1
        if self.probe is not None:
            if self._is_update(done):
                self._validation_update(step)
            return
        if self.mc_fisher is not None and any(
            self._is_update(done + k) for k in range(self.curvature_batches)
        ):
            adapters, batch = self._sampler_inputs(self._batch)
            with self.amp():
                grad = self.fisher_sampler.sampled_gradients(
                    adapters, batch, distributed.rank_generator(self.generator))
            # data parallel: every rank adds the documents of every rank's slice
            self.mc_fisher.add(*distributed.gather_rows(grad.square(), self._batch.task_ids))
        if self._is_update(done):
            self._evidence_update(step)

    def _sampler_inputs(self, batch) -> tuple[torch.Tensor, object]:
        """``(adapters, batch)`` for the Fisher sampler after this step's update: dense, the
        ``[D, P]`` point and ``batch``; sparse, the ``[K, P]`` rows of the batch's K tasks as
        this step left them (the gathered leaves, updated in place by `LazyAdamW`, on the
        compute device: the tables are not read) and ``batch`` with its task ids replaced by
        their positions among the K (``TaskSubsample.local``). The rows equal the table's rows
        (the same float32 values), so both give the same gradients."""
        if not self.sparse:
            return self.point()[0], batch
        rows = self.guide.gathered[self.guide.task_name].detach()
        if self.guide.offsets:
            rows = self.guide.global_adapter.detach() + rows
        groups = getattr(batch, "groups", None)
        extra = {} if groups is None else {"groups": groups.as_rows()}
        return rows.float(), replace(batch, task_ids=self.task_subsample(batch).local, **extra)

    def _evidence_update(self, step: int) -> None:
        """One evidence fixed-point step of tau, computed where the tables live (`table_device`:
        with host storage every ``[D, P]`` temporary is in host memory)."""
        theta, theta_g = self.point()
        if self.mc_fisher is not None:
            h = self.mc_fisher.curvature(fill_unseen=True)
            self.mc_fisher.reset()
        else:
            h = self.fisher.curvature()
        at = theta.device
        theta_g, h, tau, groups = theta_g.to(at), h.to(at), self.tau.to(at), self.model.group_index.to(at)
        gamma, S = evidence_terms(theta, theta_g, h, tau, groups)
        old = self.tau
        self.tau = evidence_update(theta, theta_g, h, tau, groups, prior=self.model.config.tau_prior).to(self.device)
        self._shift_moments(old)
        self.tau_updates.append({
                "step": step, "tau": self.tau.tolist(), "gamma": gamma.tolist(), "S": S.tolist(),
            })

    def _validation_update(self, step: int) -> None:
        """One Adam step of log tau down the implicit validation gradient (`hyper`), averaged
        over ``train.tau_val_batches`` validation minibatches.

        The probe runs on every minibatch first (adding their squared gradients to the running
        curvature), then the implicit gradient of each minibatch's NLL is taken with the
        curvature they leave, and the ``[G]`` gradients are averaged. Dense steps: on the
        ``[D, P]`` point (on the compute device, where the dense step keeps it), the minibatches'
        validation gradients summed first (the implicit gradient is linear in them). Sparse
        steps (`_sparse_validation_gradient`): on the K rows of each minibatch's tasks, with the
        ``[D, P]`` work (``dTheta/dtau``, once per update) where the tables live."""
        batches = [next(self.validation_batches) for _ in range(self.val_batches)]
        if self.sparse:
            grad = self._sparse_validation_gradient(batches)
        else:
            theta, theta_g = self.point()
            val_grad = None
            for batch in batches:
                with self.amp():
                    part = self.probe(theta, batch.to(self.device))
                val_grad = part if val_grad is None else val_grad.add_(part)
            grad = implicit_tau_gradient(
                theta - theta_g, self.probe.curvature(), self.tau, self.model.group_index,
                val_grad / len(batches))
            if self.shadows is not None:
                implicit = grad
                grad = self.shadows.gradient(val_grad / len(batches), self.model.group_index.to(self.device),
                                             self.tau.shape[0])
        old = self.tau
        self.tau = self.log_tau.step(grad).to(self.device, self.tau.dtype)
        self._shift_moments(old)
        record = {"step": step, "tau": self.tau.tolist(), "grad": grad.tolist()}
        if self.log_tau.gate > 0:
            record["gate"] = self.log_tau.last_gate.tolist()
        if self.shadows is not None:
            record["grad_implicit"] = implicit.tolist()
        self.tau_updates.append(record)

    @torch.no_grad()
    def _shift_moments(self, old_tau: torch.Tensor) -> None:
        """With ``train.tau_shift_moments``: AdamW's moments of the task parameter (and, with
        the centered parameterisation, of ``Theta``) moved to the prior's gradient at the new
        tau (`hyper.shift_adam_moments`). Dense steps only (checked in ``__init__``)."""
        if not self.train.tau_shift_moments:
            return
        change = (self.tau - old_tau.to(self.tau.device, self.tau.dtype))[self.model.group_index.to(self.device)]
        param = self.guide.task_parameter
        state = self.optimizer.state.get(param)
        if not state or not bool((change != 0).any()):
            return
        betas = next(g["betas"] for g in self.optimizer.param_groups if any(p is param for p in g["params"]))
        theta_g = self.guide.global_adapter
        offsets = param.detach() if self.guide.offsets or theta_g is None else param.detach() - theta_g.detach()
        delta = change * offsets  # d/d(theta_d) of (tau / 2) |theta_d - Theta|^2 changes by this
        shift_adam_moments(state["exp_avg"], state["exp_avg_sq"], state["step"], delta, betas)
        if not self.guide.offsets and theta_g is not None and self.optimizer.state.get(theta_g):
            g_state = self.optimizer.state[theta_g]
            shift_adam_moments(g_state["exp_avg"].view(1, -1), g_state["exp_avg_sq"].view(1, -1), g_state["step"],
                               -delta.sum(0, keepdim=True), betas)

    def _sparse_validation_gradient(self, batches) -> torch.Tensor:
        """``[G]`` ``dV / d log tau`` from the K tasks of each validation minibatch of
        ``batches`` (on the host), exact (`hyper` module docstring, "Which rows it needs"),
        averaged over the minibatches.

        For each minibatch the K rows are gathered from the tables to the compute device (as
        `_sampler_inputs` does for a training batch, the batch's task ids replaced by their
        positions among the K, `TaskGroups`); the probe's pass runs on them and adds its ``[B, P]``
        squared gradients to its sums, which live with the tables. ``dTheta/dtau``, the one term
        over every task, is summed once, after the passes, where the tables live in blocks of
        `RESPONSE_BLOCK` entries (`_response_blocks`). Only ``[K, P]`` rows and ``[P]`` / ``[G]``
        vectors go to the compute device: no ``[D, ...]`` tensor is created there.
        """
        table = self.guide.tables[self.guide.task_name]
        at = table.device
        theta_g = self.guide.global_adapter.detach()
        passes = []
        for batch in batches:
            groups = getattr(batch, "groups", None)
            if groups is None:
                groups = task_groups(batch.task_ids)
            stored = table.index_select(0, groups.tasks.to(at)).to(self.device)  # [K, P]
            offsets = stored if self.guide.offsets else stored - theta_g
            rows = theta_g + stored if self.guide.offsets else stored
            extra = {} if getattr(batch, "groups", None) is None else {"groups": groups.as_rows()}
            local = replace(batch, task_ids=groups.local, **extra).to(self.device)
            with self.amp():
                val_grad = self.probe(rows.float(), local, task_ids=groups.tasks[groups.local])  # [K, P]
            passes.append((groups.tasks, offsets, val_grad))
        d_global = global_response(
            self._response_blocks(), self.tau.to(at), self.model.group_index.to(at)).to(self.device)
        grad = None
        for tasks, offsets, val_grad in passes:
            h = self.probe.curvature(tasks.to(at)).to(self.device)
            part = implicit_tau_gradient(offsets, h, self.tau, self.model.group_index, val_grad, d_global=d_global)
            grad = part if grad is None else grad + part
        return grad / len(passes)

    def _response_blocks(self):
        """``(offsets [b, P], curvature [b, P])`` of every task, in blocks of rows of at most
        `RESPONSE_BLOCK` entries, on the tables' device (`hyper.global_response`)."""
        table = self.guide.tables[self.guide.task_name]
        theta_g = self.guide.global_adapter.detach().to(table.device)
        size = max(1, RESPONSE_BLOCK // table.shape[1])
        for start in range(0, table.shape[0], size):
            block = slice(start, start + size)
            yield (table[block] if self.guide.offsets else table[block] - theta_g), self.probe.curvature(block)

    def state_dict(self) -> dict:
        """`Stepper.state_dict` plus, with a learned tau, ``tau_updates`` and the method's
        state: for ``tau_method="validation"`` ``probe`` (the running curvature), ``log_tau``
        (Adam's state) and ``validation_batches`` (where the validation minibatches are); for
        the evidence, the curvature's state: ``fisher`` (``mean``, ``sq``, ``count``) or
        ``mc_fisher`` (``sq``, ``seen``, ``count``) and ``generator`` (the label draws'
        generator state); with ``tau_gradient="trajectory"`` ``shadows``
        (`hyper.ShadowTrajectories`)."""
        state = super().state_dict()
        if self.probe is not None:
            state["probe"] = self.probe.state_dict()
            state["log_tau"] = self.log_tau.state_dict()
            state["validation_batches"] = self.validation_batches.state_dict()
        if self.fisher is not None:
            state["fisher"] = {"mean": self.fisher.mean, "sq": self.fisher.sq, "count": self.fisher.count}
        if self.mc_fisher is not None:
            state["mc_fisher"] = self.mc_fisher.state_dict()
            state["generator"] = self.generator.get_state()
        if self.shadows is not None:
            state["shadows"] = self.shadows.state_dict()
        if self.learn:
            state["tau_updates"] = [dict(r) for r in self.tau_updates]
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict` after `setup`."""
        super().load_state_dict(state)
        if self.probe is not None:
            self.probe.load_state_dict(state["probe"])
            self.log_tau.load_state_dict(state["log_tau"])
            self.validation_batches.load_state_dict(state["validation_batches"])
        if self.fisher is not None:
            self.fisher.mean.copy_(state["fisher"]["mean"])
            self.fisher.sq.copy_(state["fisher"]["sq"])
            self.fisher.count = int(state["fisher"]["count"])
        if self.mc_fisher is not None:
            self.mc_fisher.load_state_dict(state["mc_fisher"])
            self.generator.set_state(state["generator"].cpu())
        if state.get("shadows") is not None:
            self.shadows = ShadowTrajectories(self.guide.task_offsets, self.guide.global_adapter)
            self.shadows.load_state_dict(state["shadows"])
        if self.learn:
            self.tau_updates = [dict(r) for r in state["tau_updates"]]

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
    train: TrainConfig,
    *,
    init_global: torch.Tensor,
    validate: Callable[[torch.Tensor], float] | None = None,
    checkpointing: Checkpointing | None = None,
    on_step: Callable[[dict[str, float], int], None] | None = None,
    fisher_sampler: FisherSampler | None = None,
    validation: ValidationData | None = None,
) -> FitState:
    """Maximise the posterior density of the adapters (and, if learned, the evidence for tau).

    Parameters
    ----------
    model
        The `BoraModel`.
    batches
        An endless iterator of training minibatches (``.to(device)``, ``task_ids``, ``doc_index``)
        of ``train.batch_size`` documents.
    train
        Every training setting (`TrainConfig`: length, AdamW and its schedule, validation,
        early stopping, the tau updates, parameterization, device, autocast); see `MAPStepper`
        and `run_steps`. Keep ``weight_decay=0`` for a true MAP (the prior is the regulariser).
    init_global
        ``[P]`` initial global adapter; every task adapter starts there.
    validate
        ``validate(task_adapters) -> validation NLL per token``, run every ``train.eval_every``
        steps and at the end; the best state is kept.
    checkpointing
        Periodic checkpoints and the one to resume from (see `run_steps`).
    on_step
        ``on_step(metrics, step)`` after every step (see `run_steps`; e.g. experiment trackers).
    fisher_sampler
        With a learned tau, ``train.tau_method="evidence"`` and ``train.tau_curvature="fisher"``:
        how to draw observations from the model (`curvature.FisherSampler`; `fit_map` passes the LM's).
    validation
        With a learned tau and ``train.tau_method="validation"``: the validation minibatches
        and the model's logits function (`hyper.ValidationData`; `fit_map` builds it).

    Returns
    -------
    `FitState`; with a learned tau its ``history["tau_update"]`` lists the evidence updates
    (`MAPStepper`).
    """
    stepper = MAPStepper(
        model, train, init_global=init_global, fisher_sampler=fisher_sampler, validation=validation
    )
    state = run_steps(stepper, batches, validate=validate, checkpointing=checkpointing, on_step=on_step)
    if stepper.learn:
        state.history["tau_update"] = stepper.tau_updates
    return state
