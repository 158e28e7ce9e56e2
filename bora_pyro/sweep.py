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
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

__all__ = ["SweepConfig", "SweepResult", "SWEEP_CONFIGS", "run_sweep", "load_sweep", "tau_label"]

_INF = math.inf
_STATE = "sweep.json"


@dataclass(frozen=True)
class SweepConfig:
    """What a sweep fits: data, model shape, training length and the tau grid.

    Attributes
    ----------
    name
        Shown in the outputs.
    characters
        Shakespeare characters (tasks) to use when `run_sweep` reads the built-in data. With
        your own data every task is used, unless ``characters=`` is passed to `run_sweep`.
    taus
        Precisions to fit: numbers (``0`` and ``inf`` included for the limits) and/or
        ``"learn"``.
    rank, alpha, target_modules, max_length, test_size, validation_size
        LoRA shape and data split (as in `bora_pyro.fit_map`).
    batch_size, lr, max_steps, epochs, eval_every, patience, max_eval_docs_per_task
        Training of each fit (`bora_pyro.fit_map`); early stopping on the validation split.
    eval_docs_per_task
        Test documents per task to evaluate on (``None``: the whole test split).
    precision_groups
        For the learned tau (``"ab"``: one for the A matrices, one for the B matrices).
    parameterization
        What MAP's optimiser moves: ``"offset"`` (the global adapter and each task's offset from
        it; default) or ``"centered"`` (the task adapters); see `bora_pyro.inference.map.PointGuide`.
    seed
        Seeds the split, the initialisation and the batch order, identical for every fit.
    """

    name: str
    characters: tuple[str, ...] | None = None
    taus: tuple[Any, ...] = (0.0, 1e2, 1e3, 1e4, 1e5, 1e6, _INF, "learn")
    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] | None = ("q_proj", "v_proj")
    max_length: int = 256
    test_size: float = 0.33
    validation_size: float = 0.1
    batch_size: int = 8
    lr: float = 2e-3
    max_steps: int | None = None
    epochs: float | None = 3.0
    eval_every: int | None = None
    patience: int | None = 3
    max_eval_docs_per_task: int | None = None
    eval_docs_per_task: int | None = None
    precision_groups: str = "ab"
    parameterization: str = "offset"
    seed: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["taus"] = [tau_label(t) for t in self.taus]
        return d


def _paper_config() -> SweepConfig:
    from .data.shakespeare import REPRO_CHARACTERS

    return SweepConfig(
        name="paper",
        characters=tuple(REPRO_CHARACTERS),
        rank=16, alpha=16.0, max_length=256, test_size=0.33, batch_size=8, lr=1e-3,
        epochs=5.0, patience=3, max_eval_docs_per_task=None, eval_docs_per_task=None,
    )


