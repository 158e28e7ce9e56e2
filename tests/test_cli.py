"""The `bora` command line: options generated from the config classes, errors at the door."""

import dataclasses
import json
import re
import subprocess
import sys

import pytest

import bora_pyro
from bora_pyro import cli_args
from bora_pyro.cli import DEMO, build_parser, main
from bora_pyro.config import BoraConfig, DataConfig, TrainConfig
from bora_pyro.sweep import load_sweep
from bora_pyro.testing import char_tokenizer, synthetic_corpus_frame, tiny_causal_lm

CONFIGS = (DataConfig, BoraConfig, TrainConfig)


@pytest.fixture
def local_model(tmp_path):
    folder = tmp_path / "tiny-llama"
    tiny_causal_lm("llama").save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.jsonl"
    synthetic_corpus_frame((10, 14)).to_json(path, orient="records", lines=True)
    return path


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a command gets as far as loading a model or fitting."""
    import bora_pyro.models.base

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded (or a fit started) before the arguments were checked")

    monkeypatch.setattr(bora_pyro.models.base, "load_base_model", boom)
    for name in ("fit_map", "fit_svi", "load_result"):
        monkeypatch.setattr(bora_pyro, name, boom)


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def _option_help(text: str, classes, skip=()) -> dict[str, str]:
    """The help of each generated option, in field order: the text from one option to the next."""
    options = [(f, cli_args.option_name(f)) for cls in classes for f in dataclasses.fields(cls)
               if f.init and cli_args.option_name(f) and f.name not in skip]
    body = text[text.index("settings (DataConfig):"):]
    starts = [re.search(rf" {re.escape(name)}[ ,]", body).start() for _, name in options]
    assert starts == sorted(starts), "options are listed in the order of the config fields"
    return {f.name: body[a:b] for (f, _), a, b in zip(options, starts, starts[1:] + [len(body)])}


def test_fit_help_lists_every_config_field_with_its_default(capsys):
    chunks = _option_help(_help(["fit", "--help"], capsys), CONFIGS)
    for cls in CONFIGS:
        for f in dataclasses.fields(cls):
            if not f.init or cli_args.option_name(f) is None:
                assert f.name not in chunks
                continue
            chunk = chunks[f.name]
            assert " ".join(f.metadata["help"].split("(default")[0].split()) in chunk, f.name
            own_note = "(default" in f.metadata["help"]
            expected = "(default" if own_note else f"(default: {cli_args.show_default(f.default)})"
            assert expected in chunk, (f.name, chunk)
    assert "--progress, --no-progress" in chunks["progress"]


def test_demo_help_shows_the_demos_own_defaults(capsys):
    columns = ("task_column", "text_column", "prompt_column", "completion_column", "messages_column", "tasks")
    text = _help(["demo", "--help"], capsys)
    assert not any(f" --{name.replace('_', '-')} " in text for name in columns)  # Shakespeare's are fixed
    chunks = _option_help(text, CONFIGS, skip=columns)
    assert "(default: 90)" in chunks["max_steps"] and "(default: from --epochs)" not in chunks["max_steps"]
    assert "(default: q_proj v_proj)" in chunks["target_modules"]
    assert f"(default: {DEMO['max_eval_docs_per_task']})" in chunks["max_eval_docs_per_task"]
    assert "(default: 8)" in chunks["rank"]


def test_only_the_options_given_are_passed_on(monkeypatch, data_file, capsys):
    calls = []

    class Fitted:
        def __str__(self):
            return "fitted"

    def fake(name):
        def fit(data, **kwargs):
            calls.append((name, data, kwargs))
            return Fitted()
        return fit

    monkeypatch.setattr(bora_pyro, "fit_map", fake("map"))
    monkeypatch.setattr(bora_pyro, "fit_svi", fake("svi"))
    code = main(["fit", str(data_file), "--rank", "4", "--targets", "q_proj", "v_proj", "--no-progress",
                 "--patience", "none", "--tau-prior", "2", "0.5", "--tau", "inf", "--test-size", "0",
                 "--steps", "3"])
    assert code == 0
    assert calls == [("map", str(data_file), {
        "rank": 4, "target_modules": ["q_proj", "v_proj"], "progress": False, "patience": None,
        "tau_prior": [2.0, 0.5], "tau": float("inf"), "test_size": 0.0, "max_steps": 3})]

    # SVI after MAP: --model goes to both, the training settings to both, checkpoints to SVI only
    calls.clear()
    checkpoints = data_file.parent / "ckpt"
    code = main(["fit", str(data_file), "--method", "svi", "--model", str(data_file.parent), "--rank", "2",
                 "--steps", "3", "--num-particles", "2", "--checkpoint-dir", str(checkpoints), "--test-size", "0"])
    assert code == 0
    (_, _, map_kwargs), (_, svi_data, svi_kwargs) = calls
    assert map_kwargs == {"model": str(data_file.parent), "rank": 2, "max_steps": 3, "test_size": 0.0}
    assert svi_data is None and isinstance(svi_kwargs.pop("init"), Fitted)
    assert svi_kwargs == {"model": str(data_file.parent), "max_steps": 3, "num_particles": 2,
                          "checkpoint_dir": str(checkpoints)}


def test_unknown_options_and_bad_values_are_refused_by_the_parser(data_file, capsys):
    for argv, message in ((["fit", str(data_file), "--rnak", "4"], "unrecognized arguments: --rnak"),
                          (["fit", str(data_file), "--tau", "lots"], "tau='lots' is not understood"),
                          (["fit", str(data_file), "--patience", "many"], "expected an integer or 'none'"),
                          (["fit", str(data_file), "--lr-schedule", "cosin"], "invalid choice: 'cosin'")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["fit", "missing.jsonl"], "bora fit: error: data file 'missing.jsonl': not found."),
    (["fit", "{data}", "--batch-size", "0"], "bora fit: error: batch_size must be a positive integer, got batch_size=0."),
    (["fit", "{data}", "--model", "./no-such-model"], "bora fit: error: --model './no-such-model': no such file or folder"),
    (["fit", "{data}", "--resume", "{tmp}/nothing"], "bora fit: error: --resume '{tmp}/nothing': not found."),
    (["fit", "{data}", "--num-particles", "2"], "bora fit: error: --num-particles is a setting of the other method"),
    (["report", "{tmp}/no-run"], "bora report: error: RUN_DIR '{tmp}/no-run': not found."),
    (["report", "{tmp}", "--baseline", "tau=0={tmp}/gone"], "bora report: error: --baseline tau=0= '{tmp}/gone': not found."),
    (["generate", "{data}", "--task", "a", "--prompt", "b"], "bora generate: error: RUN_DIR '{data}': a file, not a folder."),
    (["sweep", "--out", "{tmp}/s", "--data", "{tmp}/none.csv"], "bora sweep: error: --data file '{tmp}/none.csv': not found."),
    (["sweep", "--out", "{tmp}/s", "--taus", "1", "1"], "bora sweep: error: taus=[1.0, 1.0] must be a non-empty list without repeats."),
    (["demo", "--eval-docs", "0"], "bora demo: error: --eval-docs must be a positive integer or None"),
    # the user's folders are theirs: a result is never written over the data or into the cwd
    (["fit", "{data}", "--out", "{tmp}"], "bora fit: error: '{tmp}' contains '{data}', an input of this run"),
    (["fit", "{data}", "--out", "."], "bora fit: error: '.' is the working directory"),
    (["sweep", "--out", "{tmp}", "--data", "{data}", "--taus", "0"], "bora sweep: error: '{tmp}' contains '{data}'"),
])
def test_errors_at_the_door_are_one_line_with_exit_code_2_and_load_no_model(
        argv, message, no_model, data_file, tmp_path, capsys):
    fill = {"data": str(data_file), "tmp": str(tmp_path)}
    argv = [a.format(**fill) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message.format(**fill)), err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_debug_shows_the_traceback(monkeypatch, no_model):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        main(["fit", "missing.jsonl", "--debug"])
    monkeypatch.setenv("BORA_PYRO_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        main(["fit", "missing.jsonl"])


def test_a_field_of_a_type_the_generator_does_not_know_is_an_error():
    @dataclasses.dataclass
    class Odd:
        weights: dict[str, int] = dataclasses.field(default_factory=dict, metadata={"help": "per task"})

    with pytest.raises(TypeError, match="'weights'"):
        cli_args.add_options(build_parser(), Odd)


def test_importing_the_package_and_the_cli_loads_no_heavy_library():
    code = ("import sys, bora_pyro, bora_pyro.cli; bora_pyro.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'pyro', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert bora_pyro.fit_map is bora_pyro.inference.fit_map
    assert set(bora_pyro.__all__) <= set(dir(bora_pyro))
    with pytest.raises(AttributeError, match="no attribute 'fit_mapp'"):
        bora_pyro.fit_mapp  # noqa: B018


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


def test_sweep_on_own_data_writes_the_tables_and_continues(tmp_path, local_model, capsys):
    data = tmp_path / "data.jsonl"
    synthetic_corpus_frame((10, 14, 20)).to_json(data, orient="records", lines=True)
    args = ["sweep", "--data", str(data), "--model", str(local_model), "--device", "cpu", "--out",
            str(tmp_path / "sweep"), "--taus", "0", "1e3", "inf", "--steps", "2", "--eval-docs", "none"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| 0 (independent)" in printed and "| inf (pooled)" in printed and "best tau on validation" in printed
    per_task = (tmp_path / "sweep" / "per_task.md").read_text()
    assert all(f"task{i}" in per_task for i in range(3))
    assert main(args) == 0  # a finished sweep is read back, not refitted
    assert "done before" in capsys.readouterr().out
    assert main(args + ["--rank", "3"]) == 2  # other settings in the same folder
    assert "other settings" in capsys.readouterr().err


def test_a_sweep_of_the_learned_tau_alone_ends_with_its_tables(tmp_path, local_model, capsys):
    """`--taus learn` has no fixed tau to call best: it used to fit, then fail (exit 2) before the
    figures and summary.md. It now writes them and says there is no best fixed tau."""
    data = tmp_path / "data.jsonl"
    synthetic_corpus_frame((10, 14, 20)).to_json(data, orient="records", lines=True)
    out = tmp_path / "sweep"
    args = ["sweep", "--data", str(data), "--model", str(local_model), "--device", "cpu", "--out", str(out),
            "--taus", "learn", "--steps", "2", "--eval-docs", "none"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| learn " in printed and "best on validation" not in printed
    assert "no fixed tau in --taus" in printed
    summary = (out / "summary.md").read_text()
    assert "No fixed tau was fitted" in summary and "- learned tau (A=" in summary
    assert (out / "figures" / "distance_vs_size.png").stat().st_size > 0
    assert not (out / "figures" / "precision_vs_perplexity.png").exists()
    sweep = load_sweep(out)
    assert sweep.fixed == [] and sweep.fitted == ["learn"]
    with pytest.raises(ValueError, match=r"no fixed-tau fit to choose from \(fitted: \['learn'\]\); add fixed"):
        sweep.best()


@pytest.mark.default_model
def test_demo_runs_on_the_default_model_and_data(capsys):
    characters = ["HAMLET (Hamlet)", "OSRIC (Hamlet)", "BIANCA (Othello)"]
    code = main(["demo", "--steps", "2", "--characters", *characters, "--eval-docs", "2",
                 "--val-docs", "1", "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    for name in characters + ["overall", "base ppl", "BoRA ppl", "learned tau"]:
        assert name in printed
