"""MAP through BoRA's prior and inference code on a Gaussian hierarchical model with closed forms."""

import math

import pytest
import scipy.optimize
import torch

from bora_pyro.config import BoraConfig, TrainConfig
from bora_pyro.inference.curvature import FisherSampler
from bora_pyro.inference.map import optimise_map
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
    """The learned-tau tests here are of the Laplace evidence (test_hyper.py: the validation method)."""
    return TrainConfig(device="cpu", progress=False, **{"tau_method": "evidence", **kw})


def _fit(problem, tau, steps=1500, lr=0.05, **kw):
    return optimise_map(
        _model(problem, tau), _full_batches(problem), _train(max_steps=steps, lr=lr, **kw),
        init_global=torch.zeros(problem.y.shape[1]),
    )


@pytest.mark.parametrize("tau, parameterization", [(0.5, "centered"), (4.0, "centered"), (4.0, "offset")])
def test_map_matches_closed_form_mode(tau, parameterization):
    problem = GaussianProblem.make()
    state = _fit(problem, tau, parameterization=parameterization)
    theta, Theta = problem.map_for_tau(tau)
    torch.testing.assert_close(state.task_adapters.double(), theta, atol=2e-3, rtol=0)
    torch.testing.assert_close(state.global_adapter.double(), Theta, atol=2e-3, rtol=0)


def test_offset_parameterization_reaches_the_centered_mode_at_small_tau_with_more_steps():
    problem = GaussianProblem.make()
    state = _fit(problem, 0.5, steps=6000, parameterization="offset")
    theta, Theta = problem.map_for_tau(0.5)
    torch.testing.assert_close(state.task_adapters.double(), theta, atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match="parameterization='nope' is not valid"):
        _fit(problem, 4.0, steps=1, parameterization="nope")


def test_tau_zero_is_independent_and_tau_inf_is_pooled():
    problem = GaussianProblem.make()
    _, ybar = problem.stats()
    independent = _fit(problem, 0.0)
    torch.testing.assert_close(independent.task_adapters.double(), ybar, atol=2e-3, rtol=0)
    assert independent.tau.tolist() == [0.0]
    pooled = _fit(problem, math.inf)
    assert pooled.tau.tolist() == [math.inf]
    for d in range(problem.num_tasks):
        torch.testing.assert_close(pooled.task_adapters[d].double(), problem.pooled(), atol=2e-3, rtol=0)


def _gaussian_sampler(problem):
    """Sampled observations y~ ~ Normal(theta_d, sigma^2): the per-document gradient of the NLL
    in theta_d is -(y~ - theta_d) / sigma^2 = -eps / sigma, whose square averages to the exact
    Fisher 1 / sigma^2 per entry."""

    def sampled_gradients(task_adapters, batch, generator):
        return torch.randn(len(batch), task_adapters.shape[1], generator=generator) / problem.sigma

    return FisherSampler(sampled_gradients, torch.bincount(problem.task_ids, minlength=problem.num_tasks))


@pytest.mark.parametrize("curvature", ["fisher", "empirical"])
def test_learned_tau_converges_to_marginal_likelihood_maximiser(curvature):
    # Equal document counts: the evidence fixed point is exactly the type-II ML tau.
    problem = GaussianProblem.make(docs_per_task=(40,) * 12, P=20, tau=3.0, seed=1)
    res = scipy.optimize.minimize_scalar(
        lambda lt: -problem.marginal_log_likelihood(math.exp(lt)), bounds=(-5, 5), method="bounded"
    )
    tau_ml = math.exp(res.x)
    batch_size = 48
    state = optimise_map(
        _model(problem, "learn", tau_init=50.0, tau_prior=(1.0, 0.0)), problem.batches(batch_size),
        _train(max_steps=3000, lr=0.02, batch_size=batch_size, tau_update_every=100, tau_warmup=500,
               tau_curvature=curvature),
        init_global=torch.zeros(20), fisher_sampler=_gaussian_sampler(problem),
    )
    tau_hat = state.tau.item()
    assert abs(tau_hat - tau_ml) / tau_ml < 0.2, (tau_hat, tau_ml)
    updates = state.history["tau_update"]
    assert [u["step"] for u in updates] == list(range(599, 3000, 100))
    assert updates[-1]["tau"] == [tau_hat] and len(updates[-1]["gamma"]) == len(updates[-1]["S"]) == 1


