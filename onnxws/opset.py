"""Opset raising for the emit stage: ``onnx.version_converter`` on a light copy, kept only when
ONNX Runtime gives the same outputs on random inputs.

The converter runs on a copy whose large initializers are external-data placeholders (no 2 GB
limit, no weight copies; ORT gets them through ``add_external_initializers``). Only the converted
nodes and new constants are kept; what the converter drops is put back from the original
(functions, node metadata, initializer doc strings, unused value_info, graph metadata). Model-local
functions follow the new opset only when none of their ops changed in between (the converter does
not convert function bodies).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from onnxws.errors import one_line
from onnxws.loading import check_light_by_path
from onnxws.proto import (
    PLACEHOLDER,
    copy_tensor_header,
    graph_shell,
    min_ir_version,
    nested_nodes,
    payload_bytes,
    set_external,
    with_payloads,
)
from onnxws.runtime import create_session, ortvalue

logger = logging.getLogger(__name__)

_LIGHT_MIN_BYTES = 1024  # larger initializers are swapped out while converting; shapes, axes, pads stay inline for the adapters
_VERIFY_RTOL, _VERIFY_ATOL = 1e-5, 1e-6


def _placeholder_copy(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, TensorProto]]:
    """A copy whose large main-graph initializers point to placeholder external data.

    The version converter and ORT then never copy (or choke on > 2 GB of) weight payloads;
    ORT gets the real values through ``add_external_initializers``.

    Returns:
        (light model, {name: original TensorProto} of the swapped-out initializers).
    """
    light = graph_shell(model)
    swapped: dict[str, TensorProto] = {}
    for original in model.graph.initializer:
        nbytes = payload_bytes(original)
        if (original.data_location == TensorProto.EXTERNAL or original.data_type == TensorProto.STRING
                or nbytes < _LIGHT_MIN_BYTES):
            light.graph.initializer.append(original)
            continue
        swapped[original.name] = original
        tensor = light.graph.initializer.add()
        copy_tensor_header(original, tensor)
        set_external(tensor, PLACEHOLDER, 0, nbytes)
    return light, swapped


def _random_feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """One random batch for the graph inputs (dynamic dims -> 2); raises ValueError if not tensors."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        if not vi.type.HasField("tensor_type"):
            raise ValueError(f"input {vi.name!r} is not a tensor")
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 2 for d in tt.shape.dim]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        if dtype.kind == "f" or dtype.kind == "V":
            feeds[vi.name] = rng.normal(size=shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[vi.name] = rng.integers(0, 2, size=shape).astype(bool)
        elif dtype.kind in "iu":
            feeds[vi.name] = rng.integers(0, 8, size=shape).astype(dtype)
        else:
            raise ValueError(f"input {vi.name!r} has type {dtype}, which onnxws cannot make random values for")
    return feeds


def _run_light(light: onnx.ModelProto, swapped: dict[str, TensorProto], arrays: dict[str, np.ndarray],
               feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    values = {n: ortvalue(arrays[n]) for n in swapped if n in arrays}
    session = create_session(light, optimization="default", external=values)
    return session.run(None, feeds)


def _compare(before: list[np.ndarray], after: list[np.ndarray]) -> tuple[bool, str]:
    """(same within rtol/atol, detail): detail is "" for bitwise-equal outputs, else the difference."""
    worst = 0.0
    for a, b in zip(before, after, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.dtype != b.dtype:
            return False, f"output shape/type changed ({a.dtype}{list(a.shape)} -> {b.dtype}{list(b.shape)})"
        if a.dtype.kind not in "fc" or a.size == 0:
            if not np.array_equal(a, b):
                return False, "integer/boolean outputs differ"
            continue
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        finite = np.isfinite(diff)
        if not np.array_equal(np.isnan(a), np.isnan(b)) or not np.allclose(a, b, rtol=_VERIFY_RTOL, atol=_VERIFY_ATOL, equal_nan=True):
            return False, f"outputs differ by up to {float(np.max(diff, where=finite, initial=0.0)):.3g}"
        worst = max(worst, float(np.max(diff, where=finite, initial=0.0)))
    return True, "" if worst == 0 else f"max |diff| {worst:.3g}"


def _node_key(node: onnx.NodeProto) -> tuple:
    return node.op_type, node.domain, tuple(node.output)


def _restore_node_fields(original: onnx.GraphProto, converted: onnx.GraphProto) -> None:
    """Put back node doc strings / metadata and subgraph fields the converter drops (matched by outputs)."""
    by_key = {_node_key(n): n for n in original.node}
    for node in converted.node:
        source = by_key.get(_node_key(node))
        if source is None:
            continue
        if source.doc_string and not node.doc_string:
            node.doc_string = source.doc_string
        if len(source.metadata_props) and not len(node.metadata_props):
            node.metadata_props.extend(source.metadata_props)
        source_attrs = {a.name: a for a in source.attribute}
        for attr in node.attribute:
            src = source_attrs.get(attr.name)
            if src is None or src.type != attr.type:
                continue
            if attr.type == AttributeProto.GRAPH:
                _restore_graph_fields(src.g, attr.g)
            elif attr.type == AttributeProto.GRAPHS and len(src.graphs) == len(attr.graphs):
                for s, c in zip(src.graphs, attr.graphs):
                    _restore_graph_fields(s, c)


def _restore_graph_fields(original: onnx.GraphProto, converted: onnx.GraphProto) -> None:
    """Graph-level fields of a subgraph (value_info, metadata, doc) plus its nodes'."""
    del converted.value_info[:]
    converted.value_info.extend(original.value_info)
    del converted.metadata_props[:]
    converted.metadata_props.extend(original.metadata_props)
    converted.doc_string = original.doc_string
    if len(original.sparse_initializer) and not len(converted.sparse_initializer):
        converted.sparse_initializer.extend(original.sparse_initializer)
    _restore_node_fields(original, converted)


def _merge_conversion(light: onnx.ModelProto, converted: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """``light`` with the converter's nodes and opset; everything the converter drops is kept from ``light``."""
    merged = onnx.ModelProto()
    merged.CopyFrom(light)
    graph = merged.graph
    del graph.node[:]
    graph.node.extend(converted.graph.node)
    _restore_node_fields(light.graph, graph)
    # Initializers: keep the originals (doc strings, metadata, placeholders); take what the converter
    # added or changed.
    position = {t.name: i for i, t in enumerate(graph.initializer)}
    for tensor in converted.graph.initializer:
        i = position.get(tensor.name)
        if i is None:
            graph.initializer.append(tensor)
        else:
            kept = graph.initializer[i]
            same = (kept.data_type == tensor.data_type and list(kept.dims) == list(tensor.dims)
                    and kept.data_location == tensor.data_location
                    and numpy_helper.to_array(kept).tobytes() == numpy_helper.to_array(tensor).tobytes()
                    if kept.data_location != TensorProto.EXTERNAL
                    else list(kept.external_data) == list(tensor.external_data))
            if not same:
                graph.initializer[i].CopyFrom(tensor)
    for op in merged.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = target
    merged.ir_version = max(merged.ir_version, min_ir_version(target))
    return merged


def _bump_functions(model: onnx.ModelProto, target: int) -> str | None:
    """Move model-local functions to the ``target`` ai.onnx opset (in place) when none of their ops
    changed between their opset and ``target``; else return why they cannot follow (the converter
    does not convert function bodies)."""
    for function in model.functions:
        for op in function.opset_import:
            if op.domain not in ("", "ai.onnx") or op.version == target:
                continue
            changed = []
            for node in nested_nodes(function.node):
                if node.domain not in ("", "ai.onnx"):
                    continue
                try:
                    old = onnx.defs.get_schema(node.op_type, op.version, "").since_version
                    new = onnx.defs.get_schema(node.op_type, target, "").since_version
                except Exception:  # noqa: BLE001 - unknown op
                    old, new = -1, -2
                if old != new:
                    changed.append(node.op_type)
            if changed:
                return (f"function {function.domain}:{function.name} uses ops that changed between opset {op.version} "
                        f"and {target} ({', '.join(sorted(set(changed)))}); the converter does not convert functions")
            op.version = target
    return None


def _restore_payloads(light: onnx.ModelProto, swapped: dict[str, TensorProto],
                      keep_light: frozenset[str] = frozenset(),
                      values: Mapping[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """Swap the real tensors back in for the placeholders (in place), except those named in
    ``keep_light`` (weights about to be replaced: copying their payloads would only fill memory);
    returns ``light``."""
    for tensor in light.graph.initializer:
        if tensor.name in keep_light:
            continue
        original = swapped.get(tensor.name)
        if original is not None and tensor.data_location == TensorProto.EXTERNAL and any(
            e.key == "location" and e.value == PLACEHOLDER for e in tensor.external_data
        ):
            tensor.CopyFrom(original)
            with_payloads(tensor, values or {})  # the original itself may be a header (proto.without_payloads)
    return light


class OpsetRaiser:
    """Raises a model's default-domain opset with the version converter, checked in ORT.

    The original model's outputs on one random batch are computed once and reused for every
    target tried.
    """

    def __init__(self, model: onnx.ModelProto, values: Mapping[str, np.ndarray] | None = None,
                 keep_light: frozenset[str] = frozenset()) -> None:
        self.model = model
        self.values = values or {}
        self.keep_light = keep_light
        self.light, self.swapped = _placeholder_copy(model)
        self._arrays: dict[str, np.ndarray] | None = None
        self._feeds: dict[str, np.ndarray] | None = None
        self._reference: list[np.ndarray] | None = None

    def _prepare_reference(self) -> None:
        if self._reference is None:
            self._feeds = _random_feeds(self.model)
            self._arrays = {n: self._value(n, t) for n, t in self.swapped.items()}
            self._reference = _run_light(self.light, self.swapped, self._arrays, self._feeds)

    def _value(self, name: str, tensor: TensorProto) -> np.ndarray:
        """The tensor's values: the caller's array when it matches the tensor, else decoded (a copy)."""
        given = self.values.get(name)
        if (given is not None and given.shape == tuple(tensor.dims) and given.flags.c_contiguous
                and given.dtype == helper.tensor_dtype_to_np_dtype(tensor.data_type)):
            return given
        return np.ascontiguousarray(numpy_helper.to_array(tensor))

    def convert(self, target: int) -> tuple[onnx.ModelProto | None, str]:
        """(converted model, how it was verified) or (None, why it is not safe)."""
        from onnx import version_converter

        try:
            converted = version_converter.convert_version(self.light, target)
        except Exception as exc:  # noqa: BLE001 - the converter raises assorted C++ errors
            return None, f"onnx.version_converter failed: {one_line(exc, 160)}"
        merged = _merge_conversion(self.light, converted, target)
        why = _bump_functions(merged, target)
        if why is not None:
            return None, why
        try:
            check_light_by_path(merged, full_check=True)
        except Exception as exc:  # noqa: BLE001
            return None, f"the converted model fails onnx.checker: {one_line(exc, 160)}"
        try:
            self._prepare_reference()
        except Exception as exc:  # noqa: BLE001
            return None, f"the original model could not be run in ORT on random inputs to verify it: {one_line(exc, 160)}"
        try:
            after = _run_light(merged, self.swapped, self._arrays or {}, self._feeds or {})
        except Exception as exc:  # noqa: BLE001
            return None, f"ORT could not run the converted model: {one_line(exc, 160)}"
        same, detail = _compare(self._reference or [], after)
        if not same:
            return None, f"the converted model's {detail} on random inputs"
        how = "outputs verified equal in ORT on random inputs"
        if detail:
            how += f" (within rtol {_VERIFY_RTOL:g}, atol {_VERIFY_ATOL:g}: {detail})"
        return _restore_payloads(merged, self.swapped, self.keep_light, self.values), how
