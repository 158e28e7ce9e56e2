"""`to_inference_data`: values equal the fitted result's, closed forms for shrinkage, netCDF round trip."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

import bora_pyro
from bora_pyro.reports.arviz import diagonal_fisher, import_arviz, shrinkage_factors, to_inference_data
from tests.conftest import assert_close
from tests.tiny_result import tiny_result

az = import_arviz()


def _tau_per_param(result):
    names, index = result.lm.layout.group_index(result.config.precision_groups)
    return torch.tensor([result.tau[g] for g in names], dtype=torch.float64)[index]


def _round_trip(idata, path):
    idata.to_netcdf(str(path))
    back = az.from_netcdf(str(path))
    for group in ("posterior", "heldout", "constant_data"):
        a, b = getattr(idata, group), getattr(back, group)
        assert set(a.data_vars) == set(b.data_vars)
        for name in a.data_vars:
            assert a[name].dims == b[name].dims, name
            np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=f"{group}.{name}")
        assert list(b["task"].values) == list(a["task"].values)
    assert back.attrs["inference"] == idata.attrs["inference"]
    return back


def _summary_and_forest(idata, tasks):
    import matplotlib.pyplot as plt

    summary = az.summary(idata, var_names=["shrinkage", "relative_distance"], kind="stats")
    assert [f"shrinkage[{t}]" for t in tasks] == list(summary.index[: len(tasks)])
    axes = az.plot_forest(idata, var_names=["shrinkage"])
    labels = [t.get_text() for t in axes[0].get_yticklabels()]
    assert all(any(t in label for label in labels) for t in tasks), labels
    plt.close("all")
    return summary


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # az.summary's sd of a single draw
def test_map_values_equal_the_result_and_round_trip(map_result, tmp_path):
    fisher = diagonal_fisher(map_result)
    idata = to_inference_data(map_result, fisher=fisher)
    post, tasks = idata.posterior, map_result.tasks
    assert idata.attrs["inference"] == "map" and "point estimates" in idata.attrs["note"]
    assert dict(post.sizes) == {"chain": 1, "draw": 1, "task": 6, "group": 2}
    assert post["shrinkage"].dims == ("chain", "draw", "task")
    assert list(post["task"].values) == tasks and list(post["group"].values) == ["A", "B"]

    assert_close(post["tau"].values[0, 0], [map_result.tau["A"], map_result.tau["B"]], rtol=0, atol=0)
    summary = map_result.posterior_summary()
    assert_close(post["distance"].values[0, 0], summary["distance"].to_numpy(copy=True), rtol=1e-6)
    assert_close(post["relative_distance"].values[0, 0], summary["relative_distance"].to_numpy(copy=True), rtol=1e-6)
    # Shrinkage by hand: mean_i tau_g(i) / (h_di + tau_g(i)).
    tau = _tau_per_param(map_result)
    expected = (tau / (fisher.double() + tau)).mean(1)
    assert_close(post["shrinkage"].values[0, 0], expected, rtol=1e-12)
    # Held-out fit: the evaluate() table, lpd = -(nll per token) * tokens.
    table = map_result.evaluate("test").iloc[:6]
    assert_close(post["perplexity"].values[0, 0], table["perplexity"].to_numpy(copy=True), rtol=1e-12)
    assert_close(post["lpd"].values[0, 0], -(table["nll"] * table["n_tokens"]).to_numpy(copy=True), rtol=1e-12)
    cd = idata.constant_data
    np.testing.assert_array_equal(cd["n_train_docs"].values, map_result.corpus.split("train").docs_per_task)
    np.testing.assert_array_equal(cd["n_eval_tokens"].values, map_result.corpus.split("test").tokens_per_task)

    back = _round_trip(idata, tmp_path / "map.nc")
    stats = _summary_and_forest(back, tasks)
    assert_close(stats["mean"].iloc[:6].to_numpy(copy=True), expected, atol=1e-3, rtol=0)  # az.summary rounds


def test_svi_values_equal_the_result_and_round_trip(svi_result, tmp_path):
    S = 40
    idata = to_inference_data(svi_result, num_samples=S, predictive_samples=3, seed=5)
    post, tasks = idata.posterior, svi_result.tasks
    assert idata.attrs["inference"] == "svi"
    assert dict(post.sizes) == {"chain": 1, "draw": S, "task": 6, "group": 2}
    assert post["distance"].dims == ("chain", "draw", "task")

    theta, Theta, sd = svi_result.task_adapters.double(), svi_result.global_adapter.double(), svi_result.task_scales.double()
    # Draw s is result.sample_adapters(1, seed=seed + s).
    for s in (0, 17, S - 1):
        draw = svi_result.sample_adapters(1, seed=5 + s)[0]
        assert_close(post["distance"].values[0, s], (draw - svi_result.global_adapter).norm(dim=1), rtol=1e-6)
    assert_close(post["distance_at_mean"].values[0, 0], svi_result.posterior_summary()["distance"].to_numpy(copy=True), rtol=1e-6)
    # E||theta_d - Theta||^2 = ||mu_d - Theta||^2 + sum sigma^2, Var = sum 2 sigma^4 + 4 (mu - Theta)^2 sigma^2;
    # the mean over S draws is within 4 standard errors.
    mean_sq = (theta - Theta).square().sum(1) + sd.square().sum(1)
    var_sq = (2 * sd**4 + 4 * (theta - Theta).square() * sd.square()).sum(1)
    observed = torch.as_tensor(post["distance"].values[0] ** 2).mean(0)
    assert ((observed - mean_sq).abs() < 4 * (var_sq / S).sqrt()).all(), (observed, mean_sq)
    # Shrinkage by hand: mean_i tau_g(i) * sigma_di^2, constant along draws.
    expected = (_tau_per_param(svi_result) * sd.square()).mean(1)
    assert_close(post["shrinkage"].values[0, 0], expected, rtol=1e-12)
    assert (post["shrinkage"].values == post["shrinkage"].values[:, :1]).all()
    assert_close(post["tau"].values[0, 0], [100.0, 100.0], rtol=0, atol=0)
    # Posterior-predictive fit: exactly evaluate(num_samples=3, seed=5).
    table = svi_result.evaluate("test", num_samples=3, seed=5).iloc[:6]
    assert_close(post["perplexity"].values[0, 0], table["perplexity"].to_numpy(copy=True), rtol=1e-12)
    assert_close(idata.heldout["perplexity_low"].values, table["perplexity_low"].to_numpy(copy=True), rtol=1e-12)
    assert_close(post["lpd"].values[0, 0], -(table["nll"] * table["n_tokens"]).to_numpy(copy=True), rtol=1e-12)

    back = _round_trip(idata, tmp_path / "svi.nc")
    _summary_and_forest(back, tasks)


def test_shrinkage_falls_as_training_size_grows(map_result, svi_result):
    n_train = map_result.corpus.split("train").docs_per_task  # 4, 9, 17, 34, 68, 137
    for result in (map_result, svi_result):
        shrinkage, _ = shrinkage_factors(result)
        rho = scipy.stats.spearmanr(shrinkage, n_train).statistic
        print(result.method, np.round(shrinkage, 4), "Spearman", rho)
        assert rho < -0.5, (result.method, shrinkage, rho)


def test_diagonal_fisher_equals_summed_squared_per_document_gradients(map_result):
    """The [B, P] per-row trick against one backward per document; the subset scaled by n_d / m_d."""
    h = diagonal_fisher(map_result, max_docs_per_task=3, batch_size=4, seed=1)
    train = map_result.corpus.split("train")
    subset = train.subset(3, seed=1)
    lm, theta = map_result.lm, map_result.task_adapters
    expected = torch.zeros_like(theta, dtype=torch.float64)
    for i in range(len(subset)):
        batch = subset.batch([i])
        leaf = theta.clone().requires_grad_(True)
        nll = lm.sequence_nll(batch.input_ids, batch.attention_mask, batch.labels, adapters=leaf, task_ids=batch.task_ids)
        (grad,) = torch.autograd.grad(nll.sum(), leaf)
        expected += grad.double().square()
    expected *= torch.as_tensor(train.docs_per_task / subset.docs_per_task, dtype=torch.float64)[:, None]
    assert_close(h, expected, rtol=1e-4, atol=1e-6 * float(expected.max()))


def test_shrinkage_closed_forms_and_exact_limits():
    """tau / (h + tau) per group for MAP, tau * sigma^2 for SVI; 0 and 1 exactly at tau = 0 and inf."""
    result = tiny_result(tau={"A": 10.0, "B": 1000.0})
    names, index = result.lm.layout.group_index("ab")
    D, P = result.task_adapters.shape
    h = torch.arange(1, D + 1, dtype=torch.float32)[:, None].expand(D, P) * 90.0  # h_d = 90 d
    shrinkage, by_group = shrinkage_factors(result, fisher=h)
    share_a = np.array([10 / (90 * d + 10) for d in (1, 2, 3)])
    share_b = np.array([1000 / (90 * d + 1000) for d in (1, 2, 3)])
    n_a, n_b = int((index == 0).sum()), int((index == 1).sum())
    assert_close(by_group, np.stack([share_a, share_b], 1), rtol=1e-6)
    assert_close(shrinkage, (n_a * share_a + n_b * share_b) / P, rtol=1e-6)

    result.task_scales = torch.full((D, P), 0.02)
    shrinkage, by_group = shrinkage_factors(result)
    assert_close(by_group, np.tile([10 * 4e-4, 1000 * 4e-4], (D, 1)), rtol=1e-5)

    assert (shrinkage_factors(tiny_result(tau=0.0), fisher=h)[0] == 0).all()
    assert (shrinkage_factors(tiny_result(tau=math.inf, pooled=True), fisher=h)[0] == 1).all()
    assert (shrinkage_factors(tiny_result(tau=math.inf, pooled=True), fisher=torch.zeros(D, P))[0] == 1).all()


def test_exported_from_the_package_and_the_result(map_result):
    assert bora_pyro.to_inference_data is to_inference_data
    idata = map_result.to_inference_data(fisher_max_docs_per_task=3, max_docs_per_task=2)
    assert idata.heldout.attrs["max_docs_per_task"] == 2
    assert (idata.constant_data["n_eval_docs"].values <= 2).all()
    expected, _ = shrinkage_factors(map_result, diagonal_fisher(map_result, max_docs_per_task=3))
    assert_close(idata.posterior["shrinkage"].values[0, 0], expected, rtol=1e-12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_samples": 5}, r"num_samples=5 needs an SVI result"),
        ({"fisher": torch.ones(2, 3)}, r"fisher has shape \(2, 3\).*diagonal_fisher"),
        ({"predictive_samples": -1}, r"predictive_samples must be an integer >= 0"),
        ({"split": "dev"}, r"unknown split 'dev'"),
    ],
)
def test_bad_arguments_get_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        to_inference_data(tiny_result(), **kwargs)
