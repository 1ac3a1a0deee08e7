"""Emit stage: write shared weights into the graph (DESIGN.md "Encoding contract").

Each shared weight ``W`` is rebuilt in-graph as ``Gather(<W>.codebook, Cast(<W>.indices))``:

- index widths with a native ONNX type are stored in it: UINT2 (opset >= 25), UINT4
  (opset >= 21), UINT8. The model's opset is raised for them when the version converter
  succeeds *and* the converted model gives the same outputs in ORT; otherwise the widths are
  packed (below) and the reason is recorded.
- other widths (1, 3, 5, 6, 7 bits, and 2/4 when no native type is allowed) are packed into a
  dense little-endian bit stream ``<W>.indices`` (UINT8, ``ceil(n*b/8)`` bytes rounded up to
  whole groups of 8 indices, i.e. b bytes per 8 indices). Eight consecutive indices occupy
  exactly b bytes, so the stream is viewed as [n/8, b] and each of the 8 index positions is
  read with two column Gathers, ``(lo + 256*hi) / 2**shift mod 2**b`` (int32 arithmetic, opset 11+
  ops only), then reshaped to W. The constants are [8]-sized: no per-element helper tensor.
- groups of channels (per-channel / grouped codebooks) add ``group_id * k`` to the indices
  (a small int32 offset tensor along the channel axis) and Gather from the flat [G*k] codebook.
- k = 1 (0 bits): ``Expand`` of the single value (or of the per-group values) to W's shape.

Graph surgery goes through onnx-graphsurgeon; only the edges touch protobuf (narrow index
types are swapped in after export, since graphsurgeon holds numpy arrays).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, numpy_helper

from onnxws.sharing import SharedWeight

logger = logging.getLogger(__name__)

UINT4_OPSET = 21
UINT2_OPSET = 25
PACK_OPSET = 11  # Range-free unpacking needs Gather/Mod/Div/Reshape/Slice(inputs) from opset 10-11
_NATIVE = {2: ("UINT2", UINT2_OPSET), 4: ("UINT4", UINT4_OPSET), 8: ("UINT8", 1)}


@dataclass
class EncodedTensor:
    """Per shared tensor, for the report."""

    name: str
    k: int
    bits: int
    n_codebooks: int
    index_dtype: str  # "UINT8" | "UINT4" | "UINT2" | "packed:<b>" | "none"
    stored_bytes: int


@dataclass
class EncodeResult:
    model: onnx.ModelProto
    opset: int
    tensors: list[EncodedTensor]
    notes: list[str] = field(default_factory=list)


def default_opset(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return int(op.version)
    return 0


def _plan_layout(bits: int, opset: int, pack: bool) -> str:
    """How indices of ``bits`` width are stored at ``opset``."""
    if bits == 0:
        return "none"
    native = [(w, name) for w, (name, need) in sorted(_NATIVE.items()) if w >= bits and opset >= need]
    if native and native[0][0] == bits:
        return native[0][1]
    if pack and opset >= PACK_OPSET and bits < 8:
        return f"packed:{bits}"
    return native[0][1] if native else "UINT8"


def _wanted_opset(shared: Sequence[SharedWeight], current: int) -> int:
    want = current
    for sw in shared:
        if sw.bits in _NATIVE:
            want = max(want, _NATIVE[sw.bits][1])
    return min(want, onnx.defs.onnx_opset_version())


def _convert_opset(model: onnx.ModelProto, target: int) -> tuple[onnx.ModelProto | None, str]:
    """Version-convert and check that ORT gives the same outputs; (None, why) if not safe."""
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(model, target)
        onnx.checker.check_model(converted)
    except Exception as exc:  # noqa: BLE001 - the converter raises assorted errors
        return None, f"version converter failed ({' '.join(str(exc).split())[:120]})"
    try:
        same = _same_outputs(model, converted)
    except Exception as exc:  # noqa: BLE001
        return None, f"ORT could not run the converted model ({' '.join(str(exc).split())[:120]})"
    if not same:
        return None, "the converted model's outputs differ from the original's"
    converted.ir_version = max(converted.ir_version, model.ir_version)
    return converted, ""


def _random_feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 2 for d in tt.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.normal(size=shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[vi.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            feeds[vi.name] = rng.integers(0, 8, size=shape).astype(dtype)
    return feeds


def _same_outputs(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    import onnxruntime as ort

    feeds = _random_feeds(a)
    out_a = ort.InferenceSession(a.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    out_b = ort.InferenceSession(b.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    return all(x.shape == y.shape and np.allclose(x, y, rtol=1e-5, atol=1e-6, equal_nan=True) for x, y in zip(out_a, out_b))


def _pack_stream(indices: np.ndarray, bits: int) -> np.ndarray:
    """Dense little-endian bit stream: [ceil(n/8), bits] uint8 (b bytes per 8 indices)."""
    flat = indices.reshape(-1).astype(np.uint64)
    groups = -(-len(flat) // 8)
    padded = np.zeros(groups * 8, dtype=np.uint64)
    padded[: len(flat)] = flat
    words = np.zeros(groups, dtype=np.uint64)  # 8 indices * <= 8 bits fit in 64 bits
    for t in range(8):
        words |= padded[t::8] << np.uint64(t * bits)
    as_bytes = words.astype("<u8").view(np.uint8).reshape(groups, 8)
    return np.ascontiguousarray(as_bytes[:, :bits])


def _unpack_reference(stream: np.ndarray, bits: int, n: int) -> np.ndarray:
    """NumPy mirror of the in-graph unpacking (used by the tests)."""
    lo_cols, hi_cols, divisors = _unpack_columns(bits)
    b = stream.astype(np.int64)
    vals = (b[:, lo_cols] + 256 * b[:, hi_cols]) // divisors % (1 << bits)
    return vals.reshape(-1)[:n]


def _unpack_columns(bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    offsets = np.arange(8) * bits
    lo = offsets // 8
    hi = np.minimum(lo + 1, bits - 1)
    return lo.astype(np.int64), hi.astype(np.int64), (1 << (offsets % 8)).astype(np.int32)


class _Emitter:
    """Builds the decode subgraph of one weight in a graphsurgeon graph."""

    def __init__(self, graph: gs.Graph) -> None:
        self.graph = graph
        self.swaps: dict[str, TensorProto] = {}  # constants replaced after export (narrow types)
        self.shared: dict[str, gs.Constant] = {}

    def const(self, name: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(name, np.ascontiguousarray(values))

    def shared_const(self, name: str, values: np.ndarray) -> gs.Constant:
        """One constant per name for the whole graph (helpers common to several weights)."""
        if name not in self.shared:
            self.shared[name] = self.const(name, values)
        return self.shared[name]

    def node(self, op: str, name: str, inputs: list, outputs: list, **attrs) -> None:
        self.graph.nodes.append(gs.Node(op, name=name, inputs=inputs, outputs=outputs, attrs=attrs))

    def var(self, name: str, dtype=None) -> gs.Variable:
        return gs.Variable(name, dtype=dtype)

    def emit(self, sw: SharedWeight, out: gs.Variable, layout: str) -> int:
        """Add nodes computing ``out`` (= sw.decode()); return the bytes of the new initializers."""
        n = sw.params
        shape = np.array(sw.shape, dtype=np.int64)
        name = sw.name
        book = sw.codebooks.reshape(-1)
        stored = 0
        if sw.k == 1:
            values = book if sw.n_codebooks == 1 else book[(np.arange(sw.shape[sw.channel_axis]) // sw.group_size)]
            if sw.n_codebooks > 1:
                view = [1] * len(sw.shape)
                view[sw.channel_axis] = sw.shape[sw.channel_axis]
                values = values.reshape(view)
            elif len(sw.shape):
                values = values.reshape([1] * len(sw.shape))
            const = self.const(f"{name}.codebook", values)
            shape_c = self.const(f"{name}.shape", shape)
            self.node("Expand", f"{name}/Expand", [const, shape_c], [out])
            return int(values.nbytes + shape.nbytes)
        codebook = self.const(f"{name}.codebook", book)
        stored += book.nbytes
        if layout.startswith("packed:"):
            bits = int(layout.split(":")[1])
            stream = _pack_stream(sw.indices, bits)
            packed = self.const(f"{name}.indices", stream)
            stored += stream.nbytes
            lo_cols, hi_cols, divisors = _unpack_columns(bits)
            # Width-wide helpers are shared by every tensor of that width; only n and the shape are per tensor.
            shared_helpers = {
                "unpack_lo": lo_cols.astype(np.int32), "unpack_hi": hi_cols.astype(np.int32), "unpack_div": divisors,
                "unpack_256": np.array(256, np.int32), "unpack_mod": np.array(1 << bits, np.int32),
                "unpack_flat": np.array([-1], np.int64), "unpack_start": np.array([0], np.int64),
            }
            c = {key: self.shared_const(f"onnxws.{key}.{bits}", value) for key, value in shared_helpers.items()}
            c["unpack_end"] = self.const(f"{name}.unpack_end", np.array([n], np.int64))
            c["shape"] = self.const(f"{name}.shape", shape)
            stored += 8 + shape.nbytes
            v = {key: self.var(f"{name}/{key}") for key in ("bytes", "lo", "hi", "hi256", "word", "shifted", "idx8", "flat", "trimmed")}
            index = self.var(f"{name}/index", dtype=np.int32)
            self.node("Cast", f"{name}/CastBytes", [packed], [v["bytes"]], to=TensorProto.INT32)
            self.node("Gather", f"{name}/GatherLo", [v["bytes"], c["unpack_lo"]], [v["lo"]], axis=1)
            self.node("Gather", f"{name}/GatherHi", [v["bytes"], c["unpack_hi"]], [v["hi"]], axis=1)
            self.node("Mul", f"{name}/Mul256", [v["hi"], c["unpack_256"]], [v["hi256"]])
            self.node("Add", f"{name}/Word", [v["lo"], v["hi256"]], [v["word"]])
            self.node("Div", f"{name}/Shift", [v["word"], c["unpack_div"]], [v["shifted"]])
            self.node("Mod", f"{name}/Mask", [v["shifted"], c["unpack_mod"]], [v["idx8"]], fmod=0)
            self.node("Reshape", f"{name}/Flatten", [v["idx8"], c["unpack_flat"]], [v["flat"]])
            self.node("Slice", f"{name}/Trim", [v["flat"], c["unpack_start"], c["unpack_end"]], [v["trimmed"]])
            self.node("Reshape", f"{name}/Reshape", [v["trimmed"], c["shape"]], [index])
        else:
            placeholder = self.const(f"{name}.indices", sw.indices.astype(np.uint8))
            if layout in ("UINT4", "UINT2"):
                kind = ml_dtypes.uint4 if layout == "UINT4" else ml_dtypes.uint2
                tensor = numpy_helper.from_array(sw.indices.astype(np.uint8).astype(kind), f"{name}.indices")
                self.swaps[f"{name}.indices"] = tensor
                stored += len(tensor.raw_data)
            else:
                stored += sw.indices.size
            index = self.var(f"{name}/index", dtype=np.int32)
            self.node("Cast", f"{name}/Cast", [placeholder], [index], to=TensorProto.INT32)
        if sw.n_codebooks > 1:
            view = [1] * len(sw.shape)
            view[sw.channel_axis] = sw.shape[sw.channel_axis]
            offsets = ((np.arange(sw.shape[sw.channel_axis]) // sw.group_size) * sw.k).astype(np.int32).reshape(view)
            off = self.const(f"{name}.offsets", offsets)
            stored += offsets.nbytes
            shifted_index = self.var(f"{name}/index_g", dtype=np.int32)
            self.node("Add", f"{name}/AddGroup", [index, off], [shifted_index])
            index = shifted_index
        self.node("Gather", f"{name}/Gather", [codebook, index], [out], axis=0)
        return int(stored)


def encode_model(model: onnx.ModelProto, shared: Sequence[SharedWeight], *, opset: int | None = None,
                 raise_opset: bool = True, pack: bool = True) -> EncodeResult:
    """Rewrite ``model`` (not modified) so each shared weight is rebuilt from its codebook.

    Args:
        model: the original model, weights loaded.
        shared: the weights to share (names of main-graph initializers or Constant outputs).
        opset: pin the output's default-domain opset (>= the model's).
        raise_opset: allow raising the opset for native UINT4/UINT2 indices (verified in ORT).
        pack: pack widths without a native type into a bit stream (else UINT8/UINT4 containers).

    Raises:
        ValueError: a weight name not found, or ``opset`` below the model's.
    """
    notes: list[str] = []
    work = onnx.ModelProto()
    work.CopyFrom(model)
    current = default_opset(work)
    if opset is not None and opset < current:
        raise ValueError(f"--opset {opset} is below the model's opset {current}; onnxws does not lower opsets")
    target = opset if opset is not None else (_wanted_opset(shared, current) if raise_opset else current)
    if target > current:
        converted, why = _convert_opset(work, target)
        if converted is None:
            notes.append(f"opset {current} kept: raising it to {target} is not safe ({why}); "
                         "widths without a native type at this opset are packed")
            target = current
        else:
            notes.append(f"opset {current} raised to {target} for narrow index types (outputs verified equal in ORT)")
            work = converted
    graph = gs.import_onnx(work)
    tensors = graph.tensors()
    emitter = _Emitter(graph)
    encoded: list[EncodedTensor] = []
    for sw in shared:
        if sw.name not in tensors:
            raise ValueError(f"weight {sw.name!r} is not a tensor of the model")
        tensor = tensors[sw.name]
        dtype = sw.codebooks.dtype
        if isinstance(tensor, gs.Constant):
            out = gs.Variable(sw.name, dtype=dtype, shape=list(sw.shape))
            for node in list(tensor.outputs):
                for position, t in enumerate(list(node.inputs)):
                    if t is tensor:
                        node.inputs[position] = out
            tensor.name = f"{sw.name}.__replaced__"
        else:
            producers = list(tensor.inputs)
            if len(producers) != 1 or producers[0].op != "Constant":
                raise ValueError(f"weight {sw.name!r} is neither an initializer nor a Constant node output")
            producers[0].outputs.clear()
            graph.nodes.remove(producers[0])
            out = tensor
            out.dtype, out.shape = dtype, list(sw.shape)
        layout = _plan_layout(sw.bits, target, pack)
        stored = emitter.emit(sw, out, layout)
        encoded.append(EncodedTensor(sw.name, sw.k, sw.bits, sw.n_codebooks, layout, stored))
    graph.toposort()
    result = gs.export_onnx(graph, do_type_check=False)
    _restore_model_fields(result, work, target)
    for init in result.graph.initializer:
        if init.name in emitter.swaps:
            init.CopyFrom(emitter.swaps[init.name])
    onnx.checker.check_model(result)
    return EncodeResult(result, target, encoded, notes)


def _restore_model_fields(result: onnx.ModelProto, source: onnx.ModelProto, opset: int) -> None:
    """graphsurgeon rewrites model-level fields: put the source's back."""
    result.ir_version = max(source.ir_version, 10 if opset >= 21 else source.ir_version)
    if opset >= 25:
        result.ir_version = max(result.ir_version, 11)
    result.producer_name = source.producer_name
    result.producer_version = source.producer_version
    result.domain = source.domain
    result.model_version = source.model_version
    result.doc_string = source.doc_string
    del result.metadata_props[:]
    result.metadata_props.extend(source.metadata_props)
    del result.opset_import[:]
    for op in source.opset_import:
        entry = result.opset_import.add()
        entry.domain, entry.version = op.domain, (opset if op.domain in ("", "ai.onnx") else op.version)
    if not any(op.domain in ("", "ai.onnx") for op in source.opset_import):
        entry = result.opset_import.add()
        entry.domain, entry.version = "", opset
    if source.functions and not result.functions:
        result.functions.extend(source.functions)


