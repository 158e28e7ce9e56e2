"""`build_bora`: a frozen base LM and a corpus in, the multi-task LoRA LM and the BoRA model out.

The one place where `fit_map` / `fit_svi`, the benchmarks and the tests wrap a base model, so
that a model built by hand is the model a fit trains.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import BoraConfig
from .bora import BoraModel, lm_log_likelihood
from .lora import MultiTaskLM

__all__ = ["build_bora"]


def build_bora(
    base_model: Any, corpus: Any, config: BoraConfig, *, seed: int, docs_per_task: Any = None,
) -> tuple[MultiTaskLM, BoraModel]:
    """Wrap ``base_model`` with multi-task LoRA layers and build the hierarchical Pyro model.

    Parameters
    ----------
    base_model
        A frozen causal LM (a ``transformers.PreTrainedModel``, e.g. from
        `bora_pyro.models.base.load_base_model`). Its target linear layers are wrapped in place
        (an already wrapped model with the same layout keeps its wrappers, so that earlier
        results on it stay usable).
    corpus
        A `bora_pyro.data.TaskCorpus` (its number of tasks D and of training documents N are
        used), or a pair ``(num_tasks, num_train_docs)`` for a model without a corpus (e.g.
        random batches in a benchmark).
    config
        The model settings: ``rank``, ``alpha``, ``target_modules`` (the LoRA layers, adapter
        length P), ``tau``, ``precision_groups`` and ``tau_prior`` (the prior).
    docs_per_task
        ``[D]`` training documents of each task, for a ``corpus`` given as a pair (a corpus
        gives its own); the sparse step needs them (`BoraModel.subsample_tasks`).
    seed
        Seeds torch's global generator before the model is built; Pyro draws from it, so the
        Monte Carlo draws of an SVI fit that follows are reproducible too.

    Returns
    -------
    lm : MultiTaskLM
        The wrapped LM; ``lm.layout`` maps the flat ``[P]`` adapter to its A and B matrices.
    bora : BoraModel
        The model over ``[D, P]`` task adapters, its likelihood `lm_log_likelihood` summed over
        the documents of a minibatch and scaled by ``N / B``.

    Raises
    ------
    ValueError
        When ``config`` is not a `BoraConfig`, ``corpus`` has no task or no training document,
        or ``target_modules`` names no layer of the model.
    """
    if not isinstance(config, BoraConfig):
        raise ValueError(f"config must be a BoraConfig, got {type(config).__name__}.")
    num_tasks, num_docs = _corpus_size(corpus)
    if not isinstance(corpus, tuple):
        docs_per_task = corpus.split("train").docs_per_task
    torch.manual_seed(seed)
    lm = MultiTaskLM(base_model, rank=config.rank, alpha=config.alpha, target_modules=config.target_modules)
    group_names, group_index = lm.layout.group_index(config.precision_groups)
    bora = BoraModel(
        lm_log_likelihood(lm), num_tasks=num_tasks, num_params=lm.num_params, num_docs=num_docs,
        config=config, group_index=group_index, group_names=group_names, docs_per_task=docs_per_task,
    )
    return lm, bora


def _corpus_size(corpus: Any) -> tuple[int, int]:
    if isinstance(corpus, tuple):
        if len(corpus) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in corpus):
            raise ValueError(
                f"corpus={corpus!r}: a pair must be (num_tasks, num_train_docs), two positive integers."
            )
        return corpus
    if not (hasattr(corpus, "num_tasks") and hasattr(corpus, "split")):
        raise ValueError(
            f"corpus must be a TaskCorpus or a pair (num_tasks, num_train_docs), got {type(corpus).__name__}."
        )
    num_docs = len(corpus.split("train"))
    if num_docs == 0:
        raise ValueError("The corpus has no training documents; a fit needs at least one per batch.")
    return corpus.num_tasks, num_docs
