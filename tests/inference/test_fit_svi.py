"""fit_svi end to end on a tiny random LM: a posterior over every task adapter."""

import math

import pytest
import torch

import bora_pyro
from bora_pyro.data import build_corpus
from bora_pyro.testing import char_tokenizer, synthetic_corpus_frame, tiny_causal_lm


@pytest.fixture(scope="module")
def fits():
    corpus = build_corpus(synthetic_corpus_frame((8, 24, 72)), char_tokenizer(), max_length=64, seed=0)
    common = dict(model=tiny_causal_lm("llama", hidden_size=48), tokenizer=char_tokenizer(),
                  batch_size=8, device="cpu", progress=False)
    map_result = bora_pyro.fit_map(corpus, tau="learn", tau_init=100.0, rank=4, alpha=8,
                                   max_steps=120, lr=1e-2, **common)
    svi_result = bora_pyro.fit_svi(corpus, init=map_result, max_steps=120, lr=5e-3,
                                   init_scale=1e-2, **common)
    return map_result, svi_result


def test_svi_result_has_a_posterior(fits):
    map_result, svi = fits
    assert svi.method == "svi" and map_result.method == "map"
    assert svi.task_scales.shape == svi.task_adapters.shape
    assert (svi.task_scales > 0).all()
    assert set(svi.tau) == {"A", "B"} and all(0 < t < math.inf for t in svi.tau.values())
    assert torch.isfinite(torch.tensor(svi.history["loss"])).all()


def test_thinner_tasks_get_wider_posteriors(fits):
    _, svi = fits
    summary = svi.posterior_summary()
    n_train = summary["n_train"].to_numpy()
    sd = summary["mean_sd"].to_numpy()
    order = n_train.argsort()
    assert (sd[order][:-1] > sd[order][1:]).all(), (n_train, sd)


def test_sample_adapters_follow_the_posterior(fits):
    _, svi = fits
    draws = svi.sample_adapters(200, seed=1)
    assert draws.shape == (200, *svi.task_adapters.shape)
    torch.testing.assert_close(draws.mean(0), svi.task_adapters, atol=4 * svi.task_scales.max().item() / 200**0.5, rtol=0)
    ratio = draws.std(0) / svi.task_scales
    assert 0.8 < ratio.mean() < 1.2


def test_posterior_predictive_evaluation(fits):
    _, svi = fits
    df = svi.evaluate("test", num_samples=4)
    assert {"perplexity", "perplexity_at_mean", "perplexity_low", "perplexity_high"} <= set(df.columns)
    assert df.attrs["num_samples"] == 4
    assert (df["perplexity_low"] <= df["perplexity_high"]).all()
    # Jensen: the predictive density averages probabilities, so it is never worse than the
    # average over draws of the per-draw log density; bounded by the worst draw.
    assert (df["perplexity"] <= df["perplexity_high"] * (1 + 1e-9)).all()
    point = svi.evaluate("test", num_samples=0)
    assert "perplexity_low" not in point.columns
    assert point["perplexity"].tolist() == pytest.approx(df["perplexity_at_mean"].tolist(), rel=1e-9)


def test_map_result_is_a_point_and_says_so(fits):
    map_result, _ = fits
    with pytest.raises(ValueError, match="fit_svi"):
        map_result.sample_adapters(3)
    with pytest.raises(ValueError, match="num_samples=2 needs an SVI result"):
        map_result.evaluate("test", num_samples=2)


def test_svi_save_load_round_trip(fits, tmp_path):
    _, svi = fits
    path = svi.save(tmp_path / "svi")
    loaded = bora_pyro.load_result(path, model=svi.lm.base_model, tokenizer=svi.tokenizer)
    assert loaded.method == "svi"
    torch.testing.assert_close(loaded.task_scales, svi.task_scales, rtol=0, atol=0)
    assert loaded.evaluate("test", num_samples=2).equals(svi.evaluate("test", num_samples=2))


def test_init_must_match(fits):
    map_result, _ = fits
    other = build_corpus(synthetic_corpus_frame((8, 24)), char_tokenizer(), max_length=64, seed=0)
    with pytest.raises(ValueError, match="other tasks"):
        bora_pyro.fit_svi(other, init=map_result, max_steps=1, model=map_result.lm.base_model,
                          tokenizer=map_result.tokenizer, device="cpu", progress=False)
