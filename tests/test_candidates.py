"""Cluster stage: the shipped LeNet-5's candidates are the same whether its tensors are clustered and
refined in this process or in worker processes, and the stage goes on in-process when workers
cannot start."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from onnxws.candidates import PARALLEL_WORK, Candidates, build_candidates, calibrate, cluster_workers, refinement_plan
from onnxws.config import CompressConfig
from onnxws.loading import load_stage
from onnxws.refinement import Moments
from onnxws.scoring import Scorer

ROOT = Path(__file__).resolve().parents[1]
LENET = ROOT / "models" / "lenet5" / "model.onnx"


def lenet_stage(workers: int) -> tuple[Candidates, int]:
    """LeNet-5's cluster stage (search subset of 500) with ``workers``; and the automatic worker count."""
    config = CompressConfig.from_dict({}, loss=1.0, search_samples=500)
    loaded = load_stage(str(LENET), None, config)
    plan = refinement_plan(loaded.proto, loaded.discovery, config)
    names = [w.name for w in loaded.discovery.weights] + [b.name for b in plan.biases.values()]
    with Scorer(loaded.proto, names, loaded.data, loaded.metric, device="cpu", search_samples=500, threads=1) as scorer:
        moments = calibrate(scorer.activations, scorer.n_batches("search"), plan, loaded.discovery, config,
                            lambda *a: None)
        auto = cluster_workers(loaded.discovery, moments, config)
        found = build_candidates(loaded.discovery, config, scorer.originals, moments, plan, lambda *a: None,
                                 workers=workers)
    return found, auto


def fingerprint(found: Candidates) -> list:
    """Every candidate's bytes (codebooks, indices, corrected bias) and every option, in order."""
    rows = []
    for layer in found.layers:
        for k, shared in sorted(found.shares[layer.name].items()):
            bias = b"" if shared.bias is None else shared.bias.tobytes()
            rows.append((layer.name, k, shared.codebooks.tobytes(), shared.indices.tobytes(), bias))
        rows.append(tuple(layer.options))
    return rows


def test_worker_processes_give_the_candidates_of_one_process():
    alone, auto = lenet_stage(workers=1)
    pooled, _ = lenet_stage(workers=2)
    assert auto == 1  # LeNet-5's refinement is far below the work that pays for starting workers
    assert fingerprint(pooled) == fingerprint(alone)
    assert [layer.name for layer in pooled.layers] == [layer.name for layer in alone.layers]
    assert pooled.output_errors == alone.output_errors
    assert 0 < pooled.refine_seconds and 0 < alone.refine_seconds


def test_workers_start_only_where_refinement_pays_for_them():
    config = CompressConfig.from_dict({}, loss=1.0)
    loaded = load_stage(str(LENET), None, config)
    fc1 = next(w for w in loaded.discovery.weights if w.name == "net.fc1.weight")
    small = {fc1.name: Moments(np.zeros((1, 400, 400)), 0)}  # 120 x 400^2 x 4 rounds x 9 widths: 6.9e8
    assert cluster_workers(loaded.discovery, small, config, cpus=4) == 1
    wide = {fc1.name: Moments(np.zeros((1, 1000, 1000)), 0)}  # as if fc1 read 1,000 inputs: 4.3e9
    assert 120 * 1000 ** 2 * 4 * 9 >= PARALLEL_WORK
    assert cluster_workers(loaded.discovery, wide, config, cpus=4) == 4
    assert cluster_workers(loaded.discovery, wide, config, cpus=1) == 1


def test_the_stage_goes_on_in_process_when_workers_cannot_start(tmp_path):
    """A script read from stdin cannot be re-imported by a spawned worker: the pool breaks, the
    stage says so once and finishes in-process with the same candidates."""
    script = textwrap.dedent(f"""
        import hashlib
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_candidates import fingerprint, lenet_stage
        found, _ = lenet_stage(workers=2)
        print(hashlib.sha256(repr(fingerprint(found)).encode()).hexdigest())
    """)
    done = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    alone, _ = lenet_stage(workers=1)
    assert done.stdout.strip() == hashlib.sha256(repr(fingerprint(alone)).encode()).hexdigest()
    assert "worker processes failed" in done.stderr and "going on in this process" in done.stderr
