"""MAP at a fixed tau, MAP with learned tau, and SVI (from the learned-tau MAP fit) on the default
Shakespeare data and model, side by side: test perplexities, learned precisions, step times.

    python benchmarks/shakespeare_map_svi.py                # CPU-sized (the demo's settings)
    python benchmarks/shakespeare_map_svi.py --steps 1000 --eval-docs 0 --targets all   # GPU-sized

Prints a Markdown table; the last line is a JSON object with the same numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import bora_pyro
from bora_pyro.config import DataConfig, TrainConfig
from bora_pyro.data import DEFAULT_CHARACTERS, load_shakespeare

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=90)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"], help="module kinds, or 'all'")
    p.add_argument("--fixed-tau", type=float, default=1000.0)
    p.add_argument("--eval-docs", type=int, default=10, help="test speeches per character (0 = all)")
    p.add_argument("--num-samples", type=int, default=4, help="posterior draws for the SVI predictive")
    p.add_argument("--device", default="auto")
    p.add_argument("--autocast", default=None)
    args = p.parse_args()
    targets = ALL if args.targets == ["all"] else args.targets
    k = args.eval_docs or None

    data = load_shakespeare(characters=DEFAULT_CHARACTERS)
    data_config = DataConfig(max_length=args.max_length, tasks=DEFAULT_CHARACTERS)
    train = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=2e-3, max_eval_docs_per_task=4,
                        eval_every=max(1, args.steps // 3), device=args.device, autocast=args.autocast)
    started = time.perf_counter()
    fixed = bora_pyro.fit_map(data, data_config=data_config, train=train, tau=args.fixed_tau,
                              precision_groups="shared", target_modules=targets)
    # The same model and corpus (tokenised and split once) for the other two fits.
    model, tokenizer, corpus = fixed.lm.base_model, fixed.tokenizer, fixed.corpus
    learned = bora_pyro.fit_map(corpus, model=model, tokenizer=tokenizer, train=train, tau="learn",
                                target_modules=targets)
    svi = bora_pyro.fit_svi(None, init=learned, train=train)

    rows = []
    base = fixed.evaluate("test", adapters="base", max_docs_per_task=k)
    rows.append(("base model", base.attrs["overall_perplexity"], "", ""))
    for name, result in ((f"MAP, tau={args.fixed_tau:g}", fixed), ("MAP, learned tau", learned)):
        df = result.evaluate("test", max_docs_per_task=k)
        rows.append((name, df.attrs["overall_perplexity"], _taus(result), _median_step(result)))
    pred = svi.evaluate("test", max_docs_per_task=k, num_samples=args.num_samples)
    last = pred.iloc[-1]
    rows.append(("SVI, posterior mean", last["perplexity_at_mean"], _taus(svi), _median_step(svi)))
    rows.append((f"SVI, posterior predictive ({args.num_samples} draws)", last["perplexity"],
                 f"95% over draws: {last['perplexity_low']:.2f}-{last['perplexity_high']:.2f}", ""))

    device = str(fixed.device)
    print(f"\n{len(DEFAULT_CHARACTERS)} characters, {len(corpus.split('train'))} training speeches, "
          f"{args.steps} steps of {args.batch_size} each, targets {' '.join(targets)}, "
          f"test: {'all' if k is None else f'at most {k}'} speeches per character; device {device}, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; total {time.perf_counter() - started:.0f} s\n")
    print("| fit | test perplexity | tau | median step (s) |")
    print("|---|---|---|---|")
    for name, ppl, tau, step in rows:
        print(f"| {name} | {ppl:.2f} | {tau} | {step if step == '' else f'{step:.2f}'} |")
    ratio = _median_step(svi) / _median_step(learned)
    print(f"\nSVI step / MAP step (learned tau): {ratio:.2f}")
    print(json.dumps({"rows": [[r[0], r[1], r[2], r[3]] for r in rows], "svi_map_step_ratio": ratio,
                      "device": device}))


def _taus(result) -> str:
    return ", ".join(f"{g}={v:.4g}" for g, v in result.tau.items())


def _median_step(result) -> float:
    return statistics.median(result.history["seconds"][1:])


if __name__ == "__main__":
    main()
