"""Executors: the pool's workers build their measurer once, answer in submission order, keep a
weight's candidates on one worker, and a worker that dies is an error, not a hang."""

from __future__ import annotations

import os

import numpy as np
import pytest

from onnxws.executors import LocalExecutor, Measurement, PoolExecutor, WorkerDied


class EchoMeasurer:
    """value: the candidate's first number; divergence: the worker's pid; spread: times built."""

    built = 0

    def __init__(self) -> None:
        EchoMeasurer.built += 1
        self.n_search = 10

    def measure(self, candidate, subset, reject_below=None):
        first = float(next(iter(candidate.values())).reshape(-1)[0])
        if first < 0:
            os._exit(3)  # a worker killed in the middle of a measurement
        return Measurement(first + (1000 if subset == "full" else 0) + self.n_search / 1e6, float(os.getpid()),
                           float(EchoMeasurer.built))

    def grow_search(self, n):
        self.n_search = n


def candidates(names_values):
    return [{name: np.full(3, value, np.float32)} for name, value in names_values]


@pytest.fixture
def pool():
    executor = PoolExecutor(EchoMeasurer, 2)
    yield executor
    executor.close()


def test_results_come_back_in_submission_order(pool):
    wanted = candidates([("a", 1), ("b", 2), ("a", 3), ("c", 4), ("b", 5), ("d", 6)])
    got = list(pool.measure(iter(wanted), "search"))
    assert [round(m.value) for m in got] == [1, 2, 3, 4, 5, 6]
    assert {m.spread for m in got} == {1.0}  # each worker built its measurer once
    full = list(pool.measure(iter(wanted[:2]), "full"))
    assert [round(m.value) for m in full] == [1001, 1002]


def test_a_weights_candidates_stay_on_one_worker(pool):
    got = list(pool.measure(iter(candidates([("a", i) for i in range(6)] + [("b", i) for i in range(6)])), "search"))
    assert len({m.divergence for m in got[:6]}) == 1 and len({m.divergence for m in got[6:]}) == 1


def test_a_grown_subset_reaches_every_worker(pool):
    pool.grow_search(50)
    got = list(pool.measure(iter(candidates([("a", 1), ("b", 2), ("c", 3)])), "search"))
    assert all(abs(m.value - round(m.value) - 50e-6) < 1e-9 for m in got)


def test_a_worker_that_dies_is_an_error(pool):
    with pytest.raises(WorkerDied, match="ended while measuring"):
        list(pool.measure(iter(candidates([("a", 1), ("a", -1), ("a", 2)])), "search"))


def test_local_executor_measures_in_process():
    measurer = EchoMeasurer()
    got = list(LocalExecutor(measurer.measure).measure(iter(candidates([("a", 7)])), "search"))
    assert round(got[0].value) == 7 and got[0].divergence == os.getpid()
