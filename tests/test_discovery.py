"""Shareable-weight discovery on small graphs: what is shared, what is skipped and why."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphs import lenet_like
from onnxws.config import CompressConfig
from onnxws.discovery import constant_tensors, find_weights, weight_values


def _reasons(discovery):
    return {s.name: s.reason for s in discovery.skipped}


def test_lenet_like_weights_and_biases():
    d = find_weights(lenet_like())
    assert [w.name for w in d.weights] == ["fc.W"]  # conv.W has 36 elements < min_params 64
    reasons = _reasons(d)
    assert "36 elements < min_params 64" in reasons["conv.W"]
    fc = d.weights[0]
    assert (fc.op_type, fc.shape, fc.params, fc.dtype, fc.source, fc.channel_axis) == ("Gemm", (10, 144), 1440, "float32", "initializer", 0)


def test_min_params_from_config_and_skip_pattern():
    cfg = CompressConfig.from_dict({"global": {"min_params": 16}, "tensor": {"fc.*": {"skip": True}}})
    d = find_weights(lenet_like(), cfg.settings_for)
    assert [w.name for w in d.weights] == ["conv.W"]
    assert "excluded by config" in _reasons(d)["fc.W"]


def _matmul_model(b_values: np.ndarray, *, as_constant: bool = False, shared_twice: bool = False,
                  through_transpose: bool = False) -> onnx.ModelProto:
    nodes, inits = [], []
    b_name = "B"
    if as_constant:
        nodes.append(helper.make_node("Constant", [], ["B"], value=numpy_helper.from_array(b_values, "B")))
    else:
        inits.append(numpy_helper.from_array(b_values, "B"))
    if through_transpose:
        nodes.append(helper.make_node("Transpose", ["B"], ["Bt"], perm=[1, 0]))
        b_name = "Bt"
    nodes.append(helper.make_node("MatMul", ["x", b_name], ["y"]))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if shared_twice:
        nodes.append(helper.make_node("MatMul", ["x", b_name], ["y2"]))
        outputs.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, None))
    dim = b_values.shape[1] if through_transpose else b_values.shape[0]
    graph = helper.make_graph(nodes, "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dim])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_constant_node_weight_is_found_with_its_value():
    values = np.arange(128, dtype=np.float32).reshape(16, 8)
    model = _matmul_model(values, as_constant=True)
    d = find_weights(model)
    assert [(w.name, w.source, w.channel_axis) for w in d.weights] == [("B", "constant", 1)]
    np.testing.assert_array_equal(weight_values(model, "B"), values)


def test_weight_shared_by_two_nodes_is_one_layer():
    d = find_weights(_matmul_model(np.ones((16, 8), np.float32), shared_twice=True))
    assert len(d.weights) == 1 and len(d.weights[0].consumers) == 2


def test_weight_through_transpose_is_found():
    d = find_weights(_matmul_model(np.ones((8, 16), np.float32), through_transpose=True))
    assert [w.name for w in d.weights] == ["B"] and d.weights[0].channel_axis == 0


def test_nan_and_fp16_and_int_tensors():
    values = np.ones((16, 8), np.float32)
    values[3, 3] = np.nan
    d = find_weights(_matmul_model(values))
    assert not d.weights and "NaN/Inf" in _reasons(d)["B"]
    d16 = find_weights(_matmul_model(np.ones((16, 8), np.float16)))
    assert d16.weights[0].dtype == "float16"


def test_norm_and_reshape_inputs_are_skipped_with_reason():
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(128,)).astype(np.float32), "scale"),
        numpy_helper.from_array(rng.normal(size=(128,)).astype(np.float32), "bias"),
        numpy_helper.from_array(rng.normal(size=(128, 128)).astype(np.float32), "lookup"),
        numpy_helper.from_array(np.array([2, 3], np.int64), "idx"),
    ]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "scale", "bias"], ["n"], axis=-1),
        helper.make_node("Gather", ["lookup", "idx"], ["g"]),
        helper.make_node("Add", ["n", "g"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 128])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    d = find_weights(model)
    reasons = _reasons(d)
    assert not d.weights
    assert "normalization parameter" in reasons["scale"]
    assert "constant indices" in reasons["lookup"]


def test_embedding_gather_is_shared():
    table = np.random.default_rng(0).normal(size=(100, 16)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["y"])]
    graph = helper.make_graph(nodes, "emb", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(table, "emb")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert [w.op_type for w in find_weights(model).weights] == ["Gather"]


def test_constant_tensors_lists_initializers_and_constants():
    model = _matmul_model(np.ones((16, 8), np.float32), as_constant=True)
    assert constant_tensors(model)["B"][1] == "constant"
