"""Load stage: read an ONNX file (external data included) with clear errors, write one atomically."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from onnxws.errors import InputError

logger = logging.getLogger(__name__)

# Protobuf cannot serialise one message over 2 GiB: above this, weights go to an external data file.
_PROTO_LIMIT = 2**31 - 1 - 64 * 2**20


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
    """Run the ONNX checker; raise InputError with its first line if the model is invalid."""
    try:
        if model.ByteSize() < _PROTO_LIMIT:
            onnx.checker.check_model(model)
        else:  # the in-memory checker refuses > 2 GB protos; shape checks of the nodes still run per graph
            onnx.checker.check_graph(model.graph, _checker_context(model))
    except onnx.checker.ValidationError as exc:
        raise InputError(f"{origin} fails the ONNX checker: {_one_line(exc)}") from exc
    except Exception as exc:  # noqa: BLE001 - the checker raises assorted C++ errors on garbage
        raise InputError(f"{origin} fails the ONNX checker: {type(exc).__name__}: {_one_line(exc)}") from exc


def _checker_context(model: onnx.ModelProto) -> onnx.checker.C.CheckerContext:
    ctx = onnx.checker.C.CheckerContext()
    ctx.ir_version = model.ir_version
    ctx.opset_imports = {op.domain: op.version for op in model.opset_import}
    return ctx


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (streamed)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_sha256(model: onnx.ModelProto) -> str:
    """SHA-256 of the model's deterministic serialisation."""
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def save_model_atomic(model: onnx.ModelProto, path: str | Path, *, force: bool = False) -> int:
    """Write ``model`` to ``path`` atomically (temp file in the same folder, then rename).

    Models over the protobuf limit get their large tensors in ``<name>.data`` beside the
    file, also written atomically. Returns the bytes written (model + external data).

    Raises:
        InputError: the output exists and ``force`` is False, or the folder is not writable.
    """
    path = Path(path)
    if path.exists() and not force:
        raise InputError(f"output {path} exists; pass --force to overwrite it or -o to choose another path")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"output folder does not exist: {folder}")
    if not os.access(folder, os.W_OK):
        raise InputError(f"output folder is not writable: {folder}")
    external = model.ByteSize() >= _PROTO_LIMIT
    data_name = path.name + ".data"
    tmp_model = folder / f".{path.name}.{os.getpid()}.tmp"
    tmp_data = folder / f".{data_name}.{os.getpid()}.tmp"
    try:
        if external:
            # convert_model_to_external_data mutates; write a copy so the caller's model stays whole.
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            onnx.external_data_helper.convert_model_to_external_data(
                copy, all_tensors_to_one_file=True, location=tmp_data.name, size_threshold=1024
            )
            onnx.external_data_helper.write_external_data_tensors(copy, str(folder))
            # The data file name recorded in the model must be the final one.
            for tensor in onnx.external_data_helper._get_all_tensors(copy):  # noqa: SLF001
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = data_name
            payload = copy.SerializeToString(deterministic=True)
        else:
            payload = model.SerializeToString(deterministic=True)
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
