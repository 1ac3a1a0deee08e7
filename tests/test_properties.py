"""Property tests: any small weight tensor and k encode to a model that decodes exactly."""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from onnx import TensorProto, helper, numpy_helper

from onnxws.clustering import share_weight_all_k
from onnxws.emit_check import decoded_weights
from onnxws.encoding import encode_model
from onnxws.sharing import Granularity

shapes = st.tuples(st.integers(1, 8), st.integers(1, 16))
values = st.floats(-100, 100, width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=40, deadline=None)
@given(shapes.flatmap(lambda s: arrays(np.float32, s, elements=values)), st.integers(1, 256),
       st.sampled_from(["tensor", "channel", "group:3"]))
def test_encode_decodes_exactly(weight, k, granularity):
    rows, cols = weight.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "p",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", rows])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", cols])],
                              [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sw = share_weight_all_k("w", weight, [k], Granularity.parse(granularity), channel_axis=1)[k]
    decoded = sw.decode()
    assert not np.any(np.isnan(decoded))
    for g in range(sw.n_codebooks):  # at most k distinct values per codebook
        assert len(np.unique(sw.codebooks[g])) <= k
    assert len(np.unique(decoded)) <= k * sw.n_codebooks
    encoded = encode_model(model, [sw])
    onnx.checker.check_model(encoded.model, full_check=True)
    assert decoded_weights(encoded.model, ["w"])["w"].tobytes() == decoded.tobytes()
