"""onnxws: retraining-free weight sharing for ONNX models."""

from __future__ import annotations

__version__ = "0.1.0"

from onnxws.errors import (BudgetError, InputError, LimitError, NothingToShareError, OnnxwsError, ScoringError,  # noqa: E402
                           UsageError, VerificationError)


def __getattr__(name: str):
    # The pipeline imports onnxruntime and friends: load it on first use, so `import onnxws` stays light.
    if name in ("compress", "Result"):
        from onnxws import pipeline

        return getattr(pipeline, name)
    if name in ("CompressConfig", "TensorSettings"):
        from onnxws import config as _config

        return getattr(_config, name)
    raise AttributeError(f"module 'onnxws' has no attribute {name!r}")


__all__ = ["compress", "Result", "CompressConfig", "TensorSettings", "OnnxwsError", "InputError", "UsageError",
           "NothingToShareError", "BudgetError", "LimitError", "ScoringError", "VerificationError", "__version__"]
