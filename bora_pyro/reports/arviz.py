r"""One path from a fitted result into arviz: held-out log-likelihood, shrinkage and distances.

`to_inference_data` returns an ``arviz.InferenceData`` made only of groups of arviz's schema,
with ``task`` as a named dimension (task names as coordinates):

``posterior`` (what varies over posterior draws; arrays ``(chain, draw, task)``)
    ``distance``, ``relative_distance``
        ``||theta_d - Theta||`` and ``||theta_d - Theta|| / ||Theta||``. Under SVI one value per
        posterior draw of ``theta_d`` (draw ``s`` is ``result.sample_adapters(1, seed=seed + s)``;
        the global adapter is a point estimate); under MAP the MAP adapter as one draw.

``log_likelihood``
    ``documents`` ``(chain, draw, doc)``
        The held-out log-likelihood ``log p(doc_n | theta_s)`` of every document of the
        evaluated split (nats, summed over its scored tokens; the observation is the Pyro plate
        ``"documents"``). Under SVI draw ``s`` is the posterior draw ``s`` of ``posterior``
        (the first ``predictive_samples`` draws); under MAP the MAP as one draw, and under SVI
        with ``predictive_samples=0`` the posterior mean as one draw (``attrs["draws"]`` says
        which). ``doc`` coordinates number the evaluated documents; ``doc_task`` (the task of each
        document) and ``source_row`` (its row in the data given to ``build_corpus``, ``-1``
        when unknown) are coordinates along ``doc``.

``constant_data`` (what does not vary over draws)
    ``tau`` ``(group)``
        The prior precision of each precision group: an empirical-Bayes point estimate (the
        evidence fixed point under MAP, variational EM under SVI) or the fixed value.
    ``shrinkage`` ``(task)``, ``shrinkage_by_group`` ``(task, group)``
        The share of the posterior precision of ``theta_d`` that comes from the prior, averaged
        over parameters (all of them, or those of one group)::

            kappa_d = mean_i tau_g(i) / (h_di + tau_g(i))

        where ``h_di`` is the curvature of the negative log-likelihood of task d's training
        documents in parameter i. Under SVI the posterior variance of the mean-field guide is
        ``sigma_di^2 = 1 / (h_di + tau_g(i))`` at its optimum, so ``kappa_d = mean_i tau_g(i)
        sigma_di^2`` (no curvature needed; it can exceed 1 only if the guide has not converged).
        Under MAP ``h`` is the diagonal true Fisher of the task's training documents at the
        global adapter (`diagonal_fisher` with ``at="global"``; why: `shrinkage_factors`). ``0`` when
        the task learns from its data alone (tau = 0, or much data), ``1`` when it is fully
        pooled (tau = inf, or no data).
    ``point_distance``, ``point_relative_distance`` ``(task)``
        The distances of the point estimate: the MAP adapter, or the SVI posterior mean (what
        `BoraResult.posterior_summary` reports). Draws of ``||theta_d - Theta||^2`` exceed the
        mean's by ``sum_i sigma_di^2`` on average.
    ``n_train_docs``, ``n_train_tokens``, ``n_eval_docs``, ``n_eval_tokens`` ``(task)``
        Documents and scored tokens per task, of the training split and of the evaluated split
        (after ``max_docs_per_task``).
    ``doc_tokens`` ``(doc)``
        Scored tokens of each evaluated document.

Held-out perplexity per task (`heldout_table`) is computed from ``log_likelihood`` and these
counts. The documents are held out, so their expected log predictive density (elpd) is estimated
directly, without leave-one-out: `heldout_elpd` (``log mean_s p(doc_n | theta_s)`` per document;
a MAP fit counts with its plug-in value) returns it as arviz's ``ELPDData``, and `compare_fits`
ranks fits evaluated on the same documents with ``az.compare``, MAP and SVI alike
(`bora_pyro.sweep.SweepResult.compare` does it for a sweep's grid of tau). ``az.loo(idata)`` and
``az.compare`` on the InferenceData themselves also work for SVI results with
``predictive_samples >= 2``, but PSIS-LOO treats each document as if it had been fitted: it
re-weights the draws by ``1 / p(doc_n | theta_s)`` and so underestimates the held-out density
(its ``p_loo`` measures the spread of the log-likelihood over the draws, not overfitting). A MAP
result (one point) cannot go through ``az.loo``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .._version import __version__
from ..checks import choice, non_negative_int, positive_int
from ..evaluation import (
    evaluation_options,
    evaluation_split,
    iterate_split,
    per_doc_nll,
    per_doc_nll_draws,
    perplexity_table,
    predictive_table,
    sum_per_task,
)
from ..inference.curvature import next_token_targets, squared_gradients
from .protocol import FitLike

__all__ = [
    "to_inference_data", "heldout_log_likelihood", "heldout_elpd", "compare_fits", "heldout_table",
    "diagonal_fisher", "shrinkage_factors", "import_arviz",
]

#: Name of the observation in the ``log_likelihood`` group (the Pyro plate of the documents).
OBSERVED = "documents"


def import_arviz():
    """Import arviz (0.x), silencing its import-time notice about the 1.x refactor."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="ArviZ is undergoing", category=FutureWarning)
        import arviz

    return arviz


