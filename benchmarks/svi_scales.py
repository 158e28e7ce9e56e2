r"""Do SVI's posterior sds land where the posterior is? Mean-field sds of `fit_svi` against the
exact Laplace sds of the same posterior on a tiny LM, for several scale initialisations and
learning rates; and the variational-EM tau against MAP's learned tau.

Setup: ``tiny_causal_lm("llama", hidden_size=16, num_layers=1)``, LoRA rank 1 on the seven
projections and the output layer (P = 376), five tasks of the synthetic corpus (``--docs``
training documents). A MAP fit at a fixed tau (full-batch AdamW, so that it ends at the mode)
gives the adapters ``theta``; the reference is the **exact** Laplace diagonal
``1 / sqrt(H_di + tau)`` with ``H`` the exact Hessian diagonal of task d's NLL at ``theta``
(`curvature.hessian_diagonal`). Then `fit_svi(init=map)` at the same fixed tau, for each
setting, and the ratios ``sd_svi / sd_exact``: median, 5th and 95th percentile, the share of
entries within a factor 1.5, and the same for the starting sds (``init``). A second part fits
MAP with a learned tau and SVI from it with a learned tau.

    PYTHONPATH=. python benchmarks/svi_scales.py            # --seed 1 for another corpus

``--recovery`` measures instead the variational-EM tau on corpora drawn from the model with a
known tau (`bora_pyro.testing.generated_corpus`, tau 4 and 25, LoRA rank 2 on the output
layer): MAP with a learned tau (``--map-steps``), SVI from it (``--svi-steps``), the tau of
the update with ``(D - 1) P`` and with ``D P`` degrees of freedom, the two parts of
``E_q[S]`` (locations, variances), the REML tau of the true adapters; with ``--exact``, the
SVI sds against the exact Laplace sds of each task's posterior given Theta (full P x P Hessian
and GGN at the SVI means by `torch.autograd.functional.hessian`; minutes).

    PYTHONPATH=. python benchmarks/svi_scales.py --recovery --map-steps 1200 --svi-steps 300 --exact
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch

import bora_pyro
from bora_pyro.data import build_corpus
from bora_pyro.inference.curvature import hessian_diagonal, lm_logits
from bora_pyro.testing import char_tokenizer, synthetic_corpus_frame, task_hessians, tiny_causal_lm

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tau", type=float, default=30.0, help="fixed tau of the comparison")
    p.add_argument("--docs", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    p.add_argument("--map-steps", type=int, default=400)
    p.add_argument("--svi-steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-2, help="SVI learning rate of the locations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recovery", action="store_true", help="known-tau recovery instead (see above)")
    p.add_argument("--exact", action="store_true", help="with --recovery: exact Laplace sds (slow)")
    return p.parse_args(argv)


def setup(seed: int, docs):
    tok = char_tokenizer()
    frame = synthetic_corpus_frame(tuple(docs), words_per_doc=(3, 6), seed=seed)
    corpus = build_corpus(frame, tok, max_length=48, test_size=0.25, validation_size=0.0, seed=seed)
    base = tiny_causal_lm("llama", hidden_size=16, num_layers=1, seed=seed)
    base.set_attn_implementation("eager")  # double backward through attention (exact Hessian)
    return tok, corpus, base


def ratio_row(name: str, sd: torch.Tensor, exact: torch.Tensor, seconds: float | None = None) -> dict:
    r = (sd.double() / exact).flatten().numpy()
    within = np.mean((r < 1.5) & (r > 1 / 1.5))
    return {"setting": name, "median": np.median(r), "p5": np.percentile(r, 5), "p95": np.percentile(r, 95),
            "within 1.5x": within, "seconds": seconds}


def true_adapters(true_tau: float, layout) -> tuple[torch.Tensor, torch.Tensor]:
    """The generating ``theta`` ``[D, P]`` and ``Theta`` ``[P]`` of `generated_corpus` (seed 0,
    its default tasks), redrawn with the same generator."""
    g = torch.Generator().manual_seed(0)
    _, group = layout.group_index("ab")
    Theta = layout.init_global(generator=g) + (group == 1) * torch.randn(layout.size, generator=g)
    return Theta + torch.randn(6, layout.size, generator=g) / true_tau**0.5, Theta


def recovery(args) -> dict:
    """Known-tau recovery of the variational-EM tau (see the module docstring)."""
    from bora_pyro.testing import generated_corpus

    rows, sd_rows = [], []
    for true_tau in (4.0, 25.0):
        t = time.perf_counter()
        corpus, base, tok = generated_corpus(true_tau)
        kw = dict(model=base, tokenizer=tok, rank=2, alpha=4, target_modules=["lm_head"], precision_groups="shared",
                  batch_size=16, device="cpu", progress=False, patience=None, seed=args.seed)
        map_fit = bora_pyro.fit_map(corpus, tau="learn", tau_init=100.0, max_steps=args.map_steps, lr=2e-2, **kw)
        svi = bora_pyro.fit_svi(None, init=map_fit, max_steps=args.svi_steps, lr=args.lr, **kw)
        mu, sd, Th = svi.task_adapters.double(), svi.task_scales.double(), svi.global_adapter.double()
        D, P = mu.shape
        S_loc, S_var = float((mu - Th).square().sum()), float(sd.square().sum())
        theta, _ = true_adapters(true_tau, svi.lm.layout)
        trace = [h[0] for h in svi.history["tau"]]
        rows.append({"true tau": true_tau, "REML at true adapters":
                     (D - 1) * P / float((theta - theta.mean(0)).square().sum()),
                     "MAP": map_fit.tau["all"], "SVI": svi.tau["all"], "SVI at 1/2 run": trace[len(trace) // 2],
                     "SVI, D P form": D * P / (S_loc + S_var), "S locations": S_loc, "S variances": S_var,
                     "seconds": time.perf_counter() - t})
        print(rows[-1], flush=True)
        if args.exact:
            tau, train = svi.tau["all"], corpus.split("train")
            for name, Hd in (("hessian", task_hessians(svi.lm, mu, train, kind="hessian")),
                             ("ggn", task_hessians(svi.lm, mu, train, kind="ggn"))):
                precision = Hd + tau * torch.eye(P, dtype=torch.float64)
                marginal = torch.diagonal(torch.linalg.inv(precision), dim1=-2, dim2=-1)
                diagonal = torch.diagonal(precision, dim1=-2, dim2=-1).clamp_min(1e-12).reciprocal()
                for ref, var in (("(diag H + tau)^-1/2 (mean-field optimum)", diagonal),
                                 ("diag((H + tau)^-1)^1/2 (Laplace marginal)", marginal)):
                    sd_rows.append({"true tau": true_tau, "curvature": name, "reference": ref,
                                    "min eig": float(torch.linalg.eigvalsh(precision).min()),
                                    "sum var ref": float(var.sum()), "sum var SVI": S_var,
                                    **ratio_row("", sd, var.sqrt())})
                    print(sd_rows[-1], flush=True)
    table = pd.DataFrame(rows)
    print(f"\nKnown tau: MAP {args.map_steps} steps, SVI {args.svi_steps} steps from it (lr {args.lr:g})")
    print(table.to_markdown(index=False, floatfmt=".4g"))
    if sd_rows:
        sds = pd.DataFrame(sd_rows).drop(columns=["setting", "seconds"])
        print("\nSVI sd / exact Laplace sd at the SVI means (task posterior given Theta)")
        print(sds.to_markdown(index=False, floatfmt=".3g"))
    return {"recovery": table, "sds": pd.DataFrame(sd_rows)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    if args.recovery:
        return recovery(args)
    t0 = time.perf_counter()
    tok, corpus, base = setup(args.seed, args.docs)
    n_train = len(corpus.split("train"))
    common = dict(model=base, tokenizer=tok, rank=1, alpha=2, target_modules=TARGETS, device="cpu",
                  progress=False, seed=args.seed)
    map_fit = bora_pyro.fit_map(corpus, tau=args.tau, max_steps=args.map_steps, lr=3e-2, batch_size=n_train,
                                patience=None, **common)
    train = corpus.split("train")
    full = [train.batch(list(range(len(train))))]
    H = hessian_diagonal(lm_logits(map_fit.lm), map_fit.task_adapters, full)
    precision = H + args.tau
    print(f"P = {map_fit.task_adapters.shape[1]}, training documents {train.docs_per_task.tolist()}, "
          f"tau = {args.tau:g}; H + tau > 0 on {float((precision > 0).double().mean()):.3f} of entries "
          f"({time.perf_counter() - t0:.0f} s)")
    exact = precision.clamp_min(1e-12).rsqrt()
    rows = []
    settings = [
        ("number 1e-3, scale_lr = lr", dict(init_scale=1e-3, scale_lr=args.lr)),
        ("number 1e-3, scale_lr = 0.02", dict(init_scale=1e-3, scale_lr=0.02)),
        ("number 1e-3, scale_lr = 0.05", dict(init_scale=1e-3, scale_lr=0.05)),
        ("laplace (1 pass), scale_lr = lr", dict(init_scale="laplace", laplace_passes=1, scale_lr=args.lr)),
        ("laplace (2 passes), scale_lr = 0.02", dict(init_scale="laplace", laplace_passes=2, scale_lr=0.02)),
        ("laplace (2 passes), scale_lr = 0.05", dict(init_scale="laplace", laplace_passes=2, scale_lr=0.05)),
        ("laplace (2 passes), scale_lr = 0.1", dict(init_scale="laplace", laplace_passes=2, scale_lr=0.1)),
    ]
    for name, kw in settings:
        t = time.perf_counter()
        if kw["init_scale"] == "laplace":
            start = bora_pyro.fit_svi(None, init=map_fit, tau=args.tau, max_steps=1, lr=1e-12, scale_lr=1e-12,
                                      **{k: v for k, v in kw.items() if k != "scale_lr"},
                                      **{k: v for k, v in common.items() if k not in ("model", "rank", "alpha", "target_modules")})
            rows.append(ratio_row(f"  init of: {name}", start.task_scales, exact))
        svi = bora_pyro.fit_svi(None, init=map_fit, tau=args.tau, max_steps=args.svi_steps, lr=args.lr, batch_size=8,
                                patience=None, **kw,
                                **{k: v for k, v in common.items() if k not in ("model", "rank", "alpha", "target_modules")})
        rows.append(ratio_row(name, svi.task_scales, exact, time.perf_counter() - t))
        print(rows[-1])
    table = pd.DataFrame(rows)
    print(f"\nsd_svi / sd_exact_laplace after {args.svi_steps} SVI steps (batch 8, lr {args.lr:g}), fixed tau {args.tau:g}")
    print(table.to_markdown(index=False, floatfmt=".3g"))

    # -- learned tau: MAP evidence vs SVI variational EM ---------------------------------------
    taus = []
    learned = bora_pyro.fit_map(corpus, tau="learn", tau_init=100.0, max_steps=args.map_steps, lr=3e-2,
                                batch_size=8, patience=None, **common)
    taus.append({"fit": "MAP learned", **learned.tau})
    for name, kw in [("SVI, laplace, scale_lr 0.05", dict(init_scale="laplace", scale_lr=0.05)),
                     ("SVI, number 1e-3, scale_lr = lr", dict(init_scale=1e-3, scale_lr=args.lr)),
                     ("SVI, number 1e-3, scale_lr 0.05", dict(init_scale=1e-3, scale_lr=0.05))]:
        svi = bora_pyro.fit_svi(None, init=learned, max_steps=args.svi_steps, lr=args.lr, batch_size=8,
                                patience=None, **kw,
                                **{k: v for k, v in common.items() if k not in ("model", "rank", "alpha", "target_modules")})
        taus.append({"fit": name, **svi.tau})
    taus = pd.DataFrame(taus)
    print(f"\nLearned tau (MAP: evidence, {args.map_steps} steps; SVI: variational EM, {args.svi_steps} steps from it)")
    print(taus.to_markdown(index=False, floatfmt=".4g"))
    print(f"\n{time.perf_counter() - t0:.0f} s in all, torch threads 1")
    return {"sds": table, "taus": taus}


if __name__ == "__main__":
    main()
