r"""Stochastic variational inference for BoRA: a mean-field Normal guide over the task adapters,
the global adapter as a point (type-II maximum likelihood), tau by variational EM.

The guide is ``q(theta_d) = Normal(mu_d, sigma_d)`` with one location and one scale per entry of
the flat ``[D, P]`` layout (``sigma = exp(log_sigma)``), ``Theta`` a point estimate. The ELBO

    E_q[ sum_n log p_LM(doc_n | theta) ] - sum_d KL(q(theta_d) || Normal(Theta, tau^-1))

is estimated on minibatches (the likelihood scaled by N / B through the subsampled documents
plate) with the KL term analytic (`pyro.infer.TraceMeanField_ELBO`). A learned tau is set by
the closed-form maximiser of the ELBO in tau given ``q`` (the M-step of variational EM), per
precision group g (see `variational_em_tau`)::

    tau_g = ((D - 1) P_g + 2 (a - 1)) / (E_q[S_g] + 2 b),
    E_q[S_g] = sum_d sum_{i in g} (mu_di - Theta_i)^2 + sigma_di^2

which accounts for posterior uncertainty through ``sigma`` and so does not collapse to pooling.
``(D - 1) P_g`` rather than ``D P_g``: ``Theta`` has a flat prior, and its own variational
factor ``Normal(Theta_i, v_i)`` at its optimum ``v_i = 1 / (D tau_g)`` adds ``D P_g v_i`` to
``E_q[S_g]`` and ``-P_g log(tau_g) / 2`` to its entropy, which is ``D P_g`` degrees of freedom
less ``P_g`` (as in REML). The guide keeps ``Theta``'s mean only: its variance would change
no location and no scale, only tau.

Where the scales start and how they move. AdamW moves every parameter by about its learning rate
per step whatever the gradient's size, so with ``log_sigma`` as the parameter a step changes
sigma by a *relative* amount, the same at sigma = 1e-3 and at 1, and the scales get their own
learning rate (``TrainConfig.scale_lr``): at the locations' rate (2e-3 on the default data) a
sd would need thousands of steps to grow by the factor 10-100 between a guessed ``init_scale``
and the posterior's. Started from a MAP fit, the scales start at the Laplace diagonal instead
(`laplace_scales`)::

    sigma_di = 1 / sqrt(h_di + tau_g(i))

with ``h`` the diagonal true Fisher of task ``d``'s negative log-likelihood at the MAP adapters
(`bora_pyro.inference.curvature.MonteCarloFisher`) and ``tau`` the MAP's precision: the
mean-field ELBO's optimum for a locally Gaussian posterior, ``1 / sigma_di^2 = E_q[H_di] + tau``
with the Fisher in place of the Hessian.

In the limits the guide follows the model: with tau = 0 there is no global adapter, with
tau = inf no task adapters and the mean-field Normal is over the one shared adapter.
"""

from __future__ import annotations

from typing import Callable, Iterator

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from torch import nn

from ..config import TrainConfig
from ..models.bora import SITE_GLOBAL, SITE_TASKS, BoraModel, TaskSubsample
from ..models.prior import PointMass
from .checkpoint import Checkpointing
from .elbo import SyncFreeMeanFieldELBO
from .loop import FitState, Stepper, run_steps
from .rows import host_table

__all__ = [
    "LazyMovingAverage", "MeanFieldGuide", "SVIStepper", "laplace_scales", "optimise_svi", "tau_from_expected_squares",
    "variational_em_tau",
]

#: In the independent limit (tau = 0) an entry without curvature has no finite Laplace sd; its
#: precision is floored at this fraction of the median precision of its group (sd <= 10x the
#: group's median sd).
INDEPENDENT_PRECISION_FLOOR = 1e-2


