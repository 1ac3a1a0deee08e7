"""Scoring engine: real ONNX Runtime runs on small graphs, checked against plain ORT runs of the
same model with the candidate's weights baked in."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxws.cache import ScoreCache
from onnxws.data import load_data
from onnxws.errors import InputError, UsageError
from onnxws.metrics import resolve_metric
from onnxws.runtime import cuda_usable, resolve_providers
from onnxws.evaluation import evaluate_model
from onnxws.exploration import Rejected
from onnxws.scoring import Scorer

ENGINES = ["session", "inputs"]
WEIGHTS = ["conv.W", "fc.W"]


def small_net(batch: str | int = "N", seed: int = 0, constant_fc: bool = False) -> onnx.ModelProto:
    """uint8 'input' [batch,1,8,8] -> /255 -> Conv(4@3x3) -> Relu -> Flatten -> Gemm(10) -> 'logits'.

    With ``constant_fc`` the fc weight is the output of a Constant node, not an initializer.
    """
    rng = np.random.default_rng(seed)
    conv_w = rng.normal(0, 0.5, (4, 1, 3, 3)).astype(np.float32)
    fc_w = rng.normal(0, 0.2, (10, 144)).astype(np.float32)
    inits = [
        numpy_helper.from_array(conv_w, "conv.W"),
        numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), "conv.B"),
        numpy_helper.from_array(rng.normal(0, 0.1, 10).astype(np.float32), "fc.B"),
        numpy_helper.from_array(np.array(1 / 255, np.float32), "scale"),
    ]
    nodes = [
        helper.make_node("Cast", ["input"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["xf", "scale"], ["x0"]),
        helper.make_node("Conv", ["x0", "conv.W", "conv.B"], ["c"]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.W", "fc.B"], ["logits"], transB=1),
    ]
    if constant_fc:
        nodes.insert(0, helper.make_node("Constant", [], ["fc.W"], value=numpy_helper.from_array(fc_w)))
    else:
        inits.append(numpy_helper.from_array(fc_w, "fc.W"))
    graph = helper.make_graph(nodes, "small_net", [helper.make_tensor_value_info("input", TensorProto.UINT8, [batch, 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def bake(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` with ``weights`` written into its initializers / Constant nodes."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for tensor in out.graph.initializer:
        if tensor.name in weights:
            tensor.CopyFrom(numpy_helper.from_array(weights[tensor.name], tensor.name))
    for node in out.graph.node:
        if node.op_type == "Constant" and node.output[0] in weights:
            node.attribute[0].t.CopyFrom(numpy_helper.from_array(weights[node.output[0]]))
    return out


def plain_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """An independent stock ORT run of the whole set in one batch."""
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(logits.argmax(axis=1) == labels))


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (300, 1, 8, 8), dtype=np.uint8)


@pytest.fixture(scope="module")
def labelled(images):
    """Model, data with labels = the model's own top-1 (so the baseline is exactly 1.0), metric."""
    model = small_net()
    labels = plain_run(model, {"input": images})[0].argmax(axis=1)
    data = load_data({"input": images, "y": labels}, model)
    return model, data, resolve_metric(None, data, model)


def make_scorer(labelled, engine: str, **kw) -> Scorer:
    model, data, metric = labelled
    kw.setdefault("search_samples", 120)
    return Scorer(model, kw.pop("weights", WEIGHTS), data, metric, device="cpu", engine=engine, threads=1, **kw)


@pytest.mark.parametrize("engine", ENGINES)
def test_candidate_equal_to_originals_scores_exactly_the_baseline(labelled, engine):
    scorer = make_scorer(labelled, engine)
    assert scorer.engine == engine and scorer.provider == "CPUExecutionProvider"
    assert (scorer.n_search, scorer.n_full) == (120, 300)
    assert scorer.baseline_search == 1.0 and scorer.baseline_full == 1.0
    copies = {n: v.copy() for n, v in scorer.originals.items()}
    assert scorer.score([{}, copies]) == [scorer.baseline_search, scorer.baseline_search]
    assert scorer.score([copies], "full") == [scorer.baseline_full]
    outputs = scorer.outputs(copies)
    assert np.array_equal(outputs[0], scorer.reference_outputs("full")[0])
    assert (scorer.scorings, scorer.scorings_run, scorer.scorings_cached) == (3, 3, 0)
    scorer.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_zeroed_weights_change_outputs_and_score(labelled, engine):
    scorer = make_scorer(labelled, engine)
    zeroed = {"conv.W": np.zeros((4, 1, 3, 3), np.float32)}
    out = scorer.outputs(zeroed, "search")[0]
    assert not np.allclose(out, scorer.reference_outputs("search")[0])
    # with a zero conv every sample sees the same features (relu(conv.B)): one class for all
    assert len(np.unique(out.argmax(axis=1))) == 1
    [value] = scorer.score([zeroed])
    assert value < 0.5


