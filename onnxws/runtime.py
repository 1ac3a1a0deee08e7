"""Running a compressed model: default (fast) or with its weights kept compressed in memory.

By default ONNX Runtime's constant folding evaluates every ``Gather(codebook, indices)`` once at
session start, so the session holds ordinary float weights: the same speed and memory as the
original model, with a small file on disk. ``keep_compact=True`` disables that folding: the
session keeps the codebooks and narrow indices and rebuilds each weight on every run, which
trades latency for resident memory (``tools/bench_keep_compact.py`` measures both).
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort

# ORT's graph transformer that pre-computes constant subgraphs (the weight decoders).
CONSTANT_FOLDING = "ConstantFolding"


def open_session(
    model: str | Path | bytes | onnx.ModelProto,
    *,
    keep_compact: bool = False,
    providers: list[str] | None = None,
    session_options: ort.SessionOptions | None = None,
) -> ort.InferenceSession:
    """An InferenceSession for a (compressed) model.

    Args:
        model: path, serialized bytes, or ModelProto.
        keep_compact: keep weights compressed in memory (no constant folding of the decoders).
        providers: execution providers (default: ORT's default order).
        session_options: base options (threads etc.); not modified.
    """
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif isinstance(model, Path):
        model = str(model)
    disabled = [CONSTANT_FOLDING] if keep_compact else None
    return ort.InferenceSession(model, sess_options=session_options, providers=providers,
                                disabled_optimizers=disabled)
