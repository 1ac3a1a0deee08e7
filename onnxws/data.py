"""Evaluation data: load it, check it against the model's inputs, slice the search subset.

Data is one array per model input, named as the input (a single-input model may use ``x``),
plus optional integer labels ``y``, optional integer group ids ``group`` (one per sample: samples
of one group, e.g. the views of one photograph, are not independent; intervals and the held-out
split then count groups, not samples) and any extra arrays a custom metric wants (string
labels, ids, ...). Every array holds the samples along axis 0. Checks are strict and
happen once, here: a wrong dtype or a wrong fixed dimension is an error naming both
values, never a silent cast.
"""

from __future__ import annotations

import hashlib
import logging
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from onnxws.errors import InputError

logger = logging.getLogger(__name__)

LABELS = "y"
"""Name of the integer label array (class index per sample)."""
ALIAS = "x"
"""Name a single-input model's data may use instead of the input's name."""
GROUP = "group"
"""Name of the integer group-id array (one id per sample)."""
HOLDOUT_AUTO = 0.2
"""Held-out fraction of ``holdout_split(data, None)`` on a set large enough for it ..."""
HOLDOUT_MIN_SAMPLES = 1000
"""... at least this many samples ..."""
HOLDOUT_MIN_GROUPS = 10
"""... and, when grouped, at least this many groups (else nothing is held out)."""
DEFAULT_BATCH = 1000
"""Largest default batch (samples per run)."""
BATCH_INPUT_BYTES = 16 * 2**20
"""Default batches hold at most this many bytes of input (ImageNet fp32: 27 images), so memory stays bounded."""

Batch = tuple[dict[str, np.ndarray], int]
"""One run's feeds and its number of real samples (the rest is padding of a fixed batch)."""


