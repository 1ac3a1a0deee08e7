"""Run `onnxws batch` over the zoo built by tools/zoo/build.py and write a results table.

    python tools/bench_zoo.py --zoo ~/.cache/onnxws-zoo --out /tmp/zoo-results [--loss 1] [--search-samples 250]
    python tools/bench_zoo.py --out /tmp/zoo-results --table-only      # re-read the reports only

Writes ``OUT/zoo.toml`` (a batch manifest: ``[defaults]`` with the compress options, then one
``[[model]]`` per ``ZOO/<name>.json`` with ``path``, ``data`` and, where the zoo says so, a
custom ``metric`` such as ``tools.zoo.ocr_metric:exact_match``), runs ``onnxws batch`` on it
from the repository root with the root on ``PYTHONPATH`` (so the zoo's metric modules import;
resumable: finished models are not redone), then reads each ``OUT/<name>.ws.report/report.json``
and writes ``OUT/zoo_results.md`` (also printed): model, parameters, metric, baseline, final,
loss, per-layer CR, best uniform-k CR, their ratio, file ratio, real scorings and seconds per
stage, headed by the date, machine and onnxws command. Beside them, what standard formats
(fp16, int8 / int4 per-channel) lose on the same evaluation set (``tools/zoo_reference.py``,
run with onnxws's Python unless ``--no-reference``; also resumable), which tells how much of
the budget the evaluation set's own sensitivity leaves.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def toml_value(value: object) -> str:
    """A TOML scalar for a str, bool, int or float."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def parse_scalar(text: str) -> object:
    """``"3"`` -> 3, ``"0.5"`` -> 0.5, ``"true"`` -> True, anything else stays a string."""
    if text in ("true", "false"):
        return text == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def zoo_models(zoo: Path, only: list[str] | None) -> list[tuple[str, dict]]:
    """(name, metadata) of every ``ZOO/<name>.json`` that has its .onnx beside it, in name order."""
    found = []
    for meta_path in sorted(zoo.glob("*.json")):
        name = meta_path.stem
        if only and name not in only:
            continue
        if not (zoo / f"{name}.onnx").exists():
            continue
        found.append((name, json.loads(meta_path.read_text())))
    if not found:
        raise SystemExit(f"no models in {zoo} (expected <name>.onnx + <name>.json from tools/zoo/build.py"
                         f"{'; filter ' + ','.join(only) if only else ''})")
    return found


def write_manifest(zoo: Path, out: Path, models: list[tuple[str, dict]], defaults: dict[str, object]) -> Path:
    """Write ``OUT/zoo.toml``; absolute paths, so the manifest works from anywhere."""
    lines = ["# written by tools/bench_zoo.py", "[defaults]"]
    lines += [f"{key} = {toml_value(value)}" for key, value in defaults.items() if value is not None]
    for name, meta in models:
        lines += ["", "[[model]]", f"path = {toml_value((zoo / (name + '.onnx')).resolve())}"]
        if (zoo / f"{name}.npz").exists():
            lines.append(f"data = {toml_value((zoo / (name + '.npz')).resolve())}")
        if meta.get("metric_spec"):
            lines.append(f"metric = {toml_value(meta['metric_spec'])}")
    manifest = out / "zoo.toml"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def onnxws_command(explicit: str | None) -> list[str]:
    """The onnxws CLI to run: ``--onnxws``, else the repository's .venv, else this Python's module."""
    if explicit:
        return shlex.split(explicit)
    venv = ROOT / ".venv" / "bin" / "onnxws"
    if venv.exists():
        return [str(venv)]
    found = shutil.which("onnxws")
    return [found] if found else [sys.executable, "-m", "onnxws.cli"]


def onnxws_python(command: list[str]) -> str:
    """The Python that has onnxws installed: the one beside the onnxws CLI, else this one."""
    beside = Path(command[0]).with_name("python")
    return str(beside) if command[0].endswith("onnxws") and beside.exists() else sys.executable


def reference_formats(out: Path, name: str) -> dict:
    """``{format: {"value", "loss_pp", "ratio"}}`` from ``OUT/<name>.reference.json`` (empty when absent)."""
    path = out / f"{name}.reference.json"
    return json.loads(path.read_text()).get("formats", {}) if path.exists() else {}


def reference_text(out: Path, name: str) -> str:
    """``fp16 0.80 / int8 13.10 / int4 94.00 / k-means 1.20 (5.31x)`` from ``OUT/<name>.reference.json``, or ``-``."""
    formats = reference_formats(out, name)
    if not formats:
        return "-"
    return " / ".join(f"{fmt.split()[0]} {v['loss_pp']:.2f}" + (f" ({v['ratio']:.2f}x)" if fmt.startswith("k-means") else "")
                      for fmt, v in formats.items())


