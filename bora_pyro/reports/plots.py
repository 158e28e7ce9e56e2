"""Figures of a fitted BoRA model, as matplotlib ``Figure`` objects (notebooks, scripts, reports).

Every function takes an ``arviz.InferenceData`` from `to_inference_data` or a fitted result
(`FitLike`, e.g. a `BoraResult`; then
converted with `to_inference_data`, which evaluates the held-out split: convert once and pass
the InferenceData when drawing several figures). Figures are built without pyplot, so nothing
is left open in a global figure list; in a notebook the returned figure displays itself. Pass
``ax=`` to draw into an existing axes instead.

Tasks are ordered by their number of training documents throughout, smallest first (at the
top of the forest-style plots): that is the axis along which BoRA's pooling should act.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import pandas as pd

from .arviz import heldout_table, import_arviz, to_inference_data
from .calibration import Calibration, calibration_per_task, expected_calibration_error
from .protocol import FitLike

__all__ = [
    "plot_tau",
    "plot_shrinkage_forest",
    "plot_distance_vs_size",
    "plot_perplexity",
    "plot_reliability",
    "expected_calibration_error",
    "calibration_per_task",
    "perplexity_frame",
]

_BORA = "#1f5fa8"
_WIDTH = 10.0  # inches: every figure of a report has the same width
_COLORS = ("#d1495b", "#2e933c", "#edae49", "#7a5195", "#00798c", "#8c564b")


def _as_idata(source: Any):
    az = import_arviz()
    if isinstance(source, az.InferenceData):
        return source
    if isinstance(source, FitLike):
        return to_inference_data(source)
    raise ValueError(
        f"Expected an arviz.InferenceData from bora_pyro.to_inference_data or a BoraResult, got "
        f"{type(source).__name__}."
    )


def _new_axes(ax, figsize):
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _legend(fig, ax, owns: bool, ncol: int, handles=None, labels=None) -> None:
    """A legend under the plot when the figure is ours (constrained layout makes room), else in it."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    if owns:
        fig.legend(handles, labels, loc="outside lower center", ncol=ncol, fontsize=8, frameon=False)
    else:
        ax.legend(handles, labels, fontsize=8)


def _task_order(idata) -> tuple[list[str], np.ndarray]:
    """Task names and training documents, ordered by training documents (ascending)."""
    n = idata.constant_data["n_train_docs"]
    order = np.argsort(n.values, kind="stable")
    return [str(t) for t in n["task"].values[order]], n.values[order]


def _method(idata) -> str:
    return str(idata.attrs.get("inference", "?")).upper()


