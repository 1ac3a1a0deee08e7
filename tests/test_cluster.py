"""Ray addresses (onnxws.cluster): a bad or unreachable address is one error line and no output,
before any work starts. No cluster runs in this module."""

from __future__ import annotations

import pytest
import ray
from typer.testing import CliRunner

from conftest import LENET
from onnxws.cli import app
from onnxws.errors import InputError

runner = CliRunner()


@pytest.mark.parametrize(("address", "code", "fragment"), [
    ("127.0.0.1:1", 1, "cannot reach the cluster"),
    ("ray://127.0.0.1:1", 1, "cannot reach the cluster"),
    ("nowhere", 1, "expected local, auto, HOST:PORT or ray://HOST:PORT"),
])
def test_a_bad_address_is_one_line_before_any_work(address, code, fragment, tmp_path):
    assert not ray.is_initialized()
    out = tmp_path / "o.onnx"
    result = runner.invoke(app, ["compress", str(LENET / "model.onnx"), "-o", str(out), "--no-cache", "--ray", address])
    assert result.exit_code == code and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"--ray {address}" in errors[0] and fragment in errors[0], result.output
    assert not out.exists() and not ray.is_initialized()


def test_auto_without_a_running_cluster_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    result = runner.invoke(app, ["batch", str(LENET), "--loss", "1", "-o", str(tmp_path / "out"), "--no-cache",
                                 "--ray", "auto"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--ray auto" in errors[0], result.output
    assert not (tmp_path / "out" / "model.ws.onnx").exists()


def test_address_forms():
    from onnxws.cluster import _host_port

    assert _host_port("local") is None and _host_port("auto") is None
    assert _host_port("10.0.0.5:6379") == ("10.0.0.5", 6379)
    assert _host_port("ray://head.example:10001") == ("head.example", 10001)
    with pytest.raises(InputError):
        _host_port("head.example")
