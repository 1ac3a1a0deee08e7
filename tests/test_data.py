"""Evaluation data: loading, validation against the model's inputs, subsets, fingerprints."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxws.data import EvalData, find_sidecar_data, holdout_split, load_data
from onnxws.errors import InputError


def gemm_model(elem: int = TensorProto.FLOAT, batch: str | int = "N", width: int = 3) -> onnx.ModelProto:
    """input 'img' [batch, width] -> Gemm -> 'logits' [batch, 4]."""
    w = numpy_helper.from_array(np.ones((4, width), np.float32), "W")
    nodes = [helper.make_node("Cast", ["img"], ["f"], to=TensorProto.FLOAT), helper.make_node("Gemm", ["f", "W"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("img", elem, [batch, width])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 4])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def two_input_model() -> onnx.ModelProto:
    """inputs 'a' [N, 2] float32 and 'b' [N, 2] float32 -> Add -> 'out'."""
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["out"])], "g",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 2]),
                               helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 2])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_dict_loads_and_keeps_extras():
    img = np.arange(15, dtype=np.float32).reshape(5, 3)
    names = np.array(["a", "b", "c", "d", "e"])
    data = load_data({"img": img, "y": np.array([0, 1, 2, 3, 0]), "names": names}, gemm_model())
    assert data.n == 5
    assert data.input_names == ["img"]
    assert list(data.feeds()) == ["img"]
    assert data.feeds()["img"] is img  # no copy, no cast
    assert data.labels.tolist() == [0, 1, 2, 3, 0]
    assert data.arrays["names"][4] == "e"


def test_head_slices_every_array_without_shuffling():
    img = np.arange(15, dtype=np.float32).reshape(5, 3)
    data = load_data({"img": img, "y": np.arange(5)}, gemm_model())
    head = data.head(2)
    assert head.n == 2
    assert head.arrays["img"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert head.labels.tolist() == [0, 1]
    assert data.head(99) is data
    with pytest.raises(ValueError):
        data.head(0)


def test_fingerprint_stable_and_sensitive():
    img = np.arange(15, dtype=np.float32).reshape(5, 3)
    a = load_data({"img": img, "y": np.arange(5)}, gemm_model())
    b = load_data({"y": np.arange(5), "img": img.copy()}, gemm_model())  # other key order, other buffer
    assert a.fingerprint() == b.fingerprint()
    changed = img.copy()
    changed[4, 2] += 1
    c = load_data({"img": changed, "y": np.arange(5)}, gemm_model())
    assert c.fingerprint() != a.fingerprint()
    d = load_data({"img": img, "y": np.arange(5).astype(np.int32)}, gemm_model())  # same values, other dtype
    assert d.fingerprint() != a.fingerprint()
    assert a.head(3).fingerprint() != a.fingerprint()


def test_x_alias_for_single_input_model():
    data = load_data({"x": np.zeros((2, 3), np.float32)}, gemm_model())
    assert list(data.arrays) == ["img"]
    assert data.input_names == ["img"]


def test_x_alias_not_for_multi_input_model():
    with pytest.raises(InputError, match=r"\['a', 'b'\].*found \['x'\]"):
        load_data({"x": np.zeros((2, 2), np.float32)}, two_input_model())


def test_missing_input_names_missing_and_found():
    with pytest.raises(InputError) as info:
        load_data({"a": np.zeros((2, 2), np.float32), "y": np.zeros(2, np.int64)}, two_input_model())
    assert "['b']" in str(info.value) and "found ['a', 'y']" in str(info.value)


def test_wrong_dtype_names_both_and_never_casts():
    with pytest.raises(InputError, match=r"float64.*expects float32"):
        load_data({"img": np.zeros((2, 3))}, gemm_model())
    with pytest.raises(InputError, match=r"int64.*expects uint8 \(ONNX UINT8\)"):
        load_data({"img": np.zeros((2, 3), np.int64)}, gemm_model(TensorProto.UINT8))


def test_wrong_fixed_dim():
    with pytest.raises(InputError, match=r"axis 1 must be 3, got 5"):
        load_data({"img": np.zeros((2, 5), np.float32)}, gemm_model())


def test_wrong_rank():
    with pytest.raises(InputError, match=r"rank 3.*rank 2"):
        load_data({"img": np.zeros((2, 3, 1), np.float32)}, gemm_model())


def test_symbolic_dims_accept_any_size():
    model = gemm_model()
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "W"  # clears the fixed value
    # the model would not run with width 7, but the data check only follows the declared shape
    assert load_data({"img": np.zeros((2, 7), np.float32)}, model).n == 2


def test_fixed_batch_axis_does_not_limit_samples():
    data = load_data({"img": np.zeros((5, 3), np.float32)}, gemm_model(batch=1))
    assert data.n == 5


def test_unequal_lengths():
    with pytest.raises(InputError, match=r"differ in length.*'img': 4.*'y': 3"):
        load_data({"img": np.zeros((4, 3), np.float32), "y": np.zeros(3, np.int64)}, gemm_model())


def test_labels_must_be_1d_integers():
    with pytest.raises(InputError, match=r"1-D integer.*shape \(3, 4\)"):
        load_data({"img": np.zeros((3, 3), np.float32), "y": np.zeros((3, 4), np.int64)}, gemm_model())
    with pytest.raises(InputError, match=r"1-D integer.*float32"):
        load_data({"img": np.zeros((3, 3), np.float32), "y": np.zeros(3, np.float32)}, gemm_model())


def test_empty_data():
    with pytest.raises(InputError, match="no samples"):
        load_data({"img": np.zeros((0, 3), np.float32)}, gemm_model())
    with pytest.raises(InputError, match="empty"):
        load_data(iter([]), gemm_model())
    with pytest.raises(InputError, match="0-d"):
        load_data({"img": np.zeros((2, 3), np.float32), "y": np.int64(1)}, gemm_model())


def test_iterable_of_batches_is_concatenated():
    batches = [{"x": np.full((2, 3), i, np.float32), "y": np.array([i, i])} for i in range(3)]
    data = load_data((b for b in batches), gemm_model())
    assert data.n == 6
    assert data.arrays["img"][:, 0].tolist() == [0, 0, 1, 1, 2, 2]
    assert data.labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_iterable_batches_must_agree():
    batches = [{"img": np.zeros((2, 3), np.float32)}, {"img": np.zeros((2, 3), np.float32), "y": np.zeros(2, np.int64)}]
    with pytest.raises(InputError, match="batch 1 has arrays"):
        load_data(batches, gemm_model())
    with pytest.raises(InputError, match="dict of arrays"):
        load_data([np.zeros((2, 3), np.float32)], gemm_model())


def test_npz_roundtrip_and_errors(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, img=np.ones((3, 3), np.float32), y=np.array([0, 1, 2]), label=np.array(["a", "b", "c"]))
    data = load_data(path, gemm_model())
    assert data.n == 3 and data.arrays["label"].tolist() == ["a", "b", "c"]
    assert load_data(str(path), gemm_model()).fingerprint() == data.fingerprint()
    with pytest.raises(InputError, match="not found"):
        load_data(tmp_path / "missing.npz", gemm_model())
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip file")
    with pytest.raises(InputError, match="garbage.npz"):
        load_data(garbage, gemm_model())
    npy = tmp_path / "single.npy"
    np.save(npy, np.ones((3, 3), np.float32))
    with pytest.raises(InputError, match="single .npy"):
        load_data(npy, gemm_model())
    objects = tmp_path / "objects.npz"
    np.savez(objects, img=np.ones((2, 3), np.float32), meta=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(InputError, match="object arrays"):
        load_data(objects, gemm_model())


def test_find_sidecar_data(tmp_path):
    model_path = tmp_path / "net.onnx"
    model_path.write_bytes(b"")
    with pytest.raises(InputError, match="--data PATH"):
        find_sidecar_data(model_path)
    (tmp_path / "eval.npz").write_bytes(b"")
    assert find_sidecar_data(model_path) == tmp_path / "eval.npz"
    (tmp_path / "net.npz").write_bytes(b"")
    assert find_sidecar_data(model_path) == tmp_path / "net.npz"


def test_evaldata_is_a_plain_dataclass():
    data = EvalData({"img": np.zeros((2, 3), np.float32)}, ["img"], 2)
    assert data.labels is None and data.head(1).n == 1


def test_group_ids_are_checked_and_a_model_input_named_group_is_an_input():
    model = gemm_model()
    img = np.ones((6, 3), np.float32)
    data = load_data({"img": img, "group": np.array([0, 0, 1, 1, 2, 2])}, model)
    assert data.groups.tolist() == [0, 0, 1, 1, 2, 2]
    assert load_data({"img": img}, model).groups is None
    with pytest.raises(InputError, match="group ids 'group' must be a 1-D integer array"):
        load_data({"img": img, "group": np.zeros(6, np.float32)}, model)
    named = gemm_model()
    named.graph.input[0].name = "group"
    named.graph.node[0].input[0] = "group"
    assert load_data({"group": img}, named).groups is None  # that array feeds the model


def test_holdout_split_without_groups_holds_out_the_last_samples():
    model = gemm_model()
    img = np.arange(3000, dtype=np.float32).reshape(1000, 3)
    data = load_data({"img": img}, model)
    ordered, held = holdout_split(data, None)  # the default on a set of 1,000: 20 %
    assert held == 200 and ordered is data and ordered.tail(held).arrays["img"][0, 0] == 2400
    assert holdout_split(data, 0.0) == (data, 0)
    assert holdout_split(data, 0.05)[1] == 50
    small = data.head(999)
    assert holdout_split(small, None) == (small, 0)  # too few samples to spare any by default
    assert holdout_split(small, 0.1)[1] == 100  # asked for: held out anyway


def test_holdout_split_with_groups_holds_out_whole_groups():
    """12 groups of views, interleaved (views of photographs in turn): the last groups by first
    appearance go to the held-out part whole, the rest keep their order."""
    model = gemm_model()
    n = 1200
    groups = np.arange(n) % 12
    data = load_data({"img": np.arange(3 * n, dtype=np.float32).reshape(n, 3), "group": groups}, model)
    ordered, held = holdout_split(data, None)
    searched, out = ordered.head(n - held).groups, ordered.tail(held).groups
    assert held == 300 and set(out.tolist()) == {9, 10, 11} and not set(searched.tolist()) & set(out.tolist())
    assert np.all(np.diff(ordered.head(n - held).arrays["img"][:, 0]) > 0)  # original order kept
    few = load_data({"img": np.zeros((1000, 3), np.float32), "group": np.arange(1000) % 5}, model)
    assert holdout_split(few, None)[1] == 0  # 5 groups: too few to hold any out by default
    assert holdout_split(few, 0.5)[1] == 600  # asked for: at least half, in whole groups (3 of 5)
