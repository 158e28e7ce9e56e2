"""benchmarks/tau_gradient_noise.py runs end to end on a tiny model and reports what it measured."""

import math

import pytest

from tests.scripts import load_benchmark


def test_gradient_spread_over_validation_minibatches_on_a_tiny_model(capsys, tmp_path):
    noise = load_benchmark("tau_gradient_noise")
    out = noise.main(["--tiny", "--json", str(tmp_path / "noise.json")])
    lines = capsys.readouterr().out.splitlines()
    # one pass over every validation document in minibatches of the fit's 8 (the last one smaller)
    assert out["batch_size"] == 8 and out["batches"] == math.ceil(out["validation_docs"] / 8)
    row = out["groups"]["all"]
    # the corpus was generated with tau = 4 and fitted at 20: the validation likelihood says lower
    # tau on average (a positive dV / d log tau), as the fit test of tests/inference/test_hyper.py
    # shows it does; the spread is real (sd > 0) and the SNR of four minibatches is twice one's
    assert row["mean"] > 0 and row["sd"] > 0
    assert math.isclose(row["snr_1"], row["mean"] / row["sd"]) and math.isclose(row["snr_4"], 2 * row["snr_1"])
    assert 0.5 <= row["same_sign"] <= 1.0 and row["batches_for_snr_1"] == math.ceil(1 / row["snr_1"] ** 2)
    assert lines[0].startswith(f"tau gradient dV/dlog tau over {out['batches']} validation minibatches of 8")
    assert lines[2].split()[0] == "all"
    assert (tmp_path / "noise.json").exists()


def test_arguments_are_checked():
    noise = load_benchmark("tau_gradient_noise")
    with pytest.raises(SystemExit):
        noise.main([])  # neither a result nor --tiny
    with pytest.raises(SystemExit):
        noise.main(["--tiny", "--batch-size", "0"])
