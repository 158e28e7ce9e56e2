"""Data: multi-task corpora (task names, tokenised documents, per-task splits, mixed batches)
and the default Shakespeare data."""

from bora_pyro.data.corpus import (
    IGNORE_INDEX,
    SPLIT_NAMES,
    Batch,
    TaskCorpus,
    TaskSplit,
    build_corpus,
)
from bora_pyro.data.shakespeare import (
    DEFAULT_CHARACTERS,
    REPRO_CHARACTERS,
    load_shakespeare,
    paper_selection,
    plays_dir,
    shakespeare_corpus,
)

__all__ = [
    "Batch",
    "TaskSplit",
    "TaskCorpus",
    "build_corpus",
    "SPLIT_NAMES",
    "IGNORE_INDEX",
    "DEFAULT_CHARACTERS",
    "REPRO_CHARACTERS",
    "load_shakespeare",
    "paper_selection",
    "plays_dir",
    "shakespeare_corpus",
]
