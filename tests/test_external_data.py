"""Models with external data: read them, and write outputs as external data when they are too large."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxws
import onnxws.loading as loading
import onnxws.proto as proto
from graphs import labelled_data, lenet_like
from onnxws.errors import InputError


def test_compress_a_model_stored_with_external_data(tmp_path):
    model = lenet_like(seed=2)
    data = labelled_data(model, n=300)
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.data", size_threshold=0)
    assert (tmp_path / "ext.data").exists()
    result = onnxws.compress(path, data, loss=2.0, cache=False, search_samples=300,
                             config=onnxws.CompressConfig.from_dict({"global": {"min_params": 16}}))
    assert result.report["final"]["loss"] <= 2.0
    # bytes_before counts the external data file too
    assert result.report["compression"]["bytes_before"] == path.stat().st_size + (tmp_path / "ext.data").stat().st_size


def test_large_outputs_are_written_as_external_data(tmp_path, monkeypatch):
    model = lenet_like(seed=4)
    monkeypatch.setattr(proto, "PROTO_LIMIT", 1000)  # pretend the model is over protobuf's 2 GB limit
    out = tmp_path / "big.onnx"
    size = loading.save_model_atomic(model, out)
    data_file = tmp_path / "big.onnx.data"
    assert data_file.exists() and size == out.stat().st_size + data_file.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]  # no temp files left
    reloaded = onnx.load(str(out))  # resolves big.onnx.data beside it
    x = np.random.default_rng(0).normal(size=(2, 1, 8, 8)).astype(np.float32)
    a = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    b = ort.InferenceSession(reloaded.SerializeToString()).run(None, {"x": x})[0]
    assert a.tobytes() == b.tobytes()
    assert model.graph.initializer[0].data_location == onnx.TensorProto.DEFAULT  # the caller's model is untouched


# Models over protobuf's 2 GB limit cannot be serialised (with upb even ByteSize() raises), so the
# checker, the hash and the writer work on light copies. These tests pretend a small model is large
# by lowering the limit; tools/bench_large_model.py runs a real 2.15 GB model through the CLI.


def _large(monkeypatch) -> None:
    monkeypatch.setattr(proto, "PROTO_LIMIT", 1000)


def _if_model() -> onnx.ModelProto:
    """lenet_like plus an If whose branches hold an initializer and a Constant (nested tensors)."""
    model = lenet_like(seed=5)
    big = np.arange(300, dtype=np.float32).reshape(3, 100)
    then_graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["t_w"], ["branch_out"])], "then", [],
                                        [onnx.helper.make_tensor_value_info("branch_out", onnx.TensorProto.FLOAT, [3, 100])],
                                        [onnx.numpy_helper.from_array(big, "t_w")])
    else_graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Constant", [], ["branch_out"], value=onnx.numpy_helper.from_array(-big, "e_w"))], "else", [],
        [onnx.helper.make_tensor_value_info("branch_out", onnx.TensorProto.FLOAT, [3, 100])])
    graph = model.graph
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(True), "cond"))
    graph.node.append(onnx.helper.make_node("If", ["cond"], ["side"], then_branch=then_graph, else_branch=else_graph))
    graph.output.append(onnx.helper.make_tensor_value_info("side", onnx.TensorProto.FLOAT, [3, 100]))
    onnx.checker.check_model(model, full_check=True)
    return model


def test_payload_bytes_come_from_shapes():
    t = onnx.numpy_helper.from_array(np.zeros((3, 4), np.float32), "t")
    assert proto.payload_bytes(t) == 48
    u4 = onnx.helper.make_tensor("u", onnx.TensorProto.UINT4, [5], [1, 2, 3, 4, 5])
    assert proto.payload_bytes(u4) == 3  # 5 x 4 bits, packed
    ext = onnx.TensorProto(name="e", data_type=onnx.TensorProto.FLOAT, dims=[1000], data_location=onnx.TensorProto.EXTERNAL)
    proto.set_external(ext, "w.data", 0, 4000)
    assert proto.payload_bytes(ext) == 4000
    # Every tensor counts, nested ones too: lenet_like (4,1,3,3)+(4)+(10,144)+(10) floats, cond, 2 x 300 floats.
    model = _if_model()
    assert sum(proto.payload_bytes(t) for t in proto.tensors(model)) == 4 * (36 + 4 + 1440 + 10) + 1 + 2 * 1200


def test_large_model_is_checked_without_serialising_it(monkeypatch):
    model = _if_model()
    assert proto.fits_in_one_message(model)
    _large(monkeypatch)
    assert not proto.fits_in_one_message(model)
    light, swapped = proto.light_copy(model, lambda t, field: proto.payload_bytes(t) >= 1024)
    assert sorted(s.name for s, _ in swapped) == ["e_w", "fc.W", "t_w"]  # initializers, subgraph ones and attributes
    assert all(not t.HasField("raw_data") and list(t.dims) == list(s.dims) for s, t in swapped)
    then_branch = next(a.g for a in model.graph.node[-1].attribute if a.name == "then_branch")
    assert then_branch.initializer[0].HasField("raw_data")  # the original is untouched
    loading.check_model(model)  # passes through the light copy
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    broken.graph.node[0].input[1] = "does_not_exist"
    with pytest.raises(InputError, match="fails the ONNX checker"):
        loading.check_model(broken, "broken")


def test_large_model_hash_is_deterministic_and_covers_the_weights(monkeypatch):
    model = _if_model()
    small_hash = loading.model_sha256(model)
    _large(monkeypatch)
    large_hash = loading.model_sha256(model)
    assert large_hash == loading.model_sha256(model) and large_hash != small_hash
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    fc = next(t for t in changed.graph.initializer if t.name == "fc.W")
    values = onnx.numpy_helper.to_array(fc).copy()
    values[0, 0] += 1.0
    fc.CopyFrom(onnx.numpy_helper.from_array(values, "fc.W"))
    assert loading.model_sha256(changed) != large_hash


def test_large_output_streams_initializers_aligned_and_reloads(tmp_path, monkeypatch):
    model = _if_model()
    big = np.random.default_rng(0).normal(size=(300_000,)).astype(np.float32)  # 1.2 MB: aligned offset
    model.graph.initializer.append(onnx.numpy_helper.from_array(big, "big"))
    _large(monkeypatch)
    out = tmp_path / "m.onnx"
    size = loading.save_model_atomic(model, out)
    assert size == out.stat().st_size + (tmp_path / "m.onnx.data").stat().st_size
    shallow = onnx.load(str(out), load_external_data=False)
    where = {t.name: {e.key: e.value for e in t.external_data} for t in proto.tensors(shallow)
             if t.data_location == onnx.TensorProto.EXTERNAL}
    assert sorted(where) == ["big", "fc.W", "t_w"]  # initializers (nested too); the Constant stays inline
    assert int(where["big"]["offset"]) % loading.ALIGN == 0
    reloaded = loading.load_model(out)  # checked through the light copy as well
    for name in ("big", "fc.W", "conv.W"):
        a = next(t for t in model.graph.initializer if t.name == name)
        b = next(t for t in reloaded.graph.initializer if t.name == name)
        assert onnx.numpy_helper.to_array(a).tobytes() == onnx.numpy_helper.to_array(b).tobytes()
    assert loading.model_sha256(reloaded) == loading.model_sha256(model)


def test_compress_runs_the_large_code_paths(tmp_path, monkeypatch):
    model = lenet_like(seed=2)
    data = labelled_data(model, n=300)
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.data", size_threshold=0)
    _large(monkeypatch)
    calls = []
    light_check = loading.check_light
    monkeypatch.setattr(loading, "check_light", lambda m: calls.append(1) or light_check(m))
    result = onnxws.compress(path, data, loss=2.0, cache=False, search_samples=300,
                             config=onnxws.CompressConfig.from_dict({"global": {"min_params": 16}}))
    assert len(calls) == 2  # the input on load, the emitted model before it is measured
    out = tmp_path / "ext.ws.onnx"
    result.save(out, write_report=False)
    assert (tmp_path / "ext.ws.onnx.data").exists()
    x = data["x"][:5]
    expected = ort.InferenceSession(result.model.SerializeToString()).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out)).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_evaluate_a_large_model_hands_its_weights_over_in_memory(tmp_path, monkeypatch):
    """`onnxws evaluate` on a model over the limit: no ByteSize()/serialisation of the whole model
    (upb raises EncodeError on one over 2 GB), the weights reach ORT as in-memory external data."""
    import onnxws.evaluation as evaluation

    model = lenet_like(seed=6)
    data = labelled_data(model, n=50)
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.data", size_threshold=0)
    np.savez(tmp_path / "m.npz", **data)
    small = evaluation.evaluate_path(path, tmp_path / "m.npz", device="cpu")
    _large(monkeypatch)
    prepared = []
    real_prepare = evaluation.prepare
    monkeypatch.setattr(evaluation, "prepare", lambda m, w: prepared.append(1) or real_prepare(m, w))
    large = evaluation.evaluate_path(path, tmp_path / "m.npz", device="cpu")
    assert prepared == [1] and large["value"] == small["value"] == 1.0


def test_scorer_model_holds_no_weight_payloads():
    """The scorer's proto is built payload-free (a copy whose payloads are cleared afterwards would
    keep them alive in upb's arena): stored tensors are external-data headers with their metadata."""
    from onnxws.engines import prepare

    model = _if_model()
    fc = next(t for t in model.graph.initializer if t.name == "fc.W")
    fc.doc_string = "kept"
    prepared = prepare(model, ["conv.W", "fc.W"])
    by_name = {t.name: t for t in prepared.model.graph.initializer}
    for name in ("conv.W", "fc.W"):
        assert by_name[name].data_location == onnx.TensorProto.EXTERNAL and not by_name[name].HasField("raw_data")
    assert by_name["fc.W"].doc_string == "kept" and list(by_name["fc.W"].dims) == [10, 144]
    assert by_name["cond"].HasField("raw_data")  # small non-weights stay inline
    np.testing.assert_array_equal(prepared.stored["fc.W"], onnx.numpy_helper.to_array(fc))
    assert fc.HasField("raw_data")  # the caller's model is untouched


def test_compress_a_large_in_memory_model(monkeypatch):
    """A ModelProto over the limit: bytes_before comes from message_bytes, not ModelProto.ByteSize()."""
    model = lenet_like(seed=2)
    data = labelled_data(model, n=300)
    expected = model.ByteSize()
    _large(monkeypatch)
    assert abs(proto.message_bytes(model) - expected) <= 16  # nested length prefixes aside
    result = onnxws.compress(model, data, loss=2.0, cache=False, search_samples=300,
                             config=onnxws.CompressConfig.from_dict({"global": {"min_params": 16}}))
    assert abs(result.report["compression"]["bytes_before"] - expected) <= 16
