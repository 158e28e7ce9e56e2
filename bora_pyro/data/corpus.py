"""Multi-task corpora: task names <-> ids, tokenised documents, per-task splits, mixed batches.

A *task* is one speaker, customer, author, ... ; a *document* is one token sequence belonging
to one task. :func:`build_corpus` turns a table with a task column and a text column (or a
prompt and a completion column) into a :class:`TaskCorpus`: the task names, and for each of
the splits ``"train"``, ``"validation"`` and ``"test"`` a :class:`TaskSplit` that holds the
tokenised documents in memory (one flat ``int32`` array plus offsets) and yields
:class:`Batch` objects that mix tasks.

Token layout of one document of length ``n`` (``n <= max_length``)::

    position   0        1 .. s-1            s .. n-1
    token      <start>  prompt tokens       text / completion tokens
    label      -100     -100                the token id (scored)

``s`` is the document's *label start*: 1 in text mode, ``1 + len(prompt tokens)`` in
prompt/completion mode. Labels follow the Hugging Face convention: they are aligned with
``input_ids`` and the causal LM shifts them internally, so the logits at position ``j - 1``
are scored against ``labels[j]``. The start token (the tokenizer's BOS token, else its EOS
token) is there so that the first text token has a context and is scored too.
"""

from __future__ import annotations

import difflib
import math
import uuid
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

__all__ = ["Batch", "TaskSplit", "TaskCorpus", "build_corpus", "SPLIT_NAMES", "IGNORE_INDEX"]

#: Names of the splits of every :class:`TaskCorpus`, in order.
SPLIT_NAMES: tuple[str, ...] = ("train", "validation", "test")

#: Label value of positions that are not scored (the value ignored by torch's cross-entropy).
IGNORE_INDEX: int = -100

_STATE_FORMAT = "bora_pyro.TaskCorpus"
_STATE_VERSION = 1
_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


# --------------------------------------------------------------------------------------------
# Batch
# --------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """A padded batch of documents that may mix tasks.

    Attributes
    ----------
    input_ids : torch.LongTensor
        ``[B, L]`` token ids, right-padded with the corpus pad id; ``L`` is the length of the
        longest document in the batch.
    attention_mask : torch.LongTensor
        ``[B, L]``; 1 at real tokens, 0 at padding.
    labels : torch.LongTensor
        ``[B, L]``; the token id at scored positions, ``-100`` elsewhere (padding, prompt
        tokens and the start token). Aligned with ``input_ids`` (the model shifts).
    task_ids : torch.LongTensor
        ``[B]`` task id of each row (index into :attr:`TaskCorpus.tasks`).
    doc_index : torch.LongTensor
        ``[B]`` index of each row's document within its split, in ``0 .. num_docs - 1``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    task_ids: torch.Tensor
    doc_index: torch.Tensor

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> Batch:
        """Return a copy of the batch with every tensor moved to ``device``."""
        return Batch(
            **{
                f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                for f in fields(self)
            }
        )

    def __len__(self) -> int:
        """Number of rows ``B``."""
        return int(self.input_ids.shape[0])

    @property
    def num_scored_tokens(self) -> int:
        """Number of scored positions (labels not equal to -100) in the batch."""
        return int((self.labels != IGNORE_INDEX).sum())


# --------------------------------------------------------------------------------------------
# TaskSplit
# --------------------------------------------------------------------------------------------


