"""Tests of bora_pyro.data.splits: the seeded per-task split, and batching a split."""

import numpy as np
import pandas as pd
import pytest
import torch

from bora_pyro.data import IGNORE_INDEX, TaskSplit, build_corpus
from bora_pyro.data.splits import split_sizes
from tests.data.helpers import all_batches, assert_corpora_equal


def expected_sizes(n, test_size, validation_size):
    n_test = max(1, round(test_size * n)) if test_size > 0 else 0
    n_val = max(1, round(validation_size * n)) if validation_size > 0 else 0
    return n - n_test - n_val, n_val, n_test


# ---------------------------------------------------------------------------------------------
# the seeded per-task split
# ---------------------------------------------------------------------------------------------


def test_splits_are_disjoint_and_cover_all_documents(frame, tokenizer):
    corpus = build_corpus(frame, tokenizer)
    rows = [
        set(corpus.split(name).source_index.tolist()) for name in ("train", "validation", "test")
    ]
    assert not (rows[0] & rows[1]) and not (rows[0] & rows[2]) and not (rows[1] & rows[2])
    assert set.union(*rows) == set(range(len(frame)))
    for name in ("train", "validation", "test"):
        split = corpus.split(name)
        tasks = [corpus.tasks[t] for t in split.task_ids.tolist()]
        assert tasks == frame["task"].iloc[split.source_index].tolist()


@pytest.mark.parametrize(
    "test_size, validation_size", [(0.33, 0.1), (0.2, 0.0), (0.0, 0.25), (0.5, 0.25), (0.1, 0.1)]
)
def test_split_sizes_follow_the_rounding_rule(frame, tokenizer, test_size, validation_size):
    corpus = build_corpus(frame, tokenizer, test_size=test_size, validation_size=validation_size)
    summary = corpus.summary().set_index("task")
    counts = frame["task"].value_counts()
    for task in corpus.tasks:
        n_train, n_val, n_test = expected_sizes(counts[task], test_size, validation_size)
        assert summary.loc[task, "n_train"] == n_train
        assert summary.loc[task, "n_validation"] == n_val
        assert summary.loc[task, "n_test"] == n_test
    if validation_size == 0:
        assert len(corpus.validation) == 0 and corpus.validation.num_docs == 0
        assert list(corpus.validation.batches(4)) == []


def test_same_seed_same_split_other_seed_other_split(frame, tokenizer):
    first = build_corpus(frame, tokenizer, seed=3)
    again = build_corpus(frame, tokenizer, seed=3)
    other = build_corpus(frame, tokenizer, seed=4)
    assert_corpora_equal(first, again)
    assert not np.array_equal(first.test.source_index, other.test.source_index)


def test_split_of_a_task_does_not_depend_on_other_tasks(frame, tokenizer):
    full = build_corpus(frame, tokenizer, seed=1)
    # drop gamma and reorder the rows of the other tasks: alpha's split must not change
    alpha_rows = frame[frame.task == "alpha"]
    others = frame[frame.task == "beta"].iloc[::-1]
    mixed = pd.concat([others, alpha_rows]).reset_index(drop=True)
    part = build_corpus(mixed, tokenizer, tasks=["alpha", "beta"], seed=1)

    def alpha_texts(corpus, data, split):
        s = corpus.split(split)
        keep = s.task_ids.numpy() == corpus.task_index("alpha")
        return sorted(data["text"].iloc[s.source_index[keep]])

    for split in ("train", "validation", "test"):
        assert alpha_texts(full, frame, split) == alpha_texts(part, mixed, split)


def test_split_sizes_halves_round_to_even():
    # 0.5 * 5 = 2.5 rounds to 2, 0.5 * 7 = 3.5 rounds to 4; a non-zero share keeps one document
    assert split_sizes(5, 0.5, 0.0) == (3, 0, 2)
    assert split_sizes(7, 0.5, 0.0) == (3, 0, 4)
    assert split_sizes(3, 0.01, 0.01) == (1, 1, 1)


# ---------------------------------------------------------------------------------------------
# batches of a split
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{}, {"shuffle": True}, {"sort_by_length": True}])
def test_batches_visit_each_document_once(frame, tokenizer, kwargs):
    corpus = build_corpus(frame, tokenizer)
    split = corpus.train
    batches = all_batches(split, 5, **kwargs)
    seen = torch.cat([b.doc_index for b in batches]).tolist()
    assert sorted(seen) == list(range(len(split)))
    assert all(len(b) == 5 for b in batches[:-1])
    for b in batches:
        assert torch.equal(b.task_ids, split.task_ids[b.doc_index])
        # dynamic padding: at least one row of every batch is full width
        assert b.attention_mask.sum(1).max() == b.input_ids.shape[1]
    if kwargs.get("sort_by_length"):
        lengths = torch.cat([b.attention_mask.sum(1) for b in batches])
        assert torch.all(lengths[:-1] >= lengths[1:])


