"""Expected calibration error: hand-computed examples, and per task against a token-by-token loop."""

import math

import numpy as np
import pytest
import torch

from bora_pyro.data import IGNORE_INDEX
from bora_pyro.reports import calibration_per_task, expected_calibration_error
from tests.conftest import assert_close


def test_ece_hand_computed_four_bins():
    # Bins (0, .25], (.25, .5], (.5, .75], (.75, 1]:
    #   bin 1: conf .1 (wrong), .2 (right): acc 1/2, conf .15 -> 2/8 * .35   = .0875
    #   bin 2: conf .3 (wrong):              acc 0,   conf .3  -> 1/8 * .3    = .0375
    #   bin 3: conf .6, .7 (both right):     acc 1,   conf .65 -> 2/8 * .35   = .0875
    #   bin 4: conf .9, .8, .95 (R, W, R):   acc 2/3, conf .8833 -> 3/8 * .21667 = .08125
    conf = [0.1, 0.2, 0.3, 0.6, 0.7, 0.9, 0.8, 0.95]
    correct = [0, 1, 0, 1, 1, 1, 0, 1]
    assert expected_calibration_error(conf, correct, n_bins=4) == pytest.approx(0.29375, abs=1e-12)


def test_ece_hand_computed_fifteen_bins():
    # 10 predictions at .9 with 9 right: acc .9 = conf .9, no gap. 5 at .3 with 1 right:
    # acc .2 vs conf .3 -> 5/15 * .1 = 1/30.
    conf = [0.9] * 10 + [0.3] * 5
    correct = [1] * 9 + [0] + [1] + [0] * 4
    assert expected_calibration_error(conf, correct) == pytest.approx(1 / 30, abs=1e-12)


def test_ece_bins_are_closed_on_the_right():
    # .25 belongs to the first of 4 bins: |1 - .25| / 2 + |0 - .3| / 2 = .525
    # (were it in the second: |1/2 - .275| = .225).
    assert expected_calibration_error([0.25, 0.3], [True, False], n_bins=4) == pytest.approx(0.525, abs=1e-12)
    assert expected_calibration_error([0.0, 1.0], [0, 1], n_bins=15) == 0.0
    assert math.isnan(expected_calibration_error([], []))


@pytest.mark.parametrize(
    "args, match",
    [
        (([2.0, 0.5], [1, 0]), "pass probabilities, not logits"),
        (([0.5], [1, 0]), "same length"),
        (([0.5], [1], 0), "n_bins must be a positive integer"),
    ],
)
def test_ece_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        expected_calibration_error(*args)


def test_calibration_per_task_equals_a_token_by_token_loop(map_result):
    cal = calibration_per_task(map_result, "test", max_docs_per_task=4, batch_size=5)
    split = map_result.corpus.split("test").subset(4, seed=0)
    lm, theta = map_result.lm, map_result.task_adapters
    conf = {d: [] for d in range(6)}
    hit = {d: [] for d in range(6)}
    with torch.no_grad():
        for i in range(len(split)):
            b = split.batch([i])
            probs = lm(b.input_ids, b.attention_mask, adapters=theta, task_ids=b.task_ids)[0, :-1].softmax(-1)
            target = b.labels[0, 1:]
            keep = target != IGNORE_INDEX
            top, pred = probs[keep].max(-1)
            d = int(b.task_ids[0])
            conf[d] += top.tolist()
            hit[d] += (pred == target[keep]).tolist()
    expected = [expected_calibration_error(conf[d], hit[d]) for d in range(6)]
    table = cal.table()
    assert list(table["task"]) == map_result.tasks + ["overall"]
    assert_close(cal.ece(), expected, rtol=1e-5, atol=1e-7)
    all_conf = sum(conf.values(), [])
    all_hit = sum(hit.values(), [])
    assert_close(cal.overall_ece(), expected_calibration_error(all_conf, all_hit), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(table["n_tokens"].iloc[:6], split.tokens_per_task)
    assert_close(table["accuracy"].iloc[:6], [np.mean(hit[d]) for d in range(6)], rtol=1e-12)
    rel = cal.reliability("task5")
    assert len(rel) == 15 and rel["count"].sum() == split.tokens_per_task[5]
