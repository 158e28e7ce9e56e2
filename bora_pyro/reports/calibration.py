r"""Calibration of next-token predictions per task: expected calibration error and reliability data.

For every scored token the model's top-1 prediction has a *confidence* (its probability) and is
*correct* or not. With equal-width confidence bins ``B_b = ((b - 1) / M, b / M]`` (``b = 1..M``,
confidence 0 in the first bin), the expected calibration error of N predictions is

    ECE = sum_b (n_b / N) |acc_b - conf_b|

with ``n_b`` the predictions in bin b, ``acc_b`` their share of correct ones and ``conf_b`` their
mean confidence (Guo et al., 2017; ``M = 15`` by default). It is 0 for a model whose 70%-sure
predictions are right 70% of the time, and so on for every bin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..checks import positive_int
from ..data import IGNORE_INDEX
from ..evaluation import evaluation_options, evaluation_split, iterate_split, select_adapters
from .protocol import FitLike

__all__ = ["Calibration", "expected_calibration_error", "calibration_per_task"]


def _bin_index(confidences: np.ndarray | torch.Tensor, n_bins: int):
    """Bin of each confidence: ``ceil(c * M) - 1`` clipped to ``0 .. M - 1`` (right-closed bins)."""
    if isinstance(confidences, torch.Tensor):
        return (torch.ceil(confidences * n_bins).long() - 1).clamp(0, n_bins - 1)
    return np.clip(np.ceil(confidences * n_bins).astype(np.int64) - 1, 0, n_bins - 1)


def expected_calibration_error(confidences, correct, n_bins: int = 15) -> float:
    """Expected calibration error with ``n_bins`` equal-width bins on [0, 1] (see the module doc).

    Parameters
    ----------
    confidences
        ``[N]`` probabilities of the predicted outcome, in [0, 1].
    correct
        ``[N]`` whether each prediction was right (bool or 0/1).
    n_bins
        Number of bins M.

    Returns
    -------
    The ECE, a float in [0, 1]; ``nan`` for N = 0.
    """
    n_bins = positive_int("n_bins", n_bins)
    conf = np.asarray(confidences, dtype=np.float64).reshape(-1)
    hit = np.asarray(correct, dtype=np.float64).reshape(-1)
    if conf.shape != hit.shape:
        raise ValueError(
            f"confidences and correct must have the same length, got {conf.shape[0]} and {hit.shape[0]}."
        )
    if conf.size == 0:
        return math.nan
    if not ((conf >= 0) & (conf <= 1)).all():
        raise ValueError(
            f"confidences must lie in [0, 1], got values in [{np.nanmin(conf)}, {np.nanmax(conf)}]"
            f"{' and nan' if np.isnan(conf).any() else ''}; pass probabilities, not logits."
        )
    b = _bin_index(conf, n_bins)
    # sum_b (n_b / N) |acc_b - conf_b| = sum_b |sum_{i in b} (correct_i - conf_i)| / N
    gap = np.bincount(b, weights=hit - conf, minlength=n_bins)
    return float(np.abs(gap).sum() / conf.size)


@dataclass
class Calibration:
    """Binned top-1 confidence and accuracy of next-token predictions, per task.

    Attributes
    ----------
    tasks
        Task names (``D``).
    edges
        ``[M + 1]`` bin edges ``0, 1/M, ..., 1``.
    count
        ``[D, M]`` scored tokens per task and bin.
    confidence_sum, correct_sum
        ``[D, M]`` summed confidence and number of correct top-1 predictions per task and bin.
    split
        The split the tokens came from.
    """

    tasks: list[str]
    edges: np.ndarray
    count: np.ndarray
    confidence_sum: np.ndarray
    correct_sum: np.ndarray
    split: str = "test"

    @property
    def n_bins(self) -> int:
        return len(self.edges) - 1

    def ece(self) -> np.ndarray:
        """``[D]`` expected calibration error of each task (``nan`` for a task without tokens)."""
        n = self.count.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.abs(self.correct_sum - self.confidence_sum).sum(1) / np.where(n > 0, n, np.nan)

    def overall_ece(self) -> float:
        """ECE of all tokens of all tasks together (the bins pooled over tasks)."""
        n = self.count.sum()
        gap = (self.correct_sum - self.confidence_sum).sum(0)
        return float(np.abs(gap).sum() / n) if n else math.nan

    def table(self) -> pd.DataFrame:
        """One row per task and a last row ``overall``: ``task``, ``n_tokens``, ``accuracy``
        (top-1 next-token accuracy), ``confidence`` (mean top-1 probability), ``ece``."""
        n = np.append(self.count.sum(1), self.count.sum())
        correct = np.append(self.correct_sum.sum(1), self.correct_sum.sum())
        conf = np.append(self.confidence_sum.sum(1), self.confidence_sum.sum())
        with np.errstate(invalid="ignore", divide="ignore"):
            safe = np.where(n > 0, n, np.nan)
            return pd.DataFrame({
                "task": list(self.tasks) + ["overall"],
                "n_tokens": n.astype(np.int64),
                "accuracy": correct / safe,
                "confidence": conf / safe,
                "ece": np.append(self.ece(), self.overall_ece()),
            })

    def reliability(self, task: str | None = None) -> pd.DataFrame:
        """Reliability-diagram data: one row per bin with ``lower``, ``upper``, ``count``,
        ``confidence`` (mean in the bin) and ``accuracy`` (``nan`` for empty bins); for one task
        by name, or for all tasks pooled (``task=None``)."""
        if task is None:
            count, conf, hit = self.count.sum(0), self.confidence_sum.sum(0), self.correct_sum.sum(0)
        else:
            if task not in self.tasks:
                raise ValueError(f"task={task!r} is not one of the tasks {self.tasks}.")
            d = self.tasks.index(task)
            count, conf, hit = self.count[d], self.confidence_sum[d], self.correct_sum[d]
        with np.errstate(invalid="ignore", divide="ignore"):
            safe = np.where(count > 0, count, np.nan)
            return pd.DataFrame({
                "lower": self.edges[:-1], "upper": self.edges[1:], "count": count.astype(np.int64),
                "confidence": conf / safe, "accuracy": hit / safe,
            })


def calibration_per_task(
    result: FitLike,
    split: str = "test",
    *,
    adapters: str = "tasks",
    max_docs_per_task: int | None = None,
    batch_size: int | None = None,
    n_bins: int = 15,
    seed: int = 0,
    progress: bool = False,
) -> Calibration:
    """Top-1 next-token confidence and correctness of every scored token, binned per task.

    One forward pass per batch of documents (tasks mixed, each row with its own task's adapter),
    through `bora_pyro.evaluation.iterate_split` as in `BoraResult.evaluate`. Under SVI the
    posterior-mean adapters are used.

    Parameters
    ----------
    result
        A fitted result (`FitLike`, e.g. a `BoraResult`).
    split
        ``"test"``, ``"validation"`` or ``"train"``; it must have documents.
    adapters
        ``"tasks"``, ``"global"`` or ``"base"``, as in `BoraResult.evaluate`.
    max_docs_per_task
        Use a seeded subset of at most this many documents per task (`TaskSplit.subset`).
    batch_size
        Documents per forward pass (default: twice the training batch size).
    n_bins
        Equal-width confidence bins (15 is the common choice).
    seed
        Seed of the subset.
    progress
        Show a progress bar.

    Returns
    -------
    `Calibration`; ``.table()`` has the ECE per task, ``.reliability(task)`` the diagram data.
    """
    n_bins = positive_int("n_bins", n_bins)
    theta = select_adapters(result, adapters)
    data = evaluation_split(result.corpus, split, max_docs_per_task=max_docs_per_task, seed=seed)
    D = len(result.tasks)
    count = torch.zeros(D * n_bins, dtype=torch.float64)
    conf_sum = torch.zeros(D * n_bins, dtype=torch.float64)
    hit_sum = torch.zeros(D * n_bins, dtype=torch.float64)
    for batch, logits, _ in iterate_split(
        result.lm, data, theta, output="logits", progress=progress, desc="calibration",
        **evaluation_options(result, batch_size),
    ):
        logits = logits[:, :-1].float()
        target = batch.labels[:, 1:]
        scored = target != IGNORE_INDEX
        top, pred = logits.max(-1)
        conf = (top - torch.logsumexp(logits, -1)).exp()  # max softmax probability, [B, L-1]
        hit = (pred == target) & scored
        task_tok = batch.task_ids[:, None].expand_as(target)
        cell = (task_tok * n_bins + _bin_index(conf, n_bins))[scored].cpu()
        count.index_add_(0, cell, torch.ones(cell.shape, dtype=torch.float64))
        conf_sum.index_add_(0, cell, conf[scored].double().cpu())
        hit_sum.index_add_(0, cell, hit[scored].double().cpu())
    shape = (D, n_bins)
    return Calibration(
        tasks=list(result.tasks),
        edges=np.linspace(0.0, 1.0, n_bins + 1),
        count=count.view(shape).numpy().astype(np.int64),
        confidence_sum=conf_sum.view(shape).numpy(),
        correct_sum=hit_sum.view(shape).numpy(),
        split=split,
    )
