r"""Post-hoc shrinkage of a saved MAP fit's task offsets: validation and test perplexity of
``Theta + lambda_g (theta_d - Theta)`` for a grid of ``lambda`` per precision group (A, B).

A diagnosis for the learned tau (docs/learned-precision.md, section 4): could a fit at too small
a tau be repaired after training by shrinking its offsets, with ``lambda`` chosen on validation?
Forward passes only (one over the validation split and one over the test subset per cell)::

    PYTHONPATH=. python benchmarks/offset_shrinkage.py runs/sweep-cpu/fits/learn --lambdas 0 0.3 0.6 1

Prints one line per ``(lambda_A, lambda_B)``; the test subset is the cpu sweep's (12 speeches
per character, seed 0) unless ``--test-docs`` says otherwise.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from bora_pyro.result import load_result


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("fit", help="folder of a saved MAP result (BoraResult.save) with precision_groups='ab'")
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.3, 0.6, 1.0])
    parser.add_argument("--test-docs", type=int, default=12, help="test documents per task")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    result = load_result(args.fit)
    if list(result.tau) != ["A", "B"]:
        raise SystemExit(f"{args.fit}: needs precision groups A and B, found {list(result.tau)}")
    theta, Theta = result.task_adapters.clone(), result.global_adapter.clone()
    _, group = result.lm.layout.group_index("ab")
    rows = []
    for lam_a, lam_b in itertools.product(args.lambdas, repeat=2):
        lam = torch.where(group == 0, lam_a, lam_b).to(theta.dtype)
        result.task_adapters = Theta + lam * (theta - Theta)
        started = time.perf_counter()
        validation = result.evaluate("validation").attrs["overall_perplexity"]
        test = result.evaluate("test", max_docs_per_task=args.test_docs, seed=args.seed).attrs["overall_perplexity"]
        rows.append({"lambda_A": lam_a, "lambda_B": lam_b, "validation": validation, "test": test})
        print(f"lambda_A={lam_a:g} lambda_B={lam_b:g}: validation perplexity {validation:.3f}, "
              f"test perplexity {test:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
    return rows


if __name__ == "__main__":
    main()
