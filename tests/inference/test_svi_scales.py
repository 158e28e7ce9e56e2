"""SVI scales that start at the Laplace diagonal and move: checked against the exact Laplace sds
of a tiny LM; the variational-EM update of tau against a brute-force maximisation of the ELBO;
predictive intervals that widen as a task's data shrink. (Recovery of a known tau:
tests/inference/test_recovery.py.)"""

import math

import pytest
import scipy.optimize
import scipy.stats
import torch

import bora_pyro
from bora_pyro.config import TrainConfig
from bora_pyro.data import build_corpus
from bora_pyro.inference.svi import laplace_scales, variational_em_tau
from bora_pyro.testing import char_tokenizer, synthetic_corpus_frame, task_hessians, tiny_causal_lm
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
    for mode in ("pooled", "independent"):  # the model's number of groups instead of a read of group_index.max()
        assert torch.equal(laplace_scales(h, tau, group, mode=mode, num_groups=2), laplace_scales(h, tau, group, mode=mode))


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
    H_full = task_hessians(map_fit.lm, map_fit.task_adapters, corpus.split("train"))
    H = torch.diagonal(H_full, dim1=-2, dim2=-1)
    return map_fit, H, common, n_train, H_full


def test_svi_sds_match_the_exact_laplace_sds_of_a_tiny_lm(laplace_problem):
    """Started from the MAP, SVI's sds stay within a factor 1.5 of the exact Laplace sds: those of
    the diagonal precision ``1 / sqrt(H_ii + tau)`` (the mean-field optimum of a Gaussian) and the
    marginal sds of the full Laplace covariance ``(H_d + tau I)^-1``.

    Stated tolerances (diagonal): the median ratio within 1.5x and at least 90% of the entries within 1.5x.
    SVI runs on full batches with 4 draws per step, so that what is checked is the method, not
    minibatch noise (measured: median 1.00, 99.9% of entries within 1.5x; the starting
    Fisher-Laplace sds 1.00 and 98%, moved by up to 176% in the fit). The fit must also have moved the scales (it is not checking the start).
    """
    map_fit, H, common, n_train, H_full = laplace_problem
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
    # Against the sds of the full Laplace posterior of each task given Theta (the covariance
    # (H_d + tau I)^-1 from the exact P x P Hessian), which a mean-field guide underestimates
    # where entries are correlated (LoRA's A and B are). Stated: median ratio within 1.5x and at
    # least 85% of the entries within 1.5x (measured: median 0.999, p5 0.65, 94% within 1.5x).
    cov_precision = H_full + TAU * torch.eye(H_full.shape[-1], dtype=H_full.dtype)
    assert float(torch.linalg.eigvalsh(cov_precision).min()) > 0  # measured 27: a proper Laplace
    marginal = torch.diagonal(torch.linalg.inv(cov_precision), dim1=-2, dim2=-1).sqrt()
    full_ratio = svi.task_scales.double() / marginal
    full_within = float(((full_ratio < 1.5) & (full_ratio > 1 / 1.5)).double().mean())
    assert 1 / 1.5 < float(full_ratio.median()) < 1.5, float(full_ratio.median())
    assert full_within >= 0.85, full_within


def test_scales_started_from_a_number_move_to_the_posterior(laplace_problem):
    """From init_scale=1e-3 (30x too small) the log-scales at scale_lr reach the posterior's sds;
    at the locations' learning rate (the old behaviour) they stay far below."""
    map_fit, H, common, n_train, H_full = laplace_problem
    exact = (H + TAU).clamp_min(1e-12).rsqrt()
    kw = dict(tau=TAU, max_steps=200, lr=1e-2, batch_size=n_train, num_particles=4, init_scale=1e-3, **common)
    fast = bora_pyro.fit_svi(None, init=map_fit, scale_lr=0.05, **kw)
    slow = bora_pyro.fit_svi(None, init=map_fit, scale_lr=1e-2, **kw)
    fast_ratio = float((fast.task_scales.double() / exact).median())
    slow_ratio = float((slow.task_scales.double() / exact).median())
    assert 1 / 1.5 < fast_ratio < 1.5, fast_ratio
    assert slow_ratio < 0.2, slow_ratio


