"""Where a compress run spends its time: one run under cProfile, its time put into categories.

    .venv/bin/python tools/bench_scale.py --zoo ~/.cache/onnxws-zoo --model mobilenetv2 --out /tmp/bench-scale
    .venv/bin/python tools/bench_scale.py --model lenet5 --out /tmp/bench-scale-lenet   # the shipped model

One ``onnxws.compress`` (``--loss 1``, ``--search-samples``, no score cache, every other option
default) runs under ``cProfile``. Its report gives the time per stage; the profile splits the
run into what the time went to, by the innermost category of each function's own time:
ORT session creation (``InferenceSession.__init__``), ORT runs (``InferenceSession.run``),
waiting for subprocesses, bootstrap intervals (``onnxws.statistics``), the metric and
divergence (``onnxws.metrics``), refinement's solves (``onnxws.refinement``),
k-means (``onnxws.clustering``), candidate hashing (``scoring._array_digest``), encoding and
the emit check, and the rest (Python glue). Then, on ``--cut-tensors`` of the model's shareable
tensors, one candidate each measured as a suffix run and as a whole-model run (median of 3
each): what the suffix cut saves, layer by layer. Writes ``OUT/bench_scale.json`` and prints
Markdown tables. cProfile slows pure-Python code; the ORT shares are a lower bound.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxws  # noqa: E402
from onnxws.data import load_data  # noqa: E402
from onnxws.discovery import find_weights  # noqa: E402
from onnxws.metrics import resolve_metric  # noqa: E402
from onnxws.scoring import Scorer  # noqa: E402

# (category, predicate on (file, function name)), first match wins; matched against each function's own time.
CATEGORIES = [
    ("ORT session creation", lambda f, n: "initialize_session" in n or ("onnxruntime" in f and n == "_create_inference_session")),
    ("ORT runs", lambda f, n: "onnxruntime_pybind11_state.run" in n or ("onnxruntime" in n and "run" in n)),
    ("waiting for subprocesses (deployability, workers)", lambda f, n: "poll" in n or "waitpid" in n),
    ("bootstrap intervals (statistics)", lambda f, n: f.endswith("onnxws/statistics.py")),
    ("metric and divergence", lambda f, n: f.endswith("onnxws/metrics.py")),
    ("refinement solves", lambda f, n: f.endswith("onnxws/refinement.py")),
    ("k-means", lambda f, n: f.endswith("onnxws/clustering.py")),
    ("candidate hashing", lambda f, n: n == "_array_digest" or "openssl" in n or "sha256" in n),
    ("encoding and emit check", lambda f, n: f.endswith(("onnxws/encoding.py", "onnxws/emit_check.py", "onnxws/opset.py"))),
    ("numpy calls (from anywhere)", lambda f, n: "numpy" in f or "numpy" in n),
    ("imports", lambda f, n: n in ("<built-in method marshal.loads>", "<built-in method _imp.create_dynamic>",
                                   "<built-in method builtins.compile>") or "importlib" in f),
]


def load(name: str, zoo: Path | None) -> tuple[Path, dict[str, np.ndarray]]:
    if name == "lenet5":
        return ROOT / "models" / "lenet5" / "model.onnx", dict(np.load(ROOT / "models" / "lenet5" / "eval.npz"))
    if zoo is None:
        raise SystemExit(f"--zoo is needed for {name}")
    arrays = dict(np.load(zoo / f"{name}.npz"))
    return zoo / f"{name}.onnx", {k: v for k, v in arrays.items() if k != "imagenet_label"}


def categorise(stats: pstats.Stats) -> dict[str, float]:
    """Seconds of own time per category (pstats entries: (file, line, name) -> (cc, nc, tt, ct, callers)); a
    C function (file ``~``) is matched by its name."""
    totals: dict[str, float] = {}
    for (file, _, name), (_, _, own, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        label = next((c for c, test in CATEGORIES if test(file, name)), "Python glue (onnxws and the rest)")
        totals[label] = totals.get(label, 0.0) + own
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def suffix_savings(model_path: Path, arrays: dict, samples: int, tensors: int) -> list[dict]:
    model = onnx.load(str(model_path))
    data = load_data(arrays, model)
    metric = resolve_metric(None, data, model)
    names = [w.name for w in find_weights(model).weights]
    picked = [names[i] for i in np.linspace(0, len(names) - 1, min(tensors, len(names))).round().astype(int)]
    rows = []
    for reuse in (True, False):
        scorer = Scorer(model, picked, data, metric, device="cpu", search_samples=samples, cache=None,
                        engine="session", reuse_activations=reuse)
        for i, name in enumerate(picked):
            candidate = {name: (scorer.originals[name] * np.float32(0.999)).astype(scorer.originals[name].dtype)}
            scorer.measure(candidate)  # a suffix run's first call also computes its prefix activations
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                scorer.measure(candidate)
                times.append(time.perf_counter() - t0)
            if reuse:
                rows.append({"tensor": name, "position": names.index(name), "suffix_s": statistics.median(times)})
            else:
                rows[i]["whole_s"] = statistics.median(times)
        scorer.close()
    for row in rows:
        row["saving"] = 1 - row["suffix_s"] / row["whole_s"]
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", type=Path, default=None)
    parser.add_argument("--model", default="mobilenetv2")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-scale"))
    parser.add_argument("--search-samples", type=int, default=250)
    parser.add_argument("--cut-tensors", type=int, default=8)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model_path, arrays = load(args.model, args.zoo)

    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.enable()
    result = onnxws.compress(model_path, arrays, loss=1.0, cache=False, search_samples=args.search_samples)
    profiler.disable()
    wall = time.perf_counter() - t0
    profiler.dump_stats(str(args.out / "compress.prof"))
    categories = categorise(pstats.Stats(profiler))
    exploration = result.report["exploration"]
    cuts = suffix_savings(model_path, arrays, args.search_samples, args.cut_tensors)

    summary = {"model": args.model, "search_samples": args.search_samples, "wall_s_profiled": wall,
               "stages_s": exploration["seconds"], "scorings": exploration["scorings"],
               "scorings_run": exploration["scorings_run"], "stopped_by": exploration["stopped_by"],
               "ratio": result.report["compression"]["ratio_theoretical"], "loss": result.report["final"]["loss"],
               "categories_s": categories, "suffix_cut": cuts,
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "onnxws": onnxws.__version__}
    (args.out / "bench_scale.json").write_text(json.dumps(summary, indent=2))
    print(f"{args.model}: {wall:.0f} s profiled, {exploration['scorings_run']} scorings run, "
          f"{summary['ratio']:.2f}x at {summary['loss']:.2f}, stopped by {summary['stopped_by']}\n")
    print("| stage | s |\n|---|---|")
    for stage, seconds in exploration["seconds"].items():
        print(f"| {stage} | {seconds:.1f} |")
    print("\n| where the time went (own time) | s | share |\n|---|---|---|")
    total = sum(categories.values())
    for label, seconds in categories.items():
        print(f"| {label} | {seconds:.1f} | {100 * seconds / total:.0f} % |")
    print("\n| tensor (position) | suffix run | whole model | saved |\n|---|---|---|---|")
    for row in cuts:
        print(f"| {row['tensor']} ({row['position']}) | {row['suffix_s'] * 1e3:.0f} ms | {row['whole_s'] * 1e3:.0f} ms "
              f"| {100 * row['saving']:.0f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
