"""Scoring engine (the hot loop): the metric of the model with candidate weights, in ONNX Runtime.

Exploration only calls ``Scorer.score(candidates, subset)``; a process pool or Ray actors
can implement that one call later (DESIGN.md, Scale-out).

Two engines, picked per model by a measurement at start (``engine="auto"``):

- ``session``: one weights-free model whose weights are marked as external data; each
  candidate gets a fresh ``InferenceSession`` with its weights passed by
  ``SessionOptions.add_external_initializers`` (zero-copy OrtValues) at full graph
  optimisation, so its forward runs as fast as the original model's. All these sessions
  allocate from one process-wide CPU arena (``session.use_env_allocators``): without it
  every fresh session page-faults its activation buffers in again, which cost more than
  the forward itself (LeNet-5, 2,000 images, 2 threads: 85 ms per candidate vs a 22 ms
  forward; 27 ms with the shared arena).
- ``inputs``: weights turned into graph inputs of one session and fed with every run: no
  per-candidate setup, but the forward loses the constant-weight optimisations
  (pre-packing, NCHWc layouts): measured 1.2-1.3x slower on LeNet-5, 1.5x on ResNet-50,
  2x on MobileNetV2. It wins only when a candidate is scored on very few samples.

Suffix runs (session engine): a candidate that changes a single weight (the layer stage)
leaves every node upstream of that weight unchanged. Those nodes run once per weight and
subset with the original weights; their activations at the cut are kept (up to
``activation_budget`` bytes, first come first kept) and each candidate runs only the
nodes downstream. LeNet-5 layer-stage candidates cost 0.35x a plain forward this way.

Figures: ``tools/bench_scoring.py``. ``SessionOptions.add_initializer`` is never used: with
graph optimisations on it silently keeps the original weights (NOTES.md).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import EncodeError
from onnx import helper, numpy_helper

from onnxws.cache import ScoreCache
from onnxws.data import EvalData, model_inputs
from onnxws.errors import InputError, OnnxwsError, UsageError, one_line
from onnxws.proto import copy_tensor_header, fits_in_one_message, graph_shell, node_refs, payload_bytes, set_external
from onnxws.runtime import CUDA, create_session, ortvalue, resolve_providers, shared_cpu_arena
from onnxws.metrics import Metric, output_divergence, reference_key, squared_sum

logger = logging.getLogger(__name__)

ENGINES = ("auto", "session", "inputs")
SUBSETS = ("search", "full")
DEFAULT_BATCH = 1000
"""Largest default batch (samples per run)."""
BATCH_INPUT_BYTES = 16 * 2**20
"""Default batches hold at most this many bytes of input (ImageNet fp32: 27 images), so memory stays bounded."""
ACTIVATION_BUDGET = 1 << 30
"""Default bytes of prefix activations kept for suffix runs (all cuts and subsets together)."""
EXTERNAL_MIN_BYTES = 4096
"""Non-weight initializers at least this large are also passed as in-memory external data, so
the per-candidate model bytes that ORT parses stay small."""
_EXTERNAL_LOCATION = "onnxws-in-memory"
_DIVERGENCE_KEY = "|divergence"  # the cache row of a candidate's output divergence: its key + this
_SPREAD_KEY = "|spread"  # ... and of its per-sample outcome spread (built-in metrics)
# Candidates at least this large are hashed one array per thread (hashlib releases the GIL):
# SHA-256 runs at ~1.8 GB/s per core here, 58 ms for ResNet-50's 102 MB of weights.
_PARALLEL_HASH_BYTES = 16 * 2**20
# The session engine is chosen without measuring the other one when session creation costs
# less than this fraction of the forward pass (the inputs engine is >= 1.07x slower to run).
_CREATE_FRACTION_SURE = 0.05
# The inputs engine must beat the session engine by this factor to be picked.
_INPUTS_MARGIN = 0.8


# --------------------------------------------------------------------------------------------
# Model preparation


@dataclass
class _Prepared:
    """The model split into a small proto and its big tensors.

    ``model`` has every weight (and every initializer of at least EXTERNAL_MIN_BYTES) marked
    as external data; their values are in ``stored``. ``Constant`` nodes that produce a
    weight became initializers.
    """

    model: onnx.ModelProto
    stored: dict[str, np.ndarray]
    weights: list[str]
    digest: str  # SHA-256 of the model: structure + every stored tensor


def _constant_value(node: onnx.NodeProto) -> np.ndarray:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    raise InputError(f"Constant node {node.name or node.output[0]!r} has no tensor value onnxws can read")


def _prepare(model: onnx.ModelProto, weights: list[str]) -> _Prepared:
    """Split ``model`` into a payload-free proto and its stored tensors (one copy of their values).

    The proto is built field by field: copying the whole model and clearing the payloads
    afterwards would keep them alive, because the upb backend frees a message's memory only with
    the whole message (measured: a 512 MB initializer, CopyFrom then ClearField: +512 MB RSS).
    """
    wanted = set(weights)
    graph = model.graph

    def is_weight_constant(node: onnx.NodeProto) -> bool:
        return node.op_type == "Constant" and node.domain in ("", "ai.onnx") and bool(node.output) and node.output[0] in wanted

    # Constant nodes producing a weight become initializers (after the others), so they can be replaced.
    constants = [node for node in graph.node if is_weight_constant(node)]
    tensors = list(graph.initializer) + [numpy_helper.from_array(_constant_value(node), node.output[0]) for node in constants]
    init_names = {t.name for t in tensors}
    missing = [w for w in weights if w not in init_names]
    if missing:
        raise InputError(f"weight(s) {missing} are neither initializers nor Constant outputs of the main graph; cannot score them")
    proto = graph_shell(model, skip=frozenset({"node", "initializer"}))
    proto.graph.node.extend(node for node in graph.node if not is_weight_constant(node))
    stored: dict[str, np.ndarray] = {}
    for tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise InputError(f"initializer {tensor.name!r} still points to external data; load the model with its external data (onnx.load(path, load_external_data=True))")
        is_weight = tensor.name in wanted
        # payload_bytes first: ByteSize() encodes the tensor (and raises on one over 2 GB).
        if not is_weight and payload_bytes(tensor) < EXTERNAL_MIN_BYTES and tensor.ByteSize() < EXTERNAL_MIN_BYTES:
            proto.graph.initializer.append(tensor)
            continue
        array = np.ascontiguousarray(numpy_helper.to_array(tensor))
        if array.dtype.kind in "OUS":  # string tensors cannot be passed as external data
            if is_weight:
                raise InputError(f"weight {tensor.name!r} holds strings; only numeric tensors can be scored")
            proto.graph.initializer.append(tensor)
            continue
        array.setflags(write=False)
        stored[tensor.name] = array
        header = proto.graph.initializer.add()
        copy_tensor_header(tensor, header)
        set_external(header, _EXTERNAL_LOCATION, 0, array.nbytes)
    graph = proto.graph
    # IR < 4 lists initializers as graph inputs too; data never feeds them, so make them constants.
    kept_inputs = [vi for vi in graph.input if vi.name not in stored]
    if len(kept_inputs) != len(graph.input):
        del graph.input[:]
        graph.input.extend(kept_inputs)
    digest = hashlib.sha256(b"onnxws-model-v1")
    digest.update(proto.SerializeToString(deterministic=True))
    for name in sorted(stored):
        array = stored[name]
        digest.update(f"\0{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        digest.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    return _Prepared(proto, stored, list(weights), digest.hexdigest())


# --------------------------------------------------------------------------------------------
# Engines: run the model with given weights over a list of batches


Batch = tuple[dict[str, np.ndarray], int]  # (feeds, number of real samples; the rest is padding)


class _SessionEngine:
    """(a) A fresh session per candidate; weights passed as in-memory external initializers."""

    name = "session"

    def __init__(self, prepared: _Prepared, providers: list[str], threads: int | None, shared_arena: bool):
        self._bytes = prepared.model.SerializeToString()
        self._names = list(prepared.stored)
        self._weights = set(prepared.weights)
        # Values of non-weight stored tensors never change: build their OrtValues once.
        self._fixed = {n: ortvalue(a) for n, a in prepared.stored.items() if n not in self._weights}
        self._providers = list(providers)
        self._threads = threads
        self._shared_arena = shared_arena
        self.last_create_s = 0.0

    def session(self, weights: Mapping[str, np.ndarray]) -> tuple[ort.InferenceSession, list[ort.OrtValue]]:
        """A session running ``weights`` (every weight name); keep the returned values alive with it."""
        t0 = time.perf_counter()
        values = [self._fixed[n] if n in self._fixed else ortvalue(weights[n]) for n in self._names]
        sess = create_session(self._bytes, providers=self._providers, threads=self._threads, shared_arena=self._shared_arena,
                              external=dict(zip(self._names, values)), per_candidate=True)
        self.last_create_s = time.perf_counter() - t0
        return sess, values

    def run(self, weights: Mapping[str, np.ndarray], batches: Sequence[Batch]) -> list[list[np.ndarray]]:
        sess, values = self.session(weights)
        try:
            return [sess.run(None, feeds) for feeds, _ in batches]
        finally:
            del sess, values

    def close(self) -> None:
        self._fixed = {}


class _InputsEngine:
    """(b) One session whose weights are graph inputs, fed with every run."""

    name = "inputs"

    def __init__(self, prepared: _Prepared, providers: list[str], threads: int | None, device: str):
        proto = onnx.ModelProto()
        proto.CopyFrom(prepared.model)
        weights = set(prepared.weights)
        kept = [t for t in proto.graph.initializer if t.name not in weights]
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(kept)
        for name in prepared.weights:
            array = prepared.stored[name]
            elem = helper.np_dtype_to_tensor_dtype(array.dtype)
            proto.graph.input.append(helper.make_tensor_value_info(name, elem, list(array.shape)))
        # Its own arena (one session warms it once) and no spinning: its idle threads would
        # otherwise spin between runs and slow down whatever the process does next.
        fixed = [n for n in prepared.stored if n not in weights]
        self._fixed_values = [ortvalue(prepared.stored[n]) for n in fixed]
        self._sess = create_session(proto, providers=providers, threads=threads, spinning=False,
                                    external=dict(zip(fixed, self._fixed_values)), per_candidate=True)
        self._names = list(prepared.weights)
        self._device = device

    def run(self, weights: Mapping[str, np.ndarray], batches: Sequence[Batch]) -> list[list[np.ndarray]]:
        # Weights go in as OrtValues on the device once per candidate, not once per batch.
        values = {n: ortvalue(weights[n], self._device) for n in self._names}
        return [self._sess.run(None, {**feeds, **values}) for feeds, _ in batches]

    def close(self) -> None:
        self._sess = None  # type: ignore[assignment]
        self._fixed_values = []


# --------------------------------------------------------------------------------------------
# Suffix runs: a candidate that changes one weight only changes the nodes downstream of it


@dataclass
class _Cut:
    """How to score candidates that change only ``changed``.

    The nodes that do not depend on ``changed`` (the prefix) give the same values for every
    such candidate: they are run once with the original weights, the activations they hand
    to the rest (``boundary``) and the graph outputs they compute (``kept``) are cached per
    subset, and each candidate only runs the suffix model.
    """

    changed: frozenset[str]
    suffix_nodes: list[onnx.NodeProto]
    boundary: list[str]  # suffix inputs: activations of the prefix, or graph inputs
    activations: list[str]  # boundary names the prefix computes (not graph inputs)
    computed: list[str]  # graph outputs the suffix computes
    kept: list[str]  # graph outputs the prefix computes
    engine: _SessionEngine | None = None


def _plan_cut(prepared: _Prepared, changed: frozenset[str]) -> _Cut | None:
    """The cut for ``changed``, or None when the suffix is the whole graph (no gain)."""
    graph = prepared.model.graph
    affected = set(changed)
    suffix = []
    for node in graph.node:  # ONNX graphs are topologically sorted
        if any(ref in affected for ref in node_refs(node)):
            suffix.append(node)
            affected.update(o for o in node.output if o)
    inputs = {vi.name for vi in graph.input}
    initializers = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    produced = {o for node in graph.node for o in node.output if o}
    boundary: list[str] = []
    for node in suffix:
        for ref in node_refs(node):
            if ref not in affected and ref not in initializers and (ref in produced or ref in inputs) and ref not in boundary:
                boundary.append(ref)
    activations = [b for b in boundary if b not in inputs]
    if suffix and not activations:
        return None  # the changed weight is read straight from the graph inputs: run it all
    outputs = [o.name for o in graph.output]
    return _Cut(changed, suffix, boundary, activations, [o for o in outputs if o in affected], [o for o in outputs if o not in affected])


def _sub_model(prepared: _Prepared, nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
               outputs: list[onnx.ValueInfoProto], weights: list[str]) -> _Prepared:
    """A model of ``nodes`` with the initializers they read (still marked external)."""
    model = prepared.model
    refs = {ref for node in nodes for ref in node_refs(node)}
    graph = helper.make_graph(nodes, model.graph.name, inputs, outputs,
                              [t for t in model.graph.initializer if t.name in refs],
                              sparse_initializer=[t for t in model.graph.sparse_initializer if t.values.name in refs])
    sub = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    sub.functions.extend(model.functions)
    stored = {n: a for n, a in prepared.stored.items() if n in refs}
    return _Prepared(sub, stored, [w for w in weights if w in stored], "")


def _producer_model(prepared: _Prepared, names: Sequence[str]) -> _Prepared:
    """The ancestors of the tensors ``names`` (computed by the graph); those are its outputs."""
    graph = prepared.model.graph
    wanted = set(names)
    nodes = []
    for node in reversed(graph.node):
        if any(o in wanted for o in node.output):
            nodes.append(node)
            wanted.update(node_refs(node))
    nodes.reverse()
    declared = {o.name: o for o in graph.output}
    outputs = [declared.get(name) or onnx.ValueInfoProto(name=name) for name in names]
    return _sub_model(prepared, nodes, list(graph.input), outputs, [])


def _prefix_model(prepared: _Prepared, cut: _Cut) -> _Prepared:
    """The ancestors of the cut's activations and kept outputs; those are its outputs."""
    return _producer_model(prepared, cut.activations + cut.kept)


