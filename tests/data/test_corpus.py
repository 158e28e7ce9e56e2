"""Tests of bora_pyro.data.corpus: building, splitting, batching and saving task corpora."""

import json
import string

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from bora_pyro.data import IGNORE_INDEX, Batch, TaskCorpus, TaskSplit, build_corpus

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
PAD, BOS, EOS = 0, 1, 2


def make_tokenizer(*, pad=True, bos=True):
    """A character-level tokenizer: one id per printable character."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    kwargs = {"eos_token": "</s>", "unk_token": "<unk>"}
    if bos:
        kwargs["bos_token"] = "<s>"
    if pad:
        kwargs["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def make_frame(sizes=None, seed=0):
    """Documents of random words for tasks named by ``sizes`` (task -> document count)."""
    sizes = sizes or {"beta": 12, "alpha": 20, "gamma": 5}
    rng = np.random.default_rng(seed)
    rows = []
    for task, n in sizes.items():
        for i in range(n):
            words = [
                "".join(rng.choice(list("abcdefgh"), size=rng.integers(1, 6)))
                for _ in range(rng.integers(1, 8))
            ]
            rows.append({"task": task, "text": f"{task} {i}: " + " ".join(words)})
    order = rng.permutation(len(rows))
    return pd.DataFrame([rows[i] for i in order])


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def frame():
    return make_frame()


def decode(tokenizer, ids):
    return "".join(tokenizer.convert_ids_to_tokens([int(i) for i in ids]))


def expected_sizes(n, test_size, validation_size):
    n_test = max(1, round(test_size * n)) if test_size > 0 else 0
    n_val = max(1, round(validation_size * n)) if validation_size > 0 else 0
    return n - n_test - n_val, n_val, n_test


def all_batches(split, batch_size=4, **kwargs):
    return list(split.batches(batch_size, **kwargs))


def assert_corpora_equal(a, b):
    ta, ma = a.state_dict()
    tb, mb = b.state_dict()
    assert ma == mb
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


# ---------------------------------------------------------------------------------------------
# splits
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
# batches
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


def test_batch_to_and_len(frame, tokenizer):
    batch = build_corpus(frame, tokenizer).train.batch([2, 0, 2])
    assert len(batch) == 3
    assert batch.doc_index.tolist() == [2, 0, 2]
    moved = batch.to("cpu")
    assert isinstance(moved, Batch)
    assert all(torch.equal(getattr(moved, f), getattr(batch, f)) for f in ("input_ids", "labels"))


def test_batch_and_batches_reject_bad_arguments(frame, tokenizer):
    split = build_corpus(frame, tokenizer).train
    with pytest.raises(ValueError, match=r"document index 999 out of range for split 'train'"):
        split.batch([0, 999])
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
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
    with pytest.raises(ValueError, match="max_docs_per_task must be a positive int"):
        split.subset(0)


# ---------------------------------------------------------------------------------------------
# inputs and state
# ---------------------------------------------------------------------------------------------


def test_all_input_forms_give_the_same_corpus(frame, tokenizer, tmp_path):
    reference = build_corpus(frame, tokenizer)
    frame.to_json(tmp_path / "docs.jsonl", orient="records", lines=True)
    frame.to_json(tmp_path / "docs.json", orient="records")
    frame.to_csv(tmp_path / "docs.csv", index=False)
    frame.to_parquet(tmp_path / "docs.parquet", index=False)
    inputs = [
        datasets.Dataset.from_pandas(frame, preserve_index=False),
        str(tmp_path / "docs.jsonl"),
        tmp_path / "docs.json",
        tmp_path / "docs.csv",
        tmp_path / "docs.parquet",
    ]
    for data in inputs:
        assert_corpora_equal(build_corpus(data, tokenizer), reference)
    assert build_corpus(reference, tokenizer) is reference


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


def test_task_split_checks_its_arrays():
    with pytest.raises(ValueError, match=r"offsets must have num_docs \+ 1"):
        TaskSplit("train", [1, 5, 6], [0, 3], [1], [0, 0], num_tasks=1, pad_token_id=0)
    with pytest.raises(ValueError, match=r"label_starts must lie in 1 \.\. document length"):
        TaskSplit("train", [1, 5, 6], [0, 3], [0], [0], num_tasks=1, pad_token_id=0)
    with pytest.raises(ValueError, match=r"task ids must lie in 0 \.\. num_tasks - 1 = 0"):
        TaskSplit("train", [1, 5, 6], [0, 3], [1], [1], num_tasks=1, pad_token_id=0)


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
        r"tasks must be a list of task names.*tasks=\['alpha'\]",
    ),
    "repeated tasks": (lambda f: f, {"tasks": ["alpha", "alpha"]}, r"more than once: \['alpha'\]"),
    "too few documents": (
        lambda f: f[~((f.task == "gamma") & (f.index > f[f.task == "gamma"].index[1]))],
        {},
        r"task 'gamma' has 2 document\(s\), too few .* at least 3 documents.*tasks=\[...\]",
    ),
    "max_length": (lambda f: f, {"max_length": 1}, r"max_length must be >= 2 .* got 1"),
    "test_size": (
        lambda f: f,
        {"test_size": 1.0},
        r"test_size must be a fraction in \[0, 1\).* got 1.0",
    ),
    "negative validation_size": (
        lambda f: f,
        {"validation_size": -0.1},
        r"validation_size must be .* got -0.1",
    ),
    "sizes sum to 1": (
        lambda f: f,
        {"test_size": 0.6, "validation_size": 0.4},
        r"test_size \+ validation_size must be < 1",
    ),
    "prompt without completion": (
        lambda f: f,
        {"prompt_column": "text"},
        r"prompt_column is set but completion_column is not",
    ),
    "seed": (lambda f: f, {"seed": -1}, r"seed must be a non-negative int, got -1"),
}


@pytest.mark.parametrize("case", list(BAD_DATA), ids=list(BAD_DATA))
def test_bad_inputs_raise_value_errors_that_name_the_problem(frame, tokenizer, case):
    change, kwargs, message = BAD_DATA[case]
    with pytest.raises(ValueError, match=message):
        build_corpus(change(frame.reset_index(drop=True)), tokenizer, **kwargs)


def test_bad_data_types(tokenizer, tmp_path):
    with pytest.raises(
        TypeError, match=r"data must be a datasets.Dataset, a pandas.DataFrame.*got list"
    ):
        build_corpus([{"task": "a", "text": "b"}], tokenizer)
    with pytest.raises(TypeError, match=r"DatasetDict.*data\['train'\]"):
        build_corpus(
            datasets.DatasetDict({"train": datasets.Dataset.from_dict({"task": ["a"]})}), tokenizer
        )
    (tmp_path / "docs.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"suffix '.txt'; supported file types"):
        build_corpus(tmp_path / "docs.txt", tokenizer)
    with pytest.raises(FileNotFoundError):
        build_corpus(tmp_path / "missing.csv", tokenizer)
