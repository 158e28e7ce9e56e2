"""Held-out evaluation: one walk over a split, per-document and per-task log-likelihood,
perplexity tables and posterior-predictive perplexity.

`iterate_split` is the only loop in the library that runs the LM over a split for evaluation:
per-document NLL (`per_doc_nll`, `BoraResult.evaluate`), calibration
(`bora_pyro.reports.calibration_per_task`) and the curvature of the arviz export
(`bora_pyro.reports.diagonal_fisher`) all walk the split through it, so the batching, the device,
the autocast context and the checks are written once.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Iterator, NamedTuple

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import distributed, runtime
from .checks import choice, optional_positive_int, positive_int
from .data import IGNORE_INDEX

__all__ = [
    "ADAPTER_CHOICES",
    "ScoredBatch",
    "iterate_split",
    "evaluation_split",
    "evaluation_options",
    "select_adapters",
    "per_doc_nll",
    "per_doc_nll_draws",
    "per_task_nll",
    "perplexity_table",
    "predictive_table",
    "scored_tokens",
    "sum_per_task",
]

#: What ``adapters=`` may select for evaluation: each task's own, the global one, or none.
ADAPTER_CHOICES = ("tasks", "global", "base")
#: What `iterate_split` computes for each batch.
OUTPUTS = ("nll", "logits")


class ScoredBatch(NamedTuple):
    """One step of `iterate_split`.

    Attributes
    ----------
    batch
        The `Batch` on the device (``doc_index`` says which documents of the split its rows are).
    output
        ``[B]`` fp32 NLL of each row summed over its scored tokens (``output="nll"``), or
        ``[B, L, V]`` logits (``output="logits"``).
    rows
        With ``row_gradients=True``: the ``[B, P]`` leaf holding each row's copy of its task's
        adapter (the gradient of ``output.sum()`` w.r.t. it holds the per-row gradients);
        otherwise ``None``.
    """

    batch: Any
    output: torch.Tensor
    rows: torch.Tensor | None


def scored_tokens(labels: torch.Tensor) -> torch.Tensor:
    """``[N]`` scored (predicted) tokens of each row: labels after the first position that are
    not `IGNORE_INDEX` (position ``t`` is predicted from ``< t``; position 0 never is)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(-1)


def _require_documents(split) -> None:
    if len(split) == 0:
        size = {"test": "test_size=0", "validation": "validation_size=0"}.get(split.name)
        why = f" (the corpus was built with {size}, or the data has none)" if size else ""
        raise ValueError(
            f"The {split.name!r} split has no documents{why}, so there is nothing to evaluate; "
            f"evaluate another split, or rebuild the corpus with a non-empty {split.name!r} split."
        )


