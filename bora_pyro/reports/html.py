"""The uncertainty report: one self-contained HTML file (figures embedded as base64 PNG) and a
Markdown summary next to it, both rendered from the jinja2 templates in ``templates/``; the
per-task table is written by ``DataFrame.to_html`` / ``DataFrame.to_markdown``."""

from __future__ import annotations

import base64
import datetime as _dt
import io
import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from .._version import __version__
from .arviz import import_arviz, to_inference_data
from .calibration import calibration_per_task
from .plots import (
    perplexity_frame,
    plot_distance_vs_size,
    plot_perplexity,
    plot_reliability,
    plot_shrinkage_forest,
    plot_tau,
)
from .protocol import FitLike

__all__ = ["write_report", "task_table", "SECTIONS"]

#: ``(id, heading)`` of the report's sections, in order.
SECTIONS = (
    ("tau", "Precision tau"),
    ("shrinkage", "Shrinkage per task"),
    ("distance", "Distance to the global adapter vs training size"),
    ("perplexity", "Held-out perplexity per task"),
    ("calibration", "Calibration of next-token predictions"),
    ("tasks", "Per-task table"),
)


def _templates():
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("bora_pyro.reports", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default_for_string=False),
        keep_trailing_newline=True,
    )


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt(x: float, digits: int = 3) -> str:
    if not math.isfinite(x):
        return "" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return f"{x:.{digits}g}" if abs(x) >= 1e4 or (x != 0 and abs(x) < 1e-3) else f"{x:.{digits}f}"


def _report_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        return path / "report.html"
    if path.suffix.lower() not in (".html", ".htm"):
        raise ValueError(
            f"path={str(path)!r} must end in .html (the Markdown summary goes next to it, .md) "
            "or be an existing folder (then report.html is written in it)."
        )
    return path


