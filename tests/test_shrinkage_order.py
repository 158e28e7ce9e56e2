"""benchmarks/shrinkage_order.py fits the report tests' fixture and reports what it measured."""

import numpy as np
import pytest
import scipy.stats

from tests.reports import conftest as fixture
from tests.scripts import load_benchmark


def test_its_fit_is_the_report_fixture():
    bench = load_benchmark("shrinkage_order")
    assert bench.DOCS_PER_TASK == fixture.DOCS_PER_TASK and bench.HIDDEN == fixture.HIDDEN
    expected = fixture.fit_kwargs(max_steps=150, **fixture.MAP_TAU)
    del expected["tokenizer"], expected["tau_val_batches"], expected["tau_gradient"]  # passed separately (options)
    assert bench.FIT_KWARGS == expected
    assert fixture.MAP_TAU["tau_val_batches"] == 4  # the benchmark's default
    assert fixture.MAP_TAU["tau_gradient"] == "implicit"  # fit_one's and the benchmark's default


def test_a_short_run_prints_and_returns_the_rows(capsys, tmp_path):
    bench = load_benchmark("shrinkage_order")
    out = bench.main(["--seeds", "0", "--threads", "1", "--max-steps", "12", "--json", str(tmp_path / "s.json")])
    lines = capsys.readouterr().out.splitlines()
    (row,) = out["rows"]
    assert row["seed"] == 0 and row["threads"] == 1 and row["steps"] == 12
    assert row["train_docs"] == [4, 9, 17, 34, 68, 137]
    # the printed Spearman is that of the returned shrinkage, which lies in [0, 1]
    assert np.isclose(row["spearman"], scipy.stats.spearmanr(row["shrinkage"], row["train_docs"]).statistic)
    assert all(0 <= s <= 1 for s in row["shrinkage"])
    assert out["fits"] == 1 and out["passing"] == int(row["spearman"] < -0.5)
    assert lines[2].split()[:3] == ["0", "1", f"{row['spearman']:+.2f}"]
    assert lines[-1].startswith(f"{out['passing']} of 1 fits below -0.5")
    assert (tmp_path / "s.json").exists()


def test_arguments_are_checked():
    bench = load_benchmark("shrinkage_order")
    for bad in (["--seeds", "x"], ["--seeds", "-1"], ["--threads", "0"], ["--tau-val-batches", "0"]):
        with pytest.raises(SystemExit):
            bench.main(bad)