def test_fisher_curvature_draws_from_its_own_generator_and_counts_its_passes():
    """M sampled passes before each update, on the minibatches of the last M steps; the draws
    come from the stepper's generator (a resumed run restores it), not torch's global one."""
    problem = GaussianProblem.make(docs_per_task=(5, 7, 9), P=4, tau=2.0, seed=2)
    sampler = _gaussian_sampler(problem)
    calls = []

    def counted(task_adapters, batch, generator):
        calls.append(len(calls))
        return sampler.sampled_gradients(task_adapters, batch, generator)

    def run(global_seed, **kw):
        calls.clear()
        model = _model(problem, "learn", tau_init=5.0)
        train = _train(max_steps=40, lr=0.05, batch_size=6, tau_update_every=8, tau_warmup=8, **kw)
        torch.manual_seed(global_seed)
        return optimise_map(model, problem.batches(6), train, init_global=torch.zeros(4),
                            fisher_sampler=FisherSampler(counted, sampler.docs_per_task))

    first = run(123, tau_curvature_batches=3)
    assert len(calls) == 3 * 4  # updates after 16, 24, 32, 40 steps
    assert [u["step"] for u in first.history["tau_update"]] == [15, 23, 31, 39]
    again = run(999, tau_curvature_batches=3)  # the global generator does not matter
    assert again.tau.tolist() == first.tau.tolist()
    capped = run(123, tau_curvature_batches=50)  # at most tau_update_every passes per update
    assert len(calls) == 8 * 4 and capped.tau.tolist() != first.tau.tolist()
    with pytest.raises(ValueError, match=r"tau_curvature='fisher'.*needs a fisher_sampler.*'empirical'"):
        optimise_map(_model(problem, "learn"), problem.batches(6), _train(max_steps=2, batch_size=6),
                     init_global=torch.zeros(4))
    with pytest.raises(ValueError, match=r"tau_curvature='fischer' is not valid.*'fisher'"):
        _train(tau_curvature="fischer")
    with pytest.raises(ValueError, match=r"tau_curvature_batches must be a positive integer"):
        _train(tau_curvature_batches=0)


def test_subsampled_log_joint_is_unbiased():
    """Averaged over all minibatches of an epoch, the scaled log joint is the full-data one."""
    import pyro.poutine as poutine

    problem = GaussianProblem.make(docs_per_task=(3, 5, 4), P=2)
    model = _model(problem, 2.0)
    theta = torch.randn(3, 2)
    Theta = torch.randn(2)
    data = {"task_adapters": theta, "global_adapter": Theta}

    def log_joint(batch):
        return poutine.trace(poutine.condition(model, data=data)).get_trace(batch).log_prob_sum()

    full = log_joint(problem.full_batch())
    prior = torch.distributions.Normal(Theta, 2.0**-0.5).log_prob(theta).sum()
    lik = problem.log_likelihood(theta, problem.full_batch()).sum()
    torch.testing.assert_close(full, prior + lik)
    # Every batch of 3 out of 12 documents (one partition of the epoch): mean equals the full value.
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    parts = [perm[i : i + 3] for i in range(0, 12, 3)]
    from tests.gaussian import GaussianBatch

    values = [log_joint(GaussianBatch(problem.y[i], problem.task_ids[i], i)) for i in parts]
    torch.testing.assert_close(torch.stack(values).mean(), full)


def test_sparse_log_joint_is_unbiased_and_exact_on_the_full_batch():
    """The sparse step's log joint (present tasks only, each task's prior split over its
    documents): equal to the full one on the full batch, and its mean over the minibatches of
    an epoch is the full value (each document carries 1 / N_d of its task's prior)."""
    import pyro.poutine as poutine

    from tests.gaussian import GaussianBatch

    problem = GaussianProblem.make(docs_per_task=(3, 5, 4, 2), P=2)
    model = _model(problem, 2.0)
    theta, Theta = torch.randn(4, 2), torch.randn(2)

    def log_joint(batch, sparse):
        tasks = model.subsample_tasks(batch.task_ids) if sparse else None
        rows = theta[tasks.index] if sparse else theta
        data = {"task_adapters": rows, "global_adapter": Theta}
        trace = poutine.trace(poutine.condition(model, data=data)).get_trace(batch, tasks=tasks)
        return trace.log_prob_sum()

    full = log_joint(problem.full_batch(), False)
    torch.testing.assert_close(log_joint(problem.full_batch(), True), full)
    perm = torch.randperm(14, generator=torch.Generator().manual_seed(0))
    parts = [perm[i : i + 2] for i in range(0, 14, 2)]
    values = [log_joint(GaussianBatch(problem.y[i], problem.task_ids[i], i), True) for i in parts]
    torch.testing.assert_close(torch.stack(values).mean(), full)


@pytest.mark.parametrize("parameterization", ["offset", "centered"])
def test_sparse_and_dense_minibatch_steps_reach_the_closed_form_mode(parameterization):
    """Batches of 5 of 37 documents: both steps end within 0.03 of the exact mode (the noise of
    minibatches at the final learning rate; the full-batch tests above reach 2e-3)."""
    problem = GaussianProblem.make()
    theta, Theta = problem.map_for_tau(4.0)
    for task_step in ("sparse", "dense"):
        state = optimise_map(
            _model(problem, 4.0), problem.batches(5),
            _train(max_steps=3000, lr=0.05, batch_size=5, task_step=task_step, parameterization=parameterization),
            init_global=torch.zeros(3),
        )
        torch.testing.assert_close(state.task_adapters.double(), theta, atol=0.03, rtol=0)
        torch.testing.assert_close(state.global_adapter.double(), Theta, atol=0.03, rtol=0)


