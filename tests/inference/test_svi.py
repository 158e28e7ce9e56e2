"""SVI through BoRA's prior and guide code on a Gaussian hierarchical model with closed forms."""

import math

import pyro
import pytest
import scipy.optimize
import torch

from bora_pyro.config import BoraConfig, TrainConfig
from bora_pyro.data import build_corpus
from bora_pyro.export import initial_adapter
from bora_pyro.inference import svi
from bora_pyro.inference.loop import run_steps
from bora_pyro.inference.svi import LazyMovingAverage, SVIStepper, optimise_svi, variational_em_tau
from bora_pyro.models.bora import BoraModel
from bora_pyro.models.builder import build_bora
from bora_pyro.testing import char_tokenizer, synthetic_corpus_frame, tiny_causal_lm
from tests.conftest import assert_close
from tests.gaussian import GaussianProblem
from tests.inference.test_sync_free import HostReads


def _model(problem, tau, **config):
    return BoraModel(
        problem.log_likelihood, num_tasks=problem.num_tasks, num_params=problem.y.shape[1],
        num_docs=problem.num_docs, config=BoraConfig(tau=tau, **config), docs_per_task=problem.docs_per_task,
    )


def _full_batches(problem):
    while True:
        yield problem.full_batch()


def _train(**kw):
    return TrainConfig(device="cpu", progress=False, **kw)


def _fit(problem, tau, steps=1200, lr=0.03, config=None, **kw):
    return optimise_svi(
        _model(problem, tau, **(config or {})), _full_batches(problem),
        _train(max_steps=steps, lr=lr, init_scale=0.1, num_particles=4, **kw),
        init_global=torch.zeros(problem.y.shape[1]),
    )


def test_posterior_means_and_sds_match_the_closed_form():
    """Given tau, q is exact for this model: means within 2%, sds within 10%."""
    problem = GaussianProblem.make(P=4)
    tau = 2.0
    state = _fit(problem, tau)
    theta, Theta = problem.map_for_tau(tau)
    n, _ = problem.stats()
    exact_sd = (1.0 / (n / problem.sigma**2 + tau)).sqrt()[:, None].expand_as(theta)
    mean_err = (state.task_adapters.double() - theta).norm() / theta.norm()
    assert mean_err < 0.02, mean_err
    sd_err = (state.task_scales.double() / exact_sd - 1).abs().max()
    assert sd_err < 0.10, sd_err
    torch.testing.assert_close(state.global_adapter.double(), Theta, atol=0.02 * Theta.norm().item(), rtol=0)


def test_learned_tau_is_close_to_the_marginal_likelihood_maximiser():
    problem = GaussianProblem.make(docs_per_task=(40,) * 12, P=20, tau=3.0, seed=1)
    res = scipy.optimize.minimize_scalar(
        lambda lt: -problem.marginal_log_likelihood(math.exp(lt)), bounds=(-5, 5), method="bounded"
    )
    tau_ml = math.exp(res.x)
    state = _fit(problem, "learn", config={"tau_prior": (1.0, 0.0), "tau_init": 50.0}, tau_warmup=200)
    assert abs(state.tau.item() - tau_ml) / tau_ml < 0.2, (state.tau.item(), tau_ml)


def test_limits_tau_zero_and_inf():
    problem = GaussianProblem.make(P=2)
    n, ybar = problem.stats()
    independent = _fit(problem, 0.0)
    exact_sd = (problem.sigma**2 / n).sqrt()[:, None].expand_as(ybar)
    assert ((independent.task_adapters.double() - ybar).abs() / exact_sd).max() < 0.1
    assert (independent.task_scales.double() / exact_sd - 1).abs().max() < 0.1
    pooled = _fit(problem, math.inf)
    assert torch.allclose(pooled.task_adapters[0], pooled.task_adapters[-1])
    torch.testing.assert_close(pooled.global_adapter.double(), problem.pooled(), atol=0.05, rtol=0)
    assert abs(pooled.task_scales[0, 0].item() / (problem.sigma / n.sum().sqrt()).item() - 1) < 0.1


