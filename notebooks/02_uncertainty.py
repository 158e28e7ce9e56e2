# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Uncertainty: a posterior over the adapters, arviz and the report
#
# `fit_map` (see `01_quickstart.ipynb`) gives one point per task adapter. `fit_svi` fits a
# posterior instead: a mean-field Normal `q(theta_d) = Normal(mu_d, sigma_d)` with one location and
# one scale per adapter entry, the global adapter a point estimate and tau learned by variational
# EM. This notebook
#
# 1. fits BoRA by MAP and then by SVI, starting from the MAP fit,
# 2. summarises the posterior with arviz (`bora_pyro.to_inference_data`, `az.summary`),
# 3. ranks a small grid of tau (and the SVI posterior) the arviz way, `SweepResult.compare()`,
#    next to the test-perplexity table,
# 4. draws a forest plot of each task's distance to the global adapter,
# 5. evaluates the posterior-predictive test perplexity with intervals,
# 6. writes the HTML report.
#
# How the posterior starts: each posterior sd starts at the Laplace value `1 / sqrt(h + tau)`,
# with `h` a Monte-Carlo estimate of the true Fisher of the task's training speeches at the MAP
# adapters (`init_scale="laplace"`, the default), and the scales move with their own learning rate
# (`scale_lr`). So even a short run reports intervals of the right order; they widen as a task's
# training data shrink (see `docs/map-vs-svi.md` for the tiny-LM check against exact Laplace sds).
#
# Run time: about 20 minutes on a 2-core CPU (12 characters, short fits; 19.5 min on 2026-12-03);
# the numbers are those of short runs, not of converged fits.

# %% [markdown]
# ## Settings
#
# The only cell that differs between a real run and the fast mode. Real run: SmolLM2-135M-Instruct
# on the first 12 characters of `DEFAULT_CHARACTERS` (Hamlet, Othello and Macbeth, four each), LoRA
# rank 8 on `q_proj` and `v_proj`, speeches cut to 96 tokens, short fits (MAP, then SVI, then a
# grid of three tau). With the environment variable `BORA_PYRO_FAST=1` (set by the tests) the cell
# swaps in a tiny random model, four characters and a few steps, so that the notebook runs in
# seconds (numbers meaningless).

# %%
import os

import torch

from bora_pyro.data import DEFAULT_CHARACTERS
from bora_pyro.testing import char_tokenizer, tiny_causal_lm

FAST = os.environ.get("BORA_PYRO_FAST") == "1"
SETTINGS = dict(
    characters=list(DEFAULT_CHARACTERS[:12]),  # the tasks
    model="smollm2-135m", tokenizer=None,  # the default base model
    target_modules=["q_proj", "v_proj"],   # LoRA on these layers (rank 8, alpha 16)
    max_length=96,                         # tokens per speech (longer ones are cut)
    batch_size=8, max_steps=60, lr=2e-3,
    eval_every=20, max_eval_docs_per_task=4,  # validation (early stopping) on 4 speeches per character
    eval_docs_per_task=8,                  # test speeches per character in the tables below
    svi_steps=40,                          # SVI steps after the MAP fit
    laplace_passes=1,                      # passes over the training speeches for SVI's starting sds
    num_samples=8,                         # posterior draws for the predictive perplexity
    sweep_taus=(0.0, 1e4, float("inf")),   # the grid ranked by SweepResult.compare()
    sweep_steps=40,                        # MAP steps per tau of the grid
    sweep_out="outputs/02_sweep",
    report="outputs/02_uncertainty_report.html",
)
if FAST:
    torch.set_num_threads(1)
    SETTINGS.update(
        characters=list(DEFAULT_CHARACTERS[:4]), model=tiny_causal_lm(), tokenizer=char_tokenizer(),
        max_length=48, max_steps=30, eval_every=10, eval_docs_per_task=5, svi_steps=30, num_samples=4,
        sweep_steps=10,
    )
print("fast mode" if FAST else "real run", {k: v for k, v in SETTINGS.items() if k not in ("model", "tokenizer")})

# %% [markdown]
# ## MAP fit (as in the quickstart)

# %%
import bora_pyro
from bora_pyro.data import load_shakespeare

data = load_shakespeare(characters=SETTINGS["characters"])
print(f"{len(data)} speeches by {data['task'].nunique()} characters")
data.head(3)