def test_sparse_step_needs_document_counts():
    problem = GaussianProblem.make()
    model = BoraModel(problem.log_likelihood, num_tasks=problem.num_tasks, num_params=3,
                      num_docs=problem.num_docs, config=BoraConfig(tau=1.0))
    with pytest.raises(ValueError, match=r"needs their counts.*docs_per_task.*task_step='dense'"):
        optimise_map(model, problem.batches(5), _train(max_steps=2, batch_size=5, task_step="sparse"),
                     init_global=torch.zeros(3))
    with pytest.raises(ValueError, match=r"docs_per_task must hold one count per task \(D=4\)"):
        BoraModel(problem.log_likelihood, num_tasks=4, num_params=3, num_docs=problem.num_docs,
                  config=BoraConfig(tau=1.0), docs_per_task=[1, 2, 3])


@pytest.mark.parametrize("curvature", ["fisher", "empirical"])
def test_learned_tau_with_sparse_steps_recovers_the_marginal_likelihood_maximiser(curvature):
    """The evidence updates read the whole table between sparse steps; with batches of 6 of 60
    documents (each task in about half of them) tau lands within 30% of the type-II ML value."""
    problem = GaussianProblem.make(docs_per_task=(5,) * 12, P=20, tau=3.0, seed=1)
    res = scipy.optimize.minimize_scalar(
        lambda lt: -problem.marginal_log_likelihood(math.exp(lt)), bounds=(-5, 5), method="bounded"
    )
    state = optimise_map(
        _model(problem, "learn", tau_init=50.0, tau_prior=(1.0, 0.0)), problem.batches(6),
        _train(max_steps=1500, lr=0.02, batch_size=6, tau_update_every=100, tau_warmup=300,
               tau_curvature=curvature, task_step="sparse"),
        init_global=torch.zeros(20), fisher_sampler=_gaussian_sampler(problem),
    )
    tau_ml = math.exp(res.x)
    assert abs(state.tau.item() - tau_ml) / tau_ml < 0.3, (state.tau.item(), tau_ml)


@pytest.mark.parametrize("parameterization", ["offset", "centered"])
def test_sparse_curvature_passes_read_the_steps_rows_not_the_table(parameterization, monkeypatch):
    """With sparse steps the Fisher sampler gets the K rows of the step's tasks (``[K, P]``, the
    batch's task ids replaced by their positions among them), equal to the rows of the whole
    table after the step's update, and `point` (the ``[D, P]`` table) is read only by the
    evidence updates; the accumulators live with the tables."""
    from bora_pyro.inference.map import MAPStepper

    problem = GaussianProblem.make(docs_per_task=(5,) * 12, P=4, tau=3.0, seed=1)
    sampler, seen, stepper = _gaussian_sampler(problem), [], []
    in_curvature = [False]

    def checked(rows, batch, generator):
        theta = point(stepper[0])[0]  # the whole table, read here only to compare
        global_ids = problem.task_ids[batch.doc_index]
        assert rows.shape[0] == len(torch.unique(global_ids)) <= 6
        assert torch.equal(rows[batch.task_ids], theta[global_ids])
        seen.append(rows.shape[0])
        return sampler.sampled_gradients(rows, batch, generator)

    point, after_step = MAPStepper.point, MAPStepper.after_step

    def guarded_point(self):
        assert not in_curvature[0], "a curvature pass read the [D, P] table"
        return point(self)

    def tracked_after_step(self, step):
        stepper[:] = [self]
        in_curvature[0] = not self._is_update(step + 1)
        try:
            after_step(self, step)
        finally:
            in_curvature[0] = False

    monkeypatch.setattr(MAPStepper, "point", guarded_point)
    monkeypatch.setattr(MAPStepper, "after_step", tracked_after_step)
    state = optimise_map(
        _model(problem, "learn", tau_init=5.0), problem.batches(6),
        _train(max_steps=40, lr=0.05, batch_size=6, tau_update_every=8, tau_warmup=8, tau_curvature_batches=3,
               task_step="sparse", adapter_storage="host", parameterization=parameterization),
        init_global=torch.zeros(4), fisher_sampler=FisherSampler(checked, sampler.docs_per_task),
    )
    assert len(seen) == 3 * 4 and len(state.history["tau_update"]) == 4
    assert stepper[0].mc_fisher.sq.device == stepper[0].storage
