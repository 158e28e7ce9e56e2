"""Figures of a precision sweep (`bora_pyro.sweep`): the paper's Figures 1-3 on your data.

Each function takes a `SweepResult` and returns a matplotlib ``Figure`` (built without pyplot);
pass ``ax=`` to draw into an existing axes.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from .plots import _BORA, _COLORS, _WIDTH, _legend, _new_axes

__all__ = ["plot_precision_curve", "plot_improvement", "plot_sweep_distance", "precision_positions"]


def precision_positions(labels: Sequence[str]) -> dict[str, float]:
    """x position (log10 tau) of each fixed-tau label; ``0`` one decade left of the smallest
    finite value and ``inf`` one decade right of the largest, so the limits sit at the ends."""
    finite = [math.log10(float(t)) for t in labels if t not in ("0", "inf", "learn")]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 0.0)
    pos = {}
    for t in labels:
        if t == "0":
            pos[t] = lo - 1.0
        elif t == "inf":
            pos[t] = hi + 1.0
        elif t != "learn":
            pos[t] = math.log10(float(t))
    return pos


def _tick_label(label: str) -> str:
    if label == "0":
        return "0\n(independent)"
    if label == "inf":
        return "∞\n(pooled)"
    exponent = math.log10(float(label))
    return f"$10^{{{exponent:g}}}$" if float(exponent).is_integer() else label


def plot_precision_curve(sweep: Any, *, ax=None):
    """Test perplexity against the prior precision tau: overall (thick), each task (thin, grey),
    tau = 0 and tau = inf at the ends, the learned tau as a dashed level. The paper's Figure 1:
    a U-shape means BoRA beats both independent and pooled adapters."""
    fixed = [t for t in sweep.fitted if t != "learn"]
    pos = precision_positions(fixed)
    xs = np.array([pos[t] for t in fixed])
    order = np.argsort(xs)
    xs, fixed = xs[order], [fixed[i] for i in order]
    owns = ax is None
    fig, ax = _new_axes(ax, (_WIDTH, 5.5))
    for task, row in sweep.per_task.iterrows():
        ax.plot(xs, [row[t] for t in fixed], color="0.6", lw=0.8, alpha=0.7, zorder=1)
    overall = sweep.overall.set_index("tau")["test_perplexity"]
    ax.plot(xs, [overall[t] for t in fixed], color=_BORA, lw=3, marker="o", zorder=3,
            label="overall (token-weighted)")
    ax.plot([], [], color="0.6", lw=0.8, label="each task")
    if "learn" in overall:
        learned = sweep.overall.set_index("tau").loc["learn", "learned_tau"]
        ax.axhline(overall["learn"], color=_COLORS[0], ls="--", lw=1.5, zorder=2,
                   label=f"learned tau ({learned}): {overall['learn']:.2f}")
    if "base" in overall:
        ax.axhline(overall["base"], color="0.3", ls=":", lw=1.2, zorder=2,
                   label=f"base model: {overall['base']:.2f}")
    best = sweep.best()
    ax.scatter([pos[best]], [overall[best]], s=160, facecolors="none", edgecolors="k", lw=1.5, zorder=4,
               label=f"best on validation: tau={best}")
    ax.set_xticks(xs, [_tick_label(t) for t in fixed])
    ax.set_xlabel(r"prior precision $\tau$ (log scale; 0 and $\infty$ placed at the ends)")
    ax.set_ylabel("test perplexity")
    ax.set_title(f"Test perplexity vs precision ({sweep.config.name} sweep, {len(sweep.per_task)} tasks)", fontsize=11)
    ax.grid(alpha=0.3, which="both", axis="y")
    _legend(fig, ax, owns, ncol=2)
    return fig


def plot_improvement(sweep: Any, *, best: str | None = None, ax=None):
    """Relative improvement (%) of the best finite tau (on validation; or ``best``) over tau = 0
    and over tau = inf, per task, against the task's training documents (log x). The paper's Figure 2: the gain over
    independent training is largest for small tasks, the gain over pooling for large ones."""
    best = best or sweep.best_finite()
    imp = sweep.improvement(best)
    owns = ax is None
    fig, ax = _new_axes(ax, (_WIDTH, 5.0))
    styles = {"vs_tau=0": (_COLORS[1], "o", "vs tau=0 (independent)"),
              "vs_tau=inf": (_COLORS[3], "s", "vs tau=inf (pooled)")}
    for col, (color, marker, name) in styles.items():
        if col in imp:
            ax.scatter(imp["n_train"], imp[col], color=color, marker=marker, s=40, label=name, zorder=3)
    ax.axhline(0, color="0.3", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("training documents of the task (log scale)")
    ax.set_ylabel(f"improvement of tau={best} (% of perplexity)")
    ax.set_title(f"Relative improvement of tau={best} (the best finite tau on validation) over the limits, per task",
                 fontsize=11)
    ax.grid(alpha=0.3)
    _legend(fig, ax, owns, ncol=2)
    return fig


def plot_sweep_distance(sweep: Any, *, taus: Sequence[str] | None = None, ax=None):
    """``||theta_d - Theta|| / ||Theta||`` against training documents for each fitted tau
    (default: the finite ones and the learned one). The paper's Figure 3: with a useful tau the
    rich tasks move away from the global adapter and the thin ones stay near it."""
    taus = list(taus) if taus is not None else [t for t in sweep.fitted if t not in ("0", "inf")]
    missing = [t for t in taus if t not in sweep.distances]
    if missing:
        raise ValueError(f"taus {missing} were not fitted in this sweep; fitted: {sweep.fitted}.")
    owns = ax is None
    fig, ax = _new_axes(ax, (_WIDTH, 5.0))
    n = sweep.per_task["n_train"].loc[sweep.distances.index].to_numpy()
    order = np.argsort(n, kind="stable")
    best = sweep.best_finite() if sweep.fixed else None  # a sweep of the learned tau alone has none
    for i, t in enumerate(taus):
        y = sweep.distances[t].to_numpy()
        emphasis = t == best
        ax.plot(n[order], y[order], marker="o", ms=5 if emphasis else 3,
                lw=2.2 if emphasis else 1, color=_BORA if emphasis else _COLORS[i % len(_COLORS)],
                alpha=1 if emphasis else 0.75, label=f"tau={t}" + (" (best)" if emphasis else ""))
    ax.set_xscale("log")
    if taus:
        ax.set_yscale("log")
    ax.set_xlabel("training documents of the task (log scale)")
    ax.set_ylabel(r"$\|\theta_d - \Theta\| / \|\Theta\|$ (log scale)")
    ax.set_title("Distance of each task adapter to the global adapter vs training size", fontsize=11)
    ax.grid(alpha=0.3, which="both")
    if not taus:
        ax.text(0.5, 0.5, "no finite tau fitted: every distance is 0 (pooled) or undefined (independent)",
                ha="center", va="center", transform=ax.transAxes)
    else:
        _legend(fig, ax, owns, ncol=min(4, len(taus)))
    return fig
