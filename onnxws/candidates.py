"""Cluster stage: every shareable tensor's candidates, one per codebook size k.

For each tensor the run's settings give the widths to try; ``clustering`` finds the exact
1-D k-means codebook for every k in one pass, and ``refinement`` (where the tensor's consumer
allows it) lowers each candidate's output error using the input moments measured once on the
search subset (``calibrate``). The result is ``Candidates``: for every tensor its ``Layer``
(the options the search chooses from, each with its size and damage proxy) and the shared
forms behind them, which decode to the arrays the scorer runs.

With granularity ``auto`` a tensor gets both a per-tensor and a per-channel set of candidates;
the layer stage measures both and keeps one (``use_granularities``).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxws.clustering import share_weight_all_k
from onnxws.config import CompressConfig
from onnxws.discovery import Discovery
from onnxws.errors import one_line
from onnxws.exploration import Layer, Option
from onnxws.refinement import ROUNDS as REFINE_ROUNDS
from onnxws.refinement import Bias, Moments, Plan, measure_moments, refine_all
from onnxws.refinement import plan as plan_refinement
from onnxws.scoring import Scorer
from onnxws.sharing import Granularity, SharedWeight, index_bits

logger = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int, str], None]
ReadFn = Callable[[list[str]], Iterable[Mapping[str, np.ndarray]]]
PARALLEL_WORK = 2e9
"""Refinement's estimated multiply-adds (``cluster_workers``) from which the cluster stage runs in
one worker process per CPU: below it, starting the workers (about a second each: Python, numpy,
onnxws) costs more than it saves."""


def dtype_bits(dtype: str) -> int:
    """Bits of one stored value of a float tensor of ``dtype`` (a codebook entry keeps it)."""
    return 16 if dtype in ("float16", "bfloat16") else 32


def refinement_plan(model: onnx.ModelProto, discovery: Discovery, config: CompressConfig) -> Plan:
    """Which weights the run refines and whose biases it corrects (and why not the others)."""
    if not config.refine:
        return Plan(reasons={w.name: "refinement off (--no-refine)" for w in discovery.weights})
    found = plan_refinement(model, {w.name: w.shape for w in discovery.weights})
    if not config.bias_correction:
        found.bias_reasons.update({name: "bias correction off (--no-bias-correction)" for name in found.biases})
        found.biases.clear()
    return found


def calibrate(read: ReadFn, n_batches: int, refine: Plan, discovery: Discovery, config: CompressConfig,
              notify: ProgressFn) -> dict[str, Moments]:
    """Input moments of the refinable weights: one pass of ``read`` (activations of the unmodified
    model over the search subset, ``n_batches`` runs) when refinement is on, else none."""
    if not config.refine:
        return {}
    done = [0]

    def measured(message: str) -> None:
        done[0] += 1
        notify("calibrate", done[0], max(done[0], n_batches), message)  # more runs when read in groups

    shapes = {w.name: w.shape for w in discovery.weights}
    return measure_moments(read, refine, shapes, n_batches, seed=config.seed, progress=measured)


@dataclass
class Candidates:
    """The cluster stage's result.

    Attributes:
        layers: one ``Layer`` per shareable tensor (discovery order): its options by k.
        shares: tensor -> k -> the shared form of that option (the granularity in use).
        variants: for granularity ``auto``: tensor -> granularity -> (options, shared forms).
        output_errors: tensor -> granularity -> k -> refined output error (refined tensors).
        refined_rows: tensor -> input vectors its moments were measured on.
        refine_seconds: time spent refining (inside the stage's time).
    """

    layers: list[Layer]
    shares: dict[str, dict[int, SharedWeight]]
    variants: dict[str, dict[str, tuple[list[Option], dict[int, SharedWeight]]]] = field(default_factory=dict)
    output_errors: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)
    refined_rows: dict[str, int] = field(default_factory=dict)
    refine_seconds: float = 0.0

    def arrays(self, tup: Mapping[str, int]) -> dict[str, np.ndarray]:
        """The decoded arrays of a tuple (tensor -> k): what the scorer runs."""
        return {key: value for name, k in tup.items() for key, value in self.shares[name][k].tensors().items()}

    def lazily(self, tuples: Iterable[Mapping[str, int]]) -> Iterator[dict[str, np.ndarray]]:
        """Each tuple's arrays, decoded only when the scorer reaches it: a request of n whole-model
        tuples would otherwise hold n decoded copies of the weights at once."""
        return (self.arrays(tup) for tup in tuples)

    def evaluator(self, scorer: Scorer) -> Callable[..., list[tuple]]:
        """The search context's evaluator: tuples scored by ``scorer`` (value, divergence, spread);
        ``stop`` is called between the batches of each scoring (an interruptible ``SearchContext``);
        with ``reject_below`` a scoring may stop early with a ``Rejected`` (``rejects_early``)."""
        return lambda tuples, subset, stop=None, reject_below=None: scorer.score_with_divergence(
            self.lazily(tuples), subset, spread=True, stop=stop, reject_below=reject_below)

    def variant_scorer(self, scorer: Scorer) -> Callable[[list[tuple[str, str, int]]], list[tuple]]:
        """The layer stage's scorer of (tensor, granularity, k) requests (search subset)."""
        return lambda requests: scorer.score_with_divergence(self.variant_arrays(requests))

    def variant_options(self) -> dict[str, dict[str, list[Option]]]:
        """For granularity ``auto``: tensor -> granularity -> its options."""
        return {name: {g: opts for g, (opts, _) in by_g.items()} for name, by_g in self.variants.items()}

    def variant_arrays(self, requests: Iterable[tuple[str, str, int]]) -> Iterator[dict[str, np.ndarray]]:
        """The decoded arrays of (tensor, granularity, k) requests, one at a time."""
        return (self.variants[name][g][1][k].tensors() for name, g, k in requests)

    def use_granularities(self, picked: Mapping[str, str]) -> None:
        """Keep the granularity the layer stage picked for each ``auto`` tensor."""
        for name, g in picked.items():
            self.shares[name] = self.variants[name][g][1]

    def chosen(self, tup: Mapping[str, int]) -> list[SharedWeight]:
        """The shared forms of the answer; every other candidate is dropped (memory before emit)."""
        shared = [self.shares[name][k] for name, k in tup.items()]
        self.shares = {name: {k: self.shares[name][k]} for name, k in tup.items()}
        self.variants.clear()
        return shared


@dataclass(frozen=True)
class _Task:
    """One tensor at one granularity: cluster at every k, then refine where it has moments."""

    name: str
    values: np.ndarray
    ks: list[int]
    granularity: Granularity
    channel_axis: int
    moments: Moments | None
    bias: tuple[Bias, np.ndarray] | None


def _run_task(task: _Task) -> tuple[dict[int, SharedWeight], dict[int, float], float, float]:
    """The shared form and damage proxy of every k of ``task``, and the seconds spent clustering
    and refining (what a worker process runs; the same in-process)."""
    t0 = time.perf_counter()
    by_k = share_weight_all_k(task.name, task.values, task.ks, task.granularity, task.channel_axis)
    damage = {k: float(sw.inertia) for k, sw in by_k.items()}
    t1 = time.perf_counter()
    if task.moments is not None:  # damage proxy: the output error (refined), not the weights'
        by_k, damage = refine_all(by_k, task.values, task.moments, bias=task.bias)
    return by_k, damage, t1 - t0, time.perf_counter() - t1


def _run_tasks(tasks: Iterable[_Task], workers: int) -> Iterator[tuple[_Task, tuple]]:
    """Each task with its result, in order: in this process, or in ``workers`` spawned processes
    with at most two tasks per worker in flight (each holds a copy of its tensor and moments)."""
    tasks = iter(tasks)
    if workers > 1:
        pending: deque[tuple[_Task, Future]] = deque()
        try:
            with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                for task in tasks:
                    pending.append((task, pool.submit(_run_task, task)))
                    if len(pending) >= 2 * workers:
                        yield pending[0][0], pending[0][1].result()
                        pending.popleft()
                while pending:
                    yield pending[0][0], pending[0][1].result()
                    pending.popleft()
            return
        except BrokenProcessPool as exc:  # workers that cannot start (a __main__ spawn cannot import) or died
            logger.warning("cluster stage: worker processes failed (%s); going on in this process", one_line(exc))
        for task, _ in pending:  # what the workers did not finish, then the rest
            yield task, _run_task(task)
    for task in tasks:
        yield task, _run_task(task)


def _widths(config: CompressConfig, name: str, op_type: str) -> list[int]:
    """The ks a tensor is clustered at (one per allowed index width, capped by its k range)."""
    settings = config.settings_for(name, op_type)
    return sorted({min(2 ** b, settings.k_max) for b in settings.bits})


def cluster_workers(discovery: Discovery, moments: Mapping[str, Moments], config: CompressConfig,
                    cpus: int | None = None) -> int:
    """Worker processes for the cluster stage: one per CPU when refinement's estimated work
    (outputs x inputs^2 per round and width, over the refined tensors) is at least
    ``PARALLEL_WORK``, else 1 (in-process)."""
    cpus = cpus or os.cpu_count() or 1
    work = 0.0
    for info in discovery.weights:
        m = moments.get(info.name)
        if m is not None:
            work += float(info.shape[m.out_axis]) * m.h.shape[-1] ** 2 * REFINE_ROUNDS * len(_widths(config, info.name, info.op_type))
    return min(cpus, len(discovery.weights)) if work >= PARALLEL_WORK and cpus > 1 else 1


def build_candidates(discovery: Discovery, config: CompressConfig, originals: Mapping[str, np.ndarray],
                     moments: dict[str, Moments], refine: Plan, notify: ProgressFn,
                     workers: int | None = None) -> Candidates:
    """Cluster (and refine) every shareable tensor at every k its settings allow.

    Tensors are independent: with ``workers`` > 1 (default: ``cluster_workers``) they are
    clustered and refined in that many worker processes, with the same results as in-process.
    ``moments`` is emptied as it is used (a weight's H can be large). ``refine_seconds`` is the
    refinement's share of the stage's wall time.
    """
    found = Candidates([], {}, refined_rows={name: m.rows for name, m in moments.items()})
    if workers is None:
        workers = cluster_workers(discovery, moments, config)

    def kinds_of(info) -> list[Granularity]:
        granularity = config.settings_for(info.name, info.op_type).granularity
        if granularity.kind != "auto":
            return [granularity]
        values = originals[info.name]  # auto: both measured in the layer stage
        channel = values.ndim >= 2 and values.shape[info.channel_axis] > 1
        return [Granularity("tensor"), Granularity("channel")] if channel else [Granularity("tensor")]

    def tasks() -> Iterator[_Task]:
        for i, info in enumerate(discovery.weights):
            notify("cluster", i, len(discovery.weights), info.name)
            ks = _widths(config, info.name, info.op_type)
            m = moments.pop(info.name, None)
            bias = refine.biases.get(info.name) if m is not None else None
            for granularity in kinds_of(info):
                yield _Task(info.name, originals[info.name], ks, granularity, info.channel_axis, m,
                            None if bias is None else (bias, originals[bias.name]))

    t0 = time.perf_counter()
    seconds = {"cluster": 0.0, "refine": 0.0}
    infos = {info.name: info for info in discovery.weights}
    for task, (by_k, damage, t_cluster, t_refine) in _run_tasks(tasks(), workers):
        info = infos[task.name]
        seconds["cluster"] += t_cluster
        seconds["refine"] += t_refine
        cb_bits = dtype_bits(info.dtype)
        kinds = kinds_of(info)
        if task.moments is not None:
            found.output_errors.setdefault(info.name, {})[str(task.granularity)] = damage
        options = [Option(k, index_bits(k), sw.stored_bits(cb_bits), damage[k]) for k, sw in sorted(by_k.items())]
        if task.granularity == kinds[0]:
            found.shares[info.name] = by_k
            found.layers.append(Layer(info.name, info.params, info.params * cb_bits, options))
        if len(kinds) > 1:
            found.variants.setdefault(info.name, {})[task.granularity.kind] = (options, by_k)
    moments.clear()
    busy = seconds["cluster"] + seconds["refine"]
    found.refine_seconds = (time.perf_counter() - t0) * seconds["refine"] / busy if busy > 0 else 0.0
    notify("cluster", len(discovery.weights), len(discovery.weights), "done")
    return found
