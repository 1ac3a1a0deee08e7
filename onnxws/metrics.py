"""Metrics: what a score is. Higher is better, one float per evaluation of the whole (sub)set.

Built in: top-1 accuracy against integer labels ``y``, and top-1 agreement with the
uncompressed model (when the data has no labels). Anything else is a user function
``package.module:function(outputs, data) -> float``.

Metric functions are small picklable callables (no closures), so a process pool or a Ray
actor can receive them when scoring is scaled out.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import math
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxws.data import LABELS, EvalData
from onnxws.errors import InputError, OnnxwsError

logger = logging.getLogger(__name__)

TOP1_ACCURACY = "top1_accuracy"
TOP1_AGREEMENT = "top1_agreement"
REFERENCE_PREFIX = "reference:"


def reference_key(output_name: str) -> str:
    """Key under which the scorer passes the uncompressed model's output ``output_name`` to a metric."""
    return REFERENCE_PREFIX + output_name


@dataclass(frozen=True)
class Metric:
    """A metric: ``fn(outputs, data) -> float``, higher is better.

    Attributes:
        name: ``top1_accuracy``, ``top1_agreement`` or ``module:function``.
        fn: called with the model outputs (each concatenated along the batch axis, in
            model-output order) and the data arrays of the evaluated (sub)set; when
            ``needs_reference``, ``data`` also holds the uncompressed model's outputs under
            ``reference_key(output_name)``.
        needs_reference: compares with the uncompressed model's outputs.
        output: the model output a built-in metric reads (None for custom metrics).
    """

    name: str
    fn: Callable[[list[np.ndarray], dict[str, np.ndarray]], float]
    needs_reference: bool = False
    output: str | None = None

    @property
    def per_sample(self) -> Callable[[list[np.ndarray], dict[str, np.ndarray]], np.ndarray] | None:
        """``outcomes(outputs, data)``: per-sample outcomes whose mean is the metric (built-in
        top-1 metrics), or None (a custom metric is one number per evaluation)."""
        return getattr(self.fn, "outcomes", None)

    def identity(self) -> str:
        """What the score cache keys on: name, output and, for custom metrics, a hash of the code."""
        code = getattr(self.fn, "code_hash", "")
        return f"{self.name}|{self.output or ''}|{code}"

    def data_for(self, arrays: Mapping[str, np.ndarray], output_names: Sequence[str],
                 reference: Sequence[np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """The data ``fn`` is called with: ``arrays`` plus, when the metric needs them, the
        uncompressed model's outputs (``reference``, in model-output order) under ``reference_key``.

        Raises:
            InputError: the metric needs reference outputs and none were given.
        """
        data = dict(arrays)
        if self.needs_reference:
            if reference is None:
                raise InputError(f"metric {self.name} compares with the uncompressed model: pass its outputs as reference")
            data.update({reference_key(n): r for n, r in zip(output_names, reference)})
        return data


def _as_logits(out: np.ndarray, output_name: str) -> np.ndarray:
    """Output ``[n, C]`` (singleton axes after the first squeezed away) for a top-1 metric."""
    arr = np.asarray(out)
    if arr.ndim >= 2:
        kept = [arr.shape[0]] + [d for d in arr.shape[1:] if d != 1]
        if len(kept) == 1:
            kept.append(1)
        arr = arr.reshape(kept)
    if arr.ndim != 2:
        raise InputError(
            f"output {output_name!r} has shape {tuple(out.shape)}; top-1 metrics need [samples, classes]: "
            "pick a classification output with --output or pass --metric module:function"
        )
    return arr


def _check_labels(labels: np.ndarray, width: int, output_name: str) -> None:
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= width:
        raise InputError(
            f"labels y span [{lo}, {hi}] but output {output_name!r} has {width} classes (expected 0..{width - 1}); "
            "check the labels or choose the classification output with --output"
        )


_SUM_CHUNK = 1 << 20  # elements squared per step of squared_sum


def squared_sum(a: np.ndarray, b: np.ndarray | None = None) -> float:
    """``sum((a - b)**2)`` (``sum(a**2)`` without ``b``) accumulated in float64, a chunk at a time.

    The difference is taken in the arrays' own precision (float32 at least; exact to rounding
    for outputs this close to each other), so no float64 copy of a whole output is made: on a
    250 x 40 x 6625 OCR output that copy was most of the cost of a divergence.
    """
    a = np.asarray(a).reshape(-1)
    b = None if b is None else np.asarray(b).reshape(-1)
    dtype = np.promote_types(a.dtype, np.float32)
    total = 0.0
    for start in range(0, a.size, _SUM_CHUNK):
        part = a[start:start + _SUM_CHUNK].astype(dtype, copy=False)
        if b is not None:
            part = part - b[start:start + _SUM_CHUNK].astype(dtype, copy=False)
        part = part.astype(np.float64)
        total += float(np.dot(part, part))
    return total


def output_divergence(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray],
                      energies: Sequence[float] | None = None) -> float:
    """How far the outputs moved from the reference outputs: a smooth measure of damage.

    The sum over outputs of the relative squared error ``sum((y - r)**2) / sum(r**2)`` for
    float outputs, and of the fraction of changed elements for the others (indices,
    strings). Unlike a top-1 metric on a few hundred samples it is not quantised, and the
    errors of independently perturbed layers add up in it (variances add), which is what
    the network stage's predictor relies on. ``energies``: ``sum(r**2)`` of each reference
    output when the caller keeps them (they do not change between candidates).
    """
    total = 0.0
    for i, (out, ref) in enumerate(zip(outputs, reference)):
        out, ref = np.asarray(out), np.asarray(ref)
        if out.shape != ref.shape:
            return math.inf
        if np.issubdtype(ref.dtype, np.floating):
            energy = energies[i] if energies is not None else squared_sum(ref)
            err = squared_sum(out, ref)
            total += err / energy if energy > 0 else (0.0 if err == 0 else math.inf)
        elif ref.size:
            total += float(np.mean(out != ref))
    return total if math.isfinite(total) else math.inf


@dataclass(frozen=True)
class _PerSample:
    """A metric that is the mean of per-sample outcomes (``outcomes``) read from output ``index``."""

    index: int
    output_name: str

    def __call__(self, outputs: list[np.ndarray], data: dict[str, np.ndarray]) -> float:
        return float(np.mean(self.outcomes(outputs, data)))

    def outcomes(self, outputs: list[np.ndarray], data: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError


class Top1Accuracy(_PerSample):
    """Fraction of samples whose arg-max over output ``index`` equals ``data['y']``."""

    def outcomes(self, outputs: list[np.ndarray], data: dict[str, np.ndarray]) -> np.ndarray:
        """Per-sample outcome (1.0 correct, 0.0 not): the metric is their mean."""
        logits = _as_logits(outputs[self.index], self.output_name)
        labels = data[LABELS]
        _check_labels(labels, logits.shape[1], self.output_name)
        if len(labels) != len(logits):
            raise InputError(f"output {self.output_name!r} has {len(logits)} rows for {len(labels)} labels")
        return (logits.argmax(axis=1) == labels).astype(np.float64)


class Top1Agreement(_PerSample):
    """Fraction of samples whose arg-max over output ``index`` equals the uncompressed model's."""

    def outcomes(self, outputs: list[np.ndarray], data: dict[str, np.ndarray]) -> np.ndarray:
        """Per-sample outcome (1.0 same top-1 as the uncompressed model, 0.0 not): the metric is their mean."""
        logits = _as_logits(outputs[self.index], self.output_name)
        reference = _as_logits(data[reference_key(self.output_name)], self.output_name)
        return (logits.argmax(axis=1) == reference.argmax(axis=1)).astype(np.float64)


@dataclass(frozen=True)
class CustomMetric:
    """A user function ``module:function``; checks that it returns a finite float."""

    spec: str
    function: Callable[[list[np.ndarray], dict[str, np.ndarray]], object]
    code_hash: str = ""

    def __call__(self, outputs: list[np.ndarray], data: dict[str, np.ndarray]) -> float:
        try:
            value = self.function(outputs, data)
        except OnnxwsError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's code: name it, keep the cause
            raise InputError(f"metric {self.spec} raised {type(exc).__name__}: {exc}") from exc
        try:
            result = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            raise InputError(f"metric {self.spec} returned {value!r} ({type(value).__name__}); it must return a float, higher is better") from exc
        if not math.isfinite(result):
            raise InputError(f"metric {self.spec} returned {result}; it must return a finite float, higher is better")
        return result

    def __reduce__(self):  # re-import by name in another process instead of pickling the function
        return (_load_custom, (self.spec,))


def _code_hash(fn: Callable) -> str:
    """What the score cache keys a custom metric on, the same in every process: the function's
    code (bytecode, names, constants, nested code objects such as comprehensions and lambdas,
    recursively) and the bytes of the source file that defines it (the helpers it calls live
    there, and editing them must invalidate cached scores). ``repr`` of a code object or of a
    frozenset is not stable across processes (an address; string hashing), so they are walked."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return ""
    digest = hashlib.sha256()
    _hash_code(digest, code)
    try:
        source = inspect.getsourcefile(fn)
        if source:
            digest.update(Path(source).read_bytes())
    except (OSError, TypeError):  # built in, or defined in a REPL: the code alone
        pass
    return digest.hexdigest()[:16]


def _hash_code(digest, code: types.CodeType) -> None:
    digest.update(code.co_code)
    digest.update(repr((code.co_names, code.co_varnames, code.co_freevars)).encode())
    for const in code.co_consts:
        _hash_const(digest, const)


def _hash_const(digest, const: object) -> None:
    if isinstance(const, types.CodeType):
        _hash_code(digest, const)
    elif isinstance(const, (tuple, frozenset)):
        items = list(const)
        if isinstance(const, frozenset):
            items.sort(key=repr)
        digest.update(b"(" if isinstance(const, tuple) else b"{")
        for item in items:
            _hash_const(digest, item)
        digest.update(b")")
    else:
        digest.update(f"{type(const).__name__}:{const!r};".encode())


def _load_custom(spec: str) -> CustomMetric:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise InputError(f"--metric {spec!r}: expected package.module:function, top1_accuracy or top1_agreement")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's module, say which
        raise InputError(f"--metric {spec}: cannot import module {module_name!r} ({type(exc).__name__}: {exc}); make it importable (install it or add its folder to PYTHONPATH)") from exc
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise InputError(f"--metric {spec}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise InputError(f"--metric {spec}: {attr!r} is a {type(fn).__name__}, not a function(outputs, data) -> float")
    return CustomMetric(spec, fn, _code_hash(fn))


def _static_width(model: onnx.ModelProto, index: int) -> int | None:
    """Class count of output ``index`` from its declared shape, if every non-batch dim is fixed."""
    tensor = model.graph.output[index].type.tensor_type
    if not tensor.HasField("shape") or len(tensor.shape.dim) < 2:
        return None
    dims = []
    for d in tensor.shape.dim[1:]:
        if not d.HasField("dim_value"):
            return None
        dims.append(d.dim_value)
    wide = [d for d in dims if d != 1]
    if len(wide) > 1:
        return None
    return wide[0] if wide else 1


def resolve_metric(spec: str | None, data: EvalData, model: onnx.ModelProto, output: str | None = None) -> Metric:
    """Pick the metric for a run.

    Args:
        spec: None (top-1 accuracy if the data has labels ``y``, else top-1 agreement with
            the uncompressed model), ``top1_accuracy``, ``top1_agreement`` or
            ``package.module:function``.
        data: the evaluation data (labels are checked here).
        model: the model whose outputs the metric reads.
        output: the output built-in metrics read (default: the first).

    Raises:
        InputError: unknown output; accuracy without labels; labels out of range of the
            output width; a custom metric that cannot be imported or is not callable.
    """
    out_names = [o.name for o in model.graph.output]
    if not out_names:
        raise InputError("the model has no graph outputs: nothing to measure")
    if output is not None and output not in out_names:
        raise InputError(f"--output {output!r} is not a model output; outputs are {out_names}")
    index = out_names.index(output) if output is not None else 0
    name = out_names[index]
    if spec is None:
        spec = TOP1_ACCURACY if data.labels is not None else TOP1_AGREEMENT
    if spec == TOP1_ACCURACY:
        if data.labels is None:
            raise InputError("metric top1_accuracy needs integer labels 'y' in the data; add them, or omit --metric to measure top-1 agreement with the uncompressed model")
        width = _static_width(model, index)
        if width is not None:
            _check_labels(data.labels, width, name)
        metric = Metric(TOP1_ACCURACY, Top1Accuracy(index, name), False, name)
    elif spec == TOP1_AGREEMENT:
        metric = Metric(TOP1_AGREEMENT, Top1Agreement(index, name), True, name)
    elif ":" in spec:
        metric = Metric(spec, _load_custom(spec))
    else:
        raise InputError(f"--metric {spec!r}: expected top1_accuracy, top1_agreement or package.module:function")
    logger.info("metric: %s%s", metric.name, f" on output {metric.output!r}" if metric.output else "")
    return metric
