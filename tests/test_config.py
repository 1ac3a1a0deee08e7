"""Layered configuration: validation, precedence, pattern checks, TOML round trip, overrides."""

from __future__ import annotations

import dataclasses
import json

import pytest

from onnxws.config import RUN_KEYS, CompressConfig, TensorSettings, tomllib
from onnxws.discovery import find_weights
from onnxws.errors import UsageError
from onnxws.sharing import Granularity
from tests.graphs import lenet_like


def test_defaults():
    cfg = CompressConfig()
    assert (cfg.loss, cfg.loss_mode, cfg.device, cfg.search_samples, cfg.strategy, cfg.seed) == \
        (1.0, "absolute", "auto", 2000, "predictor", 0)
    assert (cfg.batch_size, cfg.metric, cfg.output, cfg.time_budget, cfg.max_scorings, cfg.opset) == (None,) * 6
    s = cfg.settings_for("w", "Conv")
    assert s == TensorSettings(False, 64, tuple(range(9)), 256, Granularity("tensor"), "global")
    assert s.ks() == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert CompressConfig.from_dict({}) == cfg


def test_ks_drops_widths_whose_k_repeats():
    # k = min(2**b, k_max): with k_max 3, widths 2..8 all give k = 3.
    assert TensorSettings(k_max=3).ks() == [1, 2, 3]
    assert TensorSettings(bits=(3, 5), k_max=20).ks() == [8, 20]
    assert TensorSettings(bits=(0,)).ks() == [1]


@pytest.mark.parametrize("kwargs, needle", [
    ({"loss": -1.0}, "loss = -1.0: expected a number >= 0 and < 100"),
    ({"loss": float("nan")}, "loss = nan"), ({"loss": float("inf")}, "loss = inf"),
    ({"loss": 100.0}, "loss = 100.0"), ({"loss": "1"}, "loss = '1': expected a number >= 0 and < 100"),
    ({"loss": True}, "got a boolean"),
    ({"loss_mode": "pp"}, "loss_mode = 'pp': expected one of absolute, relative"),
    ({"device": "tpu"}, "device = 'tpu': expected one of auto, cpu, cuda"),
    ({"strategy": "random"}, "strategy = 'random': expected one of predictor, exhaustive, greedy"),
    ({"search_samples": 0}, "search_samples = 0"), ({"search_samples": 10.0}, "search_samples = 10.0"),
    ({"batch_size": 0}, "batch_size = 0"), ({"max_scorings": 0}, "max_scorings = 0"),
    ({"time_budget": 0.0}, "time_budget = 0.0: expected a finite number of seconds > 0"),
    ({"time_budget": -5}, "time_budget = -5"), ({"time_budget": float("inf")}, "time_budget = inf"),
    ({"metric": "nocolon"}, "metric = 'nocolon': expected one of expected_accuracy, top1_accuracy, top1_agreement or \"package.module:function\""),
    ({"metric": "pkg.mod:"}, "metric = 'pkg.mod:'"), ({"output": ""}, "output = ''"),
    ({"seed": -1}, "seed = -1"), ({"seed": 2**64}, "seed = "), ({"opset": 3}, "opset = 3"),
])
def test_invalid_run_options_name_key_value_and_allowed(kwargs, needle):
    with pytest.raises(UsageError) as exc:
        CompressConfig.from_dict({}, **kwargs)
    assert needle in str(exc.value)
    with pytest.raises(UsageError, match=next(iter(kwargs))):  # direct construction validates the same way
        CompressConfig(**kwargs)
    with pytest.raises(UsageError, match=next(iter(kwargs))):  # and so does the [global] table
        CompressConfig.from_dict({"global": kwargs})


