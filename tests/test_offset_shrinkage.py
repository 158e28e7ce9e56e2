"""benchmarks/offset_shrinkage.py runs on a saved tiny fit: lambda = 1 is the fit itself, lambda = 0
every task on the global adapter."""

import math

import pytest

import bora_pyro
from bora_pyro.testing import char_tokenizer, synthetic_corpus_frame, tiny_causal_lm
from tests.scripts import load_benchmark


@pytest.fixture(scope="module")
def shrinkage():
    return load_benchmark("offset_shrinkage")


def test_shrinkage_grid_of_a_saved_fit(shrinkage, tmp_path, capsys):
    model_dir = tmp_path / "model"
    tiny_causal_lm("llama", hidden_size=32, seed=0).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    result = bora_pyro.fit_map(synthetic_corpus_frame((8, 16, 30)), model=str(model_dir), tau=100.0, max_steps=6,
                               batch_size=4, rank=2, alpha=4, max_length=48, device="cpu", progress=False)
    result.save(tmp_path / "fit")
    rows = shrinkage.main([str(tmp_path / "fit"), "--lambdas", "0", "1", "--test-docs", "3"])
    assert [(r["lambda_A"], r["lambda_B"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert len(capsys.readouterr().out.splitlines()) == 4
    own = result.evaluate("test", max_docs_per_task=3).attrs["overall_perplexity"]
    pooled = result.evaluate("test", adapters="global", max_docs_per_task=3).attrs["overall_perplexity"]
    assert math.isclose(rows[-1]["test"], own, rel_tol=1e-5)
    assert math.isclose(rows[0]["test"], pooled, rel_tol=1e-5)
