"""Benchmark: `onnxws compress` on a > 2 GB external-data model; time per stage and peak memory.

Not part of CI: it writes 2.15 GB to disk, runs ~6 min on 2 cores and needs ~11 GB of RAM.

1. Generate (once; reused from the cache folder while the parameters match) a float32 MLP:
   ``--layers`` x (MatMul [dim, dim] + Relu), then a MatMul [dim, --classes] head; weights drawn
   with ``numpy.random.default_rng(--seed)`` (He scale), 8 x [8192, 8192] = 2.15 GB by default,
   all in one external data file ``model.onnx.data`` written one tensor at a time (64 KiB-aligned
   offsets). The evaluation set ``eval.npz`` holds only ``x`` (``--samples`` rows), so the metric
   is top-1 agreement with the fp32 model. The rows are the ``--samples`` with the clearest top-1
   margin among ``--pool`` x ``--samples`` random inputs (forward pass in NumPy): random inputs
   to a random MLP have many near-ties, and a 1 pp budget on a few hundred rows allows only a
   couple of flips, so without this the run would measure noise, not the pipeline.
2. Run the real CLI in a subprocess: ``onnxws compress model.onnx --data eval.npz --loss 1
   --search-samples 64 --max-scorings N --time-budget S --config bits.toml --no-cache --json``
   under ``/usr/bin/time -v`` (peak RSS; ``getrusage(RUSAGE_CHILDREN)`` without it). A thread
   samples the process's RSS every 0.5 s; the sample at which it first has ``model.onnx.data``
   open marks the start of the load stage, which places report.json's stage seconds on that
   time line (peak RSS per stage). A watchdog kills the run above ``--max-rss-gb``, or when the
   machine has less than ``--reserve-gb`` available (a shared machine must not reach the OOM killer).
3. Load the output in a fresh ONNX Runtime session (default options, by path, in a subprocess
   for its own peak RSS) and measure top-1 agreement with the fp32 logits saved at generation.
4. Print a Markdown table and write it to ``--results`` (default ``<out>/results.md``) with the
   raw numbers in ``results.json`` beside it.

    .venv/bin/python tools/bench_large_model.py                        # /tmp/onnxws-large
    .venv/bin/python tools/bench_large_model.py --clean                # delete model + outputs after
    .venv/bin/python tools/bench_large_model.py --out /tmp/s --layers 2 --dim 1024   # a quick smoke run

Defaults and why:
- ``--bits 4,6,8`` (a config file): onnxws's clustering costs ~20 s of fixed work per 33.5 M
  weights plus ~2.4 s per width on 2 cores (measured), so all nine widths would take ~11 min
  for 537 M weights before any scoring; with three it took 371 s (228 s since the clustering
  memory fix: one sort per tensor, no int64 labels).
- ``--max-scorings 40``: room for the layer stage (9 probes), the uniform baseline and a few
  network-stage rounds within ~15 min. Candidates are decoded one at a time as the scorer
  reaches them, so larger budgets hold one decoded tuple at a time, not one per tuple requested.
- measured (2 cores, 2026-11-23, default arguments; peak RSS per stage from the 0.5 s samples,
  MiB; the process peak from ``/usr/bin/time -v``). Before = commit 7a90b95, after = the memory
  fixes (scorer and encoder copy no payloads they drop, the model's copy of the weights is dropped
  once the scorer holds them, rebuilt weights checked one batch at a time, compact clustering):

  | stage     | before: s / MiB | after: s / MiB |
  |-----------|-----------------|----------------|
  | load      | 11.9 / 2,699    | 14.1 / 2,755   |
  | cluster   | 371.4 / 8,051   | 228.3 / 5,979  |
  | setup     | 30.1 / 10,203   | 34.9 / 8,161   |
  | layer     | 12.1 / 10,396   | 7.9 / 4,095    |
  | uniform   | 15.7 / 10,472   | 12.4 / 5,895   |
  | verify    | 1.7 / 8,548     | 1.5 / 4,104    |
  | emit      | 65.2 / 19,361   | 57.2 / 10,156  |
  | save+report | 8.9 / 10,663  | 4.3 / 1,813    |
  | process   | 517 s / 19,451 MiB = 9.50x the weights | 361 s / 10,243 MiB = 5.00x |

  Same output file both times (sha256 6bf1f509...), same report figures. At commit 26b2e7c (the predictor's
  auto start fixed for all-zero layer losses) the search combines widths: 5.82x at 0.78 pp, 36 scorings,
  458 s, peak 9,157 MiB = 4.47x (emit 9,062; setup 8,161; cluster 5,911). What is left of the emit
  peak is ONNX Runtime's own session on the emitted model (stock options, as the pipeline must
  measure it; 6-bit bit-stream indices here): RSS climbs from ~1.9 GiB to 10.2 GiB while it is
  created (~30 s), and the reload check, a fresh process loading the output the same way, peaks at
  8,764 MiB. Setup (8.2 GiB) still has the loaded model and the scorer's copy of the weights
  alive together while the scorer measures its two engines.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9
MIB = 2**20
ALIGN = 1 << 16  # external data offsets: ORT can memory-map aligned tensors
MODEL, DATA, EVAL, REF, META = "model.onnx", "model.onnx.data", "eval.npz", "reference.npz", "meta.json"
OUT_MODEL, OUT_REPORT = "model.ws.onnx", "model.ws.report"
STAGES = ("load", "setup", "calibrate", "cluster", "refine", "layer", "uniform", "network", "verify", "emit")  # pipeline order


# --------------------------------------------------------------------------------------------
# 1. Generation


def _shapes(layers: int, dim: int, classes: int) -> list[tuple[int, int]]:
    return [(dim, dim)] * layers + [(dim, classes)]


def generate(folder: Path, layers: int, dim: int, classes: int, samples: int, pool: int, seed: int) -> dict:
    """Write model.onnx + model.onnx.data + eval.npz + reference.npz into ``folder``.

    Each weight is drawn, appended to the data file and applied to the running activations,
    then dropped: peak memory is one weight plus the activations.
    """
    import onnx
    from onnx import TensorProto, helper

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((pool * samples, dim), dtype=np.float32)
    act = x
    initializers, nodes, current = [], [], "x"
    shapes = _shapes(layers, dim, classes)
    with open(folder / DATA, "wb") as data_file:
        for i, shape in enumerate(shapes):
            w = rng.standard_normal(shape, dtype=np.float32)
            w *= np.float32(np.sqrt(2.0 / shape[0]))  # He scale keeps Relu activations at unit variance
            offset = data_file.tell()
            if offset % ALIGN:
                data_file.write(b"\0" * (ALIGN - offset % ALIGN))
                offset = data_file.tell()
            data_file.write(w.tobytes(order="C"))
            name = f"w{i}" if i < layers else "w_head"
            tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape), data_location=TensorProto.EXTERNAL)
            for key, value in (("location", DATA), ("offset", str(offset)), ("length", str(w.nbytes))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            initializers.append(tensor)
            act = act @ w
            if i < layers:
                nodes.append(helper.make_node("MatMul", [current, name], [f"mm{i}"], name=f"matmul{i}"))
                nodes.append(helper.make_node("Relu", [f"mm{i}"], [f"h{i}"], name=f"relu{i}"))
                np.maximum(act, 0.0, out=act)
                current = f"h{i}"
            else:
                nodes.append(helper.make_node("MatMul", [current, name], ["logits"], name="head"))
            del w
    graph = helper.make_graph(nodes, "large_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dim])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bench_large_model")
    model.ir_version = 8
    (folder / MODEL).write_bytes(model.SerializeToString())  # small: every weight is external
    onnx.checker.check_model(str(folder / MODEL))  # by path: external data resolved, no 2 GB limit
    # Keep the rows with the clearest top-1 margin (in units of the row's logit spread), in pool order.
    top2 = np.sort(act, axis=1)[:, -2:]
    margin = (top2[:, 1] - top2[:, 0]) / np.maximum(np.std(act, axis=1), 1e-12)
    keep = np.sort(np.argsort(-margin, kind="stable")[:samples])
    np.savez(folder / EVAL, x=np.ascontiguousarray(x[keep]))
    np.savez(folder / REF, logits=act[keep])
    labels = np.argmax(act[keep], axis=1)
    return {"label_counts": np.bincount(labels, minlength=classes).tolist(),
            "margin_min": float(margin[keep].min()), "margin_median_pool": float(np.median(margin))}


def ensure_model(args: argparse.Namespace) -> dict:
    """Generate the model unless the cache folder holds one made with the same parameters."""
    out: Path = args.out
    params = {k: getattr(args, k) for k in ("layers", "dim", "classes", "samples", "pool", "seed")}
    meta_path = out / META
    if not args.regenerate and meta_path.exists() and all((out / n).exists() for n in (MODEL, DATA, EVAL, REF)):
        meta = json.loads(meta_path.read_text())
        if meta.get("params") == params and (out / DATA).stat().st_size == meta.get("data_bytes"):
            print(f"model: reusing {out / MODEL} (generated in {meta['seconds']:.0f} s)", flush=True)
            return meta
    t0 = time.perf_counter()
    print(f"model: generating {args.layers} x [{args.dim}, {args.dim}] + [{args.dim}, {args.classes}] fp32 in {out} ...", flush=True)
    facts = generate(out, **params)
    meta = {"params": params, "seconds": time.perf_counter() - t0, "data_bytes": (out / DATA).stat().st_size,
            "model_bytes": (out / MODEL).stat().st_size,
            "weight_bytes": sum(a * b * 4 for a, b in _shapes(args.layers, args.dim, args.classes)),
            "params_total": sum(a * b for a, b in _shapes(args.layers, args.dim, args.classes)), **facts}
    meta_path.write_text(json.dumps(meta, indent=1))
    print(f"model: generated in {meta['seconds']:.0f} s; top-1 labels per class {facts['label_counts']}", flush=True)
    return meta


# --------------------------------------------------------------------------------------------
# 2. The compress run, with an RSS sampler and a watchdog


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _available() -> int:
    """MemAvailable of the machine (bytes)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


