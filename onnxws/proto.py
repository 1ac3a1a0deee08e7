"""ONNX protobuf plumbing shared by every stage: payload sizes, tensor headers, light copies,
graph walks and opset helpers. Nothing here runs a model.

Models over 2 GB: protobuf cannot serialise a message over 2 GiB, and with the upb backend even
``ModelProto.ByteSize()`` raises ``EncodeError`` on one (measured with protobuf 7.36: it encodes
the whole message to find its size, so it also costs a full copy's time and memory below the
limit). Such a model is therefore never serialised in one piece: ``fits_in_one_message``
estimates the size from the tensors' shapes, and the checker, the hash and the writer work on a
*light copy* whose large tensor payloads are replaced by external-data references.

Copies are built field by field: a whole copy with fields cleared afterwards would keep their
memory alive, because upb frees a message's memory only with the whole message (measured: a
512 MB initializer, CopyFrom then ClearField: +512 MB RSS).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np
import onnx
from google.protobuf.message import EncodeError
from onnx import AttributeProto, TensorProto, helper

# Protobuf cannot serialise one message over 2 GiB: above this, weights go to an external data file.
# The 64 MiB margin is for everything that is not a tensor payload (nodes, names, shapes).
PROTO_LIMIT = 2**31 - 1 - 64 * 2**20
#: Location of payload-free tensors in light copies (an empty file, or none).
PLACEHOLDER = "onnxws-placeholder"
#: Tensors with at least this many payload bytes are moved out of light copies (and saved as external data).
SWAP_MIN_BYTES = 1024
#: ``without_payloads`` drops payloads from this size (never below 1 KiB: see there).
DROP_MIN_BYTES = 1 << 20
#: TensorProto fields that hold a tensor's values; with where they live, its payload.
DATA_FIELDS = ("raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")
_PAYLOAD_FIELDS = frozenset({*DATA_FIELDS, "external_data", "data_location"})
# Message types that can hold tensors (directly or nested); others are copied whole.
_TENSOR_HOLDERS = frozenset({"ModelProto", "GraphProto", "NodeProto", "AttributeProto", "FunctionProto",
                             "TrainingInfoProto", "SparseTensorProto", "TensorProto"})
#: Bits per element of the sub-byte ONNX types this onnx knows (packed two or four to a byte).
SUB_BYTE_BITS = {getattr(TensorProto, name): bits for name, bits in
                 (("UINT4", 4), ("INT4", 4), ("FLOAT4E2M1", 4), ("UINT2", 2), ("INT2", 2)) if hasattr(TensorProto, name)}


# --------------------------------------------------------------------------------------------
# Sizes (no payload is read)


def payload_bytes(tensor: TensorProto) -> int:
    """Bytes of a tensor's data, from its shape and type (the payload is not read).

    External tensors count their recorded length; sub-byte types (UINT4, INT2, ...) their
    packed size; strings their total length.
    """
    if tensor.data_location == TensorProto.EXTERNAL:
        for entry in tensor.external_data:
            if entry.key == "length":
                return int(entry.value)
        return 0
    if tensor.data_type == TensorProto.STRING:
        return sum(len(s) for s in tensor.string_data)
    n = math.prod(tensor.dims)
    if tensor.data_type in SUB_BYTE_BITS:
        return -(-n * SUB_BYTE_BITS[tensor.data_type] // 8)
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):  # an unknown type: measure what is there
        return len(tensor.raw_data) if tensor.HasField("raw_data") else 0
    return n * itemsize


def _attribute_bytes(attr: AttributeProto) -> int:
    if attr.type == AttributeProto.TENSOR:
        return payload_bytes(attr.t)
    if attr.type == AttributeProto.SPARSE_TENSOR:
        return payload_bytes(attr.sparse_tensor.values) + payload_bytes(attr.sparse_tensor.indices)
    if attr.type == AttributeProto.FLOAT:
        return 4
    if attr.type == AttributeProto.FLOATS:
        return 4 * len(attr.floats)
    if attr.type == AttributeProto.INT:
        return 8
    if attr.type == AttributeProto.INTS:
        return 8 * len(attr.ints)
    if attr.type == AttributeProto.STRING:
        return len(attr.s)
    if attr.type == AttributeProto.STRINGS:
        return sum(len(s) for s in attr.strings)
    return 0


def model_weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all initializer, sparse-initializer and ``Constant`` tensor payloads of the model.

    Counts the main graph, nested subgraphs (If/Loop/Scan bodies) and function bodies; sub-byte
    types (UINT4, UINT2, ...) at their packed size, external tensors at their length.
    """
    total = 0
    node_lists = [g.node for g in graphs(model.graph)]
    for g in graphs(model.graph):
        total += sum(payload_bytes(t) for t in g.initializer)
        total += sum(payload_bytes(s.values) + payload_bytes(s.indices) for s in g.sparse_initializer)
    for function in model.functions:
        node_lists.append(function.node)
    for nodes in node_lists:
        for node in nodes:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                total += sum(_attribute_bytes(a) for a in node.attribute)
    return total


