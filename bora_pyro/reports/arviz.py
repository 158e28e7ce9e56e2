r"""One path from a fitted `BoraResult` into arviz: per-task shrinkage, distances and held-out fit.

`to_inference_data` returns an ``arviz.InferenceData`` with ``task`` as a named dimension (task
names as coordinates) and every posterior array shaped ``(chain, draw, ...)``:

``posterior``
    ``tau`` ``(chain, draw, group)``
        The prior precision of each precision group. BoRA estimates it by empirical Bayes
        (the evidence fixed point under MAP, variational EM under SVI): a point estimate,
        repeated along ``draw``.
    ``distance``, ``relative_distance`` ``(chain, draw, task)``
        ``||theta_d - Theta||`` and ``||theta_d - Theta|| / ||Theta||``. Under SVI one value per
        posterior draw of ``theta_d`` (the global adapter is a point estimate); under MAP the
        distance of the MAP adapter.
    ``distance_at_mean``, ``relative_distance_at_mean`` ``(chain, draw, task)``
        SVI only: the same at the posterior mean (what `BoraResult.posterior_summary` reports),
        repeated along ``draw``. Draws of ``||theta_d - Theta||^2`` exceed it by
        ``sum_i sigma_di^2`` on average.
    ``shrinkage`` ``(chain, draw, task)``, ``shrinkage_by_group`` ``(chain, draw, task, group)``
        The share of the posterior precision of ``theta_d`` that comes from the prior, averaged
        over parameters (all of them, or those of one group)::

            kappa_d = mean_i tau_g(i) / (h_di + tau_g(i))

        where ``h_di`` is the curvature of the negative log-likelihood of task d's training
        documents in parameter i. Under SVI the posterior variance of the mean-field guide is
        ``sigma_di^2 = 1 / (h_di + tau_g(i))`` at its optimum, so ``kappa_d = mean_i tau_g(i)
        sigma_di^2`` (no curvature needed; it can exceed 1 only if the guide has not converged).
        Under MAP ``h`` is a diagonal empirical Fisher estimate (`diagonal_fisher`). ``0`` when
        the task learns from its data alone (tau = 0, or much data), ``1`` when it is fully
        pooled (tau = inf, or no data). A property of the fit, repeated along ``draw``.
    ``lpd``, ``perplexity`` ``(chain, draw, task)``
        Held-out log predictive density of each task's documents on the evaluated split (nats,
        summed over the task's scored tokens) and the perplexity ``exp(-lpd / tokens)``; under SVI
        posterior-predictive (per document ``log mean_s p(doc | theta_s)`` over
        ``predictive_samples`` draws, see `BoraResult.evaluate`). Repeated along ``draw``.

``heldout`` (no chain/draw)
    The per-task columns of `BoraResult.evaluate`: ``nll`` (per token) and ``perplexity``, and
    under SVI ``perplexity_at_mean``, ``perplexity_low``, ``perplexity_high`` (the central 95%
    of the task's perplexity over the posterior draws).

``constant_data``
    ``n_train_docs``, ``n_train_tokens`` (scored), ``n_eval_docs``, ``n_eval_tokens`` per task
    (the evaluated split, after ``max_docs_per_task``).

Under MAP every posterior array has ``chain=1, draw=1`` and ``attrs["inference"] == "map"``:
they are point estimates, and their "sd" or "hdi" in ``az.summary`` mean nothing. The
variables repeated along ``draw`` are listed in ``posterior.attrs["constant_along_draw"]``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import __version__

__all__ = ["to_inference_data", "diagonal_fisher", "shrinkage_factors", "import_arviz"]


def import_arviz():
    """Import arviz (0.x), silencing its import-time notice about the 1.x refactor."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="ArviZ is undergoing", category=FutureWarning)
        import arviz

    return arviz


