"""Splits of a corpus: the tokenised documents of one split, and the seeded per-task split.

A :class:`TaskSplit` holds the documents of one split (train, validation or test) back to back
in one flat ``int32`` array plus offsets, and yields :class:`~bora_pyro.data.batches.Batch`
objects that mix tasks. :func:`assign_splits` decides, task by task, which documents go to
which split: task ``d`` with ``n`` documents gets ``round(test_size * n)`` test documents (at
least 1 when ``test_size > 0``), ``round(validation_size * n)`` validation documents (at least
1 when ``validation_size > 0``; Python's ``round``, halves to even) and the rest for training,
drawn by a numpy generator seeded with ``(seed, crc32(task name))`` so that the split of a task
does not depend on the other tasks.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ..checks import non_negative_int, positive_int
from .batches import DEFAULT_ROW_TOKENS, IGNORE_INDEX, Batch, collate, collate_packed

__all__ = ["SPLIT_NAMES", "TaskSplit", "assign_splits", "split_sizes"]

#: Names of the splits of every :class:`~bora_pyro.data.TaskCorpus`, in order.
SPLIT_NAMES: tuple[str, ...] = ("train", "validation", "test")

class TaskSplit:
    """The tokenised documents of one split (train, validation or test) of a corpus.

    Documents are stored back to back in one flat array: document ``i`` is
    ``tokens[offsets[i]:offsets[i + 1]]`` (start token included), scored from position
    ``label_starts[i]`` on, or, when ``scored`` is given (conversations, where only the
    assistant's turns are scored), at the positions where ``scored`` is true. Either way a
    batch's ``labels`` carry which tokens are scored (:data:`~bora_pyro.data.IGNORE_INDEX`
    elsewhere); :meth:`doc_labels` gives them per document. Construct splits with :func:`~bora_pyro.data.build_corpus`; the
    constructor is public for :meth:`~bora_pyro.data.TaskCorpus.from_state_dict` and for
    tests.

    Parameters
    ----------
    name : str
        Split name, one of :data:`SPLIT_NAMES` (``"all"`` while a corpus is being built).
    tokens : array-like of int
        ``[T]`` all token ids of all documents, concatenated.
    offsets : array-like of int
        ``[num_docs + 1]`` start of each document in ``tokens``; ``offsets[0] == 0``,
        ``offsets[-1] == T``, non-decreasing.
    label_starts : array-like of int
        ``[num_docs]`` first scored position of each document, in ``1 .. length``.
    task_ids : array-like of int
        ``[num_docs]`` task id of each document, in ``0 .. num_tasks - 1``.
    num_tasks : int
        Number of tasks ``D`` of the corpus (tasks with no document in this split included).
    pad_token_id : int
        Id used to pad batches.
    source_index : array-like of int, optional
        ``[num_docs]`` row of each document in the data given to :func:`build_corpus`
        (``-1`` where unknown).
    scored : array-like of bool, optional
        ``[T]`` whether each token is scored, aligned with ``tokens``. Never true at a
        document's first position (it has no context); ``label_starts[i]`` must be the first
        scored position of document ``i`` (its length when nothing is scored). ``None``: every
        position from ``label_starts[i]`` on is scored.
    """

    def __init__(
        self,
        name: str,
        tokens: Any,
        offsets: Any,
        label_starts: Any,
        task_ids: Any,
        *,
        num_tasks: int,
        pad_token_id: int,
        source_index: Any = None,
        scored: Any = None,
    ) -> None:
        self.name = str(name)
        self._tokens = np.ascontiguousarray(np.asarray(tokens, dtype=np.int32).reshape(-1))
        self._offsets = np.ascontiguousarray(np.asarray(offsets, dtype=np.int64).reshape(-1))
        self._label_starts = np.asarray(label_starts, dtype=np.int64).reshape(-1)
        task_ids_np = np.asarray(task_ids, dtype=np.int64).reshape(-1)
        self.num_tasks = positive_int("num_tasks", num_tasks)
        self.pad_token_id = int(pad_token_id)
        n = len(task_ids_np)
        if source_index is None:
            source_index = np.full(n, -1, dtype=np.int64)
        self.source_index = np.asarray(source_index, dtype=np.int64).reshape(-1)
        self._scored = None if scored is None else np.asarray(scored, dtype=bool).reshape(-1)
        self._check(n, task_ids_np)
        self.num_docs = n
        self.task_ids = torch.from_numpy(task_ids_np)
        self.lengths = np.diff(self._offsets)
        if self._scored is None:
            scored = self.lengths - self._label_starts
        else:
            doc_of_token = np.repeat(np.arange(n), self.lengths)
            scored = np.bincount(doc_of_token[self._scored], minlength=n)
        self.docs_per_task = np.bincount(task_ids_np, minlength=self.num_tasks).astype(np.int64)
        self.tokens_per_task = np.bincount(
            task_ids_np, weights=scored, minlength=self.num_tasks
        ).astype(np.int64)

    def _check(self, n: int, task_ids: np.ndarray) -> None:
        where = f"TaskSplit {self.name!r}"
        if len(self._offsets) != n + 1:
            raise ValueError(
                f"{where}: offsets must have num_docs + 1 = {n + 1} entries (one more than "
                f"task_ids), got {len(self._offsets)}."
            )
        if len(self._label_starts) != n or len(self.source_index) != n:
            raise ValueError(
                f"{where}: label_starts and source_index must have num_docs = {n} entries, got "
                f"{len(self._label_starts)} and {len(self.source_index)}."
            )
        if self._offsets[0] != 0 or self._offsets[-1] != len(self._tokens):
            raise ValueError(
                f"{where}: offsets must start at 0 and end at len(tokens) = {len(self._tokens)}, "
                f"got {int(self._offsets[0])} .. {int(self._offsets[-1])}."
            )
        lengths = np.diff(self._offsets)
        if n and (lengths.min() < 0):
            raise ValueError(f"{where}: offsets must be non-decreasing.")
        if n and ((self._label_starts < 1).any() or (self._label_starts > lengths).any()):
            bad = int(np.flatnonzero((self._label_starts < 1) | (self._label_starts > lengths))[0])
            raise ValueError(
                f"{where}: label_starts must lie in 1 .. document length; document {bad} has "
                f"label start {int(self._label_starts[bad])} and length {int(lengths[bad])}."
            )
        if self._scored is not None:
            self._check_scored(n, lengths)
        if n and (task_ids.min() < 0 or task_ids.max() >= self.num_tasks):
            raise ValueError(
                f"{where}: task ids must lie in 0 .. num_tasks - 1 = {self.num_tasks - 1}, got "
                f"values in {int(task_ids.min())} .. {int(task_ids.max())}."
            )

    def _check_scored(self, n: int, lengths: np.ndarray) -> None:
        where = f"TaskSplit {self.name!r}"
        if len(self._scored) != len(self._tokens):
            raise ValueError(
                f"{where}: scored must have one entry per token (len(tokens) = "
                f"{len(self._tokens)}), got {len(self._scored)}."
            )
        if not n:
            return
        firsts = self._offsets[:-1][lengths > 0]
        if self._scored[firsts].any():
            bad = int(np.flatnonzero(lengths > 0)[np.flatnonzero(self._scored[firsts])[0]])
            raise ValueError(
                f"{where}: scored is true at the first position of document {bad}; a "
                f"document's first token has no context and cannot be scored."
            )
        doc_of_token = np.repeat(np.arange(n), lengths)
        position = np.arange(len(self._tokens)) - self._offsets[doc_of_token]
        first = lengths.copy()
        hits = np.flatnonzero(self._scored)
        np.minimum.at(first, doc_of_token[hits], position[hits])
        if not np.array_equal(first, self._label_starts):
            bad = int(np.flatnonzero(first != self._label_starts)[0])
            raise ValueError(
                f"{where}: label_starts must be each document's first scored position; "
                f"document {bad} has label start {int(self._label_starts[bad])} but is first "
                f"scored at {int(first[bad])}."
            )

    # -- sizes --------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Number of documents."""
        return self.num_docs

    @property
    def num_tokens(self) -> int:
        """Number of scored tokens in the split (sum of :attr:`tokens_per_task`)."""
        return int(self.tokens_per_task.sum())

    def __repr__(self) -> str:
        return (
            f"TaskSplit(name={self.name!r}, num_docs={self.num_docs}, "
            f"num_tasks={self.num_tasks}, scored_tokens={self.num_tokens})"
        )

    # -- documents ----------------------------------------------------------------------------

    def doc_tokens(self, index: int) -> np.ndarray:
        """Token ids ``[length]`` of document ``index`` (start token first)."""
        i = self._check_doc_index(index)
        return self._tokens[self._offsets[i] : self._offsets[i + 1]].copy()

    def label_start(self, index: int) -> int:
        """First scored position of document ``index``."""
        return int(self._label_starts[self._check_doc_index(index)])

    def doc_labels(self, index: int) -> np.ndarray:
        """Labels ``[length]`` (int64) of document ``index``: its token ids where scored,
        :data:`~bora_pyro.data.IGNORE_INDEX` elsewhere (as in a batch's ``labels``)."""
        i = self._check_doc_index(index)
        start, stop = self._offsets[i], self._offsets[i + 1]
        labels = self._tokens[start:stop].astype(np.int64)
        if self._scored is None:
            labels[: self._label_starts[i]] = IGNORE_INDEX
        else:
            labels[~self._scored[start:stop]] = IGNORE_INDEX
        return labels

    def _check_doc_index(self, index: int) -> int:
        i = int(index)
        if not 0 <= i < self.num_docs:
            raise IndexError(
                f"document index {index} out of range for split {self.name!r} with "
                f"{self.num_docs} documents."
            )
        return i

    # -- batching -----------------------------------------------------------------------------

    def batch(
        self,
        indices: Sequence[int] | np.ndarray | torch.Tensor,
        *,
        pack: bool = False,
        row_tokens: int = DEFAULT_ROW_TOKENS,
    ) -> Batch:
        """Collate the documents ``indices`` into one :class:`Batch`, padded or packed.

        Parameters
        ----------
        indices : sequence of int, numpy array or torch.LongTensor
            ``[B]`` document indices in ``0 .. num_docs - 1`` (e.g. the subsample indices of a
            ``pyro.plate`` over documents). Repeats are allowed.
        pack : bool, default False
            Lay the documents end to end in rows of about ``row_tokens`` tokens
            (`~bora_pyro.data.batches.collate_packed`) instead of one right-padded row each.
        row_tokens : int
            Token budget of a packed row.

        Returns
        -------
        Batch
            Of the ``B`` documents in the given order; padded: ``L`` = the longest selected
            document (dynamic padding).
        """
        if isinstance(indices, torch.Tensor):
            idx = indices.detach().cpu().numpy().astype(np.int64).reshape(-1)
        else:
            idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) == 0:
            raise ValueError("batch(): indices is empty; pass at least one document index.")
        if idx.min() < 0 or idx.max() >= self.num_docs:
            bad = idx[(idx < 0) | (idx >= self.num_docs)][0]
            raise ValueError(
                f"batch(): document index {int(bad)} out of range for split {self.name!r} with "
                f"{self.num_docs} documents; valid indices are 0 .. {self.num_docs - 1}."
            )
        documents = [self._tokens[self._offsets[i] : self._offsets[i + 1]] for i in idx.tolist()]
        args = (documents, self._label_starts[idx], self.task_ids[torch.from_numpy(idx)], idx)
        # scored only where the mask says (e.g. the assistant turns of a conversation)
        scored = None if self._scored is None else [
            self._scored[self._offsets[i] : self._offsets[i + 1]] for i in idx.tolist()
        ]
        if pack:
            return collate_packed(*args, pad_token_id=self.pad_token_id, row_tokens=row_tokens, scored=scored)
        return collate(*args, pad_token_id=self.pad_token_id, scored=scored)

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        sort_by_length: bool = False,
        pack: bool = False,
        row_tokens: int = DEFAULT_ROW_TOKENS,
        part: slice | None = None,
    ) -> Iterator[Batch]:
        """Iterate once over all documents in batches that mix tasks.

        Parameters
        ----------
        batch_size : int
            Rows per batch (the last batch may be smaller unless ``drop_last``).
        shuffle : bool, default False
            Visit documents in a random order (``torch.randperm`` with ``generator``), so that
            batches mix tasks. Without it documents come in split order (grouped by task).
        generator : torch.Generator, optional
            Source of randomness for ``shuffle``; torch's global generator when omitted.
        drop_last : bool, default False
            Drop a last batch smaller than ``batch_size``.
        sort_by_length : bool, default False
            Visit documents from longest to shortest, which minimises padding for evaluation.
            Cannot be combined with ``shuffle``.
        pack, row_tokens : bool, int
            Pack each batch's ``batch_size`` documents into rows (see `batch`). The documents of
            a batch are the same with and without packing: a batch is always ``batch_size``
            documents, never a token budget, so a training step's likelihood scaling ``N / B``
            does not change.
        part : slice, optional
            Keep only these positions of each batch's ``batch_size`` documents (a data-parallel
            rank's slice, `bora_pyro.distributed.local_slice`); the order is drawn as without it.

        Yields
        ------
        Batch
            Each document appears exactly once over the iteration (unless dropped by
            ``drop_last``).
        """
        batch_size = positive_int("batch_size", batch_size)
        if shuffle and sort_by_length:
            raise ValueError(
                "batches(): shuffle=True and sort_by_length=True exclude each other; use "
                "shuffle for training and sort_by_length for evaluation."
            )
        if shuffle:
            order = torch.randperm(self.num_docs, generator=generator).numpy()
        elif sort_by_length:
            order = np.argsort(-self.lengths, kind="stable")
        else:
            order = np.arange(self.num_docs)
        stop = self.num_docs - (self.num_docs % batch_size if drop_last else 0)
        for start in range(0, stop, batch_size):
            chosen = order[start : start + batch_size]
            yield self.batch(chosen if part is None else chosen[part], pack=pack, row_tokens=row_tokens)

    # -- subsets ------------------------------------------------------------------------------

    def select(self, indices: Sequence[int] | np.ndarray) -> TaskSplit:
        """A new split holding the documents ``indices`` (in that order), renumbered from 0."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.num_docs):
            raise ValueError(
                f"select(): indices must lie in 0 .. {self.num_docs - 1} for split "
                f"{self.name!r}, got values in {int(idx.min())} .. {int(idx.max())}."
            )
        starts = self._offsets[idx]
        lengths = self._offsets[idx + 1] - starts
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if len(idx):
            gather = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
            tokens = self._tokens[gather]
        else:
            gather = np.zeros(0, dtype=np.int64)
            tokens = np.zeros(0, dtype=np.int32)
        return TaskSplit(
            self.name,
            tokens,
            offsets,
            self._label_starts[idx],
            self.task_ids.numpy()[idx],
            num_tasks=self.num_tasks,
            pad_token_id=self.pad_token_id,
            source_index=self.source_index[idx],
            scored=None if self._scored is None else self._scored[gather],
        )

    def subset(self, max_docs_per_task: int, *, seed: int = 0) -> TaskSplit:
        """Keep at most ``max_docs_per_task`` documents of each task, chosen at random.

        For quick evaluation. The choice for task ``d`` is drawn by a numpy generator seeded
        with ``(seed, d)``; kept documents stay in split order and are renumbered
        (``doc_index`` runs over ``0 .. len(subset) - 1``).

        Parameters
        ----------
        max_docs_per_task : int
            Positive cap on the documents kept per task.
        seed : int, default 0
            Non-negative seed.

        Returns
        -------
        TaskSplit
        """
        max_docs_per_task = positive_int("max_docs_per_task", max_docs_per_task)
        seed = non_negative_int("seed", seed)
        task_ids = self.task_ids.numpy()
        keep = []  # one array per task: never empty, since num_tasks >= 1
        for task in range(self.num_tasks):
            docs = np.flatnonzero(task_ids == task)
            if len(docs) > max_docs_per_task:
                rng = np.random.default_rng([seed, task])
                docs = np.sort(rng.choice(docs, size=max_docs_per_task, replace=False))
            keep.append(docs)
        return self.select(np.sort(np.concatenate(keep)))

    # -- state --------------------------------------------------------------------------------

    def _state_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        tensors = {
            f"{prefix}.tokens": torch.from_numpy(self._tokens.copy()),
            f"{prefix}.offsets": torch.from_numpy(self._offsets.copy()),
            f"{prefix}.label_starts": torch.from_numpy(self._label_starts.astype(np.int32)),
            f"{prefix}.task_ids": self.task_ids.clone(),
            f"{prefix}.source_index": torch.from_numpy(self.source_index.copy()),
        }
        if self._scored is not None:
            tensors[f"{prefix}.scored"] = torch.from_numpy(self._scored.copy())
        return tensors

# --------------------------------------------------------------------------------------------
# the seeded per-task split
# --------------------------------------------------------------------------------------------


def split_sizes(n: int, test_size: float, validation_size: float) -> tuple[int, int, int]:
    """``(n_train, n_validation, n_test)`` for a task with ``n`` documents (see module docs)."""
    n_test = max(1, round(test_size * n)) if test_size > 0 else 0
    n_val = max(1, round(validation_size * n)) if validation_size > 0 else 0
    return n - n_test - n_val, n_val, n_test


def _min_docs(test_size: float, validation_size: float) -> int:
    """Smallest document count that leaves at least one training document."""
    n = 1
    while split_sizes(n, test_size, validation_size)[0] < 1:
        n += 1
    return n


def _task_seed(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


def assign_splits(
    task_ids: np.ndarray,
    task_names: Sequence[str],
    *,
    test_size: float,
    validation_size: float,
    seed: int,
) -> np.ndarray:
    """Split code of each document: 0 train, 1 validation, 2 test (seeded, per task).

    Parameters
    ----------
    task_ids : numpy.ndarray
        ``[N]`` task id of each document, in ``0 .. len(task_names) - 1``.
    task_names : sequence of str
        Task id -> name; the name seeds the task's shuffle.
    test_size, validation_size : float
        Fractions in ``[0, 1)`` with sum < 1 (checked by the caller).
    seed : int
        Non-negative seed.

    Returns
    -------
    numpy.ndarray
        ``[N]`` int64 codes indexing :data:`SPLIT_NAMES`.

    Raises
    ------
    ValueError
        If a task has too few documents to keep one for training; the message names the
        tasks and the smallest count that works.
    """
    counts = np.bincount(task_ids, minlength=len(task_names))
    too_few = [
        (task_names[d], int(counts[d]))
        for d in range(len(task_names))
        if split_sizes(int(counts[d]), test_size, validation_size)[0] < 1
    ]
    if too_few:
        need = _min_docs(test_size, validation_size)
        shown = ", ".join(f"{name!r} ({n} documents)" for name, n in too_few[:5])
        more = f" and {len(too_few) - 5} more" if len(too_few) > 5 else ""
        raise ValueError(
            f"task {too_few[0][0]!r} has {too_few[0][1]} document(s), too few for "
            f"test_size={test_size} and validation_size={validation_size}: each task needs at "
            f"least {need} documents so that one is left for training. Too small: {shown}{more}. "
            f"Lower test_size / validation_size (0 turns a split off) or leave those tasks out "
            f"with tasks=[...]."
        )
    assignment = np.zeros(len(task_ids), dtype=np.int64)
    for d, name in enumerate(task_names):
        docs = np.flatnonzero(task_ids == d)
        _, n_val, n_test = split_sizes(len(docs), test_size, validation_size)
        rng = np.random.default_rng([int(seed), _task_seed(name)])
        shuffled = docs[rng.permutation(len(docs))]
        assignment[shuffled[:n_test]] = 2
        assignment[shuffled[n_test : n_test + n_val]] = 1
    return assignment