def test_variational_em_tau_formula():
    loc = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 1.0]])
    scale = torch.full_like(loc, 0.5)
    theta_g = torch.tensor([2.0, 0.0])
    group = torch.tensor([0, 1])
    tau = variational_em_tau(loc, scale, theta_g, group, prior=(2.0, 0.5))
    # group 0: S = 1 + 1 + 0 + 3 * 0.25 = 2.75; (D-1) * 1 + 2 = 4; / (2.75 + 1)
    # group 1: S = 0 + 0 + 1 + 0.75 = 1.75; 4 / 2.75
    torch.testing.assert_close(tau, torch.tensor([4 / 3.75, 4 / 2.75]))
    # the model's number of groups (no read of group_index.max()); a group without entries gets the prior's value
    assert torch.equal(variational_em_tau(loc, scale, theta_g, group, prior=(2.0, 0.5), num_groups=2), tau)
    torch.testing.assert_close(variational_em_tau(loc, scale, theta_g, group, prior=(2.0, 0.5), num_groups=3),
                               torch.tensor([4 / 3.75, 4 / 2.75, 2 / 1.0]))


def test_elbo_rises_no_nan_and_same_seed_same_result():
    problem = GaussianProblem.make()
    a = optimise_svi(_model(problem, "learn"), problem.batches(6),
                     _train(max_steps=400, lr=0.02, init_scale=0.1, batch_size=6), init_global=torch.zeros(3))
    loss = torch.tensor(a.history["loss"])
    assert torch.isfinite(loss).all()
    assert loss[-100:].mean() < loss[:100].mean()
    import pyro
    pyro.set_rng_seed(0)
    b1 = optimise_svi(_model(problem, 2.0), problem.batches(6), _train(max_steps=50, lr=0.02, init_scale=0.1, batch_size=6),
                      init_global=torch.zeros(3))
    pyro.set_rng_seed(0)
    b2 = optimise_svi(_model(problem, 2.0), problem.batches(6), _train(max_steps=50, lr=0.02, init_scale=0.1, batch_size=6),
                      init_global=torch.zeros(3))
    torch.testing.assert_close(b1.task_adapters, b2.task_adapters, rtol=0, atol=0)


def test_sparse_minibatch_steps_match_the_closed_form():
    """Batches of 8 of 37 documents, the KL of each task split over its documents: posterior
    means within 5% and sds within 15% of the exact ones (dense: the same bounds)."""
    problem = GaussianProblem.make(P=4)
    tau = 2.0
    theta, _ = problem.map_for_tau(tau)
    n, _ = problem.stats()
    exact_sd = (1.0 / (n / problem.sigma**2 + tau)).sqrt()[:, None].expand_as(theta)
    for task_step in ("sparse", "dense"):
        state = optimise_svi(
            _model(problem, tau), problem.batches(8),
            _train(max_steps=3000, lr=0.03, init_scale=0.1, batch_size=8, task_step=task_step),
            init_global=torch.zeros(4),
        )
        mean_err = (state.task_adapters.double() - theta).norm() / theta.norm()
        assert mean_err < 0.05, (task_step, mean_err)
        sd_err = (state.task_scales.double() / exact_sd - 1).abs().max()
        assert sd_err < 0.15, (task_step, sd_err)


# ---- learned tau with sparse steps: lazy moving averages (docs/many-tasks.md) -------------------


def test_lazy_moving_average_is_the_every_row_average():
    """Random rows moved at random steps (and steps that move none): the lazy averages, caught
    up, equal the every-row lerp to float32 rounding (1e-6), and the M-step's sums equal the
    direct float64 sum over all rows (1e-9 relative), with rows far from the centre."""
    gen = torch.Generator().manual_seed(0)
    D, P, beta = 9, 5, 0.9
    loc = 3.0 + torch.randn(D, P, generator=gen)
    log_scale = torch.randn(D, P, generator=gen) - 2
    dense = loc.clone()
    lazy = LazyMovingAverage.start(loc, log_scale, torch.zeros(P), beta=beta, compute=torch.device("cpu"))
    for step in range(60):
        k = int(torch.randint(0, 4, (), generator=gen))
        index = torch.randperm(D, generator=gen)[:k]
        moved = (index, loc[index].clone(), log_scale[index].clone()) if k else None
        loc[index] += 0.3 * torch.randn(k, P, generator=gen)
        log_scale[index] += 0.1 * torch.randn(k, P, generator=gen)
        untouched = lazy.average[~torch.isin(torch.arange(D), index)].clone()
        lazy.advance(moved, loc, log_scale)
        assert torch.equal(lazy.average[~torch.isin(torch.arange(D), index)], untouched)  # absent rows not written
        dense.lerp_(loc, 1 - beta)
        assert_close(lazy.averages(loc), dense, rtol=1e-6, atol=1e-6, msg=f"step {step}")
        m = 3.0 + torch.randn(P, generator=gen)
        direct = ((dense.double() - m.double()).square() + log_scale.exp().double().square()).sum(0)
        assert_close(lazy.expected_squares(m), direct, rtol=1e-6, atol=0, msg=f"step {step}")