# %%
map_result = bora_pyro.fit_map(
    data,
    model=SETTINGS["model"], tokenizer=SETTINGS["tokenizer"],
    tasks=SETTINGS["characters"],  # task ids in this order
    tau="learn", rank=8, alpha=16, target_modules=SETTINGS["target_modules"],
    max_length=SETTINGS["max_length"], batch_size=SETTINGS["batch_size"],
    max_steps=SETTINGS["max_steps"], lr=SETTINGS["lr"],
    eval_every=SETTINGS["eval_every"], max_eval_docs_per_task=SETTINGS["max_eval_docs_per_task"],
    seed=0,
)
map_result

# %% [markdown]
# ## SVI, starting from the MAP fit
#
# `fit_svi(None, init=map_result)` reuses the MAP fit's corpus and train / validation / test split
# (`data=None`) and its LoRA shape; the posterior locations start at the MAP adapters and the
# posterior standard deviations at the Laplace values (above). Each step maximises the ELBO on a
# minibatch (the KL term to the prior is analytic) and updates tau by variational EM.
#
# `posterior_summary()` gives, per task: training speeches, the distance of the posterior mean to
# the global adapter (absolute and relative to the global adapter's norm) and the mean posterior
# standard deviation of the task's adapter entries.

# %%
post = bora_pyro.fit_svi(
    None, init=map_result, laplace_passes=SETTINGS["laplace_passes"],
    max_steps=SETTINGS["svi_steps"], lr=SETTINGS["lr"], batch_size=SETTINGS["batch_size"],
    eval_every=SETTINGS["eval_every"], max_eval_docs_per_task=SETTINGS["max_eval_docs_per_task"],
    seed=0,
)
print(post)
print("tau under MAP:", map_result.tau)
print("tau under SVI:", post.tau)
post.posterior_summary().sort_values("n_train", ascending=False).reset_index(drop=True)

# %% [markdown]
# ## arviz
#
# `bora_pyro.to_inference_data(post)` returns an `arviz.InferenceData` made of groups of arviz's
# own schema, with `task` as a named dimension:
#
# - `posterior`: each task's `distance` and `relative_distance` to the global adapter, one value
#   per posterior draw of the task adapters;
# - `log_likelihood`: the held-out log-likelihood of every test speech (`documents`, dims
#   `chain, draw, doc`) under the first `predictive_samples` of those draws;
# - `constant_data`: what does not vary over the draws: `tau` per precision group (an
#   empirical-Bayes point estimate), `shrinkage` per task (the share of the task's posterior
#   precision that comes from the prior: 0 = its own data decide, 1 = fully pooled), the distances
#   at the posterior mean, and the training and test sizes.

# %%
import arviz as az

k = SETTINGS["eval_docs_per_task"]
S = SETTINGS["num_samples"]
idata = bora_pyro.to_inference_data(post, max_docs_per_task=k, num_samples=max(100, S), predictive_samples=S)
idata

# %%
print("tau:", idata.constant_data["tau"].to_series().to_dict())
idata.constant_data[["n_train_docs", "shrinkage", "point_relative_distance"]].to_dataframe().sort_values("n_train_docs")

# %%
az.summary(idata, var_names=["relative_distance"], kind="stats", hdi_prob=0.95)

# %% [markdown]
# ## A grid of tau, ranked the arviz way
#
# `bora_pyro.sweep.run_sweep` fits one MAP model per tau on one split (here independent adapters,
# tau = 1e4 and one pooled adapter; the same data settings as above, so the same split and test
# speeches) and tabulates their test perplexity. `SweepResult.compare()` ranks the same fits with
# `az.compare` over their held-out log-likelihood, `log p(speech | theta)` for every test speech.
# The speeches were held out of every fit, so no leave-one-out is needed: `elpd_loo` is the summed
# held-out log predictive density (nats; higher is better), `dse` the standard error of each
# difference to the best fit (from the per-speech differences), `weight` arviz's stacking weights.
# A MAP fit is one point, so its density is the plug-in value; the SVI posterior from above joins
# the ranking (`extra=`) with its posterior-predictive density over `num_samples` draws.
# (`az.loo(idata)` runs on the SVI InferenceData too, but PSIS-LOO re-weights the draws as if each
# test speech had been fitted, which underestimates a held-out density.)

