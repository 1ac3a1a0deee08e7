"""Run `onnxws batch` over the zoo built by tools/zoo/build.py and write a results table.

    python tools/bench_zoo.py --zoo ~/.cache/onnxws-zoo --out /tmp/zoo-results [--loss 1] [--search-samples 250]

Writes a TOML manifest (per-model options, e.g. a custom metric), runs the batch (resumable:
finished models are not redone), then reads each report and writes OUT/zoo_results.md with the
model, parameters, baseline, final, loss, per-layer CR, best uniform-k CR at the same budget,
file ratio, real scorings and wall time per stage, with the date and machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path


def write_manifest(zoo: Path, out: Path, loss: float, search_samples: int) -> Path:
    lines = [f"[defaults]\nloss = {loss}\nsearch_samples = {search_samples}\n"]
    for meta_path in sorted(zoo.glob("*.json")):
        meta = json.loads(meta_path.read_text())
        name = meta_path.stem
        lines.append(f'[[model]]\npath = "{(zoo / (name + ".onnx")).resolve()}"\ndata = "{(zoo / (name + ".npz")).resolve()}"\n')
        if meta.get("metric_spec"):
            lines.append(f'metric = "{meta["metric_spec"]}"\n')
    manifest = out / "zoo.toml"
    manifest.write_text("\n".join(lines))
    return manifest


def table(zoo: Path, out: Path) -> str:
    rows = ["| model | params | baseline | final | loss (pp) | CR per-layer | CR best uniform k | per-layer / uniform | "
            "file ratio | real scorings | seconds (cluster / layer / network / verify / total) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for meta_path in sorted(zoo.glob("*.json")):
        name = meta_path.stem
        meta = json.loads(meta_path.read_text())
        report_path = out / f"{name}.report" / "report.json"
        if not report_path.exists():
            rows.append(f"| {name} | {meta.get('params', '')} | failed or not run | | | | | | | | |")
            continue
        r = json.loads(report_path.read_text())
        c, e, u = r["compression"], r["exploration"], r.get("uniform_baseline") or {}
        s = e["seconds"]
        uni = u.get("ratio_theoretical")
        gain = f"{c['ratio_theoretical'] / uni:.2f}" if uni else "-"
        rows.append(
            f"| {name} | {meta.get('params', 0):,} | {100 * r['baseline']['value']:.2f}% | {100 * r['final']['value']:.2f}% | "
            f"{r['final']['loss']:.2f} | {c['ratio_theoretical']:.2f}x | {f'{uni:.2f}x' if uni else 'none'} | "
            f"{gain} | {c['ratio_file']:.2f}x | {e['scorings_run']} | "
            f"{s.get('cluster', 0):.0f} / {s.get('layer', 0):.0f} / {s.get('network', 0):.0f} / {s.get('verify', 0):.0f} / {s.get('total', 0):.0f} |")
    when = dt.datetime.now().strftime("%Y-%m-%d")
    head = (f"Measured {when} on {platform.machine()}, {os.cpu_count()} CPU cores, CPU execution provider "
            f"(onnxws batch, --loss 1 pp; metric: top-1 agreement with the fp32 model where the data has no labels).")
    return head + "\n\n" + "\n".join(rows) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, default=Path.home() / ".cache" / "onnxws-zoo")
    parser.add_argument("--out", type=Path, default=Path("/tmp/zoo-results"))
    parser.add_argument("--loss", type=float, default=1.0)
    parser.add_argument("--search-samples", type=int, default=250)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = write_manifest(args.zoo, args.out, args.loss, args.search_samples)
    cmd = [sys.executable, "-m", "onnxws.cli", "batch", str(manifest), "-o", str(args.out),
           "--cache", str(args.out / "cache")]
    code = subprocess.call(cmd)
    text = table(args.zoo, args.out)
    (args.out / "zoo_results.md").write_text(text)
    print(text)
    return code


if __name__ == "__main__":
    sys.exit(main())