class MeanFieldGuide(nn.Module):
    """``q(theta_d) = prod_i Normal(mu_di, exp(log_sigma_di))``, ``Theta`` a point (delta).

    Parameters
    ----------
    model
        The `BoraModel` (its tau mode decides which sites exist).
    init_tasks
        ``[D, P]`` initial locations of the task adapters.
    init_global
        ``[P]`` initial global adapter.
    init_scale
        Initial posterior standard deviation: one number for every entry, or a tensor of the
        locations' shape (``[D, P]``; ``[P]`` in the pooled limit), e.g. `laplace_scales`.
    storage
        Sparse steps (docs/many-tasks.md): ``loc`` and ``log_scale`` are ``[D, P]`` tables on
        this device (plain tensors in `tables`, optimised by `rows.LazyAdamW`), and `forward`
        with a `TaskSubsample` draws and scores only the rows in `gathered`. ``None``: they
        are ``nn.Parameter``.
    """

    def __init__(
        self, model: BoraModel, init_tasks: torch.Tensor, init_global: torch.Tensor, *,
        init_scale: float | torch.Tensor = 1e-3, storage: torch.device | None = None,
    ):
        super().__init__()
        self.mode = model.mode
        self.num_tasks = model.num_tasks
        loc = (init_global if self.mode == "pooled" else init_tasks).detach().clone().float()
        scale = torch.as_tensor(init_scale, dtype=torch.float32, device=loc.device)
        if scale.dim() and scale.shape != loc.shape:
            raise ValueError(
                f"init_scale has shape {tuple(scale.shape)}; give one number or a tensor of the "
                f"locations' shape {tuple(loc.shape)}."
            )
        if not bool(torch.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError("init_scale must be finite and > 0 everywhere.")
        log_scale = scale.log().expand_as(loc)
        #: ``{name: [D, P] table}`` of a sparse guide; ``{name: [K, P] leaf}`` of the current step.
        self.tables: dict[str, torch.Tensor] = {}
        self.gathered: dict[str, torch.Tensor] = {}
        if storage is not None and self.mode != "pooled":
            self.tables = {"loc": host_table(loc, storage, loc.device),
                           "log_scale": host_table(log_scale, storage, loc.device)}
            self.loc, self.log_scale = self.tables["loc"], self.tables["log_scale"]
        else:
            self.loc = nn.Parameter(loc)
            self.log_scale = nn.Parameter(log_scale.clone())
        self.global_loc = (
            nn.Parameter(init_global.detach().clone().float()) if self.mode in ("fixed", "learn") else None
        )

    @property
    def scale(self) -> torch.Tensor:
        """Posterior standard deviations, same shape as ``loc``."""
        return self.log_scale.exp()

    def _normal(self) -> dist.Distribution:
        # no argument validation: it would be two more passes over the [D, P] parameters
        return dist.Normal(self.loc, self.scale, validate_args=False).to_event(1)

    def forward(self, batch, *, tau=None, tasks: TaskSubsample | None = None):
        if self.mode == "pooled":
            return {SITE_GLOBAL: pyro.sample(SITE_GLOBAL, self._normal())}
        out = {}
        if self.global_loc is not None:
            out[SITE_GLOBAL] = pyro.sample(SITE_GLOBAL, PointMass(self.global_loc))
        if tasks is None:
            with pyro.plate("tasks", self.num_tasks, dim=-1):
                out[SITE_TASKS] = pyro.sample(SITE_TASKS, self._normal())
            return out
        loc, log_scale = self.gathered["loc"], self.gathered["log_scale"]
        rows = dist.Normal(loc, log_scale.exp(), validate_args=False).to_event(1)
        with pyro.plate("tasks", self.num_tasks, subsample=tasks.index, dim=-1), poutine.scale(scale=tasks.scale):
            out[SITE_TASKS] = pyro.sample(SITE_TASKS, rows)
        return out


class SVIStepper(Stepper):
    """SVI steps with the `MeanFieldGuide`; with a learned tau, variational-EM updates.

    Parameters
    ----------
    model
        The `BoraModel`.
    train
        The `TrainConfig`; besides what `Stepper` reads: ``num_particles`` (Monte Carlo draws
        per step), ``init_scale`` (initial posterior sd of every entry, or ``"laplace"``: from
        ``curvature``), ``scale_lr`` (learning rate of the log-scales), ``tau_update_every``
        and ``tau_warmup`` (steps between variational-EM updates of a learned tau, default
        every step, and steps before the first: default none when the locations start from
        ``init_tasks`` and the scales from the Laplace diagonal, else a fifth of the run, for
        the scales to grow from a guessed number before tau reads them).
        With sparse steps the moving averages that the M-step reads follow only the rows of
        each step's tasks (`LazyMovingAverage`, ``lazy_average``), so a learned tau costs
        ``O(K P)`` per step, not ``O(D P)``.
    init_global
        ``[P]`` initial global adapter.
    init_tasks
        ``[D, P]`` initial locations of the task adapters (e.g. a MAP fit's); default
        ``init_global`` for every task.
    init_tau
        ``[G]`` starting value of a learned tau (default ``config.tau_init``).
    curvature
        ``[D, P]`` diagonal curvature ``h`` of each task's negative log-likelihood at the
        starting locations (e.g. `curvature.MonteCarloFisher`); needed by, and only used with,
        ``init_scale="laplace"`` (see `laplace_scales`).
    """

    name = "BoRA SVI"
    tables_per_task = 2

    def __init__(
        self,
        model: BoraModel,
        train: TrainConfig,
        *,
        init_global: torch.Tensor,
        init_tasks: torch.Tensor | None = None,
        init_tau: torch.Tensor | None = None,
        curvature: torch.Tensor | None = None,
    ):
        super().__init__(model, SyncFreeMeanFieldELBO(num_particles=train.num_particles), train)
        self.init_global = init_global.to(self.device)
        self.init_tasks = (
            init_global.expand(model.num_tasks, -1) if init_tasks is None else init_tasks
        ).to(self.device)
        if init_tau is not None and self.learn:
            self.tau = init_tau.to(self.device, self.tau.dtype).clone()
        laplace = train.init_scale == "laplace"
        if laplace:
            if curvature is None:
                raise ValueError(
                    "init_scale='laplace' needs the curvature of each task's likelihood at the "
                    "starting adapters (curvature=[D, P], e.g. from curvature.MonteCarloFisher; "
                    "fit_svi computes it); pass a number as init_scale instead."
                )
            if tuple(curvature.shape) != (model.num_tasks, model.num_params):
                raise ValueError(
                    f"curvature has shape {tuple(curvature.shape)}, expected [D, P] = "
                    f"{[model.num_tasks, model.num_params]}."
                )
            self.init_scale = laplace_scales(
                curvature.to(self.device), self.tau, model.group_index, mode=model.mode, num_groups=model.num_groups,
            )
        else:
            self.init_scale = train.init_scale
        self.scale_lr = train.scale_lr
        self.tau_update_every = train.tau_update_every if train.tau_update_every is not None else 1
        self.tau_warmup = (
            train.tau_warmup if train.tau_warmup is not None
            else 0 if (init_tasks is not None and laplace) else self.steps // 5
        )
        self.average_beta = 0.98
        #: Whether the moving averages follow only the touched rows (`LazyMovingAverage`; sparse
        #: steps), else every row every step (the dense computation, the reference of the tests).
        self.lazy_average = self.sparse
        #: ``[averaged locations [D, P], averaged global adapter [P]]`` once started.
        self._avg: list[torch.Tensor] | None = None
        self._rows: LazyMovingAverage | None = None
        #: Sparse steps: the step's tasks, and their rows before the optimiser moved them.
        self._step_tasks: TaskSubsample | None = None
        self._moved: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def build_guide(self):
        return MeanFieldGuide(self.model, self.init_tasks, self.init_global, init_scale=self.init_scale,
                              storage=self.storage)

    def param_groups(self) -> list[dict]:
        """`Stepper.param_groups`, the log-scales at ``scale_lr``."""
        groups = super().param_groups()
        for g in groups:
            if g["name"] == "log_scale":
                g["lr"] = self.scale_lr
        return groups

    def step(self, batch) -> torch.Tensor:
        """`Stepper.step`; with lazy moving averages it also notes the step's tasks, whose rows
        `after_backward` copies before the optimiser moves them."""
        self._moved = None
        self._step_tasks = self.task_subsample(batch) if self._rows is not None else None
        return super().step(batch)

    @torch.no_grad()
    def after_backward(self) -> None:
        if self._rows is not None and self._step_tasks is not None:
            self._moved = (self._step_tasks.host_index, self.guide.gathered["loc"].detach().clone(),
                           self.guide.gathered["log_scale"].detach().clone())

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        if not self.learn:
            return
        # Stochastic gradients make the locations jitter around their optimum; that jitter would
        # count as spread between tasks and bias tau low. The M-step reads moving averages.
        loc, theta_g = self.guide.loc.detach(), self.guide.global_loc.detach()
        if self._avg is None:
            if self.lazy_average:
                self._rows = LazyMovingAverage.start(loc, self.guide.log_scale.detach(), theta_g,
                                                     beta=self.average_beta, compute=self.device)
                self._avg = [self._rows.average, theta_g.clone()]
            else:
                self._avg = [loc.clone(), theta_g.clone()]
        else:
            if self._rows is not None:
                self._rows.advance(self._moved, loc, self.guide.log_scale.detach())
            else:
                self._avg[0].lerp_(loc, 1 - self.average_beta)
            self._avg[1].lerp_(theta_g, 1 - self.average_beta)
        self._moved = self._step_tasks = None
        done = step + 1
        if done > self.tau_warmup and (done - self.tau_warmup) % self.tau_update_every == 0:
            prior, groups = self.model.config.tau_prior, self.model.num_groups
            if self._rows is not None:
                self.tau = tau_from_expected_squares(
                    self._rows.expected_squares(self._avg[1]), self.model.num_tasks, self.model.group_index,
                    num_groups=groups, prior=prior,
                ).to(self.tau.dtype)
            else:
                self.tau = variational_em_tau(
                    self._avg[0], self.guide.scale.detach(), self._avg[1],
                    self.model.group_index, prior=prior, num_groups=groups,
                )

    def state_dict(self) -> dict:
        """`Stepper.state_dict` plus, once started, ``average`` (``loc``, ``global_loc``): the
        moving averages that the tau M-step reads; with lazy averages ``loc`` holds each row as
        of its last update, and ``average`` also holds `LazyMovingAverage.state_dict` (the
        rows' update clocks and the M-step's running sums)."""
        state = super().state_dict()
        if self._avg is not None:
            state["average"] = {"loc": self._avg[0], "global_loc": self._avg[1]}
            if self._rows is not None:
                state["average"].update(self._rows.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict` after `setup`."""
        super().load_state_dict(state)
        average = state.get("average")
        self._avg = self._rows = None
        if average is None:
            return
        theta_g = average["global_loc"].to(self.device).clone()
        if self.lazy_average:
            self._rows = LazyMovingAverage.from_state_dict(
                average, beta=self.average_beta, storage=self.guide.loc.device, compute=self.device)
            self._avg = [self._rows.average, theta_g]
        else:
            self._avg = [average["loc"].to(self.device).clone(), theta_g]

    @torch.no_grad()
    def moving_averages(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``([D, P], [P])``: the moving averages of the locations and of the global adapter
        that the M-step reads (every row caught up; ``None`` before the first step or without a
        learned tau)."""
        if self._avg is None:
            return None
        rows = self._rows.averages(self.guide.loc.detach()) if self._rows is not None else self._avg[0]
        return rows, self._avg[1]

    @torch.no_grad()
    def point(self) -> tuple[torch.Tensor, torch.Tensor]:
        loc = self.guide.loc.detach().float()
        if self.model.mode == "pooled":
            return loc.expand(self.model.num_tasks, -1), loc
        theta_g = self.guide.global_loc.detach().float() if self.guide.global_loc is not None else loc.mean(0)
        return loc, theta_g

    def snapshot(self):
        state = super().snapshot()
        scale = self.guide.scale.detach().float()
        if self.model.mode == "pooled":
            scale = scale.expand(self.model.num_tasks, -1)
        state["task_scales"] = scale.cpu().clone()
        return state


@torch.no_grad()
def laplace_scales(
    curvature: torch.Tensor, tau: torch.Tensor, group_index: torch.Tensor, *, mode: str,
    num_groups: int | None = None,
) -> torch.Tensor:
    r"""The Laplace diagonal ``1 / sqrt(h_di + tau_g(i))``: posterior sds of the task adapters.

    Parameters
    ----------
    curvature
        ``[D, P]`` diagonal curvature ``h`` of each task's negative log-likelihood (>= 0, e.g.
        the true Fisher; negative entries are treated as 0).
    tau
        ``[G]`` precisions (finite and > 0 unless ``mode`` is a limit).
    group_index
        ``[P]`` group of each entry.
    mode
        The model's tau mode. ``"pooled"`` (tau = inf): one shared adapter with a flat prior,
        so ``1 / sqrt(sum_d h_di)``, ``[P]``. ``"independent"`` (tau = 0): ``1 / sqrt(h_di)``,
        where an entry without curvature has no finite sd; every precision is floored at
        ``INDEPENDENT_PRECISION_FLOOR`` times the median precision of its group.
    num_groups
        ``G``, the number of groups (`BoraModel.num_groups`); ``None``: read from
        ``group_index`` (a read back from its device).

    Returns
    -------
    ``[D, P]`` (``[P]`` when pooled) float32 sds.
    """
    h = curvature.double().clamp_min(0)
    if mode == "pooled":
        precision = h.sum(0)
    elif mode == "independent":
        precision = h
    else:
        precision = h + tau.double()[group_index]
    if mode in ("pooled", "independent"):
        floor = torch.zeros_like(precision)
        for g in range(_num_groups(group_index, num_groups)):
            cols = group_index == g
            values = precision[..., cols]
            positive = values[values > 0]
            median = positive.median() if positive.numel() else torch.ones((), dtype=values.dtype)
            floor[..., cols] = INDEPENDENT_PRECISION_FLOOR * median
        precision = torch.maximum(precision, floor)
    return precision.rsqrt().float()


@torch.no_grad()
def variational_em_tau(
    loc: torch.Tensor,
    scale: torch.Tensor,
    global_loc: torch.Tensor,
    group_index: torch.Tensor,
    *,
    prior: tuple[float, float] = (1.0, 0.0),
    num_groups: int | None = None,
) -> torch.Tensor:
    r"""The ELBO-maximising ``[G]`` precisions given ``q``: the M-step of variational EM.

    The ELBO's terms in tau_g, with ``q(theta_di) = Normal(mu_di, sigma_di)``,
    ``q(Theta_i) = Normal(m_i, v_i)`` and the ``Gamma(a, b)`` hyperprior, are::

        sum_{d, i in g} [log(tau_g) / 2 - tau_g E_q(theta_di - Theta_i)^2 / 2]
            + sum_{i in g} log(v_i) / 2 + (a - 1) log(tau_g) - b tau_g,
        E_q(theta_di - Theta_i)^2 = (mu_di - m_i)^2 + sigma_di^2 + v_i.

    With ``v`` at its maximiser ``1 / (D tau_g)`` the maximiser in tau_g is::

        tau_g = ((D - 1) P_g + 2 (a - 1)) / (sum_{d, i in g} (mu_di - m_i)^2 + sigma_di^2 + 2 b)

    (``n_g = D P_g`` entries, less the ``P_g`` that ``Theta``'s flat prior takes; checked
    against a brute-force maximisation in ``tests/inference/test_svi_scales.py``).

    Parameters
    ----------
    loc, scale
        ``[D, P]`` locations ``mu`` and sds ``sigma`` of the task adapters' guide.
    global_loc
        ``[P]`` mean ``m`` of the global adapter.
    group_index
        ``[P]`` precision group of each entry.
    prior
        ``(a, b)`` of the Gamma hyperprior (``b = 0``: improper, ``a - 1`` times ``log tau``).
    num_groups
        ``G`` (`BoraModel.num_groups`); ``None``: read from ``group_index`` (a read back from
        its device).

    Returns
    -------
    ``[G]`` precisions, in the dtype of ``loc`` and ``scale``.
    """
    expected_sq = ((loc - global_loc).square() + scale.square()).sum(0)  # [P]
    return tau_from_expected_squares(expected_sq, loc.shape[0], group_index,
                                     num_groups=_num_groups(group_index, num_groups), prior=prior)


def tau_from_expected_squares(
    expected_sq: torch.Tensor, num_tasks: int, group_index: torch.Tensor, *, num_groups: int,
    prior: tuple[float, float] = (1.0, 0.0),
) -> torch.Tensor:
    r"""`variational_em_tau` from ``E_i = sum_d (mu_di - m_i)^2 + sigma_di^2`` per entry:
    ``tau_g = ((D - 1) P_g + 2 (a - 1)) / (sum_{i in g} E_i + 2 b)``, ``[G]`` in the dtype of
    ``expected_sq`` ``[P]``. Reads nothing back from the device (the group sizes are counted
    with ``index_add_``, not ``bincount``, which reads the largest index on a GPU)."""
    a, b = prior
    S = torch.zeros(num_groups, dtype=expected_sq.dtype, device=expected_sq.device).index_add_(0, group_index, expected_sq)
    counts = torch.zeros(num_groups, dtype=torch.long, device=group_index.device).index_add_(
        0, group_index, torch.ones_like(group_index)).to(S.dtype)
    return ((num_tasks - 1) * counts + 2 * (a - 1)).clamp_min(1e-12) / (S + 2 * b)


def _num_groups(group_index: torch.Tensor, num_groups: int | None) -> int:
    return int(group_index.max()) + 1 if num_groups is None else num_groups


class LazyMovingAverage:
    r"""Moving averages of the rows of a ``[D, P]`` table of locations whose rows move only at
    the steps that touch them (sparse steps), and the sums that the tau M-step reads, at a cost
    in the touched rows: ``O(K P)`` per step.

    The dense computation moves every row's average every step, ``a_d <- beta a_d + (1 - beta)
    mu_d``. A row whose location ``mu_d`` has not moved for ``g`` steps has, in closed form,
    ``a_d = mu_d + beta^g (a'_d - mu_d)`` (``a'_d`` its average ``g`` steps before). So only the
    rows that a step touched are written (caught up to the step before, then moved towards their
    new location), with the step count at which they were written (`updated`, on the clock of
    `advance` calls); `averages` catches every row up.

    The M-step (`tau_from_expected_squares`) needs ``E_i = sum_d (a_di - m_i)^2 + sigma_di^2``
    per entry, with ``m`` the averaged global adapter, which moves every step. With each row's
    residual ``r_d = a_d - mu_d`` (which every untouched row multiplies by ``beta`` per step),
    ``x_d = mu_d - c`` around a fixed centre ``c`` (the global adapter when the averages start)
    and ``u = m - c``::

        E = X2 + 2 XR + R2 - 2 u (X1 + R1) + D u^2,
        X1 = sum_d x_d,  X2 = sum_d x_d^2 + sigma_d^2,  R1 = sum_d r_d,  XR = sum_d x_d r_d,
        R2 = sum_d r_d^2

    five ``[P]`` float64 running sums (`sums`) on the compute device. Each step multiplies
    ``R1`` and ``XR`` by ``beta`` and ``R2`` by ``beta^2`` (every row's residual decays), then
    takes out each touched row's terms before its move and adds them after.

    Accuracy. The terms are computed in float64 from the float32 tables, so a row's terms
    taken out are those put in, times ``beta^g`` (one ``pow``) where the sums were multiplied
    ``g`` times: a relative difference of about ``g`` float64 roundings. Each update adds a
    rounding of about ``2^-53`` times the sums' size; around ``c`` the terms do not cancel
    unless the tasks' spread is below ``2^-26`` of their distance from ``c``. The M-step
    therefore reads ``E`` to about 1e-12 relative after a million steps, while the dense
    computation's float32 averages and sums are accurate to about 1e-7: the two give the same
    tau to float32 rounding (tests/inference/test_svi.py compares them, to 1e-5, over 40 steps
    in which tau feeds back into the steps).

    Parameters
    ----------
    average
        ``[D, P]`` float32 averages, each row as of its last update, on the tables' device.
    updated
        ``[D]`` int64, the `clock` at each row's last update (same device).
    clock
        `advance` calls since the start.
    center
        ``[P]`` float64 centre ``c`` on the compute device.
    sums
        ``{"x", "xx", "r", "xr", "rr"}``: ``X1, X2, R1, XR, R2``, ``[P]`` float64 on the compute
        device.
    beta
        Decay per step of the averages.
    compute
        The compute device.
    """

    def __init__(self, average: torch.Tensor, updated: torch.Tensor, clock: int, center: torch.Tensor,
                 sums: dict[str, torch.Tensor], *, beta: float, compute: torch.device):
        self.average, self.updated, self.clock = average, updated, clock
        self.center, self.sums = center, sums
        self.beta, self.compute = beta, torch.device(compute)

    #: Rows per block when `start` sums the whole table (bounds its temporary float64 copies).
    BLOCK_ROWS = 1024

    @classmethod
    @torch.no_grad()
    def start(cls, loc: torch.Tensor, log_scale: torch.Tensor, center: torch.Tensor, *, beta: float,
              compute: torch.device) -> LazyMovingAverage:
        """Averages equal to the locations ``loc`` ``[D, P]`` (sds ``exp(log_scale)``), centred at
        ``center`` ``[P]`` (on ``compute``): one pass over the table."""
        c = center.detach().to(compute, torch.float64).clone()
        sums = {k: torch.zeros_like(c) for k in ("x", "xx", "r", "xr", "rr")}
        for rows, log_sd in zip(loc.split(cls.BLOCK_ROWS), log_scale.split(cls.BLOCK_ROWS)):
            x = rows.to(compute, torch.float64) - c
            sd = log_sd.to(compute).exp().double()
            sums["x"] += x.sum(0)
            sums["xx"] += (x.square() + sd.square()).sum(0)
        updated = torch.zeros(loc.shape[0], dtype=torch.long, device=loc.device)
        return cls(host_table(loc, loc.device, compute), updated, 0, c, sums, beta=beta, compute=compute)

    @torch.no_grad()
    def advance(self, moved: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
                loc: torch.Tensor, log_scale: torch.Tensor) -> None:
        """One step of the averages.

        Parameters
        ----------
        moved
            ``(index [K] on the CPU, locations [K, P], log-scales [K, P])``: the rows that the
            step moved, as they were before it (on the compute device); ``None``: none moved.
        loc, log_scale
            The ``[D, P]`` tables after the step (only the rows of ``index`` are read).
        """
        beta, sums, c = self.beta, self.sums, self.center
        self.clock += 1
        sums["r"].mul_(beta)
        sums["xr"].mul_(beta)
        sums["rr"].mul_(beta * beta)
        if moved is None:
            return
        host_index, loc_before, log_scale_before = moved
        index = host_index.to(self.average.device, non_blocking=True)
        gap = (self.clock - self.updated.index_select(0, index)).to(self.compute, torch.float64, non_blocking=True)
        stored = self.average.index_select(0, index).to(self.compute, non_blocking=True).double()
        before = loc_before.double()
        residual = stored - before                                        # r_d when last written
        r_before = residual * torch.pow(beta, gap).unsqueeze(-1)          # as the decayed sums hold it
        # the dense average one step ago, then its move towards the new location (as the dense lerp)
        average = (before + residual * torch.pow(beta, gap - 1).unsqueeze(-1)).float()
        after = loc.index_select(0, index).to(self.compute, non_blocking=True)
        average.lerp_(after, 1 - beta)
        x_before, x_after = before - c, after.double() - c
        r_after = average.double() - after.double()
        sd_before = log_scale_before.exp().double()
        sd_after = log_scale.index_select(0, index).to(self.compute, non_blocking=True).exp().double()
        sums["x"] += (x_after - x_before).sum(0)
        sums["xx"] += (x_after.square() + sd_after.square() - x_before.square() - sd_before.square()).sum(0)
        sums["r"] += (r_after - r_before).sum(0)
        sums["xr"] += (x_after * r_after - x_before * r_before).sum(0)
        sums["rr"] += (r_after.square() - r_before.square()).sum(0)
        self.average.index_copy_(0, index, average.to(self.average.device))
        self.updated.index_fill_(0, index, self.clock)

    @torch.no_grad()
    def expected_squares(self, global_average: torch.Tensor) -> torch.Tensor:
        """``[P]`` float64 ``E_i = sum_d (a_di - m_i)^2 + sigma_di^2`` for the averaged global
        adapter ``m`` = ``global_average`` ``[P]``, from the running sums (``O(P)``)."""
        sums, D = self.sums, self.updated.shape[0]
        u = global_average.double() - self.center
        expected = sums["xx"] + 2 * sums["xr"] + sums["rr"] - 2 * u * (sums["x"] + sums["r"]) + D * u.square()
        return expected.clamp_min(0)

    @torch.no_grad()
    def averages(self, loc: torch.Tensor) -> torch.Tensor:
        """``[D, P]`` averages, every row caught up to the last step (``loc``: the locations
        table, unchanged since each row's last update); reads the whole table."""
        gap = (self.clock - self.updated).to(loc.dtype)
        return torch.lerp(loc, self.average, torch.pow(self.beta, gap).unsqueeze(-1))

    def state_dict(self) -> dict:
        """``updated``, ``clock``, ``center`` and ``sums`` (the live tensors; the averages
        themselves are the stepper's ``average/loc``)."""
        return {"updated": self.updated, "clock": self.clock, "center": self.center, "sums": dict(self.sums)}

    @classmethod
    def from_state_dict(cls, state: dict, *, beta: float, storage: torch.device,
                        compute: torch.device) -> LazyMovingAverage:
        """Rebuild from ``state`` (`state_dict` plus ``loc``, the stored averages), the averages
        and clocks on ``storage``, the sums on ``compute``."""
        if "updated" not in state:
            raise ValueError(
                "The checkpoint's moving averages were written by a run whose averages moved every "
                "row (dense steps); resume with the interrupted run's task_step."
            )
        return cls(
            host_table(state["loc"], storage, compute), state["updated"].to(storage, torch.long).clone(),
            int(state["clock"]), state["center"].to(compute, torch.float64).clone(),
            {k: v.to(compute, torch.float64).clone() for k, v in state["sums"].items()},
            beta=beta, compute=compute,
        )


def optimise_svi(
    model: BoraModel,
    batches: Iterator,
    train: TrainConfig,
    *,
    init_global: torch.Tensor,
    init_tasks: torch.Tensor | None = None,
    init_tau: torch.Tensor | None = None,
    curvature: torch.Tensor | None = None,
    validate: Callable[[torch.Tensor], float] | None = None,
    checkpointing: Checkpointing | None = None,
    on_step: Callable[[dict[str, float], int], None] | None = None,
) -> FitState:
    """Maximise the ELBO of the mean-field guide (and, if learned, the ELBO in tau).

    Parameters are those of `optimise_map` (``on_step`` included), plus ``init_tasks``
    (``[D, P]`` initial locations, e.g. a MAP fit's task adapters; default: ``init_global`` for
    every task), ``init_tau`` (``[G]`` starting value of a learned tau) and ``curvature``
    (``[D, P]``, for ``init_scale="laplace"``); ``train`` also gives ``num_particles``,
    ``init_scale`` and ``scale_lr`` (see `SVIStepper`). ``validate`` is called with the
    posterior means.
    """
    stepper = SVIStepper(
        model, train, init_global=init_global, init_tasks=init_tasks, init_tau=init_tau, curvature=curvature,
    )
    return run_steps(stepper, batches, validate=validate, checkpointing=checkpointing, on_step=on_step)