@pytest.mark.parametrize("table, needle", [
    ({"global": {"bits": [9]}}, "global.bits = [9]: expected a non-empty list of integers in 0..8"),
    ({"global": {"bits": "4"}}, "global.bits = '4': expected a non-empty list of integers in 0..8, e.g. [2, 4, 8], "
                                "got a string"),
    ({"global": {"bits": []}}, "global.bits = []"),
    ({"global": {"bits": [1.5]}}, "got a list of float"),
    ({"global": {"k_max": 0}}, "global.k_max = 0: expected an integer in 1..256"),
    ({"global": {"k_max": 257}}, "global.k_max = 257"),
    ({"global": {"min_params": 0}}, "global.min_params = 0: expected an integer >= 1"),
    ({"global": {"skip": "yes"}}, "global.skip = 'yes': expected true or false"),
    ({"global": {"granularity": "row"}}, "global.granularity = 'row': expected tensor, channel, group:N"),
    ({"global": {"granularity": "group:0"}}, "global.granularity = 'group:0'"),
    ({"global": {"granularity": 4}}, "got an integer"),
    ({"global": {"paint": 1}}, "[global]: unknown key 'paint'; allowed: loss, loss_mode,"),
    ({"global": {"los": 1}}, "did you mean 'loss'?"),
    ({"global": {"loss-mode": "relative"}}, "unknown key 'loss-mode' (keys are snake_case: write 'loss_mode')"),
    ({"globals": {}}, "unknown top-level key or table 'globals'; allowed tables: [global], [op_type.<OpType>]"),
    ({"loss": 1.0}, "'loss' (run options and tensor defaults go in [global])"),
    ({"global": 3}, "global = 3: expected a [global] table"),
    ({"op_type": {"Conv": {"bitz": [1]}}}, "op_type.Conv: unknown key 'bitz' (did you mean 'bits'?)"),
    ({"op_type": {"Conv": {"loss": 1.0}}}, "op_type.Conv: unknown key 'loss' (run options belong in [global])"),
    ({"op_type": {"Conv": 3}}, "op_type.Conv = 3: expected a table"),
    ({"op_type": 3}, "op_type = 3: expected a table of tables"),
    ({"tensor": {"fc*": {"bits": [0, 12]}}}, 'tensor."fc*".bits = [0, 12]'),
    ({"tensor": {"fc*": {"min-params": 3}}}, "keys are snake_case: write 'min_params'"),
])
def test_invalid_tables_name_key_value_and_allowed(table, needle):
    with pytest.raises(UsageError) as exc:
        CompressConfig.from_dict(table)
    assert needle in str(exc.value)


def test_direct_construction_validates_and_normalises():
    with pytest.raises(UsageError, match=r"global.bits = \(9,\)"):
        CompressConfig(global_settings=TensorSettings(bits=(9,)))
    with pytest.raises(UsageError, match="global.granularity = Granularity"):
        CompressConfig(global_settings=TensorSettings(granularity=Granularity("group", 0)))
    cfg = CompressConfig(loss=1, time_budget=30, op_type={"Gemm": {"bits": [4, 1, 4], "granularity": "channel"}})
    assert isinstance(cfg.loss, float) and isinstance(cfg.time_budget, float)
    assert cfg.op_type["Gemm"] == {"bits": (1, 4), "granularity": Granularity("channel")}
    assert cfg == CompressConfig.from_dict({"global": {"loss": 1.0, "time_budget": 30.0},
                                            "op_type": {"Gemm": {"granularity": "channel", "bits": [1, 4]}}})


def _layered() -> CompressConfig:
    return CompressConfig.from_dict({
        "global": {"bits": [2, 4, 8], "min_params": 10},
        "op_type": {"Gemm": {"bits": [1, 2]}, "Conv": {}},
        "tensor": {"fc*": {"granularity": "channel"}, "fc1.*": {"skip": True}, "fc1.weight": {"k_max": 3}},
    })


def test_precedence_most_specific_first():
    cfg = _layered()
    conv = cfg.settings_for("conv.w", "Conv")  # empty op_type table decides nothing
    assert (conv.bits, conv.min_params, conv.source) == ((2, 4, 8), 10, "global")
    gemm = cfg.settings_for("other", "Gemm")  # op_type overrides bits only; min_params from global
    assert (gemm.bits, gemm.min_params, gemm.granularity, gemm.source) == ((1, 2), 10, Granularity(), "op_type.Gemm")
    fc2 = cfg.settings_for("fc2.weight", "Gemm")  # glob over op_type over global, key by key
    assert (fc2.granularity, fc2.bits, fc2.min_params, fc2.skip, fc2.source) == \
        (Granularity("channel"), (1, 2), 10, False, 'tensor."fc*"')
    fc1b = cfg.settings_for("fc1.bias_like", "Gemm")  # longest matching glob wins: "fc1.*" over "fc*"
    assert fc1b.skip and fc1b.granularity == Granularity() and fc1b.source == 'tensor."fc1.*"'
    exact = cfg.settings_for("fc1.weight", "Gemm")  # an exact name beats every glob
    assert (exact.k_max, exact.skip, exact.bits, exact.source) == (3, False, (1, 2), 'tensor."fc1.weight"')
    assert exact.ks() == [2, 3]


