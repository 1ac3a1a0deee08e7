"""Deployability: what the input and the written model need to run (opsets, IR version, element
types, the oldest onnxruntime from the table) and what running them costs in CPU ORT."""

from __future__ import annotations

import logging
import math

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxws
from conftest import LENET
from onnxws.deployability import ELEMENT_TYPE_RELEASES, ORT_RELEASES, assess, requirements
from onnxws.report_html import render_html, summary_rows

MEASURED = ("create_seconds", "latency_seconds", "peak_rss_bytes", "rss_bytes")


@pytest.fixture(scope="module")
def result():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ONNXWS_MEASURE_DEPLOYMENT", "1")  # conftest turns the measurements off for the suite
        return onnxws.compress(LENET / "model.onnx", LENET / "eval.npz", loss=1.0, cache=False)


def test_measurements_can_be_skipped_and_the_requirements_stay(monkeypatch):
    monkeypatch.setenv("ONNXWS_MEASURE_DEPLOYMENT", "0")
    quick = onnxws.compress(LENET / "model.onnx", LENET / "eval.npz", loss=1.0, cache=False, max_scorings=20)
    deploy = quick.report["deployability"]
    assert deploy["output"]["onnxruntime_min"] and deploy["output"]["session"]["skipped"]
    assert any("not measured (ONNXWS_MEASURE_DEPLOYMENT=0)" in value for _, value in summary_rows(quick.report))


def _table_release(opset: int, ir_version: int) -> str | None:
    """The first release of ORT_RELEASES implementing ``opset`` and ``ir_version`` (the table read directly)."""
    return next((release for release, newest, ir in ORT_RELEASES if newest >= opset and ir >= ir_version), None)


def _model(opset: int, ir_version: int, indices: np.ndarray) -> onnx.ModelProto:
    """y = x + Gather(codebook, Cast(indices)): the shape of a decoded weight, at ``opset``."""
    nodes = [helper.make_node("Cast", ["idx"], ["i32"], to=TensorProto.INT32),
             helper.make_node("Gather", ["book", "i32"], ["w"], axis=0),
             helper.make_node("Add", ["x", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [6])],
                              [numpy_helper.from_array(indices, "idx"),
                               numpy_helper.from_array(np.array([0.5, 1.5, 2.5, 3.5], np.float32), "book")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)


def test_opsets_and_ir_version_are_the_models(result):
    deploy = result.report["deployability"]
    for side, model in (("input", onnx.load(str(LENET / "model.onnx"))), ("output", result.model)):
        entry = deploy[side]
        assert entry["opsets"] == {(op.domain or "ai.onnx"): op.version for op in model.opset_import}
        assert entry["ir_version"] == model.ir_version
        assert entry["onnxruntime_min_basis"].startswith(f"ai.onnx opset {entry['opsets']['ai.onnx']}, "
                                                          f"IR version {model.ir_version}")
    assert deploy["output"]["opsets"]["ai.onnx"] == result.report["encoding"]["opset"]
    assert "FLOAT" in deploy["input"]["element_types"]


def test_the_oldest_onnxruntime_follows_the_table():
    plain = requirements(_model(13, 7, np.array([0, 1, 2, 3, 1, 0], np.uint8)))
    assert plain["onnxruntime_min"] == _table_release(13, 7) == "1.6"
    assert "UINT8" in plain["element_types"] and plain["onnxruntime_min_basis"] == "ai.onnx opset 13, IR version 7"

    four_bit = requirements(_model(21, 10, np.array([0, 1, 2, 3, 1, 0], ml_dtypes.uint4)))
    assert "UINT4" in four_bit["element_types"]
    assert _table_release(21, 10) == "1.18"  # opset 21 and IR 10 alone
    assert four_bit["onnxruntime_min"] == ELEMENT_TYPE_RELEASES["UINT4"] == "1.23"  # the Cast from UINT4 raises it
    assert "UINT4" in four_bit["onnxruntime_min_basis"]

    newest, opset, ir = ORT_RELEASES[-1]
    beyond = requirements(_model(opset + 1, ir, np.array([0, 1], np.uint8)))
    assert beyond["onnxruntime_min"] is None and f"newer than {newest}" in beyond["onnxruntime_min_basis"]


def test_measurements_are_positive_finite_numbers(result):
    deploy = result.report["deployability"]
    assert "error" not in deploy
    for side in ("input", "output"):
        session = deploy[side]["session"]
        assert "error" not in session, session
        for key in MEASURED:
            value = session[key]
            assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (side, key)
        assert 1 <= session["create_repeats"] <= 5 and 1 <= session["latency_repeats"] <= 5
        assert session["batch"] == deploy["measured_with"]["batch"] > 0
    assert all(ratio is not None and ratio > 0 for ratio in deploy["output_vs_input"].values())
    assert deploy["measured_with"]["intra_op_threads"] == 1
    assert "not tested" in deploy["onnxruntime_min_note"]
    assert result.report["exploration"]["seconds"]["deploy"] > 0


def test_the_report_shows_the_section(result):
    page = render_html(result.report, {"pareto": b"\x89PNG", "sensitivity": b"\x89PNG"})
    section = page[page.index("<h2>Deployability</h2>"):page.index("<h2>Encoding</h2>")]
    assert "Oldest onnxruntime" in section and "onnxruntime ≥" in section and " MiB" in section and " ms" in section
    assert "not tested against older releases" in section and "median of" in section
    labels = dict(summary_rows(result.report))
    assert labels["Deployability (CPU ORT, 1 thread)"].startswith("onnxruntime >= ")
    bare = dict(result.report, deployability=None)  # a report without it (an earlier version) still renders
    assert "Not assessed" in render_html(bare, {"pareto": b"", "sensitivity": b""})


def test_a_failed_measurement_is_recorded_not_raised(caplog):
    model = _model(13, 7, np.array([0, 1, 2, 3, 1, 0], np.uint8))
    before = model.SerializeToString()
    with caplog.at_level(logging.WARNING, logger="onnxws.deployability"):
        deploy = assess(model, model, {"x": np.zeros(6, np.int64)})  # ORT refuses int64 for a float input
    assert model.SerializeToString() == before
    for side in ("input", "output"):
        assert deploy[side]["session"]["error"].startswith("not measured: ")
        assert deploy[side]["onnxruntime_min"] == "1.6"
    assert deploy["output_vs_input"] == dict.fromkeys(MEASURED)
    assert "deployability: the input model was not measured" in caplog.text
