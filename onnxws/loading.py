"""Load stage: read an ONNX file (external data included) with clear errors, write one atomically.

Models over 2 GB: protobuf cannot serialise a message over 2 GiB, and with the upb backend even
``ModelProto.ByteSize()`` raises ``EncodeError`` on one (measured with protobuf 7.36: it encodes
the whole message to find its size, so it also costs a full copy's time and memory below the
limit). Such a model is therefore never serialised in one piece here: ``fits_in_one_message``
estimates the size from the tensors' shapes, and the checker, the hash and the writer work on a
*light copy* whose large tensor payloads are replaced by external-data references, reading the
payloads one tensor at a time.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError, EncodeError
from onnx import TensorProto

from onnxws.errors import InputError

logger = logging.getLogger(__name__)

# Protobuf cannot serialise one message over 2 GiB: above this, weights go to an external data file.
# The 64 MiB margin is for everything that is not a tensor payload (nodes, names, shapes).
_PROTO_LIMIT = 2**31 - 1 - 64 * 2**20
# Tensors with at least this many payload bytes are moved out of light copies (and saved as external data).
_SWAP_MIN_BYTES = 1024
# External data: payloads of at least _ALIGN_MIN_BYTES start at multiples of _ALIGN (ORT can memory-map them).
_ALIGN = 1 << 16
_ALIGN_MIN_BYTES = 1 << 20
# without_payloads: smaller tensors keep their data (headers without data must never reach a checker or ORT
# unswapped; encoding swaps out every initializer of >= 1 KiB before it converts or runs a model).
_DROP_MIN_BYTES = 1 << 20
_PLACEHOLDER = "onnxws-placeholder"  # location of payload-free tensors in light copies (an empty file, or none)
# TensorProto fields that hold a tensor's values; with where they live, its payload.
DATA_FIELDS = ("raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")
_PAYLOAD_FIELDS = frozenset({*DATA_FIELDS, "external_data", "data_location"})
# Message types that can hold tensors (directly or nested); others are copied whole.
_TENSOR_HOLDERS = frozenset({"ModelProto", "GraphProto", "NodeProto", "AttributeProto", "FunctionProto",
                             "TrainingInfoProto", "SparseTensorProto", "TensorProto"})
_SUB_BYTE_BITS = {getattr(TensorProto, name): bits for name, bits in
                  (("UINT4", 4), ("INT4", 4), ("FLOAT4E2M1", 4), ("UINT2", 2), ("INT2", 2)) if hasattr(TensorProto, name)}


def load_model(path: str | Path) -> onnx.ModelProto:
    """Load an ONNX model with its external data and check it.

    Raises:
        InputError: missing file, a directory, not ONNX, truncated/corrupt protobuf, missing
            external data, or a model that fails the ONNX checker.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"model file not found: {path}")
    if path.is_dir():
        raise InputError(f"model path is a directory, expected an .onnx file: {path}")
    if path.stat().st_size == 0:
        raise InputError(f"model file is empty: {path}")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except DecodeError as exc:
        raise InputError(f"{path} is not a valid ONNX file (protobuf decode failed: {exc}); is it truncated or corrupt?") from exc
    except FileNotFoundError as exc:
        raise InputError(f"{path}: external data file missing ({exc.filename}); keep the .onnx file beside its data file") from exc
    except (OSError, ValueError, RuntimeError, TypeError, UnicodeDecodeError, IndexError, KeyError) as exc:
        raise InputError(f"{path} could not be read as ONNX: {type(exc).__name__}: {_one_line(exc)}") from exc
    if not model.graph.node and not model.graph.initializer:
        raise InputError(f"{path} holds no ONNX graph (no nodes, no initializers): is it really an .onnx model file?")
    check_model(model, path)
    return model