def plot_tau(source: Any, *, history: Mapping | None = None, ax=None):
    """The precision tau of each group (log scale) and, when known, its path during training.

    Parameters
    ----------
    source
        InferenceData or a fitted result. A result also gives the path of tau over the
        training steps (its ``history``) in a second panel.
    history
        The training history (``{"step": [...], "tau": [[...], ...]}``) when ``source`` is an
        InferenceData.
    ax
        Draw the values into this axes (the path is then not drawn).
    """
    if isinstance(source, FitLike) and history is None:
        history = source.history
    idata = _as_idata(source)
    names = [str(g) for g in idata.constant_data["group"].values]
    tau = idata.constant_data["tau"].values.astype(float)
    steps = list((history or {}).get("step", []))
    path = np.asarray((history or {}).get("tau", []), dtype=float)
    mode = str(idata.attrs.get("tau_mode", ""))
    show_path = (ax is None and mode == "learn" and len(steps) > 1 and path.ndim == 2
                 and path.shape[1] == len(names))
    if ax is None:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(_WIDTH if show_path else _WIDTH / 2, 1.2 + 0.45 * max(3, len(names))), layout="constrained")
        axes = fig.subplots(1, 2, width_ratios=[1, 1.4]) if show_path else [fig.add_subplot()]
    else:
        fig, axes = ax.figure, [ax]
    ax0 = axes[0]
    y = np.arange(len(names))[::-1]
    finite = np.isfinite(tau) & (tau > 0)
    if finite.all():
        ax0.scatter(tau, y, color=_BORA, zorder=3, s=40)
        for yi, t in zip(y, tau):
            ax0.annotate(f"{t:.4g}", (t, yi), textcoords="offset points", xytext=(7, 4), fontsize=9)
        ax0.set_xscale("log")
        lo, hi = tau.min(), tau.max()
        ax0.set_xlim(lo / 3, hi * 3)
        # Within a decade or two, matplotlib labels minor ticks too and they overlap: keep majors.
        from matplotlib.ticker import NullFormatter

        ax0.xaxis.set_minor_formatter(NullFormatter())
    else:
        label = {"independent": "tau = 0: independent task adapters (no pooling)",
                 "pooled": "tau = inf: one adapter shared by all tasks"}.get(mode, f"tau = {tau.tolist()}")
        ax0.text(0.5, 0.5, label, ha="center", va="center", transform=ax0.transAxes, fontsize=10)
        ax0.set_xticks([])
    ax0.set_yticks(y, names)
    ax0.set_ylim(-0.7, len(names) - 0.3)
    ax0.set_xlabel("tau (prior precision of one adapter entry)")
    ax0.set_ylabel("precision group")
    estimated = {"learn": "learned (empirical Bayes)", "fixed": "fixed"}.get(mode, mode)
    ax0.set_title(f"tau per group, {estimated}", fontsize=11)
    ax0.grid(axis="x", alpha=0.3)
    if show_path:
        ax1 = axes[1]
        for i, g in enumerate(names):
            ax1.plot(steps, path[:, i], label=g, color=_COLORS[i % len(_COLORS)] if i else _BORA)
        if np.all(path > 0) and np.all(np.isfinite(path)):
            ax1.set_yscale("log")
        ax1.set_xlabel("training step")
        ax1.set_ylabel("tau")
        ax1.set_title("tau during training", fontsize=11)
        ax1.grid(alpha=0.3)
        if len(names) <= 8:
            ax1.legend(title="group", fontsize=9)
    return fig


def plot_shrinkage_forest(source: Any, *, by_group: bool | None = None, ax=None):
    """Per task, the share of its posterior precision that comes from the prior (shrinkage).

    Tasks from the fewest training documents (top) to the most; the factor should fall down the
    plot. ``by_group`` adds one hollow marker per precision group (default: with 2 to 4
    groups). See `bora_pyro.reports.arviz` for the definition.
    """
    idata = _as_idata(source)
    tasks, n_train = _task_order(idata)
    cd = idata.constant_data
    values = cd["shrinkage"].sel(task=tasks).values.astype(float)
    groups = [str(g) for g in cd["group"].values]
    if by_group is None:
        by_group = 1 < len(groups) <= 4
    owns = ax is None
    fig, ax = _new_axes(ax, (_WIDTH, 1.6 + 0.32 * len(tasks)))
    y = np.arange(len(tasks))[::-1]
    ax.scatter(values, y, color=_BORA, s=36, zorder=3, label="all adapter entries")
    if by_group:
        per_group = cd["shrinkage_by_group"].sel(task=tasks).values.astype(float)
        markers = "^vsD"
        for j, g in enumerate(groups):
            ax.scatter(per_group[:, j], y, facecolors="none", edgecolors=_COLORS[j % len(_COLORS)],
                       marker=markers[j % len(markers)], s=34, zorder=2, label=f"entries of group {g}")
    ax.set_yticks(y, [f"{t}  (n={n})" for t, n in zip(tasks, n_train)])
    ax.set_ylim(-0.6, len(tasks) - 0.4)
    ax.set_xlabel("shrinkage: share of the posterior precision from the prior   (0 = own data only, 1 = fully pooled)")
    ax.set_title(f"Shrinkage per task, fewest training documents (n) at the top ({_method(idata)})", fontsize=11)
    ax.grid(axis="x", alpha=0.3)
    _legend(fig, ax, owns, ncol=1 + len(groups) * bool(by_group))
    return fig


