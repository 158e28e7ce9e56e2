"""Tests of bora_pyro.data.corpus: task names, tokens and labels, state, and bad options."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from bora_pyro.data import IGNORE_INDEX, RESERVED_TASK_NAMES, TaskCorpus, build_corpus
from tests.data.helpers import (
    BOS,
    EOS,
    PAD,
    all_batches,
    assert_corpora_equal,
    decode,
    make_tokenizer,
)


# ---------------------------------------------------------------------------------------------
# task names
# ---------------------------------------------------------------------------------------------


def test_task_order_and_names(frame, tokenizer):
    corpus = build_corpus(frame, tokenizer)
    assert corpus.tasks == ["alpha", "beta", "gamma"]
    assert corpus.num_tasks == 3
    chosen = build_corpus(frame, tokenizer, tasks=["gamma", "alpha"])
    assert chosen.tasks == ["gamma", "alpha"]
    assert chosen.task_index("alpha") == 1
    assert sum(len(s) for s in chosen.splits.values()) == (frame.task != "beta").sum()
    numeric = frame.assign(task=frame.task.map({"alpha": 10, "beta": 2, "gamma": 3}))
    assert build_corpus(numeric, tokenizer).tasks == ["10", "2", "3"]


def test_documents_grouped_by_task_in_row_order(frame, tokenizer):
    corpus = build_corpus(frame, tokenizer)
    for split in corpus.splits.values():
        ids = split.task_ids.numpy()
        assert np.all(np.diff(ids) >= 0)
        for task in range(corpus.num_tasks):
            assert np.all(np.diff(split.source_index[ids == task]) > 0)


# ---------------------------------------------------------------------------------------------
# tokens and labels
# ---------------------------------------------------------------------------------------------


def test_text_mode_tokens_and_labels(frame, tokenizer):
    corpus = build_corpus(frame, tokenizer, max_length=1000)
    split = corpus.train
    batch = split.batch(np.arange(len(split)))
    assert batch.input_ids.dtype == torch.long and batch.labels.dtype == torch.long
    for row in range(len(batch)):
        text = frame["text"].iloc[split.source_index[row]]
        n = len(text) + 1
        assert batch.input_ids[row, 0] == BOS
        assert decode(tokenizer, batch.input_ids[row, 1:n]) == text
        assert (
            batch.attention_mask[row, :n].eq(1).all() and batch.attention_mask[row, n:].eq(0).all()
        )
        assert batch.input_ids[row, n:].eq(PAD).all()
        assert batch.labels[row, 0] == IGNORE_INDEX
        assert torch.equal(batch.labels[row, 1:n], batch.input_ids[row, 1:n])
        assert batch.labels[row, n:].eq(IGNORE_INDEX).all()
    lengths = frame["text"].str.len()
    for task in range(corpus.num_tasks):
        rows = split.source_index[split.task_ids.numpy() == task]
        assert split.tokens_per_task[task] == lengths.iloc[rows].sum()
        assert split.docs_per_task[task] == len(rows)
    assert batch.num_scored_tokens == split.num_tokens
    assert corpus.summary()["train_tokens"].tolist() == split.tokens_per_task.tolist()


def test_prompt_completion_mode_scores_only_the_completion(tokenizer):
    data = pd.DataFrame(
        {
            "who": ["a", "a", "b", "b", "a", "b"],
            "question": ["Q1? ", "", "Q333? ", "Q4? ", "Q5? ", "Q6? "],
            "answer": ["yes", "no!", "maybe", "ok", "fine", "well"],
            "text": ["ignored"] * 6,
        }
    )
    corpus = build_corpus(
        data,
        tokenizer,
        task_column="who",
        prompt_column="question",
        completion_column="answer",
        test_size=0.0,
        validation_size=0.0,
    )
    split = corpus.train
    batch = split.batch(np.arange(len(split)))
    for row in range(len(batch)):
        prompt, answer = data.iloc[split.source_index[row]][["question", "answer"]]
        start = 1 + len(prompt)
        n = start + len(answer)
        assert decode(tokenizer, batch.input_ids[row, 1:n]) == prompt + answer
        assert split.label_start(row) == start
        assert batch.labels[row, :start].eq(IGNORE_INDEX).all()
        assert decode(tokenizer, batch.labels[row, start:n]) == answer
        assert batch.labels[row, n:].eq(IGNORE_INDEX).all()
    assert split.num_tokens == data["answer"].str.len().sum()


def test_truncation_counts_the_start_token(frame, tokenizer):
    corpus = build_corpus(frame, tokenizer, max_length=6)
    for split in corpus.splits.values():
        batch = split.batch(np.arange(len(split)))
        assert batch.input_ids.shape[1] == 6
        for row in range(len(batch)):
            text = frame["text"].iloc[split.source_index[row]]
            assert decode(tokenizer, batch.input_ids[row, 1:]) == text[:5]
            assert (batch.labels[row] != IGNORE_INDEX).sum() == 5


def test_prompt_longer_than_max_length_is_an_error(tokenizer):
    data = pd.DataFrame({"task": ["a"] * 3, "p": ["a long prompt", "p", "q"], "c": ["x", "y", "z"]})
    with pytest.raises(
        ValueError, match=r"no completion token left within max_length=8 .*row 0, task 'a'"
    ):
        build_corpus(
            data,
            tokenizer,
            prompt_column="p",
            completion_column="c",
            max_length=8,
            test_size=0,
            validation_size=0,
        )


def test_tokenizer_without_pad_or_bos_is_not_modified(frame):
    no_pad = make_tokenizer(pad=False)
    corpus = build_corpus(frame, no_pad)
    assert no_pad.pad_token is None and no_pad.pad_token_id is None
    assert corpus.pad_token_id == EOS and corpus.start_token_id == BOS
    batch = corpus.train.batch(np.arange(len(corpus.train)))
    assert batch.input_ids[batch.attention_mask == 0].eq(EOS).all()

    no_bos = make_tokenizer(pad=False, bos=False)
    corpus = build_corpus(frame, no_bos)
    assert corpus.start_token_id == EOS
    assert corpus.train.batch([0]).input_ids[0, 0] == EOS


# ---------------------------------------------------------------------------------------------
# state and lookups
# ---------------------------------------------------------------------------------------------


def test_state_dict_round_trip_through_safetensors_and_json(frame, tokenizer, tmp_path):
    corpus = build_corpus(frame, tokenizer)
    tensors, meta = corpus.state_dict()
    save_file(tensors, tmp_path / "corpus.safetensors")
    (tmp_path / "corpus.json").write_text(json.dumps(meta, sort_keys=True))
    restored = TaskCorpus.from_state_dict(
        load_file(tmp_path / "corpus.safetensors"),
        json.loads((tmp_path / "corpus.json").read_text()),
    )
    assert restored.tasks == corpus.tasks
    assert restored.pad_token_id == corpus.pad_token_id
    assert restored.options == corpus.options
    pd.testing.assert_frame_equal(restored.summary(), corpus.summary())
    for name in ("train", "validation", "test"):
        for a, b in zip(
            all_batches(corpus.split(name), 3), all_batches(restored.split(name), 3), strict=True
        ):
            for field in ("input_ids", "attention_mask", "labels", "task_ids", "doc_index"):
                assert torch.equal(getattr(a, field), getattr(b, field))
    with pytest.raises(ValueError, match="not the state of a TaskCorpus"):
        TaskCorpus.from_state_dict(tensors, {**meta, "format": "other"})
    with pytest.raises(ValueError, match=r"tensors lack \['train.tokens'\]"):
        TaskCorpus.from_state_dict({k: v for k, v in tensors.items() if k != "train.tokens"}, meta)


def test_corpus_lookups(frame, tokenizer):
    corpus = build_corpus(frame, tokenizer)
    assert corpus.split("test") is corpus.test
    assert list(corpus.summary().columns) == [
        "task",
        "n_train",
        "n_validation",
        "n_test",
        "train_tokens",
    ]
    with pytest.raises(ValueError, match=r"unknown task 'alpah'; did you mean 'alpha'\?.*'beta'"):
        corpus.task_index("alpah")
    with pytest.raises(
        ValueError,
        match=r"unknown split 'dev'; valid split names are \['train', 'validation', 'test'\]",
    ):
        corpus.split("dev")
    assert "3 tasks" in repr(corpus)


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------


def _with(frame, row, column, value):
    out = frame.copy()
    out[column] = out[column].astype(object)
    out.at[row, column] = value
    return out


BAD_DATA = {
    "missing task column": (
        lambda f: f.rename(columns={"task": "speaker"}),
        {},
        r"column 'task' \(task_column\) not found.*available columns: \['speaker', 'text'\]",
    ),
    "missing text column": (
        lambda f: f,
        {"text_column": "body"},
        r"column 'body' \(text_column\) not found.*\['task', 'text'\]",
    ),
    "missing prompt column": (
        lambda f: f,
        {"prompt_column": "q", "completion_column": "text"},
        r"column 'q' \(prompt_column\) not found",
    ),
    "empty data": (lambda f: f.iloc[:0], {}, r"data has no rows"),
    "empty text": (
        lambda f: _with(f, 3, "text", ""),
        {},
        r"column 'text' is empty or whitespace-only at row 3 \(task '\w+', value ''\)",
    ),
    "blank text": (
        lambda f: _with(f, 4, "text", " \n\t"),
        {},
        r"column 'text' is empty or whitespace-only at row 4",
    ),
    "integer text": (
        lambda f: _with(f, 2, "text", 17),
        {},
        r"column 'text' must hold strings, but row 2 \(task '\w+'\) holds a value of type int: 17",
    ),
    "missing text": (lambda f: _with(f, 5, "text", None), {}, r"column 'text' is missing at row 5"),
    "missing task": (
        lambda f: _with(f, 1, "task", None),
        {},
        r"column 'task' \(task_column\) has 1 missing or empty task value\(s\), first at row 1",
    ),
    "nan task": (
        lambda f: _with(f, 0, "task", float("nan")),
        {},
        r"column 'task' .* first at row 0",
    ),
    "unknown task": (
        lambda f: f,
        {"tasks": ["alpha", "zeta"]},
        r"unknown task 'zeta'.* Valid tasks: 'alpha', 'beta', 'gamma'",
    ),
    "tasks as a string": (
        lambda f: f,
        {"tasks": "alpha"},
        r"tasks must be a list of task names, got the string 'alpha'",
    ),
    "repeated tasks": (lambda f: f, {"tasks": ["alpha", "alpha"]}, r"more than once: \['alpha'\]"),
    "too few documents": (
        lambda f: f[~((f.task == "gamma") & (f.index > f[f.task == "gamma"].index[1]))],
        {},
        r"task 'gamma' has 2 document\(s\), too few .* at least 3 documents.*tasks=\[...\]",
    ),
    "reserved name <global>": (
        lambda f: f.assign(task=f.task.replace({"gamma": "<global>"})),
        {},
        r"task '<global>' has a reserved name \(the name of the global adapter in generation and "
        r"export\); rename that task, e\.g\. df\['task'\] = df\['task'\]\.replace\("
        r"\{'<global>': 'global'\}\)",
    ),
    "reserved name overall": (
        lambda f: f.assign(task=f.task.replace({"beta": "overall"})),
        {},
        r"task 'overall' has a reserved name \(the name of the summary row of evaluation "
        r"tables\); rename .*\{'overall': 'overall_task'\}",
    ),
    "max_length": (
        lambda f: f, {"max_length": 1}, r"max_length=1 leaves no token to predict; use at least 2"
    ),
    "test_size": (
        lambda f: f,
        {"test_size": 1.0},
        r"test_size must be a fraction with 0 <= test_size < 1, got test_size=1.0",
    ),
    "negative validation_size": (
        lambda f: f,
        {"validation_size": -0.1},
        r"validation_size must be .* got validation_size=-0.1",
    ),
    "sizes sum to 1": (
        lambda f: f,
        {"test_size": 0.6, "validation_size": 0.4},
        r"test_size \+ validation_size = 1 leaves no training documents",
    ),
    "prompt without completion": (
        lambda f: f,
        {"prompt_column": "text"},
        r"prompt_column and completion_column go together",
    ),
    "seed": (lambda f: f, {"seed": -1}, r"seed must be an integer >= 0, got seed=-1"),
}


@pytest.mark.parametrize("case", list(BAD_DATA), ids=list(BAD_DATA))
def test_bad_inputs_raise_value_errors_that_name_the_problem(frame, tokenizer, case):
    change, kwargs, message = BAD_DATA[case]
    with pytest.raises(ValueError, match=message):
        build_corpus(change(frame.reset_index(drop=True)), tokenizer, **kwargs)




def test_labels_that_read_the_same_are_an_error_naming_both(tokenizer):
    data = pd.DataFrame(
        {"task": ["1", "a", 1, "a", "1", 1], "text": ["one", "two", "three", "four", "five", "six"]}
    )
    with pytest.raises(
        ValueError,
        match=r"column 'task' \(task_column\) holds the labels '1' \(str, row 0\) and 1 \(int, "
        r"row 2\), which both read as task '1'.*astype\(str\)",
    ):
        build_corpus(data, tokenizer, test_size=0, validation_size=0)
    # converted by the user: one task; equal numbers of different types: one task
    merged = build_corpus(data.astype({"task": str}), tokenizer, test_size=0, validation_size=0)
    assert merged.tasks == ["1", "a"] and merged.train.docs_per_task.tolist() == [4, 2]
    numbers = data.assign(task=pd.Series([np.int64(1), 2, 1, 2, 1, 2.5], dtype=object))
    assert build_corpus(numbers, tokenizer, test_size=0, validation_size=0).tasks == ["1", "2", "2.5"]


def test_reserved_task_names_are_refused_everywhere_but_can_be_left_out(frame, tokenizer):
    from bora_pyro.generation import GLOBAL_TASK

    assert GLOBAL_TASK in RESERVED_TASK_NAMES and "overall" in RESERVED_TASK_NAMES
    renamed = frame.assign(task=frame.task.replace({"gamma": "overall"}))
    corpus = build_corpus(renamed, tokenizer, tasks=["alpha", "beta"])
    assert corpus.tasks == ["alpha", "beta"]
    tensors, meta = corpus.state_dict()
    with pytest.raises(ValueError, match=r"task '<global>' has a reserved name.*rename that task"):
        TaskCorpus.from_state_dict(tensors, {**meta, "tasks": ["alpha", "<global>"]})


def test_settings_come_from_a_data_config_or_keywords(frame, tokenizer):
    from bora_pyro.config import DataConfig

    config = DataConfig(max_length=6, test_size=0.2, validation_size=0.0)
    by_config = build_corpus(frame, tokenizer, config, seed=2)
    by_keywords = build_corpus(
        frame, tokenizer, max_length=6, test_size=0.2, validation_size=0.0, seed=2
    )
    assert_corpora_equal(by_config, by_keywords)
    assert by_config.options["max_length"] == 6 and by_config.options["seed"] == 2
    # keywords override the config's fields
    assert build_corpus(frame, tokenizer, config, max_length=8).options["max_length"] == 8
    with pytest.raises(
        TypeError, match=r"unknown data setting 'max_lenght'; did you mean 'max_length'\?"
    ):
        build_corpus(frame, tokenizer, max_lenght=8)
    with pytest.raises(TypeError, match="config must be a bora_pyro.config.DataConfig, got dict"):
        build_corpus(frame, tokenizer, {"max_length": 8})
