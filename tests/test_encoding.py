"""Encoding round trips in stock ONNX Runtime: every index width and granularity, bit-stream
packing, opset raising, Constant / shared / fp16 / subgraph weights, and a lossless rewrite."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxws.emit_check import decoded_weights
from onnxws.encoding import encode_model, pack_indices, plan_layout, unpack_indices
from onnxws.errors import InputError, UsageError
from onnxws.proto import default_opset, model_weight_bytes
from onnxws.sharing import Granularity, SharedWeight

KS = [1, 2, 3, 4, 5, 8, 16, 32, 64, 100, 128, 256]  # index widths 0, 1, 2, 2, 3, 3, 4, 5, 6, 7, 7, 8


# ------------------------------------------------------------------------------------ helpers


def _shared(name: str, shape: tuple[int, ...], k: int, *, granularity: str = "tensor", channel_axis: int = 0,
            dtype=np.float32, seed: int = 0) -> SharedWeight:
    """A SharedWeight with random codebooks and random indices that use every value 0..k-1."""
    rng = np.random.default_rng(seed)
    g = Granularity.parse(granularity)
    groups = g.n_groups(shape, channel_axis)
    books = np.sort(rng.normal(0, 0.3, (groups, k)), axis=1).astype(dtype)
    indices = rng.integers(0, k, size=shape).astype(np.uint8)
    indices.flat[: min(k, indices.size)] = np.arange(min(k, indices.size))  # smallest and largest values present
    indices.flat[-1] = k - 1
    return SharedWeight(name, books, indices, channel_axis=channel_axis if groups > 1 else 0,
                        group_size=1 if g.kind != "group" else g.group_size, granularity=g)


def _three_weight_model(opset: int = 17) -> onnx.ModelProto:
    """Conv(5@3x3 over 3 ch: 135 weights) -> Relu -> Flatten -> Gemm(10, transB: 1800) -> MatMul([10, 6]: 60).

    135 and 60 are not multiples of 8 (padded bit-stream rows), 1800 is; the MatMul weight's
    output channels run along axis 1.
    """
    rng = np.random.default_rng(7)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (5, 3, 3, 3)).astype(np.float32), "conv.W"),
        numpy_helper.from_array(rng.normal(0, 0.1, (5,)).astype(np.float32), "conv.B"),
        numpy_helper.from_array(rng.normal(0, 0.1, (10, 180)).astype(np.float32), "fc.W"),
        numpy_helper.from_array(rng.normal(0, 0.3, (10, 6)).astype(np.float32), "head.W"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv.W", "conv.B"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.W"], ["h"], name="fc", transB=1),
        helper.make_node("MatMul", ["h", "head.W"], ["y"], name="head"),
    ]
    graph = helper.make_graph(nodes, "three", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _with_decoded(model: onnx.ModelProto, shared: list[SharedWeight]) -> onnx.ModelProto:
    """The same model with each shared weight's initializer / Constant value replaced by sw.decode()."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    values = {sw.name: sw.decode() for sw in shared}
    for init in out.graph.initializer:
        if init.name in values:
            init.CopyFrom(numpy_helper.from_array(values[init.name], init.name))
    for node in out.graph.node:
        if node.op_type == "Constant" and node.output[0] in values:
            node.attribute[0].t.CopyFrom(numpy_helper.from_array(values[node.output[0]], node.output[0]))
    return out


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()  # stock options, the same for both models compared
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def _assert_exact(model: onnx.ModelProto, shared: list[SharedWeight], feeds: dict) -> None:
    """Checker, rebuilt weights bit-identical to decode(), outputs bit-identical to the decoded-float model."""
    encoded = encode_model(model, shared)
    onnx.checker.check_model(encoded.model, full_check=True)
    rebuilt = decoded_weights(encoded.model, [sw.name for sw in shared])
    for sw in shared:
        expected = sw.decode()
        assert rebuilt[sw.name].dtype == expected.dtype and rebuilt[sw.name].shape == expected.shape
        assert rebuilt[sw.name].tobytes() == expected.tobytes(), sw.name
    for got, want in zip(_run(encoded.model, feeds), _run(_with_decoded(model, shared), feeds), strict=True):
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
    return encoded


