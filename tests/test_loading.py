"""Loading and atomic saving: clear errors on bad files, nothing half-written."""

from __future__ import annotations

import os

import onnx
import pytest

from graphs import lenet_like
from onnxws.errors import InputError
from onnxws.loading import load_model, save_model_atomic


def test_round_trip(tmp_path):
    path = tmp_path / "m.onnx"
    size = save_model_atomic(lenet_like(), path)
    assert size == path.stat().st_size
    assert load_model(path).graph.name == "lenet_like"


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty"),
        (b"this is not a protobuf at all \xff\xfe", "not a valid ONNX file"),
    ],
)
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        load_model(path)


def test_truncated_model(tmp_path):
    data = lenet_like().SerializeToString()
    path = tmp_path / "trunc.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError):
        load_model(path)


def test_missing_and_directory(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_model(tmp_path / "nope.onnx")
    with pytest.raises(InputError, match="directory"):
        load_model(tmp_path)


def test_checker_failure(tmp_path):
    model = lenet_like()
    model.graph.node[0].input[1] = "does_not_exist"
    path = tmp_path / "broken.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(InputError, match="checker"):
        load_model(path)


def test_existing_output_needs_force(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"keep me")
    with pytest.raises(InputError, match="--force"):
        save_model_atomic(lenet_like(), path)
    assert path.read_bytes() == b"keep me"
    save_model_atomic(lenet_like(), path, force=True)
    assert onnx.load(str(path)).graph.name == "lenet_like"


def test_unwritable_folder(tmp_path):
    """A folder the process cannot write to: mode 0500 as a user; /sys (read-only for root too) as root."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    target = folder if os.geteuid() != 0 else __import__("pathlib").Path("/sys")
    try:
        with pytest.raises(InputError, match="not writable|could not write"):
            save_model_atomic(lenet_like(), target / "m.onnx")
    finally:
        folder.chmod(0o700)
    assert not (target / "m.onnx").exists()


def test_disk_full_leaves_nothing_behind(tmp_path, monkeypatch):
    """A write that fails midway (simulated ENOSPC) raises InputError and leaves no file."""
    real_fsync = os.fsync

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(InputError, match="No space left"):
        save_model_atomic(lenet_like(), tmp_path / "m.onnx")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert list(tmp_path.iterdir()) == []
