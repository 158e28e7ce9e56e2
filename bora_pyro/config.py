"""Every setting of bora_pyro, in three dataclasses, each field with its default and help text once:

- `DataConfig`: how to read and split the data (columns, ``max_length``, split sizes, tasks);
- `BoraConfig`: the model (LoRA shape, the prior's precision tau and its hyperprior);
- `TrainConfig`: how to fit (length, batch, AdamW and its schedule, validation and early
  stopping, the learned-tau updates, the SVI guide, device, seed, checkpoints).

Every layer takes these objects, not loose keywords; ``fit_map(data, rank=4, lr=1e-3)`` still
works because `resolve_settings` turns flat keywords into fields of the three objects (an
unknown keyword is an error listing the valid ones). The command line is generated from the
fields (their types, defaults and ``help`` metadata), so ``bora fit --help`` shows the same
defaults and texts as these docstrings. Each object is validated in ``__post_init__`` and saved
with a result (`to_dict` / `from_dict`). This module imports nothing heavy (no torch), so that
the command line can check its arguments before it loads a model.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar, Sequence

from . import checks

__all__ = [
    "BoraConfig", "DataConfig", "TrainConfig", "Settings", "resolve_settings", "split_seed", "parse_tau",
    "parse_report_to",
    "PRECISION_GROUPINGS", "PARAMETERIZATIONS", "LR_SCHEDULES", "AUTOCAST_CHOICES", "REPORT_TO_CHOICES",
    "TAU_CURVATURES", "TAU_GRADIENTS", "TAU_METHODS", "TASK_STEPS", "ADAPTER_STORAGES", "TAU_INIT", "VALIDATION_TAU_INIT",
]

#: Starting value of a learned tau when ``tau_init`` is not given: the evidence (MAP) and SVI.
TAU_INIT = 1e3
#: ... and when MAP's validation method learns it (docs/learned-precision.md, section 10).
VALIDATION_TAU_INIT = 1e4

#: How parameters may share a precision: one tau for all, one for all A and one for all B, or
#: one per (module kind, A|B), e.g. ``q_proj.A``.
PRECISION_GROUPINGS = ("shared", "ab", "module")
#: What MAP's optimiser moves (see `bora_pyro.inference.map.PointGuide`).
PARAMETERIZATIONS = ("offset", "centered")
#: The curvature behind MAP's evidence update of a learned tau (see
#: `bora_pyro.inference.map.MAPStepper`): the true Fisher at the current adapters, or the running
#: empirical Fisher of the minibatch gradients.
TAU_CURVATURES = ("fisher", "empirical")
#: How MAP's validation method reads the adapters' response to tau (see
#: `bora_pyro.inference.hyper`): along the run (two shadow fits), at an optimum (the implicit
#: function theorem), or the first where it is implemented (dense steps, offset parameterisation).
TAU_GRADIENTS = ("auto", "trajectory", "implicit")
#: How a step treats the tasks absent from its minibatch (see docs/many-tasks.md): touch only the
#: tasks present (each task's prior / KL split over its documents, lazy row-wise AdamW) or all;
#: ``"auto"``: sparse above `SPARSE_TASKS_PER_DOC` tasks per minibatch document.
TASK_STEPS = ("auto", "sparse", "dense")
#: ``task_step="auto"`` takes sparse steps when the number of tasks exceeds this many times the
#: batch size (or with ``adapter_storage="host"``).
SPARSE_TASKS_PER_DOC = 4
#: Where the ``[D, P]`` task adapters and their optimiser state live with ``task_step="sparse"``.
ADAPTER_STORAGES = ("auto", "device", "host")
#: How MAP learns tau (see `bora_pyro.inference.map.MAPStepper`); ``"auto"``: the validation
#: likelihood when the fit has validation documents, else the evidence.
TAU_METHODS = ("auto", "validation", "evidence")
#: Learning-rate schedules after the linear warm-up.
LR_SCHEDULES = ("cosine", "linear", "constant")
#: Names accepted by ``autocast=`` (see `bora_pyro.runtime.autocast_dtype`).
AUTOCAST_CHOICES = ("bf16", "fp16")
#: Experiment trackers accepted by ``report_to=`` (transformers' names; see `bora_pyro.tracking`).
REPORT_TO_CHOICES = ("tensorboard", "mlflow", "wandb")


def parse_tau(tau: Any) -> float | str | dict[str, float]:
    """Check a ``tau`` argument and return it in canonical form.

    Accepted: a number >= 0 (``0`` = independent tasks, ``float("inf")`` = one shared adapter,
    also the strings ``"inf"``/``"0"``), ``"learn"``, or a mapping ``{group: value}`` of finite
    positive numbers (one fixed precision per group, see ``precision_groups``).
    """
    if isinstance(tau, str):
        low = tau.strip().lower()
        if low == "learn":
            return "learn"
        try:
            tau = float(low)
        except ValueError:
            raise ValueError(
                f"tau={tau!r} is not understood; pass a number >= 0 (0 = independent tasks, "
                "float('inf') = one pooled adapter), 'learn', or a dict {group: value}."
            ) from None
    if isinstance(tau, dict):
        out = {}
        for k, v in tau.items():
            v = float(v)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(
                    f"tau[{k!r}]={v!r}: per-group precisions must be finite and > 0; use a single "
                    "tau=0 or tau=float('inf') for the independent and pooled limits."
                )
            out[str(k)] = v
        if not out:
            raise ValueError("tau={} is empty; give one value per precision group.")
        return out
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise ValueError(f"tau must be a number, 'learn' or a dict, got {type(tau).__name__} {tau!r}.")
    tau = float(tau)
    if math.isnan(tau) or tau < 0:
        raise ValueError(f"tau={tau!r} must be >= 0 (0 = independent tasks, inf = pooled).")
    return tau


def _parse_init_scale(value: Any) -> float | str:
    """``init_scale``: a finite number > 0 (also as a string, from the command line) or ``"laplace"``."""
    if isinstance(value, str):
        low = value.strip().lower()
        if low == "laplace":
            return "laplace"
        try:
            value = float(low)
        except ValueError:
            raise ValueError(
                f"init_scale={value!r} is not understood; pass a positive number (the initial "
                f"posterior sd of every entry) or 'laplace'{checks.did_you_mean(low, ['laplace'])}"
            ) from None
    return checks.positive_number("init_scale", value)


def _help(text: str, **extra: Any) -> dict[str, Any]:
    """Field metadata: the help text shown by ``bora ... --help`` (and extra CLI hints)."""
    return {"help": text, **extra}


class _Settings:
    """Shared behaviour of the three config dataclasses: dict round trip with clear errors."""

    #: Shown in error messages ("data setting", "model setting", "training setting").
    kind: ClassVar[str] = "setting"

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.init and f.name != "version"]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (tuples as lists, ``inf`` as the string ``"inf"``)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and math.isinf(value):
                value = "inf" if value > 0 else "-inf"
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """Rebuild from `to_dict` output; unknown keys are an error listing the valid ones,
        missing keys take their defaults (a file written by an older version still loads)."""
        if not isinstance(d, dict):
            raise ValueError(f"{cls.__name__}.from_dict needs a dict, got {type(d).__name__}.")
        valid = [f.name for f in fields(cls) if f.init]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(
                f"Unknown {cls.kind}(s) {unknown} for {cls.__name__}; valid: {sorted(valid)}."
            )
        return cls(**d)


@dataclass
class DataConfig(_Settings):
    """How to read the data and split each task's documents.

    Attributes
    ----------
    task_column, text_column
        Columns holding each document's task label and its text.
    prompt_column, completion_column
        Instead of ``text_column``: a prompt and a completion per document; only the completion
        tokens are scored.
    messages_column
        Instead of ``text_column``: a conversation per document, a list of ``{"role",
        "content"}`` turns (TRL's ``messages`` format), rendered with the tokenizer's chat
        template; only the assistant's tokens are scored (see `bora_pyro.data.chat`). ``None``:
        a column named ``messages`` is used when the data has one, has no ``text_column`` and
        no ``prompt_column`` is given.
    tasks
        The tasks to keep (default: every task in the data), in this order.
    max_length
        Documents are truncated to this many tokens.
    test_size, validation_size
        Share of each task's documents held out for testing (0.33 as in the paper) and for
        validation (early stopping), drawn with the split's seed, stratified by task.
    split_seed
        Seed of the train / validation / test split and of the evaluated subsets of its
        documents (the early-stopping subset ``max_eval_docs_per_task``, a sweep's
        ``eval_docs_per_task``); ``None`` (default): ``TrainConfig.seed``, which then seeds both
        the split and the training. Fix it to repeat a fit on the same documents with other
        training seeds (initialisation, batch order, draws), e.g. to see how much one
        early-stopped run varies (`split_seed`).
    """

    kind: ClassVar[str] = "data setting"

    task_column: str = field(default="task", metadata=_help("column with each document's task"))
    text_column: str = field(default="text", metadata=_help("column with each document's text"))
    prompt_column: str | None = field(
        default=None, metadata=_help("with --completion-column: a prompt column (its tokens are not scored)"))
    completion_column: str | None = field(
        default=None, metadata=_help("with --prompt-column: the completion column (only its tokens are scored)"))
    messages_column: str | None = field(
        default=None, metadata=_help(
            "column of conversations, lists of role/content turns rendered with the chat template; only "
            "assistant tokens are scored (default: 'messages' when the data has it and no text column)"))
    tasks: Sequence[str] | None = field(
        default=None, metadata=_help("tasks to keep, in this order (default: all)", metavar="TASK"))
    max_length: int = field(default=256, metadata=_help("truncate documents to this many tokens"))
    test_size: float = field(default=0.33, metadata=_help("share of each task's documents held out for testing"))
    validation_size: float = field(
        default=0.1, metadata=_help("share of each task's documents held out for validation (early stopping)"))
    split_seed: int | None = field(
        default=None, metadata=_help("seed of the train/validation/test split and the evaluated subsets "
                                     "(default: --seed); fix it to vary only the training seed"))

    def __post_init__(self) -> None:
        for name in ("task_column", "text_column"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a column name (a non-empty string), got {getattr(self, name)!r}.")
        for name in ("prompt_column", "completion_column", "messages_column"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a column name or None, got {value!r}.")
        if (self.prompt_column is None) != (self.completion_column is None):
            raise ValueError(
                "prompt_column and completion_column go together: pass both (only completion "
                f"tokens are scored) or neither; got prompt_column={self.prompt_column!r}, "
                f"completion_column={self.completion_column!r}."
            )
        if self.messages_column is not None and self.prompt_column is not None:
            raise ValueError(
                f"messages_column={self.messages_column!r} and prompt_column={self.prompt_column!r} "
                "exclude each other: a document is either a conversation or a prompt/completion pair."
            )
        if isinstance(self.tasks, str):
            raise ValueError(f"tasks must be a list of task names, got the string {self.tasks!r}; wrap it in a list.")
        if self.tasks is not None:
            self.tasks = list(self.tasks)
            if not self.tasks:
                raise ValueError("tasks=[] selects no task; pass None for every task.")
        self.max_length = checks.positive_int("max_length", self.max_length)
        if self.max_length < 2:
            raise ValueError(f"max_length={self.max_length} leaves no token to predict; use at least 2.")
        self.test_size = checks.fraction("test_size", self.test_size)
        self.validation_size = checks.fraction("validation_size", self.validation_size)
        if self.split_seed is not None:
            self.split_seed = checks.non_negative_int("split_seed", self.split_seed)
        if self.test_size + self.validation_size >= 1:
            raise ValueError(
                f"test_size + validation_size = {self.test_size + self.validation_size:g} leaves no "
                "training documents; make their sum < 1."
            )


@dataclass
class BoraConfig(_Settings):
    """The model: LoRA shape and the hierarchical prior.

    Attributes
    ----------
    rank, alpha
        LoRA rank r and alpha; each adapted layer computes ``W x + (alpha / r) B A x``.
    target_modules
        Layers to adapt (names or name suffixes, as in PEFT); ``None`` = every linear layer in
        the transformer blocks.
    tau
        Precision of the prior ``theta_d ~ Normal(Theta, tau^-1 I)``. ``0``: independent task
        adapters (no prior, exactly); ``inf``: one adapter shared by all tasks (exactly);
        ``"learn"``: a Gamma hyperprior, the value estimated in the same run (empirical Bayes);
        a dict ``{group: tau}`` fixes one value per precision group. With the likelihood a true
        sum of token log-probabilities, tau is the inverse variance of one LoRA entry around
        the global adapter: useful values are roughly ``1e2 .. 1e6`` (see the README).
    precision_groups
        ``"shared"`` (one tau), ``"ab"`` (one for all A matrices, one for all B: they live on
        very different scales) or ``"module"`` (one per module kind and A|B).
    tau_prior
        ``(concentration, rate)`` of the Gamma hyperprior on each learned tau.
    tau_init
        Starting value of a learned tau; ``None`` (default): the method's, `VALIDATION_TAU_INIT`
        (1e4) for MAP's validation method, `TAU_INIT` (1e3) for the evidence and SVI. From 1e3
        the validation method spends the early steps at a low tau, where the fit learns more
        slowly, and lost 10-19% test perplexity on a Shakespeare split on every training seed;
        from 1e4 it did not (docs/learned-precision.md, section 10).
    version
        The bora_pyro version that made the config (filled in automatically).
    """

    kind: ClassVar[str] = "model setting"

    rank: int = field(default=8, metadata=_help("LoRA rank"))
    alpha: float = field(default=16.0, metadata=_help("LoRA alpha (the update is scaled by alpha / rank)"))
    target_modules: Sequence[str] | None = field(
        default=None, metadata=_help(
            "modules to adapt, e.g. q_proj v_proj (default: every linear layer of the blocks)",
            metavar="MODULE", cli="targets"))
    tau: float | str | dict[str, float] = field(
        default="learn", metadata=_help(
            "prior precision: a number, 0 (independent adapters), inf (one pooled adapter) or 'learn'"))
    precision_groups: str = field(
        default="ab", metadata=_help("one tau for all ('shared'), for A and B ('ab'), or per module kind ('module')",
                                     choices=PRECISION_GROUPINGS))
    tau_prior: tuple[float, float] = field(
        default=(1.0, 1e-3), metadata=_help("Gamma(concentration, rate) hyperprior of a learned tau",
                                            metavar=("CONCENTRATION", "RATE")))
    tau_init: float | None = field(default=None, metadata=_help(
        "starting value of a learned tau (default: 1e4 for MAP's validation method, else 1e3)"))
    version: str = field(default="", metadata=_help("bora_pyro version that made the config", cli=None))

    def __post_init__(self) -> None:
        from ._version import __version__

        self.rank = checks.positive_int("rank", self.rank)
        self.alpha = checks.positive_number("alpha", self.alpha)
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if self.target_modules is not None:
            self.target_modules = list(self.target_modules)
            if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
                raise ValueError(
                    f"target_modules={self.target_modules!r} must be None or a non-empty list of module "
                    "names, e.g. ['q_proj', 'v_proj']."
                )
        self.tau = parse_tau(self.tau)
        checks.choice("precision_groups", self.precision_groups, PRECISION_GROUPINGS)
        try:
            a, b = (float(x) for x in self.tau_prior)
        except (TypeError, ValueError):
            raise ValueError(
                f"tau_prior must be a pair (concentration, rate) of numbers, got {self.tau_prior!r}."
            ) from None
        if not (math.isfinite(a) and a > 0 and math.isfinite(b) and b >= 0):
            raise ValueError(
                f"tau_prior=(concentration, rate)={self.tau_prior!r} needs concentration > 0 and rate >= 0."
            )
        self.tau_prior = (a, b)
        if self.tau_init is not None:
            self.tau_init = checks.positive_number("tau_init", self.tau_init)
        self.version = self.version or __version__

    @property
    def mode(self) -> str:
        """``"independent"`` (tau = 0), ``"pooled"`` (tau = inf), ``"learn"`` or ``"fixed"``."""
        if self.tau == "learn":
            return "learn"
        if isinstance(self.tau, float) and self.tau == 0.0:
            return "independent"
        if isinstance(self.tau, float) and math.isinf(self.tau):
            return "pooled"
        return "fixed"


@dataclass
class TrainConfig(_Settings):
    """How to fit: length, minibatches, AdamW, validation, the learned tau, SVI, device, checkpoints.

    Attributes
    ----------
    max_steps, epochs
        Length of training: ``max_steps`` optimiser steps, else ``epochs`` passes over the
        training documents (3 when both are ``None``).
    batch_size
        Documents per minibatch (tasks mixed; the likelihood is scaled by N / B).
    lr, lr_schedule, warmup_steps, weight_decay
        AdamW: learning rate, its schedule after a linear warm-up of ``warmup_steps`` steps
        (``"cosine"`` to 0.1 lr, ``"linear"`` to 0.1 lr, ``"constant"``), and decoupled weight
        decay (keep 0 for a true MAP: the prior is the regulariser).
    lr_per_tau
        The paper's trick: learning rate ``lr_per_tau * tau`` (one fixed finite tau only).
    eval_every, patience, max_eval_docs_per_task
        Validation perplexity every ``eval_every`` steps (``None``: 10 times per run) on at most
        ``max_eval_docs_per_task`` documents per task; the best state is kept, and training stops
        after ``patience`` evaluations without improvement (``None``: never early).
    tau_update_every, tau_warmup
        With ``tau="learn"``: steps between updates of tau and steps before the first one
        (``None``: the method's default. MAP's validation method: tied to the evaluations that
        pick the kept state, 2.5 updates per ``eval_every`` steps from the first evaluation or
        a fifth of the run, whichever comes first; MAP's evidence: 20 updates per run after a
        fifth of it; SVI: every step, after a fifth of the run unless it starts from a MAP fit).
    parameterization
        MAP only: what the optimiser moves, the global adapter and each task's offset from it
        (``"offset"``) or the task adapters (``"centered"``); same objective and optimum.
    num_particles, init_scale
        SVI only: Monte Carlo draws of the adapters per step, and the initial posterior sd of
        every adapter entry: a number, or ``"laplace"`` (the default) for the Laplace diagonal
        ``1 / sqrt(h + tau)`` at the starting adapters, with ``h`` a Monte-Carlo true Fisher
        (see ``laplace_passes``) and tau the starting precision (a MAP fit's, with ``init=``).
    device, autocast
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:1"``, ...; ``autocast="bf16"`` (or
        ``"fp16"``) runs the frozen base model in that precision (adapters stay fp32).
    seed
        Seeds the split, the adapter initialisation, the minibatch order and the Monte Carlo draws.
    progress
        Show progress bars.
    quantize, device_map
        The frozen base loaded quantised by bitsandbytes (``"4bit"``: NF4, fp32 compute;
        ``"8bit"``), and transformers' ``device_map`` (``"auto"``: spread over the GPUs); see
        `bora_pyro.models.base.load_base_model`. The adapters stay fp32.
    distributed_timeout
        Under ``torchrun`` (data parallel, `bora_pyro.distributed`): seconds a rank waits for the
        others at a collective before the run fails with `~bora_pyro.distributed.DistributedError`.
    checkpoint_dir, checkpoint_every, resume
        Atomic checkpoints every ``checkpoint_every`` steps (``None``: 10 per run) in
        ``checkpoint_dir``, and the checkpoint folder of an interrupted run to continue from
        (it then ends exactly where an uninterrupted run would).
    report_to, report_dir, run_name
        Experiment trackers to log the run to (transformers' names: ``"tensorboard"``,
        ``"mlflow"``, ``"wandb"``, a list of them, or ``None``), the local folder they write
        to, and the run's name (default: the method and the start time, e.g.
        ``map-20250101-120000``); see `bora_pyro.tracking`.
    scale_lr
        SVI only: AdamW learning rate of the log posterior sds, under the same schedule as
        ``lr``. A step changes a sd by up to about this fraction whatever its size, so the rate
        is unitless and does not follow ``lr`` (see docs/map-vs-svi.md for the measurement).
    laplace_passes
        SVI with ``init_scale="laplace"``: passes over the training documents (one forward and
        backward pass each, with labels sampled from the model) to estimate the Fisher ``h``.
    packing
        Lay each minibatch's ``batch_size`` documents end to end in rows (position ids
        restarting and attention confined to each document) instead of padding each to the
        longest: the same documents and the same likelihood, without computing padding (on
        Shakespeare's speeches, 3x the real tokens per second of a padded step on the CPU).
        Needs a base model with SDPA or eager attention (``False`` for others, e.g. flash
        attention). Evaluation pads (it sorts documents by length, so little of it is padding).
    tau_method, tau_lr, tau_val_batches
        MAP with ``tau="learn"``: how tau is learned. ``"validation"``: empirical Bayes on the
        validation likelihood, log tau moved by Adam steps of size about ``tau_lr`` down the
        implicit gradient of the validation NLL of ``tau_val_batches`` validation minibatches
        per update (`bora_pyro.inference.hyper`; needs validation documents); ``"evidence"``:
        the Laplace evidence fixed point (`bora_pyro.inference.precision`, no validation
        data); ``"auto"`` (default): the validation likelihood when the fit has validation
        documents, else the evidence (``fit_args["tau_method"]`` names the one that ran). On
        three splits each of Shakespeare and of twelve KJV books, fits run to early stopping,
        the validation method started at 1e4 (the default ``tau_init``) came within 2.3% of
        the test perplexity of a grid's best tau on five of six splits, from 1e3 within 1% on
        four but 16% off on one (and 10-19% off there on every training seed); the evidence
        within 1% on one (median 1.030x, worst 1.056x): the Laplace evidence with a diagonal
        curvature prefers two to three decades less pooling than held-out Shakespeare does
        (docs/learned-precision.md, sections 8 and 10). Averaging the gradient over
        ``tau_val_batches=4`` minibatches mended one of the misses and caused two (section 9),
        so the default is 1. SVI learns tau by variational EM whatever this says.
    tau_gradient
        MAP's validation method: how the adapters' response to tau is read.
        ``"trajectory"``: along the run itself, from two shadow fits at ``tau * 1.2`` and
        ``tau / 1.2`` that follow it step by step (`bora_pyro.inference.hyper.ShadowTrajectories`;
        no extra forward or backward pass, six more ``[D, P]`` float32 tensors: two adapters
        and their AdamW moments); right for a run kept by early stopping, which is not
        at an optimum. ``"implicit"``: the implicit function theorem at the optimum, which at
        an early-stopped state asks for more pooling by construction. ``"auto"`` (default):
        the trajectory with dense steps and the offset parameterisation (where it is
        implemented), else the implicit gradient (docs/learned-precision.md, section 11);
        ``fit_args["tau_gradient"]`` names the one that ran.
    tau_gate
        MAP's validation method: 0 (default) lets Adam step log tau by about ``tau_lr`` at every
        update. ``K > 0`` multiplies each step by ``max(0, 1 - K / z^2)``, ``z`` the recent
        gradients' weighted mean over its standard error (`hyper.LogTauAdam`): where the
        gradient's mean does not stand out of its noise, tau stays. Not the default: on
        Shakespeare seed 0 it held tau as built but did not change the result
        (docs/learned-precision.md, section 12).
    tau_shift_moments
        MAP with ``tau="learn"``: after every change of tau, shift AdamW's first and second
        moments of the task offsets (or adapters) by the change ``(tau_new - tau_old) (theta_d -
        Theta)`` of the prior's gradient, keeping the gradient's variance they estimate
        (`bora_pyro.inference.hyper.shift_adam_moments`). Without it a tau that rises k-fold
        makes AdamW take steps up to k times its usual size on the entries the prior dominates,
        until its slow second moment catches up (docs/learned-precision.md, section 10).
    tau_curvature, tau_curvature_batches
        MAP with ``tau="learn"`` and ``tau_method="evidence"``: the curvature ``h`` of the evidence update. ``"fisher"``
        (default): the diagonal true Fisher at the current adapters, a Monte-Carlo estimate
        (labels sampled from the model) from one extra forward and backward pass on the
        minibatch of each of the last ``tau_curvature_batches`` steps before every update
        (``None``: as many as add up to 15% of the run's steps, at least 1 per update);
        ``"empirical"``: the running empirical Fisher of the minibatch gradients (no extra pass;
        biased, see docs/learned-precision.md).
    task_step, adapter_storage
        ``task_step="sparse"``: a step costs what the tasks in its minibatch cost, not the
        number of tasks D: each task's prior (MAP) or KL term (SVI) is split over its training
        documents (an unbiased estimate; the same optimum) and AdamW updates only the rows of
        the tasks present (lazy, with per-row moments and step counts); ``"dense"``: every step
        touches all ``D x P`` entries; ``"auto"`` (default): sparse when D exceeds 4 x
        ``batch_size`` (below that the dense step costs little more, and short runs with a
        learned tau follow other trajectories, see docs/many-tasks.md) or with
        ``adapter_storage="host"``, and when the model knows each task's document count. ``adapter_storage``
        (sparse steps only): the ``[D, P]`` table and its AdamW state on the compute device
        (``"device"``), in (pinned) host memory with only the batch's rows moved to the device
        (``"host"``), or ``"auto"``: host when they would take more than half of the free
        accelerator memory, else the device.
    """

    kind: ClassVar[str] = "training setting"

    max_steps: int | None = field(default=None, metadata=_help("optimiser steps (default: from --epochs)", cli="steps"))
    epochs: float | None = field(
        default=None, metadata=_help("passes over the training documents when no step count is given (default 3)"))
    batch_size: int = field(default=8, metadata=_help("documents per minibatch"))
    lr: float = field(default=1e-3, metadata=_help("AdamW learning rate"))
    lr_schedule: str = field(default="cosine", metadata=_help("learning-rate schedule after the warm-up",
                                                              choices=LR_SCHEDULES))
    warmup_steps: int = field(default=0, metadata=_help("steps of linear learning-rate warm-up"))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW decoupled weight decay (0 for a true MAP)"))
    lr_per_tau: float | None = field(
        default=None, metadata=_help("the paper's trick: learning rate = lr_per_tau * tau (one fixed tau only)"))
    eval_every: int | None = field(
        default=None, metadata=_help("steps between validation evaluations (default: 10 per run)"))
    patience: int | None = field(
        default=3, metadata=_help("stop after this many evaluations without improvement (none: never early)"))
    max_eval_docs_per_task: int | None = field(
        default=None, metadata=_help("validation documents per task (default: all)", cli="val_docs"))
    tau_update_every: int | None = field(
        default=None, metadata=_help("learned tau: steps between updates (default: the method's)"))
    tau_warmup: int | None = field(
        default=None, metadata=_help("learned tau: steps before the first update (default: the method's)"))
    parameterization: str = field(
        default="offset", metadata=_help("MAP: what the optimiser moves, the task offsets or the task adapters",
                                         choices=PARAMETERIZATIONS))
    num_particles: int = field(default=1, metadata=_help("SVI: Monte Carlo draws of the adapters per step"))
    init_scale: float | str = field(
        default="laplace", metadata=_help(
            "SVI: initial posterior sd of every adapter entry, a number or 'laplace' (1 / sqrt(Fisher + tau) "
            "at the starting adapters)"))
    device: str = field(default="auto", metadata=_help("'auto', 'cpu', 'cuda', 'cuda:1', ..."))
    autocast: str | None = field(
        default=None, metadata=_help("run the frozen base model in this precision (CUDA)", choices=AUTOCAST_CHOICES))
    seed: int = field(default=0, metadata=_help("seed of the split, initialisation, batch order and draws"))
    progress: bool = field(default=True, metadata=_help("show progress bars"))
    quantize: str | None = field(
        default=None, metadata=_help("load the frozen base quantised by bitsandbytes (QLoRA style; adapters "
                                     "stay fp32; needs bora-pyro[quantize])", choices=("4bit", "8bit")))
    device_map: str | None = field(
        default=None, metadata=_help("transformers' device_map for the base, e.g. 'auto' to spread it over GPUs"))
    distributed_timeout: float = field(
        default=1800.0, metadata=_help("under torchrun: seconds a rank waits for the others at a collective "
                                       "before the run fails"))
    checkpoint_dir: str | None = field(
        default=None, metadata=_help("folder for checkpoints that survive a kill", metavar="DIR"))
    checkpoint_every: int | None = field(
        default=None, metadata=_help("steps between checkpoints (default: 10 per run)"))
    resume: str | None = field(
        default=None, metadata=_help("continue an interrupted run from its checkpoint folder", metavar="DIR"))
    report_to: Sequence[str] | None = field(
        default=None, metadata=_help("log the run to these experiment trackers ('none': no tracking)",
                                     choices=REPORT_TO_CHOICES + ("none",)))
    report_dir: str = field(
        default="runs", metadata=_help("folder of the trackers' local files (TensorBoard events, MLflow "
                                       "file store, W&B offline runs)", metavar="DIR"))
    run_name: str | None = field(
        default=None, metadata=_help("name of the tracked run (default: the method and the start time)"))
    scale_lr: float = field(
        default=0.02, metadata=_help("SVI: learning rate of the log posterior sds (a relative change per step)"))
    laplace_passes: int = field(
        default=2, metadata=_help("SVI, init_scale 'laplace': passes over the training documents for the Fisher"))
    packing: bool = field(
        default=True, metadata=_help("pack each minibatch's documents end to end in rows instead of padding them"))
    tau_method: str = field(
        default="auto", metadata=_help("MAP, learned tau: the validation likelihood's implicit gradient, the "
                                         "Laplace evidence, or auto (validation when there are validation "
                                         "documents, else the evidence)", choices=TAU_METHODS))
    tau_lr: float = field(
        default=0.5, metadata=_help("MAP, learned tau, tau_method='validation': Adam step size of log tau"))
    tau_gate: float = field(
        default=0.0, metadata=_help("MAP, learned tau, tau_method='validation': take Adam's steps on log tau "
                                    "only as far as the recent gradients' mean stands out of their noise "
                                    "(the step times max(0, 1 - gate / z^2)); 0: plain Adam"))
    tau_val_batches: int = field(
        default=1, metadata=_help("MAP, learned tau, tau_method='validation': validation minibatches (forward "
                                  "and backward passes) averaged in each update's gradient"))
    tau_shift_moments: bool = field(
        default=False, metadata=_help("MAP, learned tau: when tau changes, shift AdamW's moments of the offsets "
                                      "by the change of the prior's gradient, so that a rising tau does not "
                                      "take oversized steps"))
    tau_gradient: str = field(
        default="auto", metadata=_help("MAP, learned tau, tau_method='validation': how the adapters respond to "
                                       "tau, along the run (trajectory: two shadow fits at tau*1.2 and tau/1.2) "
                                       "or at an optimum (implicit); auto: trajectory on dense steps with the "
                                       "offset parameterisation, else implicit", choices=TAU_GRADIENTS))
    tau_curvature: str = field(
        default="fisher", metadata=_help("MAP, learned tau: curvature of the evidence update (true Fisher at the "
                                         "current adapters, or the running empirical Fisher)",
                                         choices=TAU_CURVATURES))
    tau_curvature_batches: int | None = field(
        default=None, metadata=_help("MAP, learned tau, tau_curvature='fisher': minibatches (extra forward and "
                                     "backward passes) per evidence update (default: 15% of the run's steps "
                                     "spread over the updates, at least 1)"))
    task_step: str = field(
        default="auto", metadata=_help("touch only the tasks in each minibatch (prior/KL split over each task's "
                                       "documents, lazy row-wise AdamW) or all tasks every step; auto: sparse "
                                       "above 4 tasks per minibatch document", choices=TASK_STEPS))
    adapter_storage: str = field(
        default="auto", metadata=_help("sparse steps: keep the [tasks, P] adapter table and its AdamW state on the "
                                       "compute device, in host memory (only the batch's rows on the device), or "
                                       "auto (host when they would not fit)", choices=ADAPTER_STORAGES))

    def __post_init__(self) -> None:
        self.max_steps = checks.optional_positive_int("max_steps", self.max_steps, none_means="use epochs")
        if self.epochs is not None:
            self.epochs = checks.positive_number("epochs", self.epochs)
        self.batch_size = checks.positive_int("batch_size", self.batch_size)
        self.lr = checks.positive_number("lr", self.lr)
        checks.choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        self.warmup_steps = checks.non_negative_int("warmup_steps", self.warmup_steps)
        self.weight_decay = checks.non_negative_number("weight_decay", self.weight_decay)
        if self.lr_per_tau is not None:
            self.lr_per_tau = checks.positive_number("lr_per_tau", self.lr_per_tau)
        self.eval_every = checks.optional_positive_int("eval_every", self.eval_every, none_means="10 per run")
        self.patience = checks.optional_positive_int("patience", self.patience, none_means="never stop early")
        self.max_eval_docs_per_task = checks.optional_positive_int(
            "max_eval_docs_per_task", self.max_eval_docs_per_task, none_means="all validation documents")
        self.tau_update_every = checks.optional_positive_int(
            "tau_update_every", self.tau_update_every, none_means="the method's default")
        if self.tau_warmup is not None:
            self.tau_warmup = checks.non_negative_int("tau_warmup", self.tau_warmup)
        checks.choice("parameterization", self.parameterization, PARAMETERIZATIONS)
        checks.choice("tau_method", self.tau_method, TAU_METHODS)
        self.tau_lr = checks.positive_number("tau_lr", self.tau_lr)
        self.tau_gate = checks.non_negative_number("tau_gate", self.tau_gate)
        self.tau_val_batches = checks.positive_int("tau_val_batches", self.tau_val_batches)
        self.num_particles = checks.positive_int("num_particles", self.num_particles)
        self.init_scale = _parse_init_scale(self.init_scale)
        if not isinstance(self.device, str):
            self.device = str(self.device)  # a torch.device; runtime.resolve_device checks it
        if self.autocast is not None:
            checks.choice("autocast", self.autocast, AUTOCAST_CHOICES + ("bfloat16", "float16"))
        self.seed = checks.non_negative_int("seed", self.seed)
        if not isinstance(self.progress, bool):
            raise ValueError(f"progress must be True or False, got progress={self.progress!r}.")
        if self.quantize is not None:
            checks.choice("quantize", self.quantize, ("4bit", "8bit"))
        self.distributed_timeout = checks.positive_number("distributed_timeout", self.distributed_timeout)
        for name in ("checkpoint_dir", "resume"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, os.fspath(value))
        self.checkpoint_every = checks.optional_positive_int(
            "checkpoint_every", self.checkpoint_every, none_means="10 per run")
        self.report_to = parse_report_to(self.report_to)
        self.report_dir = os.fspath(self.report_dir)
        if not self.report_dir:
            raise ValueError("report_dir must be a folder name, got ''; the default is 'runs'.")
        if self.run_name is not None and (not isinstance(self.run_name, str) or not self.run_name.strip()):
            raise ValueError(f"run_name must be a non-empty string or None (the method and the time), got {self.run_name!r}.")
        self.scale_lr = checks.positive_number("scale_lr", self.scale_lr)
        self.laplace_passes = checks.positive_int("laplace_passes", self.laplace_passes)
        if not isinstance(self.packing, bool):
            raise ValueError(f"packing must be True or False, got packing={self.packing!r}.")
        if not isinstance(self.tau_shift_moments, bool):
            raise ValueError(f"tau_shift_moments must be True or False, got tau_shift_moments={self.tau_shift_moments!r}.")
        checks.choice("tau_curvature", self.tau_curvature, TAU_CURVATURES)
        checks.choice("tau_gradient", self.tau_gradient, TAU_GRADIENTS)
        self.tau_curvature_batches = checks.optional_positive_int(
            "tau_curvature_batches", self.tau_curvature_batches, none_means="15% of the run's steps")
        checks.choice("task_step", self.task_step, TASK_STEPS)
        checks.choice("adapter_storage", self.adapter_storage, ADAPTER_STORAGES)
        if self.task_step == "dense" and self.adapter_storage == "host":
            raise ValueError(
                "adapter_storage='host' needs task_step='sparse' (a dense step updates every task's "
                "adapter on the compute device); pass task_step='sparse' or adapter_storage='device'."
            )

    def total_steps(self, num_train_docs: int) -> int:
        """Optimiser steps of the run: ``max_steps``, else ``epochs`` (default 3) full passes of
        ``num_train_docs // batch_size`` batches."""
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil((self.epochs or 3.0) * (num_train_docs // self.batch_size)))


def parse_report_to(value: Any) -> list[str] | None:
    """``report_to`` as ``None`` or a list of distinct tracker names (a single name, ``"none"``
    and ``["none"]`` accepted, as in transformers)."""
    if value is None:
        return None
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)):
        raise ValueError(
            f"report_to must be a tracker name, a list of them or None, got {type(value).__name__} {value!r}; "
            f"choose from {', '.join(map(repr, REPORT_TO_CHOICES))}."
        )
    names = [checks.choice("report_to", n.lower() if isinstance(n, str) else n, REPORT_TO_CHOICES + ("none",))
             for n in names]
    if "none" in names:
        if len(names) > 1:
            raise ValueError(f"report_to={value!r} mixes 'none' with trackers; give one or the other.")
        return None
    return list(dict.fromkeys(names)) or None



def split_seed(data: DataConfig, train: TrainConfig) -> int:
    """The seed of the split and of its evaluated subsets: ``data.split_seed``, or ``train.seed``
    when it is ``None``."""
    return train.seed if data.split_seed is None else data.split_seed

@dataclass(frozen=True)
class Settings:
    """The three config objects of one fit (what `resolve_settings` returns)."""

    data: DataConfig
    model: BoraConfig
    train: TrainConfig

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {"data": self.data.to_dict(), "model": self.model.to_dict(), "train": self.train.to_dict()}


_CLASSES = {"data": DataConfig, "model": BoraConfig, "train": TrainConfig}


def resolve_settings(
    *,
    data: DataConfig | None = None,
    config: BoraConfig | None = None,
    train: TrainConfig | None = None,
    **overrides: Any,
) -> Settings:
    """The config objects of a fit: the given ones (or the defaults) with flat keyword overrides.

    Every keyword names a field of `DataConfig`, `BoraConfig` or `TrainConfig` (the field names
    are unique across the three), so ``fit_map(data, rank=4, lr=1e-3)`` and
    ``fit_map(data, config=BoraConfig(rank=4), train=TrainConfig(lr=1e-3))`` are the same fit.

    Raises
    ------
    ValueError
        For a keyword that is no field (the message lists the valid ones), or an invalid value.
    TypeError
        When ``data``, ``config`` or ``train`` is not the right config class.
    """
    given = {"data": data, "model": config, "train": train}
    argument = {"data": "data_config", "model": "config", "train": "train"}
    for role, obj in given.items():
        if obj is not None and not isinstance(obj, _CLASSES[role]):
            raise TypeError(
                f"{argument[role]} must be a {_CLASSES[role].__name__}, got {type(obj).__name__}."
            )
    owner = {name: role for role, cls in _CLASSES.items() for name in cls.field_names()}
    unknown = [k for k in overrides if k not in owner]
    if unknown:
        raise ValueError(
            f"Unknown setting(s) {unknown}{checks.did_you_mean(unknown[0], owner)} Valid settings: data {DataConfig.field_names()}; model {BoraConfig.field_names()}; "
            f"training {TrainConfig.field_names()}."
        )
    split: dict[str, dict[str, Any]] = {role: {} for role in _CLASSES}
    for key, value in overrides.items():
        split[owner[key]][key] = value
    built = {}
    for role, cls in _CLASSES.items():
        base = given[role]
        if base is None:
            built[role] = cls(**split[role])
        else:
            built[role] = replace(base, **split[role]) if split[role] else base
    return Settings(data=built["data"], model=built["model"], train=built["train"])