def _expected_layout(bits: int, opset: int) -> str:
    return {0: "none", 2: "UINT2" if opset >= 25 else "packed:2", 4: "UINT4" if opset >= 21 else "packed:4",
            8: "UINT8"}.get(bits, f"packed:{bits}")


# ------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group:2"])
def test_every_width_and_granularity_is_bit_exact(granularity):
    model = _three_weight_model()
    feeds = {"x": np.random.default_rng(0).normal(size=(3, 3, 8, 8)).astype(np.float32)}
    for k in KS:
        shared = [_shared("conv.W", (5, 3, 3, 3), k, granularity=granularity, seed=k),
                  _shared("fc.W", (10, 180), k, granularity=granularity, seed=k + 1),
                  _shared("head.W", (10, 6), k, granularity=granularity, channel_axis=1, seed=k + 2)]
        encoded = _assert_exact(model, shared, feeds)
        bits = shared[0].bits
        want = _expected_layout(bits, encoded.opset)
        assert [t.index_dtype for t in encoded.tensors] == [want] * 3, (granularity, k)
        assert [(t.k, t.bits, t.n_codebooks) for t in encoded.tensors] == [(k, bits, sw.n_codebooks) for sw in shared]
        # default: raise the opset exactly as far as the native types need (2 -> 25, 4 -> 21), else keep 17
        assert encoded.opset == {2: 25, 4: 21}.get(bits, 17)
        if encoded.opset > 17:
            assert any("raised to" in note and "verified" in note for note in encoded.notes)


def test_constant_node_shared_initializer_subgraph_and_fp16_weights():
    """A Constant-node weight (fp16), an initializer read by two MatMuls, one read inside an If body."""
    rng = np.random.default_rng(1)
    b16 = rng.normal(size=(32, 16)).astype(np.float16)
    b32 = rng.normal(size=(16, 8)).astype(np.float32)
    then_branch = helper.make_graph([helper.make_node("Identity", ["B32"], ["t"])], "then", [],
                                    [helper.make_tensor_value_info("t", TensorProto.FLOAT, [16, 8])])
    else_branch = helper.make_graph([helper.make_node("Neg", ["B32"], ["e"])], "else", [],
                                    [helper.make_tensor_value_info("e", TensorProto.FLOAT, [16, 8])])
    nodes = [
        helper.make_node("Constant", [], ["B16"], value=numpy_helper.from_array(b16, "B16")),
        helper.make_node("MatMul", ["x", "B16"], ["h"]),
        helper.make_node("Cast", ["h"], ["h32"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["h32", "B32"], ["y1"]),
        helper.make_node("If", ["flag"], ["w"], then_branch=then_branch, else_branch=else_branch),
        helper.make_node("MatMul", ["h32", "w"], ["y2"]),
    ]
    graph = helper.make_graph(nodes, "mixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 32]),
                                               helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y1", TensorProto.FLOAT, ["N", 8]),
                               helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["N", 8])],
                              [numpy_helper.from_array(b32, "B32")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"x": rng.normal(size=(3, 32)).astype(np.float16), "flag": np.array(False)}
    for k16, k32 in ((8, 5), (1, 16), (4, 256)):
        shared = [_shared("B16", (32, 16), k16, dtype=np.float16, seed=k16),
                  _shared("B32", (16, 8), k32, granularity="channel", channel_axis=1, seed=k32)]
        encoded = _assert_exact(model, shared, feeds)
        graph_out = encoded.model.graph
        assert not any(n.op_type == "Constant" for n in graph_out.node)
        assert "B32" not in {t.name for t in graph_out.initializer}
        # the If body still reads B32 from the outer scope: nothing was copied into it
        body = next(n for n in graph_out.node if n.op_type == "If").attribute
        assert all(len(a.g.initializer) == 0 for a in body)
        decoders = [n for n in graph_out.node if n.output[0] in ("B16", "B32")]
        assert len(decoders) == 2  # one decoder per tensor, however many consumers
    y1, y2 = _run(encoded.model, feeds)
    np.testing.assert_array_equal(y2, -y1)  # flag False: the else branch negates the same rebuilt B32


