"""Every ONNX Runtime session onnxws opens: providers, the CUDA probe, the shared CPU arena and
session options, in one function (``create_session``).

Running a compressed model: by default ONNX Runtime's constant folding evaluates every
``Gather(codebook, indices)`` once at session start, so the session holds ordinary float weights:
the same speed and memory as the original model, with a small file on disk. ``keep_compact=True``
disables that folding: the session keeps the codebooks and narrow indices and rebuilds each weight
on every run, which trades latency for resident memory (``tools/bench_keep_compact.py`` measures
both).

Per-candidate scoring sessions opt into one process-wide CPU arena (``shared_arena``): without it
every fresh session page-faults its activation buffers in again, which cost more than the forward
itself (LeNet-5, 2,000 images, 2 threads: 85 ms per candidate vs a 22 ms forward; 27 ms with the
shared arena). ``SessionOptions.add_initializer`` is never used: with graph optimisations on it
silently keeps the original weights; weights are passed with ``add_external_initializers``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from onnxws.config import DEVICES
from onnxws.errors import InputError, UsageError

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
#: ORT's graph transformer that pre-computes constant subgraphs (the weight decoders).
CONSTANT_FOLDING = "ConstantFolding"
#: Graph optimisation levels of ``create_session``; "default" leaves ORT's own default.
OPTIMIZATIONS = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}


@functools.cache
def cuda_usable() -> bool:
    """True if the CUDA EP is installed *and* a session can actually run on a GPU."""
    if CUDA not in ort.get_available_providers():
        return False
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    try:
        sess = create_session(probe, providers=[CUDA, CPU], optimization="default", log_severity=4)
    except Exception as exc:  # noqa: BLE001 - any failure means no usable GPU
        logger.info("CUDA EP installed but unusable: %s", exc)
        return False
    return CUDA in sess.get_providers()


def resolve_providers(device: str) -> tuple[list[str], str]:
    """Execution providers for ``device``.

    Args:
        device: ``auto`` (CUDA if usable, else CPU), ``cpu`` or ``cuda``.

    Returns:
        (providers list for ``InferenceSession``, the provider that runs the model).

    Raises:
        UsageError: unknown device.
        InputError: ``cuda`` without a usable GPU.
    """
    if device not in DEVICES:
        raise UsageError(f"--device {device!r}: expected one of {', '.join(DEVICES)}")
    if device != "cpu" and cuda_usable():
        return [CUDA, CPU], CUDA
    if device == "cuda":
        raise InputError(
            "--device cuda: no usable GPU (onnxruntime-gpu not installed or no CUDA device); "
            "install onnxws[gpu] or use --device cpu"
        )
    return [CPU], CPU


_SHARED_ARENA: bool | None = None


def shared_cpu_arena() -> bool:
    """Register one process-wide CPU arena (once) that sessions can opt into; False if ORT refuses."""
    global _SHARED_ARENA
    if _SHARED_ARENA is None:
        try:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
            _SHARED_ARENA = True
        except Exception as exc:  # noqa: BLE001 - an ORT build without it just runs slower
            message = str(exc).lower()
            _SHARED_ARENA = "already" in message and "regist" in message
            logger.info("shared CPU arena: %s (%s)", "already registered" if _SHARED_ARENA else "unavailable", exc)
    return _SHARED_ARENA


def ortvalue(array: np.ndarray, device: str = "cpu") -> ort.OrtValue:
    """``array`` as an OrtValue on ``device`` ("cpu" or "cuda"); zero-copy on the CPU for contiguous arrays."""
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), device, 0)


def create_session(
    model: str | Path | bytes | onnx.ModelProto,
    *,
    providers: Sequence[str] = (CPU,),
    optimization: str = "all",
    threads: int | None = None,
    log_severity: int = 3,
    shared_arena: bool = False,
    spinning: bool = True,
    external: Mapping[str, ort.OrtValue] | None = None,
    keep_compact: bool = False,
    per_candidate: bool = False,
    session_options: ort.SessionOptions | None = None,
) -> ort.InferenceSession:
    """An InferenceSession, with every option onnxws sets in one place.

    Args:
        model: path, serialized bytes or ModelProto.
        providers: execution provider names, in order of preference.
        optimization: ``all`` (ORT_ENABLE_ALL), ``none`` (ORT_DISABLE_ALL) or ``default`` (as given
            or ORT's default).
        threads: intra-op threads (inter-op pinned to 1: the executor is sequential); None: ORT's
            default, one per physical core.
        log_severity: ORT's log level for this session (3: errors only; per-candidate sessions would
            repeat the same warnings); None keeps the options' own.
        shared_arena: allocate from the process-wide CPU arena (``shared_cpu_arena``).
        spinning: let idle intra-op threads spin (off: they would slow what the process does next).
        external: initializers stored as external data in ``model``, passed in memory
            (``add_external_initializers``); keep the values alive with the session.
        keep_compact: keep shared weights compressed in memory (no constant folding of the decoders).
        per_candidate: a scoring session created per candidate: cuDNN picks convolution algorithms
            by heuristic instead of an exhaustive search that would run again in every session.
        session_options: base options; the fields onnxws sets above are set on it (in place).

    Raises:
        Whatever ORT raises for a model it cannot load; callers turn it into their own error.
    """
    options = session_options if session_options is not None else ort.SessionOptions()
    if optimization != "default":
        options.graph_optimization_level = OPTIMIZATIONS[optimization]
    if log_severity is not None:
        options.log_severity_level = log_severity
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if shared_arena:
        options.add_session_config_entry("session.use_env_allocators", "1")
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if external:
        options.add_external_initializers(list(external), list(external.values()))
    spec: list = [(p, {"cudnn_conv_algo_search": "HEURISTIC"}) if per_candidate and p == CUDA else p for p in providers]
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif isinstance(model, Path):
        model = str(model)
    disabled = [CONSTANT_FOLDING] if keep_compact else None
    return ort.InferenceSession(model, options, providers=spec, disabled_optimizers=disabled)


def open_session(
    model: str | Path | bytes | onnx.ModelProto,
    *,
    keep_compact: bool = False,
    providers: list[str] | None = None,
    session_options: ort.SessionOptions | None = None,
) -> ort.InferenceSession:
    """An InferenceSession for a (compressed) model, as a user would open one (stock options).

    Args:
        model: path, serialized bytes, or ModelProto.
        keep_compact: keep weights compressed in memory (no constant folding of the decoders).
        providers: execution providers (default: ORT's default order).
        session_options: base options (threads etc.).
    """
    return create_session(model, providers=providers or ort.get_available_providers(), optimization="default",
                          log_severity=None, keep_compact=keep_compact, session_options=session_options)