def _has_open(pid: int, name: str) -> bool:
    try:
        return any(os.readlink(fd).endswith("/" + name) for fd in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False


class Sampler(threading.Thread):
    """Samples the RSS of a process tree; notes when it first opens the data file; kills it above
    ``limit_bytes`` or when the machine's available memory falls under ``reserve_bytes``."""

    def __init__(self, proc: subprocess.Popen, limit_bytes: float, reserve_bytes: float, interval: float = 0.5):
        super().__init__(daemon=True)
        self.proc, self.limit, self.reserve, self.interval = proc, limit_bytes, reserve_bytes, interval
        self.t0 = time.perf_counter()
        self.samples: list[tuple[float, int]] = []
        self.load_seen_at: float | None = None
        self.killed_at: float | None = None

    def run(self) -> None:
        while self.proc.poll() is None:
            pids = [self.proc.pid]
            for pid in pids:  # breadth-first over the tree (/usr/bin/time -> python)
                pids.extend(_children(pid))
            rss = sum(_rss(pid) for pid in pids)
            t = time.perf_counter() - self.t0
            self.samples.append((t, rss))
            if self.load_seen_at is None and any(_has_open(pid, DATA) for pid in pids[1:] or pids):
                self.load_seen_at = t
            available = _available()
            if (rss > self.limit or available < self.reserve) and self.killed_at is None:
                self.killed_at = t
                print(f"\n!! RSS {rss / GB:.1f} GB (--max-rss-gb {self.limit / GB:.1f}), machine has {available / GB:.1f} GB "
                      f"available (--reserve-gb {self.reserve / GB:.1f}): killing the run", file=sys.stderr, flush=True)
                os.killpg(self.proc.pid, signal.SIGKILL)
            time.sleep(self.interval)


def run_compress(args: argparse.Namespace) -> dict:
    out: Path = args.out
    config = out / "bench_config.toml"
    config.write_text(f"[global]\nbits = [{', '.join(str(int(b)) for b in args.bits.split(','))}]\n")
    exe = Path(sys.executable).with_name("onnxws")
    base = [str(exe)] if exe.exists() else [sys.executable, "-c", "from onnxws.cli import main; main()"]
    cmd = base + ["compress", str(out / MODEL), "--data", str(out / EVAL), "--loss", str(args.loss),
                  "-o", str(out / OUT_MODEL), "--report-dir", str(out / OUT_REPORT), "--search-samples", str(args.search_samples),
                  "--max-scorings", str(args.max_scorings), "--time-budget", str(args.time_budget),
                  "--config", str(config), "--no-cache", "--force", "--json"]
    timer = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)
    full = ([timer, "-v"] if timer else []) + cmd
    print("run: " + " ".join(cmd), flush=True)
    for leftover in (out / OUT_MODEL, out / (OUT_MODEL + ".data")):
        leftover.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    sampler = Sampler(proc, args.max_rss_gb * GB, args.reserve_gb * GB)
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    sampler.join(timeout=2)
    sampled = max((r for _, r in sampler.samples), default=0)
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    if match:
        peak, source = int(match.group(1)) * 1024, "/usr/bin/time -v"
        stderr = stderr[: stderr.rfind("\tCommand being timed")]
    elif sampler.killed_at is None:
        peak, source = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, "getrusage(RUSAGE_CHILDREN)"
    else:  # killed with its parent /usr/bin/time: only the samples are left
        peak, source = sampled, "RSS samples every 0.5 s, until killed"
    result = {"command": cmd, "exit_code": proc.returncode, "wall_s": wall, "peak_rss_bytes": peak,
              "peak_rss_source": source, "peak_rss_sampled_bytes": sampled,
              "stderr_tail": stderr.strip()[-3000:], "killed_at_s": sampler.killed_at,
              "load_seen_at_s": sampler.load_seen_at, "rss_series": [(round(t, 2), r) for t, r in sampler.samples]}
    try:
        result["summary"] = json.loads(stdout) if stdout.strip() else None
    except json.JSONDecodeError:
        result["summary"] = None
    return result