def test_bit_stream_layout_worked_by_hand():
    # 3 bits, 8 indices (one word): 1..7,0 at bit offsets 0,3,..,21 -> bits (LSB first)
    # 100 010 110 001 101 011 111 000 -> bytes 0xD1 0x58 0x1F, one per plane
    stream = pack_indices(np.array([1, 2, 3, 4, 5, 6, 7, 0]), 3)
    assert stream.dtype == np.uint8 and stream.tolist() == [[0xD1], [0x58], [0x1F]]
    # 1 bit, 9 indices -> m = 2 words, runs of 2: word 0 packs indices 0,2,..,14 = 1,1,0,0,1,0,0,0
    # -> 0b00010011; word 1 packs indices 1,3,..,15 = 0,1,0,1,0,0,0,0 -> 0b00001010 (15..9 are padding)
    assert pack_indices(np.array([1, 0, 1, 1, 0, 0, 0, 1, 1]), 1).tolist() == [[0b00010011, 0b00001010]]


@pytest.mark.parametrize("bits", range(1, 9))
def test_bit_stream_is_dense_and_numpy_mirror_is_exact(bits):
    rng = np.random.default_rng(bits)
    for n in (1, 7, 8, 1001):
        idx = rng.integers(0, 2**bits, size=n)
        stream = pack_indices(idx, bits)
        assert stream.shape == (bits, math.ceil(n / 8))  # b bytes per 8 indices
        np.testing.assert_array_equal(unpack_indices(stream, bits, n), idx)


@pytest.mark.parametrize("opset", [13, 17])
def test_every_packed_width_with_both_unpackers(opset):
    """Widths 1..7 as bit streams: int32 Div/Mod unpacking at opset 13, uint8 BitShift/Add from 14."""
    shapes = {b: ((13, 7) if b % 2 else (4, 2, 3, 5)) for b in range(1, 8)}  # 91 (padded row) or 120 elements
    shared = [_shared(f"W{b}", shapes[b], 2**b, seed=b) for b in range(1, 8)]
    graph = helper.make_graph([], "bare", [], [helper.make_tensor_value_info(sw.name, TensorProto.FLOAT, list(sw.shape))
                                               for sw in shared],
                              [numpy_helper.from_array(np.zeros(sw.shape, np.float32), sw.name) for sw in shared])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    encoded = encode_model(model, shared, raise_opset=False)
    assert [t.index_dtype for t in encoded.tensors] == [f"packed:{b}" for b in range(1, 8)]
    onnx.checker.check_model(encoded.model, full_check=True)
    ops = {n.op_type for n in encoded.model.graph.node}
    assert ("Div" in ops) == (opset < 14) and ("BitShift" in ops) == (opset >= 14)
    rebuilt = decoded_weights(encoded.model, [sw.name for sw in shared])
    for sw, out in zip(shared, _run(encoded.model, {})):
        assert rebuilt[sw.name].tobytes() == sw.decode().tobytes() == out.tobytes(), sw.name


