"""Load stage: read an ONNX file (external data included) with clear errors, write one atomically;
``load_stage`` gathers what a run starts from (model, data, metric, shareable tensors).

Models over 2 GB are never serialised in one piece (onnxws.proto explains why): the checker, the
hash and the writer work on a *light copy* whose large tensor payloads are replaced by
external-data references, reading the payloads one tensor at a time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError, EncodeError
from onnx import TensorProto

from onnxws.config import CompressConfig
from onnxws.data import EvalData, find_sidecar_data, holdout_split, load_data
from onnxws.discovery import Discovery, constant_tensors, find_weights
from onnxws.errors import InputError, NothingToShareError, one_line
from onnxws.metrics import Metric, resolve_metric
from onnxws.proto import (
    PLACEHOLDER,
    SWAP_MIN_BYTES,
    fits_in_one_message,
    light_copy,
    message_bytes,
    payload_bytes,
    set_external,
    swap_raw,
)

logger = logging.getLogger(__name__)

# External data: payloads of at least ALIGN_MIN_BYTES start at multiples of ALIGN (ORT can memory-map them).
ALIGN = 1 << 16
ALIGN_MIN_BYTES = 1 << 20


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
    except onnx.checker.ValidationError as exc:  # e.g. external data pointing outside the model's folder
        raise InputError(f"{path} is refused by onnx: {one_line(exc)}") from exc
    except (OSError, ValueError, RuntimeError, TypeError, UnicodeDecodeError, IndexError, KeyError) as exc:
        raise InputError(f"{path} could not be read as ONNX: {type(exc).__name__}: {one_line(exc)}") from exc
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
        check_light(model)
    except onnx.checker.ValidationError as exc:
        raise InputError(f"{origin} fails the ONNX checker: {one_line(exc)}") from exc
    except Exception as exc:  # noqa: BLE001 - the checker raises assorted C++ errors on garbage
        raise InputError(f"{origin} fails the ONNX checker: {type(exc).__name__}: {one_line(exc)}") from exc


def check_light(model: onnx.ModelProto) -> None:
    """``onnx.checker`` by path on a light copy of ``model`` (``check_light_by_path``)."""
    light, swapped = light_copy(model, lambda tensor, field: tensor.data_location == TensorProto.EXTERNAL
                                 or payload_bytes(tensor) >= SWAP_MIN_BYTES)
    for source, target in swapped:
        set_external(target, PLACEHOLDER, 0, payload_bytes(source))
    check_light_by_path(light)


def check_light_by_path(light: onnx.ModelProto, *, full_check: bool = False) -> None:
    """``onnx.checker`` by path on a light model, whose payload-free tensors name the external
    file ``PLACEHOLDER``: that file is an empty one in a temporary folder beside it."""
    with tempfile.TemporaryDirectory(prefix="onnxws-check-") as folder:
        (Path(folder) / PLACEHOLDER).touch()
        path = Path(folder) / "model.onnx"
        path.write_bytes(light.SerializeToString())
        onnx.checker.check_model(str(path), full_check=full_check)


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
    light, swapped = light_copy(model, swap_raw(SWAP_MIN_BYTES))
    for source, target in swapped:
        set_external(target, PLACEHOLDER, 0, payload_bytes(source))
    digest = hashlib.sha256(light.SerializeToString(deterministic=True))
    for source, _ in swapped:
        digest.update(source.raw_data)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Writing


@dataclass
class StagedModel:
    """A model written to temporary files beside its destination, not yet in place.

    Attributes:
        path: where the model goes.
        files: (temporary file, final path) pairs, the external-data file (if any) first.
        size: bytes of the model file plus its external data.
    """

    path: Path
    files: list[tuple[Path, Path]]
    size: int

    def discard(self) -> None:
        """Remove the temporary files (idempotent)."""
        for tmp, _ in self.files:
            if tmp.exists():
                tmp.unlink()


def stage_model(model: onnx.ModelProto, path: str | Path) -> StagedModel:
    """Write ``model`` into temporary files in ``path``'s folder (which must exist); nothing is replaced yet.

    Models over the protobuf limit get their initializers of >= 1 KiB in ``<name>.data``
    beside the file (payloads of >= 1 MiB at 64 KiB-aligned offsets), streamed one tensor at a
    time; ``model`` is not modified. File modes follow the umask.

    Raises:
        InputError: the write failed (disk full, no permission), or the model is over the limit
            even with its initializers external.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
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
    staged = StagedModel(path, ([(tmp_data, folder / data_name)] if external else []) + [(tmp_model, path)], 0)
    try:
        if external:
            payload = _write_external(model, tmp_data, data_name, path)
        with open(tmp_model, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        staged.size = sum(tmp.stat().st_size for tmp, _ in staged.files)
    except OSError as exc:
        staged.discard()
        raise InputError(f"could not write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        staged.discard()
        raise
    return staged


def save_model_atomic(model: onnx.ModelProto, path: str | Path, *, force: bool = False) -> int:
    """Write ``model`` to ``path`` atomically (``stage_model``, then a rename per file).

    Returns the bytes written (model + external data).

    Raises:
        InputError: the output exists and ``force`` is False, the folder is missing or not
            writable, or the write failed.
    """
    path = Path(path)
    if path.exists() and not force:
        raise InputError(f"output {path} exists; pass --force to overwrite it or -o to choose another path")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"output folder does not exist: {folder}")
    if not os.access(folder, os.W_OK):
        raise InputError(f"output folder is not writable: {folder}")
    staged = stage_model(model, path)
    try:
        for tmp, final in staged.files:
            os.replace(tmp, final)
    except OSError as exc:
        raise InputError(f"could not write {path}: {exc.strerror or exc}") from exc
    finally:
        staged.discard()
    return staged.size


def _write_external(model: onnx.ModelProto, data_path: Path, data_name: str, path: Path) -> bytes:
    """Stream the large initializers of ``model`` into ``data_path``; return the light model's bytes
    (its tensors reference ``data_name``, the data file's final name)."""
    light, swapped = light_copy(model, swap_raw(SWAP_MIN_BYTES, frozenset({"initializer"})))
    with open(data_path, "wb") as handle:
        for source, target in swapped:
            data = source.raw_data  # one tensor's bytes at a time
            offset = handle.tell()
            if len(data) >= ALIGN_MIN_BYTES and offset % ALIGN:
                handle.write(b"\0" * (ALIGN - offset % ALIGN))
                offset = handle.tell()
            handle.write(data)
            set_external(target, data_name, offset, len(data))
            del data
        handle.flush()
        os.fsync(handle.fileno())
    logger.info("%s: %d initializers (%d bytes) written to %s", path, len(swapped), data_path.stat().st_size, data_name)
    try:
        return light.SerializeToString(deterministic=True)
    except EncodeError as exc:
        raise InputError(f"{path}: the model is over protobuf's 2 GB limit even with its initializers in {data_name} "
                         "(large Constant nodes or a huge graph); move large constants into initializers") from exc


# --------------------------------------------------------------------------------------------
# What a run starts from


@dataclass
class Loaded:
    """The load stage's result: the checked model (a copy), its data and metric, its shareable tensors.

    Attributes:
        proto: the model; the pipeline replaces it by its payload-free shell once the scorer
            holds the weights.
        model_path, data_path: the files they came from (None for in-memory inputs).
        bytes_before: the model file's bytes with its external data (or the proto's size).
        model_sha256: hash of the model as loaded (``model_sha256``).
        data: every sample, the ``n_holdout`` held-out ones last (``data.holdout_split``).
        data_fingerprint: ``EvalData.fingerprint`` of the data as checked (before that reordering).
        data_dropped: samples left out for NaN or infinite inputs (``EvalData.dropped``).
    """

    proto: onnx.ModelProto
    model_path: Path | None
    data_path: str | None
    bytes_before: int
    model_sha256: str
    data: EvalData
    metric: Metric
    discovery: Discovery
    n_holdout: int = 0
    data_fingerprint: str = ""
    data_dropped: int = 0


def load_stage(model: str | Path | onnx.ModelProto,
               data: str | Path | Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]] | None,
               config: CompressConfig) -> Loaded:
    """Load and check the model (a path or a ModelProto, never modified) and its evaluation data
    (None: the sidecar ``<stem>.npz`` / ``eval.npz`` beside a model path), resolve the metric, and
    find the shareable tensors.

    Raises:
        InputError: bad model, data or config patterns. NothingToShareError: no shareable tensor.
    """
    model_path: Path | None = None
    if isinstance(model, (str, Path)):
        model_path = Path(model)
        proto = load_model(model_path)
        bytes_before = model_file_bytes(model_path)
    elif isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        check_model(proto)
        bytes_before = message_bytes(proto)  # ByteSize() raises over 2 GB
    else:
        raise InputError(f"model must be a path or onnx.ModelProto, got {type(model).__name__}")
    if data is None:
        if model_path is None:
            raise InputError("no evaluation data: pass data= (a .npz path, a dict of arrays or an iterable of batches)")
        data = find_sidecar_data(model_path)
    data_path = str(data) if isinstance(data, (str, Path)) else None
    eval_data = load_data(data, proto)
    metric = resolve_metric(config.metric, eval_data, proto, config.output, timeout=config.metric_timeout)
    tensors = constant_tensors(proto)
    op_types = {node.op_type for node in proto.graph.node}
    config.check_patterns(list(tensors), op_types)
    del tensors  # sub-messages of proto: they would keep its memory alive once proto is replaced
    discovery = find_weights(proto, config.settings_for)
    if not discovery.weights:
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in discovery.skipped[:3]) or "no float constant tensors"
        raise NothingToShareError(f"the model has no shareable weight tensor ({reasons})")
    fingerprint = eval_data.fingerprint()
    dropped = eval_data.dropped
    eval_data, n_holdout = holdout_split(eval_data, config.holdout)
    return Loaded(proto, model_path, data_path, bytes_before, model_sha256(proto), eval_data, metric, discovery, n_holdout,
                  fingerprint, dropped)


def model_file_bytes(path: Path) -> int:
    """Bytes of the model file plus its external data files (read from the file's references,
    since a loaded proto has its external data inlined)."""
    size = path.stat().st_size
    seen = set()
    shallow = onnx.load(str(path), load_external_data=False)
    for tensor in onnx.external_data_helper._get_all_tensors(shallow):  # noqa: SLF001
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value not in seen:
                seen.add(entry.value)
                data_file = path.parent / entry.value
                if data_file.exists():
                    size += data_file.stat().st_size
    return size