def diagonal_fisher(
    result,
    split: str = "train",
    *,
    max_docs_per_task: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    r"""Diagonal empirical Fisher of each task's log-likelihood at its adapter: ``[D, P]``.

    ``h_di = sum_{n in task d} (d log p(doc_n | theta_d) / d theta_di)^2``, the sum over the
    task's documents of squared *per-document* gradients, at ``theta_d = result.task_adapters[d]``
    (the MAP, or the posterior mean under SVI). It approximates the diagonal of the Hessian of
    the task's negative log-likelihood (the curvature ``h`` of `shrinkage_factors`).

    Per-document gradients come from one forward and one backward pass per batch: each row of
    the batch gets its own copy of its task's adapter (a ``[B, P]`` leaf), and since a row's
    log-likelihood depends only on its own copy, the gradient of the batch's summed
    log-likelihood w.r.t. that leaf holds the ``B`` per-document gradients. The cost is that of
    one training epoch without optimiser steps (on SmolLM2-135M, one backward per document in
    batches of ``batch_size``), and ``B x P`` floats of extra memory.

    Parameters
    ----------
    result
        A `BoraResult`.
    split
        Documents to sum over; the likelihood the adapters were fitted on is ``"train"``.
    max_docs_per_task
        Use a seeded random subset of at most this many documents per task (`TaskSplit.subset`)
        and scale each task's sum by ``n_docs_d / n_used_d``, an unbiased estimate of the full
        sum at a fraction of the cost.
    batch_size
        Documents per forward/backward pass.
    seed
        Seed of the subset.
    progress
        Show a progress bar.

    Returns
    -------
    ``[D, P]`` float32 on the CPU; rows of tasks without documents are zero.
    """
    from ..runtime import autocast_dtype as _autocast_dtype

    _check_positive_int("batch_size", batch_size)
    data = result.corpus.split(split)
    full_counts = torch.as_tensor(data.docs_per_task, dtype=torch.float64)
    if max_docs_per_task is not None:
        data = data.subset(max_docs_per_task, seed=seed)
    used_counts = torch.as_tensor(data.docs_per_task, dtype=torch.float64)
    lm, device = result.lm, result.device
    dtype = _autocast_dtype(result.fit_args.get("autocast"), device)
    theta = result.task_adapters.detach().to(device, torch.float32)
    h = torch.zeros_like(theta)
    total = math.ceil(len(data) / batch_size)
    batches = data.batches(batch_size, sort_by_length=True)
    for batch in tqdm(batches, total=total, disable=not progress, desc="Fisher", leave=False):
        batch = batch.to(device)
        rows = theta.index_select(0, batch.task_ids).requires_grad_(True)  # [B, P], one copy per row
        own = torch.arange(len(batch), device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            nll = lm.sequence_nll(
                batch.input_ids, batch.attention_mask, batch.labels, adapters=rows, task_ids=own
            )
        (grad,) = torch.autograd.grad(nll.sum(), rows)
        h.index_add_(0, batch.task_ids, grad.float().square())
    scale = torch.where(used_counts > 0, full_counts / used_counts.clamp_min(1), 0.0)
    return (h.cpu().double() * scale[:, None]).float()


def _tau_per_param(result) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Group names, ``[G]`` tau values and ``[P]`` group index of the result (float64)."""
    names, index = result.lm.layout.group_index(result.config.precision_groups)
    if set(names) != set(result.tau):
        raise ValueError(
            f"result.tau has groups {list(result.tau)} but precision_groups="
            f"{result.config.precision_groups!r} gives {names}; the result is inconsistent."
        )
    tau = torch.tensor([float(result.tau[g]) for g in names], dtype=torch.float64)
    return names, tau, index


def shrinkage_factors(result, fisher: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    r"""Per task, the share of the posterior precision that comes from the prior.

    For parameter i of task d with prior precision ``tau = tau_g(i)`` and likelihood curvature
    ``h_di``, the (Laplace or mean-field Gaussian) posterior precision is ``h_di + tau`` and the
    prior's share is ``tau / (h_di + tau)``. The factor of task d is its mean over parameters::

        SVI: kappa_d = mean_i tau * sigma_di^2          (sigma = result.task_scales)
        MAP: kappa_d = mean_i tau / (h_di + tau)         (h = fisher)

    Exactly 0 for tau = 0 (independent tasks) and 1 for tau = inf (pooled).

    Parameters
    ----------
    result
        A `BoraResult`.
    fisher
        MAP only: ``[D, P]`` curvature ``h`` (default: `diagonal_fisher` on all training
        documents). Ignored under SVI.

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
            fisher = diagonal_fisher(result)
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
    result,
    *,
    split: str = "test",
    num_samples: int | None = None,
    predictive_samples: int = 8,
    max_docs_per_task: int | None = None,
    fisher: torch.Tensor | None = None,
    fisher_max_docs_per_task: int | None = None,
    seed: int = 0,
    progress: bool = False,
):
    r"""The fitted result as ``arviz.InferenceData`` (groups and variables: see the module doc).

    Parameters
    ----------
    result
        A `BoraResult` (MAP or SVI).
    split
        The held-out split for ``lpd`` and ``perplexity``: ``"test"`` or ``"validation"``
        (``"train"`` works but is not held out).
    num_samples
        SVI only: posterior draws of the task adapters for the distances (default 100; each
        draw costs ``D x P`` random numbers and no forward pass). Draw ``s`` is
        ``result.sample_adapters(1, seed=seed + s)``. Must be left ``None`` for MAP.
    predictive_samples
        SVI only: posterior draws for the held-out predictive quantities, passed to
        ``result.evaluate(split, num_samples=...)``; each costs one pass over the split
        (``0``: at the posterior mean only).
    max_docs_per_task
        Evaluate on a seeded subset of at most this many documents per task (as in
        `BoraResult.evaluate`).
    fisher
        MAP only: the ``[D, P]`` curvature for the shrinkage; default `diagonal_fisher` of the
        training documents (one backward per document, in batches).
    fisher_max_docs_per_task
        MAP only, without ``fisher``: compute it on at most this many training documents per
        task (scaled up to the task's size), for large corpora.
    seed
        Seeds the posterior draws and the evaluation subset.
    progress
        Show progress bars.

    Returns
    -------
    ``arviz.InferenceData`` with groups ``posterior``, ``heldout`` and ``constant_data``;
    ``attrs["inference"]`` is ``"map"`` or ``"svi"``.
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
    _check_positive_int("num_samples", num_samples)
    if isinstance(predictive_samples, bool) or not isinstance(predictive_samples, int) or predictive_samples < 0:
        raise ValueError(
            f"predictive_samples must be an integer >= 0, got predictive_samples={predictive_samples!r}."
        )
    eval_split = result.corpus.split(split)
    if len(eval_split) == 0:
        raise ValueError(
            f"split={split!r} has no documents in this corpus; evaluate on another split "
            f"(documents per split: { {k: len(v) for k, v in result.corpus.splits.items()} })."
        )

    tasks = list(result.tasks)
    D = len(tasks)
    names, tau, _ = _tau_per_param(result)
    theta_g = result.global_adapter.detach().cpu().float()
    norm_g = float(theta_g.norm())
    rel = (lambda d: d / norm_g) if norm_g > 0 else (lambda d: np.full_like(d, np.nan))

    # Distances: per draw under SVI, of the point under MAP.
    at_mean = (result.task_adapters.detach().cpu().float() - theta_g).norm(dim=1).double().numpy()
    if is_svi:
        distance = np.empty((num_samples, D))
        for s in tqdm(range(num_samples), desc="posterior draws", disable=not progress, leave=False):
            draw = result.sample_adapters(1, seed=seed + s)[0]
            distance[s] = (draw.float() - theta_g).norm(dim=1).double().numpy()
    else:
        distance = at_mean[None]
    S = distance.shape[0]

    if fisher is None and not is_svi:
        fisher = diagonal_fisher(result, max_docs_per_task=fisher_max_docs_per_task, seed=seed, progress=progress)
    shrink, shrink_g = shrinkage_factors(result, fisher=fisher)

    # Held-out predictive fit.
    eval_kw = dict(max_docs_per_task=max_docs_per_task, seed=seed, progress=progress)
    if is_svi:
        table = result.evaluate(split, num_samples=predictive_samples, **eval_kw)
    else:
        table = result.evaluate(split, **eval_kw)
    per_task = table.iloc[:D]
    nll_token = per_task["nll"].to_numpy(float, copy=True)  # copies: pandas' arrays may be read-only
    n_tokens = per_task["n_tokens"].to_numpy(np.int64, copy=True)
    lpd = -nll_token * n_tokens

    def rep(values: np.ndarray) -> np.ndarray:
        """``[...]`` -> ``[1, S, ...]``: a point value repeated along the draws."""
        values = np.asarray(values, dtype=np.float64)
        return np.broadcast_to(values, (1, S, *values.shape)).copy()

    cd = ("chain", "draw")
    posterior = {
        "tau": (cd + ("group",), rep(tau.numpy())),
        "distance": (cd + ("task",), distance[None]),
        "relative_distance": (cd + ("task",), rel(distance)[None]),
        "shrinkage": (cd + ("task",), rep(shrink)),
        "shrinkage_by_group": (cd + ("task", "group"), rep(shrink_g)),
        "lpd": (cd + ("task",), rep(lpd)),
        "perplexity": (cd + ("task",), rep(np.exp(nll_token))),
    }
    constant = ["tau", "shrinkage", "shrinkage_by_group", "lpd", "perplexity"]
    if is_svi:
        posterior["distance_at_mean"] = (cd + ("task",), rep(at_mean))
        posterior["relative_distance_at_mean"] = (cd + ("task",), rep(rel(at_mean)))
        constant += ["distance_at_mean", "relative_distance_at_mean"]
    coords = {"chain": [0], "draw": np.arange(S), "task": tasks, "group": names}
    method = "svi" if is_svi else "map"
    post_attrs = {
        "inference": method,
        "constant_along_draw": ", ".join(constant),
        "shrinkage_source": (
            "posterior variances of the mean-field guide: mean_i tau_g(i) * task_scales_di^2" if is_svi
            else "diagonal empirical Fisher h at the MAP: mean_i tau_g(i) / (h_di + tau_g(i))"
        ),
        "note": (
            f"SVI: distances are per posterior draw ({S} draws, draw s = "
            f"result.sample_adapters(1, seed={seed} + s)); tau is an empirical-Bayes point "
            "estimate; lpd and perplexity are posterior-predictive." if is_svi
            else "MAP: point estimates stored as chain=1, draw=1; sd, hdi, ess and r_hat in "
            "az.summary carry no information."
        ),
    }
    posterior_ds = xr.Dataset(
        {k: xr.DataArray(v, dims=dims) for k, (dims, v) in posterior.items()},
        coords=coords, attrs=post_attrs,
    )
    heldout_vars = {"nll": nll_token, "perplexity": np.exp(nll_token)}
    for col in ("perplexity_at_mean", "perplexity_low", "perplexity_high"):
        if col in per_task:
            heldout_vars[col] = per_task[col].to_numpy(float, copy=True)
    heldout_attrs = {
        "split": split,
        "overall_perplexity": float(table.attrs["overall_perplexity"]),
        "predictive_samples": int(table.attrs.get("num_samples", 0)),
        "interval": float(table.attrs.get("interval", math.nan)),
        "max_docs_per_task": -1 if max_docs_per_task is None else int(max_docs_per_task),
    }
    heldout = xr.Dataset(
        {k: ("task", np.asarray(v, dtype=np.float64)) for k, v in heldout_vars.items()},
        coords={"task": tasks}, attrs=heldout_attrs,
    )
    train = result.corpus.split("train")
    constant_data = xr.Dataset(
        {
            "n_train_docs": ("task", np.asarray(train.docs_per_task, dtype=np.int64)),
            "n_train_tokens": ("task", np.asarray(train.tokens_per_task, dtype=np.int64)),
            "n_eval_docs": ("task", per_task["n_docs"].to_numpy(np.int64, copy=True)),
            "n_eval_tokens": ("task", n_tokens),
        },
        coords={"task": tasks}, attrs={"eval_split": split},
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
    if not is_svi:
        attrs["note"] = post_attrs["note"]
    return az.InferenceData(
        posterior=posterior_ds, heldout=heldout, constant_data=constant_data, attrs=attrs
    )


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {name}={value!r}.")
