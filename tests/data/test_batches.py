"""Tests of bora_pyro.data.batches: the padded layout of a batch and the Batch object."""

import numpy as np
import pytest
import torch

from bora_pyro.data import IGNORE_INDEX, Batch
from bora_pyro.data.batches import collate

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


def test_batch_to_moves_every_field():
    batch = collate([np.array([1, 2, 3])], np.array([1]), torch.tensor([0]), [0], pad_token_id=PAD)
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and moved is not batch
    for field in ("input_ids", "attention_mask", "labels", "task_ids", "doc_index"):
        assert torch.equal(getattr(moved, field), getattr(batch, field))
