"""Per-task held-out log-likelihood and perplexity, one forward pass per mixed-task batch."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

__all__ = ["per_task_nll", "perplexity_table"]


@torch.no_grad()
def per_task_nll(
    lm,
    adapters: torch.Tensor | None,
    split,
    *,
    num_tasks: int,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Summed negative log-likelihood, scored tokens and documents per task over a split.

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
    nll, tokens, docs
        float64 ``[D]``, int64 ``[D]``, int64 ``[D]``.
    """
    device = torch.device(device)
    nll = torch.zeros(num_tasks, dtype=torch.float64, device=device)
    tokens = torch.zeros(num_tasks, dtype=torch.long, device=device)
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
        row_tokens = (batch.labels[:, 1:] != -100).sum(-1)
        nll.index_add_(0, batch.task_ids, row_nll.double())
        tokens.index_add_(0, batch.task_ids, row_tokens)
    docs = np.bincount(split.task_ids.cpu().numpy(), minlength=num_tasks)
    return nll.cpu().numpy(), tokens.cpu().numpy(), docs


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
