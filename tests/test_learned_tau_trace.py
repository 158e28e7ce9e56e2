"""benchmarks/learned_tau_trace.py runs end to end on a tiny model and prints every update of tau."""

import json
import math

import pytest

from tests.scripts import load_benchmark


@pytest.fixture(scope="module")
def trace():
    return load_benchmark("learned_tau_trace")


def test_trace_of_a_tiny_fit(trace, capsys):
    out = trace.main(["--tiny", "--device", "cpu", "--max-steps", "40", "--tau-init", "50", "--json",
                      "--tau-method", "evidence"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["groups"] == ["A", "B"] == list(out["tau"])
    # 20 updates per run after a fifth of it: after steps 8 + 2k, k = 1..16.
    assert [u["step"] for u in printed["updates"]] == list(range(9, 40, 2))
    for u in printed["updates"]:
        assert len(u["tau"]) == len(u["gamma"]) == len(u["S"]) == 2
        assert all(t > 0 and math.isfinite(t) for t in u["tau"]) and all(s >= 0 for s in u["S"])
    assert printed["settings"]["tau_curvature"] == "fisher" and printed["settings"]["tau_init"] == 50
    assert math.isfinite(printed["test_perplexity"]) and printed["test_perplexity"] > 1
    text = trace.main(["--tiny", "--device", "cpu", "--max-steps", "20", "--tau-curvature", "empirical",
                       "--tau-method", "evidence"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["step", "tau_A", "gamma_A", "S_A"]
    assert len(text["updates"]) == 16 and lines[-1].startswith("learned tau: A = ")


def test_trace_of_the_validation_method(trace, capsys):
    """The default ("auto") runs the validation method on the tiny corpus (it has validation
    documents), on the schedule tied to the evaluations: with the ``cpu`` configuration's
    evaluations every 25 steps, an update every 25 / 2.5 = 10 steps after min(25, a fifth of the
    30 steps) = 6, i.e. after steps 15 and 25."""
    out = trace.main(["--tiny", "--device", "cpu", "--max-steps", "30"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["step", "tau_A", "grad_A", "tau_B", "grad_B"]
    assert [u["step"] for u in out["updates"]] == [15, 25]
    assert all(set(u) == {"step", "tau", "grad", "grad_implicit"} and all(math.isfinite(g) for g in u["grad"]) for u in out["updates"])
    assert out["settings"]["tau_method"] == "auto" and out["tau_method"] == "validation"
    assert lines[-1].startswith("learned tau: A = ")
