"""Emit stage: write shared weights into the graph (docs/design.md, "Encoding contract").

Each shared weight ``W`` (an initializer or a ``Constant`` output of the main graph) is rebuilt
in-graph as ``Gather(<W>.codebook, Cast(<W>.indices -> INT32), axis=0)``, producing ``W``'s name:

- index widths with a native ONNX type are stored in it: UINT2 (opset >= 25), UINT4 (opset >= 21),
  UINT8. The default-domain opset is raised for them when ``onnx.version_converter`` succeeds *and*
  the converted model gives the same outputs in ORT on random inputs; otherwise the widths are
  packed (below) and ``EncodeResult.notes`` says why.
- other widths (1, 3, 5, 6, 7 bits, and 2/4 bits where the native type is not allowed) are packed
  into a dense little-endian bit stream ``<W>.indices``, UINT8 [m, b] with m = ceil(n/8) (n*b/8
  bytes, rounded up to whole 8-index words; see ``pack_indices``). Its bytes are b contiguous
  planes of m bytes (plane j = byte j of every word; word r holds indices r, r+m, ..., r+7m), so
  unpacking reshapes it to [b, m], gathers whole planes (axis 0) for the low and high byte of each
  of the 8 runs ([8]-sized constants), then, from opset 14, in uint8:
  ``((lo >> s) + (hi << (8 - s))) mod 2**b`` (BitShift, Add, Mod), reshapes to W, casts to INT32.
  Below opset 14 (no uint8 Add) the same arithmetic runs in int32 (Cast, Mul, Add, Div, Mod;
  opset 10). Packing asks for opset 14 when the opset may be raised.
- grouped codebooks (channel / group:N granularity) add ``group_id * k`` (``<W>.offsets``, int32,
  shape broadcastable along the channel axis) to the indices and gather from the flat [G*k] codebook.
- k = 1 (0 bits): ``Expand(<W>.codebook, <W>.shape)``: the single value (or one per channel for
  grouped codebooks) broadcast to W's shape, no index tensor.

Unpacking measured on a ResNet-50-shaped model (25.5 M shared weights, ``tools/bench_encoding.py``,
ORT session creation with one intra-op thread, CPU s / peak RSS, medians of 5): float model
0.27 s / 306 MB; native UINT8/UINT4/UINT2 indices 0.47-0.50 s / 320-332 MB; bit streams with the
uint8 unpacking 0.56-0.60 s / 377-395 MB (1, 2, 4 bits: no index straddles two bytes) and
0.63-0.70 s / 461-492 MB (3, 5, 6, 7 bits); the int32 unpacking 1.38 s / 951 MB (5 bits). Earlier
layouts measured worse: words stored row-wise ([m, b], gathering 8 columns along axis 1) doubled
the gather time (75-80 ms vs 35-46 ms for one 2.36 M-weight tensor), and int32 arithmetic on the
whole stream used 920 MB. Bitwise ops (opset 18) instead of Add/Mod saved < 5% and need a higher
opset, so they are not used.

Graph surgery edits the protobuf directly (onnx helpers) rather than through a graph library:
measured with onnx 1.23.2 (docs/graph_libraries.md, tools/bench_graph_libraries.py), an
onnx-graphsurgeon 0.6.1 round trip drops the model's doc_string, domain and model_version, node doc
strings and metadata_props, graph and model metadata_props, unused value_info and initializers
listed as graph inputs, and copies every outer-scope initializer read by an If/Loop body into that
body (duplicating weights); an onnx-ir 1.1.0 round trip drops sparse initializers and unused
value_info and duplicates initializer metadata_props. Every decode node reads only initializers,
so prepending the new nodes keeps the node list topologically sorted; everything else in the model is left as it was. Raising the opset is
``onnxws.opset``; the rebuilt weights and the re-measured metric of the written file are checked
by ``onnxws.emit_check``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxws.errors import InputError, UsageError
from onnxws.opset import OpsetRaiser
from onnxws.proto import (
    copy_tensor_header,
    default_opset,
    fits_in_one_message,
    graph_shell,
    graphs,
    min_ir_version,
    payload_bytes,
    with_payloads,
)
from onnxws.sharing import SharedWeight

logger = logging.getLogger(__name__)

UINT4_OPSET = 21
UINT2_OPSET = 25
PACK_OPSET = 10  # int32 unpacking: Mod (10), Slice with inputs (10), Div/Mul/Add with broadcasting (7)
PACK_UINT8_OPSET = 14  # uint8 unpacking: BitShift (11), Add on uint8 (14)
EXPAND_OPSET = 8
MIN_OPSET = 6  # Cast with an integer ``to`` attribute
_NATIVE = {8: ("UINT8", 1), 4: ("UINT4", UINT4_OPSET), 2: ("UINT2", UINT2_OPSET)}
_ML_DTYPES = {"UINT4": ml_dtypes.uint4, "UINT2": ml_dtypes.uint2}


@dataclass
class EncodedTensor:
    """How one shared tensor was written (for the report).

    Attributes:
        name: the weight's tensor name (now the output of its decode subgraph).
        k: shared values per codebook.
        bits: index width, ``ceil(log2 k)``.
        n_codebooks: G (1 for per-tensor sharing).
        index_dtype: ``"UINT8"``, ``"UINT4"``, ``"UINT2"``, ``"packed:<b>"`` (dense bit stream of
            width b in a UINT8 tensor) or ``"none"`` (k = 1).
        stored_bytes: bytes of the initializers that now represent this weight (codebook,
            indices, offsets, shape); helpers shared by all tensors of one width are not counted.
    """

    name: str
    k: int
    bits: int
    n_codebooks: int
    index_dtype: str
    stored_bytes: int


@dataclass
class EncodeResult:
    """The encoded model and what was done to it.

    Attributes:
        model: the new model (the input is not modified).
        opset: default-domain opset of ``model``.
        tensors: one entry per shared weight, in the order given.
        notes: human-readable decisions: opset raised (and verified) or kept and why, widths
            left in a wider container.
    """

    model: onnx.ModelProto
    opset: int
    tensors: list[EncodedTensor]
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Layout planning
# --------------------------------------------------------------------------------------------


def plan_layout(bits: int, opset: int, pack: bool = True) -> str:
    """How indices of ``bits`` width are stored at ``opset``.

    Returns ``"none"`` (k = 1), a native type name (``"UINT8"``, ``"UINT4"``, ``"UINT2"``) or
    ``"packed:<bits>"``. A native type of exactly ``bits`` wins; otherwise a bit stream when
    ``pack`` (and the opset has the unpacking ops); otherwise the narrowest native container.
    """
    if bits == 0:
        return "none" if opset >= EXPAND_OPSET else "UINT8"
    allowed = [(width, name) for width, (name, need) in sorted(_NATIVE.items()) if width >= bits and opset >= need]
    if allowed[0][0] == bits:
        return allowed[0][1]
    if pack and opset >= PACK_OPSET:
        return f"packed:{bits}"
    return allowed[0][1]


def _needed_opset(bits: int, pack: bool) -> int:
    """Lowest opset at which ``bits`` gets its best layout (no wasted container bits)."""
    if bits == 0:
        return EXPAND_OPSET
    if bits in _NATIVE:
        return _NATIVE[bits][1]
    if pack:
        return PACK_UINT8_OPSET
    return UINT2_OPSET if bits <= 2 else UINT4_OPSET if bits <= 4 else 1


def _layout_bits(layout: str, bits: int) -> int:
    """Bits per index that ``layout`` spends on disk."""
    return {"none": 0, "UINT8": 8, "UINT4": 4, "UINT2": 2}.get(layout, bits)


# --------------------------------------------------------------------------------------------
# Bit-stream packing (NumPy side; the graph side is _Writer._packed)
# --------------------------------------------------------------------------------------------


def pack_indices(indices: np.ndarray, bits: int) -> np.ndarray:
    """Dense bit stream of ``indices`` (values < 2**bits, 1 <= bits <= 8), as ``bits`` byte planes.

    The n indices (zero-padded to 8m, m = ceil(n/8)) are cut into 8 runs of m; word r packs
    indices r, r+m, ..., r+7m little-endian at bit offsets 0, b, ..., 7b (8*b bits = b bytes).
    Plane j holds byte j of every word, so unpacking gathers whole contiguous planes.

    Returns:
        uint8 [bits, m]: n*b/8 bytes rounded up to whole words.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits}: packing needs 1..8 bits per index")
    flat = np.asarray(indices).reshape(-1).astype(np.uint64)
    m = -(-flat.size // 8)
    runs = np.zeros(8 * m, dtype=np.uint64)
    runs[: flat.size] = flat
    runs = runs.reshape(8, m)
    words = np.zeros(m, dtype=np.uint64)  # 8 indices of <= 8 bits fit in 64 bits
    for t in range(8):
        words |= runs[t] << np.uint64(t * bits)
    as_bytes = words.astype("<u8").view(np.uint8).reshape(m, 8)
    return np.ascontiguousarray(as_bytes[:, :bits].T)


def _unpack_columns(bits: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Per run t in 0..7: (plane of its low bits, plane of its high bits or None when no index
    straddles two bytes, bit offset of the index in its low byte)."""
    offsets = np.arange(8) * bits
    lo = offsets // 8
    hi = None if 8 % bits == 0 else np.minimum(lo + 1, bits - 1)
    return lo, hi, offsets % 8


def unpack_indices(planes: np.ndarray, bits: int, n: int) -> np.ndarray:
    """NumPy mirror of the in-graph unpacking: the first ``n`` indices (int64) of ``planes`` [bits, m]."""
    lo, hi, shift = _unpack_columns(bits)
    p = np.asarray(planes).astype(np.int64)
    word = p[lo] + (256 * p[hi] if hi is not None else 0)  # [8, m]
    return (word >> shift[:, None] & ((1 << bits) - 1)).reshape(-1)[:n]


def _copy_without(model: onnx.ModelProto, names: frozenset[str], values: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` in which the main-graph initializers named in ``names`` keep only their
    header (name, type, shape, metadata): they are about to be replaced, and a full copy whose
    payloads were deleted afterwards would keep them in memory (upb frees a message as a whole)."""
    work = graph_shell(model)
    for tensor in model.graph.initializer:
        if tensor.name in names:
            copy_tensor_header(tensor, work.graph.initializer.add())
        else:
            work.graph.initializer.append(tensor)
            with_payloads(work.graph.initializer[-1], values)
    return work


# --------------------------------------------------------------------------------------------
# Graph writing
# --------------------------------------------------------------------------------------------


def _all_names(model: onnx.ModelProto) -> set[str]:
    names: set[str] = set()
    for g in graphs(model.graph):
        names.update(t.name for t in g.initializer)
        names.update(s.values.name for s in g.sparse_initializer)
        names.update(v.name for v in (*g.input, *g.output, *g.value_info))
        for node in g.node:
            names.update(node.output)
            names.update(node.input)
    names.discard("")
    return names


class _Writer:
    """Collects the decode nodes and initializers of all shared weights of one model."""

    def __init__(self, taken: set[str]) -> None:
        self.taken = taken
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._helpers: dict[tuple, str] = {}

    def own(self, name: str, array: np.ndarray | TensorProto) -> tuple[str, int]:
        """Add initializer ``name`` (must be free); returns (name, payload bytes)."""
        if name in self.taken:
            raise InputError(f"the model already has a tensor named {name!r}; onnxws names its encoding tensors "
                             f"'<weight>.codebook', '<weight>.indices', ...: rename that tensor and run again")
        tensor = array if isinstance(array, TensorProto) else numpy_helper.from_array(np.ascontiguousarray(array), name)
        tensor.name = name
        self.taken.add(name)
        self.initializers.append(tensor)
        return name, payload_bytes(tensor)

    def helper_const(self, key: str, array: np.ndarray) -> str:
        """A small constant shared by every weight that needs the same value (a free name is picked)."""
        array = np.ascontiguousarray(array)
        cache_key = (key, array.dtype.str, array.shape, array.tobytes())
        if cache_key not in self._helpers:
            name, i = f"onnxws.{key}", 1
            while name in self.taken:
                name, i = f"onnxws.{key}_{i}", i + 1
            self.taken.add(name)
            self.initializers.append(numpy_helper.from_array(array, name))
            self._helpers[cache_key] = name
        return self._helpers[cache_key]

    def node(self, op: str, inputs: list[str], output: str, name: str, *, fresh: bool = True, **attrs) -> str:
        """Append a node; ``fresh`` outputs (intermediates) get a free name, else ``output`` is used as is."""
        if fresh:
            base, i = output, 1
            while output in self.taken:
                output, i = f"{base}_{i}", i + 1
            self.taken.add(output)
        self.nodes.append(helper.make_node(op, inputs, [output], name=name, **attrs))
        return output

    def emit(self, sw: SharedWeight, layout: str, opset: int) -> int:
        """Nodes computing ``sw.name`` (== sw.decode()); returns the bytes of its own initializers."""
        name, shape = sw.name, sw.shape
        stored = 0
        view = [1] * len(shape)
        if sw.n_codebooks > 1:
            axis = sw.channel_axis % len(shape)
            view[axis] = shape[axis]
        if layout == "none":
            values = sw.codebooks.reshape(-1)
            if sw.n_codebooks > 1:  # one value per channel: the value of its group
                values = values[np.asarray(sw.group_ids()).reshape(-1)]
            book, b = self.own(f"{name}.codebook", values.reshape(view))
            target, s = self.own(f"{name}.shape", np.array(shape, dtype=np.int64))
            self.node("Expand", [book, target], name, f"{name}/Expand", fresh=False)
            return b + s
        book, stored = self.own(f"{name}.codebook", sw.codebooks.reshape(-1))
        tmp = f"{name}/"
        if layout.startswith("packed:"):
            index, b = self._packed(sw, int(layout.split(":", 1)[1]), opset)
            stored += b
        else:
            values = sw.indices.astype(np.uint8)
            if layout in _ML_DTYPES:
                values = values.astype(_ML_DTYPES[layout])
            indices, b = self.own(f"{name}.indices", numpy_helper.from_array(values, f"{name}.indices"))
            stored += b
            index = self.node("Cast", [indices], tmp + "index", f"{name}/Cast", to=TensorProto.INT32)
        if sw.n_codebooks > 1:
            offsets = (np.asarray(sw.group_ids()).reshape(view) * sw.k).astype(np.int32)
            off, b = self.own(f"{name}.offsets", offsets)
            stored += b
            index = self.node("Add", [index, off], tmp + "index_g", f"{name}/AddGroup")
        self.node("Gather", [book, index], name, f"{name}/Gather", fresh=False, axis=0)
        return stored

    def _packed(self, sw: SharedWeight, bits: int, opset: int) -> tuple[str, int]:
        """Unpacking nodes of a ``packed:<bits>`` weight; returns (int32 index tensor of W's shape, own bytes).

        ``<W>.indices`` is stored as UINT8 [m, bits] (``onnxws inspect`` reads the width from dims[1]);
        its bytes are the [bits, m] planes of ``pack_indices``, so the first node reshapes it to them.
        From opset 14 every step is uint8 (BitShift, and Add, which takes uint8 from opset 14), so
        constant folding at session start holds ~1 byte per weight per step; below 14 the arithmetic
        is int32 (Div/Mod): 4 bytes per weight per step.
        """
        name, n, tmp = sw.name, sw.params, f"{sw.name}/"
        planes = pack_indices(sw.indices, bits)
        stream, stored = self.own(f"{name}.indices", planes.reshape(planes.shape[1], bits))
        planes_out = self.node("Reshape", [stream, self.helper_const(f"unpack.{bits}.planes", np.array([bits, -1], np.int64))],
                               tmp + "planes", f"{name}/Planes")
        lo, hi, shift = _unpack_columns(bits)
        column = (8, 1)  # per-run constants broadcast over the m words
        lo8 = self.node("Gather", [planes_out, self.helper_const(f"unpack.{bits}.lo", lo.astype(np.int32))],
                        tmp + "lo8", f"{name}/GatherLo", axis=0)
        hi8 = None if hi is None else self.node(
            "Gather", [planes_out, self.helper_const(f"unpack.{bits}.hi", hi.astype(np.int32))], tmp + "hi8", f"{name}/GatherHi", axis=0)
        if opset >= PACK_UINT8_OPSET:
            if hi8 is None:  # no index straddles two bytes
                shr = self.helper_const(f"unpack.{bits}.shr", shift.astype(np.uint8).reshape(column))
                word = self.node("BitShift", [lo8, shr], tmp + "low", f"{name}/ShiftLo", direction="RIGHT")
            else:
                # (lo >> s) + (hi << (8 - s)): disjoint bits, so Add is Or (for s = 0 the shift is 7
                # instead of 8: the stray bit lands at bit 7 >= bits and is dropped by Mod like all bits >= bits)
                shr = self.helper_const(f"unpack.{bits}.shr", shift.astype(np.uint8).reshape(column))
                shl = self.helper_const(f"unpack.{bits}.shl", np.minimum(8 - shift, 7).astype(np.uint8).reshape(column))
                low = self.node("BitShift", [lo8, shr], tmp + "low", f"{name}/ShiftLo", direction="RIGHT")
                high = self.node("BitShift", [hi8, shl], tmp + "high", f"{name}/ShiftHi", direction="LEFT")
                word = self.node("Add", [low, high], tmp + "word", f"{name}/Join")
            idx8 = self.node("Mod", [word, self.helper_const(f"unpack.{bits}.mod8", np.array(1 << bits, np.uint8))],
                             tmp + "idx8", f"{name}/Mask", fmod=0)
        else:
            word = self.node("Cast", [lo8], tmp + "lo", f"{name}/CastLo", to=TensorProto.INT32)
            if hi8 is not None:
                hi32 = self.node("Cast", [hi8], tmp + "hi", f"{name}/CastHi", to=TensorProto.INT32)
                hi256 = self.node("Mul", [hi32, self.helper_const("unpack.256", np.array(256, np.int32))],
                                  tmp + "hi256", f"{name}/Mul256")
                word = self.node("Add", [word, hi256], tmp + "word", f"{name}/Word")
            if np.any(shift != 0):
                div = self.helper_const(f"unpack.{bits}.div", (1 << shift).astype(np.int32).reshape(column))
                word = self.node("Div", [word, div], tmp + "shifted", f"{name}/Shift")
            idx8 = self.node("Mod", [word, self.helper_const(f"unpack.{bits}.mod", np.array(1 << bits, np.int32))],
                             tmp + "idx8", f"{name}/Mask", fmod=0)
        target, b = self.own(f"{name}.shape", np.array(sw.shape, dtype=np.int64))
        stored += b
        if n % 8:  # the runs are padded to 8m indices: drop the padding
            flat = self.node("Reshape", [idx8, self.helper_const("unpack.flat", np.array([-1], np.int64))],
                             tmp + "flat", f"{name}/Flatten")
            end, b = self.own(f"{name}.count", np.array([n], np.int64))
            stored += b
            idx8 = self.node("Slice", [flat, self.helper_const("unpack.zero", np.array([0], np.int64)), end],
                             tmp + "trimmed", f"{name}/Trim")
        index = self.node("Reshape", [idx8, target], tmp + "index8", f"{name}/Reshape")
        if opset >= PACK_UINT8_OPSET:
            index = self.node("Cast", [index], tmp + "index", f"{name}/Cast", to=TensorProto.INT32)
        return index, stored


def _validate(sw: SharedWeight) -> None:
    """Raise InputError unless ``sw`` is a well-formed shared weight."""
    books, idx = np.asarray(sw.codebooks), np.asarray(sw.indices)
    if books.ndim != 2 or books.shape[0] < 1 or not 1 <= books.shape[1] <= 256:
        raise InputError(f"shared weight {sw.name!r}: codebooks must be [G, k] with 1 <= k <= 256, got shape {books.shape}")
    if books.dtype.kind != "f" and books.dtype not in (np.dtype(ml_dtypes.bfloat16),):
        raise InputError(f"shared weight {sw.name!r}: codebooks must be floating point, got {books.dtype}")
    if idx.dtype.kind not in "iu":
        raise InputError(f"shared weight {sw.name!r}: indices must be integers, got {idx.dtype}")
    if idx.size == 0:
        raise InputError(f"shared weight {sw.name!r} is empty")
    if idx.min() < 0 or idx.max() >= sw.k:
        raise InputError(f"shared weight {sw.name!r}: indices must lie in [0, {sw.k}), got [{idx.min()}, {idx.max()}]")
    if sw.n_codebooks > 1:
        if idx.ndim == 0:
            raise InputError(f"shared weight {sw.name!r}: a scalar cannot have {sw.n_codebooks} codebooks")
        groups = int(np.asarray(sw.group_ids()).max()) + 1
        if groups != sw.n_codebooks:
            raise InputError(f"shared weight {sw.name!r}: {sw.n_codebooks} codebooks but its channel axis "
                             f"{sw.channel_axis} / group size {sw.group_size} give {groups} groups")


def _locate(graph: onnx.GraphProto, name: str) -> tuple[str, int, TensorProto]:
    """("initializer" | "constant", position, tensor) of the tensor ``name`` in the main graph."""
    for i, tensor in enumerate(graph.initializer):
        if tensor.name == name:
            return "initializer", i, tensor
    for i, node in enumerate(graph.node):
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and list(node.output) == [name]:
            values = [a for a in node.attribute if a.name == "value"]
            if not values:
                raise InputError(f"Constant node producing {name!r} holds "
                                 f"{[a.name for a in node.attribute]}, not a tensor 'value'; only tensor Constants can be rewritten")
            return "constant", i, values[0].t
    raise InputError(f"tensor {name!r} is neither an initializer nor a Constant output of the main graph; "
                     "pass the names that onnxws.discovery found")


def _write_bias(graph: onnx.GraphProto, sw: SharedWeight) -> None:
    """Give the bias that ``sw`` corrects (``sw.bias_name``) its corrected values, in place."""
    _, _, tensor = _locate(graph, sw.bias_name)
    bias = np.asarray(sw.bias)
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    if tuple(tensor.dims) != bias.shape or dtype != bias.dtype:
        raise InputError(f"shared weight {sw.name!r}: its corrected bias {sw.bias_name!r} is {bias.dtype} {list(bias.shape)} "
                         f"but the model's tensor is {dtype} {list(tensor.dims)}")
    tensor.CopyFrom(numpy_helper.from_array(bias, sw.bias_name))


def _check_matches(sw: SharedWeight, tensor: TensorProto) -> None:
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    if tuple(tensor.dims) != sw.shape:
        raise InputError(f"shared weight {sw.name!r} has shape {list(sw.shape)} but the model's tensor is {list(tensor.dims)}")
    if dtype != sw.codebooks.dtype:
        raise InputError(f"shared weight {sw.name!r}: codebook dtype {sw.codebooks.dtype} differs from the model's {dtype}; "
                         "the codebook must be in the weight's dtype")


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def encode_model(model: onnx.ModelProto, shared: Sequence[SharedWeight], *, opset: int | None = None,
                 raise_opset: bool = True, pack: bool = True,
                 values: Mapping[str, np.ndarray] | None = None) -> EncodeResult:
    """Rewrite a copy of ``model`` so each shared weight is rebuilt in-graph from its codebook.

    Args:
        model: the original model with its tensors loaded; not modified.
        shared: weights to share, each a main-graph initializer or Constant output, one entry per name;
            a weight that carries a corrected bias (``bias_name``) writes those values into that tensor.
        opset: pin the output's default-domain opset (>= the model's); ``None`` picks the lowest
            opset that gives every width its best layout (when ``raise_opset``).
        raise_opset: allow raising the opset (for UINT4/UINT2 indices, or to reach the unpacking
            ops); the conversion is kept only if ORT gives the same outputs on random inputs.
        pack: store widths without an exact native type as dense bit streams (else in the next
            wider native type).
        values: arrays of main-graph initializers already in memory (e.g. the scorer's originals),
            used instead of decoding a second copy of their payloads to check an opset raise;
            read only, and only where dtype and shape match. Initializers of ``model`` left
            without payload by ``proto.without_payloads`` get theirs back from it.

    The new model never holds the payloads of the shared initializers (only their headers until
    they are replaced), so encoding costs about one copy of the *unshared* tensors, not of the model.

    Returns:
        EncodeResult: new model, its opset, per-tensor layout and sizes, notes on the decisions.

    Raises:
        UsageError: ``opset`` below the model's, or above what this onnx knows.
        InputError: a name that is not a main-graph weight, a malformed SharedWeight, a name clash.
    """
    names = [sw.name for sw in shared]
    dupes = [n for n, c in Counter(names).items() if c > 1]
    if dupes:
        raise InputError(f"weights {dupes} are listed more than once; give one SharedWeight per tensor")
    for sw in shared:
        _validate(sw)
    current = default_opset(model)
    newest = onnx.defs.onnx_opset_version()
    if opset is not None and opset < current:
        raise UsageError(f"opset {opset} is below the model's opset {current}; onnxws does not lower opsets: "
                         f"pass --opset {current} or higher, or leave it out")
    if opset is not None and opset > newest:
        raise UsageError(f"opset {opset} is newer than this onnx ({onnx.__version__}) supports ({newest}); pass --opset <= {newest}")
    notes: list[str] = []

    # 1. Pick the opset, raising it when that is verified safe.
    widths = sorted({sw.bits for sw in shared})
    wants = {b: min(_needed_opset(b, pack), newest) for b in widths}
    if opset is not None:
        targets = [opset] if opset > current else []
    elif raise_opset:
        targets = sorted({w for w in wants.values() if w > current}, reverse=True)
    else:
        targets = []
    work: onnx.ModelProto | None = None
    target = current
    if current == 0:  # no ai.onnx node yet: importing the default domain converts nothing
        target = opset if opset is not None else max([PACK_OPSET, *wants.values()])
        notes.append(f"the model imported no ai.onnx opset; opset {target} added for the decode nodes")
    elif targets:
        raiser = OpsetRaiser(model, values, frozenset(names))
        for candidate in targets:
            converted, how = raiser.convert(candidate)
            if converted is not None:
                work, target = converted, candidate
                helped = [b for b in widths if plan_layout(b, candidate, pack) != plan_layout(b, current, pack)]
                notes.append(f"opset {current} raised to {candidate} for {_describe(helped, candidate, pack)} ({how})")
                break
            notes.append(f"opset {current} not raised to {candidate}: {how}")
            logger.warning("opset %d not raised to %d: %s", current, candidate, how)
        else:
            missed = [b for b in widths if wants[b] > current]
            notes.append(f"opset {current} kept, so {_describe(missed, current, pack)}")
    else:
        missed = [b for b in widths if wants[b] > current]
        if missed:
            why = "raise_opset=False" if opset is None else "pinned"
            notes.append(f"opset {current} kept ({why}), so {_describe(missed, current, pack)} "
                         f"(opset {max(wants[b] for b in missed)} would allow narrower layouts)")
    if target < MIN_OPSET:
        raise InputError(f"the model's opset {current} is older than {MIN_OPSET} and could not be raised; "
                         "convert it with onnx.version_converter.convert_version(model, 13) first")
    if work is None:
        work = _copy_without(model, frozenset(names), values or {})
    if current == 0:
        work.opset_import.append(helper.make_opsetid("", target))

    # 2. Rewrite: drop each weight's initializer / Constant node, prepend its decode nodes.
    graph = work.graph
    writer = _Writer(_all_names(work))
    encoded: list[EncodedTensor] = []
    dropped_inputs: list[str] = []
    for sw in shared:
        if sw.bias_name and sw.bias is not None:
            _write_bias(graph, sw)
        kind, position, tensor = _locate(graph, sw.name)
        _check_matches(sw, tensor)
        if kind == "initializer":
            del graph.initializer[position]
            inputs = [vi.name for vi in graph.input]
            if sw.name in inputs:  # IR < 4 style: the initializer was also a (defaulted) graph input
                del graph.input[inputs.index(sw.name)]
                dropped_inputs.append(sw.name)
        else:
            del graph.node[position]
        layout = plan_layout(sw.bits, target, pack)
        stored = writer.emit(sw, layout, target)
        encoded.append(EncodedTensor(sw.name, sw.k, sw.bits, sw.n_codebooks, layout, int(stored)))
    nodes = writer.nodes + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(writer.initializers)
    if dropped_inputs:
        notes.append(f"{len(dropped_inputs)} shared weight(s) were also graph inputs (IR < 4 style) and are no longer "
                     f"overridable inputs: {', '.join(dropped_inputs[:5])}{' ...' if len(dropped_inputs) > 5 else ''}")
    work.ir_version = max(work.ir_version, 4, min_ir_version(target))
    for width in sorted({t.bits for t in encoded}):
        layouts = {t.index_dtype for t in encoded if t.bits == width}
        for layout in layouts:
            spent = _layout_bits(layout, width)
            if spent > width:
                count = sum(1 for t in encoded if t.bits == width and t.index_dtype == layout)
                why = "pack=False" if not pack else f"no bit-stream unpacking ops at opset {target}"
                notes.append(f"{width}-bit indices of {count} tensor(s) stored in {layout} ({why}): "
                             f"{100 * (spent - width) / spent:.1f}% of their index bytes are padding")
    external = any(t.data_location == TensorProto.EXTERNAL for t in graph.initializer)
    # The checker resolves external files from the cwd; over 2 GB the caller checks a light copy (loading.check_model).
    if not external and fits_in_one_message(work):
        onnx.checker.check_model(work)
    logger.info("encoded %d weights at opset %d: %s", len(encoded), target,
                dict(Counter(t.index_dtype for t in encoded)))
    return EncodeResult(work, target, encoded, notes)


def _describe(widths: Sequence[int], opset: int, pack: bool) -> str:
    """'4-bit indices as UINT4, 3-bit indices as packed:3' for the layouts of ``widths`` at ``opset``."""
    return ", ".join(f"{b}-bit indices as {plan_layout(b, opset, pack)}" for b in widths) or "no index width"
