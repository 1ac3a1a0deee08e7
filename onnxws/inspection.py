"""``onnxws inspect``: every float tensor of a model, shareable or skipped (with why), or shared."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from onnxws.discovery import find_weights
from onnxws.loading import load_model
from onnxws.proto import payload_bytes
from onnxws.sharing import index_bits


def shared_tensors(model: onnx.ModelProto) -> dict[str, dict]:
    """Weights in onnxws's shared form (onnxws.encoding): ``Gather(<W>.codebook, ...) -> W`` or
    ``Expand(<W>.codebook, <W>.shape) -> W`` (k = 1).

    Returns ``{W: {"shape", "params", "k", "bits", "n_codebooks", "index_dtype", "stored_bytes"}}``.
    """
    from onnx import numpy_helper

    inits = {init.name: init for init in model.graph.initializer}
    found: dict[str, dict] = {}
    for node in model.graph.node:
        if node.op_type not in ("Gather", "Expand") or not node.input or not node.output:
            continue
        name = node.output[0]
        book = inits.get(node.input[0])
        if book is None or node.input[0] != f"{name}.codebook":
            continue
        own = {n: init for n, init in inits.items() if n.startswith(name + ".")}
        index = own.get(f"{name}.indices")
        shape_init = own.get(f"{name}.shape")
        offsets = own.get(f"{name}.offsets")
        book_size = int(np.prod(book.dims)) if book.dims else 1
        if node.op_type == "Expand":
            k, groups, index_dtype = 1, 1, "none"
            shape = [int(v) for v in numpy_helper.to_array(shape_init)]
            groups = len(np.unique(numpy_helper.to_array(book)))
        else:
            if offsets is not None:
                values = np.unique(numpy_helper.to_array(offsets))
                k = int(values[1] - values[0]) if len(values) > 1 else book_size
                groups = book_size // k
            else:
                k, groups = book_size, 1
            if index is not None and index.data_type != onnx.TensorProto.UINT8 or shape_init is None:
                index_dtype = onnx.TensorProto.DataType.Name(index.data_type) if index is not None else "?"
                shape = [int(d) for d in index.dims] if index is not None else []
            else:
                index_dtype = f"packed:{int(index.dims[1])}" if index is not None and len(index.dims) == 2 else "UINT8"
                shape = [int(v) for v in numpy_helper.to_array(shape_init)]
        params = int(np.prod(shape)) if shape else 1
        stored = sum(payload_bytes(t) for t in own.values())
        found[name] = {"shape": shape, "params": params, "k": k, "bits": index_bits(k), "n_codebooks": groups,
                       "index_dtype": index_dtype, "stored_bytes": stored}
    return found


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
    consumers: dict[str, str] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, node.op_type)
    dtype_of = {init.name: init.data_type for init in model.graph.initializer}
    for name, info in shared.items():
        rows.append({"name": name, "op_type": consumers.get(name, ""), "dtype": _dtype_name(dtype_of.get(name + ".codebook")),
                     "status": "shared", "reason": "", **info})
    for s in discovery.skipped:
        if any(s.name.startswith(n + ".") for n in shared) or s.name.startswith("onnxws."):
            continue  # the pieces of a shared tensor are listed as that tensor
        rows.append({"name": s.name, "op_type": s.op_type, "shape": list(s.shape), "params": s.params,
                     "dtype": s.dtype, "status": "skipped", "reason": s.reason})
    summary = {
        "shareable tensors": len(discovery.weights),
        "shareable params": sum(w.params for w in discovery.weights),
        "skipped tensors": sum(1 for r in rows if r["status"] == "skipped"),
    }
    if shared:
        full = sum(v["params"] * (16 if r["dtype"] == "float16" else 32) for r, v in
                   ((r, shared[r["name"]]) for r in rows if r["status"] == "shared"))
        theory = sum(v["params"] * v["bits"] + v["n_codebooks"] * v["k"] * 32 for v in shared.values())
        summary["shared tensors"] = len(shared)
        summary["shared params"] = sum(v["params"] for v in shared.values())
        summary["shared stored bytes"] = sum(v["stored_bytes"] for v in shared.values())
        summary["CR over shared tensors (theoretical)"] = round(full / max(theory, 1), 2)
    summary["file bytes"] = Path(path).stat().st_size
    return rows, summary


def _dtype_name(data_type: int | None) -> str:
    return {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16"}.get(data_type, "")
