"""Stopping a scoring early: a candidate whose metric can no longer reach a threshold.

A caller that only needs to know whether a candidate's metric is below ``reject_below`` (the
layer stage: is this width's loss past the cap?) lets the scorer run the subset in chunks and
stop as soon as the answer is certain. Certain, not estimated: a built-in metric is the mean of
per-sample outcomes and states the highest outcome any model can reach on each sample
(``Metric.outcome_ceiling``), so after some samples the metric is at most (outcomes so far +
ceilings of the samples not run) / n. A candidate whose full evaluation reaches the threshold
is therefore always run to the end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from onnxws.data import Batch

EARLY_STOP_CHUNKS = 8
"""A scoring that may stop early runs its subset in about this many chunks, checking after each
whether the metric can still reach the threshold."""


class Stopped(Exception):
    """A scoring stopped early: its metric is at most ``value_at_most`` after ``samples`` samples."""

    def __init__(self, value_at_most: float, samples: int, suffix: bool) -> None:
        super().__init__(value_at_most, samples)
        self.value_at_most, self.samples, self.suffix = value_at_most, samples, suffix


class RejectionBound:
    """Follows a scoring's per-sample outcomes and stops it once the metric (their mean over the
    subset's ``n`` samples) can no longer reach ``reject_below``: the outcomes so far plus the
    ceiling of every sample not yet run (``Metric.outcome_ceiling``) are below it. Deterministic:
    an upper bound, never an estimate, so a candidate whose full evaluation reaches the
    threshold is always run to the end."""

    def __init__(self, reject_below: float, ceiling: np.ndarray, outcomes: Callable, data: Mapping[str, np.ndarray],
                 n: int) -> None:
        self.reject_below = reject_below
        self.n = n
        self._outcomes = outcomes
        self._data = data
        self._rest = np.concatenate([np.cumsum(np.asarray(ceiling, np.float64)[::-1])[::-1], [0.0]])  # ceiling of [i:]
        self._sum = 0.0
        self.seen = 0

    def chunks(self, batches: list[Batch], acts: list[dict[str, np.ndarray]] | None = None):
        """``batches`` (and their prefix activations) split into about ``EARLY_STOP_CHUNKS`` runs
        over the subset; a batch with an array that is not one row per sample stays whole."""
        size = max(1, -(-self.n // EARLY_STOP_CHUNKS))
        out_batches: list[Batch] = []
        out_acts: list[dict[str, np.ndarray]] = []
        for i, (feeds, real) in enumerate(batches):
            act = acts[i] if acts is not None else {}
            arrays = [*feeds.values(), *act.values()]
            if real <= size or any(np.ndim(a) == 0 or len(a) != real for a in arrays):
                out_batches.append((feeds, real))
                out_acts.append(act)
                continue
            for start in range(0, real, size):
                part = slice(start, min(start + size, real))
                out_batches.append(({k: v[part] for k, v in feeds.items()}, part.stop - part.start))
                out_acts.append({k: v[part] for k, v in act.items()})
        return out_batches if acts is None else (out_batches, out_acts)

    def add(self, outputs: list[np.ndarray], real: int, suffix: bool) -> None:
        """Count the outcomes of the next ``real`` samples; raise ``Stopped`` once the metric is
        certainly below the threshold."""
        rows = slice(self.seen, self.seen + real)
        data = {k: v[rows] if np.ndim(v) and len(v) == self.n else v for k, v in self._data.items()}
        self._sum += float(np.sum(self._outcomes(outputs, data)))
        self.seen += real
        best = (self._sum + float(self._rest[min(self.seen, self.n)])) / self.n
        if self.seen < self.n and best < self.reject_below:
            raise Stopped(best, self.seen, suffix)


def watched(per_batch: Iterable[list[np.ndarray]], batches: Sequence[Batch], bound: RejectionBound | None,
            suffix: bool) -> list[list[np.ndarray]]:
    """Every batch's outputs, each shown to ``bound`` as it comes (which may stop the run by
    raising ``Stopped``); ``suffix``: the run is a suffix run (recorded in ``Stopped``)."""
    if bound is None:
        return list(per_batch)
    kept = []
    for outputs, (_, real) in zip(per_batch, batches):
        kept.append(outputs)
        bound.add(outputs, real, suffix)
    return kept
