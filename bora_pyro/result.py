"""`BoraResult`: a fitted BoRA model, to evaluate, save and load (safetensors + JSON, no pickle)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import checks
from .checks import non_negative_int
from .config import BoraConfig
from .evaluation import (
    evaluation_options,
    evaluation_split,
    per_doc_nll,
    per_doc_nll_draws,
    per_task_nll,
    perplexity_table,
    predictive_table,
    select_adapters,
)
from .files import dumps_json, find_folder, replace_folder, restore_floats

__all__ = ["BoraResult", "load_result", "AS_FITTED"]

#: `load_result`'s ``quantize`` default: load the base model quantised as the fit did.
AS_FITTED = "as_fitted"

_FORMAT = "bora_pyro.result"
_FORMAT_VERSION = 1
_ADAPTERS = "adapters.safetensors"
_CONFIG = "config.json"
_HISTORY = "history.json"
_CORPUS = "corpus.safetensors"
_CORPUS_META = "corpus.json"


@dataclass
class BoraResult:
    """A fitted BoRA model.

    Attributes
    ----------
    tasks
        Task names; position = task id = row of `task_adapters`.
    task_adapters
        ``[D, P]`` fp32, one flat LoRA adapter per task (layout in ``lm.layout``).
    global_adapter
        ``[P]`` the global adapter Theta.
    tau
        ``{group: precision}``; ``0.0`` / ``inf`` in the independent / pooled limits.
    config
        The `BoraConfig` of the model.
    history
        The optimisation history (see `bora_pyro.inference.FitState.history`).
    lm
        The `MultiTaskLM` (frozen base model with the multi-task LoRA layers).
    tokenizer
        The base model's tokenizer.
    corpus
        The `TaskCorpus` the model was fitted on (its splits are what `evaluate` reads).
    model_spec
        How to load the base model again (``"smollm2-135m"``, a path or hub id; ``"<object>"``
        when a model object was given, then `load_result` needs ``model=``).
    method
        ``"map"`` or ``"svi"``.
    fit_args
        The training arguments, for the record.
    task_scales
        ``[D, P]`` posterior standard deviations of the task adapters (SVI; ``None`` for MAP,
        whose adapters are points). With SVI, ``task_adapters`` are the posterior means.
    """

    tasks: list[str]
    task_adapters: torch.Tensor
    global_adapter: torch.Tensor
    tau: dict[str, float]
    config: BoraConfig
    history: dict[str, list]
    lm: Any
    tokenizer: Any
    corpus: Any
    model_spec: str
    method: str = "map"
    fit_args: dict[str, Any] = field(default_factory=dict)
    task_scales: torch.Tensor | None = None

    def __repr__(self) -> str:
        taus = ", ".join(f"{k}={v:.4g}" for k, v in self.tau.items())
        return (
            f"BoraResult(method={self.method!r}, tasks={len(self.tasks)}, P={self.task_adapters.shape[1]:,}, "
            f"tau: {taus}, model={self.model_spec!r})"
        )

    @property
    def device(self) -> torch.device:
        return self.lm.device

    def adapter(self, task: str) -> torch.Tensor:
        """The ``[P]`` adapter of one task, by name (the posterior mean under SVI)."""
        return self.task_adapters[self.corpus.task_index(task)]

    def _require_posterior(self, what: str) -> torch.Tensor:
        if self.task_scales is None:
            raise ValueError(
                f"{what} needs a posterior, but this is a {self.method.upper()} result (a point "
                "estimate); fit it with bora_pyro.fit_svi(..., init=<this result>)."
            )
        return self.task_scales

    def sample_adapters(self, num_samples: int, *, seed: int = 0) -> torch.Tensor:
        """``[num_samples, D, P]`` draws of the task adapters from the (mean-field) posterior."""
        scales = self._require_posterior("sample_adapters()")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}.")
        g = torch.Generator().manual_seed(seed)
        eps = torch.randn((num_samples, *self.task_adapters.shape), generator=g)
        return self.task_adapters + scales * eps

    def posterior_summary(self) -> pd.DataFrame:
        """Per task: training documents, distance of the adapter to the global one (absolute and
        relative to ``||Theta||``) and, under SVI, the mean posterior sd of its entries."""
        theta, theta_g = self.task_adapters, self.global_adapter
        distance = (theta - theta_g).norm(dim=1)
        df = pd.DataFrame({
            "task": self.tasks,
            "n_train": self.corpus.split("train").docs_per_task,
            "distance": distance.numpy(),
            "relative_distance": (distance / theta_g.norm().clamp_min(1e-30)).numpy(),
        })
        if self.task_scales is not None:
            df["mean_sd"] = self.task_scales.mean(dim=1).numpy()
        return df

    def evaluate(
        self,
        split: str = "test",
        *,
        adapters: str = "tasks",
        batch_size: int | None = None,
        max_docs_per_task: int | None = None,
        num_samples: int | None = None,
        seed: int = 0,
        progress: bool = False,
    ) -> pd.DataFrame:
        """Per-task perplexity on a split of the corpus.

        Parameters
        ----------
        split
            ``"test"``, ``"validation"`` or ``"train"``.
        adapters
            ``"tasks"`` (each task's own adapter), ``"global"`` (the global adapter for every
            task) or ``"base"`` (no adapter: the base model).
        batch_size
            Evaluation batch size (default: the training batch size, times 2).
        max_docs_per_task
            Evaluate on a seeded subset of at most this many documents per task.
        num_samples
            SVI only: posterior draws for the posterior-predictive perplexity (default 8 for an
            SVI result with ``adapters="tasks"``; 0 evaluates at the posterior mean only). Draw
            ``s`` is ``self.sample_adapters(1, seed=seed + s)``, the draw ``s`` of
            `to_inference_data`; each costs one pass over the split.
        seed
            Seeds the subset and the posterior draws.

        Returns
        -------
        DataFrame with columns ``task``, ``n_docs``, ``n_tokens``, ``nll`` (per token, nats),
        ``perplexity``; one row per task and a last row ``overall`` (token-weighted, also in
        ``df.attrs["overall_perplexity"]``). With posterior draws, ``nll`` and ``perplexity`` are
        posterior-predictive (per document ``-log mean_s p(doc | theta_s)``) and the columns
        ``perplexity_at_mean``, ``perplexity_low`` and ``perplexity_high`` (central 95% of the
        task's perplexity over the draws) are added.

        Raises
        ------
        ValueError
            For a split without documents (e.g. ``"test"`` of a corpus built with
            ``test_size=0``), an unknown ``adapters``, or a ``batch_size``, ``max_docs_per_task``
            or ``num_samples`` that is not a positive (for ``num_samples``: non-negative) integer.
        """
        theta = select_adapters(self, adapters)
        data = evaluation_split(self.corpus, split, max_docs_per_task=max_docs_per_task, seed=seed)
        kwargs = evaluation_options(self, batch_size)
        if num_samples is None:
            num_samples = 8 if (self.task_scales is not None and adapters == "tasks") else 0
        num_samples = non_negative_int("num_samples", num_samples)
        if num_samples and (adapters != "tasks" or self.task_scales is None):
            raise ValueError(
                f"num_samples={num_samples} needs an SVI result and adapters='tasks' (this is a "
                f"{self.method.upper()} result, adapters={adapters!r}); use num_samples=0."
            )
        if not num_samples:
            nll, tokens, docs = per_task_nll(
                self.lm, theta, data, num_tasks=len(self.tasks), progress=progress, **kwargs
            )
            return perplexity_table(self.tasks, nll, tokens, docs)
        mean_nll, tokens = per_doc_nll(self.lm, self.task_adapters, data, progress=progress, **kwargs)
        draws = (self.sample_adapters(1, seed=seed + s)[0] for s in range(num_samples))
        draws_nll = per_doc_nll_draws(self.lm, draws, data, progress=progress, **kwargs)
        return predictive_table(self.tasks, draws_nll, tokens, data.task_ids.cpu(), mean_nll=mean_nll)

    def history_frame(self) -> pd.DataFrame:
        """The training history as a DataFrame (one row per step; tau per group as columns)."""
        h = dict(self.history)
        h.pop("tau_update", None)  # one entry per evidence update, not per step
        taus = h.pop("tau", [])
        df = pd.DataFrame(h)
        if taus:
            for i, g in enumerate(self.tau):
                df[f"tau_{g}"] = [t[i] for t in taus]
        return df

    # -- using the adapters ----------------------------------------------------------------------

    def export_peft(self, directory: str | os.PathLike, **kwargs: Any) -> dict[str, Path]:
        """Write each task's adapter (and the global one) as a PEFT LoRA folder.

        See `bora_pyro.export.export_peft` (keywords ``tasks``, ``include_global``,
        ``base_model_name_or_path``, ``overwrite``). Returns ``{task name: folder}``, ``"<global>"`` included.
        """
        from .export import export_peft

        return export_peft(self, directory, **kwargs)

    def logits(
        self,
        input_ids: torch.Tensor,
        task: str | list[str],
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """``[N, L, V]`` logits of ``input_ids [N, L]`` with each row's task adapter.

        ``task`` is one name or one per row; ``"<global>"`` is the global adapter. See
        `bora_pyro.generation.task_logits` (keywords ``unseen``, ``seed``).
        """
        from .generation import task_logits

        return task_logits(self, input_ids, task, attention_mask, **kwargs)

    def generate(self, prompts: str | list[str] | list[dict] | list[list[dict]], task: str | list[str],
                 **kwargs: Any) -> list[str]:
        """Continue each prompt, or answer each conversation, with its task's adapter, all tasks in
        one batch.

        ``prompts``: one text or a list of texts; or one conversation (a list of ``{"role",
        "content"}`` turns) or a list of them, rendered with the tokenizer's chat template and its
        generation prompt, e.g. ``result.generate([[{"role": "user", "content": "Who's there?"}]],
        task=["HAMLET (Hamlet)"])``. See `bora_pyro.generation.generate` (``max_new_tokens``,
        ``unseen``, ``seed`` and Hugging Face generation keywords). Returns one continuation (or
        answer) per prompt.
        """
        from .generation import generate

        return generate(self, prompts, task, **kwargs)

    # -- reports --------------------------------------------------------------------------------

    def to_inference_data(self, **kwargs: Any) -> Any:
        """This result as ``arviz.InferenceData`` (``task`` a named dimension): tau, per-task
        distance to the global adapter, shrinkage and held-out fit.

        See `bora_pyro.reports.to_inference_data` (keywords ``split``, ``num_samples``,
        ``predictive_samples``, ``max_docs_per_task``, ``fisher``, ``fisher_max_docs_per_task``,
        ``seed``).
        """
        from .reports.arviz import to_inference_data

        return to_inference_data(self, **kwargs)

    def report(self, path: str | os.PathLike, **kwargs: Any) -> Path:
        """Write the uncertainty report (self-contained HTML and a Markdown summary); returns the
        HTML path. See `bora_pyro.reports.write_report` (keywords ``baselines``, ``split``,
        ``max_docs_per_task``, ``n_bins``, ...)."""
        from .reports.html import write_report

        return write_report(self, path, **kwargs)

    # -- persistence ----------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, *, include_corpus: bool = True, overwrite: bool = False) -> Path:
        """Write the fitted state to a folder that bora_pyro owns (see `bora_pyro.files`).

        Files: ``adapters.safetensors`` (task and global adapters, tau, SVI posterior scales),
        ``config.json`` (model config, layout, tasks, base-model spec, fit arguments, library
        version, sorted keys), ``history.json`` and, with ``include_corpus``, the tokenised corpus
        (``corpus.safetensors`` + ``corpus.json``) so that `load_result` can evaluate on the same
        split without the original data; the JSON files are strict (non-finite numbers as the
        strings ``"NaN"``, ``"Infinity"``).

        Parameters
        ----------
        path
            The folder: missing or empty, or (with ``overwrite``) an earlier result. A folder
            holding other files is refused and left untouched.
        include_corpus
            Also write the tokenised corpus.
        overwrite
            Replace an earlier result at ``path``. The new result is written beside it and
            swapped in by renames, so that a process killed at any moment leaves the old or the
            new result whole (`load_result` finds either).

        Raises
        ------
        bora_pyro.files.FolderError
            When ``path`` holds files bora_pyro did not write, or an earlier result and
            ``overwrite`` is false.
        """
        with replace_folder(path, "result", overwrite=overwrite) as tmp:
            group_names = list(self.tau)
            save_file(
                {
                    "task_adapters": self.task_adapters.detach().float().contiguous().cpu(),
                    "global_adapter": self.global_adapter.detach().float().contiguous().cpu(),
                    "tau": torch.tensor([self.tau[g] for g in group_names], dtype=torch.float64),
                    **({} if self.task_scales is None
                       else {"task_scales": self.task_scales.detach().float().contiguous().cpu()}),
                },
                tmp / _ADAPTERS,
            )
            meta = {
                "format": _FORMAT,
                "format_version": _FORMAT_VERSION,
                "method": self.method,
                "tasks": list(self.tasks),
                "tau_groups": group_names,
                "config": self.config.to_dict(),
                "layout": self.lm.layout.to_dict(),
                "model": self.model_spec,
                "fit_args": _jsonable(self.fit_args),
            }
            (tmp / _CONFIG).write_text(dumps_json(meta, indent=2, sort_keys=True), encoding="utf-8")
            (tmp / _HISTORY).write_text(dumps_json(_jsonable(self.history)), encoding="utf-8")
            if include_corpus:
                tensors, corpus_meta = self.corpus.state_dict()
                save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / _CORPUS)
                (tmp / _CORPUS_META).write_text(
                    dumps_json(corpus_meta, indent=2, sort_keys=True), encoding="utf-8"
                )
        return Path(path)


def load_result(
    path: str | os.PathLike,
    *,
    model: Any = None,
    tokenizer: Any = None,
    data: Any = None,
    device: str | torch.device = "auto",
    quantize: str | None = AS_FITTED,
) -> BoraResult:
    """Load a result written by `BoraResult.save`.

    Every file is checked against ``config.json`` before the base model is loaded: the tensors'
    names, shapes (``task_adapters`` and ``task_scales`` ``[D, P]`` with D the number of tasks and
    P the saved layout's size, ``global_adapter`` ``[P]``, one tau per precision group), floating
    dtypes and finite values; a damaged file is an error that names the file and the field.

    Parameters
    ----------
    path
        The folder. If a save over an earlier result was killed in the middle of its swap and the
        folder is missing, the earlier result kept beside it is read (`bora_pyro.files.find_folder`).
    model, tokenizer
        The base model, when it was given as an object at fit time (or to override the
        recorded spec); by default the recorded spec is loaded (`load_base_model`).
    data
        A `TaskCorpus` to attach when the result was saved without its corpus.
    device
        Where to put the model.
    quantize
        How to load the base model: `AS_FITTED` (default) quantises it as the fit did (its
        ``fit_args["quantize"]``, ``"4bit"`` or ``"8bit"`` by bitsandbytes, or not at all), so
        that evaluation and generation compute the model whose adapters were fitted; ``None``
        loads it unquantised (e.g. on a machine without bitsandbytes; the adapters were fitted
        against the quantised weights, so perplexities differ somewhat); ``"4bit"`` or
        ``"8bit"`` choose. Ignored when ``model`` is an object.

    Raises
    ------
    FileNotFoundError
        When ``path`` holds no ``config.json``.
    ValueError
        When a file is damaged or disagrees with ``config.json`` (the message names both).
    """
    from .data import TaskCorpus
    from .models.base import QUANTIZE_CHOICES, load_base_model
    from .models.lora import MultiTaskLM

    path = find_folder(path)
    if not (path / _CONFIG).is_file():
        raise FileNotFoundError(f"{path} holds no {_CONFIG}; is it a folder written by BoraResult.save()?")
    meta, config, saved_layout = _read_meta(path / _CONFIG)
    tensors = _read_adapters(path / _ADAPTERS, meta, config, saved_layout)
    history = _read_history(path / _HISTORY)
    if data is not None:
        corpus = data
    elif (path / _CORPUS).is_file():
        corpus_meta = _read_json(path / _CORPUS_META)
        corpus_tensors = _read_safetensors(path / _CORPUS)
        try:
            corpus = TaskCorpus.from_state_dict(corpus_tensors, corpus_meta)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"{path / _CORPUS_META} and {path / _CORPUS} do not hold a TaskCorpus ({err}); the "
                "files are damaged: save the result again, or pass data=<TaskCorpus>."
            ) from None
    else:
        raise ValueError(
            f"{path} was saved without its corpus (include_corpus=False); pass data=<TaskCorpus>."
        )
    if list(corpus.tasks) != list(meta["tasks"]):
        raise ValueError("The corpus' tasks differ from the saved result's tasks; pass the corpus it was fitted on.")
    spec = meta["model"]
    if model is None and spec == "<object>":
        raise ValueError(
            f"The result in {path} was fitted on a model object, not a name or path; pass it "
            "again: load_result(path, model=my_model, tokenizer=my_tokenizer)."
        )
    fit_args = restore_floats(meta["fit_args"])
    if quantize == AS_FITTED:
        quantize = fit_args.get("quantize")
    elif quantize is not None:
        checks.choice("quantize", quantize, (AS_FITTED, *QUANTIZE_CHOICES))
    base, tok, spec_loaded = load_base_model(spec if model is None else model, tokenizer, device=device,
                                             quantize=None if _is_model_object(model) else quantize)
    lm = MultiTaskLM(base, rank=config.rank, alpha=config.alpha, target_modules=config.target_modules)
    if lm.layout != saved_layout:
        raise ValueError(
            f"The base model's layers do not match the saved adapters ({saved_layout} saved, "
            f"{lm.layout} now): load the same base model the result was fitted on."
        )
    return BoraResult(
        tasks=list(meta["tasks"]),
        task_adapters=tensors["task_adapters"],
        global_adapter=tensors["global_adapter"],
        tau=dict(zip(meta["tau_groups"], tensors["tau"].tolist())),
        config=config,
        history=history,
        lm=lm,
        tokenizer=tok,
        corpus=corpus,
        model_spec=spec_loaded,
        method=meta["method"],
        fit_args=fit_args,
        task_scales=tensors.get("task_scales"),
    )


def _is_model_object(model: Any) -> bool:
    """Whether ``model`` is a loaded model rather than a name or path."""
    return model is not None and not isinstance(model, (str, os.PathLike))


#: The fields of config.json and the JSON types they must have.
_META_FIELDS = {
    "format": str, "format_version": int, "method": str, "tasks": list, "tau_groups": list,
    "config": dict, "layout": dict, "model": str, "fit_args": dict,
}
#: The BoraConfig fields a saved config must state (they fix the shapes of the adapters).
_CONFIG_FIELDS = ("rank", "alpha", "target_modules", "tau", "precision_groups")


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{file} is missing; the result folder is incomplete: save it again.") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{file} is not UTF-8 text ({err.reason}); the file is damaged: save the result again.") from None
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{file} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); the file "
            "is damaged: save the result again."
        ) from None


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing; the result folder is incomplete: save it again.")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"{file} cannot be read as safetensors ({err}); the file is damaged or truncated: save "
            "the result again."
        ) from None


def _read_meta(file: Path) -> tuple[dict, BoraConfig, Any]:
    """``config.json`` checked field by field; returns it with its `BoraConfig` and `AdapterLayout`."""
    from .models.layout import AdapterLayout

    meta = _read_json(file)
    if not isinstance(meta, dict):
        raise ValueError(f"{file} holds a JSON {type(meta).__name__}, not the object BoraResult.save writes.")
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{file} is not a bora_pyro result (format={meta.get('format')!r}).")
    for key, kind in _META_FIELDS.items():
        if key not in meta:
            raise ValueError(f"{file} lacks the field {key!r}; the file is damaged: save the result again.")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise ValueError(
                f"{file}: field {key!r} must be a JSON {kind.__name__}, got {meta[key]!r}; the file is damaged."
            )
    if meta["format_version"] > _FORMAT_VERSION:
        raise ValueError(
            f"{file}: field 'format_version' is {meta['format_version']}, but this bora_pyro reads "
            f"results up to version {_FORMAT_VERSION}; upgrade bora_pyro."
        )
    if meta["method"] not in ("map", "svi"):
        raise ValueError(f"{file}: field 'method' is {meta['method']!r}; expected 'map' or 'svi'.")
    tasks = meta["tasks"]
    if not tasks or not all(isinstance(t, str) for t in tasks) or len(set(tasks)) != len(tasks):
        raise ValueError(f"{file}: field 'tasks' must be a non-empty list of distinct names, got {tasks!r}.")
    missing = [k for k in _CONFIG_FIELDS if k not in meta["config"]]
    if missing:
        raise ValueError(f"{file}: field 'config' lacks {missing}; the file is damaged: save the result again.")
    try:
        config = BoraConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{file}: field 'config': {err}") from None
    try:
        layout = AdapterLayout.from_dict(meta["layout"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{file}: field 'layout' is not an adapter layout ({type(err).__name__}: {err}).") from None
    if (layout.rank, layout.alpha) != (config.rank, config.alpha):
        raise ValueError(
            f"{file}: field 'layout' has rank {layout.rank}, alpha {layout.alpha:g}, but field 'config' "
            f"has rank {config.rank}, alpha {config.alpha:g}; the file is damaged."
        )
    groups, _ = layout.group_index(config.precision_groups)
    if meta["tau_groups"] != groups:
        raise ValueError(
            f"{file}: field 'tau_groups' is {meta['tau_groups']!r}, but precision_groups="
            f"{config.precision_groups!r} on this layout gives {groups!r}; the file is damaged."
        )
    return meta, config, layout


def _read_adapters(file: Path, meta: dict, config: BoraConfig, layout: Any) -> dict[str, torch.Tensor]:
    """The tensors of ``adapters.safetensors``, each checked against ``config.json``."""
    tensors = _read_safetensors(file)
    D, P, G = len(meta["tasks"]), layout.size, len(meta["tau_groups"])
    shapes = {"task_adapters": (D, P), "global_adapter": (P,), "tau": (G,)}
    if meta["method"] == "svi" or "task_scales" in tensors:
        shapes["task_scales"] = (D, P)
    missing = [k for k in shapes if k not in tensors]
    if missing:
        raise ValueError(f"{file} lacks the tensor(s) {missing} (method={meta['method']!r}); the file is damaged.")
    unknown = sorted(set(tensors) - set(shapes))
    if unknown:
        raise ValueError(f"{file} holds unexpected tensor(s) {unknown}; expected {sorted(shapes)}.")
    where = f"({D} tasks in config.json, P = {P} for its layout, {G} precision groups {meta['tau_groups']})"
    for key, shape in shapes.items():
        value = tensors[key]
        if tuple(value.shape) != shape:
            raise ValueError(f"{file}: tensor {key!r} has shape {list(value.shape)}, expected {list(shape)} {where}.")
        if not value.is_floating_point():
            raise ValueError(f"{file}: tensor {key!r} has dtype {value.dtype}, expected a floating dtype.")
        if key == "tau":
            if torch.isnan(value).any() or (value < 0).any():
                raise ValueError(f"{file}: tensor 'tau' is {value.tolist()}; precisions must be >= 0 (inf allowed).")
        elif not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(f"{file}: tensor {key!r} holds {bad} NaN or infinite value(s); the file is damaged.")
    if "task_scales" in tensors and (tensors["task_scales"] < 0).any():
        raise ValueError(f"{file}: tensor 'task_scales' holds negative standard deviations; the file is damaged.")
    return tensors


def _read_history(file: Path) -> dict[str, list]:
    if not file.is_file():
        return {}
    history = _read_json(file)
    if not isinstance(history, dict):
        raise ValueError(f"{file} holds a JSON {type(history).__name__}, expected an object of lists.")
    for key, values in history.items():
        if not isinstance(values, list):
            raise ValueError(f"{file}: field {key!r} must be a list (one entry per step), got {values!r}.")
    return restore_floats(history)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)