def _rank_only(name: str, array: np.ndarray) -> onnx.ValueInfoProto:
    # Symbolic dims: the batch may sit on any axis of an activation. Measured: no slower.
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype),
                                         [f"{name}_d{i}" for i in range(array.ndim)])


def _suffix_model(prepared: _Prepared, cut: _Cut, sample: Mapping[str, np.ndarray]) -> _Prepared:
    graph = prepared.model.graph
    graph_inputs = {vi.name: vi for vi in graph.input}
    inputs = [graph_inputs[b] if b in graph_inputs else _rank_only(b, sample[b]) for b in cut.boundary]
    outputs = [o for o in graph.output if o.name in cut.computed]
    return _sub_model(prepared, cut.suffix_nodes, inputs, outputs, sorted(cut.changed))


# --------------------------------------------------------------------------------------------
# Batching


def fixed_batch(model: onnx.ModelProto, input_names: Sequence[str] | None = None) -> int | None:
    """The fixed size of the models' batch axis (axis 0 of its data inputs), or None if dynamic.

    Raises:
        InputError: inputs disagree on a fixed batch size.
    """
    names = set(input_names) if input_names is not None else None
    sizes: dict[str, int] = {}
    for vi in model_inputs(model):
        if names is not None and vi.name not in names:
            continue
        tensor = vi.type.tensor_type
        if tensor.HasField("shape") and len(tensor.shape.dim) >= 1:
            dim = tensor.shape.dim[0]
            if dim.HasField("dim_value") and dim.dim_value > 0:
                sizes[vi.name] = dim.dim_value
    if len(set(sizes.values())) > 1:
        raise InputError(f"model inputs fix different batch sizes {sizes}; onnxws needs one batch axis shared by every input")
    return next(iter(sizes.values()), None)


