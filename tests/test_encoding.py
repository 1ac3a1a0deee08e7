"""Encoding round trips in stock ORT: every index width and granularity, packing, opsets."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphs import lenet_like
from onnxws.clustering import share_weight_all_k
from onnxws.encoding import _pack_stream, _unpack_reference, decoded_weights, encode_model, model_weight_bytes
from onnxws.sharing import Granularity

KS = [1, 2, 3, 4, 5, 8, 16, 32, 64, 100, 128, 256]  # every index width 0..8


def _replace(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name in values:
            init.CopyFrom(numpy_helper.from_array(values[init.name], init.name))
    return out


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.fixture(scope="module")
def conv_gemm():
    model = lenet_like(seed=3)
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    feeds = {"x": np.random.default_rng(0).normal(size=(4, 1, 8, 8)).astype(np.float32)}
    return model, weights, feeds


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group:3"])
def test_round_trip_every_width(conv_gemm, granularity):
    model, weights, feeds = conv_gemm
    g = Granularity.parse(granularity)
    fc = share_weight_all_k("fc.W", weights["fc.W"], KS, g, channel_axis=0)
    conv = share_weight_all_k("conv.W", weights["conv.W"], KS, g, channel_axis=0)
    for k in KS:
        shared = [fc[k], conv[k]]
        encoded = encode_model(model, shared)
        onnx.checker.check_model(encoded.model, full_check=True)
        rebuilt = decoded_weights(encoded.model, ["fc.W", "conv.W"])
        for sw in shared:
            assert rebuilt[sw.name].tobytes() == sw.decode().tobytes(), (k, sw.name)
        reference = _replace(model, {sw.name: sw.decode() for sw in shared})
        for a, b in zip(_run(encoded.model, feeds), _run(reference, feeds)):
            assert a.tobytes() == b.tobytes(), (granularity, k)
        kinds = {t.name: t.index_dtype for t in encoded.tensors}
        bits = fc[k].bits
        expected = {0: "none", 2: "UINT2", 4: "UINT4", 8: "UINT8"}.get(bits, f"packed:{bits}")
        assert kinds["fc.W"] == expected


def test_input_model_is_not_modified(conv_gemm):
    model, weights, _ = conv_gemm
    before = model.SerializeToString()
    encode_model(model, [share_weight_all_k("fc.W", weights["fc.W"], [8])[8]])
    assert model.SerializeToString() == before


@pytest.mark.parametrize("bits", range(1, 9))
def test_bit_stream_packing_is_dense_and_exact(bits):
    rng = np.random.default_rng(bits)
    idx = rng.integers(0, 2**bits, size=1001)
    stream = _pack_stream(idx, bits)
    assert stream.size == -(-1001 // 8) * bits  # b bytes per 8 indices
    np.testing.assert_array_equal(_unpack_reference(stream, bits, 1001), idx)


def _mlp(sizes: list[int], seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        inits.append(numpy_helper.from_array(rng.normal(0, 0.1, (a, b)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"]))
        prev = f"h{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", sizes[0]])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["N", sizes[-1]])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_packing_efficiency_with_odd_widths():
    """Widths 3, 5 and 6 bits: the bytes on disk follow the theory (efficiency >= 0.95)."""
    model = _mlp([256, 256, 256, 128])
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    shared = [share_weight_all_k(n, values[n], [k])[k] for n, k in (("w0", 8), ("w1", 32), ("w2", 64))]
    encoded = encode_model(model, shared)
    assert sorted(t.index_dtype for t in encoded.tensors) == ["packed:3", "packed:5", "packed:6"]
    full_bits = sum(32 * v.size for v in values.values())
    stored_bits = sum(sw.stored_bits(32) for sw in shared)
    ratio_whole = full_bits / stored_bits
    efficiency = (model_weight_bytes(model) / model_weight_bytes(encoded.model)) / ratio_whole
    assert efficiency >= 0.95


def test_opset_raised_for_narrow_types_or_packed_when_not_allowed():
    model = _mlp([64, 64], opset=13)
    w = numpy_helper.to_array(model.graph.initializer[0])
    sw = share_weight_all_k("w0", w, [16])[16]
    raised = encode_model(model, [sw])
    assert raised.opset >= 21 and raised.tensors[0].index_dtype == "UINT4"
    assert any("raised" in note for note in raised.notes)
    kept = encode_model(model, [sw], raise_opset=False)
    assert kept.opset == 13 and kept.tensors[0].index_dtype == "packed:4"
    unpacked = encode_model(model, [sw], raise_opset=False, pack=False)
    assert unpacked.tensors[0].index_dtype == "UINT8"
    for enc in (raised, kept, unpacked):
        onnx.checker.check_model(enc.model, full_check=True)
        assert decoded_weights(enc.model, ["w0"])["w0"].tobytes() == sw.decode().tobytes()
    with pytest.raises(ValueError, match="below the model's opset"):
        encode_model(model, [sw], opset=11)


def test_constant_node_shared_initializer_and_fp16():
    rng = np.random.default_rng(1)
    b16 = rng.normal(size=(32, 16)).astype(np.float16)
    b32 = rng.normal(size=(16, 8)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["B16"], value=numpy_helper.from_array(b16, "B16")),
        helper.make_node("MatMul", ["x", "B16"], ["h"]),
        helper.make_node("Cast", ["h"], ["h32"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["h32", "B32"], ["y1"]),
        helper.make_node("MatMul", ["h32", "B32"], ["y2"]),  # one initializer, two consumers
    ]
    graph = helper.make_graph(nodes, "mixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 32])],
                              [helper.make_tensor_value_info("y1", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("y2", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(b32, "B32")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    shared = [share_weight_all_k("B16", b16, [8])[8], share_weight_all_k("B32", b32, [4])[4]]
    assert shared[0].codebooks.dtype == np.float16
    encoded = encode_model(model, shared)
    onnx.checker.check_model(encoded.model, full_check=True)
    assert not any(n.op_type == "Constant" and n.output[0] == "B16" for n in encoded.model.graph.node)
    feeds = {"x": rng.normal(size=(3, 32)).astype(np.float16)}
    out = _run(encoded.model, feeds)
    rebuilt = decoded_weights(encoded.model, ["B16", "B32"])
    h = (feeds["x"] @ rebuilt["B16"]).astype(np.float32)
    np.testing.assert_allclose(out[0], h @ rebuilt["B32"], rtol=1e-2, atol=1e-2)
    np.testing.assert_array_equal(out[0], out[1])
    assert rebuilt["B16"].tobytes() == shared[0].decode().tobytes()