def _mlp(sizes: list[int], seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        inits.append(numpy_helper.from_array(rng.normal(0, 0.1, (a, b)).astype(np.float32), f"w{i}"))
        inits.append(numpy_helper.from_array(rng.normal(0, 0.1, (b,)).astype(np.float32), f"b{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [f"h{i}"]))
        prev = f"h{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", sizes[0]])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["N", sizes[-1]])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_packing_efficiency_with_3_5_6_bit_widths():
    """Bytes on disk follow the theoretical whole-model ratio (efficiency >= 0.95, docs/design.md)."""
    model = _mlp([256, 256, 256, 128])
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    shared = [_shared(n, values[n].shape, k, seed=k) for n, k in (("w0", 8), ("w1", 32), ("w2", 64))]
    encoded = encode_model(model, shared)
    assert [t.index_dtype for t in encoded.tensors] == ["packed:3", "packed:5", "packed:6"]
    assert encoded.opset == 17 and encoded.notes == []
    full_bits = sum(32 * v.size for v in values.values())
    shared_bits = sum(sw.params * sw.bits + 32 * sw.n_codebooks * sw.k for sw in shared)
    unshared_bits = sum(32 * v.size for n, v in values.items() if n not in {"w0", "w1", "w2"})
    ratio_whole = full_bits / (shared_bits + unshared_bits)
    efficiency = (model_weight_bytes(model) / model_weight_bytes(encoded.model)) / ratio_whole
    assert efficiency >= 0.95, efficiency
    # each packed tensor: ceil(n/8)*b index bytes + k*4 codebook bytes + its shape (2 x int64)
    for sw, t in zip(shared, encoded.tensors):
        assert t.stored_bytes == math.ceil(sw.params / 8) * sw.bits + 4 * sw.k + 16
    # the same widths in native containers (pack=False) waste 25-62% of the index bytes
    unpacked = encode_model(model, shared, pack=False, raise_opset=False)
    assert [t.index_dtype for t in unpacked.tensors] == ["UINT8"] * 3
    assert model_weight_bytes(unpacked.model) > 1.4 * model_weight_bytes(encoded.model)
    assert any("padding" in note for note in unpacked.notes)


def test_model_weight_bytes_worked_by_hand():
    inits = [numpy_helper.from_array(np.zeros(10, np.float32), "f"),                        # 40 bytes
             numpy_helper.from_array(np.zeros(5, np.uint8).astype(ml_dtypes.uint4), "u4"),  # 3 bytes
             helper.make_tensor("h", TensorProto.FLOAT16, [3], [1.0, 2.0, 3.0])]            # 6 bytes (int32_data)
    nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.zeros(2, np.int64), "c")),  # 16
             helper.make_node("Constant", [], ["s"], value_floats=[1.0, 2.0, 3.0]),           # 12
             helper.make_node("Identity", ["x"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], inits)
    assert model_weight_bytes(helper.make_model(graph)) == 40 + 3 + 6 + 16 + 12


def test_opset_raised_for_uint4_or_kept_with_a_note():
    """Opset 13, a 4-bit and a 3-bit weight: raised to 21 (UINT4 + uint8 unpacking of the 3-bit stream);
    kept at 13 (int32 Div/Mod unpacking of both streams); kept without packing (UINT8)."""
    model = _mlp([64, 64, 40], opset=13)
    shared = [_shared("w0", (64, 64), 16), _shared("w1", (64, 40), 7, seed=1)]
    raised = encode_model(model, shared)
    assert raised.opset == 21 and default_opset(raised.model) == 21 and raised.model.ir_version >= 10
    assert [t.index_dtype for t in raised.tensors] == ["UINT4", "packed:3"]
    assert any("opset 13 raised to 21" in n and "UINT4" in n and "verified" in n for n in raised.notes)
    assert {"BitShift", "Add"} <= {n.op_type for n in raised.model.graph.node if n.name.startswith("w1/")}
    kept = encode_model(model, shared, raise_opset=False)
    assert kept.opset == 13 and [t.index_dtype for t in kept.tensors] == ["packed:4", "packed:3"]
    assert {"Div", "Mod"} <= {n.op_type for n in kept.model.graph.node if n.name.startswith("w1/")}
    assert any("raise_opset=False" in n and "packed:4" in n for n in kept.notes)
    container = encode_model(model, shared, raise_opset=False, pack=False)
    assert container.opset == 13 and [t.index_dtype for t in container.tensors] == ["UINT8", "UINT8"]
    assert any("raise_opset=False" in n for n in container.notes)
    assert any("4-bit indices of 1 tensor(s) stored in UINT8" in n and "50.0%" in n for n in container.notes)
    only3 = encode_model(model, [shared[1]])  # the uint8 unpacking needs opset 14 only
    assert only3.opset == 14 and only3.tensors[0].index_dtype == "packed:3"
    pinned = encode_model(model, [_shared("w0", (64, 64), 4)], opset=25)
    assert pinned.opset == 25 and pinned.tensors[0].index_dtype == "UINT2"
    x = {"x": np.random.default_rng(0).normal(size=(2, 64)).astype(np.float32)}
    reference = _run(_with_decoded(model, shared), x)[0]
    for enc in (raised, kept, container):
        onnx.checker.check_model(enc.model, full_check=True)
        rebuilt = decoded_weights(enc.model, ["w0", "w1"])
        assert all(rebuilt[sw.name].tobytes() == sw.decode().tobytes() for sw in shared)
        np.testing.assert_array_equal(_run(enc.model, x)[0], reference)
    with pytest.raises(UsageError, match="below the model's opset 13"):
        encode_model(model, shared, opset=11)