# %%
import math

from bora_pyro.sweep import run_sweep

sweep = run_sweep(
    data, config="cpu", out=SETTINGS["sweep_out"], model=SETTINGS["model"], tokenizer=SETTINGS["tokenizer"],
    characters=SETTINGS["characters"], taus=SETTINGS["sweep_taus"], target_modules=SETTINGS["target_modules"],
    max_length=SETTINGS["max_length"], batch_size=SETTINGS["batch_size"], lr=SETTINGS["lr"],
    max_steps=SETTINGS["sweep_steps"], eval_every=SETTINGS["eval_every"],
    max_eval_docs_per_task=SETTINGS["max_eval_docs_per_task"], eval_docs_per_task=k, progress=False,
)
print(sweep.overall_markdown())

# %%
ranking = sweep.compare(model=SETTINGS["model"], tokenizer=SETTINGS["tokenizer"],
                        extra={"SVI (learned tau)": idata})
ranking["test perplexity"] = [math.exp(-e / int(idata.constant_data["n_eval_tokens"].sum())) for e in ranking["elpd_loo"]]
ranking.round(2)

# %% [markdown]
# ## Forest plot: distance to the global adapter, per posterior draw
#
# One row per task, from the fewest training speeches (top) to the most: the posterior
# distribution of `||theta_d - Theta|| / ||Theta||` over the draws (median, central 50% as the
# thick line, 95% HDI as the thin line). In high dimension a draw's squared distance is the
# posterior mean's plus about the sum of the task's posterior variances, so these intervals sit to
# the right of `relative_distance_at_mean` in the table above and mostly show the posterior spread,
# not how far the task moved.

# %%
import matplotlib.pyplot as plt

by_size = post.posterior_summary().sort_values("n_train")["task"].tolist()
axes = az.plot_forest(
    idata, var_names=["relative_distance"], coords={"task": by_size},
    combined=True, hdi_prob=0.95, figsize=(9, 1.2 + 0.35 * len(by_size)),
)
axes[0].set_title("relative distance to the global adapter, 95% HDI over posterior draws")
plt.show()

# %% [markdown]
# ## Posterior-predictive test perplexity with intervals
#
# `post.evaluate("test", num_samples=S)` draws `S` sets of task adapters from the posterior and
# scores each test speech by `-log mean_s p(speech | theta_s)` (the posterior-predictive
# perplexity, column `perplexity`). `perplexity_low` and `perplexity_high` are the central 95% of
# the task's perplexity over the draws, `perplexity_at_mean` the perplexity at the posterior mean.
# The MAP fit's perplexity on the same speeches is added for comparison.

# %%
import pandas as pd

pred = post.evaluate("test", num_samples=SETTINGS["num_samples"], max_docs_per_task=k)
map_ppl = map_result.evaluate("test", max_docs_per_task=k)
pred["MAP perplexity"] = pd.Series(map_ppl["perplexity"].to_numpy(), index=pred.index)
pred[["task", "n_docs", "n_tokens", "perplexity", "perplexity_low", "perplexity_high",
      "perplexity_at_mean", "MAP perplexity"]].round(2)

# %% [markdown]
# ## The report
#
# `post.report(path)` writes one self-contained HTML file (figures embedded) and a Markdown summary
# next to it: tau, a forest plot of per-task shrinkage, distance against training size,
# per-task perplexity with intervals beside baselines (here the MAP fit), the calibration of
# next-token predictions and a per-task table. It is linked and shown below; the file can be
# opened in any browser or shared on its own.

# %%
import html
import os

from IPython.display import HTML, FileLink, display

report = post.report(
    SETTINGS["report"], baselines={"MAP": map_result},
    max_docs_per_task=k, predictive_samples=SETTINGS["num_samples"],
    idata=idata,  # the InferenceData made above (same test speeches and draws): not computed again
)
display(FileLink(os.path.relpath(report)))  # the HTML file; the Markdown summary is next to it (.md)
# the report itself, in a frame (its styles stay inside)
display(HTML(f'<iframe srcdoc="{html.escape(report.read_text(encoding="utf-8"))}" '
             'style="width: 100%; height: 800px; border: 1px solid #ddd"></iframe>'))
