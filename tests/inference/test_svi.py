"""SVI through BoRA's prior and guide code on a Gaussian hierarchical model with closed forms."""

import math

import scipy.optimize
import torch

from bora_pyro.config import BoraConfig, TrainConfig
from bora_pyro.inference.svi import optimise_svi, variational_em_tau
from bora_pyro.models.bora import BoraModel
from tests.gaussian import GaussianProblem


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