@pytest.mark.parametrize("engine", ENGINES + ["auto"])
def test_scores_equal_plain_ort_with_weights_baked_in(labelled, images, engine):
    model, data, _ = labelled
    scorer = make_scorer(labelled, engine)
    rng = np.random.default_rng(7)
    conv, fc = scorer.originals["conv.W"], scorer.originals["fc.W"]
    candidates = [
        {"conv.W": (conv * 0.5).astype(np.float32)},
        {"fc.W": (fc + rng.normal(0, 0.1, fc.shape)).astype(np.float32)},
        {"conv.W": np.round(conv * 2) / 2, "fc.W": np.round(fc * 4) / 4},  # a coarse "shared" tuple
        {"fc.W": np.zeros_like(fc)},
    ]
    for subset, n in (("search", 120), ("full", 300)):
        got = scorer.score(candidates, subset)
        expected = []
        for cand in candidates:
            logits = plain_run(bake(model, cand), {"input": images[:n]})[0]
            expected.append(accuracy(logits, data.labels[:n]))
            np.testing.assert_allclose(scorer.outputs(cand, subset)[0], logits, rtol=1e-5, atol=1e-5)
        assert got == expected
    assert len(set(expected)) > 1  # the candidates really differ


@pytest.mark.parametrize("engine", ENGINES)
def test_only_some_weights_and_big_fixed_initializers(labelled, images, engine):
    """fc.W (5.6 kB, not a candidate weight) is passed as fixed in-memory external data."""
    model, data, _ = labelled
    scorer = make_scorer(labelled, engine, weights=["conv.W"])
    cand = {"conv.W": -scorer.originals["conv.W"]}
    logits = plain_run(bake(model, cand), {"input": images})[0]
    np.testing.assert_allclose(scorer.outputs(cand)[0], logits, rtol=1e-5, atol=1e-5)
    assert scorer.score([cand], "full") == [accuracy(logits, data.labels)]
    with pytest.raises(ValueError, match="not one of the scorer's weights"):
        scorer.score([{"fc.W": scorer.originals["conv.W"]}])


def test_initializers_listed_as_graph_inputs(images):
    """Old exporters list initializers among the graph inputs (overridable defaults)."""
    model = small_net()
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in model.graph.initializer)
    data = load_data({"input": images[:40]}, model)
    assert data.input_names == ["input"]
    scorer = Scorer(model, WEIGHTS, data, resolve_metric(None, data, model), device="cpu", engine="session", threads=1)
    cand = {"conv.W": scorer.originals["conv.W"] * np.float32(3)}
    np.testing.assert_allclose(scorer.outputs(cand)[0], plain_run(bake(small_net(), cand), {"input": images[:40]})[0], rtol=1e-5, atol=1e-5)


def test_scorer_leaves_the_model_untouched(labelled):
    model = labelled[0]
    before = model.SerializeToString()
    make_scorer(labelled, "auto").score([{"conv.W": np.zeros((4, 1, 3, 3), np.float32)}])
    assert model.SerializeToString() == before


def test_bad_candidates(labelled):
    scorer = make_scorer(labelled, "session")
    with pytest.raises(ValueError, match="original is float32\\[4, 1, 3, 3\\]"):
        scorer.score([{"conv.W": np.zeros((4, 1, 3, 3), np.float64)}])
    with pytest.raises(ValueError, match="decode to the original"):
        scorer.score([{"conv.W": np.zeros((4, 9), np.float32)}])
    with pytest.raises(ValueError, match="subset"):
        scorer.score([{}], "train")


def test_bad_options(labelled):
    with pytest.raises(UsageError, match="search-samples"):
        make_scorer(labelled, "session", search_samples=0)
    with pytest.raises(UsageError, match="engine"):
        make_scorer(labelled, "turbo")
    with pytest.raises(InputError, match=r"\['nope'\]"):
        make_scorer(labelled, "session", weights=["nope"])


@pytest.mark.parametrize("engine", ENGINES)
def test_constant_node_weight(images, engine):
    model = small_net(constant_fc=True)
    data = load_data({"input": images[:50]}, model)
    metric = resolve_metric("top1_agreement", data, model)  # no labels: agreement with the original
    scorer = Scorer(model, WEIGHTS, data, metric, device="cpu", engine=engine, threads=1)
    assert scorer.baseline_search == 1.0
    fc_b = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "fc.B"))
    out = scorer.outputs({"fc.W": np.zeros((10, 144), np.float32)})[0]
    np.testing.assert_allclose(out, np.broadcast_to(fc_b, (50, 10)), rtol=0, atol=1e-7)  # Gemm with W=0 is its bias
    half = {"fc.W": scorer.originals["fc.W"] * np.float32(0.5), "conv.W": scorer.originals["conv.W"][::-1].copy()}
    ref = plain_run(model, {"input": images[:50]})[0]
    baked = plain_run(bake(model, half), {"input": images[:50]})[0]
    np.testing.assert_allclose(scorer.outputs(half)[0], baked, rtol=1e-5, atol=1e-5)
    assert scorer.score([half]) == [float(np.mean(baked.argmax(1) == ref.argmax(1)))]