def stage_peaks(run: dict, seconds: dict) -> dict[str, int]:
    """Peak sampled RSS per stage: report.json's stage seconds laid end to end from the load start."""
    start = run.get("load_seen_at_s")
    series = run["rss_series"]
    if start is None or not series:
        return {}
    start = max(start - 0.5, 0.0)  # seen at the first sample after the data file was opened
    bounds, t = [("start", 0.0, start)], start
    for stage in STAGES:  # network and verify alternate; both are counted in their order here
        if stage in seconds:
            bounds.append((stage, t, t + seconds[stage]))
            t += seconds[stage]
    bounds.append(("save+report", t, float("inf")))
    peaks = {}
    for name, lo, hi in bounds:
        inside = [r for s, r in series if lo <= s < hi]
        if inside:
            peaks[name] = max(inside)
    return peaks


# --------------------------------------------------------------------------------------------
# 3. Reload check (run in a subprocess: its own peak RSS)


def check_output(model: str, eval_npz: str, ref_npz: str) -> None:
    import onnxruntime as ort

    t0 = time.perf_counter()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    created = time.perf_counter() - t0
    with np.load(eval_npz) as data:
        x = data["x"]
    with np.load(ref_npz) as data:
        ref = data["logits"]
    logits = sess.run(None, {"x": x})[0]
    print(json.dumps({"ok": True, "session_s": created, "run_s": time.perf_counter() - t0 - created,
                      "agreement": float(np.mean(np.argmax(logits, 1) == np.argmax(ref, 1))),
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def reload(out: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "_check", str(out / OUT_MODEL), str(out / EVAL), str(out / REF)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"ok": False, "error": proc.stderr.strip()[-500:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# 4. Report


def _files(folder: Path, name: str) -> dict[str, int]:
    """Sizes of ``name`` and the external data files it references."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors  # noqa: PLC2701 - the one walker onnx has

    path = folder / name
    if not path.exists():
        return {}
    sizes = {name: path.stat().st_size}
    for tensor in _get_all_tensors(onnx.load(str(path), load_external_data=False)):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value not in sizes and (folder / entry.value).exists():
                sizes[entry.value] = (folder / entry.value).stat().st_size
    return sizes


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / MIB:,.0f}"


def summarise(args, meta: dict, run: dict, report: dict | None, check: dict | None, files_in, files_out) -> tuple[str, dict]:
    bytes_in, bytes_out = sum(files_in.values()), sum(files_out.values())
    weight = meta["weight_bytes"]
    peak = run["peak_rss_bytes"]
    seconds = report["exploration"]["seconds"] if report else {}
    peaks = stage_peaks(run, seconds) if report else {}
    rows = [
        ("model", f"{args.layers} x MatMul[{args.dim}, {args.dim}] + Relu, head [{args.dim}, {args.classes}]; "
                  f"{meta['params_total'] / 1e6:,.0f} M fp32 params, {weight / GB:.3f} GB of weights"),
        ("eval data", f"{args.samples} rows, x only: metric top-1 agreement with the fp32 model; search subset {args.search_samples}"),
        ("command", "`onnxws " + " ".join(run["command"][1:]).replace(str(args.out) + "/", "") + "`"),
        ("exit code", str(run["exit_code"]) + (f" (killed at {run['killed_at_s']:.0f} s by the RSS watchdog)" if run["killed_at_s"] else "")),
        ("input bytes (model + external data)", f"{bytes_in:,} ({', '.join(f'{k} {v:,}' for k, v in files_in.items())})"),
        ("output bytes (model + external data)", f"{bytes_out:,} ({', '.join(f'{k} {v:,}' for k, v in files_out.items())})" if files_out else "-"),
        ("wall time of the process (s)", f"{run['wall_s']:.0f}"),
    ]
    for stage in (*STAGES, "total"):
        if stage in seconds:
            rows.append((f"  stage {stage} (s)", f"{seconds[stage]:.1f}" + (f"; peak RSS {_mib(peaks.get(stage))} MiB" if stage in peaks else "")))
    if report and "total" in seconds:
        rest = run["wall_s"] - seconds["total"]
        rows.append(("  start-up + save + report (s)", f"{rest:.1f}" + (f"; peak RSS {_mib(peaks.get('save+report'))} MiB after compress" if "save+report" in peaks else "")))
    rows.append(("peak RSS of the compress process (MiB)", f"{_mib(peak)} ({run['peak_rss_source']})"))
    rows.append(("peak RSS / weight bytes", f"{peak / weight:.2f}x"))
    if report:
        final, comp, exp = report["final"], report["compression"], report["exploration"]
        rows += [
            ("baseline / final metric (full set)", f"{report['baseline']['value']:.4f} / {final['value']:.4f}"),
            ("verified loss", f"{final['loss']:.3f} {final['loss_unit']} (budget {args.loss:g})"),
            ("chosen k", ", ".join(f"{n}={k}" for n, k in final["k"].items())),
            ("CR (shared weights, theoretical)", f"{comp['ratio_theoretical']:.2f}x"),
            ("CR (whole model, theoretical) / file", f"{comp['ratio_whole_theoretical']:.2f}x / {bytes_in / max(bytes_out, 1):.2f}x"),
            ("scorings (run / cached)", f"{exp['scorings']} ({exp['scorings_run']} / {exp['scorings_cached']}); stopped by {exp['stopped_by']}; engine {report['engine']}"),
        ]
    else:
        rows.append(("failure", "`" + (run["stderr_tail"].splitlines() or ["?"])[-1][:300] + "`"))
    if check is not None:
        rows.append(("output loads and runs in ORT", (f"yes: session {check['session_s']:.1f} s, agreement with fp32 "
                                                     f"{check['agreement']:.4f}, peak RSS {_mib(check['peak_rss_bytes'])} MiB")
                                                    if check.get("ok") else f"NO: {check.get('error')}"))
    table = "| quantity | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    data = {"meta": meta, "args": {k: str(v) for k, v in vars(args).items()}, "files_in": files_in, "files_out": files_out,
            "stage_peak_rss_bytes": peaks, "reload": check, "report_seconds": seconds,
            "final": report and {k: report[k] for k in ("baseline", "final", "compression", "engine")},
            "exploration": report and {k: report["exploration"][k] for k in ("scorings", "scorings_run", "scorings_cached",
                                                                             "scorings_by_stage", "stopped_by")},
            "run": run}
    return table, data


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_check"]:
        check_output(*argv[1:4])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/onnxws-large"), help="cache/work folder (default /tmp/onnxws-large)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--samples", type=int, default=256, help="evaluation rows")
    parser.add_argument("--pool", type=int, default=4, help="draw pool x samples inputs, keep the clearest-margin ones")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loss", type=float, default=1.0)
    parser.add_argument("--search-samples", type=int, default=64)
    parser.add_argument("--max-scorings", type=int, default=40)
    parser.add_argument("--time-budget", type=float, default=720.0, help="onnxws --time-budget (seconds, whole run)")
    parser.add_argument("--bits", default="4,6,8", help="index widths to try (a [global] bits config)")
    parser.add_argument("--max-rss-gb", type=float, default=22.0, help="kill the run above this RSS")
    parser.add_argument("--reserve-gb", type=float, default=1.0, help="kill the run when the machine has less memory available")
    parser.add_argument("--results", type=Path, default=None, help="Markdown results file (default <out>/results.md)")
    parser.add_argument("--regenerate", action="store_true", help="generate the model even if the cache holds it")
    parser.add_argument("--clean", action="store_true", help="delete the model, its data and the outputs at the end")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    results = args.results or args.out / "results.md"

    meta = ensure_model(args)
    run = run_compress(args)
    report_path = args.out / OUT_REPORT / "report.json"
    report = json.loads(report_path.read_text()) if run["exit_code"] == 0 and report_path.exists() else None
    if run["exit_code"] != 0:
        print(f"compress failed (exit {run['exit_code']}):\n{run['stderr_tail']}", file=sys.stderr, flush=True)
    check = reload(args.out) if report else None
    table, data = summarise(args, meta, run, report, check, _files(args.out, MODEL), _files(args.out, OUT_MODEL))
    print("\n" + table)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(f"# onnxws on a > 2 GB external-data model\n\n{table}\n")
    results.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str))
    print(f"\nwritten: {results} and {results.with_suffix('.json')}")
    if args.clean:
        for name in (MODEL, DATA, EVAL, REF, META, OUT_MODEL, OUT_MODEL + ".data", "bench_config.toml"):
            (args.out / name).unlink(missing_ok=True)
        shutil.rmtree(args.out / OUT_REPORT, ignore_errors=True)
    return 0 if report and (check or {}).get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
