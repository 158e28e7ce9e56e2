"""The validation-likelihood update of a learned tau (`bora_pyro.inference.hyper`)."""

import math

import pytest
import torch

from bora_pyro.inference.hyper import (
    LogTauAdam, ValidationProbe, global_response, implicit_tau_gradient, shift_adam_moments,
)


def _gaussian_problem(seed=0, D=5, P=7):
    """Each task's training NLL ``1/2 sum_i h_di (theta_di - mu_di)^2`` (exact diagonal curvature
    ``h``) and a validation NLL ``1/2 sum v_di (theta_di - nu_di)^2``; two precision groups."""
    g = torch.Generator().manual_seed(seed)
    h = torch.rand(D, P, generator=g, dtype=torch.float64) * 20 + 0.5
    mu = torch.randn(D, P, generator=g, dtype=torch.float64)
    v = torch.rand(D, P, generator=g, dtype=torch.float64) + 0.2
    nu = mu + 0.7 * torch.randn(D, P, generator=g, dtype=torch.float64)
    group_index = torch.tensor([0, 0, 0, 1, 1, 1, 1])[:P]
    return h, mu, v, nu, group_index


def _map(h, mu, tau_p):
    """Closed-form MAP: ``theta_d = (h mu + tau Theta) / (h + tau)``, ``Theta = mean_d theta_d``."""
    w = h / (h + tau_p)
    Theta = (w * mu).mean(0) / w.mean(0)
    theta = (h * mu + tau_p * Theta) / (h + tau_p)
    return theta, Theta


def _validation(theta, v, nu):
    return 0.5 * (v * (theta - nu).square()).sum()


@pytest.mark.parametrize("tau", [[0.3, 4.0], [10.0, 10.0], [50.0, 2.0]])
def test_implicit_gradient_matches_finite_differences_on_a_gaussian(tau):
    """For a quadratic likelihood the diagonal curvature is exact, so the implicit gradient is
    the exact ``dV / d log tau_g``: central differences in log tau (step 1e-5) agree to 1e-6
    relative."""
    h, mu, v, nu, group_index = _gaussian_problem()
    tau = torch.tensor(tau, dtype=torch.float64)
    theta, Theta = _map(h, mu, tau[group_index])
    grad = implicit_tau_gradient(theta - Theta, h, tau, group_index, v * (theta - nu))
    eps = 1e-5
    for g in range(2):
        shift = torch.zeros(2, dtype=torch.float64)
        shift[g] = eps
        up = _validation(_map(h, mu, (tau * shift.exp())[group_index])[0], v, nu)
        down = _validation(_map(h, mu, (tau * (-shift).exp())[group_index])[0], v, nu)
        numeric = float((up - down) / (2 * eps))
        assert grad[g].item() == pytest.approx(numeric, rel=1e-6, abs=1e-12)


def test_implicit_gradient_from_the_validation_tasks_rows_is_exact():
    """Tasks without validation data (zero validation gradient) add nothing to ``dV / d log tau``:
    the gradient from the rows of the tasks with validation data alone, with ``dTheta/dtau``
    summed over every task in blocks of 2 rows (`global_response`), equals the all-rows one to
    1e-12 relative (float64; only the summation order differs)."""
    h, mu, v, nu, group_index = _gaussian_problem(D=7)
    tau = torch.tensor([0.8, 6.0], dtype=torch.float64)
    theta, Theta = _map(h, mu, tau[group_index])
    present = torch.tensor([5, 1, 3])  # in order of first appearance, as TaskGroups lists them
    val_grad = torch.zeros_like(theta)
    val_grad[present] = (v * (theta - nu))[present]
    offsets = theta - Theta
    full = implicit_tau_gradient(offsets, h, tau, group_index, val_grad)
    blocks = [(offsets[i:i + 2], h[i:i + 2]) for i in range(0, 7, 2)]
    d_global = global_response(blocks, tau, group_index)
    assert torch.allclose(d_global, global_response([(offsets, h)], tau, group_index), rtol=1e-12, atol=0)
    rows = implicit_tau_gradient(offsets[present], h[present], tau, group_index, val_grad[present], d_global=d_global)
    assert torch.allclose(rows, full, rtol=1e-12, atol=0), (rows, full)
    assert (full.abs() > 1e-3).all()  # not trivially zero
    with pytest.raises(ValueError, match="blocks is empty"):
        global_response([], tau, group_index)