def two_in_two_out() -> onnx.ModelProto:
    """a, b [N,4] -> out1 = (a + b) @ W [4,3];  out2 = b @ V [4,2]."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.normal(size=(4, 2)).astype(np.float32), "V")]
    nodes = [helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("MatMul", ["s", "W"], ["out1"]),
             helper.make_node("MatMul", ["b", "V"], ["out2"])]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4]),
                                              helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("out1", TensorProto.FLOAT, ["N", 3]),
                               helper.make_tensor_value_info("out2", TensorProto.FLOAT, ["N", 2])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("engine", ENGINES)
def test_two_inputs_two_outputs(engine):
    model = two_in_two_out()
    rng = np.random.default_rng(4)
    feeds = {"a": rng.normal(size=(40, 4)).astype(np.float32), "b": rng.normal(size=(40, 4)).astype(np.float32)}
    y = rng.integers(0, 2, 40)
    data = load_data({**feeds, "y": y}, model)
    metric = resolve_metric(None, data, model, output="out2")
    scorer = Scorer(model, ["W", "V"], data, metric, device="cpu", engine=engine, batch_size=16, threads=1)
    cand = {"W": np.ones((4, 3), np.float32), "V": np.array([[1, 0], [0, 1], [1, 0], [0, 1]], np.float32)}
    out1, out2 = scorer.outputs(cand)
    # by hand: out1 rows are sum(a + b) in every column; out2 = [b0 + b2, b1 + b3]
    np.testing.assert_allclose(out1, np.repeat((feeds["a"] + feeds["b"]).sum(1, keepdims=True), 3, axis=1), rtol=1e-5)
    np.testing.assert_allclose(out2, np.stack([feeds["b"][:, 0] + feeds["b"][:, 2], feeds["b"][:, 1] + feeds["b"][:, 3]], 1), rtol=1e-5)
    assert scorer.score([cand]) == [accuracy(out2, y)]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("batch", [1, 4])
def test_fixed_batch_models(images, engine, batch):
    """Fixed batch 1 runs sample by sample; fixed 4 runs in chunks of 4, the last (10 = 4+4+2) padded."""
    model = small_net(batch=batch)
    data = load_data({"input": images[:10]}, model)
    scorer = Scorer(model, WEIGHTS, data, resolve_metric("top1_agreement", data, model), device="cpu", engine=engine, batch_size=100, threads=1)
    assert scorer.batch_size == batch
    cand = {"conv.W": scorer.originals["conv.W"] * np.float32(-1)}
    dynamic = bake(small_net(batch="N"), cand)  # same seed: same weights, dynamic batch
    expected = plain_run(dynamic, {"input": images[:10]})[0]
    got = scorer.outputs(cand)[0]
    assert got.shape == (10, 10)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert scorer.baseline_search == 1.0


def test_batch_size_does_not_change_results(labelled):
    a = make_scorer(labelled, "session", batch_size=7)
    b = make_scorer(labelled, "session")
    assert (a.batch_size, b.batch_size) == (7, 1000)
    cand = {"conv.W": a.originals["conv.W"] * np.float32(0.7)}
    np.testing.assert_allclose(a.outputs(cand)[0], b.outputs(cand)[0], rtol=1e-5, atol=1e-6)
    assert a.score([cand], "full") == b.score([cand], "full")


def test_fp16_weights():
    w = np.random.default_rng(5).normal(size=(4, 3)).astype(np.float16)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["out"])], "h",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT16, ["N", 3])],
                              [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(6).normal(size=(20, 4)).astype(np.float16)
    data = load_data({"x": x}, model)
    scorer = Scorer(model, ["W"], data, resolve_metric(None, data, model), device="cpu", engine="session", threads=1)
    cand = {"W": (w * 2).astype(np.float16)}
    np.testing.assert_allclose(scorer.outputs(cand)[0].astype(np.float32), plain_run(bake(model, cand), {"x": x})[0].astype(np.float32), rtol=1e-3)


def test_agreement_metric_and_evaluate_model(images):
    model = small_net()
    data = load_data({"input": images}, model)
    metric = resolve_metric("top1_agreement", data, model)
    scorer = Scorer(model, WEIGHTS, data, metric, device="cpu", search_samples=100, threads=1)
    assert scorer.baseline_search == 1.0 and scorer.baseline_full == 1.0
    cand = {"fc.W": np.round(scorer.originals["fc.W"] * 2) / 2}
    baked = bake(model, cand)
    ref = plain_run(model, {"input": images})[0].argmax(1)
    expected = float(np.mean(plain_run(baked, {"input": images})[0].argmax(1) == ref))
    assert expected < 1.0
    assert scorer.score([cand], "full") == [expected]
    # the emitted model, measured as a user would run it, against the scorer's reference outputs
    assert evaluate_model(baked, data, metric, device="cpu", reference=scorer) == expected
    with pytest.raises(InputError, match="reference"):
        evaluate_model(baked, data, metric, device="cpu")


def test_expected_accuracy_is_the_label_free_default_of_the_scorer(images):
    """Without labels the scorer measures the reference's probability of each candidate's top-1:
    the unmodified model scores the mean of its top probability, a candidate less, and the
    emitted model measured in stock ORT scores what the scorer said."""
    model = small_net()
    data = load_data({"input": images}, model)
    metric = resolve_metric(None, data, model)
    assert metric.name == "expected_accuracy"
    scorer = Scorer(model, WEIGHTS, data, metric, device="cpu", search_samples=100, threads=1)
    logits = plain_run(model, {"input": images})[0].astype(np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert scorer.baseline_full == pytest.approx(float(p.max(1).mean()), rel=1e-6)
    np.testing.assert_allclose(scorer.baseline_outcomes("full"), p.max(1), rtol=1e-6)
    cand = {"fc.W": np.round(scorer.originals["fc.W"] * 2) / 2}
    baked = bake(model, cand)
    top = plain_run(baked, {"input": images})[0].argmax(1)
    expected = float(p[np.arange(len(top)), top].mean())
    assert scorer.score([cand], "full")[0] == pytest.approx(expected, rel=1e-6) and expected < scorer.baseline_full
    assert evaluate_model(baked, data, metric, device="cpu", reference=scorer) == scorer.score([cand], "full")[0]


def test_held_out_samples_are_a_subset_of_their_own(labelled):
    """``holdout=h``: the full set is the samples before the last h, which form the ``holdout``
    subset; the search never reaches them and their baseline is measured apart."""
    model, data, metric = labelled
    scorer = Scorer(model, WEIGHTS, data, metric, device="cpu", search_samples=500, holdout=60, threads=1)
    assert (scorer.n_search, scorer.n_full, scorer.n_holdout) == (240, 240, 60)
    assert scorer.subset_data("holdout").n == 60 and scorer.baseline("holdout") == 1.0  # labels are its own top-1
    cand = {"conv.W": scorer.originals["conv.W"] * np.float32(-1)}
    plain = Scorer(model, WEIGHTS, data.tail(60), metric, device="cpu", threads=1)
    assert scorer.score([cand], "holdout") == plain.score([cand], "full")
    assert scorer.key(cand, "holdout") != scorer.key(cand, "full")
    with pytest.raises(UsageError, match="at least one"):
        Scorer(model, WEIGHTS, data, metric, device="cpu", holdout=300, threads=1)
    with pytest.raises(ValueError, match="nothing is held out"):
        plain.score([cand], "holdout")


def test_cache_second_scorer_reruns_nothing(labelled, tmp_path):
    path = tmp_path / "scores.sqlite"
    originals = make_scorer(labelled, "session").originals
    candidates = [{"conv.W": originals["conv.W"] * np.float32(f)} for f in (0.25, 0.5, -1.0)]
    with ScoreCache(path) as cache:
        first = make_scorer(labelled, "session", cache=cache)
        values = first.score(candidates)
        assert (first.scorings, first.scorings_run, first.scorings_cached) == (3, 3, 0)
        assert first.score(candidates[:1]) == values[:1]  # memoised in-process
        assert (first.scorings, first.scorings_run, first.scorings_cached) == (4, 3, 1)
    with ScoreCache(path) as cache:
        second = make_scorer(labelled, "inputs", cache=cache)  # the engine is not part of the key
        assert second.score(candidates) == values
        assert second.scorings_cached == second.scorings == 3 and second.scorings_run == 0
        second.score(candidates[:1], "full")  # other subset: a miss
        second.score([{"conv.W": originals["conv.W"] * np.float32(0.3)}])  # other candidate: a miss
        assert second.scorings_run == 2
        third = make_scorer(labelled, "session", cache=cache, search_samples=100)  # other subset size: a miss
        third.score(candidates[:1])
        assert (third.scorings_run, third.scorings_cached) == (1, 0)


def test_model_ort_cannot_run_is_an_input_error():
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["out"])], "bad",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "K"])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(np.ones((4, 3), np.float32), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = load_data({"x": np.ones((5, 6), np.float32)}, model)  # K = 6 does not fit W's 4 rows
    with pytest.raises(InputError, match="ONNX Runtime cannot run the model"):
        Scorer(model, ["W"], data, resolve_metric(None, data, model), device="cpu", threads=1)


def test_resolve_providers():
    assert resolve_providers("cpu") == (["CPUExecutionProvider"], "CPUExecutionProvider")
    with pytest.raises(UsageError, match="gpu"):
        resolve_providers("gpu")
    if cuda_usable():
        pytest.skip("a GPU is usable here")
    assert resolve_providers("auto") == (["CPUExecutionProvider"], "CPUExecutionProvider")
    with pytest.raises(InputError, match=r"--device cuda: no usable GPU .*install onnxws\[gpu\] or use --device cpu"):
        resolve_providers("cuda")


# ---- suffix runs (one weight changed: only the nodes downstream of it run) ---------------------


def test_suffix_runs_equal_whole_model_runs(labelled, images):
    model, data, _ = labelled
    whole = make_scorer(labelled, "session", reuse_activations=False)
    suffix = make_scorer(labelled, "session")
    rng = np.random.default_rng(11)
    candidates = [{name: (value + rng.normal(0, 0.3, value.shape)).astype(np.float32)}
                  for name, value in whole.originals.items() for _ in range(3)]
    for subset, n in (("search", 120), ("full", 300)):
        assert suffix.score(candidates, subset) == whole.score(candidates, subset)
        for cand in candidates[:1] + candidates[3:4]:
            np.testing.assert_allclose(suffix._run_suffix(cand, subset)[0], plain_run(bake(model, cand), {"input": images[:n]})[0],
                                       rtol=1e-5, atol=1e-5)
    assert whole.scorings_suffix == 0
    assert suffix.scorings_suffix == 12 and suffix.scorings_run == 12
    # two weights changed at once: the whole model runs
    suffix.score([{**candidates[0], **candidates[3]}])
    assert suffix.scorings_suffix == 12 and suffix.scorings_run == 13


def test_suffix_respects_the_activation_budget(labelled):
    scorer = make_scorer(labelled, "session", activation_budget=0)
    whole = make_scorer(labelled, "session", reuse_activations=False)
    cand = {"fc.W": scorer.originals["fc.W"] * np.float32(-1)}
    assert scorer.score([cand]) == whole.score([cand])
    assert scorer.scorings_suffix == 0


def test_suffix_with_an_output_the_weight_does_not_reach():
    """Changing W reaches out1 only: out2 comes from the cached prefix. V is read next to a graph input: whole run."""
    model = two_in_two_out()
    rng = np.random.default_rng(4)
    feeds = {"a": rng.normal(size=(30, 4)).astype(np.float32), "b": rng.normal(size=(30, 4)).astype(np.float32)}
    data = load_data(feeds, model)
    scorer = Scorer(model, ["W", "V"], data, resolve_metric("top1_agreement", data, model, output="out2"),
                    device="cpu", engine="session", batch_size=8, threads=1)
    w = {"W": np.ones((4, 3), np.float32)}
    out1, out2 = scorer._run_suffix(w, "search")
    baked = plain_run(bake(model, w), feeds)
    np.testing.assert_allclose(out1, baked[0], rtol=1e-5)
    np.testing.assert_array_equal(out2, scorer.reference_outputs("search")[1])
    assert scorer.score([w]) == [1.0]  # out2 is untouched
    assert scorer.scorings_suffix == 1
    v = {"V": -scorer.originals["V"]}
    assert scorer._run_suffix(v, "search") is None
    assert scorer.score([v]) == [0.0]  # out2 = b @ -V: with two columns every arg-max flips
    assert scorer.scorings_suffix == 1


def clipped_convs() -> onnx.ModelProto:
    """x -> Conv(W1) -> Clip(0, 6) -> Conv(W2) -> Clip(0, 6) -> GlobalAveragePool -> Flatten -> Gemm(Wf):
    MobileNetV2's ReLU6, whose min / max come from Constant nodes (shared by both Clips)."""
    rng = np.random.default_rng(11)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.normal(0, 0.3, (8, 8, 1, 1)).astype(np.float32), "W2"),
             numpy_helper.from_array(rng.normal(0, 0.5, (5, 8)).astype(np.float32), "Wf")]
    nodes = [helper.make_node("Constant", [], ["lo"], value=numpy_helper.from_array(np.array(0, np.float32))),
             helper.make_node("Constant", [], ["hi6"], value=numpy_helper.from_array(np.array(6, np.float32))),
             helper.make_node("Conv", ["x", "W1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["c1", "lo", "hi6"], ["r1"]),
             helper.make_node("Conv", ["r1", "W2"], ["c2"]),
             helper.make_node("Clip", ["c2", "lo", "hi6"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "Wf"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "clipped", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_suffix_computes_its_constants_itself():
    """The Clips' Constant min / max belong to the suffix, not to its inputs (as inputs, ORT could
    not fuse the Clip into its Conv: MobileNetV2's first-layer suffix ran 2.2x slower than the whole
    model), and the suffix scores what the whole model scores."""
    from onnxws.engines import plan_cut, prepare

    model = clipped_convs()
    x = np.random.default_rng(12).normal(size=(40, 3, 6, 6)).astype(np.float32)
    data = load_data({"x": x}, model)
    cut = plan_cut(prepare(model, ["W1", "W2", "Wf"]), frozenset({"W2"}))
    assert cut.boundary == ["r1"] and cut.activations == ["r1"]
    assert [n.op_type for n in cut.suffix_nodes] == ["Constant", "Constant", "Conv", "Clip", "GlobalAveragePool", "Flatten", "Gemm"]
    metric = resolve_metric("expected_accuracy", data, model)
    suffix = Scorer(model, ["W1", "W2", "Wf"], data, metric, device="cpu", engine="session", threads=1)
    whole = Scorer(model, ["W1", "W2", "Wf"], data, metric, device="cpu", engine="session", threads=1, reuse_activations=False)
    rng = np.random.default_rng(13)
    candidates = [{"W2": suffix.originals["W2"] + rng.normal(0, s, (8, 8, 1, 1)).astype(np.float32)} for s in (0.05, 0.3, 1.0)]
    np.testing.assert_allclose(suffix.score(candidates), whole.score(candidates), rtol=1e-6)
    assert suffix.scorings_suffix == 3 and whole.scorings_suffix == 0
    for cand in candidates:
        np.testing.assert_allclose(suffix._run_suffix(cand, "search")[0], plain_run(bake(model, cand), {"x": x})[0], rtol=1e-5, atol=1e-6)


def if_model() -> onnx.ModelProto:
    """h = Relu(x); If(flag) then h @ W else h @ W2: W is read from inside a subgraph (outer scope)."""
    rng = np.random.default_rng(8)
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    then_g = helper.make_graph([helper.make_node("MatMul", ["h", "W"], ["y_then"])], "then", [],
                               [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, ["N", 3])])
    else_g = helper.make_graph([helper.make_node("MatMul", ["h", "W2"], ["y_else"])], "else", [],
                               [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, ["N", 3])])
    nodes = [helper.make_node("Relu", ["x"], ["h"]),
             helper.make_node("If", ["flag"], ["y"], then_branch=then_g, else_branch=else_g)]
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "W2"),
             numpy_helper.from_array(np.array(True), "flag")]
    graph = helper.make_graph(nodes, "ifm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])], [out], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_suffix_follows_weights_read_inside_subgraphs():
    model = if_model()
    x = np.random.default_rng(9).normal(size=(25, 4)).astype(np.float32)
    data = load_data({"x": x}, model)
    scorer = Scorer(model, ["W", "W2"], data, resolve_metric(None, data, model), device="cpu", engine="session", threads=1)
    cand = {"W": np.eye(4, 3, dtype=np.float32)}
    got = scorer._run_suffix(cand, "search")
    assert got is not None  # the If node depends on W through its then-branch
    np.testing.assert_allclose(got[0], np.maximum(x, 0)[:, :3], rtol=1e-6)  # relu(x) @ eye = first 3 columns
    unused_branch = {"W2": np.zeros((4, 3), np.float32)}  # else-branch: not taken, outputs unchanged
    np.testing.assert_allclose(scorer._run_suffix(unused_branch, "search")[0], scorer.reference_outputs("search")[0], rtol=1e-6)


def test_suffix_on_fixed_batch_padding(images):
    model = small_net(batch=4)
    data = load_data({"input": images[:10]}, model)
    scorer = Scorer(model, WEIGHTS, data, resolve_metric("top1_agreement", data, model), device="cpu", engine="session", threads=1)
    cand = {"fc.W": scorer.originals["fc.W"][::-1].copy()}
    expected = plain_run(bake(small_net(), cand), {"input": images[:10]})[0]
    got = scorer._run_suffix(cand, "search")[0]
    assert got.shape == (10, 10)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    ref = plain_run(small_net(), {"input": images[:10]})[0]
    assert scorer.score([cand]) == [float(np.mean(expected.argmax(1) == ref.argmax(1)))]


@pytest.mark.parametrize("engine", ENGINES)
def test_divergence_comes_from_the_same_run_and_is_cached(labelled, tmp_path, engine):
    """The output divergence of a candidate is the relative squared error of its logits vs the
    unmodified model's, 0 for the original weights, growing with the perturbation, and served
    with the value from the cache."""
    from onnxws.metrics import output_divergence

    with ScoreCache(tmp_path / "scores.sqlite") as cache:
        scorer = make_scorer(labelled, engine, cache=cache)
        w = scorer.originals["conv.W"]
        noise = np.random.default_rng(1).normal(0, 1, w.shape).astype(np.float32)
        candidates = [{}, {"conv.W": w + np.float32(0.01) * noise}, {"conv.W": w + np.float32(0.1) * noise}]
        pairs = scorer.score_with_divergence(candidates, "full")
        assert [v for v, _ in pairs] == scorer.score(candidates, "full")
        assert pairs[0] == (scorer.baseline_full, 0.0)
        assert 0 < pairs[1][1] < pairs[2][1]
        ref = scorer.reference_outputs("full")[0].astype(np.float64)
        out = scorer.outputs(candidates[2], "full")[0].astype(np.float64)
        assert pairs[2][1] == pytest.approx(np.sum((out - ref) ** 2) / np.sum(ref ** 2), rel=1e-9)
        assert output_divergence([out], [ref]) == pytest.approx(pairs[2][1], rel=1e-9)  # the scorer subtracts in float32
        again = make_scorer(labelled, engine, cache=cache)
        assert again.score_with_divergence(candidates, "full") == pairs
        assert again.scorings_run == 0 and again.scorings_cached == 3


@pytest.mark.parametrize("engine", ENGINES)
def test_spread_counts_the_samples_flipped_either_way(labelled, tmp_path, engine):
    """The spread of a top-1 candidate is the fraction of samples whose correctness changed
    (lost or gained) vs the unmodified model, from the same run, and cached with the value."""
    with ScoreCache(tmp_path / "scores.sqlite") as cache:
        scorer = make_scorer(labelled, engine, cache=cache)
        w = scorer.originals["conv.W"]
        noise = np.random.default_rng(2).normal(0, 1, w.shape).astype(np.float32)
        candidates = [{}, {"conv.W": w + np.float32(0.5) * noise}]
        triples = scorer.score_with_divergence(candidates, "full", spread=True)
        assert triples[0][2] == 0.0
        y = labelled[1].labels
        before = scorer.reference_outputs("full")[0].argmax(axis=1) == y
        after = scorer.outputs(candidates[1], "full")[0].argmax(axis=1) == y
        assert triples[1][2] == pytest.approx(np.mean(before != after), abs=1e-12) and triples[1][2] > 0
        assert triples[1][2] >= abs(triples[0][0] - triples[1][0]) - 1e-12  # flips either way >= net loss
        again = make_scorer(labelled, engine, cache=cache)
        assert again.score_with_divergence(candidates, "full", spread=True) == triples
        assert again.scorings_run == 0


def test_candidates_may_be_a_generator_decoded_one_at_a_time(labelled):
    """The pipeline hands over a generator: each candidate is scored (and dropped) before the next
    is made, with the same results as a list."""
    scorer = make_scorer(labelled, "session")
    w = scorer.originals["fc.W"]
    made: list[int] = []

    def lazy():
        for i, scale in enumerate((0.5, -1.0, 2.0)):
            assert scorer.scorings == i  # the previous candidate was scored before this one exists
            made.append(i)
            yield {"fc.W": w * np.float32(scale)}

    from_generator = scorer.score_with_divergence(lazy(), "search")
    fresh = make_scorer(labelled, "session")
    assert made == [0, 1, 2]
    assert from_generator == fresh.score_with_divergence([{"fc.W": w * np.float32(s)} for s in (0.5, -1.0, 2.0)], "search")
    full = scorer.baseline_full
    scorer.close()
    assert scorer.originals == {} and scorer.baseline_full == full == fresh.baseline_full  # weights released, baselines kept


def test_growing_the_search_subset_equals_a_scorer_built_with_it(labelled):
    """After ``grow_search(n)`` the search scorings (values, divergences, suffix runs from the
    activation cache) are those of a scorer built with ``search_samples=n``; nothing measured on
    the smaller subset is reused, and grown to the full set, search and full keys coincide."""
    rng = np.random.default_rng(5)
    grown = make_scorer(labelled, "session", search_samples=60)
    candidates = [{name: (value + rng.normal(0, 0.3, value.shape)).astype(np.float32)}
                  for name, value in grown.originals.items() for _ in range(2)]
    small = grown.score_with_divergence(candidates)
    key_small = grown.key(candidates[0])
    grown.grow_search(200)
    fresh = make_scorer(labelled, "session", search_samples=200)
    assert grown.n_search == 200 and grown.baseline_search == fresh.baseline_search
    assert grown.key(candidates[0]) == fresh.key(candidates[0]) != key_small
    values = grown.score_with_divergence(candidates, spread=True)
    assert values == fresh.score_with_divergence(candidates, spread=True)
    assert [v[:2] for v in values] != small
    assert np.array_equal(grown.reference_outputs("search")[0], fresh.reference_outputs("search")[0])
    assert grown.scorings_suffix == 2 * len(candidates)  # suffix runs on both subsets, none reused
    grown.grow_search(10_000)  # clipped to the full set: the same measurement as "full"
    assert grown.n_search == grown.n_full == 300
    assert grown.key(candidates[0], "search") == grown.key(candidates[0], "full")
    assert grown.score(candidates, "search") == grown.score(candidates, "full")
    with pytest.raises(ValueError, match="already has 300"):
        grown.grow_search(100)
    grown.close()


class _LookAheadExecutor:
    """Draws every candidate of a request before measuring any (as a pool that keeps its workers
    busy does) and measures them with the scorer's own sessions, last first, yielding in order."""

    name = "look-ahead"

    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer
        self.measured = 0

    def measure(self, candidates, subset, reject_below=None):
        drawn = list(candidates)
        measurements = [self.scorer.measure(c, subset, reject_below) for c in reversed(drawn)][::-1]
        self.measured += len(drawn)
        yield from measurements

    def close(self) -> None:
        pass


def test_an_executor_that_draws_ahead_gives_the_same_scores(labelled):
    """The scorer keeps keys, memo and counters: an executor that draws a whole request ahead
    gets each distinct candidate once (a repeat inside the request waits for the first) and the
    scores are those of the in-process executor, in submission order."""
    rng = np.random.default_rng(7)
    local = make_scorer(labelled, "session")
    originals = local.originals
    distinct = [{"conv.W": originals["conv.W"] + rng.normal(0, 0.2, originals["conv.W"].shape).astype(np.float32)}
                for _ in range(3)] + [{"fc.W": originals["fc.W"] * np.float32(0.5)}]
    request = [distinct[0], distinct[1], distinct[0], distinct[2], distinct[3], distinct[1]]
    expected = local.score_with_divergence(request, spread=True)
    ahead = make_scorer(labelled, "session")
    ahead.executor = _LookAheadExecutor(ahead)
    assert ahead.score_with_divergence(request, spread=True) == expected
    assert ahead.executor.measured == 4 and ahead.scorings_run == local.scorings_run == 4
    assert ahead.scorings == 6 and ahead.scorings_cached == local.scorings_cached == 2
    assert ahead.scorings_suffix == local.scorings_suffix == 4  # each changes one weight
    assert ahead.score([distinct[2]]) == [expected[3][0]] and ahead.executor.measured == 4  # memo
    local.close()
    ahead.close()


class Spent(Exception):
    """What the test's stop raises (a spent time budget)."""


def test_a_stop_between_batches_interrupts_the_scoring_in_progress(labelled):
    scorer = make_scorer(labelled, "session", search_samples=120, batch_size=40)  # 3 batches a scoring
    candidates = [{"fc.W": scorer.originals["fc.W"] * f} for f in (0.5, 0.25, 0.1)]
    calls = []

    def stop():  # the time budget runs out during the second candidate's second batch
        calls.append(1)
        if len(calls) == 5:
            raise Spent

    with pytest.raises(Spent):
        scorer.score_with_divergence(candidates, stop=stop)
    assert scorer.scorings_run == 1  # the first candidate was measured; the interrupted one is not stored
    fresh = make_scorer(labelled, "session", search_samples=120, batch_size=40)
    assert scorer.score(candidates) == fresh.score(candidates)  # nothing half-measured is reused
    assert scorer.scorings_run == 3 and len(calls) == 5  # no stop given: the scorer no longer calls it


def test_a_pool_of_workers_measures_what_the_scorer_measures_in_process(labelled):
    """compress --jobs N: the same measurements in submission order, from spawned workers that
    each built their own scorer; a grown subset reaches the workers."""
    local = make_scorer(labelled, "session", search_samples=120, batch_size=40)
    pooled = make_scorer(labelled, "session", search_samples=120, batch_size=40)
    pooled.use_pool(2)
    assert pooled.executor.name == "pool"
    rng = np.random.default_rng(3)
    candidates = [{"fc.W": local.originals["fc.W"] * f} for f in (0.5, 0.25)]  # one weight: suffix runs
    candidates += [{n: (a + rng.normal(0, 0.2, a.shape)).astype(np.float32) for n, a in local.originals.items()}
                   for _ in range(3)]
    def same(a, b):  # metric values and spreads exactly; divergences (float64 sums over ORT outputs) to 1e-12
        return all(x[0] == y[0] and x[2:] == y[2:] and x[1] == pytest.approx(y[1], rel=1e-12) for x, y in zip(a, b))

    try:
        assert same(pooled.score_with_divergence(candidates, spread=True), local.score_with_divergence(candidates, spread=True))
        assert same(pooled.score_with_divergence(candidates, "full"), local.score_with_divergence(candidates, "full"))
        local.grow_search(200)
        pooled.grow_search(200)
        assert pooled.score(candidates) == local.score(candidates)
        assert pooled.scorings_run == local.scorings_run == 15 and pooled.scorings_suffix == local.scorings_suffix
    finally:
        pooled.close()
        local.close()


def _perturbed(scorer: Scorer, name: str, scales) -> list[dict[str, np.ndarray]]:
    """Candidates that add ever larger noise to one weight (a single weight: suffix runs)."""
    rng = np.random.default_rng(3)
    original = scorer.originals[name]
    spread = float(np.std(original))
    return [{name: (original + rng.normal(0, s * spread, original.shape)).astype(np.float32)} for s in scales]


@pytest.mark.parametrize("metric_name", ["top1_accuracy", "expected_accuracy", "top1_agreement"])
@pytest.mark.parametrize("engine", ENGINES)
def test_early_stopping_never_rejects_what_the_full_evaluation_accepts(labelled, metric_name, engine):
    """Each candidate scored to the end, then again with thresholds around its value: a stop only
    where the full value is below the threshold, with a bound at or above the full value, and
    the same exact value wherever it was not stopped."""
    model, data, _ = labelled
    metric = resolve_metric(metric_name, data, model)
    exact = Scorer(model, WEIGHTS, data, metric, device="cpu", engine=engine, threads=1, search_samples=300)
    bounded = Scorer(model, WEIGHTS, data, metric, device="cpu", engine=engine, threads=1, search_samples=300)
    candidates = [*_perturbed(exact, "conv.W", [0.05, 0.3, 1.0, 3.0]), *_perturbed(exact, "fc.W", [0.1, 0.5, 2.0]),
                  {"conv.W": np.zeros((4, 1, 3, 3), np.float32), "fc.W": exact.originals["fc.W"] * 0.5}]
    values = [v for v, _ in exact.score_with_divergence(candidates)]
    assert max(values) > min(values) + 0.1  # the candidates span a range of losses
    stopped = 0
    # Highest first: a candidate measured to the end is memoised, and lower thresholds then reuse it.
    for threshold in sorted({*values, *(v + 0.02 for v in values), *(v - 0.02 for v in values), 0.9, 0.5}, reverse=True):
        results = bounded.score_with_divergence(candidates, reject_below=threshold)
        for value, result in zip(values, results):
            if isinstance(result, Rejected):
                stopped += 1
                assert value < threshold, (threshold, value, result)
                assert value <= result.value_at_most + 1e-12 and result.value_at_most < threshold
                assert 0 < result.samples < 300
            else:
                assert result[0] == value
    assert stopped > 0  # a threshold well above a candidate's value stops it early
    assert bounded.scorings_stopped_early > 0
    exact.close()
    bounded.close()


def test_a_rejection_is_neither_cached_nor_taken_for_a_score(labelled, tmp_path):
    cache = ScoreCache(tmp_path / "scores.sqlite")
    scorer = make_scorer(labelled, "session", cache=cache, search_samples=300)
    [bad] = _perturbed(scorer, "conv.W", [3.0])
    [exact_value] = scorer.score([bad])  # measured to the end first: the bound must not replace it
    fresh = make_scorer(labelled, "session", search_samples=300)
    [rejected] = fresh.score_with_divergence([bad], reject_below=exact_value + 0.2)
    assert isinstance(rejected, Rejected) and rejected.value_at_most >= exact_value
    [again] = fresh.score_with_divergence([bad], reject_below=exact_value + 0.2)  # answered by the rejection
    assert again == rejected and fresh.scorings_run == 1
    assert fresh.score([bad]) == [exact_value]  # no threshold: measured to the end
    assert fresh.scorings_run == 2 and fresh.scorings_stopped_early == 1
    scorer.close()
    fresh.close()