#: What `diagonal_fisher` computes: the true Fisher (sampled labels) or the empirical Fisher.
FISHER_KINDS = ("fisher", "empirical")
#: Where `diagonal_fisher` evaluates it: at each task's own adapter, or at the global adapter.
FISHER_POINTS = ("tasks", "global")


def diagonal_fisher(
    result: FitLike,
    split: str = "train",
    *,
    kind: str = "fisher",
    at: str = "tasks",
    samples: int = 4,
    max_docs_per_task: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    r"""Diagonal Fisher of each task's log-likelihood in its adapter: ``[D, P]``.

    ``h_di = sum_{n in task d} E[(d log p(doc_n | theta) / d theta_i)^2]``, a sum over the
    task's documents of squared *per-document* gradients, at ``theta = result.task_adapters[d]``
    (``at="tasks"``: the MAP, or the posterior mean under SVI; the curvature of the Laplace
    posterior) or at ``theta = result.global_adapter`` for every task (``at="global"``: what
    `shrinkage_factors` uses, see there).

    ``kind="fisher"`` (default)
        The true Fisher (for a softmax likelihood, the generalised Gauss-Newton matrix, the
        expected Hessian under the model): the scored tokens of each document are replaced by
        draws from the model's own predictive (the prefix stays the observed text), ``samples``
        draws per document, and the squared gradients averaged over the draws (an unbiased
        Monte-Carlo estimate, `bora_pyro.inference.curvature.squared_gradients`; the draws
        come from a generator seeded by ``seed``, so the result is reproducible).
    ``kind="empirical"``
        The empirical Fisher, squared gradients with the observed tokens. It is not the
        curvature away from the optimum and is biased by factors that differ between tasks
        (Kunstner et al. 2019; 0.1 to 0.7 of the true Fisher per task on a tiny LM,
        docs/learned-precision.md), which scrambles the order of the tasks' shrinkage.

    Per-document gradients come from one forward pass per batch and one backward pass per
    draw (`bora_pyro.evaluation.iterate_split` with ``row_gradients=True``): each row of the
    batch gets its own copy of its task's adapter (a ``[B, P]`` leaf), and since a row's
    log-likelihood depends only on its own copy, the gradient of the batch's summed
    log-likelihood w.r.t. that leaf holds the ``B`` per-document gradients. The cost is that of
    one training epoch without optimiser steps (``samples`` backward passes per batch), and
    ``B x P`` floats of extra memory.

    Parameters
    ----------
    result
        A fitted result (`FitLike`, e.g. a `BoraResult`).
    split
        Documents to sum over; the likelihood the adapters were fitted on is ``"train"``.
    kind
        ``"fisher"`` or ``"empirical"`` (see above).
    at
        ``"tasks"`` or ``"global"`` (see above).
    samples
        ``kind="fisher"``: label draws per document (more: less Monte-Carlo noise). Must be 1
        with ``kind="empirical"`` (the observed labels are one fixed draw).
    max_docs_per_task
        Use a seeded random subset of at most this many documents per task (`TaskSplit.subset`)
        and scale each task's sum by ``n_docs_d / n_used_d``, an unbiased estimate of the full
        sum at a fraction of the cost.
    batch_size
        Documents per forward/backward pass.
    seed
        Seed of the subset and of the label draws.
    progress
        Show a progress bar.

    Returns
    -------
    ``[D, P]`` float32 on the CPU; rows of tasks without documents are zero.
    """
    kind = choice("kind", kind, FISHER_KINDS)
    at = choice("at", at, FISHER_POINTS)
    samples = positive_int("samples", samples)
    if kind == "empirical" and samples != 1:
        raise ValueError(
            f"samples={samples} draws only apply to kind='fisher'; with kind='empirical' the observed "
            "labels are used once: pass samples=1."
        )
    full_counts = torch.as_tensor(result.corpus.split(split).docs_per_task, dtype=torch.float64)
    data = evaluation_split(result.corpus, split, max_docs_per_task=max_docs_per_task, seed=seed)
    used_counts = torch.as_tensor(data.docs_per_task, dtype=torch.float64)
    options = evaluation_options(result, batch_size)
    generator = torch.Generator(options["device"]).manual_seed(seed)
    adapters = result.task_adapters if at == "tasks" else result.global_adapter.expand_as(result.task_adapters)
    h = torch.zeros(result.task_adapters.shape, dtype=torch.float32, device=options["device"])
    for batch, logits, rows in iterate_split(
        result.lm, data, adapters, output="logits", row_gradients=True, progress=progress,
        desc="Fisher", **options
    ):
        squares = squared_gradients(
            logits, next_token_targets(batch.labels), rows, sampled=kind == "fisher", samples=samples,
            generator=generator,
        )
        h.index_add_(0, batch.task_ids, squares)
    scale = torch.where(used_counts > 0, full_counts / used_counts.clamp_min(1), 0.0)
    return (h.cpu().double() * scale[:, None]).float()


def _tau_per_param(result: FitLike) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Group names, ``[G]`` tau values and ``[P]`` group index of the result (float64)."""
    names, index = result.lm.layout.group_index(result.config.precision_groups)
    if set(names) != set(result.tau):
        raise ValueError(
            f"result.tau has groups {list(result.tau)} but precision_groups="
            f"{result.config.precision_groups!r} gives {names}; the result is inconsistent."
        )
    tau = torch.tensor([float(result.tau[g]) for g in names], dtype=torch.float64)
    return names, tau, index


def shrinkage_factors(result: FitLike, fisher: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    r"""Per task, the share of the posterior precision that comes from the prior.

    For parameter i of task d with prior precision ``tau = tau_g(i)`` and likelihood curvature
    ``h_di``, the (Laplace or mean-field Gaussian) posterior precision is ``h_di + tau`` and the
    prior's share is ``tau / (h_di + tau)``. The factor of task d is its mean over parameters::

        SVI: kappa_d = mean_i tau * sigma_di^2          (sigma = result.task_scales)
        MAP: kappa_d = mean_i tau / (h_di + tau)         (h = fisher)

    Exactly 0 for tau = 0 (independent tasks) and 1 for tau = inf (pooled).

    Under MAP the default ``h`` is the diagonal true Fisher of each task's training documents
    evaluated at the *global* adapter (`diagonal_fisher` with ``at="global"``), not at the
    task's own MAP adapter. The reason is LoRA's product ``B A``: the curvature in the A entries
    of a task grows with ``|B_d|^2`` and that in its B entries with ``|A_d|^2``, so at
    ``theta_d`` it measures how far the task's adapter has moved as much as how much data it
    has, and on a tiny LM it ordered six tasks of 4 to 137 documents with a Spearman
    correlation as weak as -0.6 (per-token Fisher 10x larger for a task of 34 documents than for
    one of 68). At the common point ``Theta`` every task is measured in the same coordinates:
    ``h_d`` is the information that task d's own documents carry about its deviation from the
    shared adapter, the quantity that decides how much the task borrows, and it differs
    between tasks by the amount and the content of their data only. Pass
    ``fisher=diagonal_fisher(result)`` for the curvature at each task's own adapter.

    Parameters
    ----------
    result
        A fitted result (`FitLike`, e.g. a `BoraResult`).
    fisher
        MAP only: ``[D, P]`` curvature ``h`` (default: ``diagonal_fisher(result, at="global")``
        on all training documents). Ignored under SVI.

    Returns
    -------
    shrinkage
        ``[D]`` float64.
    by_group
        ``[D, G]`` float64, the mean over the parameters of each precision group (groups in
        the order of ``lm.layout.group_index(config.precision_groups)``).
    """
    names, tau, index = _tau_per_param(result)
    D, P = result.task_adapters.shape
    tau_p = tau[index]  # [P]
    if result.task_scales is not None:
        var = result.task_scales.detach().cpu().double().square()  # [D, P]
        prior_share = tau_p * var
    else:
        if fisher is None:
            fisher = diagonal_fisher(result, at="global")
        fisher = torch.as_tensor(fisher)
        if tuple(fisher.shape) != (D, P):
            raise ValueError(
                f"fisher has shape {tuple(fisher.shape)}, but this result has D={D} tasks and "
                f"P={P} parameters; pass diagonal_fisher(result) (shape [{D}, {P}])."
            )
        h = fisher.detach().cpu().double().clamp_min(0)
        with torch.no_grad():
            prior_share = tau_p / (h + tau_p)
    # The limits, exactly (and without 0/0 or inf/inf).
    prior_share = torch.where(tau_p == 0, 0.0, prior_share)
    prior_share = torch.where(torch.isinf(tau_p), 1.0, prior_share)
    prior_share = prior_share.expand(D, P)
    G = len(names)
    counts = torch.bincount(index, minlength=G).double()
    by_group = torch.zeros(D, G, dtype=torch.float64).index_add_(1, index, prior_share) / counts
    return prior_share.mean(1).numpy(), by_group.numpy()


def to_inference_data(
    result: FitLike,
    *,
    split: str = "test",
    num_samples: int | None = None,
    predictive_samples: int = 8,
    max_docs_per_task: int | None = None,
    batch_size: int | None = None,
    fisher: torch.Tensor | None = None,
    fisher_max_docs_per_task: int | None = None,
    seed: int = 0,
    progress: bool = False,
):
    r"""The fitted result as ``arviz.InferenceData`` (groups and variables: see the module doc).

    Parameters
    ----------
    result
        A fitted result (`FitLike`, e.g. a `BoraResult`; MAP or SVI).
    split
        The held-out split of the log-likelihood: ``"test"`` or ``"validation"`` (``"train"``
        works but is not held out). It must have documents.
    num_samples
        SVI only: posterior draws of the task adapters (default 100). Draw ``s`` is
        ``result.sample_adapters(1, seed=seed + s)``; its distances cost ``D x P`` random numbers
        and no forward pass. Must be left ``None`` for MAP.
    predictive_samples
        SVI only: how many of those draws (the first ones) also get the held-out
        log-likelihood, one pass over the split each; at most ``num_samples``. ``0``: the
        log-likelihood at the posterior mean only (one pass; not usable by ``az.loo``).
    max_docs_per_task
        Evaluate on a seeded subset of at most this many documents per task (as in
        `BoraResult.evaluate`).
    batch_size
        Documents per forward pass of the evaluation (default twice the training batch size).
    fisher
        MAP only: the ``[D, P]`` curvature for the shrinkage; default
        ``diagonal_fisher(result, at="global")`` on the training documents (see
        `shrinkage_factors`; one forward and four backward passes per batch).
    fisher_max_docs_per_task
        MAP only, without ``fisher``: compute it on at most this many training documents per
        task (scaled up to the task's size), for large corpora.
    seed
        Seeds the posterior draws and the evaluation subset.
    progress
        Show progress bars.

    Returns
    -------
    ``arviz.InferenceData`` with groups ``posterior``, ``log_likelihood`` and
    ``constant_data``; ``attrs["inference"]`` is ``"map"`` or ``"svi"``.

    Raises
    ------
    ValueError
        For ``num_samples`` with a MAP result, ``predictive_samples > num_samples``, a split
        without documents, or counts that are not (non-negative) integers.
    """
    az = import_arviz()
    import xarray as xr

    is_svi = result.task_scales is not None
    if num_samples is None:
        num_samples = 100 if is_svi else 1
    elif not is_svi:
        raise ValueError(
            f"num_samples={num_samples!r} needs an SVI result, but this is a MAP result (a point "
            "estimate, stored as one draw); leave num_samples=None or fit with "
            "bora_pyro.fit_svi(..., init=<this result>)."
        )
    num_samples = positive_int("num_samples", num_samples)
    predictive_samples = non_negative_int("predictive_samples", predictive_samples)
    if is_svi and predictive_samples > num_samples:
        raise ValueError(
            f"predictive_samples={predictive_samples} exceeds num_samples={num_samples}: the "
            "log-likelihood is evaluated at the first predictive_samples posterior draws; raise "
            "num_samples or lower predictive_samples."
        )
    data = evaluation_split(result.corpus, split, max_docs_per_task=max_docs_per_task, seed=seed)
    options = evaluation_options(result, batch_size)

    tasks = list(result.tasks)
    D = len(tasks)
    names, tau, _ = _tau_per_param(result)
    theta_g = result.global_adapter.detach().cpu().float()
    norm_g = float(theta_g.norm())
    rel = (lambda d: d / norm_g) if norm_g > 0 else (lambda d: np.full_like(d, np.nan))
    point = result.task_adapters.detach().cpu().float()
    point_distance = (point - theta_g).norm(dim=1).double().numpy()

    # One loop over the posterior draws: the distance of each, the held-out fit of the first K.
    K = predictive_samples if is_svi else 0
    distance = np.empty((num_samples, D))
    log_lik = []
    for s in tqdm(range(num_samples), desc="posterior draws", disable=not progress or not is_svi, leave=False):
        theta = result.sample_adapters(1, seed=seed + s)[0] if is_svi else point
        distance[s] = (theta.float() - theta_g).norm(dim=1).double().numpy()
        if s < K:
            nll, doc_tokens = per_doc_nll(result.lm, theta, data, **options)
            log_lik.append(-nll)
    if not log_lik:  # MAP, or SVI at the posterior mean only
        nll, doc_tokens = per_doc_nll(result.lm, point, data, **options)
        log_lik.append(-nll)
    draws_note = (
        f"posterior draws 0..{K - 1} (draw s = result.sample_adapters(1, seed={seed} + s))" if K
        else "the posterior mean (one point, not a draw)" if is_svi else "the MAP (one point, not a draw)"
    )

    if fisher is None and not is_svi:
        fisher = diagonal_fisher(
            result, at="global", max_docs_per_task=fisher_max_docs_per_task, seed=seed, progress=progress
        )
    shrink, shrink_g = shrinkage_factors(result, fisher=fisher)

    method = "svi" if is_svi else "map"
    cd = ("chain", "draw")
    posterior = xr.Dataset(
        {
            "distance": (cd + ("task",), distance[None]),
            "relative_distance": (cd + ("task",), rel(distance)[None]),
        },
        coords={"chain": [0], "draw": np.arange(num_samples), "task": tasks},
        attrs={
            "inference": method,
            "draws": (f"{num_samples} posterior draws, draw s = result.sample_adapters(1, seed={seed} + s)"
                      if is_svi else "the MAP (one point, not a draw): sd, hdi, ess and r_hat mean nothing"),
        },
    )
    doc_coords = _doc_coords(data, tasks)
    log_likelihood = _log_likelihood_dataset(
        log_lik, data, tasks, split=split, max_docs_per_task=max_docs_per_task, seed=seed, draws_note=draws_note)
    train = result.corpus.split("train")
    constant_data = xr.Dataset(
        {
            "tau": ("group", tau.numpy()),
            "shrinkage": ("task", np.asarray(shrink, dtype=np.float64)),
            "shrinkage_by_group": (("task", "group"), np.asarray(shrink_g, dtype=np.float64)),
            "point_distance": ("task", point_distance),
            "point_relative_distance": ("task", rel(point_distance)),
            "n_train_docs": ("task", np.asarray(train.docs_per_task, dtype=np.int64)),
            "n_train_tokens": ("task", np.asarray(train.tokens_per_task, dtype=np.int64)),
            "n_eval_docs": ("task", np.asarray(data.docs_per_task, dtype=np.int64)),
            "n_eval_tokens": ("task", np.asarray(data.tokens_per_task, dtype=np.int64)),
            "doc_tokens": ("doc", doc_tokens.numpy()),
        },
        coords={"task": tasks, "group": names, **doc_coords},
        attrs={
            "eval_split": split,
            "shrinkage_source": (
                "posterior variances of the mean-field guide: mean_i tau_g(i) * task_scales_di^2" if is_svi
                else "diagonal empirical Fisher h at the MAP: mean_i tau_g(i) / (h_di + tau_g(i))"
            ),
        },
    )
    attrs = {
        "inference": method,
        "created_by": f"bora_pyro {__version__}",
        "tau_mode": result.config.mode,
        "precision_groups": result.config.precision_groups,
        "model": str(result.model_spec),
        "num_params": int(result.task_adapters.shape[1]),
        "eval_split": split,
    }
    return az.InferenceData(
        posterior=posterior, log_likelihood=log_likelihood, constant_data=constant_data, attrs=attrs
    )


def _doc_coords(data, tasks: list[str]) -> dict:
    """Coordinates along ``doc`` of an evaluated split: number, task and source row."""
    return {
        "doc": np.arange(len(data)),
        "doc_task": ("doc", [tasks[d] for d in data.task_ids.tolist()]),
        "source_row": ("doc", np.asarray(data.source_index, dtype=np.int64)),
    }


def _log_likelihood_dataset(log_lik: list[torch.Tensor], data, tasks: list[str], *, split: str,
                            max_docs_per_task: int | None, seed: int, draws_note: str):
    """The ``log_likelihood`` group: ``documents`` ``(chain=1, draw=S, doc)`` from S ``[N]`` rows."""
    import xarray as xr

    return xr.Dataset(
        {OBSERVED: (("chain", "draw", "doc"), torch.stack(log_lik).numpy()[None])},
        coords={"chain": [0], "draw": np.arange(len(log_lik)), **_doc_coords(data, tasks)},
        attrs={
            "split": split,
            "max_docs_per_task": -1 if max_docs_per_task is None else int(max_docs_per_task),
            "seed": int(seed),
            "draws": draws_note,
            "units": "nats per document, summed over its scored tokens",
        },
    )


def heldout_log_likelihood(
    result: FitLike,
    *,
    split: str = "test",
    predictive_samples: int = 8,
    max_docs_per_task: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = False,
):
    """Only the ``log_likelihood`` group of `to_inference_data`, without its other costs.

    The same numbers as ``to_inference_data(result, ...).log_likelihood`` for the same
    arguments (MAP: the MAP as one draw; SVI: posterior draws ``s = 0 .. predictive_samples - 1``
    with ``result.sample_adapters(1, seed=seed + s)``, or the posterior mean with
    ``predictive_samples=0``), but no shrinkage (under MAP a Fisher pass over the training
    documents) and no distances: what `compare_fits` needs, at one pass over the split per draw.

    Returns
    -------
    ``arviz.InferenceData`` with the one group ``log_likelihood``.
    """
    az = import_arviz()
    predictive_samples = non_negative_int("predictive_samples", predictive_samples)
    is_svi = result.task_scales is not None
    data = evaluation_split(result.corpus, split, max_docs_per_task=max_docs_per_task, seed=seed)
    options = evaluation_options(result, batch_size)
    K = predictive_samples if is_svi else 0
    if K:
        draws = (result.sample_adapters(1, seed=seed + s)[0] for s in range(K))
        log_lik = list(-per_doc_nll_draws(result.lm, draws, data, progress=progress, **options))
        note = f"posterior draws 0..{K - 1} (draw s = result.sample_adapters(1, seed={seed} + s))"
    else:
        log_lik = [-per_doc_nll(result.lm, result.task_adapters.detach().cpu().float(), data, **options)[0]]
        note = "the posterior mean (one point, not a draw)" if is_svi else "the MAP (one point, not a draw)"
    dataset = _log_likelihood_dataset(log_lik, data, list(result.tasks), split=split,
                                      max_docs_per_task=max_docs_per_task, seed=seed, draws_note=note)
    return az.InferenceData(log_likelihood=dataset, attrs={"inference": "svi" if is_svi else "map",
                                                           "eval_split": split})


def heldout_elpd(idata):
    r"""The held-out expected log predictive density of a fit, as arviz's ``ELPDData``.

    The documents of ``idata.log_likelihood`` were held out of the fit, so their elpd needs no
    leave-one-out correction: it is estimated directly, document by document, from the
    log-likelihood draws ``l_ns = log p(doc_n | theta_s)``::

        elpd_n = log (1/S) sum_s exp(l_ns)        (S >= 1 draws; MAP: S = 1, the plug-in value)
        elpd   = sum_n elpd_n,    se = sqrt(N * Var_n(elpd_n))

    With posterior draws (SVI) this is the Monte-Carlo posterior-predictive density; with one
    point (a MAP fit, or an SVI posterior mean) the plug-in density at that point. (``az.loo``
    would instead re-weight the draws by ``1 / p(doc_n | theta_s)`` as if the document had been
    fitted: a harmonic mean that underestimates the held-out density, and it needs draws.)

    The result has ``az.loo``'s fields (``elpd_loo``, ``se``, ``p_loo``, ``n_samples``,
    ``n_data_points``, ``warning``, ``loo_i``, ``scale="log"``) so that ``az.compare`` and
    ``az.plot_compare`` take it; ``p_loo`` is 0 (no correction) and there are no Pareto k.

    Parameters
    ----------
    idata
        An InferenceData with a ``log_likelihood`` group ``documents`` ``(chain, draw, doc)``
        (`to_inference_data`, `heldout_log_likelihood`).
    """
    az = import_arviz()
    from scipy.special import logsumexp

    if not isinstance(idata, az.InferenceData) or "log_likelihood" not in idata.groups():
        raise ValueError(
            "Expected an arviz.InferenceData with a log_likelihood group (bora_pyro.to_inference_data "
            f"or heldout_log_likelihood), got {type(idata).__name__}."
        )
    ll = idata.log_likelihood[OBSERVED].stack(__sample__=("chain", "draw")).transpose("doc", "__sample__")
    S, N = ll.sizes["__sample__"], ll.sizes["doc"]
    pointwise = ll.isel(__sample__=0, drop=True).copy(data=logsumexp(ll.values, axis=1) - math.log(S))
    elpd = float(pointwise.sum())
    se = float((N * np.var(pointwise.values)) ** 0.5)
    return az.ELPDData(
        data=[elpd, se, 0.0, S, N, False, pointwise.rename("loo_i"), "log"],
        index=["elpd_loo", "se", "p_loo", "n_samples", "n_data_points", "warning", "loo_i", "scale"],
    )


def compare_fits(fits, *, method: str = "stacking") -> pd.DataFrame:
    """Rank fits by their held-out elpd with ``az.compare`` (`heldout_elpd` of each).

    Parameters
    ----------
    fits
        ``{name: InferenceData}``, each with the held-out log-likelihood of the SAME documents
        (same split, subset and seed: checked by their task and source row), e.g. from
        `to_inference_data` or `heldout_log_likelihood`. MAP and SVI fits can be mixed: a MAP
        fit counts with its plug-in density (see `heldout_elpd`).
    method
        How ``az.compare`` weighs the fits: ``"stacking"``, ``"BB-pseudo-BMA"`` or
        ``"pseudo-BMA"``.

    Returns
    -------
    arviz's comparison DataFrame, best fit first: ``rank``, ``elpd_loo`` (here the held-out
    elpd in nats, higher is better), ``p_loo`` (0), ``elpd_diff`` (to the best), ``weight``,
    ``se``, ``dse`` (standard error of the difference, from the per-document differences),
    ``warning``, ``scale``; ``df.attrs["elpd"]`` says what the columns hold.
    """
    az = import_arviz()
    method = choice("method", method, ("stacking", "BB-pseudo-BMA", "pseudo-BMA"))
    if not isinstance(fits, dict) or len(fits) < 2:
        raise ValueError(f"fits must be a dict of at least two named InferenceData, got {fits!r:.80}.")
    reference = None
    for name, idata in fits.items():
        elpd = heldout_elpd(idata)  # checks the type
        coords = idata.log_likelihood[OBSERVED]
        key = (list(map(str, coords["doc_task"].values)), list(map(int, coords["source_row"].values)))
        if reference is None:
            reference = (name, key)
        elif key != reference[1]:
            raise ValueError(
                f"fits {reference[0]!r} and {name!r} hold the log-likelihood of different documents; "
                "evaluate every fit on the same corpus split with the same max_docs_per_task and seed."
            )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The default method used to estimate the weights")
        table = az.compare({str(k): heldout_elpd(v) for k, v in fits.items()}, method=method)
    table.attrs["elpd"] = (
        "elpd_loo: held-out expected log predictive density (nats, summed over the evaluated documents; "
        "posterior-predictive under SVI, plug-in at the MAP), computed directly on held-out documents, "
        "not by leave-one-out"
    )
    return table


def heldout_table(idata, *, interval: float = 0.95) -> pd.DataFrame:
    """Held-out perplexity per task from an InferenceData of `to_inference_data`.

    With several log-likelihood draws (SVI), the posterior-predictive table of
    `bora_pyro.evaluation.predictive_table` (``nll`` and ``perplexity`` from
    ``-log mean_s p(doc | theta_s)``, ``perplexity_low`` / ``perplexity_high`` the central
    ``interval`` over the draws); with one point (MAP, or the SVI posterior mean) the
    `perplexity_table` of that point. Either equals `BoraResult.evaluate` on the same documents
    and draws.

    Returns
    -------
    DataFrame with one row per task and a last row ``overall``, columns ``task``, ``n_docs``,
    ``n_tokens``, ``nll``, ``perplexity`` (and the interval columns).
    """
    cd = idata.constant_data
    tasks = [str(t) for t in cd["task"].values]
    ll = idata.log_likelihood[OBSERVED].stack(sample=("chain", "draw")).transpose("sample", "doc")
    nll = -torch.as_tensor(np.asarray(ll.values, dtype=np.float64))  # [S, N]
    index = {t: d for d, t in enumerate(tasks)}
    task_ids = torch.tensor([index[str(t)] for t in ll["doc_task"].values], dtype=torch.long)
    tokens = torch.as_tensor(np.asarray(cd["doc_tokens"].values, dtype=np.int64))
    if nll.shape[0] > 1:
        return predictive_table(tasks, nll, tokens, task_ids, interval=interval)
    D = len(tasks)
    return perplexity_table(
        tasks, sum_per_task(nll[0], task_ids, D).numpy(), sum_per_task(tokens, task_ids, D).numpy(),
        np.bincount(task_ids.numpy(), minlength=D),
    )