@dataclass
class EvalData:
    """Evaluation samples, checked against a model.

    Attributes:
        arrays: every array, samples along axis 0: the model inputs by name, plus extras
            (``y`` labels, string labels, ...).
        input_names: the model's graph inputs (non-initializer), in graph order.
        n: number of samples (length of axis 0 of every array).
        dropped: samples of the data as given that were left out because a float input of
            theirs holds NaN or infinite values (``load_data``).
    """

    arrays: dict[str, np.ndarray]
    input_names: list[str]
    n: int
    dropped: int = 0
    _fingerprint: str | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def labels(self) -> np.ndarray | None:
        """Integer labels ``[n]``, or None when the data has none."""
        return self.arrays.get(LABELS)

    @property
    def groups(self) -> np.ndarray | None:
        """Integer group ids ``[n]``, or None (every sample independent; also when a model input
        is named ``group``: that array feeds the model)."""
        return None if GROUP in self.input_names else self.arrays.get(GROUP)

    def take(self, indices: np.ndarray) -> EvalData:
        """The samples at ``indices`` (in that order), every array indexed."""
        return EvalData({k: v[indices] for k, v in self.arrays.items()}, list(self.input_names), len(indices))

    def tail(self, n: int) -> EvalData:
        """The last ``n`` samples (n >= 1), every array sliced."""
        if n < 1:
            raise ValueError(f"tail(n) needs n >= 1, got {n}")
        return self if n >= self.n else EvalData({k: v[self.n - n:] for k, v in self.arrays.items()},
                                                 list(self.input_names), n)

    def head(self, n: int) -> EvalData:
        """The first ``n`` samples (fixed, unshuffled; clipped to ``self.n``), every array sliced."""
        if n < 1:
            raise ValueError(f"head(n) needs n >= 1, got {n}")
        if n >= self.n:
            return self
        return EvalData({k: v[:n] for k, v in self.arrays.items()}, list(self.input_names), n)

    def feeds(self) -> dict[str, np.ndarray]:
        """The model inputs only, by input name (what ``InferenceSession.run`` takes)."""
        return {name: self.arrays[name] for name in self.input_names}

    def fingerprint(self) -> str:
        """Stable SHA-256 (hex) of every array's name, dtype, shape and bytes (order-independent)."""
        if self._fingerprint is None:
            digest = hashlib.sha256(b"onnxws-data-v1")
            for name in sorted(self.arrays):
                arr = self.arrays[name]
                digest.update(f"\0{name}\0{arr.dtype.str}\0{arr.shape}\0".encode())
                if arr.dtype.kind == "O":  # object arrays (strings from a dict) have no stable buffer
                    digest.update(repr(arr.tolist()).encode())
                else:
                    digest.update(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
            self._fingerprint = digest.hexdigest()
        return self._fingerprint


def model_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs that are not initializers (what the data must feed), in graph order."""
    initializers = {t.name for t in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in initializers]


def load_data(
    source: str | Path | Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]],
    model: onnx.ModelProto,
) -> EvalData:
    """Load evaluation data and check it against ``model``'s inputs.

    Args:
        source: an ``.npz`` path; a dict of arrays; or an iterable of such dicts (batches,
            concatenated along axis 0). A single-input model may name its array ``x``.
        model: the model the data feeds.

    Returns:
        The checked data. Arrays are used as given (no copy, no cast) except when batches
        are concatenated.

    Raises:
        InputError: unreadable file; a missing input; a dtype other than the input's; a rank
            or fixed dimension that differs from the model's; arrays of unequal length; no
            samples; labels ``y`` that are not 1-D integers; every sample with NaN or infinite
            inputs (some such samples are left out, with a warning: ``EvalData.dropped``).
    """
    if isinstance(source, (str, Path)):
        arrays = _read_npz(Path(source))
        origin = str(source)
    elif isinstance(source, Mapping):
        arrays = {str(k): np.asarray(v) for k, v in source.items()}
        origin = "data"
    elif isinstance(source, Iterable) and not isinstance(source, (bytes, bytearray)):
        arrays = _concat_batches(source)
        origin = "data batches"
    else:
        raise InputError(f"evaluation data of type {type(source).__name__} is not supported: pass an .npz path, a dict of arrays or an iterable of batch dicts")
    return _check(arrays, model, origin)


def find_sidecar_data(model_path: str | Path) -> Path:
    """The evaluation data beside a model: ``<stem>.npz``, else ``eval.npz`` in the same folder.

    Raises:
        InputError: neither exists; the message says what to pass.
    """
    model_path = Path(model_path)
    for candidate in (model_path.with_suffix(".npz"), model_path.parent / "eval.npz"):
        if candidate.is_file():
            logger.info("using evaluation data %s found beside the model", candidate)
            return candidate
    raise InputError(
        f"no evaluation data for {model_path}: neither {model_path.with_suffix('.npz').name} nor eval.npz is beside it; "
        "pass --data PATH (an .npz with one array per model input, plus optional integer labels y)"
    )


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        raise InputError(f"evaluation data file not found: {path}")
    if path.is_dir():
        raise InputError(f"evaluation data path is a directory, expected an .npz file: {path}")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise InputError(f"{path} is a single .npy array; expected an .npz with one array per model input (np.savez(path, input=..., y=...))")
        with loaded as npz:
            _check_fits_in_memory(path, npz)
            return {name: npz[name] for name in npz.files}
    except ValueError as exc:
        if "Object arrays" in str(exc):
            raise InputError(f"{path} holds object arrays, which need pickle; store strings as unicode arrays (np.array(labels, dtype=str))") from exc
        raise InputError(f"{path} is not an .npz archive ({exc}); write it with numpy.savez") from exc
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(f"{path} could not be read as .npz ({type(exc).__name__}: {exc}); write it with numpy.savez") from exc


def npz_bytes(npz: np.lib.npyio.NpzFile) -> int:
    """Bytes the arrays of an open ``.npz`` take once loaded, read from their headers (nothing loaded)."""
    total = 0
    for name in npz.files:
        with npz.zip.open(name + ".npy" if name + ".npy" in npz.zip.namelist() else name) as member:
            version = np.lib.format.read_magic(member)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)  # 2.0 and 3.0 share the layout
            shape, _, dtype = read_header(member)  # the header only
        total += int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    return total


def proc_kib_field(path: str, field: str) -> int | None:
    """Bytes of a ``FIELD:  N kB`` line of a Linux /proc file (``/proc/meminfo``, ``/proc/self/status``),
    or None when the file or the field is not there."""
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``), or None when unknown."""
    return proc_kib_field("/proc/meminfo", "MemAvailable")


def _check_fits_in_memory(path: Path, npz: np.lib.npyio.NpzFile) -> None:
    """Refuse, before loading it, an ``.npz`` whose arrays would not fit in the memory available."""
    need, have = npz_bytes(npz), available_memory()
    if have is not None and need > have:
        raise InputError(f"{path} expands to {need / 2**30:.1f} GiB of arrays, more than the {have / 2**30:.1f} GiB "
                         "of memory available; write fewer samples (the whole set is loaded once)")


def _concat_batches(batches: Iterable[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {}
    keys: list[str] | None = None
    for i, batch in enumerate(batches):
        if not isinstance(batch, Mapping):
            raise InputError(f"data batch {i} is a {type(batch).__name__}; every batch must be a dict of arrays")
        names = sorted(str(k) for k in batch)
        if keys is None:
            keys = names
            parts = {k: [] for k in keys}
        elif names != keys:
            raise InputError(f"data batch {i} has arrays {names} but batch 0 has {keys}; every batch needs the same arrays")
        for k, v in batch.items():
            arr = np.asarray(v)
            if arr.ndim == 0:
                raise InputError(f"data batch {i}: array {k!r} is 0-d; every array needs the samples along axis 0")
            parts[str(k)].append(arr)
    if keys is None:
        raise InputError("the iterable of data batches is empty: need at least one sample")
    out: dict[str, np.ndarray] = {}
    for k, arrs in parts.items():
        try:
            out[k] = np.concatenate(arrs, axis=0)
        except ValueError as exc:
            shapes = sorted({a.shape[1:] for a in arrs})
            raise InputError(f"data batches disagree on array {k!r}: per-sample shapes {shapes}; every batch must have the same shape after axis 0") from exc
    return out


def _dims(vi: onnx.ValueInfoProto) -> list[int | str | None] | None:
    """Dims of an input: int for fixed, str for symbolic, None for unknown; None if no shape."""
    tensor = vi.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]


def _shape_text(dims: list[int | str | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _check(arrays: dict[str, np.ndarray], model: onnx.ModelProto, origin: str) -> EvalData:
    inputs = model_inputs(model)
    names = [vi.name for vi in inputs]
    if not inputs:
        raise InputError("the model has no graph inputs to feed: nothing to evaluate")
    if len(inputs) == 1 and names[0] not in arrays and ALIAS in arrays:
        arrays = dict(arrays)
        arrays[names[0]] = arrays.pop(ALIAS)
    missing = [n for n in names if n not in arrays]
    if missing:
        hint = " (a single-input model may also use 'x')" if len(inputs) == 1 else ""
        raise InputError(
            f"{origin} has no array for model input(s) {missing}; found {sorted(arrays)}; "
            f"name one array after each model input{hint}"
        )
    for k, v in arrays.items():
        if v.ndim == 0:
            raise InputError(f"{origin}: array {k!r} is 0-d; every array needs the samples along axis 0")
    lengths = {k: int(v.shape[0]) for k, v in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise InputError(f"{origin}: arrays differ in length along axis 0 {lengths}; every array needs one entry per sample")
    n = lengths[names[0]]
    if n < 1:
        raise InputError(f"{origin} holds no samples (axis 0 has length 0); need at least one")
    for vi in inputs:
        arr = arrays[vi.name]
        if not vi.type.HasField("tensor_type"):
            raise InputError(f"model input {vi.name!r} is not a tensor ({vi.type.WhichOneof('value')}); only tensor inputs are supported")
        elem = vi.type.tensor_type.elem_type
        _check_dtype(vi.name, arr, elem)
        dims = _dims(vi)
        if dims is None:
            continue
        if arr.ndim != len(dims):
            raise InputError(
                f"input {vi.name!r}: data has shape {arr.shape} (rank {arr.ndim}) but the model expects rank {len(dims)} "
                f"{_shape_text(dims)}; reshape the data to the model's input layout"
            )
        for axis in range(1, len(dims)):  # axis 0 is the sample axis: a fixed batch is run in chunks
            d = dims[axis]
            if isinstance(d, int) and d > 0 and arr.shape[axis] != d:
                raise InputError(
                    f"input {vi.name!r}: data has shape {arr.shape} but the model expects {_shape_text(dims)} "
                    f"(axis {axis} must be {d}, got {arr.shape[axis]}); resize the data to the model's input size"
                )
    for key, what, hint in ((LABELS, "labels 'y' must be a 1-D integer array of class indices",
                             " (one-hot labels: use y.argmax(axis=1))"),
                            (GROUP, "group ids 'group' must be a 1-D integer array, one id per sample", "")):
        ids = arrays.get(key)
        if ids is not None and key not in names and (ids.ndim != 1 or ids.dtype.kind not in "iu"):
            raise InputError(f"{origin}: {what}, length {n}; got shape {ids.shape} dtype {ids.dtype}{hint}")
    arrays, dropped = _finite_samples(arrays, [vi.name for vi in inputs], n, origin)
    logger.debug("evaluation data: %d samples, arrays %s", n - dropped, {k: (v.dtype.str, v.shape) for k, v in arrays.items()})
    return EvalData(arrays, names, n - dropped, dropped)


def _finite_samples(arrays: dict[str, np.ndarray], names: list[str], n: int, origin: str,
                    chunk: int = 1024) -> tuple[dict[str, np.ndarray], int]:
    """``arrays`` without the samples whose float inputs hold NaN or infinite values (a model's
    answer to them means nothing, and they would poison the input moments), and how many those were.

    Raises:
        InputError: every sample has such values.
    """
    bad = np.zeros(n, dtype=bool)
    for name in names:
        arr = arrays[name]
        if arr.dtype.kind != "f":
            continue
        for start in range(0, n, chunk):  # bounded temporary memory on large sets
            part = arr[start:start + chunk].reshape(min(chunk, n - start), -1)
            bad[start:start + chunk] |= ~np.isfinite(part).all(axis=1)
    dropped = int(bad.sum())
    if dropped == n:
        raise InputError(f"{origin}: all {n} samples have NaN or infinite values in their float inputs: nothing to "
                         "evaluate; check how the data was written")
    if dropped:
        logger.warning("%s: %d of %d samples have NaN or infinite input values and are left out of the evaluation",
                       origin, dropped, n)
        keep = ~bad
        arrays = {k: v[keep] for k, v in arrays.items()}
    return arrays, dropped


def _check_dtype(name: str, arr: np.ndarray, elem: int) -> None:
    type_name = onnx.TensorProto.DataType.Name(elem)
    if elem == onnx.TensorProto.STRING:
        if arr.dtype.kind not in "UO":
            raise InputError(f"input {name!r}: data dtype {arr.dtype} but the model expects strings (ONNX STRING); pass a unicode array")
        return
    try:
        expected = np.dtype(helper.tensor_dtype_to_np_dtype(elem))
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"input {name!r} has ONNX type {type_name}, which onnxws cannot feed from numpy") from exc
    if arr.dtype != expected:
        raise InputError(
            f"input {name!r}: data dtype {arr.dtype} but the model expects {expected} (ONNX {type_name}); "
            f"convert it when writing the data (e.g. array.astype(np.{expected}))"
        )


def holdout_split(data: EvalData, fraction: float | None) -> tuple[EvalData, int]:
    """``data`` ordered so that its last ``n_holdout`` samples are the held-out ones, and ``n_holdout``.

    ``fraction`` None is the default: HOLDOUT_AUTO of a set of at least HOLDOUT_MIN_SAMPLES
    samples (and HOLDOUT_MIN_GROUPS groups), else 0. Without groups the held-out samples are the
    last ones (the order is unchanged); with groups, whole groups are held out (the last groups
    by first appearance, at least ``fraction`` of the samples), the rest keeping their order.
    """
    groups = data.groups
    n_groups = data.n if groups is None else len(np.unique(groups))
    if fraction is None:
        big = data.n >= HOLDOUT_MIN_SAMPLES and n_groups >= HOLDOUT_MIN_GROUPS
        fraction = HOLDOUT_AUTO if big else 0.0
    wanted = int(round(fraction * data.n))
    if wanted < 1:
        return data, 0
    if groups is None:
        return data, min(wanted, data.n - 1)
    _, first = np.unique(groups, return_index=True)
    held: list = []
    size = 0
    counts = dict(zip(*np.unique(groups, return_counts=True)))
    for gid in groups[np.sort(first)][::-1]:  # the last groups first
        if size >= wanted or len(held) + 1 >= n_groups:
            break
        held.append(gid)
        size += int(counts[gid])
    if not held:
        return data, 0
    out = np.isin(groups, held)
    order = np.concatenate([np.flatnonzero(~out), np.flatnonzero(out)])
    return data.take(order), int(out.sum())


# --------------------------------------------------------------------------------------------
# Batching: how the samples are split into runs




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


def join_outputs(parts: Sequence[Sequence[np.ndarray]], rows: Sequence[int]) -> list[np.ndarray]:
    """Outputs of consecutive sample sets (``rows[i]`` samples in ``parts[i]``) joined along axis 0;
    an output without a sample axis is taken from the first part."""
    joined = []
    for i, first in enumerate(parts[0]):
        pieces = [np.asarray(part[i]) for part in parts]
        per_sample = all(p.ndim and p.shape[0] == r for p, r in zip(pieces, rows))
        joined.append(np.concatenate(pieces, axis=0) if per_sample else np.asarray(first))
    return joined
