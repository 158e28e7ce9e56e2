r"""Diagonal curvature of each task's negative log-likelihood in its adapter, ``[D, P]``.

The evidence update of a learned tau (`precision.evidence_update`) and the MAP shrinkage need
``h_di``, the curvature of ``-log p(data_d | theta_d)`` in entry ``i`` of ``theta_d``. For a
softmax (categorical) likelihood over logits ``f_t(theta)`` at the scored positions ``t``, with
``p_t = softmax(f_t)``, ``J_t = d f_t / d theta`` and observed labels ``y_t``, the candidates are::

    Hessian          H   = sum_t J_t^T (diag p_t - p_t p_t^T) J_t + sum_t sum_v (p_tv - [y_t = v]) d^2 f_tv
    true Fisher/GGN  F   = sum_t J_t^T (diag p_t - p_t p_t^T) J_t = E_{y ~ p}[g(y) g(y)^T]
    empirical Fisher EF  = sum_n g_n(y_n) g_n(y_n)^T,   g_n = per-document gradient, observed labels

(for a softmax likelihood the generalised Gauss-Newton matrix *is* the true Fisher). The
empirical Fisher equals F only where the model's predictive matches the data; far from the
optimum it is biased (Kunstner et al. 2019, "Limitations of the empirical Fisher
approximation"); F is always positive semi-definite and is the expected Hessian under the model.

`MonteCarloFisher` estimates ``diag F`` per task without bias from one extra backward pass on a
minibatch: the labels at the scored positions are *sampled from the model's own predictive*
(``y~_t ~ p_t``, the prefix stays the observed text), and the squared per-document gradients
``g_n(y~)^2`` are accumulated. Since ``E[p_t - e_{y~_t}] = 0`` and the draws are independent
across positions, ``E[g_n(y~)^2] = sum_{t in n} diag(J_t^T (diag p_t - p_t p_t^T) J_t)`` exactly.

Why squared *per-document* gradients and not the variance of minibatch gradients: the
sampled-label gradient has mean exactly zero, so subtracting a running mean (the variance
trick of `precision.FisherEstimate`) only adds noise; and the square of the summed minibatch
gradient, although unbiased too, adds the zero-mean cross terms between documents to the noise.
Per-document gradients cost nothing extra: the forward pass already gathers one adapter row per
document, so the backward pass can stop at those ``[B, P]`` rows.

The exact references (`exact_fisher_diagonal`, `hessian_diagonal`, `empirical_fisher_diagonal`)
cost one backward pass per parameter (``P`` passes): for tests and diagnosis on tiny models.

Everything here talks to the model through a *logits function*
``logits_fn(rows, batch) -> (logits [B, T, V], targets [B, T])``: ``rows`` ``[B, P]`` holds one
adapter per batch row, ``logits[n, t]`` predicts ``targets[n, t]``, and unscored positions have
target ``IGNORE_INDEX``. Row ``n``'s output must depend on ``rows[n]`` only. `lm_logits` builds it
for a `MultiTaskLM`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol, Sequence

import torch
import torch.nn.functional as F

from ..data import IGNORE_INDEX

__all__ = [
    "FisherSampler",
    "MonteCarloFisher",
    "lm_logits",
    "next_token_targets",
    "sample_targets",
    "squared_gradients",
    "per_document_gradients",
    "exact_fisher_diagonal",
    "hessian_diagonal",
    "empirical_fisher_diagonal",
]


class _Batch(Protocol):
    task_ids: torch.Tensor  # [B]


LogitsFn = Callable[[torch.Tensor, _Batch], tuple[torch.Tensor, torch.Tensor]]


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` targets of ``[B, T]`` labels: ``targets[n, t] = labels[n, t + 1]`` (what
    ``logits[n, t]`` predicts), `IGNORE_INDEX` at the last position."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def lm_logits(lm) -> LogitsFn:
    """The logits function of a `MultiTaskLM`: document ``n`` of the batch gets adapter ``rows[n]``.

    ``targets`` are the batch's labels shifted by one (``logits[n, t]`` predicts token ``t + 1``),
    as in `MultiTaskLM.sequence_nll`. A packed batch (``segment_ids``) has fewer rows than
    documents: its logits are per row, but each token still sees only its own document's adapter
    ``rows[n]``, so the gradient of the summed NLL in ``rows[n]`` is document ``n``'s alone.
    """

    def logits_fn(rows: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
        own = torch.arange(rows.shape[0], device=rows.device)
        logits = lm(batch.input_ids, batch.attention_mask, adapters=rows, task_ids=own,
                    position_ids=getattr(batch, "position_ids", None),
                    segment_ids=getattr(batch, "segment_ids", None))
        return logits, next_token_targets(batch.labels)

    return logits_fn


def sample_targets(
    logits: torch.Tensor, targets: torch.Tensor, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``targets`` ``[B, T]`` with each scored entry replaced by a draw from ``softmax(logits)``.

    Unscored positions (``IGNORE_INDEX``) stay unscored. ``logits``: ``[B, T, V]``.
    """
    scored = targets != IGNORE_INDEX
    probs = logits.detach()[scored].float().softmax(-1)  # [M, V]
    sampled = targets.clone()
    if probs.shape[0]:
        if not bool(torch.isfinite(probs).all()):
            raise FloatingPointError(
                "the model's predictive has non-finite probabilities: the adapters are no longer finite."
            )
        sampled[scored] = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return sampled