def plot_distance_vs_size(
    source: Any, *, relative: bool = True, draws: bool = False, label_tasks: bool | None = None, ax=None
):
    """Distance of each task adapter to the global adapter against training documents (log x).

    BoRA's signature: tasks with little data stay near the global adapter, tasks with much data
    move away. Points are the MAP adapters, or under SVI the posterior means (as in
    `BoraResult.posterior_summary`).

    Parameters
    ----------
    relative
        Plot ``||theta_d - Theta|| / ||Theta||`` (default) or the absolute distance.
    draws
        SVI only: add the posterior median and central 95% interval of the distance over the
        posterior draws. In high dimension a draw's squared distance is the posterior mean's
        plus about ``sum_i sigma_di^2``, so these mostly show the posterior spread (which
        shrinks with data), not how far the task moved.
    label_tasks
        Write every task's name next to its point (default: with at most 12 tasks; with more,
        only the 3 smallest and the 3 largest tasks are named).
    """
    idata = _as_idata(source)
    name = "relative_distance" if relative else "distance"
    n = idata.constant_data["n_train_docs"]
    tasks = [str(t) for t in n["task"].values]
    x = n.values.astype(float)
    post = idata.posterior
    is_svi = _method(idata) == "SVI"
    y = idata.constant_data[f"point_{name}"].sel(task=tasks).values.astype(float)
    owns = ax is None
    fig, ax = _new_axes(ax, (_WIDTH, 5.0))
    ax.scatter(x, y, color=_BORA, s=42, zorder=3,
               label="posterior mean" if is_svi else "MAP adapter")
    if draws and is_svi:
        samples = post[name].sel(task=tasks).stack(sample=("chain", "draw")).transpose("task", "sample").values
        med = np.median(samples, axis=1)
        lo, hi = np.quantile(samples, [0.025, 0.975], axis=1)
        ax.errorbar(x, med, yerr=[med - lo, hi - med], fmt="s", ms=4, color="0.45", capsize=3,
                    label=f"posterior draws: median and 95% ({samples.shape[1]} draws)")
    if label_tasks is None:
        named = set(range(len(tasks))) if len(tasks) <= 12 else set(np.argsort(x, kind="stable")[[0, 1, 2, -3, -2, -1]])
    else:
        named = set(range(len(tasks))) if label_tasks else set()
    for i in sorted(named):
        ax.annotate(tasks[i], (x[i], y[i]), textcoords="offset points", xytext=(6, 3), fontsize=8)
    ax.set_xscale("log")
    ax.margins(x=0.12, y=0.1)
    ax.set_xlabel("training documents of the task (log scale)")
    ax.set_ylabel(r"$\|\theta_d - \Theta\| \;/\; \|\Theta\|$" if relative else r"$\|\theta_d - \Theta\|$")
    what = "Relative distance" if relative else "Distance"
    ax.set_title(f"{what} of each task adapter to the global adapter vs training size ({_method(idata)})", fontsize=11)
    ax.grid(alpha=0.3)
    if draws and is_svi:
        _legend(fig, ax, owns, ncol=2)
    return fig


def perplexity_frame(
    source: Any, *, split: str = "test", max_docs_per_task: int | None = None, seed: int = 0
) -> pd.DataFrame:
    """Per-task held-out perplexity, indexed by task: ``perplexity``, ``low``, ``high``.

    ``source`` is an InferenceData (its held-out log-likelihood, `heldout_table`), a fitted
    result (evaluated on ``split``) or a DataFrame from `BoraResult.evaluate`. ``low``/``high``
    are the central 95% over posterior draws (SVI) and ``nan`` otherwise.
    ``df.attrs["overall"]`` is the token-weighted perplexity over all tasks.
    """
    az = import_arviz()
    if isinstance(source, az.InferenceData):
        source = heldout_table(source)
    elif isinstance(source, FitLike):
        source = source.evaluate(split, max_docs_per_task=max_docs_per_task, seed=seed)
    if not isinstance(source, pd.DataFrame) or not {"task", "perplexity"} <= set(source.columns):
        raise ValueError(
            "Expected an InferenceData, a fitted result or a DataFrame from BoraResult.evaluate() "
            f"(columns task, perplexity), got {type(source).__name__}."
        )
    rows = source[source["task"] != "overall"]
    df = pd.DataFrame({"perplexity": rows["perplexity"].to_numpy(float)}, index=rows["task"].astype(str))
    df["low"] = rows["perplexity_low"].to_numpy(float) if "perplexity_low" in rows else np.nan
    df["high"] = rows["perplexity_high"].to_numpy(float) if "perplexity_high" in rows else np.nan
    overall = source.loc[source["task"] == "overall", "perplexity"]
    df.attrs["overall"] = float(overall.iloc[0]) if len(overall) else math.nan
    return df


