"""Executors: submit candidates, get scores.

The search stages never run a model themselves: they ask the ``Scorer`` for the scores of a
batch of independent candidates. The scorer answers what its memo and the score cache already
know and hands the rest to its executor, which measures each candidate (runs the model with its
weights, applies the metric) and yields the measurements in submission order. The scorer keeps
the keys, the cache and the counters, so the scores and the answer do not depend on the
executor: only where and how fast the measurements run does.

``LocalExecutor`` is the in-process executor: it measures each candidate with the scorer's own
sessions, one at a time, as the search's candidate generator yields it (one decoded candidate in
memory at a time). ``PoolExecutor`` (``compress --jobs N``) measures them in N worker processes:
each worker builds its own measurer once (a ``Scorer`` without a cache, one ORT intra-op thread,
the model and the evaluation data sent once, when it starts) and runs ``measure`` on the
candidates it is sent; a cluster executor plugs in the same way. A candidate that changes one
weight always goes to the same worker, so that worker's prefix activations for that weight
(suffix runs) are computed once.

An executor's measurements equal the in-process ones when the workers run the same engine on
the same ORT build with the same activation budget; every executor yields them in submission
order, so the search and its answer do not depend on the executor.
"""

from __future__ import annotations

import multiprocessing
from abc import ABC, abstractmethod
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, NamedTuple, Protocol

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
        complete: it ran on every sample of the subset. False: it was stopped early because its
            metric could no longer reach the caller's ``reject_below`` whatever the remaining
            samples give; ``value`` is then the most it could still have reached (an upper
            bound, below ``reject_below``), ``divergence`` NaN and ``spread`` None.
        samples: samples run before an early stop (0 when ``complete``).
    """

    value: float
    divergence: float
    spread: float | None
    suffix: bool = False
    complete: bool = True
    samples: int = 0


class Executor(Protocol):
    """Measures candidates; yields one Measurement per candidate, in submission order."""

    name: str
    jobs: int  # candidates it measures side by side

    def measure(self, candidates: Iterable[Candidate], subset: str,
                reject_below: float | None = None) -> Iterator[Measurement]: ...

    def grow_search(self, n: int) -> None:
        """The scorer's search subset is now its first ``n`` samples (``Scorer.grow_search``)."""

    def close(self) -> None: ...


class Measurer(Protocol):
    """What a worker builds once and measures candidates with (a ``Scorer`` without a cache)."""

    def measure(self, candidate: Candidate, subset: str, reject_below: float | None = None) -> Measurement: ...

    def grow_search(self, n: int) -> None: ...


class LocalExecutor:
    """In-process: each candidate measured by ``measure(candidate, subset, reject_below)`` as it is drawn."""

    name = "local"
    jobs = 1

    def __init__(self, measure: Callable[[Candidate, str, float | None], Measurement]) -> None:
        self._measure = measure

    def measure(self, candidates: Iterable[Candidate], subset: str,
                reject_below: float | None = None) -> Iterator[Measurement]:
        for candidate in candidates:
            yield self._measure(candidate, subset, reject_below)
            del candidate  # before the generator decodes the next one

    def grow_search(self, n: int) -> None:
        pass  # the scorer measures with its own (grown) subset

    def close(self) -> None:
        self._measure = None  # type: ignore[assignment]


class WorkerDied(Exception):
    """A worker process of a ``PoolExecutor`` ended while measuring (killed, out of memory)."""


class WorkerMeasurer:
    """A worker's side: the measurer built once when the worker starts, kept at the driver's
    search-subset size (each request carries it). A pool worker process holds one; a cluster
    worker (a Ray actor) is one."""

    def __init__(self, build: Callable[[], Measurer]) -> None:
        self._measurer = build()
        self._grown_to: int | None = None

    def measure(self, candidate: Candidate, subset: str, n_search: int | None,
                reject_below: float | None = None) -> Measurement:
        if n_search is not None and n_search != self._grown_to:
            self._measurer.grow_search(n_search)
            self._grown_to = n_search
        return self._measurer.measure(candidate, subset, reject_below)


_worker: WorkerMeasurer | None = None  # a pool worker process's measurer (set by _start_worker)


def _start_worker(build: Callable[[], Measurer]) -> None:
    global _worker
    _worker = WorkerMeasurer(build)


