"""Ray scoring against local scoring: the layer stage's kind of work on one model, side by side.

    .venv/bin/python tools/bench_ray.py --zoo ~/.cache/onnxws-zoo --model mobilenetv2 --out /tmp/bench-ray
    .venv/bin/python tools/bench_ray.py --model lenet5 --out /tmp/bench-ray-lenet   # the shipped model

The workload is what the layer stage scores: one candidate per weight tensor (the first
``--tensors`` shareable tensors, each alone rounded to 16 values: a one-weight candidate, so every
executor may run it as a suffix run), on the search subset (``--search-samples``). Measured, each
with a fresh scorer (no score cache) and the same candidates:

- ``local``: the default local run (in-process, ONNX Runtime's own threads);
- ``local-1t``: in-process with one ORT thread (what one worker does);
- ``pool-2``: ``compress --jobs 2``'s executor, two worker processes on this machine, one thread each;
- ``ray-1``: a local Ray cluster of one node with 1 CPU (``ray start --head --num-cpus 1``), 1 actor;
- ``ray-2``: the same head plus a second node (a second ``ray start --address ... --num-cpus 1``),
  2 actors, one per node.

For each: the wall time of scoring every candidate once the actors are up (``score_s``) and the
actors' start (``start_s``: the builder shipped and each actor's scorer built). Then the per-scoring
overhead of Ray: one candidate measured ``--repeats`` times in-process with one thread and through
the one-actor executor (medians). Every run's scores are checked equal to the ``local-1t`` ones.
Writes ``OUT/bench_ray.json`` and prints a Markdown table. Needs the ``ray`` CLI of the running
Python's environment (``pip install "onnxws[ray]"``).

With ``--batch MODELS`` (comma-separated zoo names, ``lenet5`` for the shipped model) it measures a
model-zoo batch instead: ``onnxws batch`` over those models (``--loss 1``, ``--search-samples``,
no cache) run locally with ``--jobs 1``, then with ``--jobs 2 --ray`` on the one-node and the
two-node cluster; each model's output ONNX is checked byte-identical to the local run's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxws.cluster import Cluster  # noqa: E402
from onnxws.data import load_data  # noqa: E402
from onnxws.discovery import find_weights  # noqa: E402
from onnxws.metrics import resolve_metric  # noqa: E402
from onnxws.scoring import Scorer  # noqa: E402

RAY = str(Path(sys.executable).with_name("ray"))
PORT = 6391


def load(name: str, zoo: Path | None) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    if name == "lenet5":
        return onnx.load(str(ROOT / "models" / "lenet5" / "model.onnx")), dict(np.load(ROOT / "models" / "lenet5" / "eval.npz"))
    if zoo is None:
        raise SystemExit(f"--zoo is needed for {name}")
    arrays = dict(np.load(zoo / f"{name}.npz"))
    return onnx.load(str(zoo / f"{name}.onnx")), {k: v for k, v in arrays.items() if k not in ("imagenet_label",)}


def rounded(array: np.ndarray, levels: int = 16) -> np.ndarray:
    """``array`` with its values rounded to ``levels`` evenly spaced values (a one-tensor candidate)."""
    low, high = float(array.min()), float(array.max())
    step = (high - low) / (levels - 1) or 1.0
    return (np.round((array - low) / step) * step + low).astype(array.dtype)


def ray_cli(*args: str) -> None:
    subprocess.run([RAY, *args], check=True, capture_output=True, text=True, timeout=180)


def timed_scores(scorer: Scorer, candidates: list[dict]) -> tuple[float, list]:
    t0 = time.perf_counter()
    scores = scorer.score_with_divergence(candidates)
    return time.perf_counter() - t0, scores


def _start_cluster(nodes: int) -> None:
    """This benchmark's own cluster on one machine: a head with 1 CPU, plus a second 1-CPU node."""
    # No usage stats, and no token authentication (Ray 2.60's nodes started by `ray start`
    # otherwise refuse each other here).
    os.environ.update(RAY_DISABLE_USAGE_STATS="1", RAY_AUTH_MODE="disabled")
    if nodes == 1:
        ray_cli("start", "--head", "--num-cpus", "1", "--port", str(PORT), "--include-dashboard", "false")
    else:
        ray_cli("start", "--address", f"127.0.0.1:{PORT}", "--num-cpus", "1")


