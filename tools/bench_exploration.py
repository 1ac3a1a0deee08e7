"""Benchmark the network-search strategies side by side on one model (default: the shipped LeNet-5).

For each strategy (predictor, greedy, exhaustive; ``predictor:additive`` / ``predictor:divergence``
pin the predictor's loss model, plain ``predictor`` is the default ``auto``) it runs the whole `onnxws.compress` pipeline
with the same data, budget and seed, no score cache, ORT pinned to the same threads, and prints
the verified CR at the budget, the loss re-measured on the emitted file, the number of scorings
(all stages) and the wall time. Usage:

    python tools/bench_exploration.py [--model models/lenet5/model.onnx] [--loss 1] [--strategies predictor,predictor:additive,greedy,exhaustive] [--no-refine]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import onnxws


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/lenet5/model.onnx"))
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--loss", type=float, default=1.0)
    parser.add_argument("--search-samples", type=int, default=2000)
    parser.add_argument("--strategies", default="predictor,predictor:additive,predictor:divergence,greedy,exhaustive")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--refine", action=argparse.BooleanOptionalAction, default=True,
                        help="output-aware refinement of the candidates (onnxws default: on)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    rows = []
    for variant in args.strategies.split(","):
        strategy, _, predictor = variant.partition(":")
        start = time.perf_counter()
        result = onnxws.compress(args.model, args.data, loss=args.loss, strategy=strategy, seed=args.seed,
                                 search_samples=args.search_samples, cache=False, predictor=predictor or "auto",
                                 refine=args.refine)
        seconds = time.perf_counter() - start
        rep = result.report
        rows.append({
            "strategy": variant, "ratio": rep["compression"]["ratio_theoretical"], "loss": rep["final"]["loss"],
            "loss_search": rep["final"]["loss_search"], "scorings": rep["exploration"]["scorings"],
            "by_stage": rep["exploration"]["scorings_by_stage"], "seconds": seconds,
            "k": rep["final"]["k"], "uniform_ratio": (rep["uniform_baseline"] or {}).get("ratio_theoretical"),
        })
    print(f"# exploration benchmark: {args.model} at --loss {args.loss} (search subset {args.search_samples}), "
          f"{platform.machine()} {platform.processor() or ''}, onnxws {onnxws.__version__}")
    print("| strategy | verified CR | loss (full set, pp) | loss (search) | scorings | by stage | wall s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        stages = ", ".join(f"{k} {v}" for k, v in r["by_stage"].items())
        print(f"| {r['strategy']} | {r['ratio']:.2f}x | {r['loss']:.2f} | {r['loss_search']:.2f} | {r['scorings']} | {stages} | {r['seconds']:.1f} |")
    ref = next((r for r in rows if r["strategy"] == "exhaustive"), None)
    if ref:
        for r in rows:
            print(f"{r['strategy']}: {r['ratio'] / ref['ratio']:.3f} x the exhaustive CR with {r['scorings']} scorings")
    if rows and rows[0]["uniform_ratio"]:
        print(f"uniform k baseline: {rows[0]['uniform_ratio']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
