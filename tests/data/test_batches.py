"""Tests of bora_pyro.data.batches: the padded and packed layouts of a batch and the Batch object."""

import numpy as np
import pytest
import torch

from bora_pyro.data import IGNORE_INDEX, Batch
from bora_pyro.data.batches import collate, collate_packed, pack_rows

PAD = 0


def test_ignore_index_is_the_one_torch_cross_entropy_skips():
    assert IGNORE_INDEX == torch.nn.CrossEntropyLoss().ignore_index


def test_collate_pads_right_and_scores_from_the_label_start():
    documents = [np.array([1, 7, 8, 9], np.int32), np.array([1, 5], np.int32), np.array([1, 4, 6])]
    label_starts = np.array([1, 1, 2])
    batch = collate(
        documents, label_starts, torch.tensor([2, 0, 1]), np.array([5, 3, 5]), pad_token_id=PAD
    )
    assert batch.input_ids.tolist() == [[1, 7, 8, 9], [1, 5, PAD, PAD], [1, 4, 6, PAD]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]
    x = IGNORE_INDEX
    assert batch.labels.tolist() == [[x, 7, 8, 9], [x, 5, x, x], [x, x, 6, x]]
    assert batch.task_ids.tolist() == [2, 0, 1]
    assert batch.doc_index.tolist() == [5, 3, 5]
    assert all(t.dtype == torch.long for t in (batch.input_ids, batch.labels, batch.doc_index))
    assert batch.num_scored_tokens == 5
    assert len(batch) == 3


def test_collate_refuses_no_documents():
    with pytest.raises(ValueError, match="documents is empty"):
        collate([], np.zeros(0), torch.zeros(0, dtype=torch.long), np.zeros(0), pad_token_id=PAD)


@pytest.mark.parametrize("pack", [False, True])
def test_batch_to_moves_every_field(pack):
    make = collate_packed if pack else collate
    batch = make([np.array([1, 2, 3]), np.array([1, 4])], np.array([1, 1]), torch.tensor([0, 1]), [0, 1],
                 pad_token_id=PAD)
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and moved is not batch and moved.packed == pack
    for field in ("input_ids", "attention_mask", "labels", "task_ids", "doc_index", "position_ids", "segment_ids"):
        if pack or field not in ("position_ids", "segment_ids"):
            assert torch.equal(getattr(moved, field), getattr(batch, field))
        else:
            assert getattr(moved, field) is None


def test_collate_packed_restarts_positions_and_never_scores_a_first_token():
    documents = [np.array([1, 7, 8, 9]), np.array([1, 5]), np.array([1, 4, 6]), np.array([1, 3, 3, 3, 3])]
    label_starts = np.array([1, 1, 2, 1])
    batch = collate_packed(documents, label_starts, torch.tensor([2, 0, 1, 0]), np.array([5, 3, 6, 0]),
                           pad_token_id=PAD, row_tokens=7)
    # first-fit decreasing in rows of 7 gives 2 rows; balanced: [doc 3, doc 1] and [doc 0, doc 2]
    x = IGNORE_INDEX
    assert batch.input_ids.tolist() == [[1, 3, 3, 3, 3, 1, 5], [1, 7, 8, 9, 1, 4, 6]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1], [0, 1, 2, 3, 0, 1, 2]]
    assert batch.segment_ids.tolist() == [[3, 3, 3, 3, 3, 1, 1], [0, 0, 0, 0, 2, 2, 2]]
    assert batch.labels.tolist() == [[x, 3, 3, 3, 3, x, 5], [x, 7, 8, 9, x, x, 6]]
    assert batch.attention_mask.tolist() == [[1] * 7, [1] * 7]
    # per document, as given: the same minibatch as the padded batch
    assert batch.task_ids.tolist() == [2, 0, 1, 0] and batch.doc_index.tolist() == [5, 3, 6, 0]
    assert len(batch) == 4 and batch.num_rows == 2 and batch.packed and batch.real_fraction == 1.0
    padded = collate(documents, label_starts, batch.task_ids, [5, 3, 6, 0], pad_token_id=PAD)
    assert batch.num_scored_tokens == padded.num_scored_tokens == 9
    assert not padded.packed and padded.real_fraction == 14 / 20


def test_collate_packed_pads_the_end_of_short_rows():
    documents = [np.array([1, 2, 3, 4, 5]), np.array([1, 2])]
    batch = collate_packed(documents, np.array([1, 1]), torch.tensor([0, 0]), [0, 1], pad_token_id=PAD, row_tokens=5)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [1, 2, PAD, PAD, PAD]]
    assert batch.segment_ids.tolist() == [[0] * 5, [1, 1, -1, -1, -1]]
    assert batch.position_ids[1].tolist() == [0, 1, 0, 0, 0]
    assert batch.labels[1].tolist() == [IGNORE_INDEX, 2] + [IGNORE_INDEX] * 3


def test_pack_rows_balances_rows_and_respects_the_budget():
    rng = np.random.default_rng(0)
    for _ in range(50):
        lengths = rng.integers(1, 60, size=rng.integers(1, 20)).tolist()
        budget = int(rng.integers(1, 200))
        rows = pack_rows(lengths, budget)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        fills = [sum(lengths[i] for i in row) for row in rows]
        assert max(fills) <= max(budget, max(lengths))
        assert len(rows) <= len(lengths)
    # one long document and small ones: the rows are evened out, not filled one after another
    assert sorted(sum([40, 30, 20, 10][i] for i in row) for row in pack_rows([40, 30, 20, 10], 60)) == [50, 50]
    with pytest.raises(ValueError, match="row_tokens must be a positive integer, got row_tokens=0"):
        pack_rows([3], 0)
