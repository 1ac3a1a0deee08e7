"""Running compressed models: the keep-compact session gives the same outputs and keeps the decoders."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from graphs import lenet_like
from onnxws.clustering import share_weight_all_k
from onnxws.encoding import encode_model
from onnxws.runtime import open_session


def _optimized_ops(model: onnx.ModelProto, keep_compact: bool, path) -> list[str]:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path)
    open_session(model, keep_compact=keep_compact, session_options=options, providers=["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(str(path)).graph.node]


def test_keep_compact_same_outputs_and_keeps_decoders(tmp_path):
    model = lenet_like(seed=5)
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    shared = [share_weight_all_k("fc.W", weights["fc.W"], [16])[16], share_weight_all_k("conv.W", weights["conv.W"], [8])[8]]
    encoded = encode_model(model, shared).model
    feeds = {"x": np.random.default_rng(0).normal(size=(3, 1, 8, 8)).astype(np.float32)}
    default = open_session(encoded, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    compact = open_session(encoded, keep_compact=True, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(compact, default, rtol=1e-6, atol=1e-6)
    # default: the decoders are folded away at session start; compact: they stay in the graph
    assert "Gather" not in _optimized_ops(encoded, False, tmp_path / "default.onnx")
    assert "Gather" in _optimized_ops(encoded, True, tmp_path / "compact.onnx")
