"""Statistics: how precisely an evaluation set measures a loss.

A loss measured on n samples is an estimate of the loss on the population they were drawn from.
Its 95 % interval comes from a **paired bootstrap**: the samples (or, when the data groups them,
the groups: e.g. the views of one photograph, which are not independent) are drawn with
replacement, the baseline and the candidate are measured on the same draw, and the 2.5 / 97.5
percentiles of the loss over the draws bound it. Paired, because both models are measured on
the same samples: what varies between draws is the samples' share of the change, not the
baseline's luck.

The set's **resolution** is the half-width of the 95 % bootstrap interval of the unmodified
model's metric value (in the loss's unit): how far the figure this set gives could be from the
population's. A budget below it asks for a difference the set cannot resolve.

Per-sample metrics (the built-in ones, or a custom metric with a ``per_sample`` form) are
resampled from their per-sample outcomes (``RESAMPLES`` draws); any other custom metric is
called again on each resample (``CALL_RESAMPLES`` draws). Draws come from
``numpy.random.default_rng(seed)``: the same inputs and seed give the same interval.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from onnxws.data import EvalData
from onnxws.exploration import loss_between
from onnxws.metrics import Metric

CONFIDENCE = 0.95
RESAMPLES = 2000
"""Bootstrap draws from per-sample outcomes."""
CALL_RESAMPLES = 200
"""Bootstrap draws of a custom metric without a per-sample form (one metric call per model and draw)."""
_CHUNK = 1 << 22  # elements of one block of draw weights


@dataclass(frozen=True)
class Interval:
    """A 95 % interval ``[low, high]`` around ``estimate`` (all in the loss's unit)."""

    estimate: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2.0

    def as_dict(self) -> dict[str, float]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "half_width": self.half_width}


def group_index(n: int, groups: np.ndarray | None) -> tuple[np.ndarray, int]:
    """Each sample's group as 0..G-1 (order of first appearance) and G; every sample its own group
    without ``groups``."""
    if groups is None:
        return np.arange(n), n
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))  # relabel by first appearance, so ids do not depend on their values
    return order[inverse], len(first)


