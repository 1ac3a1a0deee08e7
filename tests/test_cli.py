"""The command line end to end on the shipped LeNet-5 and on small graphs: outputs, reports, exit codes."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from graphs import lenet_like
from onnxws.cli import app
from onnxws.config import RUN_KEYS, RUN_OPTIONS
from onnxws.emit_check import decoded_weights

runner = CliRunner()


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_compress_shipped_lenet_within_budget(lenet_dir):
    model = lenet_dir / "model.onnx"
    before = sha(model)
    result = runner.invoke(app, ["compress", str(model), "--loss", "1", "--no-cache", "--quiet"])
    assert result.exit_code == 0, result.output
    out = lenet_dir / "model.ws.onnx"
    folder = lenet_dir / "model.ws.report"
    assert sha(model) == before  # input untouched
    for name in ("report.json", "report.html", "config.toml", "pareto.png", "sensitivity.png"):
        assert (folder / name).exists(), name
    report = json.loads((folder / "report.json").read_text())
    for key in ("value",):
        assert 0 <= report["baseline"][key] <= 1 and 0 <= report["final"][key] <= 1
    final = report["final"]
    assert final["loss_unit"] == "pp" and final["loss"] <= 1.0
    assert final["loss"] == pytest.approx((report["baseline"]["value"] - final["value"]) * 100)
    comp = report["compression"]
    assert comp["ratio_theoretical"] > report["uniform_baseline"]["ratio_theoretical"]
    # issue 3's acceptance figures on the shipped model (the refinement is what reaches them)
    assert comp["ratio_theoretical"] >= 16 and comp["ratio_file"] >= 10
    assert report["refinement"]["enabled"] and len(report["refinement"]["refined"]) == len(report["layers"])
    assert all(layer["bias_corrected"] and layer["bias"] for layer in report["layers"])  # every LeNet-5 layer has a bias
    assert comp["ratio_file"] == pytest.approx(comp["bytes_before"] / out.stat().st_size)
    assert comp["packing_efficiency"] >= 0.95
    exploration = report["exploration"]
    assert exploration["scorings"] == exploration["scorings_run"] + exploration["scorings_cached"]
    assert exploration["stopped_by"] in ("converged", "time_budget", "max_scorings")
    for key in ("name", "op_type", "shape", "params", "k", "bits", "index_dtype", "granularity", "loss_alone"):
        assert all(key in layer for layer in report["layers"])
    emitted = onnx.load(str(out))
    onnx.checker.check_model(emitted, full_check=True)
    # the file holds narrow index tensors, and its rebuilt weights take at most k values each
    rebuilt = decoded_weights(emitted, [layer["name"] for layer in report["layers"] if layer["k"]])
    for layer in report["layers"]:
        if layer["k"]:
            assert len(np.unique(rebuilt[layer["name"]])) <= layer["k"]
    # 10,000 samples: the last 2,000 held out of the search; the losses come with 95 % intervals
    assert report["data"]["n_samples"] == 10000 and report["data"]["n_holdout"] == 2000 and report["data"]["n_full"] == 8000
    holdout, whole = final["holdout"], final["whole"]
    assert (holdout["samples"], whole["samples"], final["full"]["samples"]) == (2000, 10000, 8000)
    for entry in (holdout, whole, final["full"]):
        assert entry["interval"][0] <= entry["loss"] <= entry["interval"][1]
    assert final["full"]["loss"] == pytest.approx(final["loss"])
    assert whole["loss"] == pytest.approx((8000 * final["full"]["loss"] + 2000 * holdout["loss"]) / 10000)
    assert 0 < final["resolution"] < 1 and final["resolution_note"] is None  # 10,000 samples resolve a 1 pp budget
    # `onnxws evaluate` on the emitted file gives the report's whole-set figure
    result = runner.invoke(app, ["evaluate", str(out), "--data", str(lenet_dir / "eval.npz"), "--json"])
    assert result.exit_code == 0, result.output
    measured = json.loads(result.stdout)
    assert measured["metric"] == "top1_accuracy" and measured["value"] == pytest.approx(whole["value"], abs=1e-9)
    # the rerun rule: the same job replaces its own output (same bytes); another job needs --force
    stamp = sha(out)
    result = runner.invoke(app, ["compress", str(model), "--loss", "1", "--no-cache", "--quiet"])
    assert result.exit_code == 0, result.output
    assert sha(out) == stamp and json.loads((folder / "report.json").read_text())["final"] == final
    result = runner.invoke(app, ["compress", str(model), "--loss", "0.5", "--no-cache", "--quiet"])
    assert result.exit_code == 1 and "--force" in result.output and "different job" in result.output
    assert sha(out) == stamp


def test_no_refine_flag_reaches_the_pipeline(lenet_dir, tmp_path):
    result = runner.invoke(app, ["compress", str(lenet_dir / "model.onnx"), "-o", str(tmp_path / "o.onnx"), "--no-refine",
                                 "--no-cache", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "o.report" / "report.json").read_text())
    assert report["refinement"]["enabled"] is False and report["config"]["global"]["refine"] is False
    assert not any(layer["refined"] for layer in report["layers"])


def test_no_bias_correction_and_no_grow_subset_flags_reach_the_pipeline(lenet_dir, tmp_path):
    result = runner.invoke(app, ["compress", str(lenet_dir / "model.onnx"), "-o", str(tmp_path / "o.onnx"),
                                 "--no-bias-correction", "--no-grow-subset", "--no-cache", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "o.report" / "report.json").read_text())
    assert report["refinement"]["enabled"] and report["refinement"]["bias_correction"] is False
    assert report["config"]["global"]["bias_correction"] is False
    assert report["config"]["global"]["grow_subset"] is False and report["exploration"]["search_subset_growth"] == []
    assert all(layer["refined"] and not layer["bias_corrected"] for layer in report["layers"])


def test_every_run_option_is_a_flag_that_reaches_the_config(lenet_dir, tmp_path):
    """The command line is built from config.RUN_OPTIONS: each option given as a flag is the value
    the run's resolved config records; batch takes the ones a batch sets for every model."""
    given = {"loss": 2.0, "loss_mode": "absolute", "device": "cpu", "search_samples": 500, "holdout": 0.25, "batch_size": 250,
             "metric": "tests_metrics:accuracy", "output": "logits", "strategy": "greedy", "predictor": "additive",
             "edge_tries": 1, "grow_subset": False, "refine": False, "bias_correction": False, "time_budget": 300.0,
             "max_scorings": 400, "metric_timeout": 30.0, "seed": 5, "opset": 17}
    assert set(given) == set(RUN_KEYS)
    args = []
    for option in RUN_OPTIONS:
        value = given[option.name]
        args += [option.flag if value else "--no-" + option.flag[2:]] if option.kind is bool else [option.flag, str(value)]
    metric_dir = tmp_path / "metric"
    metric_dir.mkdir()
    (metric_dir / "tests_metrics.py").write_text(
        "import numpy as np\n\ndef accuracy(outputs, data):\n    return float(np.mean(outputs[0].argmax(1) == data['y']))\n")
    import sys
    sys.path.insert(0, str(metric_dir))
    try:
        result = runner.invoke(app, ["compress", str(lenet_dir / "model.onnx"), "-o", str(tmp_path / "o.onnx"),
                                     "--no-cache", "--json", *args])
    finally:
        sys.path.remove(str(metric_dir))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "o.report" / "report.json").read_text())
    assert {k: report["config"]["global"][k] for k in given} == given
    batch_help = runner.invoke(app, ["batch", "--help"], env={"COLUMNS": "250"}).output
    for option in RUN_OPTIONS:
        assert bool(re.search(re.escape(option.flag) + r"(?![\w-])", batch_help)) == option.batch, option.name