def _row_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[B]``: summed token NLL of each row (fp32)."""
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="none",
    )
    return nll.view(targets.shape).sum(-1)


def squared_gradients(
    logits: torch.Tensor,
    targets: torch.Tensor,
    rows: torch.Tensor,
    *,
    sampled: bool,
    samples: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""``[B, P]`` squared per-document gradients ``g_n^2`` of the row NLLs in their adapters.

    Parameters
    ----------
    logits, targets
        ``[B, T, V]`` and ``[B, T]`` (`IGNORE_INDEX` where unscored), computed from ``rows``.
    rows
        ``[B, P]`` leaf: row ``n``'s adapter (row ``n``'s logits depend on ``rows[n]`` only).
    sampled
        ``True``: labels drawn from ``softmax(logits)`` at the scored positions, averaged over
        ``samples`` independent draws, ``mean_s g_n(y~_s)^2``, whose expectation is the diagonal
        true Fisher of document ``n`` (one backward pass per draw, the forward pass shared);
        ``False``: the observed ``targets`` (the empirical Fisher; ``samples`` must be 1).
    generator
        Source of the label draws.
    """
    if samples < 1 or (not sampled and samples != 1):
        raise ValueError(f"samples must be >= 1 (and 1 with observed labels), got samples={samples!r}.")
    total = None
    for s in range(samples):
        y = sample_targets(logits, targets, generator=generator) if sampled else targets
        (grad,) = torch.autograd.grad(_row_nll(logits, y).sum(), rows, retain_graph=s < samples - 1)
        total = grad.float().square() if total is None else total.add_(grad.float().square())
    return total / samples


def _rows(task_adapters: torch.Tensor, batch) -> torch.Tensor:
    return task_adapters.detach().float().index_select(0, batch.task_ids).requires_grad_(True)


