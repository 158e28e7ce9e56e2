"""The corpus: task names <-> ids, tokenised documents, and how a table becomes a corpus.

A *task* is one speaker, customer, author, ... ; a *document* is one token sequence belonging
to one task. :func:`build_corpus` reads a table with a task column and a text column (or a
prompt and a completion column, or a column of conversations, see
:mod:`bora_pyro.data.readers` and :mod:`bora_pyro.data.chat`), tokenises it, splits each
task into train / validation / test (:func:`bora_pyro.data.splits.assign_splits`) and returns a
:class:`TaskCorpus`: the task names and one :class:`~bora_pyro.data.splits.TaskSplit` per split.

A document of length ``n`` (``n <= max_length``) is the start token (the tokenizer's BOS
token, else its EOS token, so that the first text token has a context and is scored too), then
the prompt tokens, then the text or completion tokens; only the latter are scored (the layout
is drawn in :mod:`bora_pyro.data.batches`). A conversation is its rendering by the chat
template, after the start token unless the rendering begins with it, scored at the
assistant's tokens only.

Task names are text: labels are normalised with ``str`` (two labels that read the same, such
as ``1`` and ``"1"``, are an error), and the names in :data:`RESERVED_TASK_NAMES` are refused
because other layers use them.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from types import MappingProxyType
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..checks import did_you_mean, non_negative_int
from ..config import DataConfig
from .chat import conversation_values, encode_conversations
from .readers import read_table, task_labels, text_values
from .splits import SPLIT_NAMES, TaskSplit, assign_splits

__all__ = ["TaskCorpus", "build_corpus", "RESERVED_TASK_NAMES", "check_task_names"]

#: Task names that other layers use for something else, with what they mean there: the global
#: adapter in generation and export, and the summary row of evaluation tables.
RESERVED_TASK_NAMES: Mapping[str, str] = MappingProxyType(
    {
        "<global>": "the name of the global adapter in generation and export",
        "overall": "the name of the summary row of evaluation tables",
    }
)

_STATE_FORMAT = "bora_pyro.TaskCorpus"
_STATE_VERSION = 2  # 2: optional per-token ``scored`` masks (conversations)
_READABLE_VERSIONS = (1, 2)
#: The column of conversations used when ``messages_column`` is not named (TRL's name).
_DEFAULT_MESSAGES = "messages"


def check_task_names(names: Sequence[str], *, column: str | None = None) -> None:
    """Refuse task names in :data:`RESERVED_TASK_NAMES`.

    Parameters
    ----------
    names : sequence of str
        Task names.
    column : str, optional
        The task column they came from, for the suggested fix.

    Raises
    ------
    ValueError
        Naming the first reserved task, what the name means elsewhere, and how to rename it.
    """
    for name in names:
        if name in RESERVED_TASK_NAMES:
            new = name.strip("<>") if name.strip("<>") != name else f"{name}_task"
            rename = f".replace({{{name!r}: {new!r}}})"
            example = (
                f"df[{column!r}] = df[{column!r}]{rename}"
                if column is not None
                else f"with {rename} on the task column"
            )
            raise ValueError(
                f"task {name!r} has a reserved name ({RESERVED_TASK_NAMES[name]}); rename that "
                f"task, e.g. {example}, or leave it out with tasks=[...]. Reserved names: "
                f"{list(RESERVED_TASK_NAMES)}."
            )


def _unknown_task_message(
    name: Any, valid: Sequence[str], *, what: str, all_unknown: Sequence[str] | None = None
) -> str:
    unknown = list(all_unknown) if all_unknown else [name]
    head = (
        f"unknown {what} {name!r}"
        if len(unknown) == 1
        else f"{len(unknown)} unknown {what}s: {unknown[:10]}{' ...' if len(unknown) > 10 else ''}"
    )
    shown = ", ".join(repr(v) for v in list(valid)[:10])
    more = f", ... ({len(valid)} in all)" if len(valid) > 10 else ""
    return f"{head}{did_you_mean(name, valid)} Valid {what}s: {shown}{more}."


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
        check_task_names(self.tasks)
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
            (int64 ``[num_docs]``), ``s.source_index`` (int64 ``[num_docs]``) and, for
            conversations, ``s.scored`` (bool ``[T]``, the assistant's tokens). Save with
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
        if meta.get("version") not in _READABLE_VERSIONS:
            raise ValueError(
                f"meta['version'] is {meta.get('version')!r}; this bora_pyro reads TaskCorpus "
                f"state versions {list(_READABLE_VERSIONS)}."
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
            scored = tensors.get(f"{name}.scored")
            splits[name] = TaskSplit(
                name,
                tensors[keys[0]].numpy(),
                tensors[keys[1]].numpy(),
                tensors[keys[2]].numpy(),
                tensors[keys[3]].numpy(),
                num_tasks=len(tasks),
                pad_token_id=pad,
                source_index=None if source is None else source.numpy(),
                scored=None if scored is None else scored.numpy(),
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
    config: DataConfig | None = None,
    *,
    seed: int = 0,
    **settings: Any,
) -> TaskCorpus:
    """Tokenise a table of documents and split each task into train / validation / test.

    Parameters
    ----------
    data : datasets.Dataset, pandas.DataFrame, str, pathlib.Path or TaskCorpus
        One row per document. A path must end in ``.jsonl``, ``.json``, ``.csv`` or
        ``.parquet`` (see :mod:`bora_pyro.data.readers` for how each is read). A
        :class:`TaskCorpus` is returned unchanged.
    tokenizer : transformers.PreTrainedTokenizerBase
        Called as ``tokenizer(texts, add_special_tokens=False)``; never modified. The start
        token is its ``bos_token_id``, else its ``eos_token_id``; the pad id is its
        ``pad_token_id``, else its ``eos_token_id``, else 0.
    config : bora_pyro.config.DataConfig, optional
        Columns, tasks, ``max_length`` and split sizes; default ``DataConfig()`` (task column
        ``"task"``, text column ``"text"``, ``max_length=256``, ``test_size=0.33``,
        ``validation_size=0.1``). Its fields mean:

        * ``task_column``: the task of each row. Non-string labels are converted with
          ``str``; two labels that read the same (the int ``1`` and the string ``"1"``) are an
          error, and so are the names in :data:`RESERVED_TASK_NAMES` (unless left out by
          ``tasks``).
        * ``text_column``: the document text (every token scored), unless ``prompt_column``
          and ``completion_column`` are given: then a document is the prompt tokens followed
          by the completion tokens (each tokenised on its own), and only completion tokens are
          scored. A prompt may be empty; a completion may not.
        * ``messages_column``: instead, a conversation per row (a list of ``{"role",
          "content"}`` turns; in a CSV file its JSON text), rendered with the tokenizer's chat
          template; only the assistant's tokens are scored (how they are found:
          :mod:`bora_pyro.data.chat`). Used without being named when the data has a column
          ``messages``, no column ``text_column`` and no ``prompt_column`` is given.
        * ``task_column`` (and the other columns) may name a field of a column of dicts as
          ``"<column>.<key>"``, e.g. ``"metadata.character"`` for a per-conversation
          metadata dict.
        * ``tasks``: keep only these tasks, with ids in this order. Default: every task in
          the data, in sorted order of the names.
        * ``max_length``: maximum tokens per document, start token included (>= 2); longer
          documents are truncated at the end.
        * ``test_size``, ``validation_size``: fractions of each task's documents held out
          (see :func:`bora_pyro.data.splits.split_sizes`: rounded, at least 1 when non-zero,
          at least 1 document left for training).
    seed : int, default 0
        Non-negative seed of the split. Task ``d`` is shuffled by a numpy generator seeded
        with ``(seed, crc32(task name))``, so its split does not depend on the other tasks or
        on ``tasks``.
    **settings
        Fields of ``DataConfig`` that override ``config``, e.g. ``max_length=128`` (the
        keywords ``build_corpus`` always took).

    Returns
    -------
    TaskCorpus
        Within each split documents are grouped by task id, in the original row order.

    Raises
    ------
    FileNotFoundError
        If ``data`` is a path that does not exist.
    TypeError
        If ``data`` is none of the accepted types, or a keyword is not a ``DataConfig`` field.
    ValueError
        For a file that cannot be parsed (naming the file and line) or has no records, a
        missing column, an empty table, a missing, colliding or reserved task name, empty or
        non-string text, an unknown name in ``tasks``, a task with too few documents for the
        split, or a bad setting. The message names the column, task or setting, shows the
        value and says the fix.
    """
    if isinstance(data, TaskCorpus):
        return data
    config = _data_config(config, settings)
    seed = non_negative_int("seed", seed if config.split_seed is None else config.split_seed)
    task_column, text_column = config.task_column, config.text_column
    prompt_column, completion_column = config.prompt_column, config.completion_column
    max_length, test_size, validation_size = (
        config.max_length,
        config.test_size,
        config.validation_size,
    )
    start_id, pad_id = _special_ids(tokenizer)
    table = read_table(data)
    messages_column = _messages_column(config, table.columns)
    mode = "chat" if messages_column else ("prompt" if prompt_column is not None else "text")
    if mode == "chat":
        content_columns = {"messages_column": messages_column}
    elif mode == "prompt":
        content_columns = {"prompt_column": prompt_column, "completion_column": completion_column}
    else:
        content_columns = {"text_column": text_column}
    needed = {"task_column": task_column, **content_columns}
    columns = table.require(needed)

    row_tasks = task_labels(columns["task_column"], task_column)
    task_names = _choose_tasks(row_tasks, config.tasks)
    check_task_names(task_names, column=task_column)
    task_id_of = {name: i for i, name in enumerate(task_names)}
    keep_rows = np.array([i for i, t in enumerate(row_tasks) if t in task_id_of], dtype=np.int64)
    row_task_ids = np.array([task_id_of[row_tasks[i]] for i in keep_rows], dtype=np.int64)

    mask_method = None
    scored = None
    if mode == "chat":
        conversations = conversation_values(
            columns["messages_column"], keep_rows, row_tasks, messages_column
        )
    elif mode == "prompt":
        prompts = text_values(
            columns["prompt_column"], keep_rows, row_tasks, prompt_column, allow_empty=True
        )
        completions = text_values(
            columns["completion_column"], keep_rows, row_tasks, completion_column
        )
        contents = {"prompt": prompts, "completion": completions}
    else:
        contents = {"text": text_values(columns["text_column"], keep_rows, row_tasks, text_column)}

    assignment = assign_splits(
        row_task_ids, task_names, test_size=test_size, validation_size=validation_size, seed=seed
    )
    if mode == "chat":
        token_lists, masks, mask_method = encode_conversations(
            conversations,
            tokenizer,
            start_id=start_id,
            max_length=max_length,
            rows=keep_rows.tolist(),
            row_tasks=row_tasks,
        )
        _check_answers(masks, keep_rows, row_tasks, max_length)
        label_starts = np.array([int(np.argmax(m)) for m in masks], dtype=np.int64)
        scored = np.concatenate(masks) if masks else np.zeros(0, dtype=bool)
    else:
        token_lists, label_starts = _tokenize(
            contents, tokenizer, start_id=start_id, max_length=max_length
        )
        _check_scored(token_lists, label_starts, keep_rows, row_tasks, max_length, mode == "prompt")

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
        scored=scored,
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
        "text_column": text_column if mode == "text" else None,
        "prompt_column": prompt_column,
        "completion_column": completion_column,
        "messages_column": messages_column,
        "assistant_mask": mask_method,
        "max_length": int(max_length),
        "test_size": float(test_size),
        "validation_size": float(validation_size),
        "seed": int(seed),
        "split_seed": config.split_seed,
        "tokenizer": str(getattr(tokenizer, "name_or_path", "") or ""),
    }
    return TaskCorpus(
        task_names, splits, pad_token_id=pad_id, start_token_id=start_id, options=options
    )


# --------------------------------------------------------------------------------------------
# helpers of build_corpus
# --------------------------------------------------------------------------------------------


def _data_config(config: DataConfig | None, settings: Mapping[str, Any]) -> DataConfig:
    """``config`` (default ``DataConfig()``) with the keyword ``settings`` applied and checked."""
    if config is None:
        config = DataConfig()
    elif not isinstance(config, DataConfig):
        raise TypeError(
            f"config must be a bora_pyro.config.DataConfig, got {type(config).__name__}; pass "
            f"data settings as DataConfig(...) or as keywords."
        )
    valid = [f.name for f in fields(DataConfig)]
    unknown = [name for name in settings if name not in valid]
    if unknown:
        raise TypeError(
            f"build_corpus() got an unknown data setting {unknown[0]!r}"
            f"{did_you_mean(unknown[0], valid)} Valid settings: seed, {', '.join(valid)}."
        )
    return replace(config, **settings) if settings else config


def _messages_column(config: DataConfig, columns: Sequence[str]) -> str | None:
    """The column of conversations, or ``None`` for text or prompt/completion documents.

    ``config.messages_column`` when given; else ``"messages"`` when the data has that column,
    lacks ``config.text_column`` and no prompt column is given.
    """
    if config.messages_column is not None:
        return config.messages_column
    if (
        config.prompt_column is None
        and config.text_column not in columns
        and _DEFAULT_MESSAGES in columns
    ):
        return _DEFAULT_MESSAGES
    return None


def _check_answers(
    masks: list[np.ndarray], rows: np.ndarray, row_tasks: list[str], max_length: int
) -> None:
    """ValueError if a conversation has no assistant token left after truncation."""
    empty = [n for n, mask in enumerate(masks) if not mask.any()]
    if not empty:
        return
    row = int(rows[empty[0]])
    raise ValueError(
        f"{len(empty)} conversation(s) have no assistant token left within max_length="
        f"{max_length} (first: row {row}, task {row_tasks[row]!r}): the turns before the first "
        f"answer fill the whole length. Raise max_length, or shorten or drop those "
        f"conversations."
    )


def _choose_tasks(row_tasks: list[str], tasks: Sequence[str] | None) -> list[str]:
    present = sorted(set(row_tasks))
    if tasks is None:
        return present
    chosen = [str(t) for t in tasks]
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
