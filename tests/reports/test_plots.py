"""The figures: right data, tasks ordered by training size, clear errors."""

import math

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from bora_pyro.reports import calibration_per_task, to_inference_data
from bora_pyro.reports.plots import (
    plot_distance_vs_size,
    plot_perplexity,
    plot_reliability,
    plot_shrinkage_forest,
    plot_tau,
)
from tests.tiny_result import tiny_result


@pytest.fixture(scope="module")
def idata(map_result):
    return to_inference_data(map_result, fisher=torch.ones_like(map_result.task_adapters))


def test_forest_plots_order_tasks_by_training_size(idata, map_result, baselines):
    n_train = map_result.corpus.split("train").docs_per_task
    order = np.argsort(n_train)
    expected = [f"{map_result.tasks[i]}  (n={n_train[i]})" for i in order]
    for fig in (plot_shrinkage_forest(idata), plot_perplexity(idata, baselines)):
        assert isinstance(fig, Figure)
        ax = fig.axes[0]
        ticks = sorted(ax.get_yticklabels(), key=lambda t: -t.get_position()[1])  # top to bottom
        assert [t.get_text() for t in ticks] == expected
    fig = plot_perplexity(idata, baselines)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels[0].startswith("BoRA (overall") and labels[1].startswith("tau=0") and labels[2].startswith("tau=inf")


def test_distance_plot_has_one_point_per_task_at_its_training_size(idata, map_result):
    fig = plot_distance_vs_size(idata)
    ax = fig.axes[0]
    points = ax.collections[0].get_offsets()
    np.testing.assert_array_equal(points[:, 0], map_result.corpus.split("train").docs_per_task)
    np.testing.assert_allclose(points[:, 1], map_result.posterior_summary()["relative_distance"], rtol=1e-6)
    assert ax.get_xscale() == "log"


def test_tau_plot_shows_the_learned_path_and_the_limits_as_text(idata, map_result):
    fig = plot_tau(idata, history=map_result.history)
    assert len(fig.axes) == 2 and fig.axes[1].get_yscale() == "log"
    pooled = to_inference_data(tiny_result(tau=math.inf, pooled=True))
    texts = [t.get_text() for t in plot_tau(pooled).axes[0].texts]
    assert any("tau = inf" in t for t in texts)


def test_reliability_diagram(map_result):
    cal = calibration_per_task(map_result, max_docs_per_task=3)
    fig = plot_reliability(cal)
    assert "ECE" in fig.axes[0].get_title()
    legend = [t.get_text() for t in fig.axes[2].get_legend().get_texts()]
    assert legend == [f"{t}: ECE {e:.3f}" for t, e in zip(map_result.tasks, cal.ece())]


def test_errors(idata, map_result):
    with pytest.raises(ValueError, match="InferenceData from bora_pyro.to_inference_data or a BoraResult"):
        plot_shrinkage_forest({"shrinkage": [0.5]})
    other = map_result.evaluate("test", max_docs_per_task=1).iloc[[0, 1, 6]]  # two tasks and 'overall'
    with pytest.raises(ValueError, match=r"baselines\['small'\] has tasks \['task0', 'task1'\]"):
        plot_perplexity(idata, {"small": other})
    with pytest.raises(ValueError, match="calibration_per_task"):
        plot_reliability(idata)