def _payload_bytes(tensor: TensorProto) -> int:
    if tensor.data_location == TensorProto.EXTERNAL:
        for entry in tensor.external_data:
            if entry.key == "length":
                return int(entry.value)
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    return int(numpy_helper.to_array(tensor).nbytes)


def model_weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all initializer and Constant-node tensor payloads of the main graph."""
    total = sum(_payload_bytes(t) for t in model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    total += _payload_bytes(attr.t)
    return total


def decoded_weights(model: onnx.ModelProto, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Rebuilt weights of an encoded model, computed by ORT from its decode subgraphs."""
    import onnxruntime as ort

    if not names:
        return {}
    producers = {out: node for node in model.graph.node for out in node.output}
    inits = {init.name: init for init in model.graph.initializer}
    needed_nodes: list[onnx.NodeProto] = []
    needed_inits: set[str] = set()
    seen: set[str] = set()
    stack = list(names)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in inits:
            needed_inits.add(name)
        elif name in producers:
            node = producers[name]
            if node not in needed_nodes:
                needed_nodes.append(node)
            stack.extend(i for i in node.input if i)
        else:
            raise ValueError(f"{name!r} depends on a graph input: not a constant decode subgraph")
    order = [node for node in model.graph.node if node in needed_nodes]
    outputs = [onnx.helper.make_empty_tensor_value_info(name) for name in names]
    graph = onnx.helper.make_graph(order, "decode", [], outputs, [inits[n] for n in sorted(needed_inits)])
    sub = onnx.helper.make_model(graph, opset_imports=list(model.opset_import))
    sub.ir_version = model.ir_version
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(sub.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(list(names), {})))
