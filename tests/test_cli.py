"""The `bora` command line."""

import json

import pytest

from bora_pyro.cli import main
from bora_pyro.testing import char_tokenizer, synthetic_corpus_frame, tiny_causal_lm


@pytest.fixture
def local_model(tmp_path):
    folder = tmp_path / "tiny-llama"
    tiny_causal_lm("llama").save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def test_fit_from_a_jsonl_file_and_a_local_model_folder(tmp_path, local_model, capsys):
    data = tmp_path / "data.jsonl"
    frame = synthetic_corpus_frame((10, 14)).rename(columns={"task": "speaker", "text": "words"})
    frame.to_json(data, orient="records", lines=True)
    out = tmp_path / "run"
    code = main(["fit", str(data), "--task-column", "speaker", "--text-column", "words",
                 "--model", str(local_model), "--steps", "3", "--batch-size", "4", "--rank", "2",
                 "--tau", "100", "--device", "cpu", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "overall" in printed and "task0" in printed and "task1" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == str(local_model) and config["config"]["tau"] == 100.0


def test_bad_input_is_an_error_message_not_a_traceback(tmp_path, local_model, capsys):
    data = tmp_path / "data.csv"
    synthetic_corpus_frame((10, 14)).to_csv(data, index=False)
    code = main(["fit", str(data), "--text-column", "body", "--model", str(local_model), "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert "body" in err and "bora fit: error" in err
    with pytest.raises(SystemExit):
        main(["fit", str(data), "--tau", "lots"])


def test_sweep_on_own_data_writes_the_tables_and_continues(tmp_path, local_model, capsys):
    data = tmp_path / "data.jsonl"
    synthetic_corpus_frame((10, 14, 20)).to_json(data, orient="records", lines=True)
    args = ["sweep", "--data", str(data), "--model", str(local_model), "--device", "cpu", "--out",
            str(tmp_path / "sweep"), "--taus", "0", "1e3", "inf", "--steps", "2", "--eval-docs", "0"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| 0 (independent)" in printed and "| inf (pooled)" in printed and "best tau on validation" in printed
    per_task = (tmp_path / "sweep" / "per_task.md").read_text()
    assert all(f"task{i}" in per_task for i in range(3))
    assert main(args) == 0  # a finished sweep is read back, not refitted
    assert "done before" in capsys.readouterr().out


@pytest.mark.default_model
def test_demo_runs_on_the_default_model_and_data(capsys):
    characters = ["HAMLET (Hamlet)", "OSRIC (Hamlet)", "BIANCA (Othello)"]
    code = main(["demo", "--steps", "2", "--characters", *characters, "--eval-docs", "2",
                 "--val-docs", "1", "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    for name in characters + ["overall", "base ppl", "BoRA ppl", "learned tau"]:
        assert name in printed