def default_batch_size(data: EvalData) -> int:
    """Samples per run: up to DEFAULT_BATCH, and at most BATCH_INPUT_BYTES of input."""
    per_sample = sum(int(data.arrays[n][:1].nbytes) for n in data.input_names)
    return max(1, min(DEFAULT_BATCH, BATCH_INPUT_BYTES // max(per_sample, 1)))


def plan_batches(data: EvalData, batch_size: int, fixed: int | None) -> list[Batch]:
    """Split ``data``'s feeds into runs. A fixed batch N is run in chunks of N, the last padded
    by repeating its last sample (its outputs are trimmed); dynamic batches are ``batch_size``."""
    size = fixed or batch_size
    feeds = data.feeds()
    batches: list[Batch] = []
    for start in range(0, data.n, size):
        stop = min(start + size, data.n)
        chunk = {k: v[start:stop] for k, v in feeds.items()}
        real = stop - start
        if fixed and real < fixed:
            chunk = {k: np.concatenate([v, np.repeat(v[-1:], fixed - real, axis=0)]) for k, v in chunk.items()}
        batches.append((chunk, real))
    return batches


def concat_outputs(per_batch: list[list[np.ndarray]], batches: Sequence[Batch]) -> list[np.ndarray]:
    """Join per-batch outputs along axis 0, trimming the padding of fixed-size batches."""
    if len(per_batch) == 1 and len(next(iter(batches[0][0].values()))) == batches[0][1]:
        return list(per_batch[0])
    joined = []
    for i in range(len(per_batch[0])):
        parts = []
        for outs, (feeds, real) in zip(per_batch, batches):
            rows = len(next(iter(feeds.values())))
            out = outs[i]
            parts.append(out[:real] if out.ndim >= 1 and out.shape[0] == rows else out)
        joined.append(np.concatenate(parts, axis=0) if parts[0].ndim >= 1 else np.stack(parts))
    return joined


def _array_digest(name: str, array: np.ndarray) -> str:
    """SHA-256 of one named array: name, dtype, shape and bytes."""
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
    digest.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    return digest.hexdigest()


def _read_only(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for k, v in arrays.items():
        view = v.view()
        view.setflags(write=False)
        out[k] = view
    return out


# --------------------------------------------------------------------------------------------
# The scorer


class Scorer:
    """Scores candidate weights: the metric of the model with some weights replaced.

    Args:
        model: the original model (weights loaded in memory).
        weight_names: the tensors candidates may replace (initializers or Constant outputs).
        data: evaluation data checked against ``model``.
        metric: what a score is (higher is better).
        device: ``auto``, ``cpu`` or ``cuda``.
        search_samples: size of the search subset (the first samples, unshuffled).
        batch_size: samples per run (default: up to 1000, bounded by input bytes); a fixed
            batch axis in the model overrides it.
        cache: persistent score cache, or None (scores are still memoised in memory).
        engine: ``auto`` (measured at start), ``session`` or ``inputs`` (module docstring).
        threads: ORT intra-op threads (None: ORT's default, one per physical core).
        reuse_activations: score a candidate that changes a single weight by running only
            the nodes downstream of it, from cached activations of the rest (session engine
            only; the layer stage's candidates). Off: every candidate runs the whole model.
        activation_budget: bytes of cached activations for that (first come, first kept).

    Attributes:
        provider: execution provider used. engine: engine picked.
        baseline_search, baseline_full: metric of the unmodified model (not counted as scorings).
        scorings, scorings_run, scorings_cached: candidate evaluations requested, run, served
            from a cache; scorings_suffix: those run as suffix runs (part of scorings_run).
        n_search, n_full: samples in each subset. seconds_running: time spent in ORT runs.

    Raises:
        UsageError: bad option values. InputError: weights not found, no usable GPU for
            ``cuda``, or a model ONNX Runtime cannot run.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        weight_names: Sequence[str],
        data: EvalData,
        metric: Metric,
        *,
        device: str = "auto",
        search_samples: int = 2000,
        batch_size: int | None = None,
        cache: ScoreCache | None = None,
        engine: str = "auto",
        threads: int | None = None,
        reuse_activations: bool = True,
        activation_budget: int = ACTIVATION_BUDGET,
    ):
        if search_samples < 1:
            raise UsageError(f"--search-samples {search_samples}: must be >= 1")
        if batch_size is not None and batch_size < 1:
            raise UsageError(f"--batch-size {batch_size}: must be >= 1")
        if engine not in ENGINES:
            raise UsageError(f"scoring engine {engine!r}: expected one of {', '.join(ENGINES)}")
        if threads is not None and threads < 1:
            raise UsageError(f"threads {threads}: must be >= 1")
        self.weight_names = list(dict.fromkeys(weight_names))
        self.metric = metric
        self.cache = cache
        self.threads = threads
        self.providers, self.provider = resolve_providers(device)
        self._device = "cuda" if self.provider == CUDA else "cpu"
        self._prepared = _prepare(model, self.weight_names)
        self._originals = {n: self._prepared.stored[n] for n in self.weight_names}
        self._output_names = [o.name for o in model.graph.output]
        self.n_full = data.n
        self.n_search = min(search_samples, data.n)
        self._data = {"search": data.head(self.n_search), "full": data}
        self._fixed_batch = fixed_batch(model, data.input_names)
        self.batch_size = self._fixed_batch or batch_size or default_batch_size(data)
        self._batches: dict[str, list[Batch]] = {}
        self._views: dict[str, dict[str, np.ndarray]] = {}
        self._reference: dict[str, list[np.ndarray]] = {}
        self._baseline: dict[str, float] = {}
        self._memo: dict[str, tuple[float, float, float | None]] = {}
        self._outcomes: dict[str, np.ndarray] = {}  # per-sample outcomes of the unmodified model
        self._energies: dict[str, list[float]] = {}  # sum(r**2) of each reference output (divergence)
        self.scorings = 0
        self.scorings_run = 0
        self.scorings_cached = 0
        self.scorings_suffix = 0
        self.seconds_running = 0.0
        self.reuse_activations = reuse_activations
        self.activation_budget = activation_budget
        self._cuts: dict[frozenset[str], _Cut | None] = {}
        self._activations: dict[tuple[frozenset[str], str], list[dict[str, np.ndarray]] | None] = {}
        self._activation_bytes = 0
        self._hasher: ThreadPoolExecutor | None = None
        self._key_prefix = {s: self._context_key(s) for s in SUBSETS}
        self._shared_arena = shared_cpu_arena()
        self._engine = self._start(engine)
        self.engine = self._engine.name
        self.baseline_search = self._baseline["search"]
        logger.info(
            "scorer: engine %s on %s, %d weights, search %d / full %d samples, batch %d, baseline %.4f",
            self.engine, self.provider, len(self.weight_names), self.n_search, self.n_full, self.batch_size, self.baseline_search,
        )

    # -- public ---------------------------------------------------------------------------

    @property
    def baseline_full(self) -> float:
        """Metric of the unmodified model on the full set (computed on first use)."""
        if "full" not in self._baseline:
            self._compute_baseline("full")
        return self._baseline["full"]

    @property
    def originals(self) -> dict[str, np.ndarray]:
        """The original value of every weight (read-only arrays)."""
        return dict(self._originals)

    def score(self, candidates: Sequence[Mapping[str, np.ndarray]], subset: str = "search") -> list[float]:
        """The metric of each candidate (higher is better).

        Args:
            candidates: each maps some weight names to decoded arrays (same dtype and shape
                as the original); weights not in the mapping keep their original values.
            subset: ``search`` (the first ``n_search`` samples) or ``full``.

        Raises:
            ValueError: an unknown weight name, dtype or shape.
        """
        return [result[0] for result in self.score_with_divergence(candidates, subset)]

    def score_with_divergence(self, candidates: Iterable[Mapping[str, np.ndarray]],
                              subset: str = "search", *, spread: bool = False) -> list[tuple]:
        """Like ``score``, with each candidate's output divergence from the unmodified model
        (``metrics.output_divergence`` over the metric's output, or all outputs for a custom
        metric): ``[(metric value, divergence), ...]``. Both come from the same run and are
        cached together. ``candidates`` may be a generator: each is used and dropped before the
        next is drawn, so decoding them lazily keeps one candidate in memory at a time.

        With ``spread``, triples ``(value, divergence, spread)``: ``spread`` is the mean squared
        per-sample change of the metric's outcomes vs the unmodified model (for 0/1 outcomes the
        fraction of samples that flipped either way), from which the sampling error of the
        loss follows; None for a metric without per-sample outcomes (a custom metric).
        """
        self._check_subset(subset)
        results: list[tuple] = []
        for candidate in candidates:
            self._check_candidate(candidate)
            key = self.key(candidate, subset)
            result = self._memo.get(key)
            if result is None and self.cache is not None:
                value, divergence = self.cache.get(key), self.cache.get(key + _DIVERGENCE_KEY)
                flips = self.cache.get(key + _SPREAD_KEY) if self.metric.per_sample is not None else None
                if value is not None and divergence is not None and (flips is not None or self.metric.per_sample is None):
                    result = (value, divergence, flips)
            if result is None:
                outputs = self._run_suffix(candidate, subset) if self.reuse_activations else None
                if outputs is None:
                    outputs = self._run(candidate, subset)
                else:
                    self.scorings_suffix += 1
                value, spread_ = self._measure(outputs, subset)
                result = (value, self._divergence(outputs, subset), spread_)
                self.scorings_run += 1
                if self.cache is not None:
                    self.cache.put(key, result[0])
                    self.cache.put(key + _DIVERGENCE_KEY, result[1])
                    if result[2] is not None:
                        self.cache.put(key + _SPREAD_KEY, result[2])
            else:
                self.scorings_cached += 1
            self._memo[key] = result
            self.scorings += 1
            results.append(result if spread else result[:2])
            del candidate  # before the generator decodes the next one
        return results

    def grow_search(self, n: int) -> None:
        """Make the search subset the first ``n`` samples (more than now, at most the full set).

        Later ``search`` scorings run on the larger subset, whose baseline is computed here.
        Cache keys hold the subset's size, so nothing measured on the smaller subset is taken
        for the larger one (with ``n`` = the full set, search and full scorings share keys:
        they are the same measurement).
        """
        n = min(int(n), self.n_full)
        if n <= self.n_search:
            raise ValueError(f"grow_search({n}): the search subset already has {self.n_search} samples")
        self.n_search = n
        self._data["search"] = self._data["full"].head(n)
        for store in (self._batches, self._views, self._reference, self._baseline, self._outcomes, self._energies):
            store.pop("search", None)
        for key in [key for key in self._activations if key[1] == "search"]:
            acts = self._activations.pop(key)
            if acts is not None:
                self._activation_bytes -= sum(a.nbytes for batch in acts for a in batch.values())
        self._key_prefix["search"] = self._context_key("search")
        same = n == self.n_full and "full" in self._reference  # the full set's reference run is this one
        self._compute_baseline("search", self._reference["full"] if same else None)
        self.baseline_search = self._baseline["search"]
        logger.info("scorer: search subset grown to %d samples, baseline %.4f", n, self.baseline_search)

    def outputs(self, candidate: Mapping[str, np.ndarray], subset: str = "full") -> list[np.ndarray]:
        """Raw model outputs with ``candidate``'s weights (concatenated over batches); not a scoring."""
        self._check_subset(subset)
        self._check_candidate(candidate)
        return self._run(candidate, subset)

    def n_batches(self, subset: str = "search") -> int:
        """Runs one pass over ``subset`` takes."""
        self._check_subset(subset)
        return len(self._batches_for(subset))

    def activations(self, names: Sequence[str], subset: str = "search", *,
                    max_bytes: int = ACTIVATION_BUDGET) -> Iterator[dict[str, np.ndarray]]:
        """Values of tensors of the unmodified model (activations, or graph inputs) over ``subset``;
        not a scoring. Yields one dict per run; arrays whose axis 0 is the batch are trimmed to
        the batch's real samples. When one batch's values would exceed ``max_bytes`` (measured
        on its first sample), the names are read in groups, each over every batch: a name then
        appears in several dicts, each batch once per name.
        """
        self._check_subset(subset)
        names = list(dict.fromkeys(names))
        unknown = [n for n in names if n not in self._tensor_names()]
        if unknown:
            raise ValueError(f"no tensor named {unknown[0]!r} in the model")
        batches = self._batches_for(subset)
        if not names or not batches:
            return
        for group in self._activation_groups(names, batches, max_bytes):
            yield from self._read_tensors(group, batches)

    def reference_outputs(self, subset: str = "full") -> list[np.ndarray]:
        """Outputs of the unmodified model on ``subset`` (what top-1 agreement compares with)."""
        self._check_subset(subset)
        if subset not in self._reference:
            self._compute_baseline(subset)
        return self._reference[subset]

    def key(self, candidate: Mapping[str, np.ndarray], subset: str = "search") -> str:
        """Cache key: model, data, subset size, metric, provider and the candidate's arrays by name."""
        names = sorted(candidate)
        arrays = [candidate[n] for n in names]
        if len(arrays) > 1 and sum(a.nbytes for a in arrays) >= _PARALLEL_HASH_BYTES:
            if self._hasher is None:
                self._hasher = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="onnxws-hash")
            parts = list(self._hasher.map(_array_digest, names, arrays))
        else:
            parts = [_array_digest(n, a) for n, a in zip(names, arrays)]
        return hashlib.sha256("|".join([self._key_prefix[subset], *parts]).encode()).hexdigest()

    def close(self) -> None:
        """Release the ORT sessions, cached activations and the copy of the weights (the cache
        belongs to the caller). Baselines, reference outputs and counters stay readable; scoring
        after ``close`` raises."""
        self._engine.close()
        self._prepared.stored = {}
        self._originals = {}
        if self._hasher is not None:
            self._hasher.shutdown()
            self._hasher = None
        self._cuts.clear()
        self._activations.clear()
        self._activation_bytes = 0

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------

    def _context_key(self, subset: str) -> str:
        n = self.n_search if subset == "search" else self.n_full
        data_fp = self._data["full"].fingerprint()
        return f"onnxws-score-v1|{self._prepared.digest}|{data_fp}|{n}|{self.metric.identity()}|{self.provider}"

    def _check_subset(self, subset: str) -> None:
        if subset not in SUBSETS:
            raise ValueError(f"subset {subset!r}: expected 'search' or 'full'")

    def _check_candidate(self, candidate: Mapping[str, np.ndarray]) -> None:
        for name, array in candidate.items():
            original = self._originals.get(name)
            if original is None:
                raise ValueError(f"candidate weight {name!r} is not one of the scorer's weights ({len(self._originals)} names)")
            if array.dtype != original.dtype or array.shape != original.shape:
                raise ValueError(
                    f"candidate weight {name!r}: {array.dtype}{list(array.shape)} but the original is "
                    f"{original.dtype}{list(original.shape)}; decode to the original's dtype and shape"
                )

    def _batches_for(self, subset: str) -> list[Batch]:
        if subset not in self._batches:
            self._batches[subset] = plan_batches(self._data[subset], self.batch_size, self._fixed_batch)
        return self._batches[subset]

    def _run(self, candidate: Mapping[str, np.ndarray], subset: str, engine=None) -> list[np.ndarray]:
        weights = {**self._originals, **candidate}
        batches = self._batches_for(subset)
        t0 = time.perf_counter()
        outputs = concat_outputs((engine or self._engine).run(weights, batches), batches)
        self.seconds_running += time.perf_counter() - t0
        return outputs

    def _run_suffix(self, candidate: Mapping[str, np.ndarray], subset: str) -> list[np.ndarray] | None:
        """Outputs from a suffix run, or None when this candidate needs the whole model."""
        if len(candidate) != 1 or not isinstance(self._engine, _SessionEngine):
            return None
        changed = frozenset(candidate)
        if changed not in self._cuts:
            self._cuts[changed] = _plan_cut(self._prepared, changed)
        cut = self._cuts[changed]
        if cut is None:
            return None
        acts = self._prefix_activations(cut, subset)
        if acts is None:
            return None
        batches = self._batches_for(subset)
        t0 = time.perf_counter()
        if cut.suffix_nodes:
            if cut.engine is None:
                cut.engine = _SessionEngine(_suffix_model(self._prepared, cut, {**batches[0][0], **acts[0]}),
                                            self.providers, self.threads, self._shared_arena)
            feeds = [({b: feed[b] if b in feed else act[b] for b in cut.boundary}, real) for (feed, real), act in zip(batches, acts)]
            computed = cut.engine.run(candidate, feeds)
        else:  # the weight feeds no output
            computed = [[] for _ in batches]
        per_batch = []
        for outs, act in zip(computed, acts):
            by_name = dict(zip(cut.computed, outs)) | {k: act[k] for k in cut.kept}
            per_batch.append([by_name[name] for name in self._output_names])
        outputs = concat_outputs(per_batch, batches)
        self.seconds_running += time.perf_counter() - t0
        return outputs

    def _prefix_activations(self, cut: _Cut, subset: str) -> list[dict[str, np.ndarray]] | None:
        """Per batch, the cut's activations and kept outputs with the original weights (cached);
        None when they do not fit in what is left of the activation budget."""
        key = (cut.changed, subset)
        if key in self._activations:
            return self._activations[key]
        batches = self._batches_for(subset)
        t0 = time.perf_counter()
        engine = _SessionEngine(_prefix_model(self._prepared, cut), self.providers, self.threads, self._shared_arena)
        names = cut.activations + cut.kept
        sess, values = engine.session({})
        acts: list[dict[str, np.ndarray]] | None = []
        used = 0
        for i, (feeds, _) in enumerate(batches):
            acts.append(dict(zip(names, sess.run(names, feeds))))
            used += sum(a.nbytes for a in acts[-1].values())
            # Extrapolated from the batches so far: give up early instead of wasting a forward.
            if self._activation_bytes + used * len(batches) / (i + 1) > self.activation_budget:
                logger.debug("activations at %s for %s: over the budget, running whole model", cut.activations, subset)
                acts = None
                break
        del sess, values
        engine.close()
        self.seconds_running += time.perf_counter() - t0
        self._activations[key] = acts
        if acts is not None:
            self._activation_bytes += used
        return acts

    def _tensor_names(self) -> set[str]:
        graph = self._prepared.model.graph
        return {vi.name for vi in graph.input} | {o for node in graph.node for o in node.output if o}

    def _read_tensors(self, names: list[str], batches: list[Batch]) -> Iterator[dict[str, np.ndarray]]:
        inputs = {vi.name for vi in self._prepared.model.graph.input}
        computed = [n for n in names if n not in inputs]
        engine = sess = values = None
        if computed:
            engine = _SessionEngine(_producer_model(self._prepared, computed), self.providers, self.threads, self._shared_arena)
            sess, values = engine.session({})
        try:
            for feeds, real in batches:
                rows = next(iter(feeds.values())).shape[0]
                t0 = time.perf_counter()
                out = {n: feeds[n] for n in names if n in inputs}
                if computed:
                    out.update(zip(computed, sess.run(computed, feeds)))
                self.seconds_running += time.perf_counter() - t0
                yield {n: a[:real] if real < rows and a.ndim and a.shape[0] == rows else a for n, a in out.items()}
        finally:
            del sess, values
            if engine is not None:
                engine.close()

    def _activation_groups(self, names: list[str], batches: list[Batch], max_bytes: int) -> list[list[str]]:
        """``names`` split so that one batch's values of a group fit in ``max_bytes`` (a name
        bigger than that alone is a group of its own)."""
        feeds, _ = batches[0]
        rows = next(iter(feeds.values())).shape[0]
        if self._fixed_batch:  # the model takes exactly this batch: measure it whole
            probe = [(feeds, rows)]
        else:
            probe = [({k: v[:1] for k, v in feeds.items()}, 1)]
        reader = self._read_tensors(names, probe)
        try:
            first = next(reader)
        finally:
            reader.close()  # its session now, not when the generator is collected
        sizes = {n: a.nbytes * (rows if not self._fixed_batch else 1) for n, a in first.items()}
        groups: list[list[str]] = [[]]
        used = 0
        for name in names:
            if groups[-1] and used + sizes[name] > max_bytes:
                groups.append([])
                used = 0
            groups[-1].append(name)
            used += sizes[name]
        return groups

    def _evaluate(self, outputs: list[np.ndarray], subset: str) -> float:
        return float(self.metric.fn(outputs, self._metric_data(subset)))

    def _metric_data(self, subset: str) -> dict[str, np.ndarray]:
        if subset not in self._views:
            self._views[subset] = _read_only(self._data[subset].arrays)
        data = dict(self._views[subset])
        if self.metric.needs_reference:
            reference = self.reference_outputs(subset)
            data.update({reference_key(n): r for n, r in zip(self._output_names, reference)})
        return data

    def _measure(self, outputs: list[np.ndarray], subset: str) -> tuple[float, float | None]:
        """The metric of ``outputs`` and, for a metric with per-sample outcomes, the mean squared
        change of those outcomes vs the unmodified model's (one evaluation of the metric)."""
        data = self._metric_data(subset)
        per_sample = self.metric.per_sample
        if per_sample is None:
            return float(self.metric.fn(outputs, data)), None
        if subset not in self._outcomes:
            self._outcomes[subset] = per_sample(self.reference_outputs(subset), data)
        outcomes = per_sample(outputs, data)  # the metric is their mean (Metric.per_sample)
        return float(np.mean(outcomes)), float(np.mean(np.square(outcomes - self._outcomes[subset])))

    def _divergence(self, outputs: list[np.ndarray], subset: str) -> float:
        reference = self.reference_outputs(subset)
        if subset not in self._energies:  # sum(r**2) of each float reference output, once per subset
            self._energies[subset] = [squared_sum(r) if np.issubdtype(np.asarray(r).dtype, np.floating) else 0.0
                                      for r in reference]
        energies = self._energies[subset]
        if self.metric.output is not None and self.metric.output in self._output_names:
            i = self._output_names.index(self.metric.output)
            return output_divergence([outputs[i]], [reference[i]], [energies[i]])
        return output_divergence(outputs, reference, energies)

    def _compute_baseline(self, subset: str, outputs: list[np.ndarray] | None = None) -> None:
        if outputs is None:
            outputs = self._run({}, subset)
        self._reference[subset] = outputs
        self._baseline[subset] = self._evaluate(outputs, subset)

    def _build(self, name: str):
        if name == "session":
            return _SessionEngine(self._prepared, self.providers, self.threads, self._shared_arena)
        return _InputsEngine(self._prepared, self.providers, self.threads, self._device)

    def _start(self, engine: str):
        """Build the engine (measuring both when ``auto``) and compute the search baseline with it."""
        try:
            if engine != "auto":
                chosen = self._build(engine)
                self._compute_baseline("search", self._run({}, "search", chosen))
                return chosen
            return self._pick()
        except OnnxwsError:
            raise
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise InputError(f"ONNX Runtime cannot run the model on {self.provider}: {type(exc).__name__}: {one_line(exc)}") from exc

    def _pick(self):
        session = self._build("session")
        t0 = time.perf_counter()
        outputs = self._run({}, "search", session)
        t_session = time.perf_counter() - t0
        create = session.last_create_s
        forward = max(t_session - create, 1e-9)
        if create <= _CREATE_FRACTION_SURE * forward:
            logger.info("engine session: setup %.1f ms is <= %.0f%% of a %.1f ms forward", create * 1e3, _CREATE_FRACTION_SURE * 100, forward * 1e3)
            self._compute_baseline("search", outputs)
            return session
        # Measure both warm (the first runs page in the shared arena), the session engine first:
        # the inputs engine's idle threads spin for a while after its runs and would slow it.
        for _ in range(2):  # the first two sessions also grow the shared arena
            t0 = time.perf_counter()
            outputs = self._run({}, "search", session)
            t_session = min(t_session, time.perf_counter() - t0)
        try:
            inputs = self._build("inputs")
            t_inputs = float("inf")
            for _ in range(2):
                t0 = time.perf_counter()
                inputs_outputs = self._run({}, "search", inputs)
                t_inputs = min(t_inputs, time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001 - some graphs need constant weights; (a) still works
            logger.info("engine inputs unavailable (%s): using session", one_line(exc))
            self._compute_baseline("search", outputs)
            return session
        logger.info("engine timing per candidate: session %.1f ms, inputs %.1f ms", t_session * 1e3, t_inputs * 1e3)
        # A clear margin: close timings keep the engine that runs the fully optimised graph,
        # so the choice (and the last bits of the scores) does not flip with timing noise.
        if t_inputs < _INPUTS_MARGIN * t_session:
            session.close()
            self._compute_baseline("search", inputs_outputs)
            return inputs
        inputs.close()
        self._compute_baseline("search", outputs)
        return session


# --------------------------------------------------------------------------------------------
# Plain evaluation of any model (the emitted one included), with default ORT options


def run_model(
    model: onnx.ModelProto,
    data: EvalData,
    *,
    device: str = "auto",
    batch_size: int | None = None,
    threads: int | None = None,
    keep_compact: bool = False,
) -> list[np.ndarray]:
    """Outputs of ``model`` on all of ``data`` in a stock ``InferenceSession`` (default options;
    ``keep_compact`` keeps shared weights compressed in memory, see onnxws.runtime).

    Raises:
        InputError: ONNX Runtime cannot load or run the model.
    """
    providers, _ = resolve_providers(device)
    stock = {"providers": providers, "optimization": "default", "log_severity": None, "threads": threads,
             "keep_compact": keep_compact}
    fixed = fixed_batch(model, data.input_names)
    batches = plan_batches(data, fixed or batch_size or default_batch_size(data), fixed)
    try:
        serialized = None
        if fits_in_one_message(model):  # ModelProto.ByteSize() would raise over 2 GB (upb)
            try:
                serialized = model.SerializeToString()
            except EncodeError:  # the estimate missed (a huge graph)
                serialized = None
        if serialized is not None:
            sess = create_session(serialized, **stock)
            del serialized
        else:  # protobuf cannot serialise it: hand the big tensors over in memory instead
            prepared = _prepare(model, [])
            values = {n: ortvalue(a) for n, a in prepared.stored.items()}
            sess = create_session(prepared.model, external=values, **stock)
        per_batch = [sess.run(None, feeds) for feeds, _ in batches]
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        raise InputError(f"ONNX Runtime cannot run the model: {type(exc).__name__}: {one_line(exc)}") from exc
    return concat_outputs(per_batch, batches)


def evaluate_model(
    model: onnx.ModelProto,
    data: EvalData,
    metric: Metric,
    *,
    device: str = "auto",
    batch_size: int | None = None,
    reference: Scorer | Sequence[np.ndarray] | None = None,
    threads: int | None = None,
) -> float:
    """The metric of ``model`` on all of ``data``, run as a user would (stock ORT options).

    Args:
        reference: for metrics that compare with the uncompressed model (top-1 agreement):
            a Scorer of that model (its full-set outputs are used) or those outputs.

    Raises:
        InputError: a reference metric without ``reference``; ORT cannot run the model.
    """
    outputs = run_model(model, data, device=device, batch_size=batch_size, threads=threads)
    arrays = dict(data.arrays)
    if metric.needs_reference:
        if reference is None:
            raise InputError(f"metric {metric.name} compares with the uncompressed model: pass its outputs or scorer as reference")
        ref = reference.reference_outputs("full") if isinstance(reference, Scorer) else list(reference)
        arrays.update({reference_key(o.name): r for o, r in zip(model.graph.output, ref)})
    return float(metric.fn(outputs, arrays))
