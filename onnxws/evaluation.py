"""Measure any model's metric in stock ONNX Runtime (``onnxws evaluate``, and the re-measure of
the emitted model in the pipeline). Independent of the scorer's engines on purpose: this is
the check that what was scored is what was written."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxws.data import EvalData, find_sidecar_data, load_data
from onnxws.errors import InputError
from onnxws.loading import load_model
from onnxws.metrics import Metric, reference_key, resolve_metric
from onnxws.runtime import open_session
from onnxws.scoring import concat_outputs, default_batch_size, fixed_batch, plan_batches, resolve_providers

logger = logging.getLogger(__name__)


def run_model(model: onnx.ModelProto, data: EvalData, *, device: str = "auto", batch_size: int | None = None,
              session_options: ort.SessionOptions | None = None, keep_compact: bool = False) -> tuple[list[np.ndarray], str]:
    """Run ``model`` over every sample of ``data`` in stock ORT (default options unless given;
    ``keep_compact`` keeps shared weights compressed in memory, see onnxws.runtime).

    Returns:
        (outputs in model-output order, each concatenated along the batch axis; provider used).
    """
    providers, provider = resolve_providers(device)
    try:
        session = open_session(model, keep_compact=keep_compact, session_options=session_options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        raise InputError(f"ONNX Runtime cannot load the model: {' '.join(str(exc).split())[:300]}") from exc
    fixed = fixed_batch(model, data.input_names)
    batches = plan_batches(data, fixed or batch_size or default_batch_size(data), fixed)
    names = [o.name for o in session.get_outputs()]
    per_batch = [session.run(names, feeds) for feeds, _ in batches]
    return concat_outputs(per_batch, batches), provider


def metric_value(metric: Metric, outputs: Sequence[np.ndarray], data: EvalData, output_names: Sequence[str],
                 reference: Sequence[np.ndarray] | None = None) -> float:
    """Apply ``metric`` to outputs over ``data`` (with the reference outputs when it needs them)."""
    arrays = dict(data.arrays)
    if metric.needs_reference:
        if reference is None:
            raise InputError("the data has no labels y: top-1 agreement needs the uncompressed model (--reference MODEL)")
        arrays.update({reference_key(n): r for n, r in zip(output_names, reference)})
    return float(metric.fn(list(outputs), arrays))


def evaluate_model(model: onnx.ModelProto, data: EvalData, metric: Metric, *, device: str = "auto",
                   batch_size: int | None = None, reference=None) -> float:
    """Metric of ``model`` on ``data``; ``reference`` is a Scorer (its full-set reference outputs) or outputs."""
    outputs, _ = run_model(model, data, device=device, batch_size=batch_size)
    ref = None
    if metric.needs_reference and reference is not None:
        ref = reference.reference_outputs("full") if hasattr(reference, "reference_outputs") else reference
    return metric_value(metric, outputs, data, [o.name for o in model.graph.output], ref)


def evaluate_path(model_path: Path, data_path: Path | None, *, metric: str | None = None, output: str | None = None,
                  reference: Path | None = None, device: str = "auto", batch_size: int | None = None,
                  keep_compact: bool = False) -> dict:
    """``onnxws evaluate``: metric of a model file on an evaluation set.

    Returns ``{"metric", "value", "samples", "device", "model", "data"}``.
    """
    model = load_model(model_path)
    data_file = data_path or find_sidecar_data(model_path)
    data = load_data(data_file, model)
    resolved = resolve_metric(metric, data, model, output)
    outputs, provider = run_model(model, data, device=device, batch_size=batch_size, keep_compact=keep_compact)
    ref = None
    if resolved.needs_reference:
        if reference is None:
            raise InputError(f"{data_file} has no labels y, so the metric is top-1 agreement with the uncompressed model: "
                             "pass --reference ORIGINAL.onnx (or add labels y to the data)")
        ref_model = load_model(reference)
        ref, _ = run_model(ref_model, load_data(data_file, ref_model), device=device, batch_size=batch_size)
    value = metric_value(resolved, outputs, data, [o.name for o in model.graph.output], ref)
    return {"metric": resolved.name, "value": value, "samples": data.n, "device": provider,
            "model": str(model_path), "data": str(data_file), "keep_compact": keep_compact}