def test_validation_probe_sums_and_curvature():
    """The probe's running sums: ``h_d = N_d S_d / c_d`` for the tasks seen, the pooled average for
    the others; rows of the batch's K tasks (local task ids, global ``task_ids``) give the same
    sums and curvature as all D rows, and the validation gradient of each present row."""
    g = torch.Generator().manual_seed(0)
    D, P = 5, 3
    theta = torch.randn(D, P, generator=g)
    targets = torch.randn(4, P, generator=g)

    def gradients(rows, batch):
        return rows[batch.task_ids] - batch.y, 4

    class Batch:
        def __init__(self, y, task_ids):
            self.y, self.task_ids = y, task_ids

    ids = torch.tensor([3, 1, 3, 0])
    docs = [2.0, 4.0, 6.0, 8.0, 10.0]
    full, rows = ValidationProbe(gradients, docs, P, beta=0.5), ValidationProbe(gradients, docs, P, beta=0.5)
    for _ in range(2):
        val_full = full(theta, Batch(targets, ids))
        local, tasks = torch.tensor([0, 1, 0, 2]), torch.tensor([3, 1, 0])
        val_rows = rows(theta[tasks], Batch(targets, local), task_ids=ids)
    assert torch.equal(val_rows, val_full[tasks]) and torch.equal(full.sq, rows.sq) and torch.equal(full.seen, rows.seen)
    sq = (theta[ids] - targets).square()
    per_doc = {3: (sq[0] + sq[2]) / 2, 1: sq[1], 0: sq[3]}  # beta cancels between S and c
    pooled = sq.sum(0) / 4
    h = full.curvature()
    for d in range(D):
        assert torch.allclose(h[d], docs[d] * per_doc.get(d, pooled), rtol=1e-6), d
    assert torch.equal(rows.curvature(tasks), h[tasks]) and torch.equal(rows.curvature(slice(1, 3)), h[1:3])
    with pytest.raises(ValueError, match="beta must be in"):
        ValidationProbe(gradients, docs, P, beta=0.0)


def test_descent_on_log_tau_finds_the_validation_optimum_of_a_gaussian():
    """Adam on log tau with the implicit gradient lands where a brute-force grid of the
    closed-form validation loss has its minimum (within 10% in tau), from 100x too low and too high."""
    # Task truths theta*_d ~ N(m, 1/5); training and validation estimates of them with noise of
    # precision h and v: the validation loss is smallest near the generating precision.
    g = torch.Generator().manual_seed(1)
    D, P = 8, 40
    truth = torch.randn(P, generator=g, dtype=torch.float64) + torch.randn(D, P, generator=g, dtype=torch.float64) / 5**0.5
    h = torch.rand(D, P, generator=g, dtype=torch.float64) * 10 + 1
    v = torch.rand(D, P, generator=g, dtype=torch.float64) * 10 + 1
    mu = truth + torch.randn(D, P, generator=g, dtype=torch.float64) / h.sqrt()
    nu = truth + torch.randn(D, P, generator=g, dtype=torch.float64) / v.sqrt()
    group_index = torch.zeros(P, dtype=torch.long)
    grid = torch.logspace(-2, 3, 2001, dtype=torch.float64)
    losses = torch.stack([_validation(_map(h, mu, t)[0], v, nu) for t in grid])
    best = grid[losses.argmin()].item()
    assert 0.1 < best < 100, best  # an interior optimum, away from the grid's ends
    for start in (best / 100, best * 100):
        opt = LogTauAdam(torch.tensor([start]), lr=0.2, betas=(0.5, 0.8))
        for k in range(300):
            tau = opt.tau.double()
            theta, Theta = _map(h, mu, tau[group_index])
            opt.lr = 0.2 / math.sqrt(1 + k / 10)
            opt.step(implicit_tau_gradient(theta - Theta, h, tau, group_index, v * (theta - nu)))
        assert opt.tau.item() == pytest.approx(best, rel=0.1), (start, best, opt.tau.item())


