"""Encoding benchmark: file size, session start-up and peak memory per index width.

Builds a ResNet-50-shaped model with random weights (``tools/bench_scoring.py``: 53 convs + FC,
25.5 M weights, opset 17), shares every conv/gemm weight (>= 64 params) at one index width with
random indices (codebook per tensor), encodes it with ``onnxws.encoding.encode_model`` and, for the
float model and each encoded one, creates an ONNX Runtime session in a fresh subprocess (CPU, one
intra-op thread, otherwise default options, so constant folding rebuilds the weights at start-up).
Reported per variant: file size, packing efficiency (docs/design.md), session start-up time and the
process's peak RSS during session creation (VmHWM after creation; its growth over the RSS just
before), medians of ``--repeats`` runs. Variants beyond the default layouts show what packing costs
and saves: 3 bits in UINT4 (``pack=False``), 5 bits in UINT8, 4 and 2 bits as bit streams at opset 17,
and 5 bits unpacked with int32 Div/Mod (the model converted to opset 13, below the uint8 unpacking's 14).
Session runs go round robin over the variants, so load from other processes hits them alike.

    .venv/bin/python tools/bench_encoding.py [--model resnet50|lenet] [--widths 0,1,...,8] [--repeats 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from onnxws.encoding import encode_model  # noqa: E402
from onnxws.proto import model_weight_bytes  # noqa: E402
from onnxws.sharing import SharedWeight  # noqa: E402

CHILD = r"""
import json, sys, time
import onnxruntime as ort
def status():
    return {k: int(v.split()[0]) / 1024 for k, v in (l.split(":", 1) for l in open("/proc/self/status") if l.startswith(("VmRSS", "VmHWM")))}
options = ort.SessionOptions()
options.intra_op_num_threads = 1
options.inter_op_num_threads = 1
options.log_severity_level = 3
before = status()["VmRSS"]
t0, c0 = time.perf_counter(), time.process_time()
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
startup, cpu = time.perf_counter() - t0, time.process_time() - c0
after = status()
print(json.dumps({"startup_s": startup, "startup_cpu_s": cpu, "rss_before_mb": before, "peak_mb": after["VmHWM"],
                  "rss_after_mb": after["VmRSS"]}))
"""


def _random_shared(model: onnx.ModelProto, names: list[str], bits: int, seed: int = 0) -> list[SharedWeight]:
    """Per-tensor codebooks of 2**bits values at random indices (sizes and layout do not depend on the values)."""
    rng = np.random.default_rng(seed)
    inits = {t.name: t for t in model.graph.initializer}
    k = 1 << bits
    out = []
    for name in names:
        shape = tuple(inits[name].dims)
        book = np.sort(rng.normal(0, 0.05, (1, k))).astype(np.float32)
        out.append(SharedWeight(name, book, rng.integers(0, k, size=shape).astype(np.uint8)))
    return out


def _measure_once(path: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _median(runs: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50", choices=["resnet50", "lenet"])
    parser.add_argument("--widths", default="0,1,2,3,4,5,6,7,8", help="comma list of index widths in bits")
    parser.add_argument("--repeats", type=int, default=5, help="session creations per variant (median)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    from bench_scoring import lenet5, resnet50, weight_names

    model = resnet50() if args.model == "resnet50" else lenet5()
    names = weight_names(model)
    inits = {t.name: t for t in model.graph.initializer}
    shared_params = sum(int(np.prod(inits[n].dims)) for n in names)
    all_bytes = model_weight_bytes(model)
    print(f"{args.model}: {len(model.graph.initializer)} initializers, {all_bytes / 1e6:.1f} MB of weights; "
          f"{len(names)} shared tensors, {shared_params / 1e6:.2f} M params", flush=True)

    # Below opset 14 the bit streams are unpacked in int32 (Div/Mod). The converter cannot go down
    # (no Relu 14 -> 13 adapter), but every op here means the same at 13 for float tensors.
    opset13 = onnx.ModelProto()
    opset13.CopyFrom(model)
    opset13.opset_import[0].version = 13
    variants: list[tuple[str, int, dict, onnx.ModelProto]] = [
        (f"{b} bit", b, {}, model) for b in (int(w) for w in args.widths.split(","))]
    variants += [("3 bit in UINT4 (pack=False)", 3, {"pack": False}, model),
                 ("5 bit in UINT8 (pack=False)", 5, {"pack": False}, model),
                 ("4 bit packed (opset 17 kept)", 4, {"raise_opset": False}, model),
                 ("2 bit packed (opset 17 kept)", 2, {"raise_opset": False}, model),
                 ("5 bit packed, int32 unpack (op 13)", 5, {"raise_opset": False}, opset13)]
    results, paths = [], []
    with tempfile.TemporaryDirectory(prefix="onnxws-bench-enc-") as folder:
        base = Path(folder) / "float.onnx"
        onnx.save(model, str(base))
        results.append({"variant": "float32", "bits": 32, "file_mb": base.stat().st_size / 1e6, "ratio_file": 1.0,
                        "packing_efficiency": None, "index_dtype": "-", "opset": 17, "encode_s": 0.0})
        paths.append(base)
        for label, bits, options, source in variants:
            shared = _random_shared(model, names, bits)
            t0 = time.perf_counter()
            encoded = encode_model(source, shared, **options)
            encode_s = time.perf_counter() - t0
            path = Path(folder) / f"w{bits}_{len(results)}.onnx"
            onnx.save(encoded.model, str(path))
            stored_bits = sum(sw.stored_bits(32) for sw in shared) + 8 * (all_bytes - 4 * shared_params)
            ratio_whole = 8 * all_bytes / stored_bits
            efficiency = all_bytes / model_weight_bytes(encoded.model) / ratio_whole
            results.append({"variant": label, "bits": bits, "file_mb": path.stat().st_size / 1e6,
                            "ratio_file": base.stat().st_size / path.stat().st_size, "ratio_whole_theoretical": ratio_whole,
                            "packing_efficiency": efficiency, "index_dtype": encoded.tensors[0].index_dtype,
                            "opset": encoded.opset, "encode_s": encode_s, "notes": encoded.notes})
            paths.append(path)
            print(f"encoded {label}: {encoded.tensors[0].index_dtype} at opset {encoded.opset} in {encode_s:.2f} s", flush=True)
        # Round robin over the variants, so load from other processes hits them all alike.
        runs: list[list[dict]] = [[] for _ in paths]
        for repeat in range(args.repeats):
            for i, path in enumerate(paths):
                runs[i].append(_measure_once(path))
            print(f"session round {repeat + 1}/{args.repeats} done", flush=True)
        for row, measured in zip(results, runs):
            row.update(_median(measured))

    print()
    print(f"{'variant':36s} {'layout':10s} {'opset':>5s} {'file MB':>8s} {'ratio':>6s} {'pack eff':>8s} "
          f"{'encode s':>8s} {'start-up s':>10s} {'CPU s':>6s} {'peak RSS MB':>11s} {'RSS growth MB':>13s}")
    for r in results:
        eff = f"{r['packing_efficiency']:.3f}" if r["packing_efficiency"] is not None else "-"
        print(f"{r['variant']:36s} {r['index_dtype']:10s} {r['opset']:5d} {r['file_mb']:8.2f} {r['ratio_file']:6.2f} {eff:>8s} "
              f"{r['encode_s']:8.2f} {r['startup_s']:10.3f} {r['startup_cpu_s']:6.3f} {r['peak_mb']:11.1f} "
              f"{r['peak_mb'] - r['rss_before_mb']:13.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
