"""Models with external data: read them, and write outputs as external data when they are too large."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

import onnxws
import onnxws.loading as loading
from graphs import labelled_data, lenet_like


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
    monkeypatch.setattr(loading, "_PROTO_LIMIT", 1000)  # pretend the model is over protobuf's 2 GB limit
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
