"""fit_map end to end on a tiny random LM and a small synthetic multi-task corpus."""

import math

import numpy as np
import pytest
import torch

import bora_pyro
from bora_pyro.data import build_corpus
from bora_pyro.testing import char_tokenizer, synthetic_corpus_frame, tiny_causal_lm


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(synthetic_corpus_frame((16, 30, 60)), char_tokenizer(), max_length=64, seed=0)


def _fit(corpus, tau, **kw):
    kwargs = dict(model=tiny_causal_lm("llama", hidden_size=48), tokenizer=char_tokenizer(), tau=tau,
                  rank=4, alpha=8, max_steps=150, batch_size=8, lr=1e-2, device="cpu", progress=False)
    kwargs.update(kw)
    return bora_pyro.fit_map(corpus, **kwargs)


@pytest.fixture(scope="module")
def learned(corpus):
    return _fit(corpus, "learn", tau_init=100.0)


def test_fit_lowers_held_out_perplexity_below_the_base_model(learned):
    base = learned.evaluate("test", adapters="base")
    bora = learned.evaluate("test")
    assert list(bora["task"]) == ["task0", "task1", "task2", "overall"]
    assert (bora["perplexity"].iloc[:3] < base["perplexity"].iloc[:3]).all()
    assert bora.attrs["overall_perplexity"] < 0.7 * base.attrs["overall_perplexity"]
    assert bora["n_docs"].iloc[-1] == len(learned.corpus.split("test"))
    assert bora["n_tokens"].iloc[-1] == sum(bora["n_tokens"].iloc[:3])


def test_learned_tau_stays_finite_and_tasks_stay_apart(learned):
    taus = learned.tau
    assert set(taus) == {"A", "B"}
    assert all(0 < t < 1e6 and math.isfinite(t) for t in taus.values()), taus
    theta, Theta = learned.task_adapters, learned.global_adapter
    distance = (theta - Theta).norm(dim=1) / Theta.norm()
    assert (distance > 1e-3).all(), distance
    # Apart in what they predict: each task is better served by its own adapter than the global one.
    own = learned.evaluate("test")
    shared = learned.evaluate("test", adapters="global")
    assert (own["nll"].iloc[:3].to_numpy() < shared["nll"].iloc[:3].to_numpy()).all()


def test_history_and_result_fields(learned):
    h = learned.history_frame()
    assert {"step", "loss", "train_nll", "val_nll", "tau_A", "tau_B"} <= set(h.columns)
    assert np.isfinite(h["loss"]).all()
    assert h["train_nll"].iloc[-20:].mean() < h["train_nll"].iloc[:20].mean()
    assert learned.task_adapters.shape == (3, learned.lm.num_params)
    assert "tasks=3" in repr(learned)


def test_save_then_load_reproduces_evaluate_exactly(learned, tmp_path):
    path = learned.save(tmp_path / "run")
    assert sorted(p.name for p in path.iterdir()) == [
        ".bora_pyro", "adapters.safetensors", "config.json", "corpus.json", "corpus.safetensors", "history.json"]
    with pytest.raises(ValueError, match="model object"):
        bora_pyro.load_result(path)
    loaded = bora_pyro.load_result(path, model=learned.lm.base_model, tokenizer=learned.tokenizer)
    assert loaded.tau == learned.tau and loaded.tasks == learned.tasks
    a, b = learned.evaluate("test"), loaded.evaluate("test")
    assert a.equals(b)
    torch.testing.assert_close(loaded.task_adapters, learned.task_adapters, rtol=0, atol=0)


def test_same_seed_same_result(corpus):
    a = _fit(corpus, 50.0, max_steps=10)
    b = _fit(corpus, 50.0, max_steps=10)
    torch.testing.assert_close(a.task_adapters, b.task_adapters, rtol=0, atol=0)


def test_split_seed_fixes_the_documents_while_the_training_seed_varies():
    """``split_seed`` fixes the train / validation / test split and the evaluated subsets;
    ``seed`` then changes only the training (initialisation, batch order): two fits with seeds 0
    and 1 and split_seed 5 hold the same documents in every split (and record split seed 5) and
    reach different adapters. Without ``split_seed`` the seed moves the split, as before."""
    frame = synthetic_corpus_frame((16, 30, 60))

    def fit(**kw):
        return _fit(frame, 50.0, max_steps=6, max_length=64, max_eval_docs_per_task=2, **kw)

    def docs(result, split):
        part = result.corpus.split(split)  # each document's task and its row in the data
        return sorted(zip(part.task_ids.tolist(), part.source_index.tolist()))

    a, b = fit(seed=0, split_seed=5), fit(seed=1, split_seed=5)
    for split in ("train", "validation", "test"):
        assert docs(a, split) == docs(b, split), split
    assert a.corpus.options["seed"] == b.corpus.options["seed"] == 5 and a.fit_args["split_seed"] == 5
    assert not torch.equal(a.task_adapters, b.task_adapters)
    c, d = fit(seed=0), fit(seed=1)
    assert docs(c, "test") != docs(d, "test") and docs(c, "test") == docs(fit(seed=2, split_seed=0), "test")
    with pytest.raises(ValueError, match=r"split_seed must be an integer >= 0, got split_seed=-1"):
        fit(split_seed=-1)
    # a corpus built with a split seed keeps it: fits of it pick their early-stopping subset
    # with it whatever their training seed (as `bora sweep --split-seed` does)
    from bora_pyro.data import TaskSplit

    built = build_corpus(frame, char_tokenizer(), max_length=64, split_seed=5)
    seeds, subset = [], TaskSplit.subset

    def spy(self, max_docs_per_task, *, seed=0):
        seeds.append(seed)
        return subset(self, max_docs_per_task, seed=seed)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TaskSplit, "subset", spy)
        for seed in (0, 1):
            assert _fit(built, 50.0, max_steps=2, seed=seed, max_eval_docs_per_task=2).fit_args["split_seed"] == 5
    assert seeds == [5, 5] and built.options["seed"] == 5
    # the one rule the sweep's tables and the demo read
    from bora_pyro.config import DataConfig, TrainConfig, split_seed

    assert split_seed(DataConfig(split_seed=5), TrainConfig(seed=1)) == 5
    assert split_seed(DataConfig(), TrainConfig(seed=1)) == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tau": -1.0}, "tau=-1.0 must be >= 0"),
        ({"tau": "big"}, "tau='big' is not understood"),
        ({"rank": 0}, "rank must be a positive integer"),
        ({"batch_size": 1000}, "batch_size=1000 is larger than"),
        ({"precision_groups": "layer"}, "precision_groups='layer' is not valid"),
        ({"autocast": "fp8"}, "autocast='fp8' is not valid"),
        ({"lr_per_tau": 1e-3, "tau": "learn"}, "lr_per_tau"),
        ({"target_modules": ["c_attn"]}, "Valid module kinds"),
    ],
)
def test_bad_arguments_get_clear_errors(corpus, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _fit(corpus, kwargs.pop("tau", 10.0), **kwargs)


def test_unknown_task_at_evaluation_is_a_clear_error(learned):
    with pytest.raises(ValueError, match="task9"):
        learned.adapter("task9")
