"""The one walk over a split (`iterate_split`) and the evaluation built on it: per-document NLL
against a row-by-row loop, bad batch sizes and empty splits rejected with clear errors."""

import pandas as pd
import pytest
import torch

from bora_pyro.data import IGNORE_INDEX, build_corpus
from bora_pyro.evaluation import iterate_split, per_doc_nll, per_task_nll
from bora_pyro.testing import char_tokenizer
from tests.conftest import assert_close
from tests.tiny_result import tiny_result


@pytest.fixture(scope="module")
def result():
    return tiny_result()


def test_per_doc_nll_equals_a_document_by_document_loop(result):
    split = result.corpus.split("train")
    nll, tokens = per_doc_nll(result.lm, result.task_adapters, split, batch_size=3)
    for i in range(len(split)):
        b = split.batch([i])
        with torch.no_grad():
            logits = result.lm(b.input_ids, b.attention_mask, adapters=result.task_adapters, task_ids=b.task_ids)
        target = b.labels[0, 1:]
        keep = target != IGNORE_INDEX
        logp = logits[0, :-1].log_softmax(-1)[keep].gather(-1, target[keep, None])
        assert_close(nll[i], -logp.sum(), rtol=1e-5, atol=1e-5)
        assert tokens[i] == int(keep.sum())


def test_iterate_split_visits_every_document_once_and_outputs_what_is_asked(result):
    split = result.corpus.split("train")
    seen = []
    for batch, logits, rows in iterate_split(result.lm, split, result.global_adapter, output="logits", batch_size=5):
        assert logits.shape[:2] == batch.input_ids.shape and rows is None and not logits.requires_grad
        seen += batch.doc_index.tolist()
    assert sorted(seen) == list(range(len(split)))
    # Per-row gradients: the gradient w.r.t. row n's copy is the gradient of document n alone.
    batch, nll, rows = next(iterate_split(result.lm, split, result.task_adapters, batch_size=4, row_gradients=True))
    (grad,) = torch.autograd.grad(nll.sum(), rows)
    leaf = result.task_adapters.clone().requires_grad_(True)
    one = split.batch([int(batch.doc_index[1])])
    (alone,) = torch.autograd.grad(
        result.lm.sequence_nll(one.input_ids, one.attention_mask, one.labels, adapters=leaf, task_ids=one.task_ids).sum(),
        leaf,
    )
    assert_close(grad[1], alone[int(one.task_ids[0])], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("batch_size", [0, -2, 1.5, True, "8"])
def test_bad_batch_sizes_are_rejected(result, batch_size):
    with pytest.raises(ValueError, match=r"batch_size must be a positive integer"):
        result.evaluate("train", batch_size=batch_size)
    with pytest.raises(ValueError, match=r"batch_size must be a positive integer"):
        per_doc_nll(result.lm, None, result.corpus.split("train"), batch_size=batch_size)


def test_bad_output_and_row_gradients_without_task_adapters(result):
    split = result.corpus.split("train")
    with pytest.raises(ValueError, match=r"output='probs' is not valid; choose one of 'nll', 'logits'"):
        next(iterate_split(result.lm, split, output="probs"))
    with pytest.raises(ValueError, match=r"row_gradients=True needs \[D, P\] task adapters"):
        next(iterate_split(result.lm, split, result.global_adapter, row_gradients=True))


def test_an_empty_split_is_a_clear_error_not_nan_rows(result):
    frame = pd.DataFrame({"task": ["a"] * 6 + ["b"] * 6, "text": ["to be or not to be"] * 12})
    corpus = build_corpus(frame, char_tokenizer(), max_length=32, test_size=0.0, seed=0)
    assert len(corpus.split("test")) == 0
    empty = corpus.split("test")
    message = r"The 'test' split has no documents \(the corpus was built with test_size=0"
    with pytest.raises(ValueError, match=message):
        per_task_nll(result.lm, None, empty, num_tasks=2)
    result = tiny_result(tasks=("a", "b"))
    result.corpus = corpus
    with pytest.raises(ValueError, match=message):
        result.evaluate("test")
    with pytest.raises(ValueError, match=message):
        result.evaluate("test", max_docs_per_task=2)
