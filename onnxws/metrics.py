"""Metrics: what a score is. Higher is better, one float per evaluation of the whole (sub)set.

Built in, selectable by name (``--metric NAME``):

- ``top1_accuracy``: top-1 against integer labels ``y`` (the default when the data has labels);
- ``expected_accuracy``: the uncompressed model's own probability of the compressed model's
  top-1 class, averaged over samples (the default without labels). If the uncompressed model is
  calibrated (its probability of a class is how often that class is right), this is the
  compressed model's expected top-1 accuracy, and the uncompressed model's value is the mean of
  its top probability; the loss between them estimates the accuracy change a labelled
  evaluation would show. A flip between two near-tied classes costs the gap between their
  probabilities (almost nothing), a flip away from a confident class costs that confidence
  (about one sample). Logits (or log-probabilities) are turned into probabilities by a softmax;
  an output whose rows are already probabilities (in [0, 1], summing to 1) is used as it is.
  For an output with more than one class distribution per sample (``[samples, ..., classes]``:
  sequences, per-position classifiers) the class axis is the last and each sample's outcome is
  the mean over its positions;
- ``top1_agreement``: the fraction of samples whose top-1 is the uncompressed model's (every
  flipped near-tie counts as a full error).

Anything else is a user function ``package.module:function(outputs, data) -> float``; it may
carry a per-sample form as an attribute, ``function.per_sample = f(outputs, data) -> array``
of one value per sample whose mean is the metric (then its loss gets intervals and a sampling
error without re-running it on resamples).

Metric functions are small picklable callables (no closures), so a process pool or a Ray
actor can receive them when scoring is scaled out.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
import functools
import hashlib
import importlib
import inspect
import io
import logging
import math
import numbers
import signal
import threading
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxws.data import LABELS, EvalData
from onnxws.errors import InputError, OnnxwsError, interrupts

logger = logging.getLogger(__name__)

TOP1_ACCURACY = "top1_accuracy"
TOP1_AGREEMENT = "top1_agreement"
EXPECTED_ACCURACY = "expected_accuracy"
BUILTIN = (EXPECTED_ACCURACY, TOP1_ACCURACY, TOP1_AGREEMENT)
"""Built-in metrics, by name."""
_PROBABILITY_TOLERANCE = 1e-3  # rows summing to 1 within this (and inside [0, 1]) are probabilities
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
        description: what it measures, in one line (for the report).
    """

    name: str
    fn: Callable[[list[np.ndarray], dict[str, np.ndarray]], float]
    needs_reference: bool = False
    output: str | None = None
    description: str = ""

    @property
    def per_sample(self) -> Callable[[list[np.ndarray], dict[str, np.ndarray]], np.ndarray] | None:
        """``outcomes(outputs, data)``: per-sample outcomes whose mean is the metric (built-in
        top-1 metrics), or None (a custom metric is one number per evaluation)."""
        return getattr(self.fn, "outcomes", None)

    @property
    def outcome_ceiling(self) -> Callable[[np.ndarray], np.ndarray] | None:
        """``ceiling(baseline_outcomes)``: the highest outcome any model can reach on each sample,
        given the unmodified model's outcomes (built-in metrics), or None (no such bound known:
        a custom metric). A scoring that stops early relies on it never being exceeded."""
        return getattr(self.fn, "ceiling", None)

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
    used = np.unique(labels)
    if len(used) < width and used[0] == 0 and used[-1] == len(used) - 1 and width > 2:
        # 0..m-1 of m < width classes: the mark of labels numbered by sorted folder names, not the model's classes
        logger.warning("labels y use classes 0..%d only, of the %d that output %r has: if they were numbered by sorted "
                       "folder names, check that they are the model's class indices (onnxws data --classes FILE)",
                       len(used) - 1, width, output_name)


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
        # einsum's own loop, not BLAS: np.dot's sum depends on the BLAS thread count (a Ray worker
        # runs with OMP_NUM_THREADS=1), and a divergence must not depend on where it was measured.
        total += float(np.einsum("i,i->", part, part))
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
class _PerSample(ABC):
    """A metric that is the mean of per-sample outcomes (``outcomes``) read from output ``index``."""

    index: int
    output_name: str

    def __call__(self, outputs: list[np.ndarray], data: dict[str, np.ndarray]) -> float:
        return float(np.mean(self.outcomes(outputs, data)))

    @abstractmethod
    def outcomes(self, outputs: list[np.ndarray], data: dict[str, np.ndarray]) -> np.ndarray:
        """Per-sample outcomes, one float per sample: the metric is their mean."""

    def ceiling(self, baseline_outcomes: np.ndarray) -> np.ndarray:
        """The highest outcome any model can reach per sample: 1 (a right answer, an agreement)."""
        return np.ones_like(baseline_outcomes, dtype=np.float64)


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


