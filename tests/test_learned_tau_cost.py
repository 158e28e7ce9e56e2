"""benchmarks/learned_tau_cost.py runs end to end on a tiny model and reports what it measured."""

import math

import pytest

from tests.scripts import load_benchmark


def test_cost_of_a_learned_tau_on_a_tiny_model(capsys):
    cost = load_benchmark("learned_tau_cost")
    out = cost.main(["--tiny", "--steps", "12", "--rounds", "2"])
    lines = capsys.readouterr().out.splitlines()
    # both fits ran the same 12 steps in each round, in alternating order
    assert [(r["round"], r["first"], r["steps"]) for r in out["rows"]] == [(1, "learned", 12), (2, "fixed", 12)]
    for r in out["rows"]:
        assert r["learned_s"] > 0 and r["fixed_s"] > 0 and math.isclose(r["ratio"], r["learned_s"] / r["fixed_s"])
    total = sum(r["learned_s"] for r in out["rows"]) / sum(r["fixed_s"] for r in out["rows"])
    assert math.isclose(out["ratio"], total)
    # the default ("auto") ran the validation method: evaluations every 3 steps, so an update every
    # round(3 / 2.5) = 1 step after min(3, a fifth of 12) = 2 steps: 10 updates
    assert out["tau_method"] == "validation" and out["tau_updates"] == 10
    assert out["tau_val_batches"] == 1
    assert lines[0].startswith("learned tau (validation, 10 updates of 1 validation minibatch(es)) vs tau = 10000, "
                               "12 steps each")
    assert lines[-1].startswith("all rounds: learned / fixed = ")


def test_cost_with_several_validation_minibatches_per_update_and_bad_counts(capsys):
    cost = load_benchmark("learned_tau_cost")
    out = cost.main(["--tiny", "--steps", "6", "--tau-val-batches", "2"])
    # the learned fit itself ran with two validation minibatches per update (read from its fit_args)
    assert out["tau_val_batches"] == 2 and out["tau_updates"] > 0
    for bad in (["--rounds", "0"], ["--tau-val-batches", "0"]):
        with pytest.raises(SystemExit) as stop:
            cost.main(["--tiny", *bad])
        assert stop.value.code == 2
    assert "--tau-val-batches must be at least 1" in capsys.readouterr().err