def check_model(model: onnx.ModelProto, origin: str | Path = "model") -> None:
    """Run the ONNX checker; raise InputError with its first line if the model is invalid.

    A model too large for one protobuf message is checked as a light copy whose large tensors
    point to an empty external file: the checker sees every node, attribute, type and tensor
    header, not the payload bytes.
    """
    try:
        if fits_in_one_message(model):
            try:
                onnx.checker.check_model(model)
                return
            except EncodeError:  # the estimate missed (a huge graph, not huge tensors): check it light
                pass
        _check_light(model)
    except onnx.checker.ValidationError as exc:
        raise InputError(f"{origin} fails the ONNX checker: {_one_line(exc)}") from exc
    except Exception as exc:  # noqa: BLE001 - the checker raises assorted C++ errors on garbage
        raise InputError(f"{origin} fails the ONNX checker: {type(exc).__name__}: {_one_line(exc)}") from exc


def _check_light(model: onnx.ModelProto) -> None:
    """``onnx.checker`` by path on a light copy of ``model`` (``check_light_by_path``)."""
    light, swapped = _light_copy(model, lambda tensor, field: tensor.data_location == TensorProto.EXTERNAL
                                 or payload_bytes(tensor) >= _SWAP_MIN_BYTES)
    for source, target in swapped:
        _set_external(target, _PLACEHOLDER, 0, payload_bytes(source))
    check_light_by_path(light)


def check_light_by_path(light: onnx.ModelProto, *, full_check: bool = False) -> None:
    """``onnx.checker`` by path on a light model, whose payload-free tensors name the external
    file ``_PLACEHOLDER``: that file is an empty one in a temporary folder beside it."""
    with tempfile.TemporaryDirectory(prefix="onnxws-check-") as folder:
        (Path(folder) / _PLACEHOLDER).touch()
        path = Path(folder) / "model.onnx"
        path.write_bytes(light.SerializeToString())
        onnx.checker.check_model(str(path), full_check=full_check)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + ("..." if len(text) > 300 else "")


# --------------------------------------------------------------------------------------------
# Sizes and light copies (no payload is copied or serialised)


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
    if tensor.data_type in _SUB_BYTE_BITS:
        return -(-n * _SUB_BYTE_BITS[tensor.data_type] // 8)
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):  # an unknown type: measure what is there
        return len(tensor.raw_data) if tensor.HasField("raw_data") else 0
    return n * itemsize


def _tensors(message) -> Iterator[TensorProto]:
    """Every TensorProto held anywhere in ``message`` (initializers, attributes, subgraphs, functions)."""
    for field, value in message.ListFields():
        kind = field.message_type.name if field.message_type is not None else None
        if kind not in _TENSOR_HOLDERS:
            continue
        for item in (value if _is_repeated(field) else [value]):
            if kind == "TensorProto":
                yield item
            else:
                yield from _tensors(item)


def fits_in_one_message(model: onnx.ModelProto) -> bool:
    """Whether ``model`` can be serialised as one protobuf message (tensor payloads under _PROTO_LIMIT).

    Estimated from the tensors' shapes, without serialising: ``ModelProto.ByteSize()`` raises on
    models over 2 GiB (upb backend) and costs a full encode below it.
    """
    total = 0
    for tensor in _tensors(model):
        total += payload_bytes(tensor) if tensor.data_location != TensorProto.EXTERNAL else 0
        if total >= _PROTO_LIMIT:
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
    light, swapped = _light_copy(model, _swap_raw(_SWAP_MIN_BYTES))
    payloads = sum(payload_bytes(source) for source, _ in swapped)
    headers = sum(1 + _varint_bytes(payload_bytes(source)) for source, _ in swapped)  # raw_data tag + length
    return light.ByteSize() + payloads + headers


