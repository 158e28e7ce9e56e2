"""Batches of documents that mix tasks, padded or packed, and the collation that builds them.

**Padded** (`collate`): one document per row. Token layout of a document of length ``n`` in a
batch of width ``L`` (``n <= L``)::

    position   0        1 .. s-1        s .. n-1                  n .. L-1
    input_ids  <start>  prompt tokens   text / completion tokens  pad
    labels     IGNORE   IGNORE          the token id (scored)     IGNORE
    attention  1        1               1                         0

``s`` is the document's *label start* (1 in text mode, ``1 + len(prompt tokens)`` in
prompt/completion mode) and ``IGNORE`` is :data:`IGNORE_INDEX`. Labels follow the Hugging Face
convention: aligned with ``input_ids``, shifted inside the causal LM, so the logits at position
``j - 1`` are scored against ``labels[j]``.

**Packed** (`collate_packed`): the same ``B`` documents laid end to end in fewer rows, each
document keeping the layout above, then padding at the end of each row only::

    row 0      [doc 3 ......][doc 0 ...][doc 5 .][pad]
    row 1      [doc 1 ........][doc 2 .....][doc 4 ]
    positions  0 1 .. n3-1   0 1 .. n0-1 0 ..     0 ..
    segments   0 0 .. 0      1 1 .. 1    2 ..     -1        (index into the batch's documents)

``position_ids`` restart at 0 with every document, ``segment_ids`` say which of the batch's
documents each token belongs to (``-1`` at padding), and the model attends only within a
segment (`bora_pyro.models.lora.MultiTaskLM` builds the block-diagonal causal mask). Position 0
of every document is its start token, whose label is ``IGNORE``: the first token of a document
is never predicted from the previous one. ``task_ids`` and ``doc_index`` stay per document, so a
packed batch of ``B`` documents is the same minibatch as the padded one, laid out differently.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, fields

import numpy as np
import torch

from ..checks import positive_int

__all__ = ["IGNORE_INDEX", "DEFAULT_ROW_TOKENS", "Batch", "TaskGroups", "task_groups", "collate", "collate_packed",
           "pack_rows"]

#: Label value of positions that are not scored (the value ignored by torch's cross-entropy).
IGNORE_INDEX: int = -100

#: Token budget of one packed row (`collate_packed`), unless a document is longer.
DEFAULT_ROW_TOKENS: int = 512


@dataclass
class TaskGroups:
    """The distinct tasks of a batch and which tokens go with which, computed on the host when the
    batch is collated (`task_groups`), so that the forward pass reads nothing back from the device.

    Attributes
    ----------
    tasks : torch.LongTensor or None
        ``[K]`` distinct task ids of the batch in order of first appearance (the order of
        `bora_pyro.models.bora.TaskSubsample.index`). ``None``: the adapters handed to the model
        are already one row per distinct task, in this order.
    local : torch.LongTensor
        ``[B]`` position in ``tasks`` of each document's task (``tasks[local]`` are the task ids).
    size : int
        ``K``.
    order, inverse : torch.LongTensor or None
        Packed batches with ``K > 1``: the ``R * L`` flat token positions sorted by the position
        of their task (stable; padding goes with document 0), and the inverse permutation.
    counts : tuple of int
        Packed batches: tokens of each of the K tasks (padding counted with document 0's task).
    """

    tasks: torch.Tensor | None
    local: torch.Tensor
    size: int
    order: torch.Tensor | None = None
    inverse: torch.Tensor | None = None
    counts: tuple[int, ...] = ()

    def __len__(self) -> int:
        """``K``, the number of distinct tasks."""
        return self.size

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> TaskGroups:
        """A copy with every tensor on ``device``."""
        def move(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return TaskGroups(move(self.tasks), move(self.local), self.size, move(self.order), move(self.inverse),
                          self.counts)

    def as_rows(self) -> TaskGroups:
        """The same groups for adapters that are already one row per distinct task (``tasks=None``)."""
        return TaskGroups(None, self.local, self.size, self.order, self.inverse, self.counts)


def task_groups(task_ids, segment_ids=None) -> TaskGroups:
    """`TaskGroups` of a batch from its ``[B]`` task ids (and, packed, its ``[R, L]`` segment ids),
    computed with numpy on the host (a device tensor is copied to the host first).

    Parameters
    ----------
    task_ids : torch.LongTensor or numpy.ndarray
        ``[B]`` task id of each document.
    segment_ids : torch.LongTensor or numpy.ndarray, optional
        ``[R, L]`` document of each token of a packed batch, ``-1`` at padding.
    """
    ids = np.asarray(task_ids.detach().cpu() if isinstance(task_ids, torch.Tensor) else task_ids,
                     dtype=np.int64).reshape(-1)
    present, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    by_first = np.argsort(first, kind="stable")          # first-appearance order
    rank = np.empty_like(by_first)
    rank[by_first] = np.arange(len(by_first))
    local = rank[inverse.reshape(-1)]
    groups = TaskGroups(tasks=torch.from_numpy(present[by_first].astype(np.int64)), local=torch.from_numpy(local),
                        size=len(present))
    if segment_ids is None:
        return groups
    segments = np.asarray(segment_ids.detach().cpu() if isinstance(segment_ids, torch.Tensor) else segment_ids,
                          dtype=np.int64).reshape(-1)
    token_group = local[np.maximum(segments, 0)]          # [T]; padding takes document 0's task
    groups.counts = tuple(np.bincount(token_group, minlength=len(present)).tolist())
    if len(present) > 1:
        order = np.argsort(token_group, kind="stable")
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        groups.order, groups.inverse = torch.from_numpy(order), torch.from_numpy(back)
    return groups


@dataclass
class Batch:
    """A batch of ``B`` documents that may mix tasks, padded (one per row) or packed.

    Attributes
    ----------
    input_ids : torch.LongTensor
        ``[R, L]`` token ids, right-padded with the corpus pad id. Padded: ``R = B`` rows and
        ``L`` the longest document. Packed: ``R <= B`` rows of documents laid end to end.
    attention_mask : torch.LongTensor
        ``[R, L]``; 1 at real tokens, 0 at padding.
    labels : torch.LongTensor
        ``[R, L]``; the token id at scored positions, :data:`IGNORE_INDEX` elsewhere (padding,
        prompt tokens and each document's start token). Aligned with ``input_ids`` (the model
        shifts).
    task_ids : torch.LongTensor
        ``[B]`` task id of each document (index into :attr:`TaskCorpus.tasks`).
    doc_index : torch.LongTensor
        ``[B]`` index of each document within its split, in ``0 .. num_docs - 1``.
    position_ids : torch.LongTensor or None
        Packed only: ``[R, L]`` position of each token within its own document (0 at each
        document's start token; 0 at padding).
    segment_ids : torch.LongTensor or None
        Packed only: ``[R, L]`` which of the batch's documents each token belongs to (``b`` in
        ``0 .. B - 1``, so its task is ``task_ids[b]``), ``-1`` at padding.
    groups : TaskGroups or None
        The batch's distinct tasks and, packed, its tokens grouped by task (`task_groups`),
        computed by `collate` / `collate_packed` on the host; ``None`` for a batch built
        otherwise (the model then gathers one adapter per row, or groups the tokens itself).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    task_ids: torch.Tensor
    doc_index: torch.Tensor
    position_ids: torch.Tensor | None = None
    segment_ids: torch.Tensor | None = None
    groups: TaskGroups | None = None

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> Batch:
        """Return a copy of the batch with every tensor (``groups`` included) moved to ``device``."""
        return Batch(
            **{
                f.name: None if getattr(self, f.name) is None
                else getattr(self, f.name).to(device, non_blocking=non_blocking)
                for f in fields(self)
            }
        )

    def __len__(self) -> int:
        """Number of documents ``B`` (the rows of a padded batch)."""
        return int(self.doc_index.shape[0])

    @property
    def packed(self) -> bool:
        """Whether the documents are packed (several per row), see `collate_packed`."""
        return self.segment_ids is not None

    @property
    def num_rows(self) -> int:
        """Number of rows ``R`` of ``input_ids``."""
        return int(self.input_ids.shape[0])

    @property
    def num_scored_tokens(self) -> int:
        """Number of scored positions (labels not equal to :data:`IGNORE_INDEX`)."""
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def real_fraction(self) -> float:
        """Real tokens over computed positions, ``attention_mask.sum() / (R * L)``."""
        return float(self.attention_mask.sum()) / max(1, self.attention_mask.numel())


def _document_arrays(documents, label_starts, task_ids, doc_index):
    if not documents:
        raise ValueError("collate(): documents is empty; pass at least one document.")
    starts = np.asarray(label_starts).reshape(-1).tolist()
    if len(starts) != len(documents) or len(task_ids) != len(documents):
        raise ValueError(
            f"collate(): {len(documents)} documents need as many label_starts and task_ids, got "
            f"{len(starts)} and {len(task_ids)}."
        )
    index = torch.from_numpy(np.array(doc_index, dtype=np.int64).reshape(-1))
    return starts, index


def collate(
    documents: list[np.ndarray],
    label_starts: np.ndarray,
    task_ids: torch.Tensor,
    doc_index: np.ndarray,
    *,
    pad_token_id: int,
    scored: list[np.ndarray] | None = None,
) -> Batch:
    """Right-pad ``B`` documents into one :class:`Batch`, one per row (dynamic padding).

    Parameters
    ----------
    documents : list of numpy.ndarray
        ``B`` token arrays, start token first, each of length >= 1.
    label_starts : numpy.ndarray
        ``[B]`` first scored position of each document, in ``1 .. len(document)``.
    task_ids : torch.LongTensor
        ``[B]`` task id of each document.
    doc_index : numpy.ndarray
        ``[B]`` index of each document within its split.
    pad_token_id : int
        Id written at padded positions of ``input_ids``.
    scored : list of numpy.ndarray, optional
        ``B`` boolean arrays, one per document and of its length: only positions marked ``True``
        are scored (e.g. the assistant turns of a conversation); ``None`` scores every position
        from ``label_starts[b]`` on.

    Returns
    -------
    Batch
        Of width ``L = max(len(d) for d in documents)``; row ``b`` holds ``documents[b]``, its
        labels are the tokens from ``label_starts[b]`` on (where ``scored`` allows) and
        :data:`IGNORE_INDEX` elsewhere.
    """
    starts, index = _document_arrays(documents, label_starts, task_ids, doc_index)
    arrays = _fill_rows(documents, starts, [[b] for b in range(len(documents))], pad_token_id, scored)
    return Batch(
        input_ids=torch.from_numpy(arrays["input_ids"]),
        attention_mask=torch.from_numpy(arrays["attention_mask"]),
        labels=torch.from_numpy(arrays["labels"]),
        task_ids=task_ids,
        doc_index=index,
        groups=task_groups(task_ids),
    )


def pack_rows(lengths: list[int] | np.ndarray, row_tokens: int) -> list[list[int]]:
    """Assign documents of the given lengths to as few rows of ``row_tokens`` as first-fit
    decreasing finds, then balance the rows.

    The row count ``R`` is that of first-fit decreasing with capacity
    ``C = max(row_tokens, max(lengths))``; the documents are then dealt longest first to the
    least-filled of the ``R`` rows (which evens the rows out, so that less of the widest row is
    padding), unless that overfills a row, in which case the first-fit rows are kept.

    Returns
    -------
    list of list of int
        ``R`` rows, each the indices (into ``lengths``) of its documents, in packing order.
    """
    lengths = [int(n) for n in lengths]
    capacity = max(positive_int("row_tokens", row_tokens), max(lengths))
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    first_fit: list[list[int]] = []
    free: list[int] = []
    for i in order:
        row = next((r for r, room in enumerate(free) if room >= lengths[i]), None)
        if row is None:
            first_fit.append([])
            free.append(capacity)
            row = len(free) - 1
        first_fit[row].append(i)
        free[row] -= lengths[i]
    balanced: list[list[int]] = [[] for _ in first_fit]
    heap = [(0, r) for r in range(len(first_fit))]
    for i in order:
        fill, r = heapq.heappop(heap)
        balanced[r].append(i)
        heapq.heappush(heap, (fill + lengths[i], r))
    return balanced if max(fill for fill, _ in heap) <= capacity else first_fit


def collate_packed(
    documents: list[np.ndarray],
    label_starts: np.ndarray,
    task_ids: torch.Tensor,
    doc_index: np.ndarray,
    *,
    pad_token_id: int,
    row_tokens: int = DEFAULT_ROW_TOKENS,
    scored: list[np.ndarray] | None = None,
) -> Batch:
    """Pack ``B`` documents end to end into rows of about ``row_tokens`` tokens (see module docs).

    Parameters
    ----------
    documents, label_starts, task_ids, doc_index, pad_token_id, scored
        As in `collate`.
    row_tokens : int, default DEFAULT_ROW_TOKENS
        Token budget of a row (a longer document gets a row of its own length); the rows are
        chosen by `pack_rows`.

    Returns
    -------
    Batch
        With ``position_ids`` and ``segment_ids``; ``task_ids[b]`` and ``doc_index[b]`` belong to
        ``documents[b]``, whose tokens are where ``segment_ids == b``. Its labels are those of
        `collate` (so each document's start token is not scored), and its width is the fullest
        row's length.
    """
    starts, index = _document_arrays(documents, label_starts, task_ids, doc_index)
    rows = pack_rows([len(doc) for doc in documents], row_tokens)
    arrays = {k: torch.from_numpy(v) for k, v in _fill_rows(documents, starts, rows, pad_token_id, scored).items()}
    return Batch(
        **arrays,
        task_ids=task_ids,
        doc_index=index,
        groups=task_groups(task_ids, arrays["segment_ids"]),
    )


def _fill_rows(documents, starts, rows: list[list[int]], pad_token_id: int, scored) -> dict[str, np.ndarray]:
    """The ``[R, L]`` arrays of documents laid end to end in ``rows`` (each a list of document
    indices), ``L`` the fullest row's length: ``input_ids`` (``pad_token_id`` after the row's
    documents), ``labels`` (each document's tokens from ``starts[b]`` on where ``scored``
    allows, `IGNORE_INDEX` elsewhere), ``attention_mask``, ``position_ids`` (restarting at 0
    for each document) and ``segment_ids`` (the document's index ``b``, -1 on padding)."""
    lengths = [len(doc) for doc in documents]
    shape = (len(rows), max(sum(lengths[b] for b in row) for row in rows))
    out = {
        "input_ids": np.full(shape, pad_token_id, dtype=np.int64),
        "labels": np.full(shape, IGNORE_INDEX, dtype=np.int64),
        "attention_mask": np.zeros(shape, dtype=np.int64),
        "position_ids": np.zeros(shape, dtype=np.int64),
        "segment_ids": np.full(shape, -1, dtype=np.int64),
    }
    for r, row in enumerate(rows):
        at = 0
        for b in row:
            doc, n, start = documents[b], lengths[b], starts[b]
            out["input_ids"][r, at : at + n] = doc
            out["labels"][r, at + start : at + n] = doc[start:]
            if scored is not None:
                out["labels"][r, at : at + n][~scored[b]] = IGNORE_INDEX
            out["attention_mask"][r, at : at + n] = 1
            out["position_ids"][r, at : at + n] = np.arange(n)
            out["segment_ids"][r, at : at + n] = b
            at += n
    return out