def test_log_tau_adam_bounds_and_state():
    opt = LogTauAdam(torch.tensor([1.0, 1.0]), lr=3.0, bounds=(0.5, 8.0))
    opt.step(torch.tensor([1.0, -1.0]))  # first Adam step: lr in log tau, against the gradient
    assert opt.tau.tolist() == pytest.approx([0.5, 8.0])  # clamped to the bounds
    state = opt.state_dict()
    other = LogTauAdam(torch.tensor([3.0, 3.0]), lr=3.0, bounds=(0.5, 8.0))
    other.load_state_dict(state)
    assert torch.equal(other.tau, opt.tau) and other.count == 1
    assert torch.equal(opt.step(torch.tensor([0.2, 0.1])), other.step(torch.tensor([0.2, 0.1])))


def test_log_tau_adam_gate_is_the_shrinkage_of_the_mean_gradient():
    """The gate's factor against its closed form on two and three gradients, and what it is for:
    under pure noise it keeps log tau near its start (the plain Adam walk spreads several times
    wider over 35 updates), under a steady gradient it lets the steps through. Seeded; the
    ratios hold with a wide margin (measured: spread 0.47x, steady distance 0.89x)."""
    b, K = 0.8, 2.0
    opt = LogTauAdam(torch.tensor([1.0]), lr=0.1, gate=K, gate_beta=b)
    opt.step(torch.tensor([3.0]))
    assert opt.last_gate.item() == 0.0 and opt.tau.item() == 1.0  # no variance after one gradient
    opt.step(torch.tensor([1.0]))
    g = torch.tensor([3.0, 1.0], dtype=torch.float64)
    w = torch.tensor([b, 1.0], dtype=torch.float64) * (1 - b)
    w = w / w.sum()  # the normalised weights of the two gradients
    mean, c = (w * g).sum(), (w**2).sum()
    var = (w * (g - mean) ** 2).sum() / (1 - c)
    assert opt.last_gate.item() == pytest.approx(max(0.0, float(1 - K * c * var / mean**2)), rel=1e-9)
    opt.step(torch.tensor([-2.0]))
    assert opt.last_gate.item() == 0.0  # the mean drowns in the spread

    gen = torch.Generator().manual_seed(0)
    ends = {0.0: [], K: []}
    for _ in range(300):
        noise = torch.randn(35, generator=gen)
        for gate in ends:
            walk = LogTauAdam(torch.tensor([1.0]), lr=0.5, gate=gate)
            for x in noise:
                walk.step(x.reshape(1))
            ends[gate].append(walk.log_tau.item())
    spread = torch.tensor(ends[K]).std() / torch.tensor(ends[0.0]).std()
    assert spread < 0.7, spread
    steady = {}
    for gate in (0.0, K):
        walk = LogTauAdam(torch.tensor([1e4]), lr=0.5, gate=gate)
        for x in 1.0 + 0.3 * torch.randn(12, generator=gen):
            walk.step(x.reshape(1))
        steady[gate] = math.log(1e4) - walk.log_tau.item()
    assert steady[K] > 0.7 * steady[0.0], steady


def _split_problem(seed=3):
    """A Gaussian problem whose documents alternate between a training and a validation half."""
    from tests.gaussian import GaussianProblem

    both = GaussianProblem.make(docs_per_task=(8, 16, 24, 40, 60, 80), P=10, tau=4.0, sigma=2.0, seed=seed)
    order = torch.argsort(both.task_ids, stable=True)
    train_idx, val_idx = order[0::2], order[1::2]
    train = GaussianProblem(both.y[train_idx], both.task_ids[train_idx], both.sigma, both.num_tasks)
    validation = GaussianProblem(both.y[val_idx], both.task_ids[val_idx], both.sigma, both.num_tasks)
    return train, validation


def _validation_nll(train, validation, tau):
    theta, _ = train.map_for_tau(tau)
    return float(((validation.y.double() - theta[validation.task_ids]) ** 2).sum() / (2 * train.sigma**2))