def test_unverifiable_conversion_falls_back_with_the_reason():
    """A string input cannot be fed random values, so the raised model cannot be checked: keep opset 13."""
    model = _mlp([64, 64], opset=13)
    model.graph.input.append(helper.make_tensor_value_info("label", TensorProto.STRING, [1]))
    model.graph.node.append(helper.make_node("Identity", ["label"], ["label_out"]))
    model.graph.output.append(helper.make_tensor_value_info("label_out", TensorProto.STRING, [1]))
    encoded = encode_model(model, [_shared("w0", (64, 64), 16)])
    assert encoded.opset == 13 and encoded.tensors[0].index_dtype == "packed:4"
    assert any("not raised to 21" in n and "label" in n for n in encoded.notes)
    assert any("opset 13 kept" in n and "packed:4" in n for n in encoded.notes)
    onnx.checker.check_model(encoded.model, full_check=True)


def _rich_model(opset: int, function_op: str = "Sum") -> onnx.ModelProto:
    """Docs, metadata, value_info (one unused), a function, a custom opset, a sparse initializer.

    The function computes ``function_op(a, a)``: Sum is the same op at opsets 13..21, Add changed in 14.
    """
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.normal(size=(16, 16)).astype(np.float32), "W")
    w.doc_string = "the weight"
    keep = numpy_helper.from_array(rng.normal(size=(16,)).astype(np.float32), "bias")
    keep.doc_string = "left alone"
    double = helper.make_function("custom", "Double", ["a"], ["b"], [helper.make_node(function_op, ["a", "a"], ["b"])],
                                  [helper.make_opsetid("", opset)])
    mm = helper.make_node("MatMul", ["x", "W"], ["h"], name="mm", doc_string="matmul doc")
    mm.metadata_props.add(key="layer", value="1")
    nodes = [mm, helper.make_node("Double", ["h"], ["h2"], domain="custom", name="dbl"),
             helper.make_node("Add", ["h2", "bias"], ["y"], name="add")]
    graph = helper.make_graph(
        nodes, "rich", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])], [w, keep], doc_string="graph doc",
        value_info=[helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", 16]),
                    helper.make_tensor_value_info("unused", TensorProto.FLOAT, [3])])
    graph.metadata_props.add(key="g", value="graph meta")
    graph.sparse_initializer.append(helper.make_sparse_tensor(
        numpy_helper.from_array(np.array([1.5], np.float32), "S"), numpy_helper.from_array(np.array([2], np.int64), "S_i"), [4]))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("custom", 1)],
                              functions=[double], producer_name="test", producer_version="9", doc_string="model doc",
                              model_version=7, domain="org.test")
    model.metadata_props.add(key="m", value="model meta")
    model.ir_version = 8
    return model


