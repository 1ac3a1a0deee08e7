"""Fuzz onnxws's loader with mutated copies of the shipped model: no traceback, no hang, ever.

    python tools/fuzz_loader.py 2000 [--seed 0] [--cli-every 20] [--timeout 60]

Each mutant (bit flips, byte overwrites, truncation, duplicated or deleted chunks; seeded) goes
through the in-process load + discovery path (`load_model`, `find_weights`), which must either
succeed or raise an OnnxwsError; every ``--cli-every``-th mutant also runs the real CLI
(`onnxws inspect` and a short `onnxws compress`) in a subprocess with a timeout, which must exit
0, 1, 2 or 3 with no "Traceback" on stderr. Prints the counts; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "lenet5" / "model.onnx"
DATA = ROOT / "models" / "lenet5" / "eval.npz"


def mutate(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    buf = bytearray(data)
    kind = rng.choice(["flip", "overwrite", "truncate", "duplicate", "delete", "header"])
    if kind == "flip":
        for pos in rng.integers(0, len(buf), size=int(rng.integers(1, 32))):
            buf[pos] ^= 1 << int(rng.integers(0, 8))
    elif kind == "overwrite":
        start = int(rng.integers(0, len(buf)))
        chunk = rng.integers(0, 256, size=int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
        buf[start:start + len(chunk)] = chunk
    elif kind == "truncate":
        buf = buf[: int(rng.integers(0, len(buf)))]
    elif kind == "duplicate":
        start = int(rng.integers(0, len(buf)))
        buf[start:start] = buf[start:start + int(rng.integers(1, 2048))]
    elif kind == "delete":
        start = int(rng.integers(0, len(buf)))
        del buf[start:start + int(rng.integers(1, 2048))]
    else:  # damage the first bytes, where the graph and opset fields start
        for pos in rng.integers(0, min(64, len(buf)), size=4):
            buf[pos] = int(rng.integers(0, 256))
    return bytes(buf), str(kind)


def in_process(path: str) -> str:
    """'ok' / 'rejected' / 'TRACEBACK: ...' for the load + discovery path."""
    import traceback

    from onnxws.discovery import find_weights
    from onnxws.errors import OnnxwsError
    from onnxws.loading import load_model

    try:
        find_weights(load_model(path))
        return "ok"
    except OnnxwsError:
        return "rejected"
    except Exception:  # noqa: BLE001 - this is what the fuzzer hunts for
        return "TRACEBACK: " + traceback.format_exc().strip().splitlines()[-1]


def cli(path: str, out_dir: str, timeout: float) -> str:
    commands = [
        [sys.executable, "-m", "onnxws.cli", "inspect", path],
        [sys.executable, "-m", "onnxws.cli", "compress", path, "--data", str(DATA), "--no-cache", "--quiet",
         "--max-scorings", "5", "--search-samples", "200", "-o", str(Path(out_dir) / "o.onnx"), "--force"],
    ]
    for cmd in commands:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "HANG"
        if done.returncode not in (0, 1, 2, 3):
            return f"CRASH exit {done.returncode}"
        if "Traceback" in done.stderr:
            return "TRACEBACK (cli): " + done.stderr.strip().splitlines()[-1]
    return "cli ok"


def one(args: tuple[int, int, int, float]) -> tuple[str, str, str | None]:
    index, seed, cli_every, timeout = args
    rng = np.random.default_rng([seed, index])
    data, kind = mutate(MODEL.read_bytes(), rng)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "mutant.onnx")
        Path(path).write_bytes(data)
        result = in_process(path)
        cli_result = cli(path, tmp, timeout) if cli_every and index % cli_every == 0 else None
    return kind, result, cli_result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("n", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cli-every", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    start = time.perf_counter()
    counts: collections.Counter = collections.Counter()
    failures: list[str] = []
    jobs = [(i, args.seed, args.cli_every, args.timeout) for i in range(args.n)]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for kind, result, cli_result in pool.map(one, jobs, chunksize=8):
            counts[("in-process", result if not result.startswith("TRACEBACK") else "TRACEBACK")] += 1
            counts[("mutation", kind)] += 1
            if result.startswith("TRACEBACK"):
                failures.append(f"{kind}: {result}")
            if cli_result is not None:
                counts[("cli", cli_result.split(":")[0])] += 1
                if cli_result != "cli ok":
                    failures.append(f"{kind}: {cli_result}")
    print(f"{args.n} mutants of {MODEL.name} in {time.perf_counter() - start:.0f} s (seed {args.seed})")
    for (group, name), count in sorted(counts.items()):
        print(f"  {group:10s} {name:12s} {count}")
    print(f"failures (tracebacks, hangs, crashes): {len(failures)}")
    for line in failures[:20]:
        print("  " + line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
