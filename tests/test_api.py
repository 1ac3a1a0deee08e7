"""The Python API: models and data in every accepted form, progress callback, no printing, reproducible config."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
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


def test_granularity_auto_picks_channel_codebooks_for_per_channel_scales(tmp_path):
    """Rows of the first weight scaled over three decades (as batch norm folded into a layer
    leaves them), the next layer compensating: one codebook per tensor spends its values on the
    wide rows, so 'auto' must keep per-channel codebooks there, and the emitted model holds."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    scales = np.geomspace(1e-2, 10.0, 128).astype(np.float32)
    w1 = (rng.normal(0, 0.3, (128, 32)) * scales[:, None]).astype(np.float32)
    w2 = (rng.normal(0, 0.3, (10, 128)) / scales[None, :]).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Gemm", ["r", "w2"], ["logits"], transB=1)],
        "scaled_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.normal(0, 1, (600, 32)).astype(np.float32)
    import onnxruntime as ort

    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0].argmax(1)
    result = onnxws.compress(model, {"x": x, "y": y}, loss=1.0, granularity="auto", cache=False)
    layers = {layer["name"]: layer for layer in result.report["layers"]}
    assert layers["w1"]["granularity"] == "channel" and layers["w1"]["n_codebooks"] == 128
    assert result.report["final"]["loss"] <= 1.0
    folder = result.save(tmp_path / "m.onnx")
    assert 'granularity = "auto"' in (folder / "config.toml").read_text()


def test_rebuilt_weights_are_checked_in_small_batches(monkeypatch):
    """With a tiny batch every weight is rebuilt on its own: same result, and a mismatch is caught."""
    import onnxws.emit_check as emit_check
    from onnxws.encoding import encode_model
    from onnxws.errors import VerificationError
    from onnxws.sharing import SharedWeight

    from graphs import lenet_like

    model = lenet_like(seed=3)
    rng = np.random.default_rng(0)
    shared = [SharedWeight(n, np.sort(rng.normal(size=(1, 4))).astype(np.float32), rng.integers(0, 4, s).astype(np.uint8))
              for n, s in (("conv.W", (4, 1, 3, 3)), ("fc.W", (10, 144)))]
    encoded = encode_model(model, shared)
    calls = []
    real = emit_check.decoded_weights
    monkeypatch.setattr(emit_check, "decoded_weights", lambda m, names: calls.append(list(names)) or real(m, names))
    monkeypatch.setattr(emit_check, "CHECK_BATCH_BYTES", 1)
    emit_check.check_rebuilt_weights(encoded.model, shared)
    assert calls == [["conv.W"], ["fc.W"]]
    wrong = SharedWeight("fc.W", shared[1].codebooks[:, ::-1].copy(), shared[1].indices)
    with pytest.raises(VerificationError, match="fc.W"):
        emit_check.check_rebuilt_weights(encoded.model, [shared[0], wrong])


def test_dropping_the_models_weight_payloads_changes_nothing(monkeypatch):
    """compress drops the model's copy of the weights once the scorer holds them (from 1 MiB by
    default): with the threshold lowered so that lenet_like's fc.W is dropped, same model bytes."""
    import onnxws.proto as proto
    from graphs import labelled_data, lenet_like

    model = lenet_like(seed=2)
    data = labelled_data(model, n=300)
    config = onnxws.CompressConfig.from_dict({"global": {"min_params": 16}})
    plain = onnxws.compress(model, data, loss=2.0, cache=False, search_samples=300, config=config)
    monkeypatch.setattr(proto, "DROP_MIN_BYTES", 1024)
    dropped = onnxws.compress(model, data, loss=2.0, cache=False, search_samples=300, config=config)
    assert dropped.model.SerializeToString(deterministic=True) == plain.model.SerializeToString(deterministic=True)
    assert dropped.report["model"]["sha256"] == plain.report["model"]["sha256"]
    assert dropped.report["compression"] == plain.report["compression"]


def test_a_budget_below_the_sets_resolution_is_warned_about_and_noted(caplog):
    """60 samples with random labels (about 10 % right): the metric's 95 % half-width on that set is
    several pp, so a 2 pp budget asks for less than the set can resolve: one warning, and a note in
    the report; nothing is held out of so small a set."""
    import logging

    from graphs import lenet_like

    model = lenet_like(seed=4)
    rng = np.random.default_rng(0)
    data = {"x": rng.normal(size=(60, 1, 8, 8)).astype(np.float32), "y": rng.integers(0, 10, 60)}
    with caplog.at_level(logging.WARNING, logger="onnxws"):
        result = onnxws.compress(model, data, loss=2.0, cache=False,
                                 config=onnxws.CompressConfig.from_dict({"global": {"min_params": 16}}))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "resolution" in r.getMessage()]
    final = result.report["final"]
    assert len(warnings) == 1 and f"{final['resolution']:.2f}" in warnings[0]
    assert final["resolution"] > 2.0 and "below this set's resolution" in final["resolution_note"]
    assert final["holdout"] is None and result.report["data"]["n_holdout"] == 0
    assert final["whole"]["samples"] == 60 and final["whole"]["loss"] == pytest.approx(final["loss"])
