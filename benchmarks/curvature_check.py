r"""Which curvature does the learned tau see? Exact diagonal curvatures of a tiny LM against the
estimates, at initialisation and near a MAP optimum.

On a tiny random causal LM (``tiny_causal_lm("llama", hidden_size=16, num_layers=1)``, LoRA
rank 1 on all seven projections and the output layer: P = 376, 144 in A and 232 in B; without
the output layer a random model this small barely learns) and a five-task synthetic corpus
(3 to 54 training documents per task), for each task d, at two points:

  init     every theta_d = Theta = the standard LoRA initialisation (B = 0);
  optimum  the end of a MAP run at a fixed tau (AdamW, offset parameterisation, cosine schedule,
           minibatches of 8, as `MAPStepper` runs it),

it computes the diagonal curvature of the task's summed NLL in theta_d by

  hessian  the exact Hessian diagonal (one Hessian-vector product per parameter);
  fisher   the exact true Fisher = generalised Gauss-Newton (the expectation over every
           vocabulary entry at every scored position): THE REFERENCE of the ratios;
  emp      the empirical Fisher, sum over the task's documents of squared per-document gradients
           (what `reports.arviz.diagonal_fisher` and so the MAP shrinkage use);
  fe_run   what `precision.FisherEstimate` holds at the end of the run (B/N times the EMA
           variance of the minibatch gradients of the task adapters, beta = 0.98), i.e. what the
           evidence update of `fit_map(tau="learn")` reads;
  fe_fixed the same estimator fed 50 minibatch gradients at the point itself (no drift of theta);
  mc_run   `curvature.MonteCarloFisher` updated every 5 steps of the run with labels sampled from
           the model (beta = 0.9, i.e. about the last 50 steps, like fe_run);
  mc_fixed the same fed 10 minibatches at the point itself (the cost of fe's window at K = 5).

Printed: ratios estimate / fisher per precision group (median, 10th and 90th percentile over
tasks x entries, the ratio of the group totals, and the median per task); at the optimum the
evidence quantities of each curvature (gamma per group at the fitted tau, one evidence step, the
evidence fixed point with the adapters held fixed) and the MAP shrinkage per task against task size (Spearman).

    PYTHONPATH=. python benchmarks/curvature_check.py   # about 40 s of CPU on one core
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import pandas as pd
import scipy.stats
import torch

from bora_pyro import BoraConfig, BoraResult
from bora_pyro.data import build_corpus
from bora_pyro.inference.curvature import (
    MonteCarloFisher,
    empirical_fisher_diagonal,
    exact_fisher_diagonal,
    hessian_diagonal,
    lm_logits,
)
from bora_pyro.inference.precision import FisherEstimate, evidence_update
from bora_pyro.models import MultiTaskLM
from bora_pyro.reports.arviz import shrinkage_factors
from bora_pyro.testing import char_tokenizer, synthetic_corpus_frame, tiny_causal_lm

DOCS_PER_TASK = (6, 12, 24, 48, 96)
BATCH = 8
MC_EVERY = 5
FE_WINDOW = 50
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tau", type=float, default=30.0, help="fixed tau of the MAP run")
    p.add_argument("--steps", type=int, default=400, help="steps of the MAP run")
    p.add_argument("--lr", type=float, default=3e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-lm-head", dest="lm_head", action="store_false",
                   help="adapt the block projections only (P = 256): the adapters then barely move "
                        "this random model's predictions (training NLL 4.63 -> 4.52)")
    return p.parse_args(argv)


def _setup(seed: int, lm_head: bool):
    tok = char_tokenizer()
    frame = synthetic_corpus_frame(DOCS_PER_TASK, words_per_doc=(3, 6), seed=seed)
    corpus = build_corpus(frame, tok, max_length=48, seed=seed)
    base = tiny_causal_lm("llama", hidden_size=16, num_layers=1, seed=seed)
    base.set_attn_implementation("eager")  # double backward through attention for the exact references
    targets = TARGETS + ["lm_head"] if lm_head else TARGETS
    lm = MultiTaskLM(base, rank=1, alpha=2, target_modules=targets)
    return tok, corpus, lm


def _nll(lm, theta, batch) -> torch.Tensor:
    return lm.sequence_nll(batch.input_ids, batch.attention_mask, batch.labels, adapters=theta,
                           task_ids=batch.task_ids)


def _minibatches(train, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield from train.batches(BATCH, shuffle=True, generator=g, drop_last=True)


def _task_gradient(lm, theta, Theta, tau, batch, N) -> torch.Tensor:
    """Gradient in the task adapters of the negative log joint of one minibatch (what `MAPStepper`
    hands to `FisherEstimate`): tau (theta - Theta) + (N / B) d NLL / d theta."""
    leaf = theta.detach().clone().requires_grad_(True)
    loss = 0.5 * tau * (leaf - Theta).square().sum() + N / len(batch) * _nll(lm, leaf, batch).sum()
    (grad,) = torch.autograd.grad(loss, leaf)
    return grad


def _estimates_at(lm, train, theta, Theta, tau, seed):
    """FisherEstimate (FE_WINDOW gradients) and MonteCarloFisher (FE_WINDOW / MC_EVERY updates)
    fed minibatches at the fixed point ``theta``."""
    N = len(train)
    fe = FisherEstimate(theta.shape, batch_fraction=BATCH / N)
    mc = MonteCarloFisher(train.docs_per_task, theta.shape[1], beta=0.9)
    g = torch.Generator().manual_seed(seed + 1)
    batches = _minibatches(train, seed + 1)
    for k in range(FE_WINDOW):
        batch = next(batches)
        fe.update(_task_gradient(lm, theta, Theta, tau, batch, N))
        if k % MC_EVERY == 0:
            mc.update(lm_logits(lm), theta, batch, generator=g)
    return fe.curvature().double(), mc.curvature().double()


def fit_map(lm, train, init, *, tau, steps, lr, seed):
    """MAP at a fixed tau as `MAPStepper` runs it (offset parameterisation, AdamW, cosine), with a
    `FisherEstimate` fed every step and a `MonteCarloFisher` every MC_EVERY steps."""
    D, N = train.num_tasks, len(train)
    Theta = torch.nn.Parameter(init.clone())
    delta = torch.nn.Parameter(torch.zeros(D, init.shape[0]))
    opt = torch.optim.AdamW([Theta, delta], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    fe = FisherEstimate((D, init.shape[0]), batch_fraction=BATCH / N)
    mc = MonteCarloFisher(train.docs_per_task, init.shape[0], beta=0.9)
    g = torch.Generator().manual_seed(seed + 2)
    batches = _minibatches(train, seed)
    for step in range(steps):
        batch = next(batches)
        theta = Theta + delta
        loss = 0.5 * tau * delta.square().sum() + N / BATCH * _nll(lm, theta, batch).sum()
        opt.zero_grad()
        loss.backward()
        fe.update(delta.grad)  # d loss / d delta = d loss / d theta
        if step % MC_EVERY == 0:
            mc.update(lm_logits(lm), theta.detach(), batch, generator=g)
        opt.step()
        sched.step()
    return (Theta + delta).detach(), Theta.detach(), fe.curvature().double(), mc.curvature().double()


def _ratio_rows(point, curvatures, group_index, group_names, D) -> list[dict]:
    ref = curvatures["fisher"]
    rows = []
    for name, h in curvatures.items():
        if name == "fisher":
            continue
        for gi, gname in enumerate(group_names):
            cols = group_index == gi
            r, f = h[:, cols], ref[:, cols]
            row = {"point": point, "curvature": name, "group": gname}
            defined = f > 1e-12 * float(ref.max())
            if not bool(defined.any()):
                row.update({"median": np.nan, "p10": np.nan, "p90": np.nan, "note": f"fisher = 0, est max {float(r.max()):.2g}"})
            else:
                ratio = (r[defined] / f[defined]).numpy()
                row.update({"median": np.median(ratio), "p10": np.percentile(ratio, 10), "p90": np.percentile(ratio, 90),
                            "total": float(r.sum() / f.sum()), "note": ""})
                for d in range(D):
                    ok = defined[d]
                    row[f"t{d}"] = float(np.median((r[d][ok] / f[d][ok]).numpy())) if bool(ok.any()) else np.nan
            rows.append(row)
    return rows


def _fixed_point(theta, Theta, h, tau0, group_index, prior, iterations=200):
    tau = tau0.clone()
    for _ in range(iterations):
        tau = evidence_update(theta, Theta, h.float(), tau, group_index, prior=prior, max_factor=10.0)
    return tau


def _gamma(h, tau, group_index, D):
    determined = (h / (h + tau[group_index])).sum(0) * (1 - 1 / D)
    return torch.zeros(len(tau), dtype=h.dtype).index_add_(0, group_index, determined)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    tok, corpus, lm = _setup(args.seed, args.lm_head)
    train = corpus.split("train")
    D, P = train.num_tasks, lm.num_params
    group_names, group_index = lm.layout.group_index("ab")
    init = lm.layout.init_global(generator=torch.Generator().manual_seed(args.seed))
    full = [train.batch(list(range(len(train))))]
    fn = lm_logits(lm)
    prior = (1.0, 1e-3)  # fit_map's default Gamma hyperprior
    tau_fit = torch.full((len(group_names),), args.tau)
    n_train = train.docs_per_task
    print(f"tiny LM: llama hidden 16, 1 layer, LoRA rank 1 on 7 projections{' + lm_head' if args.lm_head else ''}, P = {P} "
          f"(A {int((group_index == 0).sum())}, B {int((group_index == 1).sum())}); tasks: {D}, "
          f"training documents {list(map(int, n_train))}, scored tokens {train.num_tokens}; "
          f"MAP run: tau = {args.tau:g}, {args.steps} steps, batch {BATCH}, lr {args.lr:g}")

    def exact(theta):
        return {
            "fisher": exact_fisher_diagonal(fn, theta, full),
            "hessian": hessian_diagonal(fn, theta, full),
            "emp": empirical_fisher_diagonal(fn, theta, full),
        }

    # -- init ---------------------------------------------------------------------------------
    theta0 = init.expand(D, -1).clone()
    at_init = exact(theta0)
    at_init["fe_fixed"], at_init["mc_fixed"] = _estimates_at(lm, train, theta0, init, args.tau, args.seed)
    t_init = time.perf_counter() - t0

    # -- optimum ------------------------------------------------------------------------------
    with torch.no_grad():
        nll0 = float(_nll(lm, theta0, full[0]).sum()) / train.num_tokens
    theta, Theta, fe_run, mc_run = fit_map(lm, train, init, tau=args.tau, steps=args.steps, lr=args.lr, seed=args.seed)
    with torch.no_grad():
        nll1 = float(_nll(lm, theta, full[0]).sum()) / train.num_tokens
    at_opt = exact(theta)
    at_opt["fe_run"], at_opt["mc_run"] = fe_run, mc_run
    at_opt["fe_fixed"], at_opt["mc_fixed"] = _estimates_at(lm, train, theta, Theta, args.tau, args.seed)
    print(f"training NLL per token: {nll0:.3f} at init, {nll1:.3f} after the MAP run")

    rows = _ratio_rows("init", at_init, group_index, group_names, D) + _ratio_rows("optimum", at_opt, group_index, group_names, D)
    ratios = pd.DataFrame(rows)
    print("\nRatio estimate / exact Fisher (GGN), per entry; total = sum of estimate / sum of Fisher over the group; "
          "t0..t4 = median per task (tasks by size, smallest first)")
    print(ratios.to_markdown(index=False, floatfmt=".3g"))

    # -- evidence and shrinkage at the optimum ------------------------------------------------
    result = BoraResult(
        tasks=list(corpus.tasks), task_adapters=theta, global_adapter=Theta,
        tau={g: args.tau for g in group_names},
        config=BoraConfig(rank=1, alpha=2, tau=args.tau, precision_groups="ab"),
        history={}, lm=lm, tokenizer=tok, corpus=corpus, model_spec="<object>",
    )
    S = torch.zeros(len(group_names), dtype=torch.float64).index_add_(
        0, group_index, (theta - Theta).double().square().sum(0))
    shared_index = torch.zeros_like(group_index)
    evidence = []
    for name, h in at_opt.items():
        gamma = _gamma(h, tau_fit.double(), group_index, D)
        one = evidence_update(theta, Theta, h.float(), tau_fit, group_index, prior=prior, max_factor=1e9)
        fixed = _fixed_point(theta, Theta, h, tau_fit, group_index, prior)
        shared = _fixed_point(theta, Theta, h, tau_fit[:1], shared_index, prior)
        shrink, _ = shrinkage_factors(result, fisher=h.float())
        rho = scipy.stats.spearmanr(shrink, n_train).statistic
        evidence.append({
            "curvature": name,
            **{f"gamma_{g}": float(gamma[i]) for i, g in enumerate(group_names)},
            **{f"tau1_{g}": float(one[i]) for i, g in enumerate(group_names)},
            **{f"tau*_{g}": float(fixed[i]) for i, g in enumerate(group_names)},
            "tau*_shared": float(shared[0]),
            "shrinkage by task": " ".join(f"{s:.3f}" for s in shrink),
            "spearman": rho,
        })
    evidence = pd.DataFrame(evidence)
    counts = {g: int((group_index == i).sum()) for i, g in enumerate(group_names)}
    print(f"\nEvidence at the optimum (tau = {args.tau:g}; S_A = {float(S[0]):.4g}, S_B = {float(S[1]):.4g}; "
          f"(D-1) P_g: A {(D - 1) * counts['A']}, B {(D - 1) * counts['B']}). gamma at the fitted tau; "
          "tau1 = one evidence step; tau* = its fixed point with the adapters held fixed; "
          f"shrinkage of tasks of {list(map(int, n_train))} documents, Spearman against size")
    print(evidence.to_markdown(index=False, floatfmt=".4g"))
    print(f"\n{time.perf_counter() - t0:.0f} s in all (init references {t_init:.0f} s), torch threads 1")
    return {"ratios": ratios, "evidence": evidence}


if __name__ == "__main__":
    main()
