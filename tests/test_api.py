"""The Python API: models and data in every accepted form, progress callback, no printing, reproducible config."""

from __future__ import annotations

import numpy as np
import onnx
from typer.testing import CliRunner

import onnxws
from onnxws.cli import app

FAST = {"search_samples": 500, "max_scorings": 30, "cache": False}


def test_data_forms_give_the_same_model(lenet_dir, capsys):
    path = lenet_dir / "model.onnx"
    arrays = dict(np.load(lenet_dir / "eval.npz"))
    stages = []
    by_path = onnxws.compress(path, lenet_dir / "eval.npz", loss=1.0,
                              progress=lambda stage, done, total, msg: stages.append(stage), **FAST)
    by_dict = onnxws.compress(onnx.load(str(path)), arrays, loss=1.0, **FAST)

    def batches():
        for start in range(0, len(arrays["y"]), 2500):
            yield {k: v[start:start + 2500] for k, v in arrays.items()}

    by_iter = onnxws.compress(path, batches(), loss=1.0, **FAST)
    reference = by_path.model.SerializeToString()
    assert by_dict.model.SerializeToString() == reference
    assert by_iter.model.SerializeToString() == reference
    assert {"cluster", "layer", "network"} <= set(stages)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""  # the library logs, never prints
    assert by_path.report["final"]["loss"] <= 1.0


def test_save_and_reproduce_from_saved_config(lenet_dir, tmp_path):
    path = lenet_dir / "model.onnx"
    result = onnxws.compress(path, loss=1.0, seed=3, **FAST)
    folder = result.save(tmp_path / "a.onnx")
    assert (tmp_path / "a.onnx").exists() and (folder / "report.json").exists()
    config = folder / "config.toml"
    assert "seed = 3" in config.read_text()
    runner = CliRunner()
    out = runner.invoke(app, ["compress", str(path), "--config", str(config), "-o", str(tmp_path / "b.onnx"),
                              "--no-cache", "--quiet"])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