def test_equal_length_globs_conflict_names_both():
    cfg = CompressConfig.from_dict({"tensor": {"a*c": {"skip": True}, "ab*": {"skip": False}, "x*": {"skip": True}}})
    with pytest.raises(UsageError) as exc:
        cfg.settings_for("abc", "Conv")
    message = str(exc.value)
    assert 'tensor."a*c" (skip = True)' in message and 'tensor."ab*" (skip = False)' in message
    assert cfg.settings_for("xyz", "Conv").skip  # tensors matched by one pattern only are fine
    assert not cfg.settings_for("abd", "Conv").skip and cfg.settings_for("adc", "Conv").skip


def test_equal_length_globs_without_conflict_merge():
    cfg = CompressConfig.from_dict({"tensor": {"a*c": {"k_max": 5, "bits": [1, 3]}, "ab*": {"bits": [3, 1]}}})
    s = cfg.settings_for("abc", "Conv")
    assert (s.k_max, s.bits, s.source) == (5, (1, 3), 'tensor."a*c" + tensor."ab*"')


def test_check_patterns_on_a_real_model():
    model = lenet_like()
    names = [t.name for t in model.graph.initializer]
    op_types = {n.op_type for n in model.graph.node}
    ok = CompressConfig.from_dict({"op_type": {"Gemm": {"bits": [2]}}, "tensor": {"conv.*": {"k_max": 4}}})
    ok.check_patterns(names, op_types)  # no error
    bad = CompressConfig.from_dict({"op_type": {"Gemm": {}, "Gem": {}, "LSTM": {}},
                                    "tensor": {"fc.w": {"skip": True}, "conv.*": {}, "zzz*": {}}})
    with pytest.raises(UsageError) as exc:
        bad.check_patterns(names, op_types)
    message = str(exc.value)
    assert 'tensor."fc.w" matches no tensor of the model (closest names: fc.W' in message  # case-sensitive
    assert 'tensor."zzz*" matches no tensor of the model (the model has 4 tensors)' in message
    assert ("op_type.Gem names an op type absent from the model "
            "(did you mean Gemm? present: Conv, Flatten, Gemm, Relu)") in message
    assert "op_type.LSTM names an op type absent" in message
    assert "conv.*" not in message and "op_type.Gemm " not in message


def test_source_reaches_discovery_on_a_real_model():
    model = lenet_like()  # conv.W has 36 elements, fc.W 1440
    found = find_weights(model, CompressConfig().settings_for)
    assert [w.name for w in found.weights] == ["fc.W"]
    cfg = CompressConfig.from_dict({"global": {"min_params": 16}, "op_type": {"Gemm": {"min_params": 2000}},
                                    "tensor": {"conv.*": {"skip": True}}})
    found = find_weights(model, cfg.settings_for)
    reasons = {s.name: s.reason for s in found.skipped}
    assert found.weights == []
    assert reasons["conv.W"] == 'excluded by config (tensor."conv.*")'
    assert reasons["fc.W"] == "1440 elements < min_params 2000"
    cfg = CompressConfig.from_dict({"global": {"min_params": 16}})
    assert [w.name for w in find_weights(model, cfg.settings_for).weights] == ["conv.W", "fc.W"]


def _rich() -> CompressConfig:
    return CompressConfig.from_dict({
        "global": {"loss": 0.5, "loss_mode": "relative", "bits": [3, 1, 2], "granularity": "group:4", "seed": 3,
                   "device": "cpu", "metric": "pkg.mod:fn", "output": "logits", "strategy": "exhaustive",
                   "time_budget": 12.5, "opset": 21, "skip": False, "k_max": 100},
        "op_type": {"Gemm": {"bits": [1, 2]}, "Conv": {"granularity": "channel", "min_params": 10}, "LSTM": {}},
        "tensor": {"fc1.*": {"skip": True}, 'odd "name" [x]': {"k_max": 7}, "emb": {"bits": [8]}},
    }, max_scorings=50)


