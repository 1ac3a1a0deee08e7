"""The report of a real run: stable keys, a self-contained HTML page, plots that decode."""

from __future__ import annotations

import copy
import io
import json
import os
import platform
import re

import matplotlib.image as mpimg
import pytest

import onnxws
from conftest import LENET
from onnxws.report_html import render_html, summary_rows, write_report

STABLE_KEYS = [
    ("baseline", "value"), ("final", "value"), ("final", "value_search"), ("final", "loss"), ("final", "loss_unit"),
    ("compression", "ratio_theoretical"), ("compression", "ratio_whole_theoretical"), ("compression", "ratio_file"),
    ("compression", "packing_efficiency"), ("compression", "bytes_before"), ("compression", "bytes_after"),
    ("exploration", "scorings"), ("exploration", "scorings_run"), ("exploration", "scorings_cached"),
    ("exploration", "pareto"), ("exploration", "stopped_by"), ("exploration", "seconds"),
]


@pytest.fixture(scope="module")
def report():
    result = onnxws.compress(LENET / "model.onnx", loss=1.0, cache=False, search_samples=1000, max_scorings=45)
    return result.report


def test_report_files_and_stable_keys(report, tmp_path):
    paths = write_report(report, tmp_path / "r", config_toml="[global]\nloss = 1.0\n")
    data = json.loads(paths["json"].read_text())
    for section, key in STABLE_KEYS:
        assert key in data[section], (section, key)
    assert "total" in data["exploration"]["seconds"]
    for key in ("metric", "device", "config", "layers", "skipped"):
        assert key in data
    assert data["machine"]["cpus"] == os.cpu_count() and data["machine"]["architecture"] == platform.machine()
    assert data["versions"]["onnxruntime"] and data["versions"]["numpy"]
    for layer in data["layers"]:
        assert {"name", "op_type", "shape", "params", "k", "bits", "index_dtype", "granularity", "loss_alone"} <= set(layer)
    assert all({"name", "reason"} <= set(s) for s in data["skipped"])
    assert "NaN" not in paths["json"].read_text()
    for key in ("pareto_png", "sensitivity_png"):
        image = mpimg.imread(paths[key])
        assert image.shape[0] > 200 and image.shape[1] > 400
    assert paths["config"].read_text().startswith("[global]")


def test_html_is_self_contained_and_escaped(report):
    tricky = copy.deepcopy(report)
    tricky["layers"][0]["name"] = 'a<b&"c"'
    page = render_html(tricky, {"pareto": b"\x89PNG", "sensitivity": b"\x89PNG"})
    assert 'a&lt;b&amp;&quot;c&quot;' in page and 'a<b&"c"' not in page
    assert not re.search(r'(src|href)="https?://', page)
    assert page.count("data:image/png;base64,") == 2
    assert page.count("<tr>") >= len(report["layers"]) + 1


def test_optional_sections_may_be_missing(report, tmp_path):
    bare = copy.deepcopy(report)
    bare["uniform_baseline"] = None
    bare["exploration"]["predictor"] = None
    bare["skipped"] = []
    paths = write_report(bare, tmp_path / "bare")
    assert "No uniform k fits" in paths["html"].read_text()
    labels = [label for label, _ in summary_rows(bare)]
    assert "Uniform k baseline" not in labels


def test_hostile_names_draw_without_warnings_and_show_escaped(report, tmp_path):
    import warnings

    tricky = copy.deepcopy(report)
    tricky["layers"][0]["name"] = "w\x1b]0;owned\x07 $x^2"  # a terminal escape, a bell, unbalanced-looking mathtext
    tricky["model"]["path"] = "/m/\x00odd\n.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "Glyph missing" warnings would raise here
        paths = write_report(tricky, tmp_path / "t")
    page = paths["html"].read_text()
    assert "\x1b" not in page and "\x07" not in page and "w\\x1b]0;owned\\x07 $x^2" in page


def test_the_sensitivity_heat_map_has_a_row_per_layer(report):
    from onnxws.report_html import plot_sensitivity

    few, many = copy.deepcopy(report), copy.deepcopy(report)
    many["layers"] = [dict(layer, name=f"{layer['name']}.{i}") for i in range(6) for layer in report["layers"]]
    small = mpimg.imread(io.BytesIO(plot_sensitivity(few)))
    large = mpimg.imread(io.BytesIO(plot_sensitivity(many)))
    assert large.shape[0] > 3 * small.shape[0] // 2  # taller with more tensors: one readable row each


def test_corrected_biases_are_not_called_skipped(report):
    page = render_html(report, {"pareto": b"\x89PNG", "sensitivity": b"\x89PNG"})
    corrected = report["refinement"]["bias_corrected"]
    assert corrected and "Tensors not shared" in page
    for weight, bias in corrected.items():
        assert f"rewritten by the bias correction of {weight}" in page
