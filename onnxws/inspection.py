"""``onnxws inspect``: every float tensor of a model, shareable or skipped (with why), or shared."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from onnxws.discovery import find_weights
from onnxws.loading import load_model
from onnxws.sharing import index_bits

_DTYPE_BITS = {onnx.TensorProto.FLOAT: 32, onnx.TensorProto.FLOAT16: 16, onnx.TensorProto.BFLOAT16: 16,
               onnx.TensorProto.DOUBLE: 64}


def shared_tensors(model: onnx.ModelProto) -> dict[str, dict]:
    """Weights already in onnxws's shared form: ``Gather(<W>.codebook, ...) -> W`` or ``Expand`` of ``<W>.codebook``.

    Returns ``{W: {"k", "bits", "n_codebooks", "index_dtype", "shape", "params", "stored_bytes"}}``.
    """
    inits = {init.name: init for init in model.graph.initializer}
    found: dict[str, dict] = {}
    for node in model.graph.node:
        if node.op_type not in ("Gather", "Expand") or not node.input:
            continue
        book_name = node.input[0]
        if not book_name.endswith(".codebook") or book_name not in inits:
            continue
        name = node.output[0]
        base = book_name[: -len(".codebook")]
        if name != base:
            continue
        book = inits[book_name]
        size = int(np.prod(book.dims)) if book.dims else 1
        related = [init for n, init in inits.items() if n.startswith(base + ".") and n != book_name]
        index = next((init for init in related if init.name == base + ".indices"), None)
        groups = 1
        offsets = next((init for init in related if init.name.endswith(".offsets")), None)
        if offsets is not None:
            groups = int(np.prod(offsets.dims))
        k = max(size // groups, 1)
        if index is not None:
            index_dtype = onnx.TensorProto.DataType.Name(index.data_type)
            if index.data_type == onnx.TensorProto.UINT8 and len(index.dims) == 1 and node.op_type == "Gather" and \
                    any(init.name.endswith(".shape") for init in related):
                index_dtype = f"packed:{index_bits(k)}"
        else:
            packed = next((init for init in related if "packed" in init.name or "bits" in init.name), None)
            index_dtype = f"packed:{index_bits(k)}" if packed is not None else "none"
        stored = sum(_payload_bytes(init) for init in related) + _payload_bytes(book)
        found[name] = {"k": k, "bits": index_bits(k), "n_codebooks": groups, "index_dtype": index_dtype,
                       "stored_bytes": stored}
    return found


def _payload_bytes(tensor: onnx.TensorProto) -> int:
    if tensor.raw_data:
        return len(tensor.raw_data)
    from onnx import numpy_helper

    return int(numpy_helper.to_array(tensor).nbytes)


def inspect_model(path: str | Path) -> tuple[list[dict], dict]:
    """Rows for every float tensor of the main graph, and summary figures.

    Row keys: name, op_type, shape, params, dtype, status ("shareable" | "skipped" | "shared"),
    reason (skipped), k / bits / index_dtype (shared).
    """
    model = load_model(path)
    discovery = find_weights(model)
    rows: list[dict] = []
    for w in discovery.weights:
        rows.append({"name": w.name, "op_type": w.op_type, "shape": list(w.shape), "params": w.params,
                     "dtype": w.dtype, "status": "shareable", "reason": ""})
    shared = shared_tensors(model)
    producers = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, str] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, node.op_type)
    for name, info in shared.items():
        node = producers[name]
        rows.append({"name": name, "op_type": consumers.get(name, ""), "shape": [], "params": 0, "dtype": "",
                     "status": "shared", "reason": "", **info})
    shared_parts = {f"{name}.{suffix}" for name in shared for suffix in ("codebook", "indices")}
    for s in discovery.skipped:
        if s.name in shared_parts or any(s.name.startswith(n + ".") for n in shared):
            continue
        rows.append({"name": s.name, "op_type": s.op_type, "shape": list(s.shape), "params": s.params,
                     "dtype": s.dtype, "status": "skipped", "reason": s.reason})
    summary = {
        "shareable tensors": len(discovery.weights),
        "shareable params": sum(w.params for w in discovery.weights),
        "skipped tensors": sum(1 for r in rows if r["status"] == "skipped"),
    }
    if shared:
        summary["shared tensors"] = len(shared)
        summary["shared stored bytes"] = sum(v["stored_bytes"] for v in shared.values())
    _ = producers
    return rows, summary