def plot_perplexity(
    source: Any,
    baselines: Mapping[str, Any] | None = None,
    *,
    split: str | None = None,
    max_docs_per_task: int | None = None,
    seed: int = 0,
    ax=None,
):
    """Held-out perplexity per task with its interval (SVI), beside baseline fits.

    Parameters
    ----------
    source
        InferenceData or `BoraResult`.
    baselines
        ``{name: result}``, e.g. ``{"tau=0": independent, "tau=inf": pooled}``: each a
        `BoraResult` (evaluated on the same split and subset), an InferenceData or a DataFrame
        from `BoraResult.evaluate`. They must have the same tasks.
    split, max_docs_per_task, seed
        How baselines given as results are evaluated; by default as recorded in the
        InferenceData (``split`` ``"test"``).
    """
    idata = _as_idata(source)
    held = idata.log_likelihood.attrs
    split = split or str(held.get("split", "test"))
    if max_docs_per_task is None and int(held.get("max_docs_per_task", -1)) > 0:
        max_docs_per_task = int(held["max_docs_per_task"])
    tasks, n_train = _task_order(idata)
    series = {"BoRA": perplexity_frame(idata)}
    for name, base in (baselines or {}).items():
        frame = perplexity_frame(base, split=split, max_docs_per_task=max_docs_per_task, seed=seed)
        if set(frame.index) != set(tasks):
            raise ValueError(
                f"baselines[{name!r}] has tasks {sorted(frame.index)}, but the result has "
                f"{sorted(tasks)}; compare fits on the same corpus."
            )
        series[str(name)] = frame
    k = len(series)
    owns = ax is None
    fig, ax = _new_axes(ax, (_WIDTH, 1.8 + 0.3 * len(tasks) * max(1.0, k / 2.5)))
    y = np.arange(len(tasks))[::-1].astype(float)
    offsets = (np.arange(k) - (k - 1) / 2) * (0.6 / k)
    handles, labels = [], []
    for i, (name, frame) in enumerate(series.items()):
        frame = frame.loc[tasks]
        color = _BORA if i == 0 else _COLORS[(i - 1) % len(_COLORS)]
        marker = "o" if i == 0 else "sD^v<>"[(i - 1) % 6]
        yy = y - offsets[i]
        overall = frame.attrs["overall"]
        label = name + (f" (overall {overall:.2f})" if math.isfinite(overall) else "")
        p = frame["perplexity"].to_numpy()
        if frame["low"].notna().all():
            err = np.clip([p - frame["low"].to_numpy(), frame["high"].to_numpy() - p], 0, None)
            h = ax.errorbar(p, yy, xerr=err, fmt=marker, color=color, capsize=2.5, ms=5, zorder=3)
            label += ", 95% over posterior draws"
        else:
            h = ax.scatter(p, yy, color=color, s=30, marker=marker, zorder=3)
        handles.append(h)
        labels.append(label)
    for yi in y[:-1] - 0.5:
        ax.axhline(yi, color="0.9", lw=0.8, zorder=0)
    ax.set_yticks(y, [f"{t}  (n={n})" for t, n in zip(tasks, n_train)])
    ax.set_ylim(-0.6, len(tasks) - 0.4)
    ax.set_xlabel(f"{split} perplexity of the task's documents (lower is better)")
    ax.set_title(f"Held-out perplexity per task, fewest training documents (n) at the top ({_method(idata)})", fontsize=11)
    ax.grid(axis="x", alpha=0.3)
    _legend(fig, ax, owns, ncol=min(k, 3), handles=handles, labels=labels)
    return fig


