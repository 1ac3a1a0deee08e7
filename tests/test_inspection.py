"""`onnxws inspect` reads back what encoding wrote: k, bits, index type, shape, for every width."""

from __future__ import annotations

import onnx
import pytest
from onnx import numpy_helper

from graphs import lenet_like
from onnxws.clustering import share_weight_all_k
from onnxws.encoding import encode_model
from onnxws.inspection import inspect_model, shared_tensors
from onnxws.sharing import Granularity


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("k", [1, 2, 5, 16, 64, 256])
def test_shared_tensors_read_back(k, granularity):
    model = lenet_like(seed=1)
    w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "fc.W"))
    sw = share_weight_all_k("fc.W", w, [k], Granularity.parse(granularity))[k]
    encoded = encode_model(model, [sw])
    info = shared_tensors(encoded.model)["fc.W"]
    assert info["k"] == k and info["bits"] == sw.bits and info["shape"] == [10, 144] and info["params"] == 1440
    assert info["index_dtype"] == encoded.tensors[0].index_dtype
    if k > 1:
        assert info["n_codebooks"] == sw.n_codebooks


def test_inspect_plain_and_compressed(tmp_path):
    model = lenet_like(seed=1)
    plain = tmp_path / "plain.onnx"
    onnx.save(model, str(plain))
    rows, summary = inspect_model(plain)
    status = {r["name"]: (r["status"], r["reason"]) for r in rows}
    assert status["fc.W"][0] == "shareable"
    assert status["conv.W"][0] == "skipped" and "min_params" in status["conv.W"][1]
    assert "bias" in status["fc.B"][1]
    w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "fc.W"))
    packed = tmp_path / "packed.onnx"
    onnx.save(encode_model(model, [share_weight_all_k("fc.W", w, [8])[8]]).model, str(packed))
    rows, summary = inspect_model(packed)
    shared = [r for r in rows if r["status"] == "shared"]
    assert [(r["name"], r["k"], r["index_dtype"]) for r in shared] == [("fc.W", 8, "packed:3")]
    assert summary["CR over shared tensors (theoretical)"] == pytest.approx(32 * 1440 / (1440 * 3 + 8 * 32), rel=1e-2)
    assert not any(r["name"].startswith(("fc.W.", "onnxws.")) for r in rows)
