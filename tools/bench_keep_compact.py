"""Default vs keep-compact sessions of a compressed model: start-up, latency, resident memory.

Each configuration runs in a fresh subprocess (so peak RSS is its own), ORT pinned to one
intra-op thread; latency is the median of 30 runs of one batch. Usage:

    python tools/bench_keep_compact.py [--model OUT.ws.onnx --input NAME --shape 64,1,28,28 --dtype uint8]

Without --model it builds a 16.8M-parameter MLP (4 x MatMul 2048x2048), shares it at 4 bits
and measures that (plus the float original for reference).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
import numpy as np, onnxruntime as ort
from onnxws.runtime import open_session
path, keep, name, shape, dtype = sys.argv[1], sys.argv[2] == "1", sys.argv[3], [int(s) for s in sys.argv[4].split(",")], sys.argv[5]
opts = ort.SessionOptions(); opts.intra_op_num_threads = 1
t0 = time.perf_counter(); sess = open_session(path, keep_compact=keep, session_options=opts, providers=["CPUExecutionProvider"]); start = time.perf_counter() - t0
x = (np.random.default_rng(0).integers(0, 255, shape) if dtype == "uint8" else np.random.default_rng(0).normal(size=shape)).astype(dtype)
sess.run(None, {name: x})
times = []
for _ in range(30):
    t = time.perf_counter(); sess.run(None, {name: x}); times.append(time.perf_counter() - t)
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
print(json.dumps({"startup_s": start, "latency_ms": 1000 * float(np.median(times)),
                  "rss_mb": int(status["VmRSS"].split()[0]) / 1024}))
"""


def measure(path: Path, keep: bool, name: str, shape: str, dtype: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), "1" if keep else "0", name, shape, dtype],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def build_mlp(folder: Path) -> tuple[Path, Path]:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from onnxws.clustering import share_weight_all_k
    from onnxws.encoding import encode_model

    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(4):
        inits.append(numpy_helper.from_array(rng.normal(0, 0.02, (2048, 2048)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"]))
        prev = f"h{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2048])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["N", 2048])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    original = folder / "mlp.onnx"
    onnx.save(model, str(original))
    shared = [share_weight_all_k(init.name, numpy_helper.to_array(init), [16])[16] for init in model.graph.initializer]
    compressed = folder / "mlp.ws.onnx"
    onnx.save(encode_model(model, shared).model, str(compressed))
    return original, compressed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--input", default="x")
    parser.add_argument("--shape", default="64,2048")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            original, compressed = build_mlp(Path(tmp))
            configs = [("float original", original, False), ("compressed, default", compressed, False),
                       ("compressed, keep-compact", compressed, True)]
        else:
            configs = [("compressed, default", args.model, False), ("compressed, keep-compact", args.model, True)]
        # ru_maxrss is inherited across fork/exec, so the child's own peak is not measurable that way:
        # VmRSS after the runs is what the session holds (weights + arena), on top of ~120 MB of runtime.
        print("| session | file MB | start-up s | latency ms (median of 30) | RSS after runs MB |")
        print("|---|---|---|---|---|")
        for label, path, keep in configs:
            r = measure(path, keep, args.input, args.shape, args.dtype)
            print(f"| {label} | {path.stat().st_size / 2**20:.2f} | {r['startup_s']:.3f} | {r['latency_ms']:.2f} | "
                  f"{r['rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