# ---- (b) the variational-EM update is the ELBO's maximiser in tau ----------------------------


def test_variational_em_tau_maximises_the_elbo_in_tau():
    """Against a brute-force 1-D maximisation of the ELBO in each group's tau (small case).

    The ELBO's terms in tau, with ``q(Theta) = Normal(global_loc, v)`` (Theta's flat prior; the
    guide keeps its mean) and a Gamma(a, b) hyperprior, per group g::

        sum_{d, i in g} [log(tau) / 2 - tau E_q(theta_di - Theta_i)^2 / 2] + sum_{i in g} log(v_i) / 2
        + (a - 1) log(tau) - b tau,   E_q(theta_di - Theta_i)^2 = (mu_di - m_i)^2 + sigma_di^2 + v_i

    maximised over ``v`` in closed form (``v_i = 1 / (D tau)``), then over ``log tau`` by
    `scipy.optimize.minimize_scalar`. Tolerance: rtol 1e-5 (the optimiser's xatol 1e-10).
    """
    g = torch.Generator().manual_seed(0)
    D, P = 3, 5
    loc = torch.randn(D, P, generator=g, dtype=torch.float64)
    scale = 0.1 + torch.rand(D, P, generator=g, dtype=torch.float64)
    global_loc = torch.randn(P, generator=g, dtype=torch.float64)
    group = torch.tensor([0, 0, 1, 1, 1])
    a, b = 2.0, 0.5
    closed = variational_em_tau(loc, scale, global_loc, group, prior=(a, b))

    def neg_elbo(log_tau: float, cols) -> float:
        tau = math.exp(log_tau)
        v = 1.0 / (D * tau)
        expected_sq = ((loc[:, cols] - global_loc[cols]).square() + scale[:, cols].square() + v).sum()
        n = D * int(cols.sum())
        elbo = 0.5 * n * log_tau - 0.5 * tau * float(expected_sq) + 0.5 * int(cols.sum()) * math.log(v)
        return -(elbo + (a - 1) * log_tau - b * tau)

    for k in range(2):
        cols = group == k
        best = scipy.optimize.minimize_scalar(neg_elbo, bounds=(-10, 10), args=(cols,), method="bounded",
                                              options={"xatol": 1e-10})
        assert_close(closed[k], math.exp(best.x), rtol=1e-5, atol=0)
    # the same in closed form: (D - 1) P_g + 2 (a - 1) over the expected squares without v
    S = ((loc - global_loc).square() + scale.square()).sum(0)
    assert_close(closed, [(2 * (D - 1) + 2 * (a - 1)) / (S[:2].sum() + 2 * b),
                          (3 * (D - 1) + 2 * (a - 1)) / (S[2:].sum() + 2 * b)], rtol=1e-12, atol=0)


# ---- (c) predictive intervals widen as a task's training data shrink -------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_predictive_intervals_widen_as_training_data_shrink(seed):
    tok = char_tokenizer()
    corpus = build_corpus(synthetic_corpus_frame((6, 12, 24, 48, 96), seed=seed), tok, max_length=48,
                          validation_size=0.0, seed=seed)
    common = dict(model=tiny_causal_lm("llama", hidden_size=32, num_layers=1, seed=seed), tokenizer=tok,
                  rank=2, alpha=4, batch_size=8, device="cpu", progress=False, seed=seed, patience=None)
    map_fit = bora_pyro.fit_map(corpus, tau="learn", tau_method="evidence", tau_init=100.0, max_steps=150,
                                lr=1e-2, **common)
    svi = bora_pyro.fit_svi(None, init=map_fit, max_steps=100, lr=1e-2, **common)
    table = svi.evaluate("test", num_samples=16).iloc[:-1]  # the last row is "overall"
    width = (table["perplexity_high"] / table["perplexity_low"]).to_numpy()
    n_train = corpus.split("train").docs_per_task
    rho = scipy.stats.spearmanr(width, n_train).statistic
    # measured: Spearman -0.7 (seed 0) and -0.9 (seed 1); the smallest task's interval spans
    # 4.3% and 3.2% of its perplexity (0.3% and 0.2% with init_scale=1e-3 at scale_lr = lr)
    assert rho < 0, (width, n_train)
    assert width[n_train.argmin()] > 1.01, width
