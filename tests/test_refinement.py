"""Output-aware refinement: measured input moments predict the real output change, refined
candidates keep the encoding and never raise that error, and the pipeline wires it end to end."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxws
from onnxws.clustering import share_weight
from onnxws.data import load_data
from onnxws.exploration import within_budget
from onnxws.metrics import Metric, resolve_metric
from onnxws.refinement import measure_moments, plan, refine
from onnxws.scoring import Scorer
from onnxws.sharing import Granularity

from graphs import labelled_data, lenet_like


def _model(node: onnx.NodeProto, x_shape: list, w: np.ndarray, y_rank: int) -> onnx.ModelProto:
    graph = helper.make_graph([node], "one_layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * y_rank)],
                              [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _run(model: onnx.ModelProto, weight: np.ndarray, x: np.ndarray) -> np.ndarray:
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    changed.graph.initializer[0].CopyFrom(numpy_helper.from_array(weight, "W"))
    sess = ort.InferenceSession(changed.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _moments(model: onnx.ModelProto, x: np.ndarray, seed: int = 0, rows: int = 10**7):
    data = load_data({"x": x}, model)
    mean_output = Metric("mean_output", lambda outputs, _: float(np.mean(outputs[0])))  # any metric: not scored here
    scorer = Scorer(model, ["W"], data, mean_output, device="cpu", threads=1, batch_size=7, search_samples=len(x))
    try:
        shape = tuple(scorer.originals["W"].shape)
        refine_plan = plan(model, {"W": shape})
        assert refine_plan.reasons == {}
        moments = measure_moments(lambda names: scorer.activations(names), refine_plan, {"W": shape},
                                  scorer.n_batches(), seed=seed, rows=rows)
    finally:
        scorer.close()
    return moments["W"]


rng = np.random.default_rng(0)
CASES = {
    # grouped, strided, dilated, asymmetrically padded 2-D convolution
    "conv2d": (helper.make_node("Conv", ["x", "W"], ["y"], group=2, strides=[2, 1], dilations=[1, 2], pads=[1, 0, 1, 2]),
               [None, 4, 9, 9], rng.normal(0, 0.3, (6, 2, 3, 3)).astype(np.float32), 4),
    "conv1d_same": (helper.make_node("Conv", ["x", "W"], ["y"], strides=[2], auto_pad="SAME_UPPER"),
                    [None, 3, 20], rng.normal(0, 0.3, (5, 3, 4)).astype(np.float32), 3),
    "matmul_3d": (helper.make_node("MatMul", ["x", "W"], ["y"]), [None, 5, 12], rng.normal(0, 0.3, (12, 7)).astype(np.float32), 3),
    "gemm_transB": (helper.make_node("Gemm", ["x", "W"], ["y"], transB=1), [None, 12], rng.normal(0, 0.3, (7, 12)).astype(np.float32), 2),
    "gemm_transA": (helper.make_node("Gemm", ["x", "W"], ["y"], transA=1), [12, None], rng.normal(0, 0.3, (12, 7)).astype(np.float32), 2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_output_error_from_measured_moments_equals_the_real_output_change(case):
    node, x_shape, w, y_rank = CASES[case]
    model = _model(node, x_shape, w, y_rank)
    batch_axis = 1 if case == "gemm_transA" else 0
    shape = [d if d is not None else 23 for d in x_shape]
    # Correlated, non-centred inputs: H is far from a multiple of the identity.
    x = (np.random.default_rng(1).normal(0, 1, shape) + np.linspace(-1, 2, shape[-1])).astype(np.float32)
    if batch_axis == 1:  # Gemm transA reads x as [inputs, rows]: the data's axis 0 is the batch, so feed one run
        model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 23
    moments = _moments(model, x)
    reference = _run(model, w, x)
    for shared in (share_weight("W", w, 4), share_weight("W", w, 2, Granularity("channel"), 0 if case != "matmul_3d" and case != "gemm_transA" else 1)):
        refined, error, start = refine(shared, w, moments)
        for candidate, predicted in ((shared, start), (refined, error)):
            change = _run(model, candidate.decode(), x) - reference
            channel_axis = 1 if node.op_type == "Conv" else change.ndim - 1
            positions = change.size // change.shape[channel_axis]
            measured = float(np.sum(change.astype(np.float64) ** 2)) / positions
            assert predicted == pytest.approx(measured, rel=1e-4), (case, candidate.granularity)
        assert error <= start


def test_refined_candidates_keep_the_encoding_and_lower_the_output_error():
    model = lenet_like(seed=3)
    data = labelled_data(model, n=300)
    moments = _moments_of(model, data, "fc.W")
    original = numpy_helper.to_array(model.graph.initializer[2])
    for k in (2, 4, 16):
        for granularity in (Granularity("tensor"), Granularity("channel")):
            shared = share_weight("fc.W", original, k, granularity, 0)
            refined, error, start = refine(shared, original, moments)
            assert refined.k == k and refined.codebooks.shape == shared.codebooks.shape
            assert refined.codebooks.dtype == np.float32 and refined.indices.dtype == shared.indices.dtype
            assert refined.indices.max() < k
            assert np.array_equal(refined.decode(), refined.codebooks.reshape(-1)[
                refined.indices.astype(np.int64) + refined.group_ids() * k])
            assert error < 0.8 * start, (k, granularity)  # inputs after a ReLU: far from white


def test_float16_weights_refine_to_float16_codebooks():
    model = lenet_like(seed=4)
    data = labelled_data(model, n=200)
    moments = _moments_of(model, data, "fc.W")
    original = numpy_helper.to_array(model.graph.initializer[2]).astype(np.float16)
    shared = share_weight("fc.W", original, 4)
    refined, error, start = refine(shared, original, moments)
    assert refined.codebooks.dtype == np.float16 and error <= start


def test_codebook_refit_is_the_least_squares_optimum_for_its_indices():
    model = lenet_like(seed=5)
    data = labelled_data(model, n=300)
    moments = _moments_of(model, data, "fc.W")
    original = numpy_helper.to_array(model.graph.initializer[2]).astype(np.float64)
    refined, _, _ = refine(share_weight("fc.W", original.astype(np.float32), 4), original.astype(np.float32), moments)
    h = moments.h[0]
    masks = [(refined.indices == c).astype(np.float64) for c in range(4)]
    a = np.array([[np.sum((mc @ h) * md) for md in masks] for mc in masks])
    b = np.array([np.sum((mc @ h) * original) for mc in masks])
    optimum = np.linalg.solve(a, b)
    assert np.allclose(refined.codebooks[0], optimum, rtol=1e-4, atol=1e-6)


def _moments_of(model: onnx.ModelProto, data: dict, name: str):
    eval_data = load_data(data, model)
    scorer = Scorer(model, [name], eval_data, resolve_metric(None, eval_data, model), device="cpu", threads=1)
    try:
        shape = tuple(scorer.originals[name].shape)
        refine_plan = plan(model, {name: shape})
        return measure_moments(lambda names: scorer.activations(names), refine_plan, {name: shape}, scorer.n_batches())[name]
    finally:
        scorer.close()


def test_weights_of_other_ops_are_not_refined_and_say_why():
    emb = numpy_helper.from_array(np.random.default_rng(0).normal(0, 1, (50, 8)).astype(np.float32), "emb")
    proj = numpy_helper.from_array(np.random.default_rng(1).normal(0, 1, (8, 4)).astype(np.float32), "proj")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["emb", "ids"], ["e"]), helper.make_node("MatMul", ["e", "proj"], ["y"]),
         helper.make_node("MatMul", ["proj", "z"], ["w"])],
        "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [None]),
              helper.make_tensor_value_info("z", TensorProto.FLOAT, [4, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4]), helper.make_tensor_value_info("w", TensorProto.FLOAT, [8, 3])],
        [emb, proj])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = plan(model, {"emb": (50, 8), "proj": (8, 4)})
    assert result.probes == {}
    assert "Gather" in result.reasons["emb"]
    assert "first operand" in result.reasons["proj"]  # also read as MatMul's first operand


def test_sampled_moments_are_deterministic_for_a_seed():
    node, x_shape, w, y_rank = CASES["conv2d"]
    model = _model(node, x_shape, w, y_rank)
    x = np.random.default_rng(2).normal(0, 1, (23, 4, 9, 9)).astype(np.float32)
    a, b = _moments(model, x, seed=7, rows=100), _moments(model, x, seed=7, rows=100)
    c = _moments(model, x, seed=8, rows=100)
    assert a.rows == b.rows and np.array_equal(a.h, b.h) and not np.array_equal(a.h, c.h)


def test_compress_reports_refinement_and_no_refine_turns_it_off():
    model = lenet_like(seed=6)
    data = labelled_data(model, n=300)
    on = onnxws.compress(model, data, loss=1.0, cache=False, search_samples=200)
    off = onnxws.compress(model, data, loss=1.0, cache=False, search_samples=200, refine=False)
    assert on.report["refinement"]["enabled"] and on.report["refinement"]["refined"] == ["fc.W"]  # conv.W: under min_params
    assert all(layer["refined"] and layer["refine_reason"] is None for layer in on.report["layers"])
    assert all(c["output_error"] is not None for layer in on.report["layers"] for c in layer["candidates"])
    assert not off.report["refinement"]["enabled"] and off.report["refinement"]["refined"] == []
    assert all(not layer["refined"] and "--no-refine" in layer["refine_reason"] for layer in off.report["layers"])
    for result in (on, off):
        assert within_budget(result.report["final"]["loss"], 1.0)


def test_lstm_weights_are_refined_from_the_input_and_hidden_sequences():
    layout = 0  # ORT runs time-major LSTMs only (layout=1 fails at session creation)
    rng = np.random.default_rng(layout)
    hidden, inputs, steps, n = 6, 5, 7, 40
    w = rng.normal(0, 0.4, (1, 4 * hidden, inputs)).astype(np.float32)
    r = rng.normal(0, 0.4, (1, 4 * hidden, hidden)).astype(np.float32)
    x_shape = [steps, n, inputs]
    node = helper.make_node("LSTM", ["x", "W", "R"], ["y", "y_h"], hidden_size=hidden, layout=layout)
    graph = helper.make_graph([node], "lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y_h", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(r, "R")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = rng.normal(0, 1, x_shape).astype(np.float32)
    eval_data = load_data({"x": x}, model)
    metric = Metric("mean_output", lambda outputs, _: float(np.mean(outputs[0])))
    scorer = Scorer(model, ["W", "R"], eval_data, metric, device="cpu", threads=1, batch_size=steps)
    shapes = {"W": w.shape, "R": r.shape}
    try:
        refine_plan = plan(model, shapes)
        assert sorted(refine_plan.probes) == ["R", "W"]
        moments = measure_moments(lambda names: scorer.activations(names), refine_plan, shapes, scorer.n_batches())
        sequence = scorer.activations(["y"]).__next__()["y"]
    finally:
        scorer.close()
    # W's moments are those of the inputs; R's those of the hidden states before the last step.
    xs = x.reshape(-1, inputs).astype(np.float64)
    assert np.allclose(moments["W"].h[0], xs.T @ xs / len(xs), rtol=1e-5, atol=1e-6)
    hs = sequence[:-1].reshape(-1, hidden).astype(np.float64)  # the whole sequence is one run
    assert np.allclose(moments["R"].h[0], hs.T @ hs / len(hs), rtol=1e-5, atol=1e-6)
    for name, values in (("W", w), ("R", r)):
        shared = share_weight(name, values, 4)
        refined, error, start = refine(shared, values, moments[name])
        assert error < start and refined.codebooks.shape == (1, 4)


def test_activations_read_in_groups_when_a_batch_would_not_fit():
    model = lenet_like(seed=7)
    data = load_data(labelled_data(model, n=50), model)
    scorer = Scorer(model, ["fc.W"], data, resolve_metric(None, data, model), device="cpu", threads=1, batch_size=20,
                    search_samples=50)
    try:
        names = ["x", "c", "f"]
        whole = list(scorer.activations(names))
        grouped = list(scorer.activations(names, max_bytes=1))  # every name is a group of its own
        with pytest.raises(ValueError, match="no tensor named"):
            list(scorer.activations(["nope"]))
    finally:
        scorer.close()
    assert len(whole) == scorer.n_batches() == 3 and all(set(batch) == set(names) for batch in whole)
    assert len(grouped) == 3 * len(names) and all(len(batch) == 1 for batch in grouped)
    for name in names:
        joined = np.concatenate([batch[name] for batch in grouped if name in batch])
        assert np.array_equal(joined, np.concatenate([batch[name] for batch in whole])) and len(joined) == 50


def test_weights_too_large_to_refine_say_why():
    proj = numpy_helper.from_array(np.zeros((8192, 10), np.float32), "head")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "head"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8192])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 10])], [proj])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    # 10 x 8192^2 multiply-adds per pass is cheap, factoring the 8192 x 8192 H is not
    assert "too large to refine" in plan(model, {"head": (8192, 10)}).reasons["head"]
