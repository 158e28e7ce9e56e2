r"""What a learned tau costs: wall time of a MAP fit with ``tau="learn"`` against a fixed-tau fit
of the same length, side by side in one run.

Both fits use the data and settings of the ``cpu`` sweep configuration
(`bora_pyro.sweep.SWEEP_CONFIGS["cpu"]`: 12 Shakespeare characters, the default model
SmolLM2-135M, LoRA rank 8 on ``q_proj`` and ``v_proj``, minibatches of 8 speeches, a validation
evaluation every 25 steps) and run exactly ``--steps`` steps (no early stopping, so that both do
the same optimiser steps and evaluations); the base model and the corpus are loaded once and
shared. The learned fit uses the library's default ``tau_method`` (``"auto"``: the validation
method, whose updates are tied to the evaluations) unless ``--tau-method`` says otherwise; the
fixed fit uses ``--tau`` (1e4). Each round fits both, in alternating order (the first fit of a
process pays for warming caches), and the table gives the seconds of each fit, the seconds per
step and the ratio learned / fixed per round and over all rounds (the bar of issue 12: at most
1.25)::

    PYTHONPATH=. python benchmarks/learned_tau_cost.py                    # 100 steps, 1 round
    PYTHONPATH=. python benchmarks/learned_tau_cost.py --steps 200 --rounds 2
    PYTHONPATH=. python benchmarks/learned_tau_cost.py --tau-method evidence

``--tiny`` runs the same on a tiny random LM and a synthetic corpus (seconds; for tests).
``--json`` prints the measurements as one JSON line at the end.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import bora_pyro
from bora_pyro.config import TAU_METHODS
from bora_pyro.files import dumps_json
from bora_pyro.sweep import SWEEP_CONFIGS


def _data_and_settings(args) -> tuple[object, dict]:
    """``(corpus, fit keywords)`` of the ``cpu`` sweep (or the tiny stand-in), the base model
    loaded once and passed as an object."""
    from bora_pyro.data import build_corpus

    config = SWEEP_CONFIGS["cpu"]()
    kwargs = config.fit_keywords()
    kwargs.update(max_steps=args.steps, patience=None, seed=args.seed, progress=False, device=args.device)
    data_settings = {k: v for k, v in config.data.to_dict().items() if k != "tasks"}
    if args.tiny:
        from bora_pyro.testing import char_tokenizer, synthetic_corpus_frame, tiny_causal_lm

        base, tokenizer = tiny_causal_lm("llama", hidden_size=32), char_tokenizer()
        kwargs.update(target_modules=None, rank=2, eval_every=max(1, args.steps // 4))
        data_settings["max_length"] = 64
        frame, tasks = synthetic_corpus_frame((8, 16, 30, 60)), None
    else:
        from bora_pyro.data import load_shakespeare
        from bora_pyro.models.base import load_base_model

        base, tokenizer, _ = load_base_model(device=args.device)
        frame, tasks = load_shakespeare(characters=config.characters), list(config.characters)
    corpus = build_corpus(frame, tokenizer, tasks=tasks, seed=args.seed, **data_settings)
    kwargs.update(model=base, tokenizer=tokenizer)
    return corpus, kwargs


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="steps of every fit (default 100)")
    parser.add_argument("--rounds", type=int, default=1, help="pairs of fits, in alternating order")
    parser.add_argument("--tau", type=float, default=1e4, help="the fixed fit's tau")
    parser.add_argument("--tau-method", default="auto", choices=TAU_METHODS, help="the learned fit's method")
    parser.add_argument("--tau-val-batches", type=int, default=1,
                        help="the learned fit's validation minibatches per tau update (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny random LM on synthetic data (for tests)")
    parser.add_argument("--json", action="store_true", help="print the measurements as one JSON line at the end")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rounds < 1 or args.tau_val_batches < 1:
        parser.error(f"--steps, --rounds and --tau-val-batches must be at least 1 (got {args.steps}, "
                     f"{args.rounds} and {args.tau_val_batches})")

    corpus, kwargs = _data_and_settings(args)
    fits = {"learned": dict(tau="learn", tau_method=args.tau_method, tau_val_batches=args.tau_val_batches),
            "fixed": dict(tau=args.tau)}
    rows = []
    for r in range(args.rounds):
        order = ["learned", "fixed"] if r % 2 == 0 else ["fixed", "learned"]
        seconds, ran = {}, {}
        for name in order:
            started = time.perf_counter()
            result = bora_pyro.fit_map(corpus, **{**kwargs, **fits[name]})
            seconds[name] = time.perf_counter() - started
            ran[name] = len(result.history["step"])
            if name == "learned":
                method, updates, tau = (result.fit_args["tau_method"], len(result.history["tau_update"]),
                                        result.tau)
                val_batches = result.fit_args["tau_val_batches"]
        if ran["learned"] != ran["fixed"]:
            raise SystemExit(f"the fits ran {ran} steps; they must run the same number")
        rows.append({"round": r + 1, "first": order[0], "steps": ran["fixed"], **{f"{k}_s": v for k, v in seconds.items()},
                     "ratio": seconds["learned"] / seconds["fixed"]})
    total = {k: sum(row[f"{k}_s"] for row in rows) for k in fits}
    out = {
        "rows": rows, "ratio": total["learned"] / total["fixed"], "tau_method": method, "tau_updates": updates,
        "tau_val_batches": val_batches,
        "learned_tau": tau, "fixed_tau": args.tau, "settings": vars(args),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "bora_pyro": bora_pyro.__version__},
    }
    print(f"learned tau ({method}, {updates} updates of {val_batches} validation minibatch(es)) vs tau = {args.tau:g}, {rows[0]['steps']} steps each, "
          f"{torch.get_num_threads()} threads:")
    print(f"{'round':>5} {'first':>8} {'learned s':>10} {'fixed s':>9} {'learned s/step':>15} {'fixed s/step':>13} "
          f"{'ratio':>6}")
    for row in rows:
        n = row["steps"]
        print(f"{row['round']:5d} {row['first']:>8} {row['learned_s']:10.1f} {row['fixed_s']:9.1f} "
              f"{row['learned_s'] / n:15.3f} {row['fixed_s'] / n:13.3f} {row['ratio']:6.3f}")
    print(f"all rounds: learned / fixed = {out['ratio']:.3f} (bar: <= 1.25)")
    if args.json:
        print(dumps_json(out))
    return out


if __name__ == "__main__":
    main()