def task_table(idata, calibration, baseline_frames: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per task (fewest training documents first) and a last row ``overall``.

    Columns: ``task``, ``train_docs``, ``train_tokens``, ``eval_docs``, ``shrinkage``,
    ``relative_distance`` (of the MAP, or of the posterior mean under SVI), ``perplexity`` (and ``ppl_low`` /
    ``ppl_high`` under SVI), one ``ppl <name>`` per baseline, ``top1_accuracy`` and ``ece``.
    """
    cd = idata.constant_data
    tasks = [str(t) for t in cd["task"].values]
    ppl = perplexity_frame(idata)
    cal = calibration.table().set_index("task")
    df = pd.DataFrame({
        "task": tasks,
        "train_docs": cd["n_train_docs"].values,
        "train_tokens": cd["n_train_tokens"].values,
        "eval_docs": cd["n_eval_docs"].values,
        "shrinkage": cd["shrinkage"].values,
        "relative_distance": cd["point_relative_distance"].values,
        "perplexity": ppl.loc[tasks, "perplexity"].to_numpy(),
    })
    if ppl["low"].notna().all():
        df["ppl_low"] = ppl.loc[tasks, "low"].to_numpy()
        df["ppl_high"] = ppl.loc[tasks, "high"].to_numpy()
    for name, frame in baseline_frames.items():
        df[f"ppl {name}"] = frame.loc[tasks, "perplexity"].to_numpy()
    df["top1_accuracy"] = cal.loc[tasks, "accuracy"].to_numpy()
    df["ece"] = cal.loc[tasks, "ece"].to_numpy()
    df = df.sort_values("train_docs", kind="stable").reset_index(drop=True)
    overall = {c: np.nan for c in df.columns}
    overall.update({
        "task": "overall", "train_docs": int(df["train_docs"].sum()), "train_tokens": int(df["train_tokens"].sum()),
        "eval_docs": int(df["eval_docs"].sum()), "perplexity": ppl.attrs["overall"],
        "top1_accuracy": cal.loc["overall", "accuracy"], "ece": cal.loc["overall", "ece"],
    })
    for name, frame in baseline_frames.items():
        overall[f"ppl {name}"] = frame.attrs["overall"]
    return pd.concat([df, pd.DataFrame([overall])], ignore_index=True)


_HEADERS = {
    "task": "task", "train_docs": "train docs", "train_tokens": "train tokens", "eval_docs": "{split} docs",
    "shrinkage": "shrinkage", "relative_distance": "rel. distance", "perplexity": "perplexity",
    "ppl_low": "ppl 2.5%", "ppl_high": "ppl 97.5%", "top1_accuracy": "top-1 acc.", "ece": "ECE",
}


def _formatter(column: str):
    if column == "task":
        return str
    if column in ("train_docs", "train_tokens", "eval_docs"):
        return lambda v: f"{int(v):,}"
    if column.startswith("ppl") or column == "perplexity":
        return lambda v: "" if math.isnan(v) else f"{v:.2f}"
    digits = 4 if column == "shrinkage" else 3
    return lambda v: _fmt(float(v), digits)


def _formatted(table: pd.DataFrame, split: str) -> pd.DataFrame:
    """The per-task table as text, with the report's headers (for ``to_html`` / ``to_markdown``)."""
    text = pd.DataFrame({c: table[c].map(_formatter(c)) for c in table.columns})
    return text.rename(columns={c: _HEADERS.get(c, c).format(split=split) for c in table.columns})


def write_report(
    result: FitLike,
    path: str | os.PathLike,
    *,
    baselines: Mapping[str, Any] | None = None,
    split: str = "test",
    max_docs_per_task: int | None = None,
    num_samples: int | None = None,
    predictive_samples: int = 8,
    fisher: Any = None,
    fisher_max_docs_per_task: int | None = None,
    n_bins: int = 15,
    title: str | None = None,
    idata: Any = None,
    seed: int = 0,
    progress: bool = False,
    report_to: Any = None,
    report_dir: str | os.PathLike = "runs",
    run_name: str | None = None,
) -> Path:
    """Write the uncertainty report of a fitted result: ``path`` (HTML) and ``path.md``.

    Sections (see `SECTIONS`): the precision tau; a forest plot of per-task shrinkage sorted by
    training size; distance to the global adapter vs training size; per-task held-out
    perplexity with intervals (SVI) beside the baselines; calibration of next-token predictions
    (ECE with ``n_bins`` bins per task, reliability diagram); a per-task table. The HTML file
    is self-contained (figures are base64 PNG); the Markdown file holds the text and tables.

    Parameters
    ----------
    result
        A fitted result (`FitLike`, e.g. a `BoraResult`).
    path
        The HTML file (``.html``), or an existing folder (then ``report.html`` in it).
    baselines
        ``{name: result}`` to compare with, typically ``{"tau=0": independent, "tau=inf":
        pooled}`` fitted on the same corpus; results, InferenceData or `BoraResult.evaluate`
        DataFrames.
    split, max_docs_per_task, seed
        Held-out split and optional per-task subset for perplexity and calibration (the same
        documents for the result and the baselines).
    num_samples, predictive_samples, fisher, fisher_max_docs_per_task
        As in `to_inference_data`.
    n_bins
        Confidence bins of the ECE.
    title
        Heading of the report.
    idata
        The result's ``arviz.InferenceData`` if you already made it with `to_inference_data`
        (for the same ``split`` and ``max_docs_per_task``): it is used as is instead of being
        computed again (which under SVI costs one pass over the split per posterior draw).
    progress
        Show progress bars.
    report_to, report_dir, run_name
        Also log the report to experiment trackers (`bora_pyro.tracking.log_report`): its
        figures as images, its per-task table and the two files, into the run ``run_name``
        under ``report_dir`` (pass the fit's ``run_name`` to add them to the fit's own run;
        default: a new run ``report-<time>``). ``report_to`` takes the names of
        `TrainConfig.report_to`.

    Returns
    -------
    The path of the HTML file.
    """
    from ..tracking import default_run_name, log_report, require_trackers

    trackers = require_trackers(report_to)  # a missing package fails before any work
    out = _report_path(path)
    az = import_arviz()
    if idata is None:
        idata = to_inference_data(
            result, split=split, num_samples=num_samples, predictive_samples=predictive_samples,
            max_docs_per_task=max_docs_per_task, fisher=fisher, fisher_max_docs_per_task=fisher_max_docs_per_task,
            seed=seed, progress=progress,
        )
    elif not isinstance(idata, az.InferenceData) or list(idata.constant_data["task"].values) != list(result.tasks):
        raise ValueError(
            "idata must be the arviz.InferenceData of this result (bora_pyro.to_inference_data(result)); "
            "its tasks differ or it is not an InferenceData."
        )
    frames: dict[str, pd.DataFrame] = {}
    for name, base in (baselines or {}).items():
        if not isinstance(base, (az.InferenceData, pd.DataFrame)):
            base = base.evaluate(split, max_docs_per_task=max_docs_per_task, seed=seed, progress=progress)
        frames[str(name)] = base
    calibration = calibration_per_task(
        result, split, max_docs_per_task=max_docs_per_task, n_bins=n_bins, seed=seed, progress=progress
    )
    frames_idx = {name: perplexity_frame(f) for name, f in frames.items()}
    table = task_table(idata, calibration, frames_idx)

    method = result.method.upper()
    D, P = result.task_adapters.shape
    mode = result.config.mode
    taus = ", ".join(f"{g} = {float(v):.4g}" for g, v in result.tau.items())
    subset = "all documents" if max_docs_per_task is None else f"at most {max_docs_per_task} documents per task"
    n_draws = idata.posterior.sizes["draw"]
    title = title or f"BoRA report: {D} tasks, {method}"
    tau_src = {
        "learn": ("learned by empirical Bayes (variational EM under SVI, the evidence fixed point under "
                  "MAP): a point estimate, not a posterior"),
        "fixed": "fixed by the user",
        "independent": "tau = 0: independent task adapters",
        "pooled": "tau = inf: one adapter shared by all tasks",
    }[mode]
    shrink_src = (
        "the posterior variances of the mean-field guide: shrinkage_d = mean_i tau_g(i) σ_di²"
        if result.task_scales is not None else
        "the diagonal true Fisher h of each task's training documents at the global adapter "
        "(Monte-Carlo, labels drawn from the model): shrinkage_d = mean_i tau_g(i) / (h_di + tau_g(i))"
    )
    n_ll = idata.log_likelihood.sizes["draw"]
    ppl_note = (
        f"Posterior-predictive perplexity over {n_ll} posterior draws, with the central 95% of the "
        "task's perplexity over the draws." if n_ll > 1
        else "Perplexity at the posterior mean (no posterior draws: no interval)." if result.task_scales is not None
        else "Perplexity of the MAP adapters (a point estimate: no interval)."
    )
    base_note = (f" Baselines: {', '.join(frames)}." if frames else
                 " No baselines were given (pass e.g. {'tau=0': r0, 'tau=inf': rinf} to compare).")
    texts = {
        "tau": (f"tau is the prior precision of one adapter entry around the global adapter "
                f"(θ_d ~ N(Θ, 1/tau)); here {tau_src}: {taus}. Large tau pulls tasks together."),
        "shrinkage": (f"The share of each task's posterior precision that comes from the prior, from "
                      f"{shrink_src}. 0 = the task's own data decide its adapter, 1 = fully pooled. "
                      "It should fall as the training size grows. A mean over all "
                      f"{P:,} adapter entries: entries the data barely touch count as pooled, so values near 1 "
                      "are usual; compare tasks with each other."),
        "distance": ("‖θ_d − Θ‖ / ‖Θ‖ against the number of training documents (log scale): tasks with little "
                     "data should stay near the global adapter, tasks with much data move away."
                     + (" Distances of the posterior means. (The InferenceData also holds the distance per "
                        f"posterior draw, {n_draws} draws; a draw's squared distance adds about Σ_i σ_di² to the "
                        "mean's, so those mostly measure the posterior spread.)"
                        if result.task_scales is not None else " MAP point estimates.")),
        "perplexity": f"On the {split} split ({subset}). {ppl_note}{base_note}",
        "calibration": (f"Top-1 next-token predictions on the {split} split: expected calibration error "
                        f"with {n_bins} equal-width confidence bins, ECE = Σ_b (n_b/N) |acc_b − conf_b|, per task "
                        "in the table below. Bars under the diagonal are over-confident."
                        + (" Posterior-mean adapters." if result.task_scales is not None else "")),
        "tasks": ("Tasks from the fewest training documents to the most. Shrinkage: share of the posterior "
                  "precision from the prior; rel. distance: ‖θ_d − Θ‖ / ‖Θ‖"
                  + (" of the posterior mean" if result.task_scales is not None else "")
                  + f"; perplexity on the {split} split"
                  + (" (posterior-predictive, with the 2.5% and 97.5% points over posterior draws)"
                     if n_ll > 1 else "")
                  + (", beside the baselines" if frames else "")
                  + f"; top-1 accuracy and ECE ({n_bins} bins) of next-token predictions."),
    }
    figures = {
        "tau": (plot_tau(idata, history=result.history), "tau per precision group"),
        "shrinkage": (plot_shrinkage_forest(idata), "forest plot of shrinkage per task"),
        "distance": (plot_distance_vs_size(idata), "distance to the global adapter vs training documents"),
        "perplexity": (plot_perplexity(idata, frames or None), "held-out perplexity per task"),
        "calibration": (plot_reliability(calibration), "reliability diagram"),
    }
    meta = [
        ("method", f"{method} ({'posterior means and sds' if result.task_scales is not None else 'point estimates'})"),
        ("tasks", f"{D}"), ("adapter entries P", f"{P:,} (rank {result.config.rank}, alpha {result.config.alpha:g})"),
        ("tau", f"{taus} ({mode})"), ("base model", str(result.model_spec)),
        ("evaluated on", f"{split} split, {subset}"),
        ("written", f"{_dt.datetime.now():%Y-%m-%d %H:%M} by bora_pyro {__version__}"),
    ]
    sections = [
        {"id": sid, "heading": head, "text": texts[sid],
         "png": _png(figures[sid][0]) if sid in figures else None,
         "alt": figures[sid][1] if sid in figures else None}
        for sid, head in SECTIONS
    ]
    text = _formatted(table, split)
    align = ["left"] + ["right"] * (text.shape[1] - 1)
    context = {
        "title": title, "meta": meta, "sections": sections, "html_name": out.name,
        "table_html": text.to_html(index=False, classes="tasks", border=0, justify="left"),
        "table_markdown": text.to_markdown(index=False, colalign=align, disable_numparse=True),
    }
    env = _templates()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(env.get_template("report.html").render(context), encoding="utf-8")
    out.with_suffix(".md").write_text(env.get_template("report.md").render(context), encoding="utf-8")
    if trackers:
        steps = result.history.get("step") or [0]
        log_report(out, {sid: fig for sid, (fig, _) in figures.items()}, text, report_to=trackers,
                   report_dir=report_dir, run_name=run_name or default_run_name("report"), step=int(steps[-1]))
    return out
