"""The paper's experiment: BoRA over a grid of precisions, from independent to pooled adapters.

`run_sweep` fits one MAP model per precision on ONE fixed split (``tau = 0`` independent
adapters, a log grid of finite values, ``tau = inf`` one pooled adapter, and a learned tau),
evaluates each on the test split, and writes the tables and figures of Eide & Frigessi
(arXiv 2407.15857): overall test perplexity per tau (their Table 1), per-task perplexity per tau
(their appendix table), precision vs perplexity, the relative improvement of the best tau over
tau = 0 and tau = inf against training size, and the distance of each task adapter to the
global adapter against training size.

The base model is loaded and the data tokenised once; every fit reuses them. Each fit is saved
under ``out/fits/<label>/`` as soon as it is done (a `BoraResult` folder plus its evaluation),
and checkpointed while it runs, so a sweep that is stopped continues where it stopped when run
again with the same ``out`` folder.

Two configurations are built in (`SWEEP_CONFIGS`): ``"paper"``, which mirrors the paper's set-up
on Shakespeare (the first 25 characters with at least 100 speeches, 33% test, 256 tokens, rank
16, alpha 16, sized for a GPU), and ``"cpu"``, a smaller one that runs in under an hour on a
2-core CPU.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from . import checks
from .config import BoraConfig, DataConfig, TrainConfig, parse_tau, split_seed

if TYPE_CHECKING:  # numpy, pandas and torch are imported where used: `bora --help` stays fast
    import numpy as np
    import pandas as pd
    import torch

__all__ = ["SweepConfig", "SweepResult", "SWEEP_CONFIGS", "run_sweep", "load_sweep", "tau_label"]

_INF = math.inf
_STATE = "sweep.json"
#: The config objects a sweep holds, by field name of `SweepConfig`.
_PARTS = {"data": DataConfig, "model": BoraConfig, "train": TrainConfig}
#: Settings the sweep sets itself for every fit, with the reason shown when one is given.
_SET_BY_SWEEP = {
    "tau": "the sweep fits every value of taus=",
    "checkpoint_dir": "the sweep checkpoints each fit under out/checkpoints/",
    "resume": "the sweep resumes an interrupted fit from out/checkpoints/ by itself",
}
#: Where and how a sweep runs, not what it fits: not compared when a sweep folder is continued.
_RUNTIME = ("device", "progress", "checkpoint_every", "report_to", "report_dir", "run_name")


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass(frozen=True)
class SweepConfig:
    """What a sweep fits: the data, model and training settings of every fit, and the tau grid.

    Attributes
    ----------
    name
        Shown in the outputs.
    characters
        Shakespeare characters (tasks) to use when `run_sweep` reads the built-in data. With
        your own data every task is used (or ``data.tasks``), unless ``characters=`` is passed
        to `run_sweep`.
    taus
        Precisions to fit: numbers (``0`` and ``inf`` included for the limits) and/or
        ``"learn"``.
    eval_docs_per_task
        Test documents per task to evaluate on (``None``: the whole test split).
    data, model, train
        The `DataConfig`, `BoraConfig` and `TrainConfig` of every fit (as in
        `bora_pyro.fit_map`); ``model.tau`` is unused (each fit takes one of ``taus``), and the
        checkpoints of ``train`` are set by the sweep.
    """

    name: str = field(metadata=_help("shown in the outputs", cli=None))
    characters: tuple[str, ...] | None = field(
        default=None, metadata=_help("Shakespeare characters (tasks) of the built-in data", metavar="TASK"))
    taus: tuple[float | str, ...] = field(
        default=(0.0, 1e2, 1e3, 1e4, 1e5, 1e6, _INF, "learn"),
        metadata=_help("the grid of precisions, e.g. 0 1e2 1e3 1e4 inf learn", metavar="TAU"))
    eval_docs_per_task: int | None = field(
        default=None, metadata=_help("test documents per task to evaluate on (none: all)", cli="eval_docs"))
    data: DataConfig = field(default_factory=DataConfig)
    model: BoraConfig = field(default_factory=BoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise ValueError(f"name must be a string, got {self.name!r}.")
        if isinstance(self.characters, str):
            raise ValueError(f"characters must be a list of task names, got the string {self.characters!r}.")
        if self.characters is not None:
            object.__setattr__(self, "characters", tuple(self.characters))
        if isinstance(self.taus, (str, int, float)):
            raise ValueError(f"taus={self.taus!r} must be a list of precisions, e.g. (0, 1e3, float('inf'), 'learn').")
        taus = []
        for t in self.taus:
            try:
                parsed = parse_tau(t)
            except ValueError:
                parsed = None
            if parsed is None or isinstance(parsed, dict):
                raise ValueError(f"tau {t!r} in taus is not valid: use numbers >= 0 (0, inf included) or 'learn'.")
            taus.append(parsed)
        labels = [tau_label(t) for t in taus]
        if not labels or len(set(labels)) != len(labels):
            raise ValueError(f"taus={list(self.taus)} must be a non-empty list without repeats.")
        object.__setattr__(self, "taus", tuple(taus))
        object.__setattr__(self, "eval_docs_per_task", checks.optional_positive_int(
            "eval_docs_per_task", self.eval_docs_per_task, none_means="the whole test split"))
        for part, cls in _PARTS.items():
            if not isinstance(getattr(self, part), cls):
                raise ValueError(f"{part} must be a {cls.__name__}, got {type(getattr(self, part)).__name__}.")
        defaults = {"tau": BoraConfig().tau, "checkpoint_dir": None, "resume": None}
        for name, why in _SET_BY_SWEEP.items():
            value = getattr(self.model if name == "tau" else self.train, name)
            if value != defaults[name]:
                raise ValueError(f"{name}={value!r} cannot be set in a sweep: {why}.")

    @classmethod
    def setting_names(cls) -> dict[str, list[str]]:
        """The names `with_overrides` (and `run_sweep`'s keywords) accept, by owner."""
        own = [f.name for f in fields(cls) if f.name not in _PARTS]
        return {"sweep": own, **{part: [n for n in c.field_names() if n not in _SET_BY_SWEEP]
                                 for part, c in _PARTS.items()}}

    def with_overrides(self, **overrides: Any) -> SweepConfig:
        """A copy with fields replaced: the sweep's own (``taus``, ``characters``, ...) and any
        field of its `DataConfig`, `BoraConfig` or `TrainConfig` by name (``rank=4``,
        ``max_steps=20``)."""
        names = self.setting_names()
        owner = {n: part for part, ns in names.items() for n in ns}
        for key in overrides:
            if key in _SET_BY_SWEEP:
                raise ValueError(f"{key}= cannot be set in a sweep: {_SET_BY_SWEEP[key]}.")
        unknown = [k for k in overrides if k not in owner]
        if unknown:
            raise ValueError(
                f"Unknown sweep settings {unknown}{checks.did_you_mean(unknown[0], owner)} Valid: "
                + "; ".join(f"{part} {ns}" for part, ns in names.items()) + "."
            )
        split: dict[str, dict[str, Any]] = {part: {} for part in names}
        for key, value in overrides.items():
            split[owner[key]][key] = value
        parts = {part: replace(getattr(self, part), **split[part]) for part in _PARTS if split[part]}
        return replace(self, **split["sweep"], **parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: the sweep's own fields (taus as labels) and the three configs' dicts."""
        return {
            "name": self.name,
            "characters": None if self.characters is None else list(self.characters),
            "taus": [tau_label(t) for t in self.taus],
            "eval_docs_per_task": self.eval_docs_per_task,
            **{part: getattr(self, part).to_dict() for part in _PARTS},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SweepConfig:
        """Rebuild from `to_dict` output, or from the flat dict an earlier version wrote."""
        d = dict(d)
        taus = tuple(_parse_label(str(t)) for t in d.pop("taus"))
        if any(part in d for part in _PARTS):
            parts = {part: cls_.from_dict(d.pop(part)) for part, cls_ in _PARTS.items() if part in d}
            return cls(taus=taus, **parts, **d)
        top = {k: d.pop(k) for k in ("name", "characters", "eval_docs_per_task") if k in d}
        return cls(taus=taus, **top).with_overrides(**d)

    def fit_keywords(self) -> dict[str, Any]:
        """The model and training settings as flat `bora_pyro.fit_map` keywords: the fields of
        ``model`` and ``train`` that differ from their defaults (the data settings shape the
        corpus instead; ``tau`` and the checkpoints are what the sweep sets per fit)."""
        return {**_changed(self.model), **_changed(self.train)}

    def settings(self) -> dict[str, Any]:
        """Every setting that shapes the fits, as one flat JSON-able dict: what a sweep folder
        records and compares when it is continued (not the name, the grid, or where it runs)."""
        flat: dict[str, Any] = {"characters": self.to_dict()["characters"],
                                "eval_docs_per_task": self.eval_docs_per_task}
        for part in _PARTS:
            flat.update(getattr(self, part).to_dict())
        for name in ("version", *_SET_BY_SWEEP, *_RUNTIME):
            flat.pop(name)
        return json.loads(json.dumps(flat))


def _paper_config() -> SweepConfig:
    from .data.shakespeare import REPRO_CHARACTERS

    return SweepConfig(name="paper", characters=tuple(REPRO_CHARACTERS)).with_overrides(
        rank=16, alpha=16.0, target_modules=["q_proj", "v_proj"], max_length=256, test_size=0.33,
        batch_size=8, lr=1e-3, epochs=5.0, patience=3, max_eval_docs_per_task=None,
        eval_docs_per_task=None,
    )


def _cpu_config() -> SweepConfig:
    from .data.shakespeare import DEFAULT_CHARACTERS

    # Two characters per play (the lead and a small part): 12 tasks with 8 to 205 training speeches.
    # Every fit runs to early stopping on validation (three evaluations without improvement),
    # capped at 600 steps (about five epochs), so that the grid compares converged fits.
    chosen = (
        "HAMLET (Hamlet)", "OSRIC (Hamlet)", "IAGO (Othello)", "BIANCA (Othello)",
        "BRUTUS (Julius Caesar)", "PORTIA (Julius Caesar)", "KING LEAR (King Lear)",
        "CORDELIA (King Lear)", "ROMEO (Romeo and Juliet)", "TYBALT (Romeo and Juliet)",
        "MACBETH (Macbeth)", "DUNCAN (Macbeth)",
    )
    missing = sorted(set(chosen) - set(DEFAULT_CHARACTERS))
    if missing:
        raise ValueError(f"the cpu sweep's characters {missing} are not in DEFAULT_CHARACTERS.")
    return SweepConfig(
        name="cpu", characters=chosen, taus=(0.0, 1e2, 1e3, 1e4, 1e5, _INF, "learn"),
    ).with_overrides(  # rank: BoraConfig's default (8)
        alpha=16.0, target_modules=["q_proj", "v_proj"], max_length=96, batch_size=8,
        lr=2e-3, max_steps=600, epochs=None, eval_every=25, patience=3,
        max_eval_docs_per_task=4, eval_docs_per_task=12,
    )


#: The built-in configurations: ``"paper"`` (the paper's set-up, for a GPU) and ``"cpu"``.
SWEEP_CONFIGS = {"paper": _paper_config, "cpu": _cpu_config}


def tau_label(tau: Any) -> str:
    """File- and table-friendly name of a precision: ``"0"``, ``"100"``, ``"1e+04"``, ``"inf"``, ``"learn"``."""
    if isinstance(tau, str):
        return tau
    tau = float(tau)
    if tau == 0:
        return "0"
    if math.isinf(tau):
        return "inf"
    return f"{tau:g}"


def _parse_label(label: str) -> float | str:
    return label if label == "learn" else float(label)


@dataclass
class SweepResult:
    """The outcome of a sweep: per-task and overall test perplexities for every fitted tau.

    Attributes
    ----------
    config
        The `SweepConfig` that was run.
    per_task
        DataFrame indexed by task (richest first), one column per tau label with the test
        perplexity, plus ``n_train`` (training documents) and ``base`` (the base model).
    overall
        DataFrame, one row per fit (and ``base``): ``tau`` (label), ``test_perplexity``
        (token-weighted over all tasks), ``validation_perplexity``, ``learned_tau`` (for the
        learned fit), ``steps``, ``best_step``, ``seconds``.
    distances
        DataFrame indexed by task, one column per tau label: ``||theta_d - Theta|| / ||Theta||``.
    info
        Machine, library versions, data sizes and run time.
    out
        The folder the sweep was written to.
    """

    config: SweepConfig
    per_task: pd.DataFrame
    overall: pd.DataFrame
    distances: pd.DataFrame
    info: dict = field(default_factory=dict)
    out: Path | None = None

    @property
    def fitted(self) -> list[str]:
        """Labels of the fitted precisions, in grid order."""
        return [r for r in self.overall["tau"] if r != "base"]

    @property
    def fixed(self) -> list[str]:
        """Labels of the fixed-tau fits (0 and inf included), in grid order: what `best` chooses
        from. Empty for a sweep of the learned tau alone (``taus=["learn"]``)."""
        return [t for t in self.fitted if t != "learn"]

    def best(self, by: str = "validation", *, finite: bool = False) -> str:
        """Label of the fixed tau (0 and inf included) with the lowest overall perplexity.

        ``by="validation"`` (default) selects on the validation split, as a user would;
        ``by="test"`` selects on the test split, as the paper reports its best tau.
        ``finite=True`` chooses among the finite, positive values only (BoRA proper).
        """
        col = {"validation": "validation_perplexity", "test": "test_perplexity"}[by]
        excluded = ["base", "learn"] + (["0", "inf"] if finite else [])
        fixed = self.overall[~self.overall["tau"].isin(excluded)]
        if fixed.empty:
            raise ValueError(f"The sweep has no {'finite ' if finite else ''}fixed-tau fit to choose from "
                             f"(fitted: {self.fitted}); add fixed values to taus=, e.g. 0, 1e3, 1e4, inf.")
        return str(fixed.loc[fixed[col].idxmin(), "tau"])

    def best_finite(self) -> str:
        """`best` among the finite taus when the sweep has any, else among all fixed taus."""
        has_finite = any(t not in ("0", "inf") for t in self.fixed)
        return self.best(finite=has_finite)

    def improvement(self, best: str | None = None) -> pd.DataFrame:
        """Per task: relative improvement (%) of a tau over ``tau=0`` and over ``tau=inf``.

        ``100 * (ppl_ref - ppl_best) / ppl_ref``; positive when ``best`` is better. Default
        ``best``: the best finite tau on validation (`best_finite`).
        """
        import pandas as pd

        best = best or self.best_finite()
        df = pd.DataFrame({"n_train": self.per_task["n_train"]})
        for ref in ("0", "inf"):
            if ref in self.per_task:
                df[f"vs_tau={ref}"] = 100 * (self.per_task[ref] - self.per_task[best]) / self.per_task[ref]
        return df

    def wins(self, best: str | None = None) -> dict[str, int]:
        """How many tasks ``best`` (default: the best finite tau) beats tau=0 and tau=inf on (test perplexity)."""
        imp = self.improvement(best)
        return {c: int((imp[c] > 0).sum()) for c in imp.columns if c.startswith("vs_")}

    def compare(
        self,
        *,
        taus: Sequence[str] | None = None,
        model: Any = None,
        tokenizer: Any = None,
        device: str | None = None,
        method: str = "stacking",
        extra: dict[str, Any] | None = None,
        progress: bool = False,
    ) -> pd.DataFrame:
        """Rank the sweep's fits the arviz way: ``az.compare`` over their held-out log-likelihood.

        Each saved fit (``out/fits/<label>``) is loaded and scored on the sweep's test documents
        (the same subset as the tables: ``eval_docs_per_task`` per task, the split's seed),
        one forward pass over them per fit (`bora_pyro.reports.heldout_log_likelihood`). The
        sweep's fits are MAP fits, one point each, so ``az.loo`` (which needs posterior draws)
        does not apply; and since the test documents were held out of every fit, none is
        needed: each fit's elpd is the sum over test documents of ``log p(doc | theta_MAP)``,
        its standard errors and the weights come from the per-document values
        (`bora_pyro.reports.heldout_elpd`). The ranking is that of the overall test
        perplexity (``elpd = -nll``), with a standard error ``dse`` on each difference to the
        best fit, which the perplexity table lacks, and arviz's stacking weights.

        Parameters
        ----------
        taus
            Labels of the fits to compare (default: all fitted, `fitted`), at least two.
        model, tokenizer
            The sweep's base model (default: the one recorded in ``sweep.json``; a sweep fitted
            on a model object needs it again).
        device
            Default: the sweep's ``device`` setting.
        method
            ``az.compare``'s weights: ``"stacking"``, ``"BB-pseudo-BMA"`` or ``"pseudo-BMA"``.
        extra
            More fits to rank with them, ``{name: InferenceData}`` scored on the same test
            documents (e.g. ``to_inference_data(svi_result, max_docs_per_task=
            config.eval_docs_per_task, seed=split_seed(config.data, config.train))`` of an SVI fit of the same
            corpus and split); the documents are checked.
        progress
            Show progress bars.

        Returns
        -------
        arviz's comparison DataFrame indexed by ``tau=<label>`` (and the names in ``extra``),
        best first; ``elpd_loo`` holds the held-out elpd (see `bora_pyro.reports.compare_fits`).
        """
        from .models.base import load_base_model
        from .reports.arviz import compare_fits, heldout_log_likelihood
        from .result import load_result
        from .runtime import resolve_device

        if self.out is None:
            raise ValueError("This SweepResult has no folder (out=None): compare() reads the fits saved by run_sweep.")
        if taus is None:
            labels = list(self.fitted)
        else:
            try:
                labels = [tau_label(_parse_label(t) if isinstance(t, str) else t) for t in taus]
            except ValueError:
                labels = [str(t) for t in taus]
        missing = [lbl for lbl in labels if lbl not in self.fitted]
        if missing:
            raise ValueError(f"taus={list(taus)} names fits this sweep does not have ({missing}); fitted: {self.fitted}.")
        if model is None:
            recorded = json.loads((Path(self.out) / _STATE).read_text()).get("settings", {}).get("model")
            if recorded in (None, "<object>"):
                raise ValueError(f"The sweep in {self.out} was fitted on a model object: pass model= and tokenizer=.")
            model = recorded
        device = resolve_device(device or self.config.train.device)
        base, tokenizer, spec = load_base_model(model, tokenizer, device=device)
        fits: dict[str, Any] = {}
        for label in labels:
            result = load_result(Path(self.out) / "fits" / label.replace("+", ""), model=base, tokenizer=tokenizer,
                                 device=device)
            fits[f"tau={label}"] = heldout_log_likelihood(
                result, split="test", max_docs_per_task=self.config.eval_docs_per_task,
                seed=split_seed(self.config.data, self.config.train), progress=progress,
            )
        fits.update(extra or {})
        return compare_fits(fits, method=method)

    def overall_markdown(self) -> str:
        """The overall table (like the paper's Table 1) as Markdown."""
        import pandas as pd

        best_val, best_test = (self.best("validation"), self.best("test")) if self.fixed else (None, None)
        names = {"0": "0 (independent)", "inf": "inf (pooled)", "base": "base model (no adapter)"}
        rows = []
        for _, r in self.overall.iterrows():
            fitted = r["tau"] != "base"
            marks = (" (best on validation)" if r["tau"] == best_val else "") + (
                " (best on test)" if r["tau"] == best_test else "")
            rows.append({
                "tau": names.get(r["tau"], r["tau"]) + marks,
                "test perplexity": f"{r['test_perplexity']:.2f}",
                "validation perplexity": f"{r['validation_perplexity']:.2f}",
                "learned tau": "" if pd.isna(r["learned_tau"]) else r["learned_tau"],
                "steps (best)": f"{int(r['steps'])} ({int(r['best_step']) + 1})" if fitted else "",
                "fit seconds": f"{r['seconds']:.0f}" if fitted else "",
            })
        return _markdown(pd.DataFrame(rows), left=1)

    def per_task_markdown(self) -> str:
        """Per-task test perplexity per tau (like the paper's appendix table) as Markdown; the
        best value of each row in bold."""
        cols = ["base"] + self.fitted
        table = self.per_task[cols].copy().astype(object)
        for task, r in self.per_task.iterrows():
            best = min(self.fitted, key=lambda c: r[c])
            for c in cols:
                table.loc[task, c] = f"**{r[c]:.2f}**" if c == best else f"{r[c]:.2f}"
        table.columns = [c if c == "base" else f"tau={c}" for c in cols]
        table.insert(0, "train docs", self.per_task["n_train"].astype(int).astype(str))
        return _markdown(table.reset_index(), left=1)

    def plot_precision(self, ax=None):
        """Precision vs test perplexity: overall (thick) and each task (thin), 0 and inf at the ends."""
        from .reports.sweep import plot_precision_curve

        return plot_precision_curve(self, ax=ax)

    def plot_improvement(self, best: str | None = None, ax=None):
        """Relative improvement of the best tau over tau=0 and tau=inf against training size."""
        from .reports.sweep import plot_improvement

        return plot_improvement(self, best=best, ax=ax)

    def plot_distance(self, taus: Sequence[str] | None = None, ax=None):
        """Relative distance to the global adapter against training size, per fitted tau."""
        from .reports.sweep import plot_sweep_distance

        return plot_sweep_distance(self, taus=taus, ax=ax)

    def write(self, out: str | os.PathLike | None = None) -> Path:
        """Write ``overall.csv/.md``, ``per_task.csv/.md``, ``distances.csv``, ``summary.md`` and
        ``figures/*.png`` to ``out`` (default: the sweep's folder)."""
        out = Path(out or self.out)
        (out / "figures").mkdir(parents=True, exist_ok=True)
        self.overall.to_csv(out / "overall.csv", index=False)
        self.per_task.to_csv(out / "per_task.csv")
        self.distances.to_csv(out / "distances.csv")
        (out / "overall.md").write_text(self.overall_markdown() + "\n")
        (out / "per_task.md").write_text(self.per_task_markdown() + "\n")
        figures = {  # without a fixed tau there is no curve over tau and no best one to compare
            "precision_vs_perplexity.png": self.plot_precision,
            "improvement_vs_size.png": self.plot_improvement,
        } if self.fixed else {}
        figures["distance_vs_size.png"] = self.plot_distance
        figures = {name: plot() for name, plot in figures.items()}
        for name, fig in figures.items():
            fig.savefig(out / "figures" / name, dpi=110)
        (out / "summary.md").write_text(self.summary() + "\n")
        return out

    def summary(self) -> str:
        """A short Markdown account: the best tau, its wins against the limits, the set-up."""
        ov = self.overall.set_index("tau")["test_perplexity"]
        n = len(self.per_task)
        parts = [f"# BoRA precision sweep: {self.config.name}", ""]
        if self.fixed:
            best, finite = self.best(), self.best_finite()
            wins = self.wins(finite)
            parts.append(f"Best fixed tau on validation: **{best}** (test perplexity {ov[best]:.2f}); "
                         f"best on test: {self.best('test')} ({ov[self.best('test')]:.2f}). "
                         f"Best finite tau on validation: {finite} ({ov[finite]:.2f}).")
        else:
            wins = {}
            parts.append("No fixed tau was fitted, so there is no best one to compare with: "
                         "add fixed values to the grid for that.")
        for ref in ("0", "inf"):
            if ref in ov and f"vs_tau={ref}" in wins:
                parts.append(f"- vs tau={ref}: {ov[ref]:.2f} overall; tau={finite} better on "
                             f"{wins[f'vs_tau={ref}']} of {n} tasks.")
        if "learn" in ov:
            parts.append(f"- learned tau ({self.overall.set_index('tau').loc['learn', 'learned_tau']}): {ov['learn']:.2f}.")
        parts.append(f"- base model without adapters: {ov['base']:.2f}.")
        parts += ["", "## Overall", "", self.overall_markdown(), "", "## Per task (test perplexity)", "",
                  self.per_task_markdown(), "", "## Set-up", "", "```json",
                  json.dumps({"config": self.config.to_dict(), **self.info}, indent=2, default=str), "```"]
        return "\n".join(parts)


def _markdown(table: pd.DataFrame, *, left: int) -> str:
    """A table of formatted cells as Markdown (tabulate): the first ``left`` columns aligned
    left, the others right."""
    align = ["left"] * left + ["right"] * (table.shape[1] - left)
    return table.to_markdown(index=False, disable_numparse=True, colalign=align)


def _changed(config: Any) -> dict[str, Any]:
    """The fields of a config object that differ from their defaults, ``{name: value}``: what
    a fit needs to be told (the defaults live in `bora_pyro.config`)."""
    default = type(config)()
    return {f.name: getattr(config, f.name) for f in fields(config)
            if f.init and f.name != "version" and getattr(config, f.name) != getattr(default, f.name)}


def run_sweep(
    data: Any = None,
    *,
    config: str | SweepConfig = "cpu",
    out: str | os.PathLike,
    model: Any = "smollm2-135m",
    tokenizer: Any = None,
    **overrides: Any,
) -> SweepResult:
    """Fit BoRA (MAP) for every tau of a grid on one split; evaluate; write tables and figures.

    Parameters
    ----------
    data
        The data (anything `bora_pyro.fit_map` takes); ``None`` uses Shakespeare with the
        config's ``characters``.
    config
        ``"cpu"``, ``"paper"`` (see `SWEEP_CONFIGS`) or a `SweepConfig`.
    out
        Folder for everything. If it holds a sweep with the same settings
        (`SweepConfig.settings`), finished fits are read back, an interrupted fit resumes from
        its checkpoint, and only the rest is fitted. A sweep with other settings there is a
        ``ValueError``.
    model, tokenizer
        The base model (loaded once for all fits).
    **overrides
        Replace settings of the configuration (`SweepConfig.with_overrides`): its own
        (``taus=(0, 1e3, float("inf"))``, ``characters=``, ``eval_docs_per_task=``) or any
        field of its data, model or training config (``max_steps=20``, ``rank=4``,
        ``device="cpu"``, ``autocast="bf16"``, ``progress=False``). With ``report_to=`` (see
        `bora_pyro.tracking`) every fit is one tracked run, named
        ``<run_name or "sweep-" + config name>-tau=<label>``.

    Returns
    -------
    `SweepResult`, also written to ``out`` (`SweepResult.write`).
    """
    import numpy as np
    import pandas as pd

    from . import distributed
    from .data import build_corpus, load_shakespeare
    from .files import claim_files, own_folder
    from .inference import fit_map
    from .inference.checkpoint import remove_checkpoints
    from .models.base import load_base_model
    from .result import load_result
    from .runtime import resolve_device

    if isinstance(config, str):
        if config not in SWEEP_CONFIGS:
            raise ValueError(f"config={config!r} is not a built-in sweep; choose one of {sorted(SWEEP_CONFIGS)} or pass a SweepConfig.")
        config = SWEEP_CONFIGS[config]()
    elif not isinstance(config, SweepConfig):
        raise ValueError(f"config must be 'cpu', 'paper' or a SweepConfig, got {type(config).__name__}.")
    config = config.with_overrides(**overrides)
    labels = [tau_label(t) for t in config.taus]
    progress = config.train.progress

    # the sweep's folder grows in place (a stopped sweep continues): bora_pyro marks it and
    # refuses a folder of the user's, or one holding the data
    # under torchrun every rank fits and evaluates; rank 0 writes (and marks the folder first)
    distributed.init_from_env(resolve_device(config.train.device), config.train.distributed_timeout)
    main = distributed.is_main()
    with distributed.main_first():
        out = own_folder(out, "sweep", protect=[data] if isinstance(data, (str, os.PathLike)) else [])
    state_path = out / _STATE
    settings = config.settings()
    settings["model"] = model if isinstance(model, (str, os.PathLike)) else "<object>"
    settings = json.loads(json.dumps(settings, default=str))
    if state_path.exists():
        previous = json.loads(state_path.read_text())
        # settings that a sweep folder does not record (it was written by an earlier version)
        # were the defaults then
        defaults = SweepConfig(name="").settings()
        old = {k: previous.get("settings", {}).get(k, defaults.get(k)) for k in settings}
        if old != settings:
            changed = sorted(k for k in settings if old[k] != settings[k])
            raise ValueError(
                f"{out} holds a sweep with other settings ({state_path}: {changed} differ); use "
                "another folder or the same configuration to continue it."
            )
        state = previous
        state["settings"] = settings
    else:
        state = {"settings": settings, "fits": {}}
    state["config"] = config.to_dict()

    started = time.perf_counter()
    device = resolve_device(config.train.device)
    base, tokenizer, spec = load_base_model(model, tokenizer, device=device, quantize=config.train.quantize,
                                            device_map=config.train.device_map)
    # the tasks: data.tasks if set; else the config's characters pick tasks of the built-in
    # data, and of your own data only when characters= is passed explicitly
    tasks = config.data.tasks
    if tasks is None and config.characters and (data is None or "characters" in overrides):
        tasks = list(config.characters)
    if data is None:
        if config.characters is None:
            raise ValueError("data=None needs a config with characters (Shakespeare tasks).")
        data = load_shakespeare(characters=config.characters)
    data_settings = {k: v for k, v in config.data.to_dict().items() if k != "tasks"}
    corpus = build_corpus(data, tokenizer, tasks=tasks, seed=config.train.seed, **data_settings)
    # model and training settings as flat keywords (the data settings shaped the corpus)
    fit_kwargs = {**config.fit_keywords(), "model": base, "tokenizer": tokenizer, "device": device}
    # one tracked run per fit (with report_to): "<run_name or sweep-<name>>-tau=<label>"
    run_prefix = config.train.run_name or f"sweep-{config.name}"
    subsets = split_seed(config.data, config.train)  # the split's seed also picks the evaluated subsets
    eval_kwargs = dict(max_docs_per_task=config.eval_docs_per_task, seed=subsets, progress=progress)
    val_kwargs = dict(max_docs_per_task=config.eval_docs_per_task or config.train.max_eval_docs_per_task,
                      seed=subsets, progress=progress)

    def save_state() -> None:
        if not main:
            return
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True, default=str))
        os.replace(tmp, state_path)

    save_state()
    tables: dict[str, pd.DataFrame] = {}
    distances: dict[str, np.ndarray] = {}
    result = None
    for i, label in enumerate(labels):
        fit_dir = out / "fits" / label.replace("+", "")
        ckpt_dir = out / "checkpoints" / label.replace("+", "")
        done = state["fits"].get(label)
        if done is not None and (fit_dir / "test.csv").exists():
            result = load_result(fit_dir, model=base, tokenizer=tokenizer, device=device)
            tables[label] = pd.read_csv(fit_dir / "test.csv")
            if progress:
                print(f"[{i + 1}/{len(labels)}] tau={label}: done before, read back from {fit_dir}")
        else:
            if progress:
                print(f"[{i + 1}/{len(labels)}] fitting tau={label}")
            t0 = time.perf_counter()
            resume = ckpt_dir if any(ckpt_dir.glob("step-*")) else None
            result = fit_map(
                corpus, tau=_parse_label(label), checkpoint_dir=ckpt_dir, resume=resume,
                **{**fit_kwargs, "run_name": f"{run_prefix}-tau={label}"},
            )
            seconds = time.perf_counter() - t0
            result.model_spec = spec
            test = result.evaluate("test", **eval_kwargs)
            val = result.evaluate("validation", **val_kwargs)
            if main:
                result.save(fit_dir, overwrite=True)  # a fit of this sweep killed before its state was saved
                test.to_csv(fit_dir / "test.csv", index=False)
                claim_files(fit_dir, ["test.csv"])
            done = {
                "test_perplexity": float(test.attrs["overall_perplexity"]),
                "validation_perplexity": float(val.attrs["overall_perplexity"]),
                "learned_tau": ({k: float(v) for k, v in result.tau.items()} if label == "learn" else None),
                "steps": len(result.history["step"]),
                "best_step": int(result.fit_args["best_step"]),
                "seconds": seconds,
            }
            state["fits"][label] = done
            save_state()
            if main:
                remove_checkpoints(ckpt_dir)
            tables[label] = test
        distances[label] = _relative_distances(result.task_adapters, result.global_adapter)

    if "base" not in state or not (out / "base_test.csv").exists():
        base_test = result.evaluate("test", adapters="base", **eval_kwargs)
        base_val = result.evaluate("validation", adapters="base", **val_kwargs)
        if main:
            base_test.to_csv(out / "base_test.csv", index=False)
        state["base"] = {"test_perplexity": float(base_test.attrs["overall_perplexity"]),
                         "validation_perplexity": float(base_val.attrs["overall_perplexity"])}
    distributed.barrier()  # rank 0 has written base_test.csv
    base_test = pd.read_csv(out / "base_test.csv")

    n_train = corpus.split("train").docs_per_task
    tasks = list(corpus.tasks)
    per_task = pd.DataFrame({"n_train": n_train}, index=pd.Index(tasks, name="task"))
    per_task["base"] = base_test.set_index("task").loc[tasks, "perplexity"].to_numpy()
    for label in labels:
        per_task[label] = tables[label].set_index("task").loc[tasks, "perplexity"].to_numpy()
    per_task = per_task.sort_values("n_train", ascending=False, kind="stable")
    rows = [{"tau": "base", **state["base"], "learned_tau": None, "steps": 0, "best_step": -1, "seconds": 0.0}]
    for label in labels:
        d = dict(state["fits"][label])
        lt = d.pop("learned_tau")
        rows.append({"tau": label, **d, "learned_tau": None if lt is None else
                     ", ".join(f"{k}={v:.4g}" for k, v in lt.items())})
    overall = pd.DataFrame(rows)
    dist = pd.DataFrame(distances, index=pd.Index(tasks, name="task")).loc[per_task.index]

    total = sum(state["fits"][lbl]["seconds"] for lbl in labels)
    state["info"] = info = {
        **_machine_info(device),
        "tasks": len(tasks),
        "train_docs": int(n_train.sum()),
        "test_docs_evaluated": int(base_test.loc[base_test["task"] != "overall", "n_docs"].sum()),
        "test_tokens_evaluated": int(base_test.loc[base_test["task"] != "overall", "n_tokens"].sum()),
        "fit_seconds_total": round(total, 1),
        "this_call_seconds": round(time.perf_counter() - started, 1),
    }
    save_state()
    sweep = SweepResult(config=config, per_task=per_task, overall=overall, distances=dist, info=info, out=out)
    if main:
        sweep.write(out)
    return sweep


def load_sweep(out: str | os.PathLike) -> SweepResult:
    """Read back a finished sweep's tables from its folder (no model needed)."""
    import pandas as pd

    out = Path(out)
    if not (out / _STATE).exists() or not (out / "overall.csv").exists():
        raise FileNotFoundError(f"{out} holds no finished sweep (no {_STATE} / overall.csv); run run_sweep first.")
    state = json.loads((out / _STATE).read_text())
    overall = pd.read_csv(out / "overall.csv", dtype={"tau": str}, keep_default_na=False)
    for col in ("test_perplexity", "validation_perplexity", "steps", "best_step", "seconds"):
        overall[col] = pd.to_numeric(overall[col])
    overall["learned_tau"] = overall["learned_tau"].replace("", None)
    return SweepResult(
        config=SweepConfig.from_dict(state["config"]),
        per_task=pd.read_csv(out / "per_task.csv", index_col="task"),
        overall=overall,
        distances=pd.read_csv(out / "distances.csv", index_col="task"),
        info=state.get("info", {}),
        out=out,
    )


def _relative_distances(task_adapters: torch.Tensor, global_adapter: torch.Tensor) -> np.ndarray:
    """Per task ``||theta_d - Theta|| / ||Theta||`` (the plain distance when ``Theta = 0``), shape [D]."""
    theta, theta_g = task_adapters.double(), global_adapter.double()
    norm = theta_g.norm()
    d = (theta - theta_g).norm(dim=1)
    return (d / norm if norm > 0 else d).numpy()


def _machine_info(device: torch.device) -> dict:
    import pyro
    import torch
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pyro": pyro.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