@pytest.mark.parametrize("opset", [13, 21])
def test_rewrite_keeps_everything_else_and_leaves_the_input_alone(opset):
    model = _rich_model(opset)
    before = model.SerializeToString()
    sw = _shared("W", (16, 16), 16)
    encoded = encode_model(model, [sw])
    assert model.SerializeToString() == before
    out = encoded.model
    assert encoded.opset == 21 and (opset == 21) == (encoded.notes == [])
    assert (out.doc_string, out.domain, out.model_version, out.producer_name, out.producer_version) == (
        "model doc", "org.test", 7, "test", "9")
    assert [(p.key, p.value) for p in out.metadata_props] == [("m", "model meta")]
    assert {(o.domain, o.version) for o in out.opset_import} == {("", 21), ("custom", 1)}
    assert [f.name for f in out.functions] == ["Double"]
    g = out.graph
    assert g.doc_string == "graph doc" and [(p.key, p.value) for p in g.metadata_props] == [("g", "graph meta")]
    assert [v.name for v in g.value_info] == ["h", "unused"]
    assert len(g.sparse_initializer) == 1
    mm = next(n for n in g.node if n.name == "mm")
    assert mm.doc_string == "matmul doc" and [(p.key, p.value) for p in mm.metadata_props] == [("layer", "1")]
    bias = next(t for t in g.initializer if t.name == "bias")
    assert bias.doc_string == "left alone" and bias.raw_data == model.graph.initializer[1].raw_data
    onnx.checker.check_model(out, full_check=True)
    x = {"x": np.random.default_rng(0).normal(size=(2, 16)).astype(np.float32)}
    np.testing.assert_array_equal(_run(out, x)[0], _run(_with_decoded(model, [sw]), x)[0])


def test_function_with_changed_ops_blocks_the_opset_raise():
    """The converter drops function bodies' versions; a function using Add (changed in 14) stays at 13."""
    model = _rich_model(13, function_op="Add")
    encoded = encode_model(model, [_shared("W", (16, 16), 16)])
    assert encoded.opset == 13 and encoded.tensors[0].index_dtype == "packed:4"
    assert any("function custom:Double" in n and "Add" in n for n in encoded.notes)
    onnx.checker.check_model(encoded.model, full_check=True)


def test_untouched_external_data_reference_is_kept(tmp_path):
    model = _mlp([32, 32], opset=21)
    bias = model.graph.initializer[1]
    (tmp_path / "bias.bin").write_bytes(bias.raw_data)
    bias.ClearField("raw_data")
    bias.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "bias.bin"), ("offset", "0"), ("length", "128")):
        bias.external_data.add(key=key, value=value)
    sw = _shared("w0", (32, 32), 8)
    encoded = encode_model(model, [sw])
    kept = next(t for t in encoded.model.graph.initializer if t.name == "b0")
    assert kept.data_location == TensorProto.EXTERNAL and not kept.raw_data
    assert {e.key: e.value for e in kept.external_data}["location"] == "bias.bin"
    path = tmp_path / "encoded.onnx"
    onnx.save(encoded.model, str(path))
    x = {"x": np.ones((1, 32), np.float32)}
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_allclose(got, x["x"] @ sw.decode() + np.frombuffer((tmp_path / "bias.bin").read_bytes(), np.float32),
                               rtol=1e-5, atol=1e-6)


def test_errors_name_the_problem():
    model = _mlp([16, 16])
    with pytest.raises(InputError, match="'nope' is neither an initializer nor a Constant"):
        encode_model(model, [_shared("nope", (16, 16), 4)])
    with pytest.raises(InputError, match=r"has shape \[8, 8\] but the model's tensor is \[16, 16\]"):
        encode_model(model, [_shared("w0", (8, 8), 4)])
    with pytest.raises(InputError, match="codebook dtype float16"):
        encode_model(model, [_shared("w0", (16, 16), 4, dtype=np.float16)])
    with pytest.raises(InputError, match="listed more than once"):
        encode_model(model, [_shared("w0", (16, 16), 4)] * 2)
    clash = _mlp([16, 16])
    clash.graph.initializer.append(numpy_helper.from_array(np.zeros(1, np.float32), "w0.codebook"))
    with pytest.raises(InputError, match="already has a tensor named 'w0.codebook'"):
        encode_model(clash, [_shared("w0", (16, 16), 4)])
    encoded = encode_model(model, [_shared("w0", (16, 16), 4)]).model
    with pytest.raises(InputError, match="not a constant of the main graph"):
        decoded_weights(encoded, ["h0"])
    assert decoded_weights(encoded, ["b0"])["b0"].tobytes() == model.graph.initializer[1].raw_data


