"""Experiment tracking: what a tiny fit writes to TensorBoard and to an MLflow file store, read
back with their own readers; the settings, the CLI option and the error for a missing package."""

import math
import sys

import pandas as pd
import pytest

import bora_pyro
from bora_pyro.cli import build_parser
from bora_pyro.cli_args import given
from bora_pyro.config import TrainConfig
from bora_pyro.data import build_corpus
from bora_pyro.inference.loop import lr_factor
from bora_pyro.sweep import SweepConfig, run_sweep
from bora_pyro.testing import char_tokenizer, synthetic_corpus_frame, tiny_causal_lm
from bora_pyro.tracking import Tracker, Trackers, flatten_params, make_trackers, require_trackers

from tests.conftest import assert_close

FRAME = synthetic_corpus_frame((10, 14, 20))
TASKS = ["task0", "task1", "task2"]
#: 6 steps, validation after steps 2 and 5 (0-based).
QUICK = dict(tau="learn", rank=2, alpha=4.0, max_steps=6, batch_size=4, lr=1e-2, eval_every=3,
             patience=None, device="cpu", progress=False)
STEPS, EVAL_STEPS = list(range(6)), [2, 5]
#: A model path that does not exist: a test that passes with it never loaded a model.
NO_MODEL = "./no/such/model"


