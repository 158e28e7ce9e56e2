"""What the reports need from a fitted model: the `FitLike` protocol.

Reports read a fit through this interface and never import `bora_pyro.result` (results import
reports, lazily, for `BoraResult.report` and `BoraResult.to_inference_data`; data never imports
plots). `BoraResult` satisfies it, and so does any object with these attributes.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import pandas as pd
import torch

__all__ = ["FitLike"]


@runtime_checkable
class FitLike(Protocol):
    """A fitted BoRA model as the reports see it (`BoraResult` is one).

    Attributes
    ----------
    tasks
        ``D`` task names; position = task id.
    task_adapters
        ``[D, P]`` adapters (the posterior means under SVI).
    global_adapter
        ``[P]`` the global adapter Theta.
    tau
        ``{group: precision}`` of the prior (``0.0`` / ``inf`` in the limits).
    task_scales
        ``[D, P]`` posterior standard deviations (SVI), or ``None`` (MAP point estimates).
    config
        The `BoraConfig`; reports read ``rank``, ``alpha``, ``mode`` and ``precision_groups``.
    lm
        The `MultiTaskLM` (``layout``, ``sequence_nll``, ``__call__``).
    tokenizer
        The base model's tokenizer.
    corpus
        The `TaskCorpus` (``split(name)`` gives a `TaskSplit`).
    method
        ``"map"`` or ``"svi"``.
    model_spec
        How the base model was given (a name, a path or ``"<object>"``).
    fit_args
        The training arguments (reports read ``batch_size`` and ``autocast``).
    history
        The optimisation history (``{"step": [...], "tau": [[...], ...], ...}``).
    device
        The device of ``lm``.
    """

    tasks: list[str]
    task_adapters: torch.Tensor
    global_adapter: torch.Tensor
    tau: dict[str, float]
    task_scales: torch.Tensor | None
    config: Any
    lm: Any
    tokenizer: Any
    corpus: Any
    method: str
    model_spec: str
    fit_args: dict[str, Any]
    history: dict[str, list]

    @property
    def device(self) -> torch.device: ...

    def evaluate(self, split: str = "test", **kwargs: Any) -> pd.DataFrame:
        """Per-task perplexity on a split (see `BoraResult.evaluate`)."""
        ...

    def sample_adapters(self, num_samples: int, *, seed: int = 0) -> torch.Tensor:
        """``[num_samples, D, P]`` posterior draws of the task adapters (SVI only)."""
        ...
