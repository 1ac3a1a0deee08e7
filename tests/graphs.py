"""Small ONNX graphs built in the tests (real models, random weights, fixed seeds)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def lenet_like(seed: int = 0, opset: int = 17, batch: str | int = "N") -> onnx.ModelProto:
    """Conv(4@3x3) -> Relu -> Flatten -> Gemm(10) on [N,1,8,8] float input: shareable conv.W, fc.W."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (4, 1, 3, 3)).astype(np.float32), "conv.W"),
        numpy_helper.from_array(rng.normal(0, 0.1, (4,)).astype(np.float32), "conv.B"),
        numpy_helper.from_array(rng.normal(0, 0.2, (10, 4 * 6 * 6)).astype(np.float32), "fc.W"),
        numpy_helper.from_array(rng.normal(0, 0.1, (10,)).astype(np.float32), "fc.B"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv.W", "conv.B"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.W", "fc.B"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "lenet_like",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def labelled_data(model: onnx.ModelProto, n: int = 200, seed: int = 1) -> dict[str, np.ndarray]:
    """Inputs for lenet_like and labels = the model's own argmax (so the baseline is 100%)."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, 1, 8, 8)).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x})[0].argmax(axis=1).astype(np.int64)
    return {"x": x, "y": y}
