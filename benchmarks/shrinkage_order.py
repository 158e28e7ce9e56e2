"""Does MAP shrinkage order tasks by their training size, whatever the seed and thread count?

The fit is the one of the report tests' ``map_result`` fixture (tests/reports/conftest.py): six
synthetic tasks of 4 to 137 training documents (`bora_pyro.testing.synthetic_corpus_frame`), a
tiny llama (hidden 48), LoRA rank 4, 150 steps, tau learned from 100 by the validation method.
For every seed (which sets the split, the initialisation and the batch order) and every thread
count (which changes the order of floating-point sums, the cheap proxy for another CPU), it fits,
computes `bora_pyro.reports.arviz.shrinkage_factors` (true Fisher at the global adapter) and prints
the Spearman correlation of shrinkage with the tasks' training sizes (-1: perfectly ordered, the
report test wants < -0.5), the learned tau, the steps run and the validation NLL.

    python benchmarks/shrinkage_order.py                               # seeds 0-5, 1 and 2 threads
    python benchmarks/shrinkage_order.py --seeds 0-13 --tau-val-batches 1
    python benchmarks/shrinkage_order.py --seeds 0-13 --threads 1 --tau-gradient trajectory

The threads run one after another in one process (``torch.set_num_threads``); to measure the two
thread counts side by side, run one process per count, each pinned to its own core
(``OMP_NUM_THREADS=1 taskset -c 0 ... --threads 1`` and ``OMP_NUM_THREADS=2 taskset -c 1 ...
--threads 2``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import scipy.stats
import torch

#: The report tests' fixture (tests/reports/conftest.py; tests/test_shrinkage_order.py checks
#: that the two agree).
DOCS_PER_TASK = (8, 16, 30, 60, 120, 240)
HIDDEN = 48
FIT_KWARGS = dict(rank=4, alpha=8, batch_size=8, lr=1e-2, device="cpu", progress=False, max_steps=150,
                  tau="learn", tau_init=100.0)


def _seeds(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    if not out or min(out) < 0:
        raise argparse.ArgumentTypeError(f"--seeds takes non-negative seeds like 0-5 or 0,3,7, got {text!r}")
    return out


def fit_one(seed: int, threads: int, tau_val_batches: int, max_steps: int, tau_gradient: str = "implicit") -> dict:
    """One fixture fit at ``seed`` with ``threads`` torch threads; its shrinkage and tau."""
    import bora_pyro
    from bora_pyro.data import build_corpus
    from bora_pyro.reports.arviz import shrinkage_factors
    from bora_pyro.testing import char_tokenizer, synthetic_corpus_frame, tiny_causal_lm

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        corpus = build_corpus(synthetic_corpus_frame(DOCS_PER_TASK), char_tokenizer(), max_length=64, seed=seed)
        kwargs = dict(FIT_KWARGS, max_steps=max_steps, tau_val_batches=tau_val_batches, seed=seed,
                      tau_gradient=tau_gradient)
        result = bora_pyro.fit_map(corpus, model=tiny_causal_lm("llama", hidden_size=HIDDEN),
                                   tokenizer=char_tokenizer(), **kwargs)
        shrinkage, _ = shrinkage_factors(result)
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(previous)
    sizes = result.corpus.split("train").docs_per_task
    val = [v for v in result.history["val_nll"] if v == v]  # nan between evaluations
    return {
        "seed": seed,
        "threads": threads,
        "spearman": float(scipy.stats.spearmanr(shrinkage, sizes).statistic),
        "shrinkage": [float(x) for x in shrinkage],
        "train_docs": [int(n) for n in sizes],
        "tau": {g: float(t) for g, t in result.tau.items()},
        "steps": len(result.history["step"]),
        "best_val_nll": min(val) if val else float("nan"),
        "seconds": seconds,
    }


def _run(args) -> list[dict]:
    rows = []
    print(f"MAP shrinkage vs training size (tau_val_batches={args.tau_val_batches}, tau_gradient={args.tau_gradient}, "
          f"{args.max_steps} steps); "
          "Spearman < -0.5 passes the report test")
    print(f"{'seed':>4} {'thr':>3} {'Spearman':>8} {'tau A':>10} {'tau B':>10} {'steps':>5} {'val NLL':>7} "
          f"{'s':>4}  shrinkage (smallest task first)")
    for seed in args.seeds:
        for threads in args.threads:
            row = fit_one(seed, threads, args.tau_val_batches, args.max_steps, args.tau_gradient)
            rows.append(row)
            tau = list(row["tau"].values()) + [float("nan")] * 2
            print(f"{seed:>4} {threads:>3} {row['spearman']:>+8.2f} {tau[0]:>10.4g} {tau[1]:>10.4g} "
                  f"{row['steps']:>5} {row['best_val_nll']:>7.3f} {row['seconds']:>4.0f}  "
                  + " ".join(f"{x:.3f}" for x in row["shrinkage"]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=_seeds, default=_seeds("0-5"), help="e.g. 0-5 or 0,3,7 (default 0-5)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts (default 1 2)")
    parser.add_argument("--tau-val-batches", type=int, default=4,
                        help="validation minibatches per tau update (default 4, the fixture's)")
    parser.add_argument("--tau-gradient", default="implicit", choices=("implicit", "trajectory"),
                        help="how the validation method reads tau's effect (default implicit, the fixture's)")
    parser.add_argument("--max-steps", type=int, default=FIT_KWARGS["max_steps"])
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    if min(args.threads) < 1 or args.tau_val_batches < 1 or args.max_steps < 1:
        parser.error("--threads, --tau-val-batches and --max-steps must be positive")

    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # one "Tokenizing" bar per fit would break the table
    try:
        rows = _run(args)
    finally:
        if bars:
            datasets.enable_progress_bars()
    rho = np.array([r["spearman"] for r in rows])
    summary = {"fits": len(rows), "passing": int((rho < -0.5).sum()), "worst": float(rho.max()),
               "perfect": int((rho <= -0.999).sum()), "tau_val_batches": args.tau_val_batches,
               "tau_gradient": args.tau_gradient,
               "torch": torch.__version__, "python": platform.python_version(),
               "machine": platform.processor() or platform.machine(), "rows": rows}
    print(f"{summary['passing']} of {len(rows)} fits below -0.5 ({summary['perfect']} at -1.00); "
          f"worst Spearman {summary['worst']:+.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
