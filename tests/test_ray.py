"""Scoring and batches on a Ray cluster the tests start (2 CPUs, dashboard off): the same output
bytes as local runs, a worker killed mid-run changes nothing, a bad address is one line."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import ray
from typer.testing import CliRunner

import onnxws
from conftest import LENET, scores_stored
from graphs import labelled_data, lenet_like
from onnxws.cli import app

runner = CliRunner()
FAST = {"search_samples": 500, "max_scorings": 60}
FAST_FLAGS = ["--no-cache", "--quiet", "--search-samples", "500", "--max-scorings", "60"]


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster for this module; compress and batch use the connection (``--ray local``)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_compress_on_ray_gives_the_local_bytes(cluster, tmp_path):
    local = onnxws.compress(LENET / "model.onnx", cache=False, **FAST)
    pooled = onnxws.compress(LENET / "model.onnx", cache=False, jobs=2, **FAST)  # one ORT thread a worker, as on Ray
    on_ray = onnxws.compress(LENET / "model.onnx", cache=False, ray="local", **FAST)
    assert on_ray.model.SerializeToString() == local.model.SerializeToString() == pooled.model.SerializeToString()
    assert on_ray.report["exploration"]["executor"] == {"name": "ray", "jobs": 2}
    for key in ("final", "compression"):
        assert on_ray.report[key] == local.report[key] == pooled.report[key], key
    for other in (local, pooled):
        assert not _same_but_divergences(on_ray.report["layers"], other.report["layers"])
    assert on_ray.report["config"] == local.report["config"]  # the address is not part of the config
    assert ray.is_initialized()  # a connection the caller made is left to the caller


def _same_but_divergences(a, b, path: str = "") -> list[str]:
    """Where ``a`` and ``b`` differ, every ``divergence`` compared to 1e-4 relative: a sum over float32
    outputs, whose last bits may differ between processes (ORT's intra-op thread count, one in a worker;
    measured differences up to 1e-6 relative in the test suite)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in a.keys() | b.keys() for d in _same_but_divergences(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (u, v) in enumerate(zip(a, b)) for d in _same_but_divergences(u, v, f"{path}[{i}]")]
    if path.endswith(".divergence") and isinstance(a, float) and isinstance(b, float):
        return [] if math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-15) else [f"{path}: {a} != {b}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def _workers() -> list[int]:
    """PIDs of this cluster's scoring actors (Ray titles their processes ``ray::_RayWorker``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(b"ray::_RayWorker"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def test_a_worker_killed_mid_run_still_gives_the_same_output(cluster, tmp_path):
    local = onnxws.compress(LENET / "model.onnx", cache=False, **FAST)
    db = tmp_path / "scores.sqlite"
    killed: list[int] = []

    def kill_one_after_some_scorings() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            pids = _workers()
            if pids and scores_stored(db) >= 5:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_after_some_scorings, daemon=True)
    killer.start()
    result = onnxws.compress(LENET / "model.onnx", cache=db, ray="local", **FAST)
    killer.join(timeout=5)
    assert killed, "no scoring worker was killed: the run ended first"
    assert result.model.SerializeToString() == local.model.SerializeToString()


def test_batch_on_ray_gives_the_local_outputs(cluster, tmp_path):
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    for seed in (0, 1, 2):
        model = lenet_like(seed=seed)
        onnx.save(model, str(zoo / f"m{seed}.onnx"))
        np.savez(zoo / f"m{seed}.npz", **labelled_data(model, seed=seed + 1))
    outputs = {}
    for name, extra in (("local", []), ("ray", ["--ray", "local", "--jobs", "2"])):
        out = tmp_path / name
        result = runner.invoke(app, ["batch", str(zoo), "--loss", "2", "-o", str(out), *FAST_FLAGS, *extra])
        assert result.exit_code == 0, result.output
        with open(out / "summary.csv") as handle:
            assert {row["model"]: row["status"] for row in csv.DictReader(handle)} == {f"m{s}": "ok" for s in (0, 1, 2)}
        outputs[name] = {p.name: p.read_bytes() for p in sorted(out.glob("*.ws.onnx"))}
        executor = json.loads((out / "m0.ws.report" / "report.json").read_text())["exploration"]["executor"]
        assert executor["name"] == name
    assert outputs["ray"] == outputs["local"] and len(outputs["local"]) == 3
