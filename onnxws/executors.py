"""Executors: submit candidates, get scores.

The search stages never run a model themselves: they ask the ``Scorer`` for the scores of a
batch of independent candidates. The scorer answers what its memo and the score cache already
know and hands the rest to its executor, which measures each candidate (runs the model with its
weights, applies the metric) and yields the measurements in submission order. The scorer keeps
the keys, the cache and the counters, so the scores and the answer do not depend on the
executor: only where and how fast the measurements run does.

``LocalExecutor`` is the in-process executor: it measures each candidate with the scorer's own
sessions, one at a time, as the search's candidate generator yields it (one decoded candidate in
memory at a time). A scoring pool or a cluster plugs in here: each worker holds its own sessions
and evaluation data (a ``Scorer`` without a cache, built once per worker) and runs
``Scorer.measure`` on the candidates it is sent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import NamedTuple, Protocol

import numpy as np

Candidate = Mapping[str, np.ndarray]
"""Weight name -> decoded array (weights not named keep their original values)."""


class Measurement(NamedTuple):
    """One candidate measured on one subset.

    Attributes:
        value: the metric (higher is better).
        divergence: output divergence from the unmodified model (``metrics.output_divergence``).
        spread: mean squared per-sample change of the metric's outcomes, or None (a metric
            without per-sample outcomes).
        suffix: it ran as a suffix run (only the nodes downstream of its one changed weight).
    """

    value: float
    divergence: float
    spread: float | None
    suffix: bool = False


class Executor(Protocol):
    """Measures candidates; yields one Measurement per candidate, in submission order."""

    name: str

    def measure(self, candidates: Iterable[Candidate], subset: str) -> Iterator[Measurement]: ...

    def close(self) -> None: ...


class LocalExecutor:
    """In-process: each candidate measured by ``measure(candidate, subset)`` as it is drawn."""

    name = "local"

    def __init__(self, measure: Callable[[Candidate, str], Measurement]) -> None:
        self._measure = measure

    def measure(self, candidates: Iterable[Candidate], subset: str) -> Iterator[Measurement]:
        for candidate in candidates:
            yield self._measure(candidate, subset)
            del candidate  # before the generator decodes the next one

    def close(self) -> None:
        self._measure = None  # type: ignore[assignment]