def plot_reliability(calibration: Calibration, *, tasks: list[str] | None = None, max_tasks: int = 8):
    """Reliability diagram of top-1 next-token predictions: all tasks pooled, and per task.

    Left: accuracy per confidence bin (bars) against the diagonal of perfect calibration, the gap
    to the bin's mean confidence outlined in red (a bar under the diagonal is over-confident),
    and underneath the share of tokens per bin. Right: one line per task (``tasks``, default all
    if there are at most ``max_tasks``, else ``max_tasks`` spread over the range of scored
    tokens) with each task's ECE in the legend.

    Parameters
    ----------
    calibration
        From `calibration_per_task`.
    """
    from matplotlib.figure import Figure

    if not isinstance(calibration, Calibration):
        raise ValueError(
            f"calibration must come from calibration_per_task(result), got {type(calibration).__name__}."
        )
    table = calibration.table().set_index("task")
    if tasks is None:
        tok = table["n_tokens"].iloc[:-1]
        tasks = list(tok.index)
        if len(tasks) > max_tasks:
            ordered = list(tok.sort_values(kind="stable").index)
            picks = np.unique(np.round(np.linspace(0, len(ordered) - 1, max_tasks)).astype(int))
            tasks = [ordered[i] for i in picks]
    fig = Figure(figsize=(_WIDTH, 5.4), layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=[3.2, 1])
    ax, hist, right = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[:, 1])
    pooled = calibration.reliability()
    width = 0.92 / calibration.n_bins
    centers = ((pooled["lower"] + pooled["upper"]) / 2).to_numpy()
    acc = pooled["accuracy"].to_numpy()
    conf = pooled["confidence"].to_numpy()
    has = pooled["count"].to_numpy() > 0
    ax.bar(centers[has], acc[has], width=width, color=_BORA, alpha=0.85, label="accuracy in bin")
    ax.bar(centers[has], (conf - acc)[has], bottom=acc[has], width=width, fill=False,
           edgecolor="#d1495b", hatch="///", lw=1, label="gap to mean confidence in bin")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("top-1 accuracy")
    ax.tick_params(labelbottom=False)
    overall = table.loc["overall"]
    lean = "over-confident" if overall["confidence"] > overall["accuracy"] else "under-confident"
    ax.set_title(f"All tasks ({int(overall['n_tokens']):,} tokens): ECE {overall['ece']:.3f}\n"
                 f"mean confidence {overall['confidence']:.3f}, accuracy {overall['accuracy']:.3f}: {lean}",
                 fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    share = pooled["count"].to_numpy() / max(1, int(pooled["count"].sum()))
    hist.bar(centers, share, width=width, color="0.5")
    hist.set_xlim(0, 1)
    hist.set_ylim(0, max(share.max(), 1e-9) * 1.15)
    hist.set_xlabel("top-1 confidence")
    hist.set_ylabel("share of\ntokens")
    for i, t in enumerate(tasks):
        rel = calibration.reliability(t)
        keep = rel["count"] > 0
        right.plot(rel.loc[keep, "confidence"], rel.loc[keep, "accuracy"], "o-", ms=4, lw=1.2,
                   color=(_BORA, *_COLORS)[i % (len(_COLORS) + 1)],
                   label=f"{t}: ECE {table.loc[t, 'ece']:.3f}")
    right.plot([0, 1], [0, 1], "k--", lw=1)
    right.set_xlim(0, 1)
    right.set_ylim(0, 1)
    right.set_xlabel("mean top-1 confidence in bin")
    right.set_ylabel("top-1 accuracy in bin")
    shown = "" if len(tasks) == len(calibration.tasks) else f" ({len(tasks)} of {len(calibration.tasks)})"
    right.set_title(f"Per task{shown}", fontsize=11)
    right.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2 if len(tasks) > 4 else 1,
                 frameon=False)
    right.grid(alpha=0.3)
    return fig
