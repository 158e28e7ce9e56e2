"""How noisy is the validation method's tau gradient? Its spread over validation minibatches.

``tau_method="validation"`` moves log tau by Adam steps down ``dV / d log tau``, the implicit
gradient of the NLL ``V`` of ``tau_val_batches`` validation minibatches
(`bora_pyro.inference.hyper`). This script takes one fitted state (a result saved by
``bora demo --out`` / ``bora fit --out``) and computes that gradient on *every* validation
minibatch of the fit's batch size, one pass over all validation documents, with one curvature
for all of them (``N_d`` times each task's mean squared per-document validation gradient over
the whole pass; the tasks without a validation document take the pooled mean, as the probe
does). It prints, per precision group, the mean gradient over the minibatches, their sd, the
signal-to-noise ratio of one minibatch (``|mean| / sd``) and of the average of ``k`` of them
(``sqrt(k)`` times that, the minibatches being disjoint), and the fraction of minibatches whose
gradient has the sign of the mean: what decides whether one Adam step of log tau follows the
signal or a coin.

    python benchmarks/tau_gradient_noise.py /tmp/demo                  # a saved result
    python benchmarks/tau_gradient_noise.py --tiny                     # a few seconds, tiny LM

With ``--tiny`` it first fits a tiny generated corpus (`bora_pyro.testing.generated_corpus`)
and measures that; the tests run it so.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch


def _gradients(result, batch_size: int, seed: int):
    """``[n_batches, G]`` implicit gradients, one per validation minibatch, and the group names.

    The per-minibatch validation gradients and the curvature come from the fit's own
    `ValidationProbe`, with ``beta=1`` (a plain average over the whole pass)."""
    from bora_pyro.inference.hyper import ValidationData, ValidationProbe, implicit_tau_gradient

    split = result.corpus.split("validation")
    if not len(split):
        raise SystemExit("error: the result's corpus has no validation documents; fit with validation_size > 0.")
    device = result.device
    theta = result.task_adapters.to(device)
    theta_g = result.global_adapter.to(device)
    names, group_index = result.lm.layout.group_index(result.config.precision_groups)
    group_index = group_index.to(device)
    tau = torch.tensor([result.tau[g] for g in names], dtype=torch.float32, device=device)
    docs_per_task = result.corpus.split("train").docs_per_task
    data = ValidationData.for_lm(result.lm, iter(()), docs_per_task)
    probe = ValidationProbe(data.gradients, docs_per_task, theta.shape[1], beta=1.0, device=device)
    generator = torch.Generator().manual_seed(seed)
    per_batch = [probe(theta, batch.to(device))  # [D, P] each; adds the squared gradients
                 for batch in split.batches(min(batch_size, len(split)), shuffle=True, generator=generator,
                                            pack=result.fit_args.get("packing", True))]
    curvature = probe.curvature()
    return torch.stack([implicit_tau_gradient(theta - theta_g, curvature, tau, group_index, v)
                        for v in per_batch]), list(names)


def measure(result, *, batch_size: int | None = None, seed: int = 0) -> dict:
    """Per group: mean, sd, SNR of one minibatch and of 4, and the fraction with the mean's sign."""
    batch_size = batch_size or int(result.fit_args.get("batch_size", 8))
    grads, groups = _gradients(result, batch_size, seed)
    n = grads.shape[0]
    out = {"batches": n, "batch_size": batch_size, "tau": dict(result.tau), "groups": {}}
    for g, name in enumerate(groups):
        col = grads[:, g].double()
        mean, sd = float(col.mean()), float(col.std()) if n > 1 else float("nan")
        snr = abs(mean) / sd if sd > 0 else math.inf
        out["groups"][name] = {
            "mean": mean, "sd": sd, "snr_1": snr, "snr_4": 2 * snr,
            "same_sign": float((torch.sign(col) == math.copysign(1.0, mean)).double().mean()),
            "batches_for_snr_1": math.ceil(1 / snr**2) if snr > 0 else None,
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("result", nargs="?", help="a saved result folder (bora demo --out DIR)")
    parser.add_argument("--tiny", action="store_true", help="fit and measure a tiny generated corpus instead")
    parser.add_argument("--batch-size", type=int, default=None, help="validation minibatch size (default: the fit's)")
    parser.add_argument("--seed", type=int, default=0, help="order of the validation documents")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)
    if (args.result is None) == (not args.tiny):
        parser.error("give a saved result folder or --tiny (not both)")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    start = time.perf_counter()
    if args.tiny:
        import bora_pyro
        from bora_pyro.testing import generated_corpus

        corpus, base, tok = generated_corpus(4.0, validation_size=0.3)
        result = bora_pyro.fit_map(corpus, model=base, tokenizer=tok, tau=20.0, max_steps=60, lr=2e-2,
                                   batch_size=8, rank=2, alpha=4, target_modules=["lm_head"],
                                   precision_groups="shared", device="cpu", progress=False, patience=None)
        where = "tiny generated corpus, fixed tau 20, 60 steps"
    else:
        from bora_pyro import load_result

        result = load_result(args.result, device="cpu")
        where = args.result
    out = measure(result, batch_size=args.batch_size, seed=args.seed)
    out["validation_docs"] = len(result.corpus.split("validation"))
    out.update(source=where, seconds=time.perf_counter() - start, torch=torch.__version__,
               threads=torch.get_num_threads())
    print(f"tau gradient dV/dlog tau over {out['batches']} validation minibatches of {out['batch_size']} "
          f"({where}; tau {', '.join(f'{k}={v:.4g}' for k, v in out['tau'].items())})")
    print(f"{'group':>6} {'mean':>10} {'sd':>10} {'SNR 1':>7} {'SNR 4':>7} {'sign=mean':>10} {'k for SNR 1':>12}")
    for name, row in out["groups"].items():
        k = row["batches_for_snr_1"]
        print(f"{name:>6} {row['mean']:>10.4g} {row['sd']:>10.4g} {row['snr_1']:>7.3f} {row['snr_4']:>7.3f} "
              f"{row['same_sign']:>10.2f} {k if k is not None else '-':>12}")
    print(f"{out['seconds']:.1f} s, {out['threads']} threads, torch {out['torch']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