def test_shuffled_batches_mix_tasks_and_follow_the_generator(frame, tokenizer):
    split = build_corpus(frame, tokenizer).train
    first = all_batches(split, 8, shuffle=True, generator=torch.Generator().manual_seed(0))
    again = all_batches(split, 8, shuffle=True, generator=torch.Generator().manual_seed(0))
    other = all_batches(split, 8, shuffle=True, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a.doc_index, b.doc_index) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a.doc_index, b.doc_index) for a, b in zip(first, other, strict=True))
    assert any(len(set(b.task_ids.tolist())) > 1 for b in first)


def test_drop_last(frame, tokenizer):
    split = build_corpus(frame, tokenizer).train
    n = len(split)
    kept = all_batches(split, 4, shuffle=True, drop_last=True)
    assert len(kept) == n // 4 and all(len(b) == 4 for b in kept)
    assert len(all_batches(split, 4)) == -(-n // 4)


def test_batch_and_batches_reject_bad_arguments(frame, tokenizer):
    split = build_corpus(frame, tokenizer).train
    with pytest.raises(ValueError, match=r"document index 999 out of range for split 'train'"):
        split.batch([0, 999])
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got batch_size=0"):
        next(split.batches(0))
    with pytest.raises(ValueError, match="shuffle=True and sort_by_length=True"):
        next(split.batches(2, shuffle=True, sort_by_length=True))


def test_subset_caps_each_task_and_renumbers(frame, tokenizer):
    split = build_corpus(frame, tokenizer, test_size=0.5, validation_size=0.0).test
    sub = split.subset(3, seed=0)
    assert sub.docs_per_task.tolist() == np.minimum(split.docs_per_task, 3).tolist()
    assert sub.name == "test"
    assert sorted(torch.cat([b.doc_index for b in sub.batches(2)]).tolist()) == list(
        range(len(sub))
    )
    assert set(sub.source_index) <= set(split.source_index)
    # the kept documents are the same documents
    position = {row: i for i, row in enumerate(split.source_index.tolist())}
    for i, row in enumerate(sub.source_index.tolist()):
        assert np.array_equal(sub.doc_tokens(i), split.doc_tokens(position[row]))
    assert np.array_equal(split.subset(3, seed=0).source_index, sub.source_index)
    assert not np.array_equal(split.subset(3, seed=1).source_index, sub.source_index)
    with pytest.raises(ValueError, match="max_docs_per_task must be a positive integer"):
        split.subset(0)
    with pytest.raises(ValueError, match="seed must be an integer >= 0, got seed=-1"):
        split.subset(3, seed=-1)


def test_task_split_checks_its_arrays():
    with pytest.raises(ValueError, match=r"offsets must have num_docs \+ 1"):
        TaskSplit("train", [1, 5, 6], [0, 3], [1], [0, 0], num_tasks=1, pad_token_id=0)
    with pytest.raises(ValueError, match=r"label_starts must lie in 1 \.\. document length"):
        TaskSplit("train", [1, 5, 6], [0, 3], [0], [0], num_tasks=1, pad_token_id=0)
    with pytest.raises(ValueError, match=r"task ids must lie in 0 \.\. num_tasks - 1 = 0"):
        TaskSplit("train", [1, 5, 6], [0, 3], [1], [1], num_tasks=1, pad_token_id=0)
    with pytest.raises(ValueError, match="num_tasks must be a positive integer, got num_tasks=0"):
        TaskSplit("train", [], [0], [], [], num_tasks=0, pad_token_id=0)


def test_a_scored_mask_sets_the_labels_and_survives_selection():
    # two documents [1 5 6 7] and [1 8 9]: scored at positions 1, 3 and at position 2
    scored = [False, True, False, True, False, False, True]
    split = TaskSplit("train", [1, 5, 6, 7, 1, 8, 9], [0, 4, 7], [1, 2], [0, 1], num_tasks=2,
                      pad_token_id=0, scored=scored)
    ignore = IGNORE_INDEX
    assert split.batch([0, 1]).labels.tolist() == [[ignore, 5, ignore, 7], [ignore, ignore, 9, ignore]]
    assert split.doc_labels(1).tolist() == [ignore, ignore, 9]
    assert split.tokens_per_task.tolist() == [2, 1] and split.num_tokens == 3
    picked = split.select([1, 0, 1])
    assert picked.batch([0, 1]).labels.tolist() == [[ignore, ignore, 9, ignore], [ignore, 5, ignore, 7]]
    assert picked.tokens_per_task.tolist() == [2, 2]
    with pytest.raises(ValueError, match="scored is true at the first position of document 1"):
        TaskSplit("t", [1, 5, 1, 8], [0, 2, 4], [1, 1], [0, 0], num_tasks=1, pad_token_id=0,
                  scored=[False, True, True, True])
    with pytest.raises(ValueError, match="document 0 has label start 1 but is first scored at 2"):
        TaskSplit("t", [1, 5, 6], [0, 3], [1], [0], num_tasks=1, pad_token_id=0,
                  scored=[False, False, True])
    with pytest.raises(ValueError, match=r"one entry per token \(len\(tokens\) = 3\), got 2"):
        TaskSplit("t", [1, 5, 6], [0, 3], [1], [0], num_tasks=1, pad_token_id=0, scored=[False, True])
