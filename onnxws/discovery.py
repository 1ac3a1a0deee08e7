"""Find the shareable weight tensors of a model, and say why every other float tensor is skipped.

A weight is shareable when it is a float constant (initializer or ``Constant`` node value of
the main graph) feeding a weight input of a supported op, possibly through layout-only ops
(Transpose, Reshape, Cast, ...), with at least ``min_params`` elements and finite values.
Weight sharing replaces each element by a codebook entry, so it commutes with any
permutation or reshape of the tensor: sharing the stored tensor is equivalent.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from onnxws.errors import InputError, one_line
from onnxws.proto import nested_nodes, subgraphs

logger = logging.getLogger(__name__)

# op_type -> {input index: output-channel axis of the weight in that slot}
WEIGHT_INPUTS: dict[str, dict[int, int]] = {
    "Conv": {1: 0},
    "ConvTranspose": {1: 1},
    "Gemm": {0: 0, 1: 1},  # adjusted for transA/transB below
    "MatMul": {0: 0, 1: -1},
    "Einsum": {},  # any constant operand; axis 0
    "LSTM": {1: 1, 2: 1},
    "GRU": {1: 1, 2: 1},
    "RNN": {1: 1, 2: 1},
    "Gather": {0: 0},  # embedding table (data input) when the indices are not constant
}
# Ops that only move, reshape or cast a tensor: a weight may pass through them on its way.
PASS_THROUGH = {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast"}
# Named reasons for well-known non-weight slots.
_BIAS_SLOTS = {("Conv", 2), ("ConvTranspose", 2), ("Gemm", 2), ("LSTM", 3), ("GRU", 3), ("RNN", 3)}
_NORM_OPS = {"BatchNormalization", "LayerNormalization", "InstanceNormalization", "GroupNormalization",
             "RMSNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization"}
_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.DOUBLE: "float64",
}
_QUANT_OPS = {"DequantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear"}


@dataclass(frozen=True)
class WeightInfo:
    """A shareable weight tensor.

    Attributes:
        name: tensor name (initializer, or the output of a ``Constant`` node).
        op_type: op type of the consumer that makes it a weight (e.g. ``Conv``).
        consumers: names (or ``op_type#index``) of every node reading it.
        shape: tensor shape.
        dtype: ``float32`` or ``float16``.
        params: number of elements.
        source: ``initializer`` or ``constant``.
        channel_axis: axis holding output channels (for per-channel codebooks).
    """

    name: str
    op_type: str
    consumers: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    params: int
    source: str
    channel_axis: int = 0


@dataclass(frozen=True)
class Skipped:
    """A float tensor that is not shared, with the reason (always reported)."""

    name: str
    reason: str
    op_type: str = ""
    shape: tuple[int, ...] = ()
    dtype: str = ""
    params: int = 0


@dataclass
class Discovery:
    weights: list[WeightInfo] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def names(self) -> list[str]:
        return [w.name for w in self.weights]


@dataclass(frozen=True)
class _Use:
    node: onnx.NodeProto
    node_label: str
    index: int


def constant_tensors(model: onnx.ModelProto) -> dict[str, tuple[onnx.TensorProto, str]]:
    """All constant tensors of the main graph: name -> (TensorProto, "initializer" | "constant")."""
    found: dict[str, tuple[onnx.TensorProto, str]] = {}
    for init in model.graph.initializer:
        found[init.name] = (init, "initializer")
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    tensor = onnx.TensorProto()
                    tensor.CopyFrom(attr.t)
                    tensor.name = node.output[0]
                    found[node.output[0]] = (tensor, "constant")
    # Graph inputs that share an initializer's name are overridable at run time: not constants.
    overridable = {inp.name for inp in model.graph.input}
    return {name: value for name, value in found.items() if name not in overridable}


def weight_values(model: onnx.ModelProto, name: str) -> np.ndarray:
    """The value of a constant tensor of the main graph (initializer or Constant node)."""
    tensors = constant_tensors(model)
    if name not in tensors:
        raise KeyError(f"no constant tensor named {name!r}")
    return numpy_helper.to_array(tensors[name][0])


def _node_label(node: onnx.NodeProto, position: int) -> str:
    return node.name or f"{node.op_type}#{position}"


def _uses(model: onnx.ModelProto) -> dict[str, list[_Use]]:
    uses: dict[str, list[_Use]] = defaultdict(list)
    for position, node in enumerate(model.graph.node):
        for index, name in enumerate(node.input):
            if name:
                uses[name].append(_Use(node, _node_label(node, position), index))
    return uses


def _subgraph_uses(model: onnx.ModelProto) -> set[str]:
    """Names read inside subgraphs (If/Loop/Scan bodies): a weight used there is outer-scope."""
    names: set[str] = set()
    for node in model.graph.node:
        for sub in subgraphs(node):
            for inner in nested_nodes(sub.node):
                names.update(inner.input)
    return names


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(attr.i)
    return default


def _final_uses(name: str, uses: dict[str, list[_Use]], constants: set[str], depth: int = 0) -> Iterator[_Use | str]:
    """Follow a tensor through layout-only ops to the nodes that really consume it.

    Yields each final use, or a string reason when a path cannot be followed.
    """
    if depth > 8:
        yield "passes through more than 8 layout ops"
        return
    for use in uses.get(name, []):
        node = use.node
        if node.op_type in PASS_THROUGH and use.index == 0 and node.domain in ("", "ai.onnx"):
            if node.op_type == "Cast" and not _is_float_cast(node):
                yield f"cast to a non-float type by {use.node_label}"
                continue
            if not node.output or not uses.get(node.output[0]):
                yield f"feeds {node.op_type} {use.node_label}, whose output is unused or a graph output"
                continue
            yield from _final_uses(node.output[0], uses, constants, depth + 1)
        else:
            yield use


def _is_float_cast(node: onnx.NodeProto) -> bool:
    return _attr(node, "to", 0) in _FLOAT_TYPES


def _classify_use(use: _Use, constants: set[str]) -> tuple[int | None, str]:
    """Return (channel axis, "") if the use is a weight input, else (None, reason)."""
    node, index, op = use.node, use.index, use.node.op_type
    if node.domain not in ("", "ai.onnx"):
        return None, f"input {index} of custom-domain op {node.domain}.{op} ({use.node_label})"
    if op in _QUANT_OPS:
        return None, f"already quantized (input {index} of {op} {use.node_label})"
    if (op, index) in _BIAS_SLOTS:
        return None, f"bias of {op} (input {index}): not a weight input"
    if op in _NORM_OPS:
        return None, f"normalization parameter of {op} (input {index})"
    if op == "Gemm" and index in (0, 1):
        trans = _attr(node, "transB" if index == 1 else "transA", 0)
        axis = (1 - trans) if index == 1 else trans  # output channels: columns of B, rows of A
        return axis, ""
    if op == "MatMul" and index in (0, 1):
        return (-1 if index == 1 else -2), ""
    if op == "Einsum":
        return 0, ""
    if op == "Gather" and index == 0:
        if len(node.input) > 1 and node.input[1] in constants:
            return None, f"data of Gather {use.node_label} with constant indices (a lookup table, not an embedding)"
        return 0, ""
    slots = WEIGHT_INPUTS.get(op, {})
    if index in slots:
        return slots[index], ""
    return None, f"input {index} of {op} ({use.node_label}): not a weight input"


def find_weights(model: onnx.ModelProto, settings_for=None) -> Discovery:
    """Find shareable weights.

    Args:
        model: the model (external data loaded).
        settings_for: callable ``(name, op_type) -> TensorSettings`` (onnxws.config); None means defaults.

    Returns:
        Discovery with the shareable weights (graph order) and every skipped float tensor with its reason.
    """
    if settings_for is None:
        from onnxws.config import TensorSettings

        default = TensorSettings()
        settings_for = lambda name, op_type: default  # noqa: E731
    tensors = constant_tensors(model)
    uses = _uses(model)
    in_subgraphs = _subgraph_uses(model)
    graph_outputs = {out.name for out in model.graph.output}
    discovery = Discovery()
    order = _graph_order(model, tensors)
    for name in order:
        proto, source = tensors[name]
        shape = tuple(int(d) for d in proto.dims)
        params = int(np.prod(shape)) if shape else 1
        dtype = _FLOAT_TYPES.get(proto.data_type)
        if dtype is None:
            if params >= 16:  # small int tensors (shapes, axes) are not worth a line each
                type_name = onnx.TensorProto.DataType.Name(proto.data_type)
                discovery.skipped.append(Skipped(name, f"{type_name} tensor: only float weights are shared",
                                                 shape=shape, dtype=type_name.lower(), params=params))
            continue

        def skip(reason: str, op_type: str = "") -> None:
            discovery.skipped.append(Skipped(name, reason, op_type, shape, dtype, params))

        if name in graph_outputs:
            skip("is a graph output")
            continue
        if name in in_subgraphs:
            skip("used inside a subgraph (If/Loop/Scan body): not shared")
            continue
        finals = list(_final_uses(name, uses, set(tensors)))
        if not finals:
            if params >= 16:
                skip("not used by any node")
            continue
        reasons = [item for item in finals if isinstance(item, str)]
        weight_uses: list[tuple[_Use, int]] = []
        for item in finals:
            if isinstance(item, _Use):
                axis, why = _classify_use(item, set(tensors))
                if axis is None:
                    reasons.append(why)
                else:
                    weight_uses.append((item, axis))
        if not weight_uses:
            # Report the first reason; small non-weight float tensors (scales, epsilons) stay quiet.
            if params >= 16 or any("bias" in r or "normalization" in r for r in reasons):
                skip(reasons[0], finals[0].node.op_type if isinstance(finals[0], _Use) else "")
            continue
        op_type = weight_uses[0][0].node.op_type
        if reasons:
            skip(f"also used as a non-weight input ({reasons[0]})", op_type)
            continue
        settings = settings_for(name, op_type)
        if settings.skip:
            skip(f"excluded by config ({settings.source})", op_type)
            continue
        if dtype == "bfloat16":
            skip("bfloat16 weight: ORT CPU has no bfloat16 kernels for its consumer ops; not shared", op_type)
            continue
        if dtype == "float64":
            skip("float64 weight: codebooks are float32/float16 only; not shared", op_type)
            continue
        if params < settings.min_params:
            skip(f"{params} elements < min_params {settings.min_params}", op_type)
            continue
        try:
            values = numpy_helper.to_array(proto)
        except (ValueError, TypeError) as exc:  # dims that do not match the data: the model's fault
            raise InputError(f"tensor {name!r}: its data does not match its declared shape {list(shape)} "
                             f"({type(exc).__name__}: {one_line(exc)}); re-export the model") from exc
        if not np.all(np.isfinite(values)):
            bad = int(np.count_nonzero(~np.isfinite(values)))
            skip(f"holds {bad} NaN/Inf value(s): not clustered", op_type)
            continue
        consumers = tuple(dict.fromkeys(use.node_label for use, _ in weight_uses))
        ndim = max(len(shape), 1)
        axis = weight_uses[0][1] % ndim
        if any(use.node.op_type in PASS_THROUGH for use, _ in weight_uses) or _passes_through(name, uses):
            axis = 0  # the layout changed on the way: per-channel groups along the stored tensor's first axis
        discovery.weights.append(WeightInfo(name, op_type, consumers, shape, dtype, params, source, axis))
    return discovery


def _passes_through(name: str, uses: dict[str, list[_Use]]) -> bool:
    return any(use.node.op_type in PASS_THROUGH for use in uses.get(name, []))


def _graph_order(model: onnx.ModelProto, tensors: dict) -> list[str]:
    """Constant tensor names in the order the graph first reads them (then the unused ones)."""
    seen: dict[str, None] = {}
    for node in model.graph.node:
        for name in node.input:
            if name in tensors:
                seen.setdefault(name)
    for name in tensors:
        seen.setdefault(name)
    return list(seen)