def tensors(message) -> Iterator[TensorProto]:
    """Every TensorProto held anywhere in ``message`` (initializers, attributes, subgraphs, functions)."""
    for field, value in message.ListFields():
        kind = field.message_type.name if field.message_type is not None else None
        if kind not in _TENSOR_HOLDERS:
            continue
        for item in (value if is_repeated(field) else [value]):
            if kind == "TensorProto":
                yield item
            else:
                yield from tensors(item)


def fits_in_one_message(model: onnx.ModelProto) -> bool:
    """Whether ``model`` can be serialised as one protobuf message (tensor payloads under PROTO_LIMIT).

    Estimated from the tensors' shapes, without serialising: ``ModelProto.ByteSize()`` raises on
    models over 2 GiB (upb backend) and costs a full encode below it.
    """
    total = 0
    for tensor in tensors(model):
        total += payload_bytes(tensor) if tensor.data_location != TensorProto.EXTERNAL else 0
        if total >= PROTO_LIMIT:
            return False
    return True


def message_bytes(model: onnx.ModelProto) -> int:
    """Bytes of ``model``'s serialisation, without ``ByteSize()`` on a model over the protobuf limit.

    Over the limit it is the size of a light copy plus its swapped-out payloads and their field
    headers: exact up to the length prefixes of the enclosing messages (a few bytes).
    """
    if fits_in_one_message(model):
        try:
            return model.ByteSize()
        except EncodeError:
            pass
    light, swapped = light_copy(model, swap_raw(SWAP_MIN_BYTES))
    payloads = sum(payload_bytes(source) for source, _ in swapped)
    headers = sum(1 + _varint_bytes(payload_bytes(source)) for source, _ in swapped)  # raw_data tag + length
    return light.ByteSize() + payloads + headers