def _base():
    return tiny_causal_lm("llama", hidden_size=16, num_layers=1)


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(FRAME, char_tokenizer(), max_length=32, seed=0)


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    events.Reload()
    return events


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A clean environment: no tracking URI or experiment set by the user, and the file store
    not allowed beforehand (bora_pyro allows it for the store it chooses)."""
    pytest.importorskip("mlflow")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "runs"


# ----------------------------------------------------------------------------- TensorBoard


def test_a_fit_writes_tensorboard_events_for_every_step_and_validation(tmp_path, corpus):
    pytest.importorskip("tensorboard")
    result = bora_pyro.fit_map(corpus, model=_base(), tokenizer=char_tokenizer(), report_to="tensorboard",
                               report_dir=tmp_path, run_name="tiny", **QUICK)
    folder = tmp_path / "tensorboard" / "tiny"
    events = _events(folder)
    scalars = set(events.Tags()["scalars"])
    per_task = {f"val_perplexity_per_task/{t}" for t in TASKS}
    assert {"loss", "train_nll", "lr", "step_seconds", "tau/A", "tau/B", "val_nll", "val_perplexity"} | per_task <= scalars
    h = result.history
    for tag in ("loss", "train_nll", "lr", "step_seconds", "tau/A", "tau/B"):
        assert [e.step for e in events.Scalars(tag)] == STEPS, tag
    for tag in ("val_nll", "val_perplexity", *per_task):
        assert [e.step for e in events.Scalars(tag)] == EVAL_STEPS, tag
    # the values are the history's (stored as float32 by TensorBoard)
    assert_close([e.value for e in events.Scalars("loss")], h["loss"], rtol=1e-6)
    assert_close([e.value for e in events.Scalars("tau/B")], [t[1] for t in h["tau"]], rtol=1e-6)
    val = [v for v in h["val_nll"] if not math.isnan(v)]
    assert_close([e.value for e in events.Scalars("val_nll")], val, rtol=1e-6)
    assert_close([e.value for e in events.Scalars("val_perplexity")], [math.exp(v) for v in val], rtol=1e-6)
    lr = [1e-2 * lr_factor("cosine", s, 6, 0) for s in STEPS]
    assert_close([e.value for e in events.Scalars("lr")], lr, rtol=1e-6)
    # at the end: the kept (best) state's per-task table, the values validation logged at its step
    table = result.evaluate("validation", num_samples=0)
    final = table.set_index("task")["perplexity"]
    best = EVAL_STEPS.index(result.fit_args["best_step"])
    assert [e.step for e in events.Scalars("final/val_perplexity")] == [5]
    assert_close(events.Scalars("final/val_perplexity")[0].value, final["overall"], rtol=1e-5)
    for task in TASKS:
        assert_close(events.Scalars(f"val_perplexity_per_task/{task}")[best].value, final[task], rtol=1e-5)
    # settings as text, the per-task table as a file and as Markdown text
    assert {"settings/text_summary", "validation_per_task/text_summary"} <= set(events.Tags()["tensors"])
    saved = pd.read_csv(folder / "validation_per_task.csv")
    assert list(saved["task"]) == [*TASKS, "overall"]
    assert_close(saved["perplexity"].to_numpy(copy=True), table["perplexity"].to_numpy(copy=True), rtol=1e-9)
    assert len(pd.read_csv(folder / "history.csv")) == 6


def test_the_pooled_limit_logs_no_infinite_tau_and_a_fresh_run_gets_its_own_folder(tmp_path, corpus):
    pytest.importorskip("tensorboard")
    kwargs = dict(QUICK, tau=math.inf, max_steps=2, eval_every=2, report_to="tensorboard", report_dir=tmp_path,
                  run_name="pooled")
    for _ in range(2):
        bora_pyro.fit_map(corpus, model=_base(), tokenizer=char_tokenizer(), **kwargs)
    folders = sorted(p.name for p in (tmp_path / "tensorboard").iterdir())
    assert folders == ["pooled", "pooled-2"]
    scalars = set(_events(tmp_path / "tensorboard" / "pooled-2").Tags()["scalars"])
    assert "loss" in scalars and not any(t.startswith("tau/") for t in scalars)


def test_a_resumed_run_appends_to_its_tensorboard_folder(tmp_path):
    pytest.importorskip("tensorboard")
    for resume in (False, True):
        with make_trackers("tensorboard", report_dir=tmp_path, run_name="r", resume=resume) as trackers:
            trackers.log_metrics({"loss": 1.0}, 3 if resume else 0)
    assert [p.name for p in (tmp_path / "tensorboard").iterdir()] == ["r"]
    assert [e.step for e in _events(tmp_path / "tensorboard" / "r").Scalars("loss")] == [0, 3]


# ----------------------------------------------------------------------------- MLflow


def test_an_svi_fit_logs_to_an_mlflow_file_store(mlflow_store, corpus):
    import mlflow
    from mlflow import MlflowClient

    result = bora_pyro.fit_svi(corpus, model=_base(), tokenizer=char_tokenizer(), report_to="mlflow",
                               report_dir=mlflow_store, run_name="svi-tiny", **QUICK)
    uri = (mlflow_store / "mlruns").resolve().as_uri()
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("bora_pyro")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "svi-tiny" and run.info.status == "FINISHED"
    run_id = run.info.run_id
    for key in ("loss", "train_nll", "lr", "step_seconds", "tau/A", "tau/B"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == STEPS, key
    for key in ("val_nll", "val_perplexity", *(f"val_perplexity_per_task/{t}" for t in TASKS)):
        assert [m.step for m in client.get_metric_history(run_id, key)] == EVAL_STEPS, key
    losses = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)
    assert_close([m.value for m in losses], result.history["loss"], rtol=1e-12)
    params = run.data.params
    assert params["run.method"] == "svi" and params["train.max_steps"] == "6" and params["model.rank"] == "2"
    assert params["model.tau"] == "learn" and params["train.report_to"] == '["mlflow"]'
    assert params["run.tasks"] == "3" and params["data.max_length"] == "32"
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"history.csv", "validation_per_task.csv", "validation_per_task.md"} <= artifacts
    table = pd.read_csv(client.download_artifacts(run_id, "validation_per_task.csv", str(mlflow_store / "dl")))
    assert list(table["task"]) == [*TASKS, "overall"]
    # the same store through the fluent API, as a user would read it
    mlflow.set_tracking_uri(uri)
    try:
        frame = mlflow.search_runs(experiment_names=["bora_pyro"])
    finally:
        mlflow.set_tracking_uri(None)
    assert list(frame["tags.mlflow.runName"]) == ["svi-tiny"]
    assert_close(frame["metrics.val_nll"].iloc[0], [v for v in result.history["val_nll"] if not math.isnan(v)][-1],
                 rtol=1e-12)


def test_a_run_that_raises_is_marked_failed_and_names_are_made_valid(mlflow_store):
    from mlflow import MlflowClient

    with pytest.raises(RuntimeError, match="stop"):
        with make_trackers("mlflow", report_dir=mlflow_store, run_name="broken") as trackers:
            trackers.log_metrics({"val_perplexity_per_task/HAMLET (Hamlet)": 2.0}, 0)
            raise RuntimeError("stop")
    client = MlflowClient(tracking_uri=(mlflow_store / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("bora_pyro").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.metrics == {"val_perplexity_per_task/HAMLET _Hamlet_": 2.0}


def test_the_user_s_tracking_uri_and_experiment_are_used(mlflow_store, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    uri = (tmp_path / "elsewhere").resolve().as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mine")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    with make_trackers(["mlflow"], report_dir=mlflow_store, run_name="x") as trackers:
        trackers.log_params({"train": {"lr": 0.5}})
    assert not (mlflow_store / "mlruns").exists()
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("mine").experiment_id])
    assert run.data.params == {"train.lr": "0.5"}


# ----------------------------------------------------------------------------- the report


REPORT_FIGURES = ("tau", "shrinkage", "distance", "perplexity", "calibration")


def test_the_report_goes_into_the_fit_s_own_runs_as_figures_a_table_and_files(tmp_path, mlflow_store, corpus):
    """A fit tracked as "tiny" in TensorBoard and MLflow, then result.report(..., run_name="tiny"):
    TensorBoard gets the figures as images in the same event folder, MLflow the PNGs, the table and
    the report's files in the same (still finished) run."""
    pytest.importorskip("tensorboard")
    from mlflow import MlflowClient

    trackers = ["tensorboard", "mlflow"]
    result = bora_pyro.fit_map(corpus, model=_base(), tokenizer=char_tokenizer(), report_to=trackers,
                               report_dir=mlflow_store, run_name="tiny", **QUICK)
    path = result.report(tmp_path / "out" / "report.html", report_to=trackers, report_dir=mlflow_store,
                         run_name="tiny")
    assert path.is_file()

    folders = [p.name for p in (mlflow_store / "tensorboard").iterdir()]
    assert folders == ["tiny"]  # appended to the fit's run, not a new one
    events = _events(mlflow_store / "tensorboard" / "tiny")
    images = set(events.Tags()["images"])
    assert {f"report/{name}" for name in REPORT_FIGURES} <= images
    for name in REPORT_FIGURES:
        (image,) = events.Images(f"report/{name}")
        assert image.step == 5 and image.width > 100 and image.encoded_image_string[:4] == b"\x89PNG"
    assert "report/tasks/text_summary" in events.Tags()["tensors"]
    assert (mlflow_store / "tensorboard" / "tiny" / "report" / "report.html").is_file()

    client = MlflowClient(tracking_uri=(mlflow_store / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("bora_pyro").experiment_id])
    assert run.info.run_name == "tiny" and run.info.status == "FINISHED"
    listed = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert {f"report/{name}.png" for name in REPORT_FIGURES} | {
        "report/tasks.csv", "report/tasks.md", "report/report.html", "report/report.md"} <= listed
    tasks = pd.read_csv(client.download_artifacts(run.info.run_id, "report/tasks.csv", str(tmp_path / "dl")))
    assert set(TASKS) <= set(tasks.iloc[:, 0])
    root = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"validation_per_task.csv", "validation_per_task.md", "history.csv"} <= root