def per_document_gradients(
    logits_fn: LogitsFn,
    task_adapters: torch.Tensor,
    batch,
    *,
    sampled: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``[B, P]``: the gradient of each document's NLL in its task's adapter (one backward pass).

    Parameters
    ----------
    logits_fn
        See the module docstring.
    task_adapters
        ``[D, P]``.
    batch
        Has ``task_ids [B]`` and whatever ``logits_fn`` reads.
    sampled
        ``True``: labels drawn from the model's predictive at the scored positions (`sample_targets`);
        ``False``: the observed labels.
    generator
        Source of the label draws.
    """
    rows = _rows(task_adapters, batch)
    logits, targets = logits_fn(rows, batch)
    if sampled:
        targets = sample_targets(logits, targets, generator=generator)
    (grad,) = torch.autograd.grad(_row_nll(logits, targets).sum(), rows)
    return grad


@dataclass(frozen=True)
class FisherSampler:
    """What a MAP run needs to estimate the true Fisher of each task: per-document gradients
    with observations drawn from the model itself, and each task's training document count.

    Attributes
    ----------
    sampled_gradients
        ``(task_adapters [D, P], batch, generator) -> [B, P]``: the gradient of each document's
        NLL in its task's adapter, the document's observations (the scored tokens of an LM)
        replaced by a draw from the model at ``task_adapters``. Its squares average to the
        diagonal true Fisher of the documents (see the module docstring).
    docs_per_task
        ``[D]`` training documents ``N_d`` of each task (`MonteCarloFisher`).
    """

    sampled_gradients: Callable[[torch.Tensor, Any, torch.Generator | None], torch.Tensor]
    docs_per_task: Sequence[int] | torch.Tensor

    @classmethod
    def for_lm(cls, lm, docs_per_task) -> FisherSampler:
        """The sampler of a `MultiTaskLM`: labels drawn from its predictive (`per_document_gradients`)."""
        logits_fn = lm_logits(lm)

        def sampled_gradients(task_adapters, batch, generator=None):
            return per_document_gradients(logits_fn, task_adapters, batch, sampled=True, generator=generator)

        return cls(sampled_gradients, docs_per_task)


class MonteCarloFisher:
    r"""Running diagonal true Fisher of each task's NLL from sampled-label per-document gradients.

    Each `update` draws labels from the model at the current adapters, takes one backward pass
    and adds the squared per-document gradients of each task and the number of its documents
    seen, both as exponential moving averages over updates. The curvature of task ``d`` is its
    known training document count times the average per-document Fisher::

        h_d = N_d * (sum_k beta^(K-k) sum_{n in b_k, task d} g_n(y~)^2) / (sum_k beta^(K-k) |b_k cap d|)

    With the adapters held fixed and documents drawn uniformly, this is an unbiased estimate of
    the exact ``diag F_d`` (given that task d has been seen; the weights do not depend on the
    gradients). Using ``N_d`` instead of rescaling by ``N / B`` removes the noise of how many of
    task d's documents a minibatch happens to hold.

    Parameters
    ----------
    docs_per_task
        ``[D]`` number of training documents ``N_d`` of each task.
    num_params
        P.
    beta
        Decay per update, in ``(0, 1]``; ``1`` keeps a plain cumulative average (fixed adapters),
        ``0.9`` averages over about the last 10 updates (adapters that move).
    device
        Where the ``[D, P]`` accumulators live (`add` moves each minibatch's gradients there):
        with the adapter tables, e.g. host memory with ``adapter_storage="host"``.
    """

    def __init__(self, docs_per_task, num_params: int, *, beta: float = 0.9, device=None):
        counts = torch.as_tensor(docs_per_task, dtype=torch.float32)
        if counts.dim() != 1 or bool((counts.cpu() < 0).any()):
            raise ValueError(
                f"docs_per_task must be a 1-d sequence of non-negative document counts, got {docs_per_task!r}."
            )
        counts = counts.to(device)
        if not 0.0 < float(beta) <= 1.0:
            raise ValueError(f"beta must be in (0, 1], got beta={beta!r}; e.g. 0.9, or 1.0 for a plain average.")
        self.docs_per_task = counts
        self.beta = float(beta)
        self.sq = torch.zeros(len(counts), int(num_params), device=device)
        self.seen = torch.zeros(len(counts), device=device)
        self.count = 0

    def update(
        self, logits_fn: LogitsFn, task_adapters: torch.Tensor, batch, *, generator: torch.Generator | None = None
    ) -> None:
        """One forward and backward pass on ``batch`` with labels sampled from the model.

        ``task_adapters`` ``[D, P]`` are the current adapters (detached inside).
        """
        grad = per_document_gradients(logits_fn, task_adapters, batch, sampled=True, generator=generator)
        self.add(grad.square(), batch.task_ids)

    @torch.no_grad()
    def add(self, squared_gradients: torch.Tensor, task_ids: torch.Tensor) -> None:
        """Add ``[B, P]`` squared per-document gradients of documents of tasks ``task_ids [B]``.

        Both are moved to the accumulators' device first (a ``[B, P]`` copy when they live in
        host memory and the gradients on an accelerator). With ``beta = 1`` only the ``B`` rows
        are touched: the decay of all ``D`` rows is skipped (multiplying by 1 changes nothing).
        """
        task_ids = task_ids.to(self.sq.device)
        if self.beta != 1.0:
            self.sq.mul_(self.beta)
            self.seen.mul_(self.beta)
        self.sq.index_add_(0, task_ids, squared_gradients.to(self.sq.device, self.sq.dtype))
        self.seen.index_add_(0, task_ids, torch.ones(task_ids.shape, dtype=self.seen.dtype, device=self.seen.device))
        self.count += 1

    @torch.no_grad()
    def reset(self) -> None:
        """Forget every update (the next `curvature` uses only the updates after this)."""
        self.sq.zero_()
        self.seen.zero_()
        self.count = 0

    @property
    def seen_tasks(self) -> torch.Tensor:
        """``[D]`` bool: tasks with at least one document in the updates so far."""
        return self.seen > 0

    def curvature(self, *, fill_unseen: bool = False) -> torch.Tensor:
        """``h`` ``[D, P]``.

        Rows of tasks not seen yet are zero (check `seen_tasks`), or with ``fill_unseen`` their
        ``N_d`` times the average per-document Fisher of all documents seen (of every task):
        when a few minibatches cannot hold a document of every task, this is the estimate that
        assumes the task's documents are like the others', rather than that its adapter is not
        determined by its data at all.
        """
        if self.count == 0:
            raise RuntimeError("MonteCarloFisher.curvature() needs at least one update().")
        per_doc = self.sq / self.seen.clamp_min(torch.finfo(self.seen.dtype).tiny)[:, None]
        if fill_unseen:
            pooled = self.sq.sum(0) / self.seen.sum().clamp_min(torch.finfo(self.seen.dtype).tiny)
            per_doc = torch.where(self.seen_tasks[:, None], per_doc, pooled)
        return per_doc * self.docs_per_task[:, None]

    def state_dict(self) -> dict:
        """``sq``, ``seen`` and ``count``, to checkpoint."""
        return {"sq": self.sq, "seen": self.seen, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict`."""
        self.sq.copy_(state["sq"])
        self.seen.copy_(state["seen"])
        self.count = int(state["count"])


def _add_by_task(out: torch.Tensor, column: int | slice, task_ids: torch.Tensor, values: torch.Tensor) -> None:
    out[:, column] += torch.zeros(out.shape[0], *values.shape[1:], dtype=out.dtype).index_add_(
        0, task_ids.cpu(), values.detach().cpu().to(out.dtype)
    )


def exact_fisher_diagonal(logits_fn: LogitsFn, task_adapters: torch.Tensor, batches: Iterable) -> torch.Tensor:
    r"""Exact ``diag F_d`` ``[D, P]`` float64 (CPU) summed over the documents of ``batches``.

    ``F_d,ii = sum_{n in d} sum_t u_t^T (diag p_t - p_t p_t^T) u_t`` with ``u_t = J_t e_i``, the
    exact expectation over every vocabulary entry at every scored position. The Jacobian columns
    come from reverse-over-reverse differentiation (``u = d/dw [(J^T w)_i]``): one extra backward
    pass per parameter. For tiny models.
    """
    D, P = task_adapters.shape
    out = torch.zeros(D, P, dtype=torch.float64)
    for batch in batches:
        rows = _rows(task_adapters, batch)
        logits, targets = logits_fn(rows, batch)
        scored = (targets != IGNORE_INDEX).to(torch.float64)
        probs = logits.detach().double().softmax(-1)
        w = torch.zeros_like(logits, requires_grad=True)
        (jtw,) = torch.autograd.grad(logits, rows, grad_outputs=w, create_graph=True)  # [B, P], linear in w
        for i in range(P):
            (u,) = torch.autograd.grad(jtw[:, i].sum(), w, retain_graph=True)  # [B, T, V] = J e_i per row
            u = u.double()
            mean = (probs * u).sum(-1)
            value = (((probs * u * u).sum(-1) - mean * mean) * scored).sum(-1)  # [B]
            _add_by_task(out, i, batch.task_ids, value)
    return out


def hessian_diagonal(logits_fn: LogitsFn, task_adapters: torch.Tensor, batches: Iterable) -> torch.Tensor:
    """Exact diagonal of the Hessian of each task's NLL (observed labels), ``[D, P]`` float64.

    One Hessian-vector product per parameter: since row ``n``'s NLL depends only on its own
    adapter row, ``d/d rows [dNLL/d rows[:, i]]`` holds ``H_n,ii`` of every document at once.
    """
    D, P = task_adapters.shape
    out = torch.zeros(D, P, dtype=torch.float64)
    for batch in batches:
        rows = _rows(task_adapters, batch)
        logits, targets = logits_fn(rows, batch)
        (grad,) = torch.autograd.grad(_row_nll(logits, targets).sum(), rows, create_graph=True)
        for i in range(P):
            (hess,) = torch.autograd.grad(grad[:, i].sum(), rows, retain_graph=True)
            _add_by_task(out, i, batch.task_ids, hess[:, i])
    return out


def empirical_fisher_diagonal(logits_fn: LogitsFn, task_adapters: torch.Tensor, batches: Iterable) -> torch.Tensor:
    """``sum_{n in d} g_n^2`` with observed labels, ``[D, P]`` float64 (one backward per batch).

    The same quantity as `bora_pyro.reports.arviz.diagonal_fisher`, on a logits function.
    """
    D, P = task_adapters.shape
    out = torch.zeros(D, P, dtype=torch.float64)
    for batch in batches:
        grad = per_document_gradients(logits_fn, task_adapters, batch, sampled=False)
        _add_by_task(out, slice(None), batch.task_ids, grad.square())
    return out