def _interval(part: dict | None) -> str:
    """``0.55 [0.20, 0.95]`` from a report's ``final.holdout`` / ``final.whole`` entry, or ``-``."""
    if not isinstance(part, dict) or not isinstance(part.get("loss"), (int, float)):
        return "-"
    low, high = part.get("interval") or (None, None)
    return f"{part['loss']:.2f} [{low:.2f}, {high:.2f}]" if isinstance(low, (int, float)) else f"{part['loss']:.2f}"


def _resolution(final: dict) -> str:
    value = final.get("resolution")
    return f"{value:.2f}" if isinstance(value, (int, float)) else "-"


def kmeans_comparison(out: Path, name: str, whole_ratio: float | None) -> str:
    """The whole-model CR against the uniform 6-bit k-means codebook's (``1.42x of 5.31x``), or ``-``."""
    kmeans = next((v for f, v in reference_formats(out, name).items() if f.startswith("k-means")), None)
    if kmeans is None or not whole_ratio:
        return "-"
    return f"{whole_ratio / kmeans['ratio']:.2f} (6-bit k-means: {kmeans['ratio']:.2f}x at {kmeans['loss_pp']:.2f} pp)"


def _pct(value: float | None) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, (int, float)) else "-"


def _ratio(value: float | None) -> str:
    return f"{value:.2f}x" if isinstance(value, (int, float)) and value else "-"


def failures(out: Path) -> dict[str, str]:
    """model -> error text of the failed rows of ``OUT/summary.csv`` (empty when there is none)."""
    path = out / "summary.csv"
    if not path.exists():
        return {}
    with open(path, newline="") as fh:
        return {row["model"]: row.get("error", "") for row in csv.DictReader(fh) if row.get("status") == "failed"}


