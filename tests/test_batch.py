"""`onnxws batch`: a folder with two good models and a corrupt one; resume; manifest."""

from __future__ import annotations

import csv
import shutil

from typer.testing import CliRunner

from conftest import LENET
from onnxws.cli import app

runner = CliRunner()
FAST = ["--no-cache", "--search-samples", "500", "--max-scorings", "40", "--quiet"]


def _zoo(tmp_path):
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    shutil.copy(LENET / "model.onnx", zoo / "lenet.onnx")
    shutil.copy(LENET / "model.onnx", zoo / "lenet_copy.onnx")
    shutil.copy(LENET / "eval.npz", zoo / "eval.npz")  # shared sidecar for every model of the folder
    (zoo / "broken.onnx").write_bytes(b"\x0a\x05hello this is not a model")
    return zoo


def _summary(out):
    with open(out / "summary.csv") as handle:
        return {row["model"]: row for row in csv.DictReader(handle)}


def test_folder_batch_with_a_failure_and_resume(tmp_path):
    zoo = _zoo(tmp_path)
    out = tmp_path / "out"
    result = runner.invoke(app, ["batch", str(zoo), "--loss", "1", "-o", str(out), *FAST])
    assert result.exit_code == 1, result.output
    rows = _summary(out)
    assert rows["lenet"]["status"] == "ok" and rows["lenet_copy"]["status"] == "ok"
    assert rows["broken"]["status"] == "failed" and "ONNX" in rows["broken"]["error"]
    for stem in ("lenet", "lenet_copy"):
        assert (out / f"{stem}.ws.onnx").exists() and (out / f"{stem}.ws.report" / "report.json").exists()
        assert float(rows[stem]["loss"]) <= 1.0
    assert not (out / "broken.ws.onnx").exists()
    assert "broken" in (out / "summary.md").read_text()
    stamp = (out / "lenet.ws.onnx").stat().st_mtime_ns
    (out / "lenet.ws.report").rename(out / "lenet.report")  # a report folder under the earlier name
    again = runner.invoke(app, ["batch", str(zoo), "--loss", "1", "-o", str(out), *FAST])
    assert again.exit_code == 1
    rows = _summary(out)
    assert rows["lenet"]["status"] == "skipped (done)" and rows["lenet_copy"]["status"] == "skipped (done)"
    assert (out / "lenet.ws.onnx").stat().st_mtime_ns == stamp
    assert (out / "lenet.ws.report" / "report.json").exists() and not (out / "lenet.report").exists()
    # another job (another budget) is refused per model, naming --force, and nothing is replaced
    other = runner.invoke(app, ["batch", str(zoo), "--loss", "0.5", "-o", str(out), *FAST])
    rows = _summary(out)
    assert other.exit_code == 1 and rows["lenet"]["status"] == "failed" and "--force" in rows["lenet"]["error"]
    assert (out / "lenet.ws.onnx").stat().st_mtime_ns == stamp


def test_outputs_in_the_input_folder_are_not_inputs(tmp_path):
    zoo = _zoo(tmp_path)
    (zoo / "broken.onnx").unlink()
    first = runner.invoke(app, ["batch", str(zoo), "-o", str(zoo), *FAST])
    assert first.exit_code == 0, first.output
    rows = _summary(zoo)
    assert set(rows) == {"lenet", "lenet_copy"}  # lenet.ws.onnx was not taken as a new input


def test_manifest_with_per_model_options(tmp_path):
    _zoo(tmp_path)
    manifest = tmp_path / "zoo.toml"
    manifest.write_text(
        "[defaults]\nloss = 1.0\nsearch_samples = 500\nmax_scorings = 40\n\n"
        "[[model]]\npath = \"zoo/lenet.onnx\"\ndata = \"zoo/eval.npz\"\nloss = 0.5\n\n"
        "[[model]]\npath = \"zoo/lenet_copy.onnx\"\n"
    )
    out = tmp_path / "out"
    result = runner.invoke(app, ["batch", str(manifest), "-o", str(out), "--no-cache", "--quiet"])
    assert result.exit_code == 0, result.output
    rows = _summary(out)
    assert float(rows["lenet"]["loss"]) <= 0.5 and rows["lenet_copy"]["status"] == "ok"
    bad = tmp_path / "bad.toml"
    bad.write_text("[[model]]\ndata = \"x.npz\"\n")
    assert runner.invoke(app, ["batch", str(bad), "-o", str(out), "--quiet"]).exit_code == 2


def test_every_model_caused_failure_is_a_row_shown_verbatim(tmp_path):
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    (zoo / "[bold]odd[v2].onnx").write_bytes(b"\x08\x07garbage" * 10)
    (zoo / "empty.onnx").write_bytes(b"")
    result = runner.invoke(app, ["batch", str(zoo), "-o", str(tmp_path / "out"), "--no-cache"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "[bold]odd[v2]" in result.output  # not eaten as markup
    rows = _summary(tmp_path / "out")
    assert {name: row["status"] for name, row in rows.items()} == {"[bold]odd[v2]": "failed", "empty": "failed"}
    assert "empty" in rows["empty"]["error"]
