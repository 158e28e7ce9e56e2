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

__all__ = ["MeanFieldGuide", "SVIStepper", "laplace_scales", "optimise_svi", "variational_em_tau"]

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
                curvature.to(self.device), self.tau, model.group_index, mode=model.mode
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
        self._avg: list[torch.Tensor] | None = None

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

    def after_step(self, step: int) -> None:
        if not self.learn:
            return
        # Stochastic gradients make the locations jitter around their optimum; that jitter would
        # count as spread between tasks and bias tau low. The M-step reads moving averages.
        loc, theta_g = self.guide.loc.detach(), self.guide.global_loc.detach()
        if self._avg is None:
            self._avg = [loc.clone(), theta_g.clone()]
        else:
            self._avg[0].lerp_(loc, 1 - self.average_beta)
            self._avg[1].lerp_(theta_g, 1 - self.average_beta)
        done = step + 1
        if done > self.tau_warmup and (done - self.tau_warmup) % self.tau_update_every == 0:
            self.tau = variational_em_tau(
                self._avg[0], self.guide.scale.detach(), self._avg[1],
                self.model.group_index, prior=self.model.config.tau_prior,
            )

    def state_dict(self) -> dict:
        """`Stepper.state_dict` plus, once started, ``average`` (``loc``, ``global_loc``): the
        moving averages that the tau M-step reads."""
        state = super().state_dict()
        if self._avg is not None:
            state["average"] = {"loc": self._avg[0], "global_loc": self._avg[1]}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict` after `setup`."""
        super().load_state_dict(state)
        average = state.get("average")
        self._avg = None if average is None else [
            average["loc"].to(self.device).clone(), average["global_loc"].to(self.device).clone(),
        ]

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
    curvature: torch.Tensor, tau: torch.Tensor, group_index: torch.Tensor, *, mode: str
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
        for g in range(int(group_index.max()) + 1):
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

    Returns
    -------
    ``[G]`` precisions, in the dtype of ``loc`` and ``scale``.
    """
    D = loc.shape[0]
    a, b = prior
    G = int(group_index.max()) + 1
    expected_sq = ((loc - global_loc).square() + scale.square()).sum(0)  # [P]
    S = torch.zeros(G, dtype=expected_sq.dtype, device=loc.device).index_add_(0, group_index, expected_sq)
    counts = torch.bincount(group_index, minlength=G).to(S.dtype)
    return ((D - 1) * counts + 2 * (a - 1)).clamp_min(1e-12) / (S + 2 * b)


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