def iterate_split(
    lm,
    split,
    adapters: torch.Tensor | None = None,
    *,
    output: str = "nll",
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    row_gradients: bool = False,
    progress: bool = False,
    desc: str | None = None,
) -> Iterator[ScoredBatch]:
    """Walk a split in batches (longest documents first, tasks mixed) and run the LM on each.

    Every batch is one forward pass of the base model, each row with its own task's adapter,
    under the autocast context of `bora_pyro.runtime.autocast` (only the forward pass: the
    caller's code between steps runs outside it), without autograd unless ``row_gradients``.

    Parameters
    ----------
    lm
        A `MultiTaskLM`.
    split
        A `TaskSplit` with at least one document.
    adapters
        ``[D, P]`` task adapters (row n uses its task's), one ``[P]`` adapter for every row, or
        ``None`` (the base model). A ``[D, P]`` table stays on its device (e.g. the CPU): each
        batch gathers the rows of its K distinct tasks there and moves only those.
    output
        ``"nll"``: ``[B]`` NLL of each row summed over its scored tokens (`MultiTaskLM.sequence_nll`);
        ``"logits"``: ``[B, L, V]`` logits.
    batch_size
        Documents per forward pass.
    device, autocast_dtype
        Where to run, and the autocast dtype of the base model (``None``: fp32).
    row_gradients
        Give every row its own copy of its task's adapter (needs ``[D, P]`` adapters), as a leaf
        that requires grad, and run with autograd on: the per-document gradients of one backward
        pass, at the cost of ``B x P`` floats (see `bora_pyro.reports.diagonal_fisher`).
    progress, desc
        Show a progress bar, with this label.

    Yields
    ------
    ScoredBatch
        ``(batch, output, rows)``, every document of the split exactly once.

    Raises
    ------
    ValueError
        For an empty split (e.g. the test split of a corpus built with ``test_size=0``), a bad
        ``batch_size`` or ``output``, or ``row_gradients`` without ``[D, P]`` adapters.
    """
    output = choice("output", output, OUTPUTS)
    batch_size = positive_int("batch_size", batch_size)
    _require_documents(split)
    device = torch.device(device)
    per_task = adapters is not None and adapters.dim() == 2
    if row_gradients and not per_task:
        shape = None if adapters is None else tuple(adapters.shape)
        raise ValueError(f"row_gradients=True needs [D, P] task adapters, got adapters of shape {shape}.")
    if adapters is not None:
        # [D, P] tables stay where they are: each batch moves only the rows of its own tasks
        adapters = adapters.detach().float() if per_task else adapters.detach().to(device, torch.float32)
    total = math.ceil(len(split) / batch_size)
    batches = split.batches(batch_size, shuffle=False, sort_by_length=True)
    label = desc or f"{output} {split.name}"
    for host in tqdm(batches, total=total, disable=not progress, desc=label, leave=False):
        batch = host.to(device)
        theta, task_ids, groups, rows = adapters, None, None, None
        if per_task:
            # the K distinct tasks' rows, gathered where the table lives ([K, P] moved, not [D, P])
            theta = adapters.index_select(0, host.groups.tasks.to(adapters.device)).to(device)
            task_ids, groups = batch.groups.local, batch.groups.as_rows()
        if row_gradients:
            rows = theta.index_select(0, batch.groups.local).requires_grad_(True)  # [B, P]
            theta, task_ids, groups = rows, torch.arange(len(batch), device=device), None
        with torch.set_grad_enabled(row_gradients), runtime.autocast(device, autocast_dtype):
            if output == "nll":
                out = lm.sequence_nll(
                    batch.input_ids, batch.attention_mask, batch.labels, adapters=theta, task_ids=task_ids,
                    groups=groups,
                )
            else:
                out = lm(batch.input_ids, batch.attention_mask, adapters=theta, task_ids=task_ids, groups=groups)
        yield ScoredBatch(batch, out, rows)


# -- what a fitted result evaluates on ------------------------------------------------------------


def evaluation_split(corpus, split: str, *, max_docs_per_task: int | None = None, seed: int = 0):
    """The documents of ``corpus.split(split)`` to evaluate: all of them, or a seeded subset of
    at most ``max_docs_per_task`` per task (`TaskSplit.subset`).

    Raises
    ------
    ValueError
        For an empty split (naming it) or a bad ``max_docs_per_task``.
    """
    data = corpus.split(split)
    _require_documents(data)
    max_docs_per_task = optional_positive_int("max_docs_per_task", max_docs_per_task, none_means="all documents")
    return data if max_docs_per_task is None else data.subset(max_docs_per_task, seed=seed)


def evaluation_options(fit, batch_size: int | None = None) -> dict[str, Any]:
    """``batch_size``, ``device`` and ``autocast_dtype`` to evaluate a fitted result with: the
    given batch size (default twice the training batch size), the result's device and the
    autocast it was fitted with (``fit.fit_args["autocast"]``)."""
    batch_size = optional_positive_int("batch_size", batch_size, none_means="twice the training batch size")
    return {
        "batch_size": batch_size or 2 * int(fit.fit_args.get("batch_size", 8)),
        "device": fit.device,
        "autocast_dtype": runtime.autocast_dtype(fit.fit_args.get("autocast"), fit.device),
    }