def test_an_offline_wandb_run_holds_the_table_the_figures_and_the_files(tmp_path, monkeypatch, corpus):
    """W&B offline (no account, no network): the fit's per-task table and the report's figures and
    files land in the offline run's folder (wandb.Table as a table.json, wandb.Image as PNG)."""
    pytest.importorskip("wandb")
    import json

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = bora_pyro.fit_map(corpus, model=_base(), tokenizer=char_tokenizer(), report_to="wandb",
                               report_dir=tmp_path, run_name="tiny", **QUICK)
    result.report(tmp_path / "report.html", report_to="wandb", report_dir=tmp_path, run_name="tiny")
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2  # the fit's run, then the report's (an offline run cannot be reopened)
    fit_files, report_files = sorted((run / "files" for run in runs), key=lambda f: not (f / "history.csv").exists())
    (table,) = fit_files.glob("media/table/validation_per_task_*.table.json")
    rows = json.loads(table.read_text())
    assert rows["columns"][0] == "task" and [r[0] for r in rows["data"]] == [*TASKS, "overall"]
    assert (fit_files / "validation_per_task.csv").is_file() and (fit_files / "history.csv").is_file()
    for name in REPORT_FIGURES:
        (png,) = report_files.glob(f"media/images/report/{name}_*.png")
        assert png.read_bytes()[:4] == b"\x89PNG"
    assert (report_files / "report" / "report.html").is_file()
    assert len(list(report_files.glob("media/table/report/tasks_*.table.json"))) == 1


