"""Tests of bora_pyro.data.readers: files and tables into columns, and the errors for bad files."""

import json

import datasets
import pandas as pd
import pytest

from bora_pyro.data import build_corpus, check_data_file
from bora_pyro.data.readers import read_table, task_labels
from tests.data.helpers import assert_corpora_equal

NEEDED = {"task_column": "task", "text_column": "text"}


def test_all_input_forms_give_the_same_corpus(frame, tokenizer, tmp_path):
    reference = build_corpus(frame, tokenizer)
    frame.to_json(tmp_path / "docs.jsonl", orient="records", lines=True)
    frame.to_json(tmp_path / "docs.json", orient="records")
    frame.to_json(tmp_path / "columns.json", orient="columns")
    frame.to_json(tmp_path / "lines.json", orient="records", lines=True)
    frame.to_csv(tmp_path / "docs.csv", index=False)
    frame.to_parquet(tmp_path / "docs.parquet", index=False)
    (tmp_path / "lists.json").write_text(json.dumps(frame.to_dict(orient="list")))
    inputs = [
        datasets.Dataset.from_pandas(frame, preserve_index=False),
        str(tmp_path / "docs.jsonl"),
        tmp_path / "docs.json",
        tmp_path / "lines.json",
        tmp_path / "lists.json",
        tmp_path / "docs.csv",
        tmp_path / "docs.parquet",
    ]
    for data in inputs:
        assert_corpora_equal(build_corpus(data, tokenizer), reference)
    assert build_corpus(reference, tokenizer) is reference
    with pytest.raises(ValueError, match=r"columns\.json' holds a JSON dict; expected a list"):
        build_corpus(tmp_path / "columns.json", tokenizer)


def test_bad_data_types(tokenizer):
    with pytest.raises(
        TypeError, match=r"data must be a datasets.Dataset, a pandas.DataFrame.*got list"
    ):
        build_corpus([{"task": "a", "text": "b"}], tokenizer)
    with pytest.raises(TypeError, match=r"DatasetDict.*data\['train'\]"):
        build_corpus(
            datasets.DatasetDict({"train": datasets.Dataset.from_dict({"task": ["a"]})}), tokenizer
        )


def test_data_paths_are_checked_before_anything_is_read(tokenizer, tmp_path):
    for name in ("missing.csv", "missing.txt", "missing"):
        with pytest.raises(FileNotFoundError, match=rf"data file '.*{name}' does not exist"):
            build_corpus(tmp_path / name, tokenizer)
    (tmp_path / "docs.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"suffix '.txt'; supported file types"):
        build_corpus(tmp_path / "docs.txt", tokenizer)
    (tmp_path / "folder.jsonl").mkdir()
    with pytest.raises(ValueError, match=r"folder.jsonl' is a directory"):
        check_data_file(tmp_path / "folder.jsonl")
    (tmp_path / "ok.CSV").write_text("task,text\na,b\n")
    assert check_data_file(str(tmp_path / "ok.CSV")) == tmp_path / "ok.CSV"


def test_malformed_jsonl_names_the_file_and_the_line(tokenizer, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"task": "a", "text": "one"}\n\n{"task": "a", "text": "two"\n')
    with pytest.raises(
        ValueError, match=r"data file '.*docs\.jsonl', line 3: not valid JSON \(Expecting ',' "
    ) as info:
        build_corpus(path, tokenizer)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    path.write_text('{"task": "a", "text": "one"}\n["a", "two"]\n')
    with pytest.raises(ValueError, match=r"docs\.jsonl', line 2: holds a JSON list, not an object"):
        build_corpus(path, tokenizer)
    path.write_bytes(b'{"task": "a", "text": "\xff"}\n')
    with pytest.raises(ValueError, match=r"docs\.jsonl' is not UTF-8 text"):
        build_corpus(path, tokenizer)
    (tmp_path / "docs.json").write_text('[{"task": "a",\n "text": }]')
    with pytest.raises(ValueError, match=r"docs\.json', line 2: not valid JSON"):
        build_corpus(tmp_path / "docs.json", tokenizer)


@pytest.mark.parametrize(
    "name, content",
    [
        ("empty.jsonl", ""),
        ("blank.jsonl", "\n  \n"),
        ("empty.json", "[]"),
        ("empty.csv", ""),
        ("header.csv", "task,text\n"),
    ],
)
def test_a_file_without_records_says_so(tokenizer, tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=rf"data file '.*{name}' has no records"):
        build_corpus(tmp_path / name, tokenizer)


def test_bad_csv_and_parquet_name_the_file(tokenizer, tmp_path):
    (tmp_path / "docs.csv").write_text('task,text\na,"one\nb,two,three\n')
    with pytest.raises(ValueError, match=r"data file '.*docs\.csv' is not valid CSV"):
        build_corpus(tmp_path / "docs.csv", tokenizer)
    (tmp_path / "docs.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"data file '.*docs\.parquet' could not be read as Parquet"):
        build_corpus(tmp_path / "docs.parquet", tokenizer)


def test_jsonl_keeps_types_and_missing_keys(tmp_path):
    path = tmp_path / "docs.jsonl"
    records = [{"task": 1, "text": "a"}, {"task": "1", "text": "b"}, {"task": 2, "extra": True}]
    path.write_text("\n".join(json.dumps(r) for r in records))
    table = read_table(path)
    assert table.columns == ("task", "text", "extra") and table.num_rows == 3
    columns = table.require(NEEDED)
    assert columns == {"task_column": [1, "1", 2], "text_column": ["a", "b", None]}
    with pytest.raises(ValueError, match=r"labels 1 \(int, row 0\) and '1' \(str, row 1\)"):
        task_labels(columns["task_column"], "task")
    with pytest.raises(ValueError, match=r"column 'body' \(text_column\) not found in data file"):
        table.require({"text_column": "body"})


def test_csv_fields_are_text_as_written(tmp_path):
    path = tmp_path / "docs.csv"
    path.write_text("task,text\n01,NA\n1,\n")
    assert read_table(path).require(NEEDED) == {
        "task_column": ["01", "1"], "text_column": ["NA", ""]
    }


def test_a_dataframe_without_rows_is_an_error():
    with pytest.raises(ValueError, match=r"data has no rows \(columns \['task', 'text'\]\)"):
        read_table(pd.DataFrame({"task": [], "text": []}))