@pytest.mark.parametrize("make", [CompressConfig, _rich])
def test_toml_round_trip(tmp_path, make):
    cfg = make()
    text = cfg.to_toml()
    path = tmp_path / "config.toml"
    path.write_text(text)
    again = CompressConfig.from_toml(path)
    assert again == cfg
    assert again.to_toml() == text  # byte-identical the second time
    assert tomllib.loads(text) == cfg.to_dict()
    assert json.loads(json.dumps(cfg.to_dict())) == cfg.to_dict()  # JSON-able for report.json


def test_to_toml_is_deterministic_and_omits_none():
    a = CompressConfig.from_dict({"op_type": {"Gemm": {"k_max": 8, "bits": [4, 2]}, "Conv": {"skip": True}},
                                  "tensor": {"b*": {"skip": True}, "a*": {"skip": True}}})
    b = CompressConfig.from_dict({"tensor": {"a*": {"skip": True}, "b*": {"skip": True}},
                                  "op_type": {"Conv": {"skip": True}, "Gemm": {"bits": [2, 4], "k_max": 8}}})
    assert a == b and a.to_toml() == b.to_toml()
    glob = a.to_dict()["global"]
    assert list(glob) == ["loss", "loss_mode", "device", "search_samples", "strategy", "predictor", "edge_tries", "grow_subset", "refine", "bias_correction", "seed",
                          "skip", "min_params", "bits", "k_max", "granularity"]
    assert list(a.to_dict()["op_type"]) == ["Conv", "Gemm"]
    assert list(a.to_dict()["op_type"]["Gemm"]) == ["bits", "k_max"]
    assert "None" not in a.to_toml() and "batch_size" not in a.to_toml()
    assert CompressConfig(loss=1).to_dict()["global"]["loss"] == 1.0  # ints normalised: stable text


def test_overrides_win_over_the_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[global]\nloss = 2.0\nsearch_samples = 100\ngranularity = "channel"\nbits = [4]\n')
    cfg = CompressConfig.from_toml(path, loss=0.5, seed=None, granularity="group:2")
    assert (cfg.loss, cfg.search_samples, cfg.seed) == (0.5, 100, 0)
    s = cfg.settings_for("w", "Conv")
    assert (s.granularity, s.bits) == (Granularity("group", 2), (4,))
    assert CompressConfig.from_dict({"global": {"loss": 2.0}}, loss=0.25).loss == 0.25
    with pytest.raises(UsageError, match="unknown key 'force'"):
        CompressConfig.from_toml(path, force=True)
    with pytest.raises(UsageError, match="loss = 200.0"):  # overrides are validated too
        CompressConfig.from_toml(path, loss=200.0)


def test_with_options_copies_and_validates():
    cfg = _layered()
    other = cfg.with_options(strategy="greedy", min_params=5)
    assert (other.strategy, other.settings_for("x", "Conv").min_params) == ("greedy", 5)
    assert (cfg.strategy, cfg.settings_for("x", "Conv").min_params) == ("predictor", 10)  # original untouched
    assert other.tensor == cfg.tensor and other.op_type == cfg.op_type
    assert cfg.with_granularity("channel").global_settings.granularity == Granularity("channel")
    with pytest.raises(UsageError, match="granularity = 'rows'"):
        cfg.with_granularity("rows")
    assert set(RUN_KEYS) <= {f.name for f in dataclasses.fields(CompressConfig)}


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[global\nloss = ")
    with pytest.raises(UsageError, match="c.toml is not valid TOML"):
        CompressConfig.from_toml(path)
    path.write_bytes(b"[global]\nmetric = '\xff'\n")
    with pytest.raises(UsageError, match="not UTF-8"):
        CompressConfig.from_toml(path)
    path.write_text("[global]\nbits = \"4\"\n")
    with pytest.raises(UsageError, match=r"config .*c.toml: global.bits = '4'"):
        CompressConfig.from_toml(path)
    with pytest.raises(UsageError, match="cannot read config"):
        CompressConfig.from_toml(tmp_path / "missing.toml")