def _cpu_config() -> SweepConfig:
    from .data.shakespeare import DEFAULT_CHARACTERS

    # Two characters per play (the lead and a small part): 12 tasks with 8 to 205 training speeches.
    chosen = (
        "HAMLET (Hamlet)", "OSRIC (Hamlet)", "IAGO (Othello)", "BIANCA (Othello)",
        "BRUTUS (Julius Caesar)", "PORTIA (Julius Caesar)", "KING LEAR (King Lear)",
        "CORDELIA (King Lear)", "ROMEO (Romeo and Juliet)", "TYBALT (Romeo and Juliet)",
        "MACBETH (Macbeth)", "DUNCAN (Macbeth)",
    )
    assert set(chosen) <= set(DEFAULT_CHARACTERS)
    return SweepConfig(
        name="cpu",
        characters=chosen,
        taus=(0.0, 1e2, 1e3, 1e4, 1e5, _INF, "learn"),
        rank=8, alpha=16.0, max_length=96, batch_size=8, lr=2e-3,
        max_steps=100, epochs=None, eval_every=25, patience=None,
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
            raise ValueError(f"The sweep has no {'finite ' if finite else ''}fixed-tau fit to choose from.")
        return str(fixed.loc[fixed[col].idxmin(), "tau"])

    def best_finite(self) -> str:
        """`best` among the finite taus when the sweep has any, else among all fixed taus."""
        has_finite = any(t not in ("0", "inf", "learn") for t in self.fitted)
        return self.best(finite=has_finite)

    def improvement(self, best: str | None = None) -> pd.DataFrame:
        """Per task: relative improvement (%) of a tau over ``tau=0`` and over ``tau=inf``.

        ``100 * (ppl_ref - ppl_best) / ppl_ref``; positive when ``best`` is better. Default
        ``best``: the best finite tau on validation (`best_finite`).
        """
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

    def overall_markdown(self) -> str:
        """The overall table (like the paper's Table 1) as Markdown."""
        best_val, best_test = self.best("validation"), self.best("test")
        lines = [
            "| tau | test perplexity | validation perplexity | learned tau | steps (best) | fit seconds |",
            "|---|---|---|---|---|---|",
        ]
        for _, r in self.overall.iterrows():
            name = {"0": "0 (independent)", "inf": "inf (pooled)", "base": "base model (no adapter)"}.get(r["tau"], r["tau"])
            marks = (" (best on validation)" if r["tau"] == best_val else "") + (
                " (best on test)" if r["tau"] == best_test else "")
            steps = "" if r["tau"] == "base" else f"{int(r['steps'])} ({int(r['best_step']) + 1})"
            secs = "" if r["tau"] == "base" else f"{r['seconds']:.0f}"
            lines.append(
                f"| {name}{marks} | {r['test_perplexity']:.2f} | {r['validation_perplexity']:.2f} | "
                f"{'' if pd.isna(r['learned_tau']) else r['learned_tau']} | {steps} | {secs} |"
            )
        return "\n".join(lines)

    def per_task_markdown(self) -> str:
        """Per-task test perplexity per tau (like the paper's appendix table) as Markdown; the
        best value of each row in bold."""
        cols = ["base"] + self.fitted
        lines = ["| task | train docs | " + " | ".join(f"tau={c}" if c != "base" else "base" for c in cols) + " |",
                 "|---|---|" + "---|" * len(cols)]
        for task, r in self.per_task.iterrows():
            best = min(self.fitted, key=lambda c: r[c])
            cells = [f"**{r[c]:.2f}**" if c == best else f"{r[c]:.2f}" for c in cols]
            lines.append(f"| {task} | {int(r['n_train'])} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

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
        figures = {
            "precision_vs_perplexity.png": self.plot_precision(),
            "improvement_vs_size.png": self.plot_improvement(),
            "distance_vs_size.png": self.plot_distance(),
        }
        for name, fig in figures.items():
            fig.savefig(out / "figures" / name, dpi=110)
        (out / "summary.md").write_text(self.summary() + "\n")
        return out

    def summary(self) -> str:
        """A short Markdown account: the best tau, its wins against the limits, the set-up."""
        best, finite = self.best(), self.best_finite()
        ov = self.overall.set_index("tau")["test_perplexity"]
        wins = self.wins(finite)
        n = len(self.per_task)
        parts = [
            f"# BoRA precision sweep: {self.config.name}",
            "",
            f"Best fixed tau on validation: **{best}** (test perplexity {ov[best]:.2f}); "
            f"best on test: {self.best('test')} ({ov[self.best('test')]:.2f}). "
            f"Best finite tau on validation: {finite} ({ov[finite]:.2f}).",
        ]
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


def run_sweep(
    data: Any = None,
    *,
    config: str | SweepConfig = "cpu",
    out: str | os.PathLike,
    model: Any = "smollm2-135m",
    tokenizer: Any = None,
    device: str | torch.device = "auto",
    autocast: str | None = None,
    progress: bool = True,
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
        Folder for everything. If it holds a sweep with the same configuration, finished fits are
        read back, an interrupted fit resumes from its checkpoint, and only the rest is fitted.
        A sweep with another configuration there is a ``ValueError``.
    model, tokenizer, device, autocast
        The base model (loaded once for all fits) and where to run.
    progress
        Progress bars.
    **overrides
        Replace fields of the configuration, e.g. ``taus=(0, 1e3, float("inf"))``,
        ``max_steps=20``.

    Returns
    -------
    `SweepResult`, also written to ``out`` (`SweepResult.write`).
    """
    from . import fit_map
    from .data import build_corpus, load_shakespeare
    from .models.base import load_base_model, resolve_device
    from .result import load_result

    if isinstance(config, str):
        if config not in SWEEP_CONFIGS:
            raise ValueError(f"config={config!r} is not a built-in sweep; choose one of {sorted(SWEEP_CONFIGS)} or pass a SweepConfig.")
        config = SWEEP_CONFIGS[config]()
    if overrides:
        unknown = set(overrides) - set(SweepConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"Unknown sweep settings {sorted(unknown)}; valid: {sorted(SweepConfig.__dataclass_fields__)}.")
        if "taus" in overrides:
            overrides["taus"] = tuple(overrides["taus"])
        config = replace(config, **overrides)
    labels = [tau_label(t) for t in config.taus]
    if len(set(labels)) != len(labels) or not labels:
        raise ValueError(f"taus={list(config.taus)} must be a non-empty list without repeats.")
    for t in config.taus:
        if not (t == "learn" or (isinstance(t, (int, float)) and not isinstance(t, bool) and t >= 0)):
            raise ValueError(f"tau {t!r} in taus is not valid: use numbers >= 0 (0, inf included) or 'learn'.")

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / _STATE
    settings = config.to_dict()
    settings.pop("taus")
    settings.pop("name")
    settings["model"] = model if isinstance(model, (str, os.PathLike)) else "<object>"
    settings = json.loads(json.dumps(settings, default=str))
    if state_path.exists():
        previous = json.loads(state_path.read_text())
        # settings added to SweepConfig after a sweep was written count as their defaults
        defaults = json.loads(json.dumps(SweepConfig(name="").to_dict(), default=str))
        old = {k: previous.get("settings", {}).get(k, defaults.get(k)) for k in settings}
        if old != settings:
            raise ValueError(
                f"{out} holds a sweep with other settings ({state_path}); use another folder or "
                "the same configuration to continue it."
            )
        state = previous
        state["settings"] = settings
    else:
        state = {"settings": settings, "fits": {}}
    state["config"] = config.to_dict()

    started = time.perf_counter()
    device = resolve_device(device)
    base, tokenizer, spec = load_base_model(model, tokenizer, device=device)
    # the config's characters pick tasks of the built-in data; your own data keeps all its
    # tasks unless characters= is passed explicitly
    tasks = list(config.characters) if config.characters and (data is None or "characters" in overrides) else None
    if data is None:
        if config.characters is None:
            raise ValueError("data=None needs a config with characters (Shakespeare tasks).")
        data = load_shakespeare(characters=config.characters)
    corpus = build_corpus(
        data, tokenizer, tasks=tasks,
        max_length=config.max_length, test_size=config.test_size,
        validation_size=config.validation_size, seed=config.seed,
    )
    fit_kwargs = dict(
        model=base, tokenizer=tokenizer, rank=config.rank, alpha=config.alpha,
        target_modules=list(config.target_modules) if config.target_modules else None,
        precision_groups=config.precision_groups, parameterization=config.parameterization,
        max_steps=config.max_steps, epochs=config.epochs,
        batch_size=config.batch_size, lr=config.lr, eval_every=config.eval_every,
        patience=config.patience, max_eval_docs_per_task=config.max_eval_docs_per_task,
        device=device, autocast=autocast, seed=config.seed, progress=progress,
    )
    eval_kwargs = dict(max_docs_per_task=config.eval_docs_per_task, seed=config.seed, progress=progress)
    val_kwargs = dict(max_docs_per_task=config.eval_docs_per_task or config.max_eval_docs_per_task,
                      seed=config.seed, progress=progress)

    def save_state() -> None:
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
                corpus, tau=_parse_label(label), checkpoint_dir=ckpt_dir, resume=resume, **fit_kwargs
            )
            seconds = time.perf_counter() - t0
            result.model_spec = spec
            test = result.evaluate("test", **eval_kwargs)
            val = result.evaluate("validation", **val_kwargs)
            result.save(fit_dir)
            test.to_csv(fit_dir / "test.csv", index=False)
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
            shutil.rmtree(ckpt_dir, ignore_errors=True)
            tables[label] = test
        distances[label] = _relative_distances(result.task_adapters, result.global_adapter)

    if "base" not in state or not (out / "base_test.csv").exists():
        base_test = result.evaluate("test", adapters="base", **eval_kwargs)
        base_val = result.evaluate("validation", adapters="base", **val_kwargs)
        base_test.to_csv(out / "base_test.csv", index=False)
        state["base"] = {"test_perplexity": float(base_test.attrs["overall_perplexity"]),
                         "validation_perplexity": float(base_val.attrs["overall_perplexity"])}
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
    sweep.write(out)
    return sweep


def load_sweep(out: str | os.PathLike) -> SweepResult:
    """Read back a finished sweep's tables from its folder (no model needed)."""
    out = Path(out)
    if not (out / _STATE).exists() or not (out / "overall.csv").exists():
        raise FileNotFoundError(f"{out} holds no finished sweep (no {_STATE} / overall.csv); run run_sweep first.")
    state = json.loads((out / _STATE).read_text())
    cfg = dict(state["config"])
    cfg["taus"] = tuple(_parse_label(t) for t in cfg["taus"])
    for key in ("characters", "target_modules"):
        if cfg.get(key) is not None:
            cfg[key] = tuple(cfg[key])
    overall = pd.read_csv(out / "overall.csv", dtype={"tau": str}, keep_default_na=False)
    for col in ("test_perplexity", "validation_perplexity", "steps", "best_step", "seconds"):
        overall[col] = pd.to_numeric(overall[col])
    overall["learned_tau"] = overall["learned_tau"].replace("", None)
    return SweepResult(
        config=SweepConfig(**cfg),
        per_task=pd.read_csv(out / "per_task.csv", index_col="task"),
        overall=overall,
        distances=pd.read_csv(out / "distances.csv", index_col="task"),
        info=state.get("info", {}),
        out=out,
    )


def _relative_distances(task_adapters: torch.Tensor, global_adapter: torch.Tensor) -> np.ndarray:
    theta, theta_g = task_adapters.double(), global_adapter.double()
    norm = theta_g.norm()
    d = (theta - theta_g).norm(dim=1)
    return (d / norm if norm > 0 else d).numpy()


def _machine_info(device: torch.device) -> dict:
    import pyro
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