# ----------------------------------------------------------------------------- sweep, settings, CLI


def test_a_sweep_logs_one_run_per_tau(tmp_path):
    pytest.importorskip("tensorboard")
    config = SweepConfig(name="tiny", taus=(0.0, math.inf)).with_overrides(
        max_length=32, rank=2, alpha=4.0, batch_size=4, max_steps=2, eval_every=2, patience=None)
    run_sweep(FRAME, config=config, out=tmp_path / "sweep", model=_base(), tokenizer=char_tokenizer(),
              device="cpu", progress=False, report_to="tensorboard", report_dir=tmp_path / "runs")
    folders = sorted(p.name for p in (tmp_path / "runs" / "tensorboard").iterdir())
    assert folders == ["sweep-tiny-tau=0", "sweep-tiny-tau=inf"]
    for folder in folders:
        events = _events(tmp_path / "runs" / "tensorboard" / folder)
        assert [e.step for e in events.Scalars("loss")] == [0, 1]


def test_report_to_follows_transformers_names():
    assert TrainConfig().report_to is None
    assert TrainConfig(report_to="TensorBoard").report_to == ["tensorboard"]
    assert TrainConfig(report_to=("mlflow", "wandb", "mlflow")).report_to == ["mlflow", "wandb"]
    assert TrainConfig(report_to="none").report_to is None and TrainConfig(report_to=["none"]).report_to is None
    with pytest.raises(ValueError, match="did you mean 'tensorboard'"):
        TrainConfig(report_to="tensorbord")
    with pytest.raises(ValueError, match="mixes 'none'"):
        TrainConfig(report_to=["none", "mlflow"])
    with pytest.raises(ValueError, match="run_name must be"):
        TrainConfig(run_name=" ")
    assert TrainConfig.from_dict(TrainConfig(report_to="mlflow").to_dict()).report_to == ["mlflow"]


def test_the_command_line_takes_one_or_more_trackers(tmp_path):
    parser = build_parser()
    args = parser.parse_args(["fit", "data.jsonl", "--report-to", "tensorboard", "mlflow", "--report-dir",
                              str(tmp_path), "--run-name", "cli"])
    assert given(args) == {"report_to": ["tensorboard", "mlflow"], "report_dir": str(tmp_path), "run_name": "cli"}
    assert TrainConfig(**given(args)).report_to == ["tensorboard", "mlflow"]
    assert TrainConfig(**given(parser.parse_args(["fit", "d.jsonl", "--report-to", "none"]))).report_to is None
    with pytest.raises(SystemExit):
        parser.parse_args(["fit", "d.jsonl", "--report-to", "comet"])


def test_params_are_flattened_to_plain_values():
    assert flatten_params({"train": {"lr": 1e-3, "report_to": ["mlflow"], "resume": None}, "run": {"tasks": 3}}) == {
        "train.lr": 1e-3, "train.report_to": '["mlflow"]', "train.resume": "null", "run.tasks": 3}


# ----------------------------------------------------------------------------- missing packages


@pytest.mark.parametrize("name", ["tensorboard", "mlflow", "wandb"])
def test_a_missing_package_names_its_extra_before_any_model_is_loaded(name, monkeypatch):
    monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
    message = rf"report_to='{name}' needs the '{name}' package.*pip install 'bora-pyro\[{name}\]'"
    with pytest.raises(ImportError, match=message):
        require_trackers(name)
    with pytest.raises(ImportError, match=message):
        bora_pyro.fit_map(FRAME, model=NO_MODEL, report_to=name, device="cpu")


def test_trackers_close_all_even_when_one_fails():
    closed = []

    class Recorder(Tracker):
        name = "recorder"

        def __init__(self, fail):
            self.fail = fail

        def close(self, success=True):
            closed.append(success)
            if self.fail:
                raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        with Trackers([Recorder(True), Recorder(False)]):
            pass
    assert closed == [True, True]
    assert not Trackers() and len(make_trackers(None, run_name="x")) == 0