class TaskSplit:
    """The tokenised documents of one split (train, validation or test) of a corpus.

    Documents are stored back to back in one flat array: document ``i`` is
    ``tokens[offsets[i]:offsets[i + 1]]`` (start token included), scored from position
    ``label_starts[i]`` on. Construct splits with :func:`build_corpus`; the constructor is
    public for :meth:`TaskCorpus.from_state_dict` and for tests.

    Parameters
    ----------
    name : str
        Split name, one of ``"train"``, ``"validation"``, ``"test"``.
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
    ) -> None:
        self.name = str(name)
        self._tokens = np.ascontiguousarray(np.asarray(tokens, dtype=np.int32).reshape(-1))
        self._offsets = np.ascontiguousarray(np.asarray(offsets, dtype=np.int64).reshape(-1))
        self._label_starts = np.asarray(label_starts, dtype=np.int64).reshape(-1)
        task_ids_np = np.asarray(task_ids, dtype=np.int64).reshape(-1)
        self.num_tasks = int(num_tasks)
        self.pad_token_id = int(pad_token_id)
        n = len(task_ids_np)
        if source_index is None:
            source_index = np.full(n, -1, dtype=np.int64)
        self.source_index = np.asarray(source_index, dtype=np.int64).reshape(-1)
        self._check(n, task_ids_np)
        self.num_docs = n
        self.task_ids = torch.from_numpy(task_ids_np)
        self.lengths = np.diff(self._offsets)
        scored = self.lengths - self._label_starts
        self.docs_per_task = np.bincount(task_ids_np, minlength=self.num_tasks).astype(np.int64)
        self.tokens_per_task = np.bincount(
            task_ids_np, weights=scored, minlength=self.num_tasks
        ).astype(np.int64)

    def _check(self, n: int, task_ids: np.ndarray) -> None:
        where = f"TaskSplit {self.name!r}"
        if self.num_tasks < 1:
            raise ValueError(f"{where}: num_tasks must be >= 1, got {self.num_tasks}.")
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
        if n and (task_ids.min() < 0 or task_ids.max() >= self.num_tasks):
            raise ValueError(
                f"{where}: task ids must lie in 0 .. num_tasks - 1 = {self.num_tasks - 1}, got "
                f"values in {int(task_ids.min())} .. {int(task_ids.max())}."
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

    def _check_doc_index(self, index: int) -> int:
        i = int(index)
        if not 0 <= i < self.num_docs:
            raise IndexError(
                f"document index {index} out of range for split {self.name!r} with "
                f"{self.num_docs} documents."
            )
        return i

    # -- batching -----------------------------------------------------------------------------

    def batch(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> Batch:
        """Collate the documents ``indices`` into one right-padded :class:`Batch`.

        Parameters
        ----------
        indices : sequence of int, numpy array or torch.LongTensor
            ``[B]`` document indices in ``0 .. num_docs - 1`` (e.g. the subsample indices of a
            ``pyro.plate`` over documents). Repeats are allowed.

        Returns
        -------
        Batch
            With ``L`` = the longest selected document (dynamic padding).
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
        starts = self._offsets[idx]
        lengths = self._offsets[idx + 1] - starts
        width = int(lengths.max())
        b = len(idx)
        input_ids = np.full((b, width), self.pad_token_id, dtype=np.int64)
        labels = np.full((b, width), IGNORE_INDEX, dtype=np.int64)
        attention_mask = np.zeros((b, width), dtype=np.int64)
        for row, (start, length, label_start) in enumerate(
            zip(starts.tolist(), lengths.tolist(), self._label_starts[idx].tolist(), strict=True)
        ):
            doc = self._tokens[start : start + length]
            input_ids[row, :length] = doc
            attention_mask[row, :length] = 1
            labels[row, label_start:length] = doc[label_start:]
        return Batch(
            input_ids=torch.from_numpy(input_ids),
            attention_mask=torch.from_numpy(attention_mask),
            labels=torch.from_numpy(labels),
            task_ids=self.task_ids[torch.from_numpy(idx)],
            doc_index=torch.from_numpy(idx.copy()),
        )

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        sort_by_length: bool = False,
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

        Yields
        ------
        Batch
            Each document appears exactly once over the iteration (unless dropped by
            ``drop_last``).
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
            raise ValueError(
                f"batch_size must be a positive int, got {batch_size!r} "
                f"({type(batch_size).__name__})."
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size}.")
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
            yield self.batch(order[start : start + batch_size])

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
        if (
            isinstance(max_docs_per_task, bool)
            or not isinstance(max_docs_per_task, (int, np.integer))
            or max_docs_per_task < 1
        ):
            raise ValueError(
                f"max_docs_per_task must be a positive int, got {max_docs_per_task!r}."
            )
        _check_seed(seed)
        task_ids = self.task_ids.numpy()
        keep = []
        for task in range(self.num_tasks):
            docs = np.flatnonzero(task_ids == task)
            if len(docs) > max_docs_per_task:
                rng = np.random.default_rng([int(seed), task])
                docs = np.sort(rng.choice(docs, size=int(max_docs_per_task), replace=False))
            keep.append(docs)
        return self.select(np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64))

    # -- state --------------------------------------------------------------------------------

    def _state_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.tokens": torch.from_numpy(self._tokens.copy()),
            f"{prefix}.offsets": torch.from_numpy(self._offsets.copy()),
            f"{prefix}.label_starts": torch.from_numpy(self._label_starts.astype(np.int32)),
            f"{prefix}.task_ids": self.task_ids.clone(),
            f"{prefix}.source_index": torch.from_numpy(self.source_index.copy()),
        }


