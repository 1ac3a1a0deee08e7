"""`onnxws evaluate` against an independent ORT run; a killed compress resumed from its cache; budgets; fp16."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

import onnxws
from conftest import scores_stored
from onnxws.cli import app

runner = CliRunner()


def _two_input_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(6, 5)).astype(np.float32), "wa"),
             numpy_helper.from_array(rng.normal(size=(3, 5)).astype(np.float32), "wb")]
    nodes = [helper.make_node("MatMul", ["a", "wa"], ["ha"]), helper.make_node("MatMul", ["b", "wb"], ["hb"]),
             helper.make_node("Add", ["ha", "hb"], ["logits"]), helper.make_node("Relu", ["logits"], ["aux"])]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 6]),
                                             helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5]),
                               helper.make_tensor_value_info("aux", TensorProto.FLOAT, ["N", 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_evaluate_matches_an_independent_ort_run(tmp_path):
    model = _two_input_model()
    path = tmp_path / "two.onnx"
    onnx.save(model, str(path))
    rng = np.random.default_rng(1)
    feeds = {"a": rng.normal(size=(50, 6)).astype(np.float32), "b": rng.normal(size=(50, 3)).astype(np.float32)}
    logits = ort.InferenceSession(str(path)).run(["logits"], feeds)[0]
    y = rng.integers(0, 5, size=50)
    np.savez(tmp_path / "labelled.npz", **feeds, y=y)
    result = runner.invoke(app, ["evaluate", str(path), "--data", str(tmp_path / "labelled.npz"), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["metric"] == "top1_accuracy" and out["value"] == float(np.mean(logits.argmax(1) == y))
    # label-free data: expected accuracy under a reference model's probabilities by default, top-1
    # agreement by name (a perturbed copy against the original: independent counts)
    np.savez(tmp_path / "free.npz", **feeds)
    other = onnx.ModelProto()
    other.CopyFrom(model)
    other.graph.initializer[0].CopyFrom(numpy_helper.from_array(
        numpy_helper.to_array(model.graph.initializer[0]) * np.float32(-0.5) + np.float32(0.3), "wa"))
    other_path = tmp_path / "other.onnx"
    onnx.save(other, str(other_path))
    top = ort.InferenceSession(str(other_path)).run(["logits"], feeds)[0].argmax(1)
    expected = float(np.mean(top == logits.argmax(1)))
    result = runner.invoke(app, ["evaluate", str(other_path), "--data", str(tmp_path / "free.npz"),
                                 "--reference", str(path), "--metric", "top1_agreement", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["metric"] == "top1_agreement" and out["value"] == expected
    p = np.exp(logits - logits.max(1, keepdims=True)).astype(np.float64)
    p /= p.sum(1, keepdims=True)
    result = runner.invoke(app, ["evaluate", str(other_path), "--data", str(tmp_path / "free.npz"),
                                 "--reference", str(path), "--json"])
    out = json.loads(result.stdout)
    assert out["metric"] == "expected_accuracy" and out["value"] == pytest.approx(float(p[np.arange(50), top].mean()), rel=1e-5)
    missing = runner.invoke(app, ["evaluate", str(other_path), "--data", str(tmp_path / "free.npz")])
    assert missing.exit_code == 1 and "--reference" in missing.output


def test_killed_run_resumes_from_its_cache(lenet_dir, tmp_path):
    """kill -9 mid-exploration, rerun with the same cache: same model bytes, fewer real scorings."""
    model = lenet_dir / "model.onnx"
    cache = tmp_path / "cache"
    base = [sys.executable, "-m", "onnxws.cli", "compress", str(model), "--cache", str(cache), "--quiet",
            "--search-samples", "1000"]
    reference = tmp_path / "reference.onnx"
    subprocess.run([*base[:-3], "--no-cache", "--search-samples", "1000", "-o", str(reference)], check=True,
                   capture_output=True)
    victim = subprocess.Popen([*base, "-o", str(tmp_path / "killed.onnx")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    db = cache / "scores.sqlite"
    while time.time() < deadline and victim.poll() is None:  # wait until some scores are on disk
        if db.exists() and scores_stored(db) >= 10:
            break
        time.sleep(0.05)
    if victim.poll() is None:
        os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "killed.onnx").exists() or victim.returncode == 0
    done_before = scores_stored(db)
    assert done_before >= 1
    out = tmp_path / "resumed.onnx"
    subprocess.run([*base, "-o", str(out)], check=True, capture_output=True)
    assert out.read_bytes() == reference.read_bytes()
    report = json.loads((tmp_path / "resumed.report" / "report.json").read_text())
    exploration = report["exploration"]
    assert exploration["scorings_cached"] >= min(done_before, exploration["scorings"]) > 0
    assert exploration["scorings_run"] < exploration["scorings"]


def test_time_budget_still_emits_a_valid_model(lenet_dir, tmp_path):
    out = tmp_path / "tb.onnx"
    result = runner.invoke(app, ["compress", str(lenet_dir / "model.onnx"), "-o", str(out), "--no-cache",
                                 "--time-budget", "1.5", "--search-samples", "500", "--quiet"])
    assert result.exit_code in (0, 4), result.output  # 4: the limit stopped the run before an answer
    if result.exit_code == 4:
        assert "--time-budget 1.5" in result.output and "raise the limit" in result.output
    else:
        report = json.loads((tmp_path / "tb.report" / "report.json").read_text())
        assert report["exploration"]["stopped_by"] == "time_budget" and report["final"]["loss"] <= 1.0
        onnx.checker.check_model(onnx.load(str(out)), full_check=True)


def test_fp16_model_compresses_with_fp16_codebooks(tmp_path):
    rng = np.random.default_rng(3)
    w1 = rng.normal(0, 0.3, size=(16, 64)).astype(np.float16)
    w2 = rng.normal(0, 0.3, size=(64, 10)).astype(np.float16)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["logits"])]
    graph = helper.make_graph(nodes, "fp16", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT16, ["N", 10])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.normal(size=(400, 16)).astype(np.float16)
    y = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0].argmax(1)
    result = onnxws.compress(model, {"x": x, "y": y}, loss=2.0, cache=False)
    assert result.report["final"]["loss"] <= 2.0
    books = [i for i in result.model.graph.initializer if i.name.endswith(".codebook")]
    assert books and all(b.data_type == TensorProto.FLOAT16 for b in books)
    layers = {l["name"]: l for l in result.report["layers"]}
    assert all(l["dtype"] == "float16" for l in layers.values())
