"""Layered configuration: validation, precedence, TOML round trip."""

from __future__ import annotations

import pytest

from onnxws.config import CompressConfig
from onnxws.errors import UsageError
from onnxws.sharing import Granularity


def test_defaults():
    cfg = CompressConfig()
    s = cfg.settings_for("w", "Conv")
    assert (cfg.loss, cfg.loss_mode, cfg.strategy, s.min_params, s.bits, s.source) == \
        (1.0, "absolute", "predictor", 64, tuple(range(9)), "global")
    assert s.ks() == [1, 2, 4, 8, 16, 32, 64, 128, 256]


@pytest.mark.parametrize("kwargs, key", [
    ({"loss": -1.0}, "loss"), ({"loss": float("nan")}, "loss"), ({"loss": 1000.0}, "loss"),
    ({"loss_mode": "pp"}, "loss_mode"), ({"device": "tpu"}, "device"), ({"strategy": "random"}, "strategy"),
    ({"search_samples": 0}, "search_samples"), ({"max_scorings": 0}, "max_scorings"),
    ({"time_budget": 0.0}, "time_budget"), ({"metric": "nocolon"}, "metric"),
])
def test_invalid_run_options_name_the_key(kwargs, key):
    with pytest.raises(UsageError, match=key):
        CompressConfig.from_dict({}, **kwargs)


@pytest.mark.parametrize("table, key", [
    ({"global": {"bits": [9]}}, "bits"), ({"global": {"bits": "4"}}, "bits"), ({"global": {"k_max": 0}}, "k_max"),
    ({"global": {"min_params": 0}}, "min_params"), ({"global": {"granularity": "row"}}, "granularity"),
    ({"global": {"colour": 1}}, "colour"), ({"globals": {}}, "globals"), ({"op_type": {"Conv": {"bitz": [1]}}}, "bitz"),
    ({"global": {"loss-mode": "relative"}}, "snake_case"),
])
def test_invalid_tables_name_the_key(table, key):
    with pytest.raises(UsageError, match=key):
        CompressConfig.from_dict(table)


def test_precedence_most_specific_first():
    cfg = CompressConfig.from_dict({
        "global": {"bits": [2, 4, 8], "min_params": 10},
        "op_type": {"Gemm": {"bits": [1, 2]}},
        "tensor": {"fc*": {"granularity": "channel"}, "fc1.*": {"skip": True}, "fc1.weight": {"k_max": 3}},
    })
    assert cfg.settings_for("conv.w", "Conv").bits == (2, 4, 8)
    gemm = cfg.settings_for("other", "Gemm")
    assert gemm.bits == (1, 2) and gemm.min_params == 10 and gemm.source == "op_type.Gemm"
    fc2 = cfg.settings_for("fc2.weight", "Gemm")
    assert fc2.granularity == Granularity("channel") and fc2.bits == (1, 2) and fc2.source == 'tensor."fc*"'
    assert cfg.settings_for("fc1.bias_like", "Gemm").skip
    exact = cfg.settings_for("fc1.weight", "Gemm")
    assert exact.k_max == 3 and not exact.skip and exact.ks() == [2, 3]


def test_conflicting_equal_length_globs():
    cfg = CompressConfig.from_dict({"tensor": {"a*c": {"skip": True}, "ab*": {"skip": False}}})
    with pytest.raises(UsageError, match="matches both"):
        cfg.settings_for("abc", "Conv")


def test_patterns_that_match_nothing():
    cfg = CompressConfig.from_dict({"tensor": {"nope*": {"skip": True}}})
    with pytest.raises(UsageError, match="nope"):
        cfg.check_patterns(["a", "b"], ["Conv"])
    cfg = CompressConfig.from_dict({"op_type": {"LSTM": {"bits": [4]}}})
    with pytest.raises(UsageError, match="LSTM"):
        cfg.check_patterns(["a"], ["Conv"])


def test_toml_round_trip(tmp_path):
    cfg = CompressConfig.from_dict({
        "global": {"loss": 0.5, "loss_mode": "relative", "bits": [1, 2, 3], "granularity": "group:4", "seed": 3},
        "op_type": {"Gemm": {"bits": [1, 2]}}, "tensor": {"fc1.*": {"skip": True}},
    }, max_scorings=50)
    path = tmp_path / "config.toml"
    path.write_text(cfg.to_toml())
    again = CompressConfig.from_toml(path)
    assert again == cfg
    assert again.to_toml() == cfg.to_toml()


def test_overrides_win_over_the_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[global]\nloss = 2.0\nsearch_samples = 100\n")
    cfg = CompressConfig.from_toml(path, loss=0.5)
    assert cfg.loss == 0.5 and cfg.search_samples == 100


def test_bad_toml_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[global\nloss = ")
    with pytest.raises(UsageError, match="not valid TOML"):
        CompressConfig.from_toml(path)
