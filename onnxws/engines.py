"""Engines: run a model with given weights in ONNX Runtime, fast, many times over.

``prepare`` splits a model into a small weights-free proto and its big tensors (one copy of
their values); the engines run it with any weights over a list of batches. Two engines, picked
per model by the scorer's measurement at start (``Scorer(engine="auto")``):

- ``session``: the weights-free model with its weights marked as external data; each
  candidate gets a fresh ``InferenceSession`` with its weights passed by
  ``SessionOptions.add_external_initializers`` (zero-copy OrtValues) at full graph
  optimisation, so its forward runs as fast as the original model's (from one shared CPU
  arena: ``onnxws.runtime``).
- ``inputs``: weights turned into graph inputs of one session and fed with every run: no
  per-candidate setup, but the forward loses the constant-weight optimisations
  (pre-packing, NCHWc layouts): measured 1.2-1.3x slower on LeNet-5, 1.5x on ResNet-50,
  2x on MobileNetV2. It wins only when a candidate is scored on very few samples.

Suffix cuts (session engine): a candidate that changes a single weight (the layer stage)
leaves every node upstream of that weight unchanged. ``plan_cut`` finds the nodes downstream
(the suffix) and the activations they read at the cut; ``prefix_model`` computes those once
with the original weights, ``suffix_model`` runs each candidate from them. The suffix computes
the data-independent values it reads (``Constant`` nodes, values computed from initializers)
itself, so ORT's optimiser still sees them as constants. LeNet-5 layer-stage candidates cost
0.35x a plain forward this way.

Figures: ``tools/bench_scoring.py``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from onnxws.data import Batch
from onnxws.errors import InputError
from onnxws.proto import copy_tensor_header, graph_shell, node_refs, payload_bytes, set_external
from onnxws.runtime import create_session, ortvalue

EXTERNAL_MIN_BYTES = 4096
"""Non-weight initializers at least this large are also passed as in-memory external data, so
the per-candidate model bytes that ORT parses stay small."""
_EXTERNAL_LOCATION = "onnxws-in-memory"


# --------------------------------------------------------------------------------------------
# Model preparation


@dataclass
class Prepared:
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


def prepare(model: onnx.ModelProto, weights: list[str]) -> Prepared:
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
    return Prepared(proto, stored, list(weights), digest.hexdigest())


# --------------------------------------------------------------------------------------------
# Engines: run the model with given weights over a list of batches



class SessionEngine:
    """(a) A fresh session per candidate; weights passed as in-memory external initializers."""

    name = "session"

    def __init__(self, prepared: Prepared, providers: list[str], threads: int | None, shared_arena: bool):
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

    def run(self, weights: Mapping[str, np.ndarray], batches: Iterable[Batch]) -> Iterator[list[np.ndarray]]:
        """The outputs of each batch, run as it is drawn (a caller may stop between batches)."""
        sess, values = self.session(weights)
        try:
            for feeds, _ in batches:
                yield sess.run(None, feeds)
        finally:
            del sess, values

    def close(self) -> None:
        self._fixed = {}


class InputsEngine:
    """(b) One session whose weights are graph inputs, fed with every run."""

    name = "inputs"

    def __init__(self, prepared: Prepared, providers: list[str], threads: int | None, device: str):
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

    def run(self, weights: Mapping[str, np.ndarray], batches: Iterable[Batch]) -> Iterator[list[np.ndarray]]:
        """The outputs of each batch, run as it is drawn (a caller may stop between batches)."""
        # Weights go in as OrtValues on the device once per candidate, not once per batch.
        values = {n: ortvalue(weights[n], self._device) for n in self._names}
        for feeds, _ in batches:
            yield self._sess.run(None, {**feeds, **values})

    def close(self) -> None:
        self._sess = None  # type: ignore[assignment]
        self._fixed_values = []


# --------------------------------------------------------------------------------------------
# Suffix runs: a candidate that changes one weight only changes the nodes downstream of it


@dataclass
class Cut:
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
    engine: SessionEngine | None = None


def plan_cut(prepared: Prepared, changed: frozenset[str]) -> Cut | None:
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
    suffix = _with_constant_producers(graph.node, suffix, initializers, affected)
    affected.update(o for node in suffix for o in node.output if o)
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
    return Cut(changed, suffix, boundary, activations, [o for o in outputs if o in affected], [o for o in outputs if o not in affected])


# Ops whose output is not a function of their inputs: never copied into a suffix (run once, in the prefix).
_NONDETERMINISTIC_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                                   "Bernoulli", "Dropout"})


def _with_constant_producers(nodes: Sequence[onnx.NodeProto], suffix: list[onnx.NodeProto], initializers: set[str],
                             changed: set[str]) -> list[onnx.NodeProto]:
    """``suffix`` plus the data-independent nodes upstream that it reads (``Constant`` nodes and
    nodes computing only from initializers and other such nodes), in graph order. Fed to the
    suffix as inputs, their values would hide constants from ORT's graph optimiser: measured on
    MobileNetV2, a Clip whose min / max are graph inputs is not fused into its Conv, and the
    suffix from the first layer ran 2.2x slower than the whole model."""
    constant = set(initializers) - changed
    producers: dict[str, onnx.NodeProto] = {}
    for node in nodes:
        if node.op_type in _NONDETERMINISTIC_OPS or node.domain not in ("", "ai.onnx"):
            continue
        if all(ref in constant for ref in node_refs(node)) and not any(o in changed for o in node.output):
            constant.update(o for o in node.output if o)
            producers.update((o, node) for o in node.output if o)
    in_suffix = {id(node) for node in suffix}
    wanted = [ref for node in suffix for ref in node_refs(node) if ref in producers]
    while wanted:
        node = producers[wanted.pop()]
        if id(node) not in in_suffix:
            in_suffix.add(id(node))
            wanted.extend(ref for ref in node_refs(node) if ref in producers)
    return [node for node in nodes if id(node) in in_suffix]


def _sub_model(prepared: Prepared, nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
               outputs: list[onnx.ValueInfoProto], weights: list[str]) -> Prepared:
    """A model of ``nodes`` with the initializers they read (still marked external)."""
    model = prepared.model
    refs = {ref for node in nodes for ref in node_refs(node)}
    graph = helper.make_graph(nodes, model.graph.name, inputs, outputs,
                              [t for t in model.graph.initializer if t.name in refs],
                              sparse_initializer=[t for t in model.graph.sparse_initializer if t.values.name in refs])
    sub = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    sub.functions.extend(model.functions)
    stored = {n: a for n, a in prepared.stored.items() if n in refs}
    return Prepared(sub, stored, [w for w in weights if w in stored], "")


def producer_model(prepared: Prepared, names: Sequence[str]) -> Prepared:
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


def prefix_model(prepared: Prepared, cut: Cut) -> Prepared:
    """The ancestors of the cut's activations and kept outputs; those are its outputs."""
    return producer_model(prepared, cut.activations + cut.kept)


def _rank_only(name: str, array: np.ndarray) -> onnx.ValueInfoProto:
    # Symbolic dims: the batch may sit on any axis of an activation. Measured: no slower.
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype),
                                         [f"{name}_d{i}" for i in range(array.ndim)])


def suffix_model(prepared: Prepared, cut: Cut, sample: Mapping[str, np.ndarray]) -> Prepared:
    graph = prepared.model.graph
    graph_inputs = {vi.name: vi for vi in graph.input}
    inputs = [graph_inputs[b] if b in graph_inputs else _rank_only(b, sample[b]) for b in cut.boundary]
    outputs = [o for o in graph.output if o.name in cut.computed]
    return _sub_model(prepared, cut.suffix_nodes, inputs, outputs, sorted(cut.changed))

