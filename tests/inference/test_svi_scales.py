"""SVI scales that start at the Laplace diagonal and move: checked against the exact Laplace sds
of a tiny LM, a known tau, and predictive intervals that widen as a task's data shrink."""

import string

import pandas as pd
import pytest
import scipy.stats
import torch

import bora_pyro
from bora_pyro.config import TrainConfig
from bora_pyro.data import build_corpus
from bora_pyro.inference.curvature import hessian_diagonal, lm_logits
from bora_pyro.inference.svi import laplace_scales
from bora_pyro.models import MultiTaskLM
from bora_pyro.testing import char_tokenizer, synthetic_corpus_frame, tiny_causal_lm
from tests.conftest import assert_close

# ---- the Laplace diagonal and the setting -----------------------------------------------------


def test_laplace_scales_formula_and_limits():
    h = torch.tensor([[3.0, 0.0, 8.0], [1.0, 4.0, -2.0]])  # a negative entry counts as 0
    group = torch.tensor([0, 0, 1])
    tau = torch.tensor([1.0, 2.0])
    assert_close(laplace_scales(h, tau, group, mode="fixed"),
                 [[4 ** -0.5, 1.0, 10 ** -0.5], [2 ** -0.5, 5 ** -0.5, 2 ** -0.5]], rtol=1e-6, atol=0)
    # pooled: one adapter with a flat prior, the curvatures of all tasks add up
    assert_close(laplace_scales(h, tau, group, mode="pooled"), [4 ** -0.5, 4 ** -0.5, 8 ** -0.5], rtol=1e-6, atol=0)
    # independent: 1 / sqrt(h), an entry without curvature floored at 1% of its group's median
    # precision (group 0: positive precisions 3, 1, 4, median 3 -> floor 0.03; group 1: 8 -> 0.08)
    assert_close(laplace_scales(h, tau, group, mode="independent"),
                 [[3 ** -0.5, 0.03 ** -0.5, 8 ** -0.5], [1.0, 0.5, 0.08 ** -0.5]], rtol=1e-6, atol=0)


def test_init_scale_setting():
    assert TrainConfig().init_scale == "laplace"
    assert TrainConfig(init_scale=" Laplace ").init_scale == "laplace"
    assert TrainConfig(init_scale="0.01").init_scale == 0.01  # as the command line passes it
    assert TrainConfig(init_scale=1e-3).init_scale == 1e-3
    with pytest.raises(ValueError, match="did you mean 'laplace'"):
        TrainConfig(init_scale="laplase")
    with pytest.raises(ValueError, match="init_scale"):
        TrainConfig(init_scale=0.0)
    with pytest.raises(ValueError, match="scale_lr"):
        TrainConfig(scale_lr=-1.0)
    with pytest.raises(ValueError, match="laplace_passes"):
        TrainConfig(laplace_passes=0)


# ---- (a) mean-field sds against the exact Laplace sds of a tiny LM --------------------------

TAU = 30.0


@pytest.fixture(scope="module")
def laplace_problem():
    """A tiny LM (P = 184: LoRA rank 1 on q, v and the output layer), four tasks, a MAP fit at a
    fixed tau run to its mode (full batches), and the exact Laplace sds 1 / sqrt(H + tau)."""
    tok = char_tokenizer()
    frame = synthetic_corpus_frame((3, 6, 12, 24), words_per_doc=(3, 6), seed=0)
    corpus = build_corpus(frame, tok, max_length=48, test_size=0.25, validation_size=0.0, seed=0)
    base = tiny_causal_lm("llama", hidden_size=16, num_layers=1)
    base.set_attn_implementation("eager")  # double backward through attention (exact Hessian)
    n_train = len(corpus.split("train"))
    common = dict(tokenizer=tok, device="cpu", progress=False, patience=None)
    map_fit = bora_pyro.fit_map(corpus, model=base, tau=TAU, rank=1, alpha=2,
                                target_modules=["q_proj", "v_proj", "lm_head"],
                                max_steps=300, lr=3e-2, batch_size=n_train, **common)
    train = corpus.split("train")
    H = hessian_diagonal(lm_logits(map_fit.lm), map_fit.task_adapters, [train.batch(list(range(len(train))))])
    return map_fit, H, common, n_train


def test_svi_sds_match_the_exact_laplace_sds_of_a_tiny_lm(laplace_problem):
    """Started from the MAP, SVI's sds stay within a factor 1.5 of the exact Laplace sds.

    Stated tolerances: the median ratio within 1.5x and at least 90% of the entries within 1.5x.
    SVI runs on full batches with 4 draws per step, so that what is checked is the method, not
    minibatch noise (measured: median 1.00, 99.9% of entries within 1.5x; the starting
    Fisher-Laplace sds 1.00 and 98%, moved by up to 176% in the fit). The fit must also have moved the scales (it is not checking the start).
    """
    map_fit, H, common, n_train = laplace_problem
    precision = H + TAU
    assert float((precision > 0).double().mean()) > 0.99  # a mode: the Laplace sds exist
    exact = precision.clamp_min(1e-12).rsqrt()
    defined = precision > 0
    svi = bora_pyro.fit_svi(None, init=map_fit, tau=TAU, max_steps=200, lr=1e-2, batch_size=n_train,
                            num_particles=4, **common)
    start = bora_pyro.fit_svi(None, init=map_fit, tau=TAU, max_steps=1, lr=1e-12, scale_lr=1e-12,
                              batch_size=n_train, **common).task_scales
    assert float((svi.task_scales / start - 1).abs().max()) > 0.05  # the scales moved
    ratio = (svi.task_scales.double() / exact)[defined]
    within = float(((ratio < 1.5) & (ratio > 1 / 1.5)).double().mean())
    assert 1 / 1.5 < float(ratio.median()) < 1.5, float(ratio.median())
    assert within >= 0.9, within