def table(out: Path, models: list[tuple[str, dict]], command: str, defaults: dict[str, object]) -> str:
    """The Markdown results table for ``models`` from their reports under ``out``."""
    head = ("| model | params | metric (search / full samples) | baseline | final | loss | CR per-layer | CR best uniform k "
            "| per-layer / uniform | CR whole model | whole / 6-bit k-means | file ratio | loss held out [95%] "
            "| loss whole set [95%] | resolution | scorings run / cached | seconds per stage "
            "| loss of fp16 / int8 / int4 per-channel (2x / 4x / 8x) / k-means 6-bit per tensor, pp |")
    rows = [head, "|" + "---|" * head.count(" | ") + "---|"]
    errors = failures(out)
    for name, meta in models:
        # `onnxws batch` writes <name>.ws.report/ (the output's report folder; batches before
        # the rename wrote <name>.report/, which the next batch renames).
        report_path = next((p for p in (out / f"{name}.ws.report" / "report.json", out / f"{name}.report" / "report.json")
                            if p.exists()), out / f"{name}.ws.report" / "report.json")
        params = f"{meta.get('params', 0):,}"
        if not report_path.exists():
            why = errors.get(name, "not run (no report)").replace("|", "/").replace("\n", " ")
            rows.append(f"| {name} | {params} | | failed: {why[:160]} |" + " |" * 13 + f" {reference_text(out, name)} |")
            continue
        r = json.loads(report_path.read_text())
        comp, expl, final = r.get("compression", {}), r.get("exploration", {}), r.get("final", {})
        uniform_report = r.get("uniform_baseline") or {}
        # the best uniform k on the subset counts only if it also held on the full set
        held = uniform_report.get("within_budget", True)
        uniform = uniform_report.get("ratio_theoretical") if held else None
        per_layer = comp.get("ratio_theoretical")
        gain = f"{per_layer / uniform:.2f}" if per_layer and uniform else "-"
        tried_uniform = bool((expl.get("scorings_by_stage") or {}).get("uniform"))
        uniform_text = _ratio(uniform) if uniform else "none within budget" if tried_uniform else "not reached"
        if uniform_report and not held and isinstance(uniform_report.get("loss"), (int, float)):
            uniform_text += f" (k={uniform_report.get('k')}, {_ratio(uniform_report.get('ratio_theoretical'))}, lost {uniform_report['loss']:.2f} on the full set)"
        metric = r.get("metric")
        metric = metric.get("name") if isinstance(metric, dict) else metric
        data = r.get("data") or {}
        metric = f"{metric or '-'} ({data.get('n_search', '?')} / {data.get('n_full', '?')})"
        unit = final.get("loss_unit", "pp")
        loss = f"{final['loss']:.2f} {unit}" if isinstance(final.get("loss"), (int, float)) else "-"
        seconds = expl.get("seconds", {})
        stages = ", ".join(f"{k} {v:.1f}" for k, v in seconds.items() if k != "total")
        stages = f"{stages}; **total {seconds.get('total', 0):.1f}**" if seconds else "-"
        if expl.get("stopped_by") not in (None, "converged"):
            stages += f" (stopped by {expl['stopped_by']})"
        rows.append(f"| {name} | {params} | {metric} | {_pct(r.get('baseline', {}).get('value'))} | "
                    f"{_pct(final.get('value'))} | {loss} | {_ratio(per_layer)} | {uniform_text} | {gain} | "
                    f"{_ratio(comp.get('ratio_whole_theoretical'))} | {kmeans_comparison(out, name, comp.get('ratio_whole_theoretical'))} | "
                    f"{_ratio(comp.get('ratio_file'))} | {_interval(final.get('holdout'))} | {_interval(final.get('whole'))} | "
                    f"{_resolution(final)} | {expl.get('scorings_run', '-')} / {expl.get('scorings_cached', '-')} | "
                    f"{stages} | {reference_text(out, name)} |")
    when = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    machine = (f"{platform.node() or 'unknown host'}: {platform.platform()}, {platform.processor() or platform.machine()}, "
               f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'}), "
               f"Python {platform.python_version()}")
    options = ", ".join(f"{k} = {v}" for k, v in defaults.items() if v is not None)
    return (f"# onnxws on the model zoo\n\nMeasured {when} on {machine}.\n\nCommand: `{command}` "
            f"(manifest [defaults]: {options})\n\n"
            "CR = compression ratio of the shared weight tensors (theoretical: indices + codebooks vs fp32); "
            "CR whole model counts the unshared tensors at full size; "
            "file ratio = .onnx bytes before / after; scorings cached = answered by the score cache of an earlier run. Loss in percentage points (pp) of the metric; "
            "expected_accuracy (the default without labels) = the uncompressed model's probability of the compressed model's "
            "top-1 class (docs/metric.md); top1_agreement = top-1 agreement with the uncompressed model. "
            "Last column: loss on the full set when every shareable weight is stored as fp16, or as symmetric "
            "linear int8 / int4 with one scale per output channel, or as one 64-value k-means codebook per tensor "
            "(tools/zoo_reference.py): the loss that the evaluation set charges for standard formats of 2x, 4x, 8x "
            "and ~5.3x. Held-out / whole-set losses with their 95% intervals; resolution = the interval's half-width "
            "for a zero-change candidate (report.json `final`).\n\n"
            + "\n".join(rows) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, default=Path.home() / ".cache" / "onnxws-zoo")
    parser.add_argument("--out", type=Path, default=Path("/tmp/zoo-results"))
    parser.add_argument("--models", default="", help="comma-separated subset of the zoo (default: all)")
    parser.add_argument("--loss", type=float, default=1.0, help="accuracy-loss budget (pp) for every model")
    parser.add_argument("--search-samples", type=int, default=250)
    parser.add_argument("--time-budget", type=float, default=None, help="seconds per model (onnxws --time-budget)")
    parser.add_argument("--max-scorings", type=int, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other compress option for [defaults], e.g. --set granularity=channel (repeatable)")
    parser.add_argument("--jobs", type=int, default=1, help="models compressed in parallel")
    parser.add_argument("--onnxws", default=None, help="onnxws command (default: the repository's .venv/bin/onnxws)")
    parser.add_argument("--force", action="store_true", help="redo models that are already done")
    parser.add_argument("--no-reference", action="store_true",
                        help="do not score the fp16 / int8 / int4 reference formats (tools/zoo_reference.py)")
    parser.add_argument("--table-only", action="store_true", help="do not run onnxws; rebuild the table from OUT")
    args = parser.parse_args()
    zoo, out = args.zoo.expanduser().resolve(), args.out.expanduser().resolve()
    models = zoo_models(zoo, [m.strip() for m in args.models.split(",") if m.strip()] or None)
    out.mkdir(parents=True, exist_ok=True)
    defaults = {"loss": args.loss, "search_samples": args.search_samples, "time_budget": args.time_budget,
                "max_scorings": args.max_scorings}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            parser.error(f"--set {item!r}: expected KEY=VALUE, e.g. granularity=channel")
        defaults[key.strip()] = parse_scalar(value.strip())
    manifest = write_manifest(zoo, out, models, defaults)
    cmd = [*onnxws_command(args.onnxws), "batch", str(manifest), "-o", str(out), "--cache", str(out / "cache"),
           "--jobs", str(args.jobs), *(["--force"] if args.force else [])]
    code = 0
    if not args.table_only:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        print("running:", shlex.join(cmd), flush=True)
        code = subprocess.call(cmd, cwd=ROOT, env=env)
        todo = [name for name, _ in models if args.force or not (out / f"{name}.reference.json").exists()]
        if todo and not args.no_reference:
            ref = [onnxws_python(cmd), str(ROOT / "tools" / "zoo_reference.py"), "--zoo", str(zoo), "--out", str(out),
                   "--models", ",".join(todo)]
            print("running:", shlex.join(ref), flush=True)
            code = subprocess.call(ref, cwd=ROOT, env=env) or code
    text = table(out, models, shlex.join(cmd), defaults)
    (out / "zoo_results.md").write_text(text)
    print(text)
    return code


if __name__ == "__main__":
    sys.exit(main())
