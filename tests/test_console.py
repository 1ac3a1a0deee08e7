"""What a user sees: messages verbatim (never markup), control characters escaped, --json errors, signals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from onnxws import __version__
from onnxws.cli import app
from onnxws.console import message_line, printable

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("text", "shown"), [
    ("conv1.weight", "conv1.weight"),
    ("exp[v2]/[/x] [bold]", "exp[v2]/[/x] [bold]"),  # brackets are text
    ("a\x1b]0;owned\x07b", "a\\x1b]0;owned\\x07b"),  # a terminal title escape, disarmed
    ("w\nerror: fake line", "w\\nerror: fake line"),
    ("x\u202egnp.exe", "x\\u202egnp.exe"),  # a bidi override
    ("café ünïcode", "café ünïcode"),
])
def test_printable_escapes_controls_only(text, shown):
    assert printable(text) == shown


def test_message_line_is_one_line():
    assert message_line("a\n  b\tc\x1b") == "a b c\\x1b"


def test_markup_in_a_message_is_printed_verbatim(lenet_dir):
    result = runner.invoke(app, ["compress", str(lenet_dir / "model.onnx"), "--metric", "exp[v2]/[/x]:f", "--no-cache"])
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "exp[v2]/[/x]:f" in lines[0], result.output


def test_an_error_is_one_json_object_on_stdout_with_json(lenet_dir):
    result = runner.invoke(app, ["compress", str(lenet_dir / "model.onnx"), "--metric", "nope:f", "--json", "--no-cache"])
    assert result.exit_code == 1
    obj = json.loads(result.stdout)
    assert obj["exit_code"] == 1 and "nope:f" in obj["error"]
    assert [line for line in result.stderr.splitlines() if line] == [f"error: {obj['error']}"]


def test_usage_errors_are_json_too(lenet_dir):
    proc = subprocess.run([sys.executable, "-m", "onnxws.cli", "compress", str(lenet_dir / "model.onnx"), "--bogus",
                           "--json"], capture_output=True, text=True, timeout=120, cwd=lenet_dir)
    assert proc.returncode == 2
    obj = json.loads(proc.stdout)
    assert obj["exit_code"] == 2 and "--bogus" in obj["error"]
    assert "--bogus" in proc.stderr and "Traceback" not in proc.stderr


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"onnxws {__version__}"


def test_hostile_tensor_names_are_shown_escaped(tmp_path):
    names = ["w\x1b]0;owned\x07", "b\nerror: fake line"]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(16, 16)).astype(np.float32), names[0]),
             numpy_helper.from_array(rng.normal(size=16).astype(np.float32), names[1])]
    graph = helper.make_graph([helper.make_node("Gemm", ["x", names[0], names[1]], ["y"])], "g", [x], [y], inits)
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    result = runner.invoke(app, ["inspect", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert "\\x1b]0;owned\\x07" in result.output and "\\nerror: fake line" in result.output
    assert not any(line.startswith("error:") for line in result.output.splitlines())


def test_sigterm_is_handled_like_ctrl_c(lenet_dir):
    """A metric that sends SIGTERM to its own process mid-run: exit 143, one line, nothing left behind."""
    (lenet_dir / "killer.py").write_text(
        "import os, signal\nimport numpy as np\n\n"
        "def metric(outputs, data):\n    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return float(np.mean(outputs[0].argmax(1) == data['y']))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(lenet_dir), str(ROOT)])}
    before = sorted(p.name for p in lenet_dir.iterdir())
    proc = subprocess.run([sys.executable, "-m", "onnxws.cli", "compress", "model.onnx", "--metric", "killer:metric",
                           "--no-cache", "--quiet"], capture_output=True, text=True, timeout=300, cwd=lenet_dir, env=env)
    assert proc.returncode == 143, proc.stderr
    assert proc.stderr.splitlines() == ["error: terminated (SIGTERM); nothing was written"]
    assert sorted(p.name for p in lenet_dir.iterdir() if p.name != "__pycache__") == before
