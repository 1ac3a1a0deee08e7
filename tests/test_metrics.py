"""Metrics: top-1 accuracy and agreement worked out by hand, custom metrics, label checks."""

from __future__ import annotations

import pickle
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxws.data import load_data
from onnxws.errors import InputError
from onnxws.metrics import BUILTIN, CustomMetric, Metric, log_normaliser, reference_key, resolve_metric

# Gemm with W = [[1, 0], [0, 1], [1, 1]] (transB): logits = [x0, x1, x0 + x1]; second output = -logits.
W = np.array([[1, 0], [0, 1], [1, 1]], np.float32)


def gemm_model(classes_dim: int | str = 3) -> onnx.ModelProto:
    nodes = [helper.make_node("Gemm", ["x", "W"], ["logits"], transB=1), helper.make_node("Neg", ["logits"], ["neg"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes_dim]),
                               helper.make_tensor_value_info("neg", TensorProto.FLOAT, ["N", classes_dim])],
                              [numpy_helper.from_array(W, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


X = np.array([[2, -1], [-1, 3], [1, 1], [-2, -3]], np.float32)
# logits: [2,-1,1] -> 0 ; [-1,3,2] -> 1 ; [1,1,2] -> 2 ; [-2,-3,-5] -> 0
# neg:    [-2,1,-1] -> 1 ; [1,-3,-2] -> 0 ; [-1,-1,-2] -> 0 (first max) ; [2,3,5] -> 2


def run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


def test_top1_accuracy_by_hand():
    model = gemm_model()
    data = load_data({"x": X, "y": np.array([0, 1, 0, 0])}, model)
    metric = resolve_metric(None, data, model)
    assert metric.name == "top1_accuracy" and not metric.needs_reference and metric.output == "logits"
    assert metric.fn(run(model, X), dict(data.arrays)) == pytest.approx(3 / 4)


def test_top1_accuracy_on_named_output():
    model = gemm_model()
    data = load_data({"x": X, "y": np.array([1, 0, 0, 1])}, model)
    metric = resolve_metric("top1_accuracy", data, model, output="neg")
    assert metric.output == "neg"
    assert metric.fn(run(model, X), dict(data.arrays)) == pytest.approx(3 / 4)  # neg argmax [1, 0, 0, 2]


def test_top1_agreement_by_hand():
    model = gemm_model()
    data = load_data({"x": X}, model)
    metric = resolve_metric("top1_agreement", data, model)
    assert metric.name == "top1_agreement" and metric.needs_reference
    reference = run(model, X)
    arrays = dict(data.arrays) | {reference_key("logits"): reference[0], reference_key("neg"): reference[1]}
    assert metric.fn(reference, arrays) == 1.0
    # a "compressed" model whose first column lost its weight: logits [0,-1,-1]->0, [0,3,3]->1, [0,1,1]->1, [0,-3,-3]->0
    changed = gemm_model()
    changed.graph.initializer[0].CopyFrom(numpy_helper.from_array(W * np.array([[0], [1], [1]], np.float32), "W"))
    assert metric.fn(run(changed, X), arrays) == pytest.approx(3 / 4)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def probability_model() -> onnx.ModelProto:
    """The Gemm model with a Softmax: outputs 'probs' (probabilities) and 'logits'."""
    nodes = [helper.make_node("Gemm", ["x", "W"], ["logits"], transB=1), helper.make_node("Softmax", ["logits"], ["probs"], axis=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 3]),
                               helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(W, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("output", ["probs", "logits"])
def test_expected_accuracy_is_the_default_without_labels_and_reads_logits_or_probabilities(output):
    """Label-free default: the reference's probability of the candidate's top-1 class. The same
    figure whether the model outputs probabilities (used as they are) or logits (softmaxed)."""
    model = probability_model()
    data = load_data({"x": X}, model)
    metric = resolve_metric(None, data, model, output=output)
    assert metric.name == "expected_accuracy" and metric.needs_reference and metric.output == output
    assert "label-free" in metric.description
    reference = run(model, X)
    arrays = dict(data.arrays) | {reference_key("probs"): reference[0], reference_key("logits"): reference[1]}
    p = _softmax(reference[1].astype(np.float64))
    assert metric.fn(reference, arrays) == pytest.approx(float(np.mean(p.max(axis=1))), abs=1e-6)  # its own top-1
    changed = probability_model()  # first row of W lost: logits [0, x1, x0 + x1], top-1 [2, 1, 2, 0]
    changed.graph.initializer[0].CopyFrom(numpy_helper.from_array(W * np.array([[0], [1], [1]], np.float32), "W"))
    outcomes = metric.fn.outcomes(run(changed, X), arrays)
    np.testing.assert_allclose(outcomes, p[np.arange(4), [2, 1, 2, 0]], rtol=1e-6)
    assert (log_normaliser(reference[0]) is None) and (log_normaliser(reference[1]) is not None)


def test_expected_accuracy_charges_a_near_tie_flip_little_and_a_confident_flip_fully():
    """Two samples flip their top-1: one between near-tied classes (0.50 vs 0.49) costs 0.01, one
    away from a confident class (0.98) costs 0.97; top-1 agreement charges both fully."""
    model = probability_model()
    data = load_data({"x": X[:2]}, model)
    reference_probs = np.array([[0.50, 0.49, 0.01], [0.98, 0.01, 0.01]], np.float32)
    candidate_probs = np.array([[0.40, 0.59, 0.01], [0.01, 0.98, 0.01]], np.float32)  # both flip to class 1
    arrays = dict(data.arrays) | {reference_key("probs"): reference_probs, reference_key("logits"): np.log(reference_probs)}
    expected = resolve_metric("expected_accuracy", data, model)
    agreement = resolve_metric("top1_agreement", data, model)
    np.testing.assert_allclose(expected.fn.outcomes([candidate_probs, np.log(candidate_probs)], arrays), [0.49, 0.01], rtol=1e-5)
    baseline = expected.fn([reference_probs, np.log(reference_probs)], arrays)
    loss_near, loss_confident = 0.50 - 0.49, 0.98 - 0.01
    assert baseline - expected.fn([candidate_probs, None], arrays) == pytest.approx((loss_near + loss_confident) / 2, abs=1e-6)
    assert agreement.fn([candidate_probs, None], arrays) == 0.0  # both count as errors
    # log-probabilities are softmaxed back to the same probabilities
    on_logs = resolve_metric("expected_accuracy", data, model, output="logits")
    np.testing.assert_allclose(on_logs.fn.outcomes([None, np.log(candidate_probs)], arrays), [0.49, 0.01], rtol=1e-5)


def test_expected_accuracy_on_a_sequence_output_is_the_mean_over_positions():
    model = probability_model()
    data = load_data({"x": X[:2]}, model)
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(2, 5, 7)).astype(np.float32)  # [samples, positions, classes] logits
    candidate = reference + rng.normal(scale=0.8, size=reference.shape).astype(np.float32)
    metric = resolve_metric("expected_accuracy", data, model)
    arrays = dict(data.arrays) | {reference_key("probs"): reference}
    p = _softmax(reference.astype(np.float64))
    top = candidate.argmax(axis=-1)
    want = np.take_along_axis(p, top[..., None], axis=-1)[..., 0].mean(axis=1)
    np.testing.assert_allclose(metric.fn.outcomes([candidate], arrays), want, rtol=1e-9)
    with pytest.raises(InputError, match="expected_accuracy needs float class scores"):
        metric.fn.outcomes([np.zeros((2, 5, 7), np.int64)], {reference_key("probs"): np.zeros((2, 5, 7), np.int64)})


@pytest.mark.parametrize("shape", [(64, 7), (64, 5, 7)])
def test_no_candidate_outcome_exceeds_the_expected_accuracy_ceiling(shape):
    """The ceiling a scoring stops early by: the reference's own top-1 probability per sample (per
    position, averaged), which no other top-1 choice can beat; reached exactly by the reference."""
    model = probability_model()
    data = load_data({"x": np.zeros((shape[0], 2), np.float32)}, model)
    metric = resolve_metric("expected_accuracy", data, model)
    rng = np.random.default_rng(4)
    reference = rng.normal(scale=3.0, size=shape).astype(np.float32)
    arrays = dict(data.arrays) | {reference_key("probs"): reference}
    ceiling = metric.outcome_ceiling(metric.fn.outcomes([reference], arrays))
    np.testing.assert_array_equal(ceiling, metric.fn.outcomes([reference], arrays))
    for scale in (0.01, 0.5, 5.0):
        candidate = reference + rng.normal(scale=scale, size=shape).astype(np.float32)
        assert np.all(metric.fn.outcomes([candidate], arrays) <= ceiling)
    assert resolve_metric("top1_agreement", data, model).outcome_ceiling(np.zeros(3)).tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("name", BUILTIN)
def test_built_in_metrics_are_selectable_by_name_in_the_config_too(name):
    from onnxws.config import CompressConfig
    from onnxws.errors import UsageError

    assert CompressConfig(metric=name).metric == name
    with pytest.raises(UsageError, match="one of expected_accuracy, top1_accuracy, top1_agreement"):
        CompressConfig(metric="top5")


def test_unknown_output():
    model = gemm_model()
    data = load_data({"x": X}, model)
    with pytest.raises(InputError, match=r"'probs' is not a model output; outputs are \['logits', 'neg'\]"):
        resolve_metric(None, data, model, output="probs")


def test_accuracy_needs_labels():
    model = gemm_model()
    with pytest.raises(InputError, match="needs integer labels"):
        resolve_metric("top1_accuracy", load_data({"x": X}, model), model)


def test_labels_out_of_range_static_width():
    model = gemm_model()
    data = load_data({"x": X, "y": np.array([0, 1, 3, 0])}, model)
    with pytest.raises(InputError, match=r"span \[0, 3\].*3 classes"):
        resolve_metric(None, data, model)
    negative = load_data({"x": X, "y": np.array([0, -1, 2, 0])}, model)
    with pytest.raises(InputError, match=r"span \[-1, 2\]"):
        resolve_metric(None, negative, model)


def test_labels_out_of_range_dynamic_width_checked_at_evaluation():
    model = gemm_model(classes_dim="C")
    data = load_data({"x": X, "y": np.array([0, 1, 7, 0])}, model)
    metric = resolve_metric(None, data, model)  # width unknown until the model runs
    with pytest.raises(InputError, match="3 classes"):
        metric.fn(run(model, X), dict(data.arrays))


def test_non_classification_output_is_refused_by_top1():
    model = gemm_model()
    data = load_data({"x": X, "y": np.zeros(4, np.int64)}, model)
    metric = resolve_metric(None, data, model)
    with pytest.raises(InputError, match="samples, classes"):
        metric.fn([np.zeros((4, 3, 2), np.float32)], dict(data.arrays))
    # singleton axes are squeezed: [N, 1, 3] reads as [N, 3]
    assert metric.fn([np.array([[[5, 0, 0]]] * 4, np.float32)], dict(data.arrays)) == 1.0


def write_module(tmp_path, monkeypatch, name: str, source: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))


def test_custom_metric_gets_outputs_and_extras(tmp_path, monkeypatch):
    write_module(tmp_path, monkeypatch, "my_metric_ok", """
        import numpy as np
        def score(outputs, data):
            # fraction of samples whose third logit beats the string label's threshold
            assert len(outputs) == 2
            thresholds = np.array([float(s) for s in data["threshold"]])
            return float(np.mean(outputs[0][:, 2] > thresholds))
    """)
    model = gemm_model()
    data = load_data({"x": X, "threshold": np.array(["0", "0", "0", "0"])}, model)
    metric = resolve_metric("my_metric_ok:score", data, model)
    assert metric.name == "my_metric_ok:score" and not metric.needs_reference
    assert metric.fn(run(model, X), dict(data.arrays)) == pytest.approx(3 / 4)  # third logits 1, 2, 2, -5
    clone = pickle.loads(pickle.dumps(metric))  # scale-out: re-imported by name
    assert clone.fn(run(model, X), dict(data.arrays)) == pytest.approx(3 / 4)


def test_custom_metric_errors(tmp_path, monkeypatch):
    write_module(tmp_path, monkeypatch, "my_metric_bad", """
        NOT_CALLABLE = 3
        def nan(outputs, data):
            return float("nan")
        def text(outputs, data):
            return "high"
        def boom(outputs, data):
            raise ZeroDivisionError
    """)
    write_module(tmp_path, monkeypatch, "my_metric_broken", "import does_not_exist_anywhere\n")
    model = gemm_model()
    data = load_data({"x": X}, model)
    with pytest.raises(InputError, match="cannot import module 'no_such_module_xyz'"):
        resolve_metric("no_such_module_xyz:f", data, model)
    with pytest.raises(InputError, match="cannot import module 'my_metric_broken'.*ModuleNotFoundError"):
        resolve_metric("my_metric_broken:f", data, model)
    with pytest.raises(InputError, match="has no attribute 'missing'"):
        resolve_metric("my_metric_bad:missing", data, model)
    with pytest.raises(InputError, match="not a function"):
        resolve_metric("my_metric_bad:NOT_CALLABLE", data, model)
    with pytest.raises(InputError, match="expected expected_accuracy, top1_accuracy, top1_agreement or package"):
        resolve_metric("accuracy", data, model)
    outputs = run(model, X)
    with pytest.raises(InputError, match="finite float"):
        resolve_metric("my_metric_bad:nan", data, model).fn(outputs, {})
    with pytest.raises(InputError, match="returned 'high'"):
        resolve_metric("my_metric_bad:text", data, model).fn(outputs, {})
    with pytest.raises(InputError, match="my_metric_bad:boom raised ZeroDivisionError"):
        resolve_metric("my_metric_bad:boom", data, model).fn(outputs, {})


def test_builtin_metrics_pickle_and_identity():
    model = gemm_model()
    data = load_data({"x": X, "y": np.array([0, 1, 0, 0])}, model)
    metric = resolve_metric(None, data, model)
    clone = pickle.loads(pickle.dumps(metric))
    assert clone.fn(run(model, X), dict(data.arrays)) == pytest.approx(3 / 4)
    assert metric.identity() != resolve_metric(None, data, model, output="neg").identity()
    custom = Metric("m:f", CustomMetric("m:f", lambda o, d: 1.0, "abc"))
    assert "abc" in custom.identity()


METRIC_WITH_NESTED_CODE = """
    import numpy as np

    def margin(out):
        return float(np.mean(out))

    def f(outputs, data):
        names = {"alpha", "beta", "gamma"}            # a frozenset constant
        scale = lambda v: v * 2.0                       # a nested code object
        total = sum(float(o.sum()) for o in outputs)   # another one
        return scale(total) * len(names) + margin(outputs[0])
"""


def _identity_in_a_fresh_process(tmp_path, hash_seed: str) -> str:
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONHASHSEED": hash_seed,
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    code = "from onnxws.metrics import _load_custom; print(_load_custom('my_metric_nested:f').code_hash)"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip()


def test_custom_metric_identity_is_the_same_in_every_process_and_follows_its_module(tmp_path):
    """The score cache keys a custom metric on a hash of its code. ``repr`` of a nested code
    object holds its address and a frozenset's order follows string hashing, so hashing
    ``repr(co_consts)`` gave every process its own key and a rerun never hit the cache (the zoo's
    OCR metric: 0 of 245 scorings cached). Editing a helper the metric calls changes the key."""
    module = tmp_path / "my_metric_nested.py"
    module.write_text(textwrap.dedent(METRIC_WITH_NESTED_CODE))
    first, second = (_identity_in_a_fresh_process(tmp_path, seed) for seed in ("1", "2"))
    assert first and first == second
    module.write_text(textwrap.dedent(METRIC_WITH_NESTED_CODE).replace("np.mean(out)", "np.max(out)"))
    assert _identity_in_a_fresh_process(tmp_path, "1") != first


def test_squared_sum_matches_float64_over_chunks_and_dtypes():
    from onnxws.metrics import _SUM_CHUNK, output_divergence, squared_sum

    rng = np.random.default_rng(0)
    ref = rng.normal(0, 3, (3, _SUM_CHUNK // 2 + 7)).astype(np.float32)  # crosses a chunk boundary
    out = ref + rng.normal(0, 1e-3, ref.shape).astype(np.float32)
    exact_err = float(np.sum((out.astype(np.float64) - ref.astype(np.float64)) ** 2))
    exact_energy = float(np.sum(ref.astype(np.float64) ** 2))
    assert squared_sum(out, ref) == pytest.approx(exact_err, rel=1e-5)
    assert squared_sum(ref) == pytest.approx(exact_energy, rel=1e-12)
    half_out, half_ref = out.astype(np.float16), ref.astype(np.float16)  # fp16 outputs: difference taken in fp32
    assert squared_sum(half_out, half_ref) == pytest.approx(
        float(np.sum((half_out.astype(np.float64) - half_ref.astype(np.float64)) ** 2)), rel=1e-6)
    plain = output_divergence([out], [ref])
    assert plain == pytest.approx(exact_err / exact_energy, rel=1e-5)
    assert output_divergence([out], [ref], [squared_sum(ref)]) == plain
