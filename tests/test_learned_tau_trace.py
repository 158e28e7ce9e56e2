"""benchmarks/learned_tau_trace.py runs end to end on a tiny model and prints every evidence update."""

import json
import math

import pytest

from tests.scripts import load_benchmark


@pytest.fixture(scope="module")
def trace():
    return load_benchmark("learned_tau_trace")


def test_trace_of_a_tiny_fit(trace, capsys):
    out = trace.main(["--tiny", "--device", "cpu", "--max-steps", "40", "--tau-init", "50", "--json"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["groups"] == ["A", "B"] == list(out["tau"])
    # 20 updates per run after a fifth of it: after steps 8 + 2k, k = 1..16.
    assert [u["step"] for u in printed["updates"]] == list(range(9, 40, 2))
    for u in printed["updates"]:
        assert len(u["tau"]) == len(u["gamma"]) == len(u["S"]) == 2
        assert all(t > 0 and math.isfinite(t) for t in u["tau"]) and all(s >= 0 for s in u["S"])
    assert printed["settings"]["tau_curvature"] == "fisher" and printed["settings"]["tau_init"] == 50
    assert math.isfinite(printed["test_perplexity"]) and printed["test_perplexity"] > 1
    text = trace.main(["--tiny", "--device", "cpu", "--max-steps", "20", "--tau-curvature", "empirical"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["step", "tau_A", "gamma_A", "S_A"]
    assert len(text["updates"]) == 16 and lines[-1].startswith("learned tau: A = ")


def test_trace_of_the_validation_method(trace, capsys):
    out = trace.main(["--tiny", "--device", "cpu", "--max-steps", "30", "--tau-method", "validation"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["step", "tau_A", "grad_A", "tau_B", "grad_B"]
    # 15 updates per run after a tenth of it: after steps 3 + 2k, k = 1..13.
    assert [u["step"] for u in out["updates"]] == list(range(4, 30, 2))
    assert all(set(u) == {"step", "tau", "grad"} and all(math.isfinite(g) for g in u["grad"]) for u in out["updates"])
    assert out["settings"]["tau_method"] == "validation" and lines[-1].startswith("learned tau: A = ")