def _varint_bytes(n: int) -> int:
    return max(1, -(-n.bit_length() // 7))


def is_repeated(field) -> bool:
    """Whether a protobuf field descriptor is a repeated field (protobuf 4 to 7)."""
    flag = getattr(field, "is_repeated", None)  # protobuf >= 5; FieldDescriptor.label is gone in 7
    return bool(flag) if flag is not None else field.label == field.LABEL_REPEATED


# --------------------------------------------------------------------------------------------
# Tensor headers, shells and light copies (no payload is copied)


def copy_tensor_header(source: TensorProto, target: TensorProto) -> None:
    """Every field of ``source`` but its data (the payload is never read)."""
    for field in source.DESCRIPTOR.fields:
        if field.name in _PAYLOAD_FIELDS:
            continue
        if is_repeated(field):
            values = getattr(source, field.name)
            if len(values):
                getattr(target, field.name).extend(values)
        elif source.HasField(field.name):
            if field.message_type is not None:
                getattr(target, field.name).CopyFrom(getattr(source, field.name))
            else:
                setattr(target, field.name, getattr(source, field.name))


def set_external(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    """Point ``tensor`` at ``length`` bytes of external data at ``offset`` in ``location`` (in place)."""
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def copy_fields(source, target, skip: Iterable[str] = ()) -> None:
    """Copy every set field of protobuf message ``source`` into ``target``, except those named in ``skip``."""
    skip = frozenset(skip)
    for field, value in source.ListFields():
        if field.name in skip:
            continue
        if is_repeated(field):
            getattr(target, field.name).extend(value)
        elif field.message_type is not None:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def graph_shell(model: onnx.ModelProto, skip: frozenset[str] = frozenset({"initializer"})) -> onnx.ModelProto:
    """A new model with every field of ``model`` and of its main graph except the graph fields
    named in ``skip`` (filled by the caller), built field by field."""
    shell = onnx.ModelProto()
    copy_fields(model, shell, skip={"graph"})
    copy_fields(model.graph, shell.graph, skip=skip)
    return shell


SwapFn = Callable[[TensorProto, str], bool]


def light_copy(model: onnx.ModelProto, swap: SwapFn) -> tuple[onnx.ModelProto, list[tuple[TensorProto, TensorProto]]]:
    """A copy of ``model`` in which the tensors chosen by ``swap(tensor, field_name)`` have no payload.

    Those tensors keep their name, type, shape, doc string and metadata; the caller points them
    somewhere with ``set_external``. No payload is copied, so the copy is small and quick.

    Returns:
        (light model, [(original tensor, its payload-free copy), ...] in model order).
    """
    light = onnx.ModelProto()
    swapped: list[tuple[TensorProto, TensorProto]] = []
    _copy_light(model, light, swap, swapped)
    return light, swapped


def _copy_light(source, target, swap: SwapFn, swapped: list) -> None:
    for field, value in source.ListFields():
        kind = field.message_type.name if field.message_type is not None else None
        repeated = is_repeated(field)
        if kind not in _TENSOR_HOLDERS:
            if repeated:
                getattr(target, field.name).extend(value)
            elif kind is None:
                setattr(target, field.name, value)
            else:
                getattr(target, field.name).CopyFrom(value)
            continue
        pairs = ([(item, getattr(target, field.name).add()) for item in value] if repeated
                 else [(value, getattr(target, field.name))])
        for src, dst in pairs:
            dst.SetInParent()
            if kind != "TensorProto":
                _copy_light(src, dst, swap, swapped)
            elif swap(src, field.name):
                copy_tensor_header(src, dst)
                swapped.append((src, dst))
            else:
                dst.CopyFrom(src)


def swap_raw(min_bytes: int, fields: frozenset[str] | None = None) -> SwapFn:
    """Swap predicate: in-memory ``raw_data`` tensors of at least ``min_bytes`` (in ``fields`` if given)."""
    def swap(tensor: TensorProto, field: str) -> bool:
        return ((fields is None or field in fields) and tensor.data_location != TensorProto.EXTERNAL
                and tensor.HasField("raw_data") and payload_bytes(tensor) >= min_bytes)
    return swap


def without_payloads(model: onnx.ModelProto, arrays: Mapping[str, np.ndarray], *, min_bytes: int | None = None
                     ) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` whose main-graph initializers named in ``arrays`` of at least ``min_bytes``
    keep only their header (no data field at all), where the array holds exactly their ``raw_data`` bytes.

    Lets a caller that already holds the weights as arrays (the scorer) drop the model's own copy:
    ``with_payloads`` puts the identical bytes back. Tensors stored otherwise (typed fields,
    external, strings) or whose bytes differ are copied whole. The payloads are compared one
    tensor at a time. ``min_bytes`` (default DROP_MIN_BYTES, 1 MiB) must stay >= 1 KiB: encoding swaps out every
    initializer from 1 KiB before it runs a converter or ORT on a model, so smaller headers
    without data would reach them.

    Returns:
        (copy, names of the initializers left without payload).
    """
    min_bytes = DROP_MIN_BYTES if min_bytes is None else min_bytes
    light = graph_shell(model)
    dropped = []
    for tensor in model.graph.initializer:
        array = arrays.get(tensor.name)
        if array is not None and array.nbytes >= min_bytes and _same_raw(tensor, array):
            copy_tensor_header(tensor, light.graph.initializer.add())
            dropped.append(tensor.name)
        else:
            light.graph.initializer.append(tensor)
    return light, dropped


def _same_raw(tensor: TensorProto, array: np.ndarray) -> bool:
    if tensor.data_location == TensorProto.EXTERNAL or not tensor.HasField("raw_data") or tensor.data_type in SUB_BYTE_BITS:
        return False
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    except (KeyError, TypeError, ValueError):
        return False
    if array.dtype != dtype or tuple(array.shape) != tuple(tensor.dims) or dtype.byteorder == ">":
        return False
    raw = tensor.raw_data  # a copy of one tensor's bytes
    return len(raw) == array.nbytes and np.array_equal(np.frombuffer(raw, np.uint8), np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def lacks_payload(tensor: TensorProto) -> bool:
    """True for a tensor header left by ``without_payloads``: elements but no data field and not external."""
    if tensor.data_location == TensorProto.EXTERNAL or math.prod(tensor.dims) == 0:
        return False
    return not any(tensor.HasField(f) if f == "raw_data" else len(getattr(tensor, f)) for f in DATA_FIELDS)


def with_payloads(tensor: TensorProto, arrays: Mapping[str, np.ndarray]) -> None:
    """Put the bytes of ``arrays[tensor.name]`` back into a header left by ``without_payloads`` (in place)."""
    if lacks_payload(tensor) and tensor.name in arrays:
        tensor.raw_data = np.ascontiguousarray(arrays[tensor.name]).tobytes()


# --------------------------------------------------------------------------------------------
# Graph walks


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graphs held in ``node``'s attributes (If branches, Loop/Scan bodies), not nested further."""
    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == AttributeProto.GRAPHS:
            yield from attr.graphs


def graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph nested in its nodes' attributes, depth first."""
    yield graph
    for node in graph.node:
        for sub in subgraphs(node):
            yield from graphs(sub)


def nested_nodes(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.NodeProto]:
    """Every node of ``nodes`` and of the subgraphs nested in them, each node before its subgraphs' nodes."""
    for node in nodes:
        yield node
        for sub in subgraphs(node):
            yield from nested_nodes(sub.node)


def node_refs(node: onnx.NodeProto) -> list[str]:
    """Tensors a node reads: its inputs, plus outer-scope names used inside its subgraphs."""
    refs = [name for name in node.input if name]
    for sub in subgraphs(node):
        for inner in sub.node:
            refs.extend(node_refs(inner))
    return refs


# --------------------------------------------------------------------------------------------
# Opsets


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain (``ai.onnx``) opset version, 0 if it imports none."""
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return int(op.version)
    return 0


def min_ir_version(opset: int) -> int:
    """The lowest IR version that allows ai.onnx ``opset`` (0 when onnx does not know the opset)."""
    try:
        return int(helper.find_min_ir_version_for([helper.make_opsetid("", opset)], ignore_unknown=True))
    except Exception:  # noqa: BLE001 - an opset newer than onnx's table: keep the model's IR version
        return 0
