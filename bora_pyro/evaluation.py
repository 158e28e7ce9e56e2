"""Per-task held-out log-likelihood and perplexity, one forward pass per mixed-task batch; posterior-
predictive perplexity with intervals from posterior draws."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

__all__ = ["per_doc_nll", "per_task_nll", "perplexity_table", "predictive_table"]


@torch.no_grad()
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
    """Negative log-likelihood (summed over scored tokens) and scored tokens of every document.

    Parameters
    ----------
    lm
        A `MultiTaskLM`.
    adapters
        ``[D, P]`` task adapters, a ``[P]`` adapter for every task, or ``None`` (base model).
    split
        A `TaskSplit`.

    Returns
    -------
    nll, tokens
        float64 ``[num_docs]`` and int64 ``[num_docs]`` on the CPU, indexed by document.
    """
    device = torch.device(device)
    nll = torch.zeros(len(split), dtype=torch.float64, device=device)
    tokens = torch.zeros(len(split), dtype=torch.long, device=device)
    if adapters is not None:
        adapters = adapters.to(device)
    amp = (
        torch.autocast(device.type, dtype=autocast_dtype)
        if autocast_dtype is not None else contextlib.nullcontext()
    )
    batches = split.batches(batch_size, shuffle=False, sort_by_length=True)
    total = math.ceil(len(split) / batch_size)
    for batch in tqdm(batches, total=total, disable=not progress, desc=f"evaluate {split.name}", leave=False):
        batch = batch.to(device)
        task_ids = batch.task_ids if adapters is not None and adapters.dim() == 2 else None
        with amp:
            row_nll = lm.sequence_nll(
                batch.input_ids, batch.attention_mask, batch.labels, adapters=adapters, task_ids=task_ids
            )
        nll[batch.doc_index] = row_nll.double()
        tokens[batch.doc_index] = (batch.labels[:, 1:] != -100).sum(-1)
    return nll.cpu(), tokens.cpu()


def per_task_nll(lm, adapters, split, *, num_tasks: int, **kwargs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Summed NLL, scored tokens and documents per task over a split (see `per_doc_nll`).

    Returns float64 ``[D]``, int64 ``[D]``, int64 ``[D]`` numpy arrays.
    """
    nll, tokens = per_doc_nll(lm, adapters, split, **kwargs)
    task_ids = split.task_ids.cpu()
    return (
        _per_task(nll, task_ids, num_tasks).numpy(),
        _per_task(tokens, task_ids, num_tasks).numpy(),
        np.bincount(task_ids.numpy(), minlength=num_tasks),
    )


def _per_task(values: torch.Tensor, task_ids: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """Sum ``values [..., N]`` over the documents of each task: ``[..., D]``."""
    out = torch.zeros(*values.shape[:-1], num_tasks, dtype=values.dtype)
    return out.index_add_(-1, task_ids, values)


def predictive_table(
    tasks: list[str],
    draws_nll: torch.Tensor,
    mean_nll: torch.Tensor,
    tokens: torch.Tensor,
    task_ids: torch.Tensor,
    *,
    interval: float = 0.95,
) -> pd.DataFrame:
    """Posterior-predictive perplexity per task, with an interval over posterior draws.

    Parameters
    ----------
    draws_nll
        ``[S, N]`` NLL of each document under each of S posterior draws of the adapters.
    mean_nll
        ``[N]`` NLL of each document at the posterior mean.
    tokens, task_ids
        ``[N]`` scored tokens and task of each document.

    Returns
    -------
    The `perplexity_table` columns, where ``nll`` / ``perplexity`` are posterior-predictive
    (per document ``-log mean_s p(doc | theta_s)``, a Monte Carlo log-mean-exp), plus
    ``perplexity_at_mean`` (at the posterior mean) and ``perplexity_low`` / ``perplexity_high``:
    the central ``interval`` of the task's perplexity over the draws.
    """
    S = draws_nll.shape[0]
    D = len(tasks)
    pred_doc = -(torch.logsumexp(-draws_nll, dim=0) - math.log(S))  # [N]
    docs = np.bincount(task_ids.numpy(), minlength=D)
    table = perplexity_table(
        tasks, _per_task(pred_doc, task_ids, D).numpy(), _per_task(tokens, task_ids, D).numpy(), docs
    )
    tok = torch.cat([_per_task(tokens, task_ids, D), tokens.sum().reshape(1)]).double().clamp_min(1)
    per_draw = torch.cat([_per_task(draws_nll, task_ids, D), draws_nll.sum(-1, keepdim=True)], -1) / tok
    at_mean = torch.cat([_per_task(mean_nll, task_ids, D), mean_nll.sum().reshape(1)]) / tok
    q = torch.tensor([(1 - interval) / 2, (1 + interval) / 2], dtype=per_draw.dtype)
    low, high = torch.quantile(per_draw, q, dim=0).exp()
    table["perplexity_at_mean"] = at_mean.exp().numpy()
    table["perplexity_low"] = low.numpy()
    table["perplexity_high"] = high.numpy()
    table.attrs["num_samples"] = S
    table.attrs["interval"] = interval
    return table


def perplexity_table(tasks: list[str], nll: np.ndarray, tokens: np.ndarray, docs: np.ndarray) -> pd.DataFrame:
    """One row per task and a last row ``overall`` (token-weighted).

    Columns: ``task``, ``n_docs``, ``n_tokens``, ``nll`` (mean per token, nats) and
    ``perplexity`` (``exp(nll)``). The overall perplexity is also in ``df.attrs["overall_perplexity"]``.
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