def test_plan_layout_table():
    assert [plan_layout(b, 17) for b in range(9)] == ["none", "packed:1", "packed:2", "packed:3", "packed:4",
                                                      "packed:5", "packed:6", "packed:7", "UINT8"]
    assert [plan_layout(b, 25) for b in range(9)] == ["none", "packed:1", "UINT2", "packed:3", "UINT4",
                                                      "packed:5", "packed:6", "packed:7", "UINT8"]
    assert [plan_layout(b, 21, pack=False) for b in range(9)] == ["none", "UINT4", "UINT4", "UINT4", "UINT4",
                                                                  "UINT8", "UINT8", "UINT8", "UINT8"]
    assert plan_layout(3, 9) == "UINT8" and plan_layout(0, 7) == "UINT8"  # no Mod/Slice(10), no Expand(8)


def test_intermediate_names_never_clash_with_the_models():
    model = _mlp([16, 16])
    model.graph.node.append(helper.make_node("Identity", ["x"], ["w0/index"]))
    model.graph.output.append(helper.make_tensor_value_info("w0/index", TensorProto.FLOAT, ["N", 16]))
    sw = _shared("w0", (16, 16), 256)
    encoded = _assert_exact(model, [sw], {"x": np.ones((2, 16), np.float32)})
    cast = next(n for n in encoded.model.graph.node if n.name == "w0/Cast")
    assert cast.output[0] == "w0/index_1"


def test_model_without_an_ai_onnx_import_gets_one():
    """A graph with no nodes that outputs its initializer: the decode nodes bring the default domain in."""
    w = np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32)
    graph = helper.make_graph([], "bare", [], [helper.make_tensor_value_info("W", TensorProto.FLOAT, [8, 8])],
                              [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("ai.onnx.ml", 3)])
    sw = _shared("W", (8, 8), 16)
    encoded = encode_model(model, [sw])
    assert encoded.opset == 21 and default_opset(encoded.model) == 21 and encoded.tensors[0].index_dtype == "UINT4"
    assert any("no ai.onnx opset" in n for n in encoded.notes)
    onnx.checker.check_model(encoded.model, full_check=True)
    assert _run(encoded.model, {})[0].tobytes() == sw.decode().tobytes()


@pytest.mark.parametrize("opset", [17, 21])  # raised (4-bit indices want UINT4) and kept
def test_encoding_with_values_in_memory_gives_the_same_bytes(opset):
    """``values`` (arrays already in memory, e.g. the scorer's) only replace a second decoded copy
    for the opset check: same model bytes. The shared initializers' payloads are never copied."""
    model = _three_weight_model(opset)
    shared = [_shared("conv.W", (5, 3, 3, 3), 16), _shared("fc.W", (10, 180), 8, seed=1)]
    plain = encode_model(model, shared)
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    given = encode_model(model, shared, values=values)
    assert given.model.SerializeToString(deterministic=True) == plain.model.SerializeToString(deterministic=True)
    assert given.notes == plain.notes and given.opset == plain.opset
    names = {t.name for t in given.model.graph.initializer}
    assert "conv.W" not in names and "fc.W" not in names and "head.W" in names
    assert model.graph.initializer[0].HasField("raw_data")  # the input is untouched


@pytest.mark.parametrize("opset", [17, 21])
def test_encoding_a_model_without_payloads_restores_the_unshared_weights(opset):
    """The pipeline drops the model's copy of the weights once the scorer holds them
    (proto.without_payloads); encoding puts the identical bytes back for the unshared ones."""
    from onnxws.proto import lacks_payload, without_payloads

    model = _three_weight_model(opset)
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    light, dropped = without_payloads(model, values, min_bytes=1024)
    assert dropped == ["fc.W"]  # 7200 bytes; conv.W (540) and head.W (240) keep their data
    light2, dropped2 = without_payloads(model, values, min_bytes=200)
    assert dropped2 == ["conv.W", "fc.W", "head.W"]
    assert all(lacks_payload(t) for t in light2.graph.initializer if t.name in dropped2)
    for shared in ([_shared("conv.W", (5, 3, 3, 3), 16)], [_shared("head.W", (10, 6), 4)]):  # fc.W stays unshared
        expected = encode_model(model, shared).model.SerializeToString(deterministic=True)
        got = encode_model(light, shared, values=values).model.SerializeToString(deterministic=True)
        assert got == expected