def without_payloads(model: onnx.ModelProto, arrays: Mapping[str, np.ndarray], *, min_bytes: int | None = None
                     ) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` whose main-graph initializers named in ``arrays`` of at least ``min_bytes``
    keep only their header (no data field at all), where the array holds exactly their ``raw_data`` bytes.

    Lets a caller that already holds the weights as arrays (the scorer) drop the model's own copy:
    ``with_payloads`` puts the identical bytes back. Tensors stored otherwise (typed fields,
    external, strings) or whose bytes differ are copied whole. The payloads are compared one
    tensor at a time.

    Args:
        min_bytes: smallest payload dropped (default ``_DROP_MIN_BYTES``, 1 MiB; never below 1 KiB:
            encoding swaps out initializers from 1 KiB before it runs a converter or ORT on a model).

    Returns:
        (copy, names of the initializers left without payload).
    """
    min_bytes = _DROP_MIN_BYTES if min_bytes is None else min_bytes
    light = graph_shell(model)
    dropped = []
    for tensor in model.graph.initializer:
        array = arrays.get(tensor.name)
        if array is not None and array.nbytes >= min_bytes and _same_raw(tensor, array):
            _copy_tensor_header(tensor, light.graph.initializer.add())
            dropped.append(tensor.name)
        else:
            light.graph.initializer.append(tensor)
    return light, dropped


def _same_raw(tensor: TensorProto, array: np.ndarray) -> bool:
    if tensor.data_location == TensorProto.EXTERNAL or not tensor.HasField("raw_data") or tensor.data_type in _SUB_BYTE_BITS:
        return False
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
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


def _varint_bytes(n: int) -> int:
    return max(1, -(-n.bit_length() // 7))


def _is_repeated(field) -> bool:
    flag = getattr(field, "is_repeated", None)  # protobuf >= 5; FieldDescriptor.label is gone in 7
    return bool(flag) if flag is not None else field.label == field.LABEL_REPEATED


def _light_copy(model: onnx.ModelProto, swap: Callable[[TensorProto, str], bool]
                ) -> tuple[onnx.ModelProto, list[tuple[TensorProto, TensorProto]]]:
    """A copy of ``model`` in which the tensors chosen by ``swap(tensor, field_name)`` have no payload.

    Those tensors keep their name, type, shape, doc string and metadata; the caller points them
    somewhere with ``_set_external``. No payload is copied, so the copy is small and quick.

    Returns:
        (light model, [(original tensor, its payload-free copy), ...] in model order).
    """
    light = onnx.ModelProto()
    swapped: list[tuple[TensorProto, TensorProto]] = []
    _copy_light(model, light, swap, swapped)
    return light, swapped


def _copy_light(source, target, swap, swapped) -> None:
    for field, value in source.ListFields():
        kind = field.message_type.name if field.message_type is not None else None
        repeated = _is_repeated(field)
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
                _copy_tensor_header(src, dst)
                swapped.append((src, dst))
            else:
                dst.CopyFrom(src)


def _copy_tensor_header(source: TensorProto, target: TensorProto) -> None:
    """Every field of ``source`` but its data (the payload is never read)."""
    for field in source.DESCRIPTOR.fields:
        if field.name in _PAYLOAD_FIELDS:
            continue
        if _is_repeated(field):
            values = getattr(source, field.name)
            if len(values):
                getattr(target, field.name).extend(values)
        elif source.HasField(field.name):
            if field.message_type is not None:
                getattr(target, field.name).CopyFrom(getattr(source, field.name))
            else:
                setattr(target, field.name, getattr(source, field.name))


def graph_shell(model: onnx.ModelProto, skip: frozenset[str] = frozenset({"initializer"})) -> onnx.ModelProto:
    """A new model with every field of ``model`` and of its main graph except the graph fields
    named in ``skip`` (filled by the caller), built field by field: a whole copy with those
    fields cleared afterwards would keep their memory alive (upb frees a message as a whole)."""
    shell = onnx.ModelProto()
    _copy_fields(model, shell, skip=frozenset({"graph"}))
    _copy_fields(model.graph, shell.graph, skip=skip)
    return shell


def _copy_fields(source, target, skip: frozenset[str] = frozenset()) -> None:
    """Copy every set field of protobuf message ``source`` into ``target``, except those named in ``skip``."""
    for field, value in source.ListFields():
        if field.name in skip:
            continue
        if _is_repeated(field):
            getattr(target, field.name).extend(value)
        elif field.message_type is not None:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def _set_external(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _swap_raw(min_bytes: int, fields: frozenset[str] | None = None) -> Callable[[TensorProto, str], bool]:
    """Swap predicate: in-memory ``raw_data`` tensors of at least ``min_bytes`` (in ``fields`` if given)."""
    def swap(tensor: TensorProto, field: str) -> bool:
        return ((fields is None or field in fields) and tensor.data_location != TensorProto.EXTERNAL
                and tensor.HasField("raw_data") and payload_bytes(tensor) >= min_bytes)
    return swap


# --------------------------------------------------------------------------------------------
# Hashes


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (streamed)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_sha256(model: onnx.ModelProto) -> str:
    """SHA-256 of the model's deterministic serialisation.

    A model over the protobuf limit has no single serialisation: its hash is that of a light
    copy (large ``raw_data`` tensors replaced by references ``location=onnxws-placeholder,
    offset=0, length=<bytes>``) followed by those tensors' raw bytes in model order, one
    tensor in memory at a time.
    """
    if fits_in_one_message(model):
        try:
            return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()
        except EncodeError:
            pass
    light, swapped = _light_copy(model, _swap_raw(_SWAP_MIN_BYTES))
    for source, target in swapped:
        _set_external(target, _PLACEHOLDER, 0, payload_bytes(source))
    digest = hashlib.sha256(light.SerializeToString(deterministic=True))
    for source, _ in swapped:
        digest.update(source.raw_data)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Writing


def save_model_atomic(model: onnx.ModelProto, path: str | Path, *, force: bool = False) -> int:
    """Write ``model`` to ``path`` atomically (temp file in the same folder, then rename).

    Models over the protobuf limit get their initializers of >= 1 KiB in ``<name>.data``
    beside the file (payloads of >= 1 MiB at 64 KiB-aligned offsets), also written atomically,
    streamed one tensor at a time; ``model`` is not modified. Returns the bytes written (model
    + external data).

    Raises:
        InputError: the output exists and ``force`` is False, the folder is not writable, or
            the model is over the limit even with its initializers external.
    """
    path = Path(path)
    if path.exists() and not force:
        raise InputError(f"output {path} exists; pass --force to overwrite it or -o to choose another path")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"output folder does not exist: {folder}")
    if not os.access(folder, os.W_OK):
        raise InputError(f"output folder is not writable: {folder}")
    payload = None
    if fits_in_one_message(model):
        try:
            payload = model.SerializeToString(deterministic=True)
        except EncodeError:  # the estimate missed: write the weights externally
            payload = None
    external = payload is None
    data_name = path.name + ".data"
    tmp_model = folder / f".{path.name}.{os.getpid()}.tmp"
    tmp_data = folder / f".{data_name}.{os.getpid()}.tmp"
    try:
        if external:
            payload = _write_external(model, tmp_data, data_name, path)
        with open(tmp_model, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        if external:
            os.replace(tmp_data, folder / data_name)
        os.replace(tmp_model, path)
    except OSError as exc:
        raise InputError(f"could not write {path}: {exc.strerror or exc}") from exc
    finally:
        for leftover in (tmp_model, tmp_data):
            if leftover.exists():
                leftover.unlink()
    size = path.stat().st_size
    if external:
        size += (folder / data_name).stat().st_size
    return size


def _write_external(model: onnx.ModelProto, data_path: Path, data_name: str, path: Path) -> bytes:
    """Stream the large initializers of ``model`` into ``data_path``; return the light model's bytes
    (its tensors reference ``data_name``, the data file's final name)."""
    light, swapped = _light_copy(model, _swap_raw(_SWAP_MIN_BYTES, frozenset({"initializer"})))
    with open(data_path, "wb") as handle:
        for source, target in swapped:
            data = source.raw_data  # one tensor's bytes at a time
            offset = handle.tell()
            if len(data) >= _ALIGN_MIN_BYTES and offset % _ALIGN:
                handle.write(b"\0" * (_ALIGN - offset % _ALIGN))
                offset = handle.tell()
            handle.write(data)
            _set_external(target, data_name, offset, len(data))
            del data
        handle.flush()
        os.fsync(handle.fileno())
    logger.info("%s: %d initializers (%d bytes) written to %s", path, len(swapped), data_path.stat().st_size, data_name)
    try:
        return light.SerializeToString(deterministic=True)
    except EncodeError as exc:
        raise InputError(f"{path}: the model is over protobuf's 2 GB limit even with its initializers in {data_name} "
                         "(large Constant nodes or a huge graph); move large constants into initializers") from exc