@pytest.mark.parametrize("task_step", ["dense", "sparse"])
def test_map_with_validation_tau_lands_at_the_brute_force_validation_optimum(task_step, monkeypatch):
    """The whole MAP stepper with ``tau_method="validation"`` on a Gaussian hierarchical model:
    the learned tau gives a validation NLL within 1% of the best of a brute-force grid of
    closed-form MAPs (and tau within a factor 2 of the grid's argmin), from tau_init 100x too
    high, with dense and with sparse steps. The per-document validation gradient of
    y ~ N(theta_d, sigma^2) is ``-(y - theta_d) / sigma^2``.

    Sparse steps: every update's gradient, from the K rows of the validation batch's tasks and
    ``dTheta/dtau`` summed in blocks of 2 rows, equals the all-rows computation of the dense
    path on the same state (`implicit_tau_gradient` on all D stored offsets and a probe on all D
    rows of the point) to 1e-5 relative (float32, the sums in another order), with the same
    running sums; sparse runs two validation minibatches per update (``tau_val_batches=2``),
    compared with the mean of their all-rows gradients (relative to the mean of their sizes). They need a smaller learning rate (0.01, 6,000 steps): at 0.05 the sparse
    iterates jitter around the mode (each present task's prior is a noisy share of it), the
    validation gradient reads the jitter as fitted noise, and tau rose to 2e4 (docs/many-tasks.md)."""
    from bora_pyro.config import BoraConfig, TrainConfig
    from bora_pyro.inference import map as map_module
    from bora_pyro.inference.hyper import ValidationData
    from bora_pyro.inference.map import MAPStepper, optimise_map
    from bora_pyro.models.bora import BoraModel

    train, validation = _split_problem()
    grid = torch.logspace(-2, 3, 501).tolist()
    losses = [_validation_nll(train, validation, t) for t in grid]
    best = min(losses)
    tau_best = grid[losses.index(best)]

    def gradients(task_adapters, batch):
        return -(batch.y - task_adapters[batch.task_ids]) / train.sigma**2, len(batch)

    compared, sparse_gradient = [], MAPStepper._sparse_validation_gradient

    def checked(self, batches):
        probe = self.probe
        reference = ValidationProbe(probe.gradients, probe.docs_per_task, probe.sq.shape[1], beta=probe.beta)
        reference.load_state_dict({"sq": probe.sq.clone(), "seen": probe.seen.clone(), "count": probe.count})
        grad = sparse_gradient(self, batches)
        theta, theta_g = self.point()
        val_grads = [reference(theta, batch) for batch in batches]
        offsets = self.guide.tables[self.guide.task_name]  # the stored offsets (parameterization="offset")
        parts = torch.stack([implicit_tau_gradient(offsets, reference.curvature(), self.tau,
                                                   self.model.group_index, v) for v in val_grads])
        expected = parts.mean(0)  # relative to the parts' size: two of opposite signs can cancel
        assert torch.equal(reference.sq, probe.sq) and torch.equal(reference.seen, probe.seen)
        compared.append(float(((grad - expected).abs() / parts.abs().mean(0)).max()))
        return grad

    monkeypatch.setattr(MAPStepper, "_sparse_validation_gradient", checked)
    monkeypatch.setattr(map_module, "RESPONSE_BLOCK", 2 * train.y.shape[1])
    data = ValidationData(gradients, validation.batches(12, seed=1), torch.bincount(train.task_ids))
    model = BoraModel(train.log_likelihood, num_tasks=train.num_tasks, num_params=train.y.shape[1],
                      num_docs=train.num_docs, config=BoraConfig(tau="learn", tau_init=100 * tau_best),
                      docs_per_task=torch.bincount(train.task_ids))
    steps, lr, every = (3000, 0.05, 50) if task_step == "dense" else (6000, 0.01, 100)
    val_batches = 1 if task_step == "dense" else 2
    state = optimise_map(
        model, train.batches(12), TrainConfig(device="cpu", progress=False, max_steps=steps, lr=lr,
                                             batch_size=12, tau_update_every=every, tau_lr=0.3,
                                             tau_method="validation", task_step=task_step,
                                             tau_val_batches=val_batches, tau_gradient="implicit"),
        init_global=torch.zeros(train.y.shape[1]), validation=data,
    )
    learned = state.tau.item()
    updates = state.history["tau_update"]
    assert len(updates) == (steps - steps // 10) // every and set(updates[0]) == {"step", "tau", "grad"}
    assert _validation_nll(train, validation, learned) < 1.01 * best, (learned, tau_best)
    assert tau_best / 2 < learned < 2 * tau_best, (learned, tau_best)
    assert len(compared) == (len(updates) if task_step == "sparse" else 0)
    assert max(compared, default=0.0) < 1e-5, max(compared)


def test_fit_map_learns_tau_by_validation_on_a_tiny_lm():
    """Through `fit_map` (packed LM batches, `ValidationData.for_lm`), with the default
    ``tau_method="auto"``: on documents generated with tau = 4 (`testing.generated_corpus`, 20%
    validation) and starting 250x too high, the validation gradient drives tau down, on the
    default schedule tied to the evaluations (every 30 steps in 300: an update every 12 steps
    after 30), each update is recorded, and the fit's settings say which method ran. Without
    validation documents "auto" is the evidence, and asking for the validation method is an error
    that names the way out. A few seconds on one thread."""
    import bora_pyro
    from bora_pyro.testing import generated_corpus

    corpus, base, tok = generated_corpus(4.0, validation_size=0.2)
    result = bora_pyro.fit_map(
        corpus, model=base, tokenizer=tok, tau="learn", tau_init=1e3, max_steps=300, lr=2e-2,
        batch_size=16, rank=2, alpha=4, target_modules=["lm_head"], precision_groups="shared",
        device="cpu", progress=False, patience=None,
    )
    updates = result.history["tau_update"]
    assert [u["step"] for u in updates] == list(range(41, 300, 12))
    assert result.fit_args["tau_method"] == "validation" and "grad" in updates[0]
    assert result.fit_args["tau_gradient"] == "trajectory"  # "auto" as resolved: dense steps, offsets
    assert result.tau["all"] < 50, [u["tau"] for u in updates]
    sparse = bora_pyro.fit_map(corpus, model=base, tokenizer=tok, tau="learn", max_steps=2, batch_size=4, rank=2,
                               alpha=4, target_modules=["lm_head"], task_step="sparse", device="cpu", progress=False)
    assert sparse.fit_args["tau_gradient"] == "implicit"  # "auto" where the shadows are not implemented
    no_validation, base, tok = generated_corpus(4.0, docs_per_task=(10, 20), validation_size=0.0)
    small = dict(model=base, tokenizer=tok, tau="learn", max_steps=2, batch_size=4, rank=2, alpha=4,
                 target_modules=["lm_head"], device="cpu", progress=False)
    assert bora_pyro.fit_map(no_validation, **small).fit_args["tau_method"] == "evidence"
    with pytest.raises(ValueError, match=r"tau_method='validation'.*needs validation documents.*'evidence'"):
        bora_pyro.fit_map(no_validation, tau_method="validation", **small)


#: tau after each update of the dense validation-method fit below, recorded at commit 5bff850,
#: before the validation update was restricted to the validation batch's rows.
DENSE_TAU_HISTORY = [1648.7213134765625, 2036.6326904296875, 2126.832763671875, 2024.0540771484375,
                     1747.790771484375, 1435.4669189453125, 1151.7808837890625, 915.3670043945312,
                     726.1593627929688, 535.6339721679688, 393.3744812011719]


def test_dense_validation_tau_history_is_unchanged():
    """Dense steps keep the all-rows validation update: the tau history of a 120-step tiny-LM fit
    equals the one recorded before sparse steps got their own path (bit for bit on the machine
    that recorded it; 1e-6 relative allows another CPU's float32 reductions)."""
    import bora_pyro
    from bora_pyro.testing import generated_corpus

    corpus, base, tok = generated_corpus(4.0, validation_size=0.2)
    result = bora_pyro.fit_map(
        corpus, model=base, tokenizer=tok, tau="learn", tau_method="validation", tau_init=1e3, max_steps=120,
        lr=2e-2, batch_size=16, rank=2, alpha=4, target_modules=["lm_head"], precision_groups="shared",
        device="cpu", progress=False, patience=None, tau_warmup=10, tau_update_every=10, task_step="dense",
        tau_gradient="implicit",
    )
    taus = [u["tau"][0] for u in result.history["tau_update"]]
    assert taus == pytest.approx(DENSE_TAU_HISTORY, rel=1e-6, abs=0), taus


def test_shift_adam_moments_gives_the_moments_of_the_shifted_gradient():
    """Closed form: Adam fed a constant gradient g for t steps holds m = g (1 - b1^t) and
    v = g^2 (1 - b2^t); after the shift by delta it holds exactly those of g + delta (the
    variance it estimates is 0 and stays 0). With a noisy gradient the estimated variance
    ``v^ - m^^2`` is kept. Rows never stepped (per-row counts of 0) are left alone. Tolerance:
    float32 rounding (1e-6 relative, 1e-6 absolute where the shifted mean is 0)."""
    betas = (0.9, 0.999)
    g = torch.tensor([[0.5, -2.0, 3.0], [1.0, 0.0, -1.0]])
    delta = torch.tensor([[4.0, 1.0, -3.0], [-0.5, 2.0, 0.0]])
    param = torch.nn.Parameter(torch.zeros(2, 3))
    opt = torch.optim.AdamW([param], lr=1e-3, betas=betas, weight_decay=0.0)
    for _ in range(37):
        param.grad = g.clone()
        opt.step()
    state = opt.state[param]
    shift_adam_moments(state["exp_avg"], state["exp_avg_sq"], state["step"], delta, betas)
    t = 37
    assert torch.allclose(state["exp_avg"], (g + delta) * (1 - betas[0] ** t), rtol=1e-6, atol=1e-6)
    assert torch.allclose(state["exp_avg_sq"], (g + delta) ** 2 * (1 - betas[1] ** t), rtol=1e-6, atol=1e-6)
    # a noisy gradient: the bias-corrected variance v^ - m^^2 is kept, the mean moves by delta
    m, v = torch.tensor([[0.2, -0.1]]), torch.tensor([[0.3, 0.5]])
    t = torch.tensor([5.0])
    b1, b2 = 1 - 0.9 ** 5, 1 - 0.999 ** 5
    m_hat, v_hat = m / b1, v / b2
    shift = torch.tensor([[1.0, -2.0]])
    shift_adam_moments(m, v, t, shift, betas)
    assert torch.allclose(m / b1, m_hat + shift, rtol=1e-6)
    assert torch.allclose(v / b2 - (m / b1) ** 2, v_hat - m_hat ** 2, rtol=1e-5)
    # per-row counts: a row never stepped keeps its zeros
    m, v = torch.zeros(2, 2), torch.zeros(2, 2)
    m[0], v[0] = 0.1, 0.02
    shift_adam_moments(m, v, torch.tensor([3.0, 0.0]), torch.ones(2, 2), betas)
    assert (m[1] == 0).all() and (v[1] == 0).all() and (m[0] != 0.1).all()


@pytest.mark.parametrize("parameterization", ["offset", "centered"])
def test_fit_map_shifts_the_moments_by_the_change_of_the_prior_gradient(parameterization, monkeypatch):
    """``tau_shift_moments=True``: at every tau update the stepper shifts AdamW's moments by
    exactly the change of the loss gradient that the new tau makes. Checked against autograd:
    the gradient of the training loss on one minibatch at the old and the new tau, at the same
    adapters, differs by the ``delta`` handed to `shift_adam_moments` (to 1e-4 of its size: the
    prior is the only term that reads tau). Before the first update the fit is the same as
    without the option, and sparse steps refuse it with a message that names the way out."""
    import bora_pyro
    import bora_pyro.inference.map as map_module
    from bora_pyro.testing import generated_corpus

    seen = []
    original = map_module.MAPStepper._shift_moments

    def spy(self, old_tau):
        if not seen:  # the first update: compare the delta with autograd's gradients
            batch = self.prepare(self._batch)
            grads = []
            for tau in (old_tau, self.tau):
                self.optimizer.zero_grad(set_to_none=True)
                loss = self.elbo.differentiable_loss(self.model, self.guide, batch, tau=tau)
                loss.backward()
                grads.append(self.guide.task_parameter.grad.clone())
            self.optimizer.zero_grad(set_to_none=True)
            calls = []
            monkeypatch.setattr(map_module, "shift_adam_moments", lambda m, v, t, d, b: calls.append(d.clone()))
            original(self, old_tau)
            monkeypatch.undo()
            seen.append((grads[1] - grads[0], calls[0]))
        original(self, old_tau)

    monkeypatch.setattr(map_module.MAPStepper, "_shift_moments", spy)
    corpus, base, tok = generated_corpus(4.0, validation_size=0.2)
    settings = dict(model=base, tokenizer=tok, tau="learn", tau_init=1e3, max_steps=40, lr=2e-2, batch_size=16,
                    rank=2, alpha=4, target_modules=["lm_head"], precision_groups="ab", device="cpu",
                    progress=False, patience=None, tau_warmup=10, tau_update_every=10, task_step="dense",
                    parameterization=parameterization)
    shifted = bora_pyro.fit_map(corpus, tau_shift_moments=True, **settings)
    autograd_change, delta = seen[0]
    assert delta.abs().max() > 0
    assert torch.allclose(delta, autograd_change, atol=1e-4 * float(delta.abs().max()), rtol=0)
    assert shifted.fit_args["tau_shift_moments"] is True
    monkeypatch.undo()
    plain = bora_pyro.fit_map(corpus, **settings)
    first = shifted.history["tau_update"][0]["step"]
    assert shifted.history["train_nll"][: first + 1] == plain.history["train_nll"][: first + 1]
    assert shifted.history["train_nll"][first + 1:] != plain.history["train_nll"][first + 1:]
    with pytest.raises(ValueError, match=r"tau_shift_moments=True is implemented for dense steps.*task_step='dense'"):
        bora_pyro.fit_map(corpus, **{**settings, "task_step": "sparse", "tau_shift_moments": True, "max_steps": 2})


def test_a_learned_tau_starts_where_its_method_does_unless_tau_init_is_given():
    """``tau_init=None`` (the default): MAP's validation method starts at
    `config.VALIDATION_TAU_INIT` (1e4), the evidence at `config.TAU_INIT` (1e3); a given
    ``tau_init`` is where either starts. The config keeps ``None``, so a saved fit says that the
    method chose."""
    import bora_pyro
    from bora_pyro.config import TAU_INIT, VALIDATION_TAU_INIT
    from bora_pyro.testing import generated_corpus

    corpus, base, tok = generated_corpus(4.0, validation_size=0.2)
    small = dict(model=base, tokenizer=tok, tau="learn", max_steps=3, batch_size=16, rank=2, alpha=4,
                 target_modules=["lm_head"], device="cpu", progress=False, patience=None, tau_warmup=10)
    assert (TAU_INIT, VALIDATION_TAU_INIT) == (1e3, 1e4)
    for method, start in (("validation", VALIDATION_TAU_INIT), ("evidence", TAU_INIT)):
        default = bora_pyro.fit_map(corpus, tau_method=method, **small)
        assert default.history["tau"][0] == [start, start] and default.config.tau_init is None
        given = bora_pyro.fit_map(corpus, tau_method=method, tau_init=300.0, **small)
        assert given.history["tau"][0] == [300.0, 300.0]


def _adamw_run(h, mu, tau_p, steps, *, lr=0.05, noise=1.0, seed=0, shadow_factor=None):
    """AdamW on the offset parameterisation of ``sum_d 1/2 sum_i h (theta_d - mu_d)^2 + tau/2 |delta_d|^2``
    with a gradient noise of sd ``noise`` (the same for every run of the seed). Returns the final
    adapters and, with ``shadow_factor``, the `ShadowTrajectories` stepped with every step's
    gradients at the iterate they were taken at."""
    from bora_pyro.inference.hyper import ShadowTrajectories

    g = torch.Generator().manual_seed(seed)
    delta = torch.zeros(mu.shape, requires_grad=True)
    Theta = torch.zeros(mu.shape[1], requires_grad=True)
    opt = torch.optim.AdamW([delta, Theta], lr=lr, weight_decay=0.0)
    settings = {"lr": lr, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
    shadows = None
    for _ in range(steps):
        theta = Theta + delta
        loss = (0.5 * h * (theta - mu).square() + noise * torch.randn(mu.shape, generator=g) * theta).sum()
        loss = loss + 0.5 * (tau_p * delta.square()).sum()
        opt.zero_grad()
        loss.backward()
        if shadow_factor is not None:
            if shadows is None:
                shadows = ShadowTrajectories(delta, Theta, factor=shadow_factor)
            shadows.step(delta.grad, Theta.grad, delta.detach(), Theta.detach(), tau_p, h,
                         task_opt=settings, global_opt=settings)
        opt.step()
    return (Theta + delta).detach(), shadows


def test_shadow_trajectories_are_the_runs_at_tau_k_and_tau_over_k_on_a_quadratic():
    """With an exactly quadratic data term (diagonal curvature ``h``) a shadow's linearised data
    gradient is exact, so each shadow is the AdamW run at ``tau k`` (resp. ``tau / k``) itself,
    with the same gradient noise: to 1e-4 after 150 steps (float32)."""
    h, mu, _, _, group_index = _gaussian_problem(D=4, P=7)
    h, mu = h.float(), mu.float()
    tau_p = torch.tensor([0.5, 8.0])[group_index]
    _, shadows = _adamw_run(h, mu, tau_p, 150, shadow_factor=1.5)
    for s, k in enumerate((1.5, 1 / 1.5)):
        run, _ = _adamw_run(h, mu, tau_p * k, 150)
        assert torch.allclose(shadows.globals[s] + shadows.offsets[s], run, atol=1e-4), s


def test_shadow_sensitivity_is_the_implicit_one_at_convergence():
    """Run to convergence (4,000 noise-free steps), the trajectory's sensitivity gives the implicit
    function theorem's ``dV / d log tau`` of the closed-form MAP (5% relative): at an optimum the
    two gradients are the same."""
    h, mu, v, nu, group_index = _gaussian_problem(D=4, P=7)
    tau = torch.tensor([0.5, 8.0], dtype=torch.float64)
    final, shadows = _adamw_run(h.float(), mu.float(), tau.float()[group_index], 4000, lr=0.01, noise=0.0,
                                shadow_factor=1.05)
    theta_map, Theta_map = _map(h, mu, tau[group_index])
    assert torch.allclose(final.double(), theta_map, atol=1e-3)
    expected = implicit_tau_gradient(theta_map - Theta_map, h, tau, group_index, v * (theta_map - nu))
    got = shadows.gradient((v * (theta_map - nu)).float(), group_index, 2).double()
    assert torch.allclose(got, expected, rtol=0.05), (got, expected)


def test_map_with_the_trajectory_gradient_lands_at_the_brute_force_validation_optimum():
    """``tau_gradient="trajectory"`` through the whole stepper, on the Gaussian problem of the
    implicit gradient's test above (there the curvature is exact and the run converges, so the
    two gradients agree): validation NLL within 1% of the brute-force grid's best, tau within a
    factor 2 of its argmin, from tau_init 100x too high, with and without ``tau_gate``; centered
    and sparse steps are refused."""
    from bora_pyro.config import BoraConfig, TrainConfig
    from bora_pyro.inference.hyper import ValidationData
    from bora_pyro.inference.map import optimise_map
    from bora_pyro.models.bora import BoraModel

    train, validation = _split_problem()
    grid = torch.logspace(-2, 3, 501).tolist()
    losses = [_validation_nll(train, validation, t) for t in grid]
    best, tau_best = min(losses), grid[losses.index(min(losses))]

    def gradients(task_adapters, batch):
        return -(batch.y - task_adapters[batch.task_ids]) / train.sigma**2, len(batch)

    def fit(**options):
        data = ValidationData(gradients, validation.batches(12, seed=1), torch.bincount(train.task_ids))
        model = BoraModel(train.log_likelihood, num_tasks=train.num_tasks, num_params=train.y.shape[1],
                          num_docs=train.num_docs, config=BoraConfig(tau="learn", tau_init=100 * tau_best),
                          docs_per_task=torch.bincount(train.task_ids))
        return optimise_map(
            model, train.batches(12), TrainConfig(device="cpu", progress=False, max_steps=3000, lr=0.05,
                                                 batch_size=12, tau_update_every=50, tau_lr=0.3,
                                                 tau_method="validation", tau_gradient="trajectory", **options),
            init_global=torch.zeros(train.y.shape[1]), validation=data,
        )

    learned = fit().tau.item()
    assert _validation_nll(train, validation, learned) < 1.01 * best, (learned, tau_best)
    assert tau_best / 2 < learned < 2 * tau_best, (learned, tau_best)
    # The gate lets the steady descent through and records its factor. Measured validation NLL over
    # the brute-force best with the gate: 1.0034 (this split, seed 3), 1.0000 and 1.0062 (seeds 4,
    # 5), the same at one and two threads.
    gated = fit(tau_gate=2.0)
    assert _validation_nll(train, validation, gated.tau.item()) < 1.01 * best, (gated.tau, tau_best)
    gates = [u["gate"][0] for u in gated.history["tau_update"]]
    assert gates[0] == 0.0 and all(0.0 <= g <= 1.0 for g in gates) and max(gates) > 0.5, gates
    for options in ({"task_step": "sparse"}, {"parameterization": "centered"}):
        with pytest.raises(ValueError, match="tau_gradient='trajectory' is implemented for dense steps"):
            fit(**options)
