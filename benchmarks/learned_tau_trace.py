r"""Trace of MAP's learned tau: tau per precision group at every update, with the implicit
validation gradient ``dV / d log tau`` (the validation method, the default's choice when there
are validation documents) or gamma and S (``--tau-method evidence``).

Runs `bora_pyro.fit_map` with ``tau="learn"`` on the data and settings of the ``cpu`` sweep
configuration (`bora_pyro.sweep.SWEEP_CONFIGS["cpu"]`: 12 Shakespeare characters, the default
model SmolLM2-135M, 100 steps of 8 speeches), with the given starting tau, curvature, seed,
length and early stopping, and prints one line per evidence update (the record
``history["tau_update"]`` of `bora_pyro.inference.map.MAPStepper`) and the final test perplexity
(on the sweep's ``eval_docs_per_task`` documents per task), the learned tau, the step kept and
the fit's wall time::

    PYTHONPATH=. python benchmarks/learned_tau_trace.py --seed 0      # the default (auto: validation)
    PYTHONPATH=. python benchmarks/learned_tau_trace.py --tau-method evidence
    PYTHONPATH=. python benchmarks/learned_tau_trace.py --max-steps 100   # about the earlier cpu configuration (100 steps)

``--tiny`` runs the same on a tiny random LM and a synthetic corpus instead (seconds; for tests).
``--json`` prints the whole trace as one JSON line at the end.
"""

from __future__ import annotations

import argparse
import math
import time

import bora_pyro
from bora_pyro.config import TAU_METHODS
from bora_pyro.files import dumps_json
from bora_pyro.sweep import SWEEP_CONFIGS


def _data_and_settings(args):
    """``(data, fit keywords)`` of the ``cpu`` sweep (or the tiny stand-in), with the arguments."""
    config = SWEEP_CONFIGS["cpu"]()
    data_settings = {k: v for k, v in config.data.to_dict().items() if k != "version"}
    kwargs = {**data_settings, **config.fit_keywords()}
    kwargs.update(tau="learn", tau_init=args.tau_init, tau_method=args.tau_method, tau_lr=args.tau_lr,
                  tau_curvature=args.tau_curvature,
                  tau_curvature_batches=args.tau_curvature_batches, seed=args.seed,
                  progress=not args.json, device=args.device)
    if args.max_steps is not None:
        kwargs["max_steps"] = args.max_steps
    if args.patience is not None:
        kwargs["patience"] = args.patience
    eval_docs = config.eval_docs_per_task
    if args.tiny:
        from bora_pyro.testing import char_tokenizer, synthetic_corpus_frame, tiny_causal_lm

        kwargs.update(model=tiny_causal_lm("llama", hidden_size=32), tokenizer=char_tokenizer(),
                      target_modules=None, max_length=64, rank=2)
        if args.max_steps is None:
            kwargs["max_steps"] = 40
        return synthetic_corpus_frame((8, 16, 30, 60)), kwargs, eval_docs
    from bora_pyro.data import load_shakespeare

    kwargs["tasks"] = list(config.characters)
    return load_shakespeare(characters=config.characters), kwargs, eval_docs


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tau-init", type=float, default=1e3, help="starting tau of every group")
    parser.add_argument("--tau-method", default="auto", choices=TAU_METHODS,
                        help="auto (default): validation when the split has validation documents")
    parser.add_argument("--tau-lr", type=float, default=0.5, help="validation: Adam step of log tau")
    parser.add_argument("--tau-curvature", default="fisher", choices=("fisher", "empirical"))
    parser.add_argument("--tau-curvature-batches", type=int, default=None, help="default: the 15%% budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=None, help="default: the cpu config's (600, with early stopping)")
    parser.add_argument("--patience", type=int, default=None, help="evaluations without improvement before stopping")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tiny", action="store_true", help="a tiny random LM on synthetic data (for tests)")
    parser.add_argument("--json", action="store_true", help="print the trace as one JSON line at the end")
    args = parser.parse_args(argv)

    data, kwargs, eval_docs = _data_and_settings(args)
    started = time.perf_counter()
    result = bora_pyro.fit_map(data, **kwargs)
    seconds = time.perf_counter() - started
    groups = list(result.tau)
    updates = result.history["tau_update"]
    method = result.fit_args["tau_method"]  # the method that ran ("auto" resolved)
    if not args.json:
        terms = ("grad",) if method == "validation" else ("gamma", "S")
        print(f"{'step':>5}  " + "  ".join(" ".join(f"{n + '_' + g:>10}" for n in ("tau", *terms)) for g in groups))
        for u in updates:
            cells = [" ".join(f"{u[n][i]:10.4g}" for n in ("tau", *terms)) for i in range(len(groups))]
            print(f"{u['step']:5d}  " + "  ".join(cells))
    test = result.evaluate("test", max_docs_per_task=eval_docs, seed=args.seed)
    out = {
        "settings": {k: v for k, v in vars(args).items()},
        "tau_method": method,
        "groups": groups,
        "updates": updates,
        "tau": result.tau,
        "test_perplexity": float(test.attrs["overall_perplexity"]),
        "best_step": result.fit_args["best_step"],
        "stopped_early": result.fit_args["stopped_early"],
        "steps_run": len(result.history["step"]),
        "seconds": seconds,
    }
    if args.json:
        print(dumps_json(out))
    else:
        tau = ", ".join(f"{g} = {v:.4g}" for g, v in result.tau.items())
        print(f"learned tau: {tau}; test perplexity {out['test_perplexity']:.3f} (best step {out['best_step']}, "
              f"{out['steps_run']} steps run, {seconds:.1f} s)")
    if not math.isfinite(out["test_perplexity"]):
        raise SystemExit("the test perplexity is not finite")
    return out


if __name__ == "__main__":
    main()