def test_same_inputs_same_bytes(lenet_dir, tmp_path):
    """Determinism: two runs (cold and warm cache, different -o) write byte-identical models."""
    model = lenet_dir / "model.onnx"
    cache = tmp_path / "cache"
    outs = []
    for name in ("a.onnx", "b.onnx"):
        out = tmp_path / name
        result = runner.invoke(app, ["compress", str(model), "-o", str(out), "--cache", str(cache), "--quiet",
                                     "--search-samples", "1000", "--max-scorings", "40"])
        assert result.exit_code == 0, result.output
        outs.append(out)
    assert sha(outs[0]) == sha(outs[1])
    first = json.loads((tmp_path / "a.report" / "report.json").read_text())
    second = json.loads((tmp_path / "b.report" / "report.json").read_text())
    assert second["exploration"]["scorings_cached"] == second["exploration"]["scorings"]
    assert first["final"] == second["final"] and first["layers"] == second["layers"]


def test_json_output(lenet_dir, tmp_path):
    result = runner.invoke(app, ["compress", str(lenet_dir / "model.onnx"), "-o", str(tmp_path / "o.onnx"),
                                 "--no-cache", "--json", "--max-scorings", "30", "--search-samples", "500"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["exploration"]["scorings"] <= 30 + 3  # the full-set verification and uniform check are forced
    assert summary["final"]["loss"] <= 1.0


def _write(tmp_path, model, data=None, name="m.onnx"):
    path = tmp_path / name
    path.write_bytes(model.SerializeToString())
    if data is not None:
        np.savez(tmp_path / "m.npz", **data)
    return path


def test_exit_codes(tmp_path):
    from graphs import labelled_data

    model = lenet_like()
    path = _write(tmp_path, model, labelled_data(model))
    # missing path: usage error 2
    assert runner.invoke(app, ["compress", str(tmp_path / "nope.onnx")]).exit_code == 2
    # unknown option: 2
    assert runner.invoke(app, ["compress", str(path), "--bogus"]).exit_code == 2
    # invalid value: 2
    assert runner.invoke(app, ["compress", str(path), "--loss", "-1", "--no-cache"]).exit_code == 2
    # output equal to input: 2
    result = runner.invoke(app, ["compress", str(path), "-o", str(path), "--no-cache"])
    assert result.exit_code == 2 and "input" in result.output
    # corrupt file: 1, one line, no traceback
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    result = runner.invoke(app, ["compress", str(bad), "--data", str(tmp_path / "m.npz"), "--no-cache"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    # --device cuda without a GPU: 1
    result = runner.invoke(app, ["compress", str(path), "--device", "cuda", "--no-cache"])
    assert result.exit_code == 1 and "GPU" in result.output
    # no layer within budget (only k=1 allowed): 3, nothing written
    config = tmp_path / "k1.toml"
    config.write_text("[global]\nbits = [0]\nmin_params = 16\n")
    result = runner.invoke(app, ["compress", str(path), "--config", str(config), "--no-cache", "--loss", "0.5"])
    assert result.exit_code == 3, result.output
    assert "smallest loss" in result.output and not (tmp_path / "m.ws.onnx").exists()


def test_nothing_to_share_is_exit_1(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = _write(tmp_path, model, {"x": np.ones((3, 4), np.float32)})
    result = runner.invoke(app, ["compress", str(path), "--no-cache"])
    assert result.exit_code == 1 and "no shareable weight" in result.output


def test_inspect_lists_shareable_and_skipped(lenet_dir):
    result = runner.invoke(app, ["inspect", str(lenet_dir / "model.onnx"), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["tensors"]
    status = {r["name"]: r["status"] for r in rows}
    assert status["net.fc1.weight"] == "shareable" and status["net.conv1.bias"] == "skipped"


def test_jobs_score_in_worker_processes_with_the_same_output_bytes(lenet_dir, tmp_path):
    """--jobs 2 changes where candidates are scored, not what the run writes."""
    outputs = []
    for jobs in ("1", "2"):
        out = tmp_path / f"j{jobs}.onnx"
        result = runner.invoke(app, ["compress", str(lenet_dir / "model.onnx"), "-o", str(out), "--no-cache", "--quiet",
                                     "--search-samples", "500", "--max-scorings", "60", "--jobs", jobs])
        assert result.exit_code == 0, result.output
        report = json.loads((tmp_path / f"j{jobs}.report" / "report.json").read_text())
        assert report["exploration"]["executor"] == {"name": "local" if jobs == "1" else "pool", "jobs": int(jobs)}
        assert "jobs" not in report["config"]["global"]
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
