"""Plain model evaluation: any model's outputs and metric in a stock ONNX Runtime session
(``run_model``, ``evaluate_model``: the same plain session the pipeline uses to re-measure the
file it emits), and ``onnxws evaluate``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import onnx
from google.protobuf.message import EncodeError

from onnxws.data import EvalData, concat_outputs, default_batch_size, find_sidecar_data, fixed_batch, load_data, plan_batches
from onnxws.engines import prepare
from onnxws.errors import InputError, one_line
from onnxws.loading import load_model
from onnxws.metrics import Metric, resolve_metric
from onnxws.proto import fits_in_one_message
from onnxws.runtime import create_session, ortvalue, resolve_providers
from onnxws.scoring import Scorer

logger = logging.getLogger(__name__)


def run_model(
    model: onnx.ModelProto,
    data: EvalData,
    *,
    device: str = "auto",
    batch_size: int | None = None,
    threads: int | None = None,
    keep_compact: bool = False,
) -> list[np.ndarray]:
    """Outputs of ``model`` on all of ``data`` in a stock ``InferenceSession`` (default options;
    ``keep_compact`` keeps shared weights compressed in memory, see onnxws.runtime).

    Raises:
        InputError: ONNX Runtime cannot load or run the model.
    """
    providers, _ = resolve_providers(device)
    stock = {"providers": providers, "optimization": "default", "log_severity": None, "threads": threads,
             "keep_compact": keep_compact}
    fixed = fixed_batch(model, data.input_names)
    batches = plan_batches(data, fixed or batch_size or default_batch_size(data), fixed)
    try:
        serialized = None
        if fits_in_one_message(model):  # ModelProto.ByteSize() would raise over 2 GB (upb)
            try:
                serialized = model.SerializeToString()
            except EncodeError:  # the estimate missed (a huge graph)
                serialized = None
        if serialized is not None:
            sess = create_session(serialized, **stock)
            del serialized
        else:  # protobuf cannot serialise it: hand the big tensors over in memory instead
            prepared = prepare(model, [])
            values = {n: ortvalue(a) for n, a in prepared.stored.items()}
            sess = create_session(prepared.model, external=values, **stock)
        per_batch = [sess.run(None, feeds) for feeds, _ in batches]
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        raise InputError(f"ONNX Runtime cannot run the model: {type(exc).__name__}: {one_line(exc)}") from exc
    return concat_outputs(per_batch, batches)


def evaluate_model(
    model: onnx.ModelProto,
    data: EvalData,
    metric: Metric,
    *,
    device: str = "auto",
    batch_size: int | None = None,
    reference: Scorer | Sequence[np.ndarray] | None = None,
    threads: int | None = None,
) -> float:
    """The metric of ``model`` on all of ``data``, run as a user would (stock ORT options).

    Args:
        reference: for metrics that compare with the uncompressed model (expected accuracy, agreement):
            a Scorer of that model (its full-set outputs are used) or those outputs.

    Raises:
        InputError: a reference metric without ``reference``; ORT cannot run the model.
    """
    outputs = run_model(model, data, device=device, batch_size=batch_size, threads=threads)
    if metric.needs_reference and reference is None:
        raise InputError(f"metric {metric.name} compares with the uncompressed model: pass its outputs or scorer as reference")
    ref = reference.reference_outputs("full") if isinstance(reference, Scorer) else reference
    return metric_value(metric, outputs, data, [o.name for o in model.graph.output], ref)


def metric_value(metric: Metric, outputs: Sequence[np.ndarray], data: EvalData, output_names: Sequence[str],
                 reference: Sequence[np.ndarray] | None = None) -> float:
    """Apply ``metric`` to outputs over ``data`` (with the reference outputs when it needs them)."""
    if metric.needs_reference and reference is None:
        raise InputError(f"metric {metric.name} compares with the uncompressed model: pass it (--reference MODEL)")
    return float(metric.fn(list(outputs), metric.data_for(data.arrays, output_names, reference)))


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
            raise InputError(f"metric {resolved.name} compares with the uncompressed model ({data_file} has no labels y): "
                             "pass --reference ORIGINAL.onnx (or add labels y to the data)")
        ref_model = load_model(reference)
        ref = run_model(ref_model, load_data(data_file, ref_model), device=device, batch_size=batch_size)
    value = metric_value(resolved, outputs, data, [o.name for o in model.graph.output], ref)
    return {"metric": resolved.name, "value": value, "samples": data.n, "device": provider,
            "model": str(model_path), "data": str(data_file), "keep_compact": keep_compact}