# --------------------------------------------------------------------------------------------
# TaskCorpus
# --------------------------------------------------------------------------------------------


class TaskCorpus:
    """Task names and the tokenised train / validation / test splits of a multi-task corpus.

    Build one with :func:`build_corpus` (or :func:`bora_pyro.data.shakespeare_corpus`).

    Parameters
    ----------
    tasks : sequence of str
        Task names; the position of a name is its task id.
    splits : mapping of str to TaskSplit
        Exactly the keys ``"train"``, ``"validation"``, ``"test"`` (a split may hold 0
        documents).
    pad_token_id : int
        Id used to pad batches.
    start_token_id : int
        Id prepended to every document.
    options : mapping, optional
        JSON-able record of how the corpus was built (columns, max_length, split sizes, seed,
        tokenizer name).

    Attributes
    ----------
    tasks : list of str
        Task id -> name.
    splits : dict of str to TaskSplit
    """

    def __init__(
        self,
        tasks: Sequence[str],
        splits: Mapping[str, TaskSplit],
        *,
        pad_token_id: int,
        start_token_id: int,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        self.tasks = [str(t) for t in tasks]
        if not self.tasks:
            raise ValueError("TaskCorpus: tasks is empty; a corpus needs at least one task.")
        if len(set(self.tasks)) != len(self.tasks):
            dup = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
            raise ValueError(f"TaskCorpus: task names must be unique, repeated: {dup}.")
        if set(splits) != set(SPLIT_NAMES):
            raise ValueError(
                f"TaskCorpus: splits must have exactly the keys {list(SPLIT_NAMES)}, got "
                f"{sorted(splits)}."
            )
        for name, split in splits.items():
            if split.num_tasks != len(self.tasks):
                raise ValueError(
                    f"TaskCorpus: split {name!r} has num_tasks={split.num_tasks} but there are "
                    f"{len(self.tasks)} task names."
                )
        self.splits = {name: splits[name] for name in SPLIT_NAMES}
        self.pad_token_id = int(pad_token_id)
        self.start_token_id = int(start_token_id)
        self.options = dict(options or {})
        self._index = {name: i for i, name in enumerate(self.tasks)}

    @property
    def num_tasks(self) -> int:
        """Number of tasks ``D``."""
        return len(self.tasks)

    @property
    def train(self) -> TaskSplit:
        """The training split."""
        return self.splits["train"]

    @property
    def validation(self) -> TaskSplit:
        """The validation split (possibly empty)."""
        return self.splits["validation"]

    @property
    def test(self) -> TaskSplit:
        """The test split (possibly empty)."""
        return self.splits["test"]

    def task_index(self, name: str) -> int:
        """Task id of the task called ``name``.

        Raises
        ------
        ValueError
            If there is no such task; the message suggests close names and lists valid ones.
        """
        try:
            return self._index[name]
        except (KeyError, TypeError):
            pass
        raise ValueError(_unknown_task_message(name, self.tasks, what="task"))

    def split(self, name: str) -> TaskSplit:
        """The split called ``name`` (``"train"``, ``"validation"`` or ``"test"``)."""
        if name not in self.splits:
            raise ValueError(f"unknown split {name!r}; valid split names are {list(SPLIT_NAMES)}.")
        return self.splits[name]

    def summary(self) -> pd.DataFrame:
        """One row per task: ``task``, ``n_train``, ``n_validation``, ``n_test`` (documents)
        and ``train_tokens`` (scored training tokens)."""
        return pd.DataFrame(
            {
                "task": self.tasks,
                "n_train": self.train.docs_per_task,
                "n_validation": self.validation.docs_per_task,
                "n_test": self.test.docs_per_task,
                "train_tokens": self.train.tokens_per_task,
            }
        )

    def __repr__(self) -> str:
        sizes = ", ".join(f"{name}={len(split)}" for name, split in self.splits.items())
        return f"TaskCorpus({self.num_tasks} tasks, docs: {sizes})"

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything needed to rebuild the corpus, without pickle.

        Returns
        -------
        tensors : dict of str to torch.Tensor
            Per split ``s``: ``s.tokens`` (int32 ``[T]``), ``s.offsets`` (int64
            ``[num_docs + 1]``), ``s.label_starts`` (int32 ``[num_docs]``), ``s.task_ids``
            (int64 ``[num_docs]``), ``s.source_index`` (int64 ``[num_docs]``). Save with
            ``safetensors.torch.save_file``.
        meta : dict
            JSON-able: format tag and version, task names, pad and start token ids, build
            options. Save with ``json.dump``.
        """
        tensors: dict[str, torch.Tensor] = {}
        for name, split in self.splits.items():
            tensors.update(split._state_tensors(name))
        meta = {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "tasks": list(self.tasks),
            "pad_token_id": self.pad_token_id,
            "start_token_id": self.start_token_id,
            "splits": list(SPLIT_NAMES),
            "options": dict(self.options),
        }
        return tensors, meta

    @classmethod
    def from_state_dict(
        cls, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
    ) -> TaskCorpus:
        """Rebuild a corpus from the output of :meth:`state_dict` (exactly)."""
        if meta.get("format") != _STATE_FORMAT:
            raise ValueError(
                f"meta['format'] is {meta.get('format')!r}, expected {_STATE_FORMAT!r}: this is "
                f"not the state of a TaskCorpus."
            )
        if meta.get("version") != _STATE_VERSION:
            raise ValueError(
                f"meta['version'] is {meta.get('version')!r}; this bora_pyro reads TaskCorpus "
                f"state version {_STATE_VERSION}."
            )
        tasks = list(meta["tasks"])
        pad = int(meta["pad_token_id"])
        splits = {}
        for name in SPLIT_NAMES:
            keys = [f"{name}.{part}" for part in ("tokens", "offsets", "label_starts", "task_ids")]
            missing = [k for k in keys if k not in tensors]
            if missing:
                raise ValueError(
                    f"tensors lack {missing}; pass the tensors returned by TaskCorpus.state_dict()."
                )
            source = tensors.get(f"{name}.source_index")
            splits[name] = TaskSplit(
                name,
                tensors[keys[0]].numpy(),
                tensors[keys[1]].numpy(),
                tensors[keys[2]].numpy(),
                tensors[keys[3]].numpy(),
                num_tasks=len(tasks),
                pad_token_id=pad,
                source_index=None if source is None else source.numpy(),
            )
        return cls(
            tasks,
            splits,
            pad_token_id=pad,
            start_token_id=int(meta["start_token_id"]),
            options=meta.get("options"),
        )


# --------------------------------------------------------------------------------------------
# build_corpus
# --------------------------------------------------------------------------------------------


def build_corpus(
    data: Any,
    tokenizer: Any,
    *,
    task_column: str = "task",
    text_column: str = "text",
    prompt_column: str | None = None,
    completion_column: str | None = None,
    tasks: Sequence[str] | None = None,
    max_length: int = 256,
    test_size: float = 0.33,
    validation_size: float = 0.1,
    seed: int = 0,
) -> TaskCorpus:
    """Tokenise a table of documents and split each task into train / validation / test.

    Parameters
    ----------
    data : datasets.Dataset, pandas.DataFrame, str, pathlib.Path or TaskCorpus
        One row per document. A path must end in ``.jsonl``, ``.json``, ``.csv`` or
        ``.parquet``. A :class:`TaskCorpus` is returned unchanged.
    tokenizer : transformers.PreTrainedTokenizerBase
        Called as ``tokenizer(texts, add_special_tokens=False)``; never modified. The start
        token is its ``bos_token_id``, else its ``eos_token_id``; the pad id is its
        ``pad_token_id``, else its ``eos_token_id``, else 0.
    task_column : str, default "task"
        Column with the task of each row. Non-string values are converted with ``str``.
    text_column : str, default "text"
        Column with the document text (text mode: every token is scored). Ignored in
        prompt/completion mode.
    prompt_column, completion_column : str, optional
        Give both for prompt/completion mode: a document is the prompt tokens followed by the
        completion tokens (each tokenised on its own), and only completion tokens are scored.
        A prompt may be empty; a completion may not.
    tasks : sequence of str, optional
        Keep only these tasks, with ids in this order. Default: every task in the data, in
        sorted order of the names.
    max_length : int, default 256
        Maximum tokens per document, start token included (>= 2). Longer documents are
        truncated at the end.
    test_size, validation_size : float, default 0.33 and 0.1
        Fractions of each task's documents held out, each in [0, 1) with sum < 1. Task ``d``
        with ``n`` documents gets ``round(test_size * n)`` test documents (at least 1 when
        ``test_size > 0``), ``round(validation_size * n)`` validation documents (at least 1
        when ``validation_size > 0``; Python's ``round``, halves to even) and the rest
        (at least 1) for training.
    seed : int, default 0
        Non-negative seed of the split. Task ``d`` is shuffled by a numpy generator seeded
        with ``(seed, crc32(task name))``, so its split does not depend on the other tasks or
        on ``tasks=``.

    Returns
    -------
    TaskCorpus
        Within each split documents are grouped by task id, in the original row order.

    Raises
    ------
    TypeError
        If ``data`` is none of the accepted types.
    ValueError
        For a missing column, an empty table, a missing task value, empty or non-string
        text, an unknown name in ``tasks``, a task with too few documents for the split, or
        out-of-range ``max_length`` / ``test_size`` / ``validation_size`` / ``seed``. The
        message names the column or task, shows the value and says the fix.
    """
    if isinstance(data, TaskCorpus):
        return data
    prompt_mode = _check_options(
        prompt_column=prompt_column,
        completion_column=completion_column,
        max_length=max_length,
        test_size=test_size,
        validation_size=validation_size,
        seed=seed,
    )
    test_size, validation_size, max_length = (
        float(test_size),
        float(validation_size),
        int(max_length),
    )
    start_id, pad_id = _special_ids(tokenizer)
    if prompt_mode:
        content_columns = {"prompt_column": prompt_column, "completion_column": completion_column}
    else:
        content_columns = {"text_column": text_column}
    needed = {"task_column": task_column, **content_columns}
    columns = _read_columns(data, needed)

    row_tasks = _task_values(columns["task_column"], task_column)
    task_names = _choose_tasks(row_tasks, tasks)
    task_id_of = {name: i for i, name in enumerate(task_names)}
    keep_rows = np.array([i for i, t in enumerate(row_tasks) if t in task_id_of], dtype=np.int64)
    row_task_ids = np.array([task_id_of[row_tasks[i]] for i in keep_rows], dtype=np.int64)

    if prompt_mode:
        prompts = _text_values(
            columns["prompt_column"], keep_rows, row_tasks, prompt_column, allow_empty=True
        )
        completions = _text_values(
            columns["completion_column"], keep_rows, row_tasks, completion_column
        )
        contents = {"prompt": prompts, "completion": completions}
    else:
        contents = {"text": _text_values(columns["text_column"], keep_rows, row_tasks, text_column)}

    assignment = _assign_splits(
        row_task_ids, task_names, test_size=test_size, validation_size=validation_size, seed=seed
    )
    token_lists, label_starts = _tokenize(
        contents, tokenizer, start_id=start_id, max_length=max_length
    )
    _check_scored(token_lists, label_starts, keep_rows, row_tasks, max_length, prompt_mode)

    lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
    flat = np.fromiter(
        (tok for toks in token_lists for tok in toks), dtype=np.int32, count=int(lengths.sum())
    )
    offsets = np.zeros(len(token_lists) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    everything = TaskSplit(
        "all",
        flat,
        offsets,
        label_starts,
        row_task_ids,
        num_tasks=len(task_names),
        pad_token_id=pad_id,
        source_index=keep_rows,
    )
    splits = {}
    for code, name in enumerate(SPLIT_NAMES):
        members = np.flatnonzero(assignment == code)
        members = members[np.lexsort((members, row_task_ids[members]))]
        split = everything.select(members)
        split.name = name
        splits[name] = split

    options = {
        "task_column": task_column,
        "text_column": None if prompt_mode else text_column,
        "prompt_column": prompt_column,
        "completion_column": completion_column,
        "max_length": int(max_length),
        "test_size": float(test_size),
        "validation_size": float(validation_size),
        "seed": int(seed),
        "tokenizer": str(getattr(tokenizer, "name_or_path", "") or ""),
    }
    return TaskCorpus(
        task_names, splits, pad_token_id=pad_id, start_token_id=start_id, options=options
    )


# --------------------------------------------------------------------------------------------
# helpers of build_corpus
# --------------------------------------------------------------------------------------------


def _check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}.")


def _check_options(
    *,
    prompt_column: str | None,
    completion_column: str | None,
    max_length: Any,
    test_size: Any,
    validation_size: Any,
    seed: Any,
) -> bool:
    """Validate the scalar options of :func:`build_corpus`; return True in prompt mode."""
    if (prompt_column is None) != (completion_column is None):
        given, other = (
            ("prompt_column", "completion_column")
            if completion_column is None
            else ("completion_column", "prompt_column")
        )
        raise ValueError(
            f"{given} is set but {other} is not; give both for prompt/completion mode, or "
            f"neither to score the whole text_column."
        )
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)):
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}.")
    if max_length < 2:
        raise ValueError(
            f"max_length must be >= 2 (the start token plus at least one scored token), got "
            f"{max_length}."
        )
    for name, value in (("test_size", test_size), ("validation_size", validation_size)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"{name} must be a float in [0, 1), got {value!r}.")
        if not 0.0 <= float(value) < 1.0:
            raise ValueError(
                f"{name} must be a fraction in [0, 1) of each task's documents, got {value!r}; "
                f"use 0 for no {name.split('_')[0]} split."
            )
    if float(test_size) + float(validation_size) >= 1.0:
        raise ValueError(
            f"test_size + validation_size must be < 1 so that training documents remain, got "
            f"{test_size!r} + {validation_size!r} = {float(test_size) + float(validation_size)!r}."
        )
    _check_seed(seed)
    return prompt_column is not None


def _read_columns(data: Any, needed: Mapping[str, str]) -> dict[str, list]:
    """Load ``data`` and return the ``needed`` columns (argument name -> column) as lists."""
    import datasets

    if isinstance(data, (str, Path)):
        data = _load_file(Path(data))
    if isinstance(data, pd.DataFrame):
        available = list(data.columns)
        n_rows = len(data)

        def get(column: str) -> list:
            return data[column].tolist()

    elif isinstance(data, datasets.Dataset):
        available = list(data.column_names)
        n_rows = data.num_rows

        def get(column: str) -> list:
            return list(data[column])

    elif isinstance(data, datasets.DatasetDict):
        raise TypeError(
            f"data is a datasets.DatasetDict with splits {list(data)}; pass one of them, e.g. "
            f"data['train'] (build_corpus makes its own per-task splits)."
        )
    else:
        raise TypeError(
            f"data must be a datasets.Dataset, a pandas.DataFrame, a path to a "
            f"{'/'.join(_FILE_SUFFIXES)} file, or a TaskCorpus; got {type(data).__name__}."
        )
    if n_rows == 0:
        raise ValueError(
            f"data has no rows (columns {available}); build_corpus needs at least one document "
            f"per task."
        )
    for argument, column in needed.items():
        if column not in available:
            raise ValueError(
                f"column {column!r} ({argument}) not found in data; available columns: "
                f"{available}. Pass {argument}=<the column's name>."
            )
    return {argument: get(column) for argument, column in needed.items()}


def _load_file(path: Path) -> Any:
    """Read a .jsonl / .json / .csv / .parquet file into a ``datasets.Dataset``."""
    import datasets

    suffix = path.suffix.lower()
    if suffix not in _FILE_SUFFIXES:
        raise ValueError(
            f"data path {str(path)!r} has suffix {suffix!r}; supported file types are "
            f"{list(_FILE_SUFFIXES)}. Load other formats yourself and pass a DataFrame."
        )
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist.")
    if suffix in (".jsonl", ".json"):
        return datasets.Dataset.from_json(str(path))
    if suffix == ".csv":
        return datasets.Dataset.from_csv(str(path))
    return datasets.Dataset.from_parquet(str(path))


def _is_missing(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, (float, np.floating)) and math.isnan(value)


def _task_values(values: list, column: str) -> list[str]:
    """Task names per row as strings; ValueError on missing values."""
    out = []
    bad = []
    for i, value in enumerate(values):
        if _is_missing(value) or (isinstance(value, str) and not value.strip()):
            bad.append(i)
            out.append("")
        else:
            out.append(value if isinstance(value, str) else str(value))
    if bad:
        raise ValueError(
            f"column {column!r} (task_column) has {len(bad)} missing or empty task value(s), "
            f"first at row {bad[0]} (value {values[bad[0]]!r}); every row needs a task. Drop "
            f"or fill those rows first (e.g. df.dropna(subset=[{column!r}]))."
        )
    return out


def _choose_tasks(row_tasks: list[str], tasks: Sequence[str] | None) -> list[str]:
    present = sorted(set(row_tasks))
    if tasks is None:
        return present
    if isinstance(tasks, str) or not isinstance(tasks, (Sequence, np.ndarray, pd.Index)):
        raise ValueError(
            f"tasks must be a list of task names, got {tasks!r}; e.g. tasks=[{tasks!r}]."
            if isinstance(tasks, str)
            else f"tasks must be a list of task names, got {type(tasks).__name__}."
        )
    chosen = [str(t) for t in tasks]
    if not chosen:
        raise ValueError("tasks is empty; pass None for all tasks or a list of task names.")
    repeated = sorted({t for t in chosen if chosen.count(t) > 1})
    if repeated:
        raise ValueError(f"tasks lists these names more than once: {repeated}; list each once.")
    present_set = set(present)
    unknown = [t for t in chosen if t not in present_set]
    if unknown:
        raise ValueError(
            _unknown_task_message(unknown[0], present, what="task", all_unknown=unknown)
        )
    return chosen


def _unknown_task_message(
    name: Any, valid: Sequence[str], *, what: str, all_unknown: Sequence[str] | None = None
) -> str:
    unknown = list(all_unknown) if all_unknown else [name]
    head = (
        f"unknown {what} {name!r}"
        if len(unknown) == 1
        else f"{len(unknown)} unknown {what}s: {unknown[:10]}{' ...' if len(unknown) > 10 else ''}"
    )
    close = difflib.get_close_matches(str(name), list(valid), n=3, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else "."
    shown = ", ".join(repr(v) for v in list(valid)[:10])
    more = f", ... ({len(valid)} in all)" if len(valid) > 10 else ""
    return f"{head}{hint} Valid {what}s: {shown}{more}."


def _text_values(
    values: list,
    rows: np.ndarray,
    row_tasks: list[str],
    column: str,
    *,
    allow_empty: bool = False,
) -> list[str]:
    """The strings of ``values`` at ``rows``; ValueError on non-strings or empty text."""
    out = []
    for i in rows.tolist():
        value = values[i]
        if _is_missing(value):
            raise ValueError(
                f"column {column!r} is missing at row {i} (task {row_tasks[i]!r}, value "
                f"{value!r}); drop or fill rows without text first."
            )
        if not isinstance(value, str):
            raise ValueError(
                f"column {column!r} must hold strings, but row {i} (task {row_tasks[i]!r}) holds "
                f"a value of type {type(value).__name__}: {value!r:.80}. Convert the column to "
                f"text first, "
                f"e.g. df[{column!r}] = df[{column!r}].astype(str)."
            )
        if not allow_empty and not value.strip():
            raise ValueError(
                f"column {column!r} is empty or whitespace-only at row {i} (task "
                f"{row_tasks[i]!r}, value {value!r}); drop such rows first, e.g. "
                f"df = df[df[{column!r}].str.strip() != '']."
            )
        out.append(value)
    return out


def _special_ids(tokenizer: Any) -> tuple[int, int]:
    """(start token id, pad token id) of ``tokenizer``, without modifying it."""
    if not callable(tokenizer):
        raise TypeError(
            f"tokenizer must be a Hugging Face tokenizer (callable on a list of texts), got "
            f"{type(tokenizer).__name__}."
        )
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    start = bos if bos is not None else eos
    if start is None:
        raise ValueError(
            "tokenizer has neither a bos_token nor an eos_token, so there is no start token to "
            "put before each document; load a tokenizer that defines one of them (e.g. "
            "PreTrainedTokenizerFast(..., bos_token='<s>'))."
        )
    if pad is None:
        pad = eos if eos is not None else 0
    return int(start), int(pad)


def _tokenize(
    contents: Mapping[str, list[str]], tokenizer: Any, *, start_id: int, max_length: int
) -> tuple[list[list[int]], np.ndarray]:
    """Tokenise with ``Dataset.map(batched=True)``; return token lists and label starts."""
    import datasets

    def encode(texts: list[str]) -> list[list[int]]:
        # truncate in the tokenizer too: it saves work and its length warnings
        return tokenizer(
            texts, add_special_tokens=False, truncation=True, max_length=max_length - 1
        )["input_ids"]

    def encode_batch(batch: dict[str, list[str]]) -> dict[str, list]:
        if "text" in batch:
            ids = [[start_id, *toks][:max_length] for toks in encode(batch["text"])]
            return {"input_ids": ids, "label_start": [1] * len(ids)}
        prompts = encode(batch["prompt"])
        completions = encode(batch["completion"])
        ids = [[start_id, *p, *c][:max_length] for p, c in zip(prompts, completions, strict=True)]
        return {"input_ids": ids, "label_start": [1 + len(p) for p in prompts]}

    table = datasets.Dataset.from_dict(dict(contents))
    encoded = table.map(
        encode_batch,
        batched=True,
        remove_columns=table.column_names,
        new_fingerprint=uuid.uuid4().hex,
        desc="Tokenizing",
    )
    token_lists = list(encoded["input_ids"])
    label_starts = np.asarray(list(encoded["label_start"]), dtype=np.int64)
    return token_lists, label_starts


def _check_scored(
    token_lists: list[list[int]],
    label_starts: np.ndarray,
    rows: np.ndarray,
    row_tasks: list[str],
    max_length: int,
    prompt_mode: bool,
) -> None:
    """ValueError if a document has no scored token left after truncation."""
    lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
    empty = np.flatnonzero(lengths <= label_starts)
    if not len(empty):
        return
    first = int(empty[0])
    row = int(rows[first])
    if prompt_mode:
        raise ValueError(
            f"{len(empty)} document(s) have no completion token left within max_length="
            f"{max_length} (first: row {row}, task {row_tasks[row]!r}, whose prompt takes "
            f"{int(label_starts[first]) - 1} tokens). Raise max_length or shorten or drop "
            f"those prompts."
        )
    raise ValueError(
        f"{len(empty)} document(s) tokenise to no tokens (first: row {row}, task "
        f"{row_tasks[row]!r}); the tokenizer drops their text. Drop those rows or use a "
        f"tokenizer that covers their characters."
    )


def _split_sizes(n: int, test_size: float, validation_size: float) -> tuple[int, int, int]:
    """(n_train, n_validation, n_test) for a task with ``n`` documents."""
    n_test = max(1, round(test_size * n)) if test_size > 0 else 0
    n_val = max(1, round(validation_size * n)) if validation_size > 0 else 0
    return n - n_test - n_val, n_val, n_test


def _min_docs(test_size: float, validation_size: float) -> int:
    """Smallest document count that leaves at least one training document."""
    n = 1
    while _split_sizes(n, test_size, validation_size)[0] < 1:
        n += 1
    return n


def _task_seed(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


def _assign_splits(
    task_ids: np.ndarray,
    task_names: Sequence[str],
    *,
    test_size: float,
    validation_size: float,
    seed: int,
) -> np.ndarray:
    """Split code per document: 0 train, 1 validation, 2 test (seeded, per task)."""
    counts = np.bincount(task_ids, minlength=len(task_names))
    too_few = [
        (task_names[d], int(counts[d]))
        for d in range(len(task_names))
        if _split_sizes(int(counts[d]), test_size, validation_size)[0] < 1
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
        _, n_val, n_test = _split_sizes(len(docs), test_size, validation_size)
        rng = np.random.default_rng([int(seed), _task_seed(name)])
        shuffled = docs[rng.permutation(len(docs))]
        assignment[shuffled[:n_test]] = 2
        assignment[shuffled[n_test : n_test + n_val]] = 1
    return assignment