def _measure_in_worker(candidate: Candidate, subset: str, n_search: int | None,
                       reject_below: float | None) -> Measurement:
    assert _worker is not None, "worker not started"
    return _worker.measure(candidate, subset, n_search, reject_below)


class WorkerExecutor(ABC):
    """Measures candidates on ``jobs`` workers, each with its own measurer, in submission order.

    A candidate that changes one weight goes to worker ``crc32(name) % jobs`` (so that worker's
    prefix activations for that weight are computed once); the others go to the worker with the
    fewest candidates outstanding. At most ``jobs * (1 + ahead)`` candidates are in flight
    (memory: each is a serialized copy of its arrays). Subclasses say how a worker is sent a
    candidate and how its measurement comes back (``_submit``, ``_result``, ``_cancel``).
    """

    name = "workers"

    def __init__(self, jobs: int, ahead: int = 1) -> None:
        self.jobs = jobs
        self._ahead = ahead
        self._n_search: int | None = None
        self._outstanding = [0] * jobs

    def grow_search(self, n: int) -> None:
        self._n_search = n

    @abstractmethod
    def _submit(self, worker: int, candidate: Candidate, subset: str, n_search: int | None,
                reject_below: float | None) -> Any:
        """Send ``candidate`` to ``worker``; a handle to its measurement."""

    @abstractmethod
    def _result(self, worker: int, handle: Any) -> Measurement:
        """Wait for the measurement behind ``handle`` (``worker``'s)."""

    @abstractmethod
    def _cancel(self, handle: Any) -> None:
        """Drop a submitted candidate that has not started (no error if it has)."""

    def _worker_for(self, candidate: Candidate) -> int:
        if len(candidate) == 1:
            return zlib.crc32(next(iter(candidate)).encode()) % self.jobs
        return min(range(self.jobs), key=lambda i: (self._outstanding[i], i))

    def measure(self, candidates: Iterable[Candidate], subset: str,
                reject_below: float | None = None) -> Iterator[Measurement]:
        pending: deque[tuple[int, Any]] = deque()
        limit = self.jobs * (1 + self._ahead)
        source = iter(candidates)
        self._outstanding = [0] * self.jobs
        try:
            exhausted = False
            while pending or not exhausted:
                while not exhausted and len(pending) < limit:
                    candidate = next(source, None)
                    if candidate is None:
                        exhausted = True
                        break
                    worker = self._worker_for(candidate)
                    pending.append((worker, self._submit(worker, candidate, subset, self._n_search, reject_below)))
                    self._outstanding[worker] += 1
                    del candidate
                if not pending:
                    break
                worker, handle = pending.popleft()
                self._outstanding[worker] -= 1
                yield self._result(worker, handle)
        finally:  # stopped early (an error, a spent time budget): drop what was not started
            for _, handle in pending:
                self._cancel(handle)


class PoolExecutor(WorkerExecutor):
    """Measures candidates in ``jobs`` worker processes on this machine (``compress --jobs N``).

    Args:
        build: a picklable callable that builds a worker's ``Measurer`` (``Scorer.worker_builder``);
            called once in each worker when it starts (spawned: no ORT state crosses a fork).
        jobs: worker processes (>= 2).
        ahead: candidates each worker may have queued beyond the one it runs.
    """

    name = "pool"

    def __init__(self, build: Callable[[], Measurer], jobs: int, ahead: int = 1) -> None:
        if jobs < 2:
            raise ValueError(f"a pool needs at least 2 jobs, got {jobs}")
        super().__init__(jobs, ahead)
        context = multiprocessing.get_context("spawn")
        self._workers = [ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=_start_worker,
                                             initargs=(build,)) for _ in range(jobs)]

    def _submit(self, worker: int, candidate: Candidate, subset: str, n_search: int | None,
                reject_below: float | None) -> Future:
        return self._workers[worker].submit(_measure_in_worker, dict(candidate), subset, n_search, reject_below)

    def _result(self, worker: int, handle: Future) -> Measurement:
        try:
            return handle.result()
        except BrokenProcessPool as exc:
            raise WorkerDied(f"scoring worker {worker + 1} of {self.jobs} ended while measuring "
                             "(killed, or out of memory)") from exc

    def _cancel(self, handle: Future) -> None:
        handle.cancel()

    def close(self) -> None:
        for worker in self._workers:
            worker.shutdown(wait=True, cancel_futures=True)
        self._workers = []