def batch_benchmark(models: list[str], args: argparse.Namespace) -> int:
    """A zoo batch locally (--jobs 1) and with --jobs 2 on a one-node and a two-node Ray cluster."""
    import hashlib

    from onnxws.batch import run_batch

    source = args.out / "batch-models"
    source.mkdir(parents=True, exist_ok=True)
    lines = ["[defaults]", "loss = 1.0", f"search_samples = {args.search_samples}", ""]
    for name in models:
        model_path, data_path = ((ROOT / "models" / "lenet5" / "model.onnx", ROOT / "models" / "lenet5" / "eval.npz")
                                 if name == "lenet5" else (args.zoo / f"{name}.onnx", args.zoo / f"{name}.npz"))
        meta = {} if name == "lenet5" else json.loads((args.zoo / f"{name}.json").read_text())
        lines += ["[[model]]", f'path = "{model_path.resolve()}"', f'data = "{data_path.resolve()}"']
        if meta.get("metric_spec"):
            lines.append(f'metric = "{meta["metric_spec"]}"')
        lines.append("")
    manifest = source / "batch.toml"
    manifest.write_text("\n".join(lines))

    def run(label: str, jobs: int, ray: str | None) -> dict:
        out = args.out / f"batch-{label}"
        t0 = time.perf_counter()
        rows = run_batch(manifest, out, {}, jobs=jobs, ray=ray, force=True)
        seconds = time.perf_counter() - t0
        digests = {r.model: hashlib.sha256((out / f"{r.model}.ws.onnx").read_bytes()).hexdigest()
                   for r in rows if r.status == "ok"}
        return {"seconds": seconds, "statuses": {r.model: r.status for r in rows},
                "model_seconds": {r.model: r.seconds for r in rows}, "sha256": digests}

    results = {"local": run("local", 1, None)}
    try:
        for label, nodes in (("ray-1", 1), ("ray-2", 2)):
            _start_cluster(nodes)
            results[label] = run(label, 2, f"127.0.0.1:{PORT}")
            results[label]["same_bytes_as_local"] = results[label]["sha256"] == results["local"]["sha256"]
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)
    summary = {"models": models, "search_samples": args.search_samples,
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
               "results": results, "speedup_ray2_vs_ray1": results["ray-1"]["seconds"] / results["ray-2"]["seconds"],
               "speedup_ray2_vs_local": results["local"]["seconds"] / results["ray-2"]["seconds"]}
    (args.out / "bench_ray_batch.json").write_text(json.dumps(summary, indent=2))
    print("| run | batch of " + ", ".join(models) + " (s) | per model (s) | same bytes as local |")
    print("|---|---|---|---|")
    for label, row in results.items():
        per_model = ", ".join(f"{m} {v:.1f}" for m, v in row["model_seconds"].items() if v is not None)
        print(f"| {label} | {row['seconds']:.1f} | {per_model} | {row.get('same_bytes_as_local', True)} |")
    print(f"\nray-2 vs ray-1: {summary['speedup_ray2_vs_ray1']:.2f}x; ray-2 vs local: {summary['speedup_ray2_vs_local']:.2f}x")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", type=Path, default=None)
    parser.add_argument("--model", default="mobilenetv2")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-ray"))
    parser.add_argument("--search-samples", type=int, default=250)
    parser.add_argument("--tensors", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", default="", help="comma-separated models: measure a zoo batch instead (module docstring)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.batch:
        return batch_benchmark([m.strip() for m in args.batch.split(",") if m.strip()], args)

    model, arrays = load(args.model, args.zoo)
    data = load_data(arrays, model)
    metric = resolve_metric(None, data, model)
    names = [w.name for w in find_weights(model).weights][: args.tensors]
    options = dict(device="cpu", search_samples=args.search_samples, cache=None, engine="session")

    def scorer(threads: int | None) -> Scorer:
        return Scorer(model, names, data, metric, threads=threads, **options)

    results: dict[str, dict] = {}
    local = scorer(None)
    candidates = [{n: rounded(local.originals[n])} for n in names]
    results["local"] = {"score_s": timed_scores(local, candidates)[0], "threads": "ORT default"}
    local.close()
    one = scorer(1)
    score_s, reference = timed_scores(one, candidates)
    results["local-1t"] = {"score_s": score_s, "threads": 1}
    pooled = scorer(None)
    t0 = time.perf_counter()
    pooled.use_pool(2)
    list(pooled.executor.measure(iter([dict(pooled.originals)] * 2), "search"))  # both workers up
    start_s = time.perf_counter() - t0
    score_s, scores = timed_scores(pooled, candidates)
    results["pool-2"] = {"score_s": score_s, "start_s": start_s, "workers": 2, "same_scores": scores == reference}
    pooled.close()
    local_measure = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        one.measure(candidates[-1])
        local_measure.append(time.perf_counter() - t0)

    try:
        for label, nodes in (("ray-1", 1), ("ray-2", 2)):
            _start_cluster(nodes)
            cluster = Cluster(f"127.0.0.1:{PORT}")
            driver = scorer(1)
            t0 = time.perf_counter()
            executor = cluster.executor(driver.worker_builder(), jobs=nodes)
            driver.use_executor(executor)
            whole = dict(driver.originals)  # several weights: spread over the actors, one each
            list(executor.measure(iter([whole] * nodes), "search"))  # every actor up and measuring
            start_s = time.perf_counter() - t0
            score_s, scores = timed_scores(driver, candidates)
            results[label] = {"score_s": score_s, "start_s": start_s, "actors": nodes, "nodes": nodes,
                              "cpus": cluster.cpus, "same_scores": scores == reference}
            if nodes == 1:
                ray_measure = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    next(executor.measure(iter([candidates[-1]]), "search"))
                    ray_measure.append(time.perf_counter() - t0)
                results["overhead"] = {"local_1t_s": statistics.median(local_measure),
                                       "ray_1_s": statistics.median(ray_measure)}
            driver.close()
            cluster.ray.shutdown()
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)
        one.close()

    over = results["overhead"]
    summary = {
        "model": args.model, "tensors": len(names), "search_samples": min(args.search_samples, data.n),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "python": platform.python_version(),
        "results": results,
        "speedup_ray2_vs_ray1": results["ray-1"]["score_s"] / results["ray-2"]["score_s"],
        "speedup_ray2_vs_local": results["local"]["score_s"] / results["ray-2"]["score_s"],
        "speedup_pool2_vs_local": results["local"]["score_s"] / results["pool-2"]["score_s"],
        "overhead_per_scoring": over["ray_1_s"] / over["local_1t_s"] - 1,
    }
    (args.out / "bench_ray.json").write_text(json.dumps(summary, indent=2))
    print(f"| run | score {len(names)} one-tensor candidates (s) | actor start (s) | same scores |")
    print("|---|---|---|---|")
    for label, row in results.items():
        if label != "overhead":
            print(f"| {label} | {row['score_s']:.2f} | {row.get('start_s', 0):.2f} | {row.get('same_scores', True)} |")
    print(f"\nray-2 vs ray-1: {summary['speedup_ray2_vs_ray1']:.2f}x; ray-2 vs local: {summary['speedup_ray2_vs_local']:.2f}x; "
          f"pool-2 vs local: {summary['speedup_pool2_vs_local']:.2f}x; "
          f"per-scoring overhead of Ray (1 actor vs in-process, 1 thread): {100 * summary['overhead_per_scoring']:+.1f} % "
          f"({over['ray_1_s'] * 1e3:.1f} ms vs {over['local_1t_s'] * 1e3:.1f} ms, medians of {args.repeats})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
