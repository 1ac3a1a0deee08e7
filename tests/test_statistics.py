"""Statistics: bootstrap intervals of a loss on synthetic paired data whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from onnxws.statistics import called_interval, group_index, loss_interval, value_half_width


def flips(n: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A baseline right on every sample and a candidate wrong on ``k`` of them."""
    candidate = np.ones(n)
    candidate[np.random.default_rng(seed).choice(n, k, replace=False)] = 0.0
    return np.ones(n), candidate


def test_ungrouped_interval_matches_the_binomial_one():
    """n = 2000, 40 flips: loss 2 pp; the binomial 95 % half-width is 1.96 sqrt(p (1-p) / n) = 0.61 pp."""
    base, cand = flips(2000, 40)
    interval = loss_interval(base, cand, "absolute", seed=1)
    assert interval.estimate == pytest.approx(2.0)
    binomial = 1.96 * np.sqrt(0.02 * 0.98 / 2000) * 100
    assert interval.half_width == pytest.approx(binomial, rel=0.15)
    assert interval.low < 2.0 < interval.high
    assert loss_interval(base, cand, "absolute", seed=1) == interval  # the same seed, the same draws


def test_grouped_interval_is_wider_by_the_square_root_of_the_group_size():
    """The same 2 pp loss, but flips come whole groups at a time (25 views of one photograph flip
    together): the samples are 80 independent groups, not 2000 samples, and the interval is about
    sqrt(25) = 5x wider than ungrouped."""
    groups = np.repeat(np.arange(80), 25)
    cand = np.ones(2000)
    cand[groups < 2] = 0.0  # 2 of 80 groups flip: 50 samples = 2.5 pp
    base = np.ones(2000)
    grouped = loss_interval(base, cand, "absolute", groups=groups, seed=2)
    ungrouped = loss_interval(base, cand, "absolute", seed=2)
    assert grouped.estimate == ungrouped.estimate == pytest.approx(2.5)
    assert 3.5 < grouped.half_width / ungrouped.half_width < 6.5
    # shuffled sample order, same groups: group ids are labels, the answer does not depend on order
    order = np.random.default_rng(3).permutation(2000)
    shuffled = loss_interval(base[order], cand[order], "absolute", groups=groups[order], seed=2)
    assert shuffled.half_width == pytest.approx(grouped.half_width, rel=0.25)


def test_paired_flips_that_cancel_have_a_tight_interval_around_zero():
    """20 samples flip to right and 20 to wrong: the loss is 0 with the paired interval of 40
    changed samples, not of the baseline's whole sampling error."""
    rng = np.random.default_rng(4)
    base = (rng.random(2000) < 0.7).astype(float)
    cand = base.copy()
    right, wrong = np.flatnonzero(base == 0)[:20], np.flatnonzero(base == 1)[:20]
    cand[right], cand[wrong] = 1.0, 0.0
    interval = loss_interval(base, cand, "absolute", seed=5)
    assert interval.estimate == pytest.approx(0.0)
    paired = 1.96 * np.sqrt(40 / 2000 / 2000) * 100  # per-sample changes: 40 of +-1, the rest 0
    assert interval.low < 0 < interval.high and interval.half_width == pytest.approx(paired, rel=0.15)
    unpaired = 1.96 * np.sqrt(base.mean() * (1 - base.mean()) / 2000) * 100
    assert value_half_width(base, "absolute", seed=5) == pytest.approx(unpaired, rel=0.15)  # 3x wider


def test_resolution_is_the_half_width_of_the_baseline_value():
    rng = np.random.default_rng(6)
    outcomes = (rng.random(1000) < 0.8).astype(float)
    want = 1.96 * np.sqrt(outcomes.mean() * (1 - outcomes.mean()) / 1000) * 100
    assert value_half_width(outcomes, "absolute", seed=7) == pytest.approx(want, rel=0.15)
    assert value_half_width(outcomes, "relative", seed=7) == pytest.approx(want / outcomes.mean(), rel=0.15)
    assert value_half_width(np.ones(1000), "absolute") == 0.0  # a set that cannot vary


def test_a_metric_called_on_resamples_gives_the_same_interval_as_its_outcomes():
    base, cand = flips(1000, 30, seed=8)
    calls = []

    def measure(indices):
        calls.append(len(indices))
        return float(base[indices].mean()), float(cand[indices].mean())

    interval, resolution = called_interval(measure, 1000, "absolute", seed=9, resamples=400)
    assert interval.estimate == pytest.approx(3.0) and len(calls) == 401 and set(calls) == {1000}
    assert interval.half_width == pytest.approx(loss_interval(base, cand, "absolute").half_width, rel=0.2)
    assert resolution == 0.0  # the baseline is right everywhere


def test_group_index_relabels_by_first_appearance():
    index, count = group_index(6, np.array([7, 7, -3, 9, -3, 7]))
    assert count == 3 and index.tolist() == [0, 0, 1, 2, 1, 0]
    index, count = group_index(3, None)
    assert count == 3 and index.tolist() == [0, 1, 2]