def select_adapters(fit, adapters: str) -> torch.Tensor | None:
    """``fit.task_adapters`` (``"tasks"``), ``fit.global_adapter`` (``"global"``) or ``None``
    (``"base"``: the base model without adapters)."""
    adapters = choice("adapters", adapters, ADAPTER_CHOICES)
    return {"tasks": fit.task_adapters, "global": fit.global_adapter, "base": None}[adapters]


# -- log-likelihood ---------------------------------------------------------------------------------


def per_doc_nll(
    lm,
    adapters: torch.Tensor | None,
    split,
    *,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Negative log-likelihood of every document and its number of scored tokens.

    ``nll[n] = -sum_{t scored} log p(x_{n,t} | x_{n,<t})`` under the adapter of the document's
    task (see `iterate_split` for ``adapters``, ``batch_size``, ``device`` and ``autocast_dtype``).

    Under data parallel (`bora_pyro.distributed`) each rank scores every ``W``-th document and
    the results are summed over ranks, so every rank must call it and every rank gets all
    documents' values.

    Returns
    -------
    nll, tokens
        float64 ``[num_docs]`` and int64 ``[num_docs]`` on the CPU, indexed by document of ``split``.
    """
    device = torch.device(device)
    nll = torch.zeros(len(split), dtype=torch.float64, device=device)
    tokens = torch.zeros(len(split), dtype=torch.long, device=device)
    own, mine = split, None
    if distributed.active():
        _require_documents(split)
        mine = torch.from_numpy(distributed.shard_indices(len(split))).to(device)
        own = split.select(mine.cpu().numpy())
    if mine is None or len(own):  # a rank may have no document of a tiny split
        for batch, row_nll, _ in iterate_split(
            lm, own, adapters, batch_size=batch_size, device=device, autocast_dtype=autocast_dtype,
            progress=progress and distributed.is_main(), desc=f"evaluate {split.name}",
        ):
            index = batch.doc_index if mine is None else mine[batch.doc_index]
            nll[index] = row_nll.double()
            tokens[index] = scored_tokens(batch.labels)
    if mine is not None:
        nll, tokens = distributed.sum_over_ranks(nll), distributed.sum_over_ranks(tokens)
    return nll.cpu(), tokens.cpu()


def per_doc_nll_draws(lm, draws: Iterable[torch.Tensor], split, *, progress: bool = False, **kwargs) -> torch.Tensor:
    """``[S, num_docs]`` float64 NLL of every document under each of S adapter draws.

    ``draws`` yields ``[D, P]`` task adapters (e.g. posterior draws); each costs one pass over
    the split. Keywords as in `per_doc_nll`.
    """
    draws = tqdm(draws, desc="posterior draws", disable=not progress, leave=False)
    rows = [per_doc_nll(lm, theta, split, **kwargs)[0] for theta in draws]
    if not rows:
        raise ValueError("draws yielded no adapters; pass at least one [D, P] draw.")
    return torch.stack(rows)


def per_task_nll(lm, adapters, split, *, num_tasks: int, **kwargs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Summed NLL, scored tokens and documents per task over a split (see `per_doc_nll`).

    Returns float64 ``[D]``, int64 ``[D]``, int64 ``[D]`` numpy arrays.
    """
    nll, tokens = per_doc_nll(lm, adapters, split, **kwargs)
    task_ids = split.task_ids.cpu()
    return (
        sum_per_task(nll, task_ids, num_tasks).numpy(),
        sum_per_task(tokens, task_ids, num_tasks).numpy(),
        np.bincount(task_ids.numpy(), minlength=num_tasks),
    )


def sum_per_task(values: torch.Tensor, task_ids: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """Sum ``values [..., N]`` over the documents of each task (``task_ids [N]``): ``[..., D]``."""
    out = torch.zeros(*values.shape[:-1], num_tasks, dtype=values.dtype)
    return out.index_add_(-1, task_ids, values)


def predictive_table(
    tasks: list[str],
    draws_nll: torch.Tensor,
    tokens: torch.Tensor,
    task_ids: torch.Tensor,
    *,
    mean_nll: torch.Tensor | None = None,
    interval: float = 0.95,
) -> pd.DataFrame:
    """Posterior-predictive perplexity per task, with an interval over posterior draws.

    Parameters
    ----------
    draws_nll
        ``[S, N]`` NLL of each document under each of S posterior draws of the adapters.
    tokens, task_ids
        ``[N]`` scored tokens and task of each document.
    mean_nll
        ``[N]`` NLL of each document at the posterior mean, optional.
    interval
        Probability mass of the central interval.

    Returns
    -------
    The `perplexity_table` columns, where ``nll`` / ``perplexity`` are posterior-predictive
    (per document ``-log mean_s p(doc | theta_s)``, a Monte Carlo log-mean-exp), plus
    ``perplexity_low`` / ``perplexity_high``: the central ``interval`` of the task's perplexity
    ``exp(sum_n nll_sn / tokens)`` over the draws, and with ``mean_nll`` ``perplexity_at_mean``.
    """
    S = draws_nll.shape[0]
    D = len(tasks)
    pred_doc = -(torch.logsumexp(-draws_nll, dim=0) - math.log(S))  # [N]
    docs = np.bincount(task_ids.numpy(), minlength=D)
    table = perplexity_table(
        tasks, sum_per_task(pred_doc, task_ids, D).numpy(), sum_per_task(tokens, task_ids, D).numpy(), docs
    )
    tok = torch.cat([sum_per_task(tokens, task_ids, D), tokens.sum().reshape(1)]).double().clamp_min(1)
    per_draw = torch.cat([sum_per_task(draws_nll, task_ids, D), draws_nll.sum(-1, keepdim=True)], -1) / tok
    if mean_nll is not None:
        at_mean = torch.cat([sum_per_task(mean_nll, task_ids, D), mean_nll.sum().reshape(1)]) / tok
        table["perplexity_at_mean"] = at_mean.exp().numpy()
    q = torch.tensor([(1 - interval) / 2, (1 + interval) / 2], dtype=per_draw.dtype)
    low, high = torch.quantile(per_draw, q, dim=0).exp()
    table["perplexity_low"] = low.numpy()
    table["perplexity_high"] = high.numpy()
    table.attrs["num_samples"] = S
    table.attrs["interval"] = interval
    return table


def perplexity_table(tasks: list[str], nll: np.ndarray, tokens: np.ndarray, docs: np.ndarray) -> pd.DataFrame:
    """One row per task and a last row ``overall`` (token-weighted).

    Columns: ``task``, ``n_docs``, ``n_tokens``, ``nll`` (mean per token, nats) and
    ``perplexity`` (``exp(nll)``); ``nan`` for a task without scored tokens in the split. The
    overall perplexity is also in ``df.attrs["overall_perplexity"]``.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        per_token = np.where(tokens > 0, nll / np.maximum(tokens, 1), np.nan)
    df = pd.DataFrame({
        "task": list(tasks),
        "n_docs": docs.astype(int),
        "n_tokens": tokens.astype(int),
        "nll": per_token,
        "perplexity": np.exp(per_token),
    })
    total_tokens = int(tokens.sum())
    overall_nll = float(nll.sum() / total_tokens) if total_tokens else math.nan
    overall = pd.DataFrame({
        "task": ["overall"], "n_docs": [int(docs.sum())], "n_tokens": [total_tokens],
        "nll": [overall_nll], "perplexity": [math.exp(overall_nll) if total_tokens else math.nan],
    })
    df = pd.concat([df, overall], ignore_index=True)
    df.attrs["overall_perplexity"] = float(overall["perplexity"].iloc[0])
    return df
