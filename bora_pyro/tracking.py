"""Experiment tracking: a fit's curves, settings and tables in TensorBoard, MLflow or W&B.

``fit_map(..., report_to="tensorboard")`` (or ``"mlflow"``, ``"wandb"``, a list of them; the
names of transformers' ``report_to=``) opens one run per fit with `make_trackers` and logs:

- the settings (the `DataConfig`, `BoraConfig` and `TrainConfig` of the fit, flattened to
  ``data.max_length``, ``model.rank``, ``train.lr``, ..., and ``run.method``, ``run.tasks``, ...)
  as parameters (TensorBoard: hparams and a text summary);
- after every step (the loop's ``on_step``, see `bora_pyro.inference.loop.run_steps`): ``loss``,
  ``train_nll``, ``lr``, ``step_seconds``, ``tau/<group>``; after each validation ``val_nll``,
  ``val_perplexity`` and ``val_perplexity_per_task/<task>``;
- at the end (`log_fit_end`): the history (``history.csv``) and the per-task validation
  perplexity of the kept state as a table (``validation_per_task.csv`` and ``.md`` artifacts;
  TensorBoard: text, W&B: a ``wandb.Table``);
- the report, when it is written with ``result.report(path, report_to=..., run_name=...)``
  (`log_report`, into the same run): its figures as images (``report/tau``,
  ``report/shrinkage``, ...; TensorBoard ``add_figure``, MLflow PNG artifacts, W&B
  ``wandb.Image``), its per-task table, and the HTML and Markdown files as artifacts.

Everything is written under ``report_dir`` (default ``runs``) and works offline:

- TensorBoard: event files in ``report_dir/tensorboard/<run_name>`` (``torch.utils.tensorboard``;
  view with ``tensorboard --logdir runs/tensorboard``);
- MLflow: a local file store ``report_dir/mlruns`` (unless ``MLFLOW_TRACKING_URI`` is set), in the
  experiment ``MLFLOW_EXPERIMENT_NAME`` (default ``bora_pyro``). MLflow 3 keeps the file store in
  maintenance mode and opens it only with ``MLFLOW_ALLOW_FILE_STORE=true``, which is set for this
  process when bora_pyro chooses the file store and the variable is unset;
- W&B: an offline run under ``report_dir/wandb`` (``WANDB_MODE=offline`` unless ``WANDB_MODE``
  is set; ``wandb sync`` uploads it later), in the project ``WANDB_PROJECT`` (default
  ``bora_pyro``).

Each backend is an optional dependency (``pip install 'bora-pyro[tensorboard]'``, ``[mlflow]``,
``[wandb]``); a missing one is an ``ImportError`` naming the extra, raised before the fit loads
anything.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from .config import parse_report_to

if TYPE_CHECKING:  # pandas is imported where used: `bora --help` stays fast
    import pandas as pd

__all__ = [
    "Tracker", "Trackers", "TensorBoardTracker", "MLflowTracker", "WandbTracker",
    "make_trackers", "require_trackers", "flatten_params", "log_fit_end", "log_report", "default_run_name",
]

#: Per backend: the modules it imports and the extra (and package) that provides them.
_BACKENDS = {
    "tensorboard": (("tensorboard", "torch.utils.tensorboard"), "tensorboard"),
    "mlflow": (("mlflow",), "mlflow"),
    "wandb": (("wandb",), "wandb"),
}
#: Metrics TensorBoard's hparams dashboard shows next to the settings.
_HPARAM_METRICS = ("loss", "train_nll", "val_nll", "val_perplexity")


def require_trackers(report_to: Any) -> list[str]:
    """Import the packages of the trackers in ``report_to`` (see `make_trackers`) and return
    their names; an ``ImportError`` naming the extra to install when one is missing."""
    names = parse_report_to(report_to) or []
    for name in names:
        modules, extra = _BACKENDS[name]
        for module in modules:
            try:
                importlib.import_module(module)
            except ImportError as err:
                raise ImportError(
                    f"report_to={name!r} needs the {extra!r} package, which is not installed "
                    f"(import {module!r} failed: {err}). Install it with "
                    f"pip install 'bora-pyro[{extra}]' (or pip install {extra}), or leave "
                    f"{name!r} out of report_to."
                ) from err
    return names


def default_run_name(method: str) -> str:
    """``"<method>-<YYYYmmdd-HHMMSS>"``: the run name when ``run_name`` is not set."""
    return f"{method}-{time.strftime('%Y%m%d-%H%M%S')}"


def flatten_params(params: dict[str, Any], prefix: str = "") -> dict[str, str | int | float | bool]:
    """Nested settings as one level, ``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 0.001}``;
    lists, ``None`` and other values become their JSON text (what every tracker accepts)."""
    flat: dict[str, str | int | float | bool] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_params(value, prefix=f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value, default=str)
    return flat


class Tracker:
    """One run in one tracking backend. Subclasses implement the four methods; values are
    plain Python numbers and strings (the loop passes what it already read from the device)."""

    #: The ``report_to`` name of the backend.
    name = ""

    def log_params(self, params: dict[str, Any]) -> None:
        """Record the run's settings (nested dicts are flattened with `flatten_params`)."""
        raise NotImplementedError

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Record scalar ``metrics`` (``{name: value}``) at optimiser step ``step`` (0-based)."""
        raise NotImplementedError

    def log_artifact(self, name: str, text: str) -> None:
        """Store a text file ``name`` (e.g. ``"validation_per_task.csv"``) with the run."""
        raise NotImplementedError

    def log_table(self, name: str, table: pd.DataFrame, step: int) -> None:
        """Record a table (``name`` without extension, e.g. ``"validation_per_task"``) at ``step``:
        ``name.csv`` and ``name.md`` as artifacts, and what the backend shows as a table."""
        raise NotImplementedError

    def log_figure(self, name: str, figure: Any, step: int) -> None:
        """Record a matplotlib figure (``name`` without extension, e.g. ``"report/shrinkage"``)
        at ``step`` as an image."""
        raise NotImplementedError

    def close(self, success: bool = True) -> None:
        """End the run, marked as failed when ``success`` is False."""
        raise NotImplementedError


class TensorBoardTracker(Tracker):
    """Event files in ``log_dir`` via ``torch.utils.tensorboard.SummaryWriter``: metrics as
    scalars, settings as hparams and a text summary, tables as text (Markdown), figures as
    images, artifacts as files in ``log_dir`` (and Markdown ones as text)."""

    name = "tensorboard"

    def __init__(self, log_dir: str | os.PathLike):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log_params(self, params: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        flat = flatten_params(params)
        for summary in hparams(flat, dict.fromkeys(_HPARAM_METRICS, 0.0)):
            self.writer.file_writer.add_summary(summary)
        table = "\n".join(["| setting | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in flat.items())])
        self.writer.add_text("settings", table)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_artifact(self, name: str, text: str) -> None:
        path = self.log_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        if name.endswith(".md"):
            self.writer.add_text(name, text)

    def log_table(self, name: str, table: pd.DataFrame, step: int) -> None:
        (self.log_dir / f"{name}.csv").parent.mkdir(parents=True, exist_ok=True)
        (self.log_dir / f"{name}.csv").write_text(table.to_csv(index=False), encoding="utf-8")
        (self.log_dir / f"{name}.md").write_text(_markdown(table), encoding="utf-8")
        self.writer.add_text(name, _markdown(table), step)

    def log_figure(self, name: str, figure: Any, step: int) -> None:
        self.writer.add_figure(name, figure, step, close=False)

    def close(self, success: bool = True) -> None:
        self.writer.close()


class MLflowTracker(Tracker):
    """A run of the MLflow client (`mlflow.MlflowClient`, no global active run) in the
    experiment ``experiment`` at ``tracking_uri``: a new run, or with ``attach`` the latest run
    named ``run_name`` when there is one. Names are made valid for MLflow (characters other than
    letters, digits, ``_ - . / :`` and spaces become ``_``). Tables are CSV and Markdown
    artifacts, figures PNG artifacts (``MlflowClient.log_figure``)."""

    name = "mlflow"

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, *, attach: bool = False):
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
        latest = self.client.search_runs(
            [experiment_id], filter_string=f"attributes.run_name = '{run_name}'",
            order_by=["attributes.start_time DESC"], max_results=1,
        ) if attach and "'" not in run_name else []
        #: Logging into an earlier run (``attach``): its status is left as it is.
        self.attached = bool(latest)
        self.run_id = latest[0].info.run_id if latest else self.client.create_run(experiment_id, run_name=run_name).info.run_id

    @staticmethod
    def _key(name: str) -> str:
        return re.sub(r"[^\w\-. /:]", "_", name)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(self._key(k), str(v)) for k, v in flatten_params(params).items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(self._key(k), v, now, step) for k, v in metrics.items()])

    def log_artifact(self, name: str, text: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_table(self, name: str, table: pd.DataFrame, step: int) -> None:
        self.client.log_text(self.run_id, table.to_csv(index=False), f"{name}.csv")
        self.client.log_text(self.run_id, _markdown(table), f"{name}.md")

    def log_figure(self, name: str, figure: Any, step: int) -> None:
        self.client.log_figure(self.run_id, figure, f"{name}.png")

    def close(self, success: bool = True) -> None:
        if not self.attached:
            self.client.set_terminated(self.run_id, "FINISHED" if success else "FAILED")


class WandbTracker(Tracker):
    """A W&B run (``wandb.init``), offline unless ``WANDB_MODE`` says otherwise; settings go
    to its config, artifacts to its files, tables as ``wandb.Table``, figures as
    ``wandb.Image``."""

    name = "wandb"

    def __init__(self, directory: str | os.PathLike, run_name: str):
        import wandb

        Path(directory).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "bora_pyro"), name=run_name, dir=str(directory),
            mode=os.environ.get("WANDB_MODE", "offline"),
        )

    def log_params(self, params: dict[str, Any]) -> None:
        self.run.config.update(flatten_params(params), allow_val_change=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_artifact(self, name: str, text: str) -> None:
        path = Path(self.run.dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        self.run.save(str(path), base_path=self.run.dir, policy="now")

    def log_table(self, name: str, table: pd.DataFrame, step: int) -> None:
        import wandb

        self.log_artifact(f"{name}.csv", table.to_csv(index=False))
        self.run.log({name: wandb.Table(dataframe=table)}, step=step)

    def log_figure(self, name: str, figure: Any, step: int) -> None:
        import wandb

        self.run.log({name: wandb.Image(figure)}, step=step)

    def close(self, success: bool = True) -> None:
        self.run.finish(exit_code=0 if success else 1)


class Trackers:
    """The trackers of one run, used as one: each call goes to every tracker. Empty (and
    false) without ``report_to``. As a context manager it closes them all at the end, marking
    the run failed when the block raised."""

    def __init__(self, trackers: Iterable[Tracker] = ()):
        self.trackers = list(trackers)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def __len__(self) -> int:
        return len(self.trackers)

    def __iter__(self) -> Iterator[Tracker]:
        return iter(self.trackers)

    def log_params(self, params: dict[str, Any]) -> None:
        for t in self.trackers:
            t.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for t in self.trackers:
            t.log_metrics(metrics, step)

    def log_artifact(self, name: str, text: str) -> None:
        for t in self.trackers:
            t.log_artifact(name, text)

    def log_table(self, name: str, table: pd.DataFrame, step: int) -> None:
        for t in self.trackers:
            t.log_table(name, table, step)

    def log_figure(self, name: str, figure: Any, step: int) -> None:
        for t in self.trackers:
            t.log_figure(name, figure, step)

    def close(self, success: bool = True) -> None:
        """Close every tracker, even when one fails (the first error is raised after)."""
        error = None
        for t in self.trackers:
            try:
                t.close(success)
            except Exception as err:  # noqa: BLE001 - the others must still be closed
                error = error or err
        self.trackers = []
        if error is not None:
            raise error

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(success=exc_type is None)


def make_trackers(
    report_to: Any,
    *,
    report_dir: str | os.PathLike = "runs",
    run_name: str,
    resume: bool = False,
    attach: bool = False,
) -> Trackers:
    """Open one run named ``run_name`` in each tracker of ``report_to``.

    Parameters
    ----------
    report_to
        ``None`` / ``"none"`` (no tracking: an empty `Trackers`), ``"tensorboard"``,
        ``"mlflow"``, ``"wandb"`` or a list of them.
    report_dir
        Folder of the local files: ``tensorboard/<run_name>``, ``mlruns`` (MLflow file store),
        ``wandb`` (offline runs); see the module docstring for the environment variables read.
    run_name
        The run's name (TensorBoard: its folder; when that folder already holds events, a
        fresh run takes ``<run_name>-2``, ``-3``, ...).
    resume
        A fit resumed from a checkpoint: TensorBoard appends to ``<run_name>`` (its curves
        continue); MLflow and W&B open a new run of the same name.
    attach
        Add to the run ``run_name`` that a fit already wrote (e.g. its report, `log_report`):
        TensorBoard appends to its folder, MLflow logs into the latest run of that name (a new
        one if there is none) and leaves its status as it is; W&B opens a new run of that name
        (an offline run cannot be reopened by name).

    Raises
    ------
    ImportError
        When a tracker's package is missing (naming the extra to install); no run is opened.
    ValueError
        For an unknown tracker name (listing the valid ones) or an empty ``run_name``.
    """
    names = require_trackers(report_to)
    if not isinstance(run_name, str) or not run_name.strip():
        raise ValueError(f"run_name must be a non-empty string, got {run_name!r}.")
    report_dir = Path(report_dir)
    opened: list[Tracker] = []
    try:
        for name in names:
            if name == "tensorboard":
                opened.append(TensorBoardTracker(_run_folder(report_dir / "tensorboard", run_name, resume or attach)))
            elif name == "mlflow":
                opened.append(MLflowTracker(_mlflow_uri(report_dir), _mlflow_experiment(), run_name, attach=attach))
            else:
                opened.append(WandbTracker(report_dir, run_name))
    except BaseException:
        Trackers(opened).close(success=False)
        raise
    return Trackers(opened)


def _run_folder(parent: Path, run_name: str, resume: bool) -> Path:
    """``parent/run_name``, or the first free ``parent/run_name-k`` when it holds files of
    another run (a resumed run keeps its folder)."""
    folder = parent / run_name
    k = 1
    while not resume and folder.exists() and any(folder.iterdir()):
        k += 1
        folder = parent / f"{run_name}-{k}"
    return folder


def _mlflow_uri(report_dir: Path) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the file store ``report_dir/mlruns``."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (report_dir / "mlruns").resolve().as_uri()


def _mlflow_experiment() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or "bora_pyro"


def _markdown(table: pd.DataFrame) -> str:
    return table.to_markdown(index=False, floatfmt=".3f") + "\n"


def log_fit_end(trackers: Trackers, result: Any, *, max_docs_per_task: int | None = None, seed: int = 0) -> None:
    """Log what a finished fit leaves: ``history.csv`` (one row per step) and, when the corpus
    has validation documents, the per-task validation perplexity of the kept state (the table
    ``validation_per_task``, see `Tracker.log_table`; `BoraResult.evaluate` at the posterior
    mean, on the documents validation used during training: ``max_docs_per_task`` per task,
    ``seed``) and its overall value as the metric ``final/val_perplexity``, at the last step.
    Nothing is computed without trackers."""
    if not trackers:
        return
    trackers.log_artifact("history.csv", result.history_frame().to_csv(index=False))
    if not len(result.corpus.split("validation")):
        return
    last = result.history["step"][-1] if result.history.get("step") else 0
    table = result.evaluate("validation", max_docs_per_task=max_docs_per_task, num_samples=0, seed=seed)
    trackers.log_table("validation_per_task", table, last)
    overall = float(table.attrs["overall_perplexity"])
    if math.isfinite(overall):
        trackers.log_metrics({"final/val_perplexity": overall}, last)


def log_report(
    report: str | os.PathLike,
    figures: dict[str, Any],
    table: pd.DataFrame,
    *,
    report_to: Any,
    report_dir: str | os.PathLike = "runs",
    run_name: str,
    step: int = 0,
) -> None:
    """Log a written report to the run ``run_name`` (`make_trackers` with ``attach=True``: the
    fit's own run when it was tracked under that name): each figure as ``report/<name>``
    (`Tracker.log_figure`), the per-task table as ``report/tasks`` (`Tracker.log_table`), and
    the HTML file and its Markdown twin as the artifacts ``report/<file name>``; all at ``step``
    (the fit's last step)."""
    report = Path(report)
    with make_trackers(report_to, report_dir=report_dir, run_name=run_name, attach=True) as trackers:
        for name, figure in figures.items():
            trackers.log_figure(f"report/{name}", figure, step)
        trackers.log_table("report/tasks", table, step)
        for path in (report, report.with_suffix(".md")):
            trackers.log_artifact(f"report/{path.name}", path.read_text(encoding="utf-8"))
