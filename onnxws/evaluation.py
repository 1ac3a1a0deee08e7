"""``onnxws evaluate``: any model's metric in stock ONNX Runtime (onnxws.scoring.run_model, the
same plain session the pipeline uses to re-measure the file it emits)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from onnxws.data import EvalData, find_sidecar_data, load_data
from onnxws.errors import InputError
from onnxws.loading import load_model
from onnxws.metrics import Metric, reference_key, resolve_metric
from onnxws.scoring import resolve_providers, run_model

logger = logging.getLogger(__name__)


def metric_value(metric: Metric, outputs: Sequence[np.ndarray], data: EvalData, output_names: Sequence[str],
                 reference: Sequence[np.ndarray] | None = None) -> float:
    """Apply ``metric`` to outputs over ``data`` (with the reference outputs when it needs them)."""
    arrays = dict(data.arrays)
    if metric.needs_reference:
        if reference is None:
            raise InputError("the data has no labels y: top-1 agreement needs the uncompressed model (--reference MODEL)")
        arrays.update({reference_key(n): r for n, r in zip(output_names, reference)})
    return float(metric.fn(list(outputs), arrays))


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
    _, provider = resolve_providers(device)
    outputs = run_model(model, data, device=device, batch_size=batch_size, keep_compact=keep_compact)
    ref = None
    if resolved.needs_reference:
        if reference is None:
            raise InputError(f"{data_file} has no labels y, so the metric is top-1 agreement with the uncompressed model: "
                             "pass --reference ORIGINAL.onnx (or add labels y to the data)")
        ref_model = load_model(reference)
        ref = run_model(ref_model, load_data(data_file, ref_model), device=device, batch_size=batch_size)
    value = metric_value(resolved, outputs, data, [o.name for o in model.graph.output], ref)
    return {"metric": resolved.name, "value": value, "samples": data.n, "device": provider,
            "model": str(model_path), "data": str(data_file), "keep_compact": keep_compact}
