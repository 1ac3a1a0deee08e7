"""Bad input through the CLI: the documented exit code, one clear stderr line, no traceback,
the input file untouched, and no output (or temp) file left behind."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import warnings

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

import onnxws
import onnxws.loading as loading
from conftest import LENET
from graphs import labelled_data, lenet_like
from onnxws.cli import app

runner = CliRunner()


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_bad(folder, args, code, fragment):
    """Run the CLI, check the failure contract, return the output."""
    inputs = {p: sha(p) for p in folder.iterdir() if p.is_file()}
    result = runner.invoke(app, args)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    if code != 2:  # typer formats usage errors in a box; ours are one "error:" line
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, result.output
    assert fragment.lower() in " ".join(result.output.split()).lower(), result.output
    for path, digest in inputs.items():
        assert sha(path) == digest, f"{path} was modified"
    leftovers = [p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".ws.onnx")) or p.name.endswith(".report")]
    assert not leftovers, leftovers
    return result.output


@pytest.fixture
def lenet(tmp_path):
    for name in ("model.onnx", "eval.npz"):
        shutil.copy(LENET / name, tmp_path / name)
    return tmp_path


def test_missing_file(tmp_path):
    run_bad(tmp_path, ["compress", str(tmp_path / "none.onnx")], 2, "does not exist")


def test_not_an_onnx_file(lenet):
    text = lenet / "notes.onnx"
    text.write_text("just some text, not a model\n" * 10)
    run_bad(lenet, ["compress", str(text), "--data", str(lenet / "eval.npz"), "--no-cache"], 1, "onnx")


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_truncated_protobuf(lenet, cut):
    data = (lenet / "model.onnx").read_bytes()
    bad = lenet / "trunc.onnx"
    bad.write_bytes(data[: int(len(data) * cut)])
    run_bad(lenet, ["compress", str(bad), "--data", str(lenet / "eval.npz"), "--no-cache"], 1, "error")


def test_corrupt_protobuf(lenet):
    data = bytearray((lenet / "model.onnx").read_bytes())
    rng = np.random.default_rng(0)
    for i in rng.integers(100, 2000, size=40):
        data[i] ^= 0xFF
    bad = lenet / "corrupt.onnx"
    bad.write_bytes(bytes(data))
    run_bad(lenet, ["compress", str(bad), "--data", str(lenet / "eval.npz"), "--no-cache"], 1, "error")


def test_model_failing_the_checker(lenet):
    model = onnx.load(str(lenet / "model.onnx"))
    model.graph.node[3].input[1] = "nowhere"
    bad = lenet / "broken.onnx"
    bad.write_bytes(model.SerializeToString())
    run_bad(lenet, ["compress", str(bad), "--data", str(lenet / "eval.npz"), "--no-cache"], 1, "checker")


def _save_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_data_dims_dtype_names_labels(lenet):
    arrays = dict(np.load(lenet / "eval.npz"))
    model = str(lenet / "model.onnx")
    cases = [
        ({"input": arrays["input"][:, :, :20, :], "y": arrays["y"]}, "28"),          # fixed dims
        ({"input": arrays["input"].astype(np.float32), "y": arrays["y"]}, "uint8"),  # dtype
        ({"image": arrays["input"], "y": arrays["y"]}, "input"),                     # missing array
        ({"input": arrays["input"], "y": np.full_like(arrays["y"], 10)}, "label"),   # out of range
        ({"input": arrays["input"], "y": arrays["y"][:-5]}, "length"),              # wrong length
        ({"input": arrays["input"][:0], "y": arrays["y"][:0]}, "no samples"),       # empty data
    ]
    for i, (data, fragment) in enumerate(cases):
        path = _save_npz(lenet / f"bad{i}.npz", **data)
        run_bad(lenet, ["compress", model, "--data", str(path), "--no-cache"], 1, fragment)
        path.unlink()


def test_no_shareable_weights(tmp_path):
    model = lenet_like()  # with min_params above every tensor's size, nothing is shareable
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    np.savez(tmp_path / "m.npz", **labelled_data(model))
    config = tmp_path / "c.toml"
    config.write_text("[global]\nmin_params = 100000\n")
    run_bad(tmp_path, ["compress", str(path), "--config", str(config), "--no-cache"], 1, "no shareable weight")


def test_nan_weights_are_skipped_with_a_reason(tmp_path):
    model = lenet_like()
    for init in model.graph.initializer:
        if init.name == "conv.W":
            w = numpy_helper.to_array(init).copy()
            w[0, 0, 0, 0] = np.nan
            init.CopyFrom(numpy_helper.from_array(w, "conv.W"))
    data = {"x": np.random.default_rng(0).normal(size=(100, 1, 8, 8)).astype(np.float32)}
    config = onnxws.CompressConfig.from_dict({"global": {"min_params": 16, "metric": "top1_agreement"}})
    result = onnxws.compress(model, data, loss=5.0, cache=False, config=config)  # NaN outputs: argmax agreement still runs
    skipped = {s["name"]: s["reason"] for s in result.report["skipped"]}
    assert "NaN/Inf" in skipped["conv.W"]
    assert [l["name"] for l in result.report["layers"]] == ["fc.W"]


@pytest.mark.parametrize("loss", ["-1", "1000", "nan"])
def test_absurd_loss(lenet, loss):
    run_bad(lenet, ["compress", str(lenet / "model.onnx"), "--loss", loss, "--no-cache"], 2, "loss")


def test_unwritable_output_folder(lenet):
    target = "/sys/m.onnx" if os.geteuid() == 0 else "/proc/m.onnx"
    run_bad(lenet, ["compress", str(lenet / "model.onnx"), "-o", target, "--no-cache"], 1, "not writable")


def test_output_equal_to_input(lenet):
    model = str(lenet / "model.onnx")
    run_bad(lenet, ["compress", model, "-o", model, "--no-cache"], 2, "input")


def test_existing_output_needs_force(lenet):
    out = lenet / "taken.onnx"
    out.write_bytes(b"mine")
    result = runner.invoke(app, ["compress", str(lenet / "model.onnx"), "-o", str(out), "--no-cache"])
    assert result.exit_code == 1 and "--force" in result.output and out.read_bytes() == b"mine"


def test_disk_full_while_writing(lenet, monkeypatch):
    """ENOSPC in the middle of the write: one clear error, no partial model, input untouched."""
    result = onnxws.compress(lenet / "model.onnx", loss=1.0, cache=False, search_samples=500, max_scorings=30)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loading.os, "fsync", full)
    with pytest.raises(onnxws.InputError, match="No space left"):
        result.save(lenet / "out.onnx")
    assert sorted(p.name for p in lenet.iterdir()) == ["eval.npz", "model.onnx"]


# -- hostile and careless input ------------------------------------------------------------------
@pytest.fixture
def floaty(tmp_path):
    """A small float-input model with its labelled data (NaN-able inputs), in its own folder."""
    model = lenet_like()
    onnx.save(model, str(tmp_path / "m.onnx"))
    arrays = labelled_data(model)
    np.savez(tmp_path / "m.npz", **arrays)
    return tmp_path, arrays


def test_all_nan_inputs_are_refused(floaty):
    folder, arrays = floaty
    path = _save_npz(folder / "nan.npz", x=np.full_like(arrays["x"], np.nan), y=arrays["y"])
    run_bad(folder, ["compress", str(folder / "m.onnx"), "--data", str(path), "--no-cache"], 1, "all 200 samples")


def test_samples_with_nan_inputs_are_left_out_and_counted(floaty):
    folder, arrays = floaty
    x = arrays["x"].copy()
    x[:20, 0, 0, 0] = np.nan
    x[20, 0, 1, 1] = np.inf
    clean = onnxws.compress(folder / "m.onnx", {"x": arrays["x"][21:], "y": arrays["y"][21:]}, loss=2.0, cache=False,
                            max_scorings=25)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy RuntimeWarning leaks
        result = onnxws.compress(folder / "m.onnx", {"x": x, "y": arrays["y"]}, loss=2.0, cache=False, max_scorings=25)
    assert result.report["data"]["dropped_nonfinite"] == 21 and result.report["data"]["n_samples"] == 179
    assert result.model.SerializeToString() == clean.model.SerializeToString()  # as if they had never been there


def test_a_set_that_cannot_state_its_resolution_says_so(floaty, caplog):
    caplog.set_level(logging.WARNING, logger="onnxws.pipeline")
    folder, arrays = floaty
    result = onnxws.compress(folder / "m.onnx", {"x": arrays["x"][:1], "y": arrays["y"][:1]}, loss=1.0, cache=False,
                             max_scorings=15, metric="top1_agreement")
    assert "resolution cannot be stated" in caplog.text and "1 sample" in caplog.text
    assert "cannot be stated" in result.report["final"]["resolution_note"]


@pytest.mark.parametrize(("limit", "found"), [(["--max-scorings", "1", "--loss", "0.01"], "smallest loss found was"),
                                             (["--time-budget", "0.001"], "no candidate was scored")])
def test_a_limit_that_stops_the_run_is_named_not_the_budget(lenet, limit, found):
    out = run_bad(lenet, ["compress", str(lenet / "model.onnx"), "--no-cache", *limit], 4, f"stopped by {limit[0]}")
    assert found in " ".join(out.split()) and "nan" not in out and "raise --loss" not in out


METRICS = '''
import sys
import numpy as np

def accuracy(outputs, data):
    return float(np.mean(outputs[0].argmax(1) == data["y"]))

def exits_0(outputs, data):
    sys.exit(0)

def exits_3(outputs, data):
    sys.exit(3)

def chatty(outputs, data):
    print("hello from the metric")
    return accuracy(outputs, data)

def a_string(outputs, data):
    return "0.5"

def interrupts(outputs, data):
    raise KeyboardInterrupt

def slow(outputs, data):
    import time
    time.sleep(30)
    return 1.0
'''


@pytest.fixture
def user_metrics(lenet, monkeypatch):
    (lenet / "user_metrics.py").write_text(METRICS)
    monkeypatch.syspath_prepend(str(lenet))
    yield lenet
    shutil.rmtree(lenet / "__pycache__", ignore_errors=True)
    (lenet / "user_metrics.py").unlink()


@pytest.mark.parametrize(("name", "fragment"), [
    ("exits_0", "sys.exit(0)"), ("exits_3", "sys.exit(3)"), ("a_string", "'0.5' (str)"),
    ("interrupts", "KeyboardInterrupt itself"),
])
def test_user_metrics_cannot_fake_the_result(user_metrics, name, fragment):
    model = str(user_metrics / "model.onnx")
    run_bad(user_metrics, ["compress", model, "--metric", f"user_metrics:{name}", "--no-cache"], 1, fragment)


def test_a_slow_metric_is_stopped_by_its_timeout(user_metrics):
    model = str(user_metrics / "model.onnx")
    run_bad(user_metrics, ["compress", model, "--metric", "user_metrics:slow", "--metric-timeout", "0.5",
                           "--no-cache"], 1, "--metric-timeout 0.5")


def test_a_printing_metric_never_corrupts_json(user_metrics):
    result = runner.invoke(app, ["compress", str(user_metrics / "model.onnx"), "--metric", "user_metrics:chatty",
                                 "--no-cache", "--json", "--search-samples", "500", "--max-scorings", "20",
                                 "-o", str(user_metrics / "out.onnx")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["metric"] == "user_metrics:chatty"
    assert "hello" not in result.stdout


def test_external_data_outside_the_folder_is_bad_input(tmp_path):
    model = lenet_like()
    init = next(t for t in model.graph.initializer if t.name == "fc.W")
    (tmp_path / "outside.bin").write_bytes(init.raw_data or numpy_helper.to_array(init).tobytes())
    init.ClearField("raw_data")
    init.ClearField("float_data")
    init.data_location = onnx.TensorProto.EXTERNAL
    entry = init.external_data.add()
    entry.key, entry.value = "location", "../outside.bin"
    folder = tmp_path / "sub"
    folder.mkdir()
    (folder / "m.onnx").write_bytes(model.SerializeToString())
    np.savez(folder / "m.npz", **labelled_data(lenet_like()))
    for args in (["compress", str(folder / "m.onnx"), "--no-cache"], ["inspect", str(folder / "m.onnx")]):
        out = run_bad(folder, args, 1, "points outside")
        assert "internal error" not in out


def test_an_npz_larger_than_memory_is_refused_before_loading(lenet, monkeypatch):
    import onnxws.data as data

    monkeypatch.setattr(data, "available_memory", lambda: 1 << 20)  # 1 MiB "free": the 7.9 MB set does not fit
    run_bad(lenet, ["compress", str(lenet / "model.onnx"), "--no-cache"], 1, "more than the 0.0 GiB")


def test_a_tensor_whose_data_does_not_match_its_dims_is_bad_input(tmp_path):
    model = lenet_like()
    np.savez(tmp_path / "m.npz", **labelled_data(model))
    weight = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    weight.dims[0] += 1  # claims a row more than its raw data holds
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    for args in (["compress", str(path), "--no-cache"], ["inspect", str(path)]):
        output = run_bad(tmp_path, args, 1, weight.name)
        assert "internal error" not in output


def test_quiet_still_shows_the_warnings(floaty):
    """--quiet drops progress and summary, not a warning that the result may mislead."""
    folder, arrays = floaty
    x = arrays["x"].copy()
    x[:5] = np.nan
    path = _save_npz(folder / "part.npz", x=x, y=arrays["y"])
    result = runner.invoke(app, ["compress", str(folder / "m.onnx"), "--data", str(path), "--no-cache", "--quiet",
                                 "--max-scorings", "15", "-o", str(folder / "q.onnx")])
    assert result.exit_code == 0, result.output
    assert "5 of 200 samples" in result.output and "left out" in result.output
