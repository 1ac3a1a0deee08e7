"""Bias correction: the corrected bias cancels the mean output shift that sharing causes on the
measured inputs, what is left is the covariance error the refinement predicts, and the
pipeline scores and writes weight and bias together."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxws
from onnxws.clustering import share_weight
from onnxws.data import load_data
from onnxws.encoding import encode_model
from onnxws.metrics import Metric
from onnxws.refinement import Bias, measure_moments, plan, refine
from onnxws.scoring import Scorer
from onnxws.sharing import Granularity

from graphs import labelled_data, lenet_like

rng = np.random.default_rng(0)
CASES = {
    # grouped, strided, padded 2-D convolution with its bias B
    "conv": ([helper.make_node("Conv", ["x", "W", "B"], ["y"], group=2, strides=[2, 1], pads=[1, 0, 1, 2])],
             [None, 4, 9, 9], rng.normal(0, 0.3, (6, 2, 3, 3)).astype(np.float32), (6,), 4),
    # Gemm with alpha and beta: the bias moves by alpha / beta times the output shift
    "gemm": ([helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1, alpha=0.5, beta=2.0)],
             [None, 12], rng.normal(0, 0.3, (7, 12)).astype(np.float32), (1, 7), 2),
    # Conv without bias feeding an inference BatchNormalization (unit scale and variance): B is its running mean
    "conv_bn": ([helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
                 helper.make_node("BatchNormalization", ["c", "S", "Beta", "B", "V"], ["y"])],
                [None, 3, 7, 7], rng.normal(0, 0.3, (5, 3, 3, 3)).astype(np.float32), (5,), 4),
    # MatMul on a 3-D input followed by Add of a constant (the exporters' Linear)
    "matmul_add": ([helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["B", "m"], ["y"])],
                   [None, 5, 12], rng.normal(0, 0.3, (12, 7)).astype(np.float32), (7,), 3),
}


def _model(nodes: list[onnx.NodeProto], x_shape: list, w: np.ndarray, b: np.ndarray, y_rank: int) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")]
    if any(node.op_type == "BatchNormalization" for node in nodes):  # y = (c - B) / sqrt(V + eps) * 1 + 0 = c - B
        channels = b.shape[0]
        inits += [numpy_helper.from_array(np.ones(channels, np.float32), "S"), numpy_helper.from_array(np.zeros(channels, np.float32), "Beta"),
                  numpy_helper.from_array(np.full(channels, 1 - 1e-5, np.float32), "V")]
    graph = helper.make_graph(nodes, "one_layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * y_rank)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _run(model: onnx.ModelProto, tensors: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    for init in changed.graph.initializer:
        if init.name in tensors:
            init.CopyFrom(numpy_helper.from_array(tensors[init.name], init.name))
    sess = ort.InferenceSession(changed.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0].astype(np.float64)


def _moments(model: onnx.ModelProto, x: np.ndarray):
    data = load_data({"x": x}, model)
    mean_output = Metric("mean_output", lambda outputs, _: float(np.mean(outputs[0])))  # any metric: not scored here
    scorer = Scorer(model, ["W", "B"], data, mean_output, device="cpu", threads=1, batch_size=7, search_samples=len(x))
    try:
        shape = tuple(scorer.originals["W"].shape)
        refine_plan = plan(model, {"W": shape})
        moments = measure_moments(lambda names: scorer.activations(names), refine_plan, {"W": shape},
                                  scorer.n_batches(), rows=10**7)
    finally:
        scorer.close()
    return refine_plan, moments["W"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_corrected_bias_cancels_the_mean_output_shift(case):
    nodes, x_shape, w, b_shape, y_rank = CASES[case]
    b = rng.normal(0, 0.5, b_shape).astype(np.float32)
    model = _model(nodes, x_shape, w, b, y_rank)
    shape = [d if d is not None else 23 for d in x_shape]
    # Inputs far from zero mean: sharing shifts every output channel's mean.
    x = (np.random.default_rng(1).normal(0, 1, shape) + np.linspace(0.5, 2, shape[-1])).astype(np.float32)
    refine_plan, moments = _moments(model, x)
    scale = {"gemm": 0.25, "conv_bn": -1.0}.get(case, 1.0)
    assert refine_plan.biases == {"W": Bias("B", scale)} and refine_plan.bias_reasons == {}
    reference = _run(model, {}, x)
    channel_axis = 1 if case.startswith("conv") else reference.ndim - 1
    out_axis = 1 if case == "matmul_add" else 0
    for shared in (share_weight("W", w, 4), share_weight("W", w, 2, Granularity("channel"), out_axis)):
        plain, _, plain_start = refine(shared, w, moments)
        corrected, error, start = refine(shared, w, moments, bias=(refine_plan.biases["W"], b))
        assert corrected.bias_name == "B" and corrected.bias.dtype == b.dtype and corrected.bias.shape == b.shape
        assert plain.bias is None and set(plain.tensors()) == {"W"} and set(corrected.tensors()) == {"W", "B"}
        change = _run(model, corrected.tensors(), x) - reference
        other = tuple(a for a in range(change.ndim) if a != channel_axis)
        spread = np.sqrt(np.mean(change ** 2, axis=other))
        assert np.all(np.abs(change.mean(axis=other)) <= 1e-4 * (1 + spread)), case  # no mean shift left
        positions = change.size // change.shape[channel_axis]
        alpha = 0.5 if case == "gemm" else 1.0  # the error is the weight product's, before Gemm's alpha
        assert alpha ** 2 * error == pytest.approx(float(np.sum(change ** 2)) / positions, rel=1e-4), case
        # per channel (w - w')^T C (w - w') = (w - w')^T H (w - w') - ((w - w') . E[x])^2: the k-means form
        # loses its mean shift, and refinement only lowers what is left
        assert error <= start < plain_start


def test_biases_that_cannot_be_corrected_say_why():
    w = rng.normal(0, 0.3, (8, 8)).astype(np.float32)
    b = np.zeros(8, np.float32)
    inits = [numpy_helper.from_array(w, n) for n in ("W1", "W2", "W3", "W4", "W5")] + \
            [numpy_helper.from_array(b, n) for n in ("B1", "B3", "B4")]
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "B1"], ["g1"]),
        helper.make_node("Gemm", ["g1", "W2"], ["g2"]),  # no bias
        helper.make_node("Gemm", ["g2", "W3", "B3"], ["g3"], beta=0.0),  # bias ignored
        helper.make_node("Add", ["g3", "B1"], ["a"]),  # B1 is read twice
        helper.make_node("MatMul", ["a", "W4"], ["m4"]),  # product read by Add and Relu
        helper.make_node("Add", ["m4", "B4"], ["a4"]),
        helper.make_node("Relu", ["m4"], ["r4"]),
        helper.make_node("Sub", ["a4", "r4"], ["s"]),
        helper.make_node("Gemm", ["s", "W5"], ["g5"]),  # W5 read by two nodes
        helper.make_node("Gemm", ["g5", "W5"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    refine_plan = plan(model, {name: (8, 8) for name in ("W1", "W2", "W3", "W4", "W5")})
    assert refine_plan.biases == {}
    reasons = refine_plan.bias_reasons
    assert "read elsewhere" in reasons["W1"] and "has no bias" in reasons["W2"] and "beta is 0" in reasons["W3"]
    assert "not followed by one Add" in reasons["W4"] and "several consumers" in reasons["W5"]


def test_compress_scores_and_writes_weight_and_bias_together(tmp_path):
    model = lenet_like(seed=6)
    data = labelled_data(model, n=300)
    before = model.SerializeToString()
    on = onnxws.compress(model, data, loss=1.0, cache=False, search_samples=200)
    off = onnxws.compress(model, data, loss=1.0, cache=False, search_samples=200, bias_correction=False)
    assert model.SerializeToString() == before  # the input model is not modified
    refinement = on.report["refinement"]
    assert refinement["bias_correction"] and refinement["bias_corrected"] == {"fc.W": "fc.B"}
    assert [(l["name"], l["bias_corrected"], l["bias"]) for l in on.report["layers"]] == [("fc.W", True, "fc.B")]
    emitted = {t.name: numpy_helper.to_array(t) for t in on.model.graph.initializer}
    shared = {sw.name: sw for sw in on.shared}
    assert np.array_equal(emitted["fc.B"], shared["fc.W"].bias)
    assert not np.array_equal(emitted["fc.B"], numpy_helper.to_array(model.graph.initializer[3]))
    assert np.array_equal(emitted["conv.B"], numpy_helper.to_array(model.graph.initializer[1]))  # conv.W is not shared
    # the emitted model measures what the scorer measured (the pipeline refuses a drift), within budget
    assert on.report["final"]["loss"] <= 1.0 + 1e-9
    assert not off.report["refinement"]["bias_correction"] and off.report["refinement"]["bias_corrected"] == {}
    layer = off.report["layers"][0]
    assert layer["refined"] and not layer["bias_corrected"] and "--no-bias-correction" in layer["bias_reason"]
    emitted_off = {t.name: numpy_helper.to_array(t) for t in off.model.graph.initializer}
    assert np.array_equal(emitted_off["fc.B"], numpy_helper.to_array(model.graph.initializer[3]))


def test_encoding_writes_a_corrected_bias_held_in_a_constant_node():
    w = rng.normal(0, 0.3, (6, 16)).astype(np.float32)
    b = rng.normal(0, 0.3, (6,)).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["B"], value=numpy_helper.from_array(b, "B")),
             helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 6])], [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    corrected = b + 1.0
    shared = share_weight("W", w, 4)
    shared = type(shared)(**{**shared.__dict__, "bias_name": "B", "bias": corrected})
    encoded = encode_model(model, [shared]).model
    onnx.checker.check_model(encoded, full_check=True)
    x = rng.normal(0, 1, (5, 16)).astype(np.float32)
    got = ort.InferenceSession(encoded.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ shared.decode().T + corrected, rtol=1e-5, atol=1e-5)
    with pytest.raises(onnxws.InputError, match="corrected bias"):
        encode_model(model, [type(shared)(**{**shared.__dict__, "bias": corrected[:3]})])
