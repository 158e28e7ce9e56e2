"""Data: multi-task corpora (task names, tokenised documents, per-task splits, mixed batches)
and the default Shakespeare data.

Modules by job: :mod:`~bora_pyro.data.readers` (files and tables into columns, column checks),
:mod:`~bora_pyro.data.corpus` (``TaskCorpus`` and ``build_corpus``),
:mod:`~bora_pyro.data.splits` (``TaskSplit`` and the seeded per-task split),
:mod:`~bora_pyro.data.batches` (``Batch``, collation, ``IGNORE_INDEX``),
:mod:`~bora_pyro.data.chat` (conversations: the chat template and the assistant's tokens) and
:mod:`~bora_pyro.data.shakespeare` (the default data).
"""

from bora_pyro.data.batches import IGNORE_INDEX, Batch
from bora_pyro.data.corpus import RESERVED_TASK_NAMES, TaskCorpus, build_corpus
from bora_pyro.data.readers import DATA_FILE_SUFFIXES, check_data_file
from bora_pyro.data.shakespeare import (
    DEFAULT_CHARACTERS,
    REPRO_CHARACTERS,
    load_shakespeare,
    paper_selection,
    plays_dir,
    shakespeare_conversations,
    shakespeare_corpus,
)
from bora_pyro.data.splits import SPLIT_NAMES, TaskSplit

__all__ = [
    "Batch",
    "TaskSplit",
    "TaskCorpus",
    "build_corpus",
    "SPLIT_NAMES",
    "IGNORE_INDEX",
    "RESERVED_TASK_NAMES",
    "DATA_FILE_SUFFIXES",
    "check_data_file",
    "DEFAULT_CHARACTERS",
    "REPRO_CHARACTERS",
    "load_shakespeare",
    "shakespeare_conversations",
    "paper_selection",
    "plays_dir",
    "shakespeare_corpus",
]