def _draw_weights(n: int, groups: np.ndarray | None, resamples: int, rng: np.random.Generator):
    """Blocks of bootstrap weights ``[draws, n]``: how often each sample is in each draw (its
    group's count, when grouped)."""
    index, count = group_index(n, groups)
    per_block = max(1, _CHUNK // max(n, 1))
    done = 0
    while done < resamples:
        take = min(per_block, resamples - done)
        # count draws with replacement per resample, tallied per unit: the multinomial counts, drawn
        # as integers and bincounted (rng.multinomial over 10,000 units took 3 s for 2,000 draws).
        draws = rng.integers(0, count, size=(take, count)) + (np.arange(take) * count)[:, None]
        counts = np.bincount(draws.reshape(-1), minlength=take * count).reshape(take, count)
        yield counts[:, index].astype(np.float64)
        done += take


def _percentiles(values: np.ndarray, estimate: float) -> Interval:
    tail = (1.0 - CONFIDENCE) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return Interval(float(estimate), float(low), float(high))


def loss_interval(baseline: np.ndarray, candidate: np.ndarray, mode: str, *, groups: np.ndarray | None = None,
                  seed: int = 0, resamples: int = RESAMPLES) -> Interval:
    """Paired bootstrap interval of the loss between two models' per-sample outcomes (the metric is
    their mean), in ``mode``'s unit (``exploration.loss_between``)."""
    baseline = np.asarray(baseline, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    estimate = loss_between(float(baseline.mean()), float(candidate.mean()), mode)
    rng = np.random.default_rng(seed)
    losses = []
    for weights in _draw_weights(len(baseline), groups, resamples, rng):
        total = weights.sum(axis=1)
        base, cand = weights @ baseline / total, weights @ candidate / total
        losses.append((base - cand) * 100.0 if mode == "absolute" else
                      np.where(base != 0, (base - cand) / np.where(base != 0, np.abs(base), 1.0) * 100.0, 0.0))
    return _percentiles(np.concatenate(losses), estimate)


def value_half_width(outcomes: np.ndarray, mode: str, *, groups: np.ndarray | None = None, seed: int = 0,
                     resamples: int = RESAMPLES) -> float:
    """Half-width of the bootstrap interval of the metric value (the outcomes' mean), in ``mode``'s
    loss unit: percentage points, or percent of the value. The set's resolution for that model."""
    outcomes = np.asarray(outcomes, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.concatenate([weights @ outcomes / weights.sum(axis=1)
                            for weights in _draw_weights(len(outcomes), groups, resamples, rng)])
    interval = _percentiles(means, float(outcomes.mean()))
    scale = 100.0 if mode == "absolute" else (100.0 / abs(interval.estimate) if interval.estimate else 0.0)
    return interval.half_width * scale


def draws(n: int, groups: np.ndarray | None, resamples: int, seed: int) -> list[np.ndarray]:
    """Bootstrap draws as sample indices (whole groups, when grouped), for metrics that must be
    called on each resample."""
    rng = np.random.default_rng(seed)
    index, count = group_index(n, groups)
    order = np.argsort(index, kind="stable")
    sizes = np.bincount(index, minlength=count)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    members = [order[start:start + size] for start, size in zip(starts, sizes)]
    return [np.concatenate([members[g] for g in rng.integers(0, count, count)]) for _ in range(resamples)]


def called_interval(measure: Callable[[np.ndarray], tuple[float, float]], n: int, mode: str, *,
                    groups: np.ndarray | None = None, seed: int = 0, resamples: int = CALL_RESAMPLES
                    ) -> tuple[Interval, float]:
    """For a metric without per-sample outcomes: ``measure(indices) -> (baseline value, candidate
    value)`` on a resample; returns the paired loss interval and the baseline value's half-width
    (the resolution), both in ``mode``'s unit."""
    everything = measure(np.arange(n))
    losses, values = [], []
    for indices in draws(n, groups, resamples, seed):
        base, cand = measure(indices)
        losses.append(loss_between(base, cand, mode))
        values.append(base)
    interval = _percentiles(np.array(losses), loss_between(everything[0], everything[1], mode))
    spread = _percentiles(np.array(values), everything[0])
    scale = 100.0 if mode == "absolute" else (100.0 / abs(everything[0]) if everything[0] else 0.0)
    return interval, spread.half_width * scale


# --------------------------------------------------------------------------------------------
# A model's loss on a set, with its interval; the set's resolution


@dataclass(frozen=True)
class Measured:
    """A model's loss against the unmodified model on one set of samples, with its 95 % interval."""

    samples: int
    groups: int | None
    value: float
    baseline: float
    interval: Interval

    @property
    def loss(self) -> float:
        return self.interval.estimate

    def as_dict(self) -> dict:
        return {"samples": self.samples, "groups": self.groups, "value": self.value, "baseline": self.baseline,
                "loss": self.loss, "interval": [self.interval.low, self.interval.high],
                "half_width": self.interval.half_width}


def _outcomes(metric: Metric, outputs: Sequence[np.ndarray], data: EvalData, output_names: Sequence[str],
              reference: Sequence[np.ndarray]) -> np.ndarray | None:
    per_sample = metric.per_sample
    if per_sample is None:
        return None
    return np.asarray(per_sample(list(outputs), metric.data_for(data.arrays, output_names, reference)), dtype=np.float64)


def _call(metric: Metric, outputs: Sequence[np.ndarray], data: EvalData, output_names: Sequence[str],
          reference: Sequence[np.ndarray], indices: np.ndarray) -> float:
    """The metric on the samples at ``indices`` (a resample)."""
    rows = data.n
    pick = [o[indices] if o.ndim and o.shape[0] == rows else o for o in map(np.asarray, outputs)]
    ref = [r[indices] if r.ndim and r.shape[0] == rows else r for r in map(np.asarray, reference)]
    return float(metric.fn(pick, metric.data_for(data.take(indices).arrays, output_names, ref)))


def measure_loss(metric: Metric, outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray], data: EvalData,
                 output_names: Sequence[str], mode: str, *, seed: int = 0) -> Measured:
    """The loss of the model that gave ``outputs`` against the unmodified model's ``reference``
    outputs on ``data``, with its paired bootstrap interval (over ``data.groups`` when grouped)."""
    groups = data.groups
    n_groups = None if groups is None else len(np.unique(groups))
    base = _outcomes(metric, reference, data, output_names, reference)
    if base is not None:
        cand = _outcomes(metric, outputs, data, output_names, reference)
        interval = loss_interval(base, cand, mode, groups=groups, seed=seed)
        return Measured(data.n, n_groups, float(cand.mean()), float(base.mean()), interval)
    everything = np.arange(data.n)

    def measure(indices: np.ndarray) -> tuple[float, float]:
        return (_call(metric, reference, data, output_names, reference, indices),
                _call(metric, outputs, data, output_names, reference, indices))

    interval, _ = called_interval(measure, data.n, mode, groups=groups, seed=seed)
    baseline, value = measure(everything)
    return Measured(data.n, n_groups, value, baseline, interval)


def set_resolution(metric: Metric, reference: Sequence[np.ndarray], data: EvalData, output_names: Sequence[str],
                   mode: str, *, seed: int = 0) -> float | None:
    """The half-width of the 95 % interval of the unmodified model's metric on ``data`` (loss unit):
    the smallest loss this set can tell from sampling noise. None when the unmodified model's
    outcomes do not vary on this set (top-1 agreement with itself; every sample right), so the
    bootstrap has nothing to resample."""
    base = _outcomes(metric, reference, data, output_names, reference)
    if base is not None:
        width = value_half_width(base, mode, groups=data.groups, seed=seed)
    else:
        def measure(indices: np.ndarray) -> tuple[float, float]:
            value = _call(metric, reference, data, output_names, reference, indices)
            return value, value

        _, width = called_interval(measure, data.n, mode, groups=data.groups, seed=seed)
    return width if width > 0 else None