FRAME = synthetic_corpus_frame((5, 4, 6, 3, 5, 4))


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(FRAME, char_tokenizer(), max_length=24, seed=0)


def _lm_stepper(corpus, *, lazy=True, steps=40, **train):
    settings = dict(max_steps=steps, batch_size=4, lr=1e-2, device="cpu", progress=False, task_step="sparse",
                    init_scale=1e-3, tau_warmup=0)
    lm, model = build_bora(tiny_causal_lm("llama", hidden_size=16, num_layers=1), corpus,
                           BoraConfig(tau="learn", tau_init=10.0, rank=2, alpha=4.0), seed=0)
    stepper = SVIStepper(model, TrainConfig(**{**settings, **train}), init_global=initial_adapter(None, lm.layout, seed=0))
    stepper.lazy_average = lazy
    return stepper


def _run(stepper, corpus):
    pyro.set_rng_seed(0)
    split, generator = corpus.split("train"), torch.Generator().manual_seed(0)

    def batches():
        while True:
            yield from split.batches(4, shuffle=True, generator=generator, drop_last=True)

    return run_steps(stepper, batches())


def test_sparse_learned_tau_matches_the_every_row_computation(corpus):
    """40 sparse SVI steps of the tiny LM (6 tasks, minibatches of 4 documents), the M-step
    every step: the lazy averages' tau equals the every-row computation's at every step to 1e-5
    relative (tau feeds back into the steps, so float rounding grows a little), and tau moved."""
    lazy, dense = _lm_stepper(corpus), _lm_stepper(corpus, lazy=False)
    a, b = _run(lazy, corpus), _run(dense, corpus)
    assert lazy._rows is not None and dense._rows is None
    assert_close(a.history["tau"], b.history["tau"], rtol=1e-5, atol=0)
    assert abs(a.history["tau"][-1][0] / 10.0 - 1) > 0.1, a.history["tau"][-1]
    # with tau held (no M-step in the run) both runs take the same steps: the averages agree to float32 rounding
    lazy, dense = _lm_stepper(corpus, tau_warmup=100), _lm_stepper(corpus, lazy=False, tau_warmup=100)
    _run(lazy, corpus), _run(dense, corpus)
    (rows, theta), (rows_ref, theta_ref) = lazy.moving_averages(), dense.moving_averages()
    assert torch.equal(lazy.guide.loc, dense.guide.loc) and torch.equal(theta, theta_ref)
    assert_close(rows, rows_ref, rtol=1e-6, atol=1e-7)
    # entries spread by about 1e-3 of their size around theta: float32 averages give the squares to ~1e-5
    direct = ((rows_ref.double() - theta.double()).square() + lazy.guide.scale.double().square()).sum(0)
    assert_close(lazy._rows.expected_squares(theta), direct, rtol=1e-4, atol=0)


def test_a_sparse_learned_tau_step_touches_only_the_batch_rows_and_reads_nothing_back(corpus, monkeypatch):
    """After the first step a step writes the averages of its K tasks only, the M-step reads the
    running sums, not the D rows (`variational_em_tau` is never called), tau still moves, and
    neither the step nor the update reads a value back from the device."""
    stepper = _lm_stepper(corpus)
    split = corpus.split("train")
    batches = [split.batch(idx) for idx in ([0, 7, 3, 10], [5, 5, 9, 1], [2, 11, 6, 7], [4, 8, 0, 11])]
    first = stepper.prepare(batches[0])
    stepper.setup(first)
    stepper.step(first)
    stepper.after_step(0)
    monkeypatch.setattr(svi, "variational_em_tau", lambda *a, **k: pytest.fail("the M-step read all D rows"))
    for step, batch in enumerate(batches[1:], start=1):
        prepared = stepper.prepare(batch)
        present = torch.zeros(stepper.model.num_tasks, dtype=torch.bool)
        present[stepper.task_subsample(prepared).host_index] = True
        averages, updated, tau = stepper._avg[0].clone(), stepper._rows.updated.clone(), stepper.tau.clone()
        with HostReads() as reads:
            stepper.step(prepared)
            stepper.after_step(step)
        assert reads.calls == [], "\n".join(reads.calls)
        assert torch.equal(stepper._avg[0][~present], averages[~present])
        assert torch.equal(stepper._rows.updated[~present], updated[~present])
        assert (stepper._rows.updated[present] == step).all() and not torch.equal(stepper._avg[0][present], averages[present])
        assert not torch.equal(stepper.tau, tau)