def log_normaliser(scores: np.ndarray) -> np.ndarray | None:
    """``log(sum(exp(scores)))`` along the last axis (float64), or None when ``scores`` already are
    probabilities (in [0, 1], rows summing to 1): then ``p = scores``, else ``p = exp(scores - it)``
    (a softmax; log-probabilities give themselves back)."""
    arr = np.asarray(scores)
    if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0 and np.all(
            np.abs(arr.sum(axis=-1, dtype=np.float64) - 1.0) <= _PROBABILITY_TOLERANCE):
        return None
    flat = arr.reshape(-1, arr.shape[-1])
    out = np.empty(flat.shape[0], dtype=np.float64)
    step = max(1, _SUM_CHUNK // max(flat.shape[1], 1))
    for start in range(0, flat.shape[0], step):
        part = flat[start:start + step].astype(np.float64)
        top = part.max(axis=1)
        out[start:start + step] = top + np.log(np.exp(part - top[:, None]).sum(axis=1))
    return out.reshape(arr.shape[:-1])


def _class_scores(out: np.ndarray, output_name: str) -> np.ndarray:
    """Output as ``[samples, positions, classes]`` (class axis last; [n, C] is one position)."""
    arr = np.asarray(out)
    if arr.ndim == 2 or (arr.ndim > 2 and all(d == 1 for d in arr.shape[1:-1])):
        return _as_logits(arr, output_name)[:, None, :]
    if arr.ndim < 2 or arr.shape[-1] < 2 or not np.issubdtype(arr.dtype, np.floating):
        raise InputError(
            f"output {output_name!r} has shape {tuple(arr.shape)} ({arr.dtype}); expected_accuracy needs float class "
            "scores [samples, classes] or [samples, ..., classes]: pick one with --output or pass --metric module:function"
        )
    return arr.reshape(arr.shape[0], -1, arr.shape[-1])


@dataclass(frozen=True)
class ExpectedAccuracy(_PerSample):
    """The uncompressed model's probability of the compressed model's top-1 class (module docstring)."""

    # reference array id -> (that array, its log normaliser): computed once per evaluated subset
    _normalisers: dict = field(default_factory=dict, compare=False, repr=False)

    def outcomes(self, outputs: list[np.ndarray], data: dict[str, np.ndarray]) -> np.ndarray:
        """Per-sample outcome in [0, 1] (the mean over positions of a sequence): the metric is their mean."""
        scores = _class_scores(outputs[self.index], self.output_name)
        given = data[reference_key(self.output_name)]
        reference = _class_scores(given, self.output_name)
        if scores.shape != reference.shape:
            raise InputError(f"output {self.output_name!r} has shape {scores.shape}, the uncompressed model's {reference.shape}")
        picked = np.take_along_axis(reference, scores.argmax(axis=-1)[..., None], axis=-1)[..., 0].astype(np.float64)
        normaliser = self._normaliser(given, reference)
        probability = picked if normaliser is None else np.exp(picked - normaliser)
        outcomes = probability.mean(axis=1)
        bad = ~np.isfinite(outcomes)
        if bad.any():
            raise InputError(f"output {self.output_name!r} of the uncompressed model is NaN or infinite on {int(bad.sum())} of "
                             f"{len(outcomes)} samples: its probabilities, and so expected_accuracy, cannot be measured there; "
                             "check the model and the evaluation data")
        return outcomes

    def ceiling(self, baseline_outcomes: np.ndarray) -> np.ndarray:
        """The unmodified model's own outcomes: its top-1 class is the one it gives the highest
        probability, so no other model's top-1 class gets more from it (per position, and so in
        their mean), whichever class that model picks."""
        return np.asarray(baseline_outcomes, dtype=np.float64)

    def _normaliser(self, given: np.ndarray, reference: np.ndarray) -> np.ndarray | None:
        cached = self._normalisers.get(id(given))
        if cached is None or cached[0] is not given:
            if len(self._normalisers) >= 4:  # subsets of one run: search, full, holdout, whole
                self._normalisers.clear()
            cached = (given, log_normaliser(reference))  # the array is kept, so its id stays its own
            self._normalisers[id(given)] = cached
        return cached[1]


@dataclass(frozen=True)
class CustomMetric:
    """A user function ``module:function``, called guarded (``_guarded``); checks that it returns a real number."""

    spec: str
    function: Callable[[list[np.ndarray], dict[str, np.ndarray]], object]
    code_hash: str = ""
    timeout: float | None = None

    def __call__(self, outputs: list[np.ndarray], data: dict[str, np.ndarray]) -> float:
        value = _guarded(self.spec, self.timeout, self.function, outputs, data)
        if not _is_number(value):
            raise InputError(f"metric {self.spec} returned {_shown(value)} ({type(value).__name__}); it must return a "
                             "real number (int or float), higher is better")
        result = float(value)  # type: ignore[arg-type]
        if not math.isfinite(result):
            raise InputError(f"metric {self.spec} returned {result}; it must return a finite float, higher is better")
        return result

    @property
    def outcomes(self) -> Callable[[list[np.ndarray], dict[str, np.ndarray]], np.ndarray] | None:
        """The function's per-sample form (its ``per_sample`` attribute), checked; None without one."""
        per_sample = getattr(self.function, "per_sample", None)
        return None if per_sample is None else functools.partial(_custom_outcomes, self.spec, self.timeout, per_sample)

    def __reduce__(self):  # re-import by name in another process instead of pickling the function
        return (_load_custom, (self.spec, self.timeout))


def _is_number(value: object) -> bool:
    """A real number: int, float, a numpy integer or float, or a 0-d array of one (not bool, not a string)."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class MetricTimeout(Exception):
    """Raised inside a custom metric that ran past ``--metric-timeout``."""


def _guarded(spec: str, timeout: float | None, function: Callable, *args: object) -> object:
    """``function(*args)`` with the promise kept whatever the user's code does: its exceptions,
    ``sys.exit`` and a KeyboardInterrupt it raises itself become one InputError naming the metric
    (a real Ctrl-C or SIGTERM still stops the run); what it prints is captured (logged at debug
    level), so it never lands in ``--json`` stdout; past ``timeout`` seconds it is stopped."""
    captured = io.StringIO()
    alarm = timeout is not None and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    previous = None
    if alarm:
        def expired(signum: int, frame: object) -> None:
            raise MetricTimeout()

        previous = signal.signal(signal.SIGALRM, expired)
        signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        with contextlib.redirect_stdout(captured):
            return function(*args)
    except OnnxwsError:
        raise
    except MetricTimeout:
        raise InputError(f"metric {spec} took longer than --metric-timeout {timeout:g} s on one call; make it faster "
                         "or raise the timeout") from None
    except SystemExit as exc:
        raise InputError(f"metric {spec} called sys.exit({exc.code!r}); a metric must return a number") from None
    except KeyboardInterrupt as exc:
        if interrupts.is_real(exc):
            raise
        raise InputError(f"metric {spec} raised KeyboardInterrupt itself; a metric must return a number") from None
    except Exception as exc:  # noqa: BLE001 - the user's code: name it, keep the cause
        raise InputError(f"metric {spec} raised {type(exc).__name__}: {exc}") from exc
    finally:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        if captured.getvalue():
            logger.debug("metric %s printed: %s", spec, captured.getvalue()[:2000])


def _custom_outcomes(spec: str, timeout: float | None, per_sample: Callable, outputs: list[np.ndarray],
                     data: dict[str, np.ndarray]) -> np.ndarray:
    values = _guarded(spec, timeout, per_sample, outputs, data)
    try:
        array = np.asarray(values)
        if array.dtype.kind not in "iuf":
            raise TypeError(array.dtype)
        array = array.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"metric {spec}: per_sample returned {type(values).__name__}, not numbers; it must return one float per sample") from exc
    rows = len(next(iter(data.values()))) if data else len(array)
    if array.ndim != 1 or len(array) != rows or not np.all(np.isfinite(array)):
        raise InputError(f"metric {spec}: per_sample returned shape {array.shape}; it must return {rows} finite floats, one per sample, "
                         "whose mean is the metric")
    return array


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


def _load_custom(spec: str, timeout: float | None = None) -> CustomMetric:
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
    return CustomMetric(spec, fn, _code_hash(fn), timeout)


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


def _declared_rank(model: onnx.ModelProto, index: int) -> int | None:
    """Rank of output ``index`` as declared (singleton axes after the first not counted), if declared."""
    tensor = model.graph.output[index].type.tensor_type
    if not tensor.HasField("shape"):
        return None
    dims = tensor.shape.dim
    return 1 + sum(1 for d in dims[1:] if not (d.HasField("dim_value") and d.dim_value == 1)) if dims else 0


def resolve_metric(spec: str | None, data: EvalData, model: onnx.ModelProto, output: str | None = None,
                   timeout: float | None = None) -> Metric:
    """Pick the metric for a run.

    Args:
        spec: None (top-1 accuracy if the data has labels ``y``, else expected accuracy under
            the uncompressed model's probabilities), a built-in name (``BUILTIN``) or
            ``package.module:function``.
        data: the evaluation data (labels are checked here).
        model: the model whose outputs the metric reads.
        output: the output built-in metrics read (default: the first).
        timeout: seconds one call of a custom metric may take (None: no limit).

    Raises:
        InputError: unknown output or metric name; accuracy without labels; labels out of
            range of the output width; a custom metric that cannot be imported or is not callable.
    """
    out_names = [o.name for o in model.graph.output]
    if not out_names:
        raise InputError("the model has no graph outputs: nothing to measure")
    if output is not None and output not in out_names:
        raise InputError(f"--output {output!r} is not a model output; outputs are {out_names}")
    index = out_names.index(output) if output is not None else 0
    name = out_names[index]
    if spec is None:
        spec = TOP1_ACCURACY if data.labels is not None else EXPECTED_ACCURACY
    of = f"output {name!r}" + (f" (of {len(out_names)} outputs)" if len(out_names) > 1 else "")
    if spec == TOP1_ACCURACY:
        if data.labels is None:
            raise InputError("metric top1_accuracy needs integer labels 'y' in the data; add them, or omit --metric "
                             "to estimate the accuracy change without labels (expected_accuracy)")
        width = _static_width(model, index)
        if width is not None:
            _check_labels(data.labels, width, name)
        metric = Metric(TOP1_ACCURACY, Top1Accuracy(index, name), False, name, f"top-1 accuracy against labels y, {of}")
    elif spec == EXPECTED_ACCURACY:
        rank = _declared_rank(model, index)
        how = ("expected top-1 accuracy under the uncompressed model's probabilities (label-free), " + of)
        if rank is None or rank > 2:
            how += ("; an output with several class distributions per sample is read as [samples, ..., classes], "
                    "the mean over positions (check that its last axis holds class scores, else pass --metric)")
        metric = Metric(EXPECTED_ACCURACY, ExpectedAccuracy(index, name), True, name, how)
    elif spec == TOP1_AGREEMENT:
        metric = Metric(TOP1_AGREEMENT, Top1Agreement(index, name), True, name,
                        f"top-1 agreement with the uncompressed model (label-free; every flip counts fully), {of}")
    elif ":" in spec:
        metric = Metric(spec, _load_custom(spec, timeout), description=f"custom metric {spec}")
    else:
        raise InputError(f"--metric {spec!r}: expected {', '.join(BUILTIN)} or package.module:function")
    logger.info("metric: %s", metric.description)
    return metric