def test_scales_started_from_a_number_move_to_the_posterior(laplace_problem):
    """From init_scale=1e-3 (30x too small) the log-scales at scale_lr reach the posterior's sds;
    at the locations' learning rate (the old behaviour) they stay far below."""
    map_fit, H, common, n_train = laplace_problem
    exact = (H + TAU).clamp_min(1e-12).rsqrt()
    kw = dict(tau=TAU, max_steps=200, lr=1e-2, batch_size=n_train, num_particles=4, init_scale=1e-3, **common)
    fast = bora_pyro.fit_svi(None, init=map_fit, scale_lr=0.05, **kw)
    slow = bora_pyro.fit_svi(None, init=map_fit, scale_lr=1e-2, **kw)
    fast_ratio = float((fast.task_scales.double() / exact).median())
    slow_ratio = float((slow.task_scales.double() / exact).median())
    assert 1 / 1.5 < fast_ratio < 1.5, fast_ratio
    assert slow_ratio < 0.2, slow_ratio


# ---- (b) recovery of a known tau --------------------------------------------------------------

DOCS = (10, 20, 40, 80, 160, 160)


def _generated(true_tau: float):
    """Tasks generated by a tiny random LM whose task adapters (LoRA on the output layer, so that
    every entry shows in the next-token distribution) are drawn around a global one with tau."""
    tok = char_tokenizer()
    allowed = torch.tensor([tok.convert_tokens_to_ids(c) for c in string.ascii_lowercase + " "])
    base = tiny_causal_lm("llama", seed=0)
    lm = MultiTaskLM(base, rank=2, alpha=4, target_modules=["lm_head"])
    g = torch.Generator().manual_seed(0)
    _, group = lm.layout.group_index("ab")
    Theta = lm.layout.init_global(generator=g) + (group == 1) * torch.randn(lm.num_params, generator=g)
    theta = Theta + torch.randn(len(DOCS), lm.num_params, generator=g) / true_tau**0.5
    task_ids = torch.repeat_interleave(torch.arange(len(DOCS)), torch.tensor(DOCS))
    ids = torch.full((len(task_ids), 1), tok.bos_token_id)
    with torch.no_grad():
        for _ in range(40):
            logits = lm(ids, adapters=theta, task_ids=task_ids)[:, -1, allowed]
            ids = torch.cat([ids, allowed[torch.multinomial(logits.softmax(-1), 1, generator=g)]], 1)
    lm.unwrap()
    frame = pd.DataFrame({"task": [f"t{d}" for d in task_ids.tolist()],
                          "text": [tok.decode(row[1:]) for row in ids]})
    corpus = build_corpus(frame, tok, max_length=64, test_size=0.2, validation_size=0.0, seed=0)
    return corpus, base, tok


@pytest.mark.xfail(strict=True, reason=(
    "Not met yet (issue 12): variational EM from Laplace scales lands at 7.4 (tau 4) and 14.3 "
    "(tau 25) after 400 steps, 6.1 and 12.3 after 1000, still drifting: within a factor 2, "
    "not 1.5. See docs/map-vs-svi.md."))
@pytest.mark.parametrize("true_tau", [4.0, 25.0])
def test_svi_recovers_a_known_tau(true_tau):
    corpus, base, tok = _generated(true_tau)
    kw = dict(model=base, tokenizer=tok, rank=2, alpha=4, target_modules=["lm_head"],
              precision_groups="shared", batch_size=16, device="cpu", progress=False, patience=None)
    map_fit = bora_pyro.fit_map(corpus, tau="learn", tau_init=100.0, max_steps=300, lr=2e-2, **kw)
    svi = bora_pyro.fit_svi(None, init=map_fit, max_steps=400, lr=1e-2, **kw)
    assert true_tau / 1.5 < svi.tau["all"] < 1.5 * true_tau, (svi.tau, map_fit.tau)


# ---- (c) predictive intervals widen as a task's training data shrink -------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_predictive_intervals_widen_as_training_data_shrink(seed):
    tok = char_tokenizer()
    corpus = build_corpus(synthetic_corpus_frame((6, 12, 24, 48, 96), seed=seed), tok, max_length=48,
                          validation_size=0.0, seed=seed)
    common = dict(model=tiny_causal_lm("llama", hidden_size=32, num_layers=1, seed=seed), tokenizer=tok,
                  rank=2, alpha=4, batch_size=8, device="cpu", progress=False, seed=seed, patience=None)
    map_fit = bora_pyro.fit_map(corpus, tau="learn", tau_init=100.0, max_steps=150, lr=1e-2, **common)
    svi = bora_pyro.fit_svi(None, init=map_fit, max_steps=100, lr=1e-2, **common)
    table = svi.evaluate("test", num_samples=16).iloc[:-1]  # the last row is "overall"
    width = (table["perplexity_high"] / table["perplexity_low"]).to_numpy()
    n_train = corpus.split("train").docs_per_task
    rho = scipy.stats.spearmanr(width, n_train).statistic
    # measured: Spearman -0.7 (seed 0) and -0.9 (seed 1); the smallest task's interval spans
    # 4.3% and 3.2% of its perplexity (0.3% and 0.2% with init_scale=1e-3 at scale_lr = lr)
    assert rho < 0, (width, n_train)
    assert width[n_train.argmin()] > 1.01, width
