"""What standard weight formats lose on each zoo model's own evaluation set (the metric's floor).

    python tools/zoo_reference.py --zoo ~/.cache/onnxws-zoo --out /tmp/zoo-results [--models a,b]

A budget means something only against what the evaluation set can resolve. On a set of
low-confidence views, top-1 agreement flips when the weights merely move by their fp16 rounding;
a budget of 1 pp there is a bound on noise. This tool scores, on the full evaluation set and
with onnxws's own scorer (same shareable weights as ``onnxws compress``, same metric), the
model with every shareable weight replaced by

- ``fp16``: its float16 rounding (2x);
- ``int8 per-channel``: symmetric linear int8 with one scale per output channel (the usual
  deployment format; 4x);
- ``int4 per-channel``: the same with 4 bits (8x);
- ``k-means 6-bit per-tensor``: one codebook of 64 values per tensor, each weight its nearest
  value (optimal 1-D k-means, ``onnxws.clustering``; no refinement, no bias correction: Core ML's
  per-tensor 6-bit palettization). Its ratio counts the codebooks (32 bits per value).

and writes ``OUT/<name>.reference.json`` (``{format: {"value", "loss_pp", "ratio"}}``), which
``tools/bench_zoo.py`` shows beside the onnxws results. Nothing here is used by onnxws itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the zoo's metric modules (tools.zoo.*) import from the root

from onnxws.config import CompressConfig  # noqa: E402
from onnxws.clustering import share_weight  # noqa: E402
from onnxws.data import load_data  # noqa: E402
from onnxws.discovery import WeightInfo, find_weights  # noqa: E402
from onnxws.loading import load_model  # noqa: E402
from onnxws.metrics import resolve_metric  # noqa: E402
from onnxws.scoring import Scorer  # noqa: E402


def kmeans_per_tensor(bits: int) -> Callable[[np.ndarray, WeightInfo], np.ndarray]:
    """Every value replaced by its nearest of the ``2**bits`` optimal 1-D k-means centroids of its tensor."""

    def share(values: np.ndarray, info: WeightInfo) -> np.ndarray:
        return share_weight(info.name, values, 2 ** bits).decode().astype(values.dtype)

    return share


def fp16(values: np.ndarray, info: WeightInfo) -> np.ndarray:
    return values.astype(np.float16).astype(values.dtype)


def linear_per_channel(bits: int) -> Callable[[np.ndarray, WeightInfo], np.ndarray]:
    """Symmetric linear quantisation to ``bits`` with one scale (max |w| / (2**(bits-1) - 1)) per output channel."""
    levels = 2 ** (bits - 1) - 1

    def quantise(values: np.ndarray, info: WeightInfo) -> np.ndarray:
        flat = values.ndim < 2  # one channel
        moved = values.reshape(1, -1) if flat else np.moveaxis(values, info.channel_axis, 0)
        rows = moved.reshape(moved.shape[0], -1)
        scale = np.abs(rows).max(axis=1, keepdims=True) / levels
        scale[scale == 0] = 1.0
        out = (np.clip(np.round(rows / scale), -levels, levels) * scale).astype(values.dtype).reshape(moved.shape)
        return out.reshape(values.shape) if flat else np.moveaxis(out, 0, info.channel_axis)

    return quantise


FORMATS: dict[str, tuple[Callable[[np.ndarray, WeightInfo], np.ndarray], float]] = {
    "fp16": (fp16, 2.0),
    "int8 per-channel": (linear_per_channel(8), 4.0),
    "int4 per-channel": (linear_per_channel(4), 8.0),
    "k-means 6-bit per-tensor": (kmeans_per_tensor(6), 32 / 6),  # nominal; the result's ratio counts the codebooks
}
CODEBOOK_BITS = {"k-means 6-bit per-tensor": (6, 64)}  # index bits, values per tensor


def reference(model_path: Path, data_path: Path, metric_spec: str | None) -> dict:
    """Full-set metric of the model with each reference format applied to every shareable weight."""
    proto = load_model(model_path)
    config = CompressConfig.from_dict({})
    data = load_data(data_path, proto)
    metric = resolve_metric(metric_spec, data, proto, None)
    weights = find_weights(proto, config.settings_for).weights
    with Scorer(proto, [w.name for w in weights], data, metric, device="cpu", cache=None) as scorer:
        baseline = scorer.baseline_full
        originals = scorer.originals
        result = {"baseline": baseline, "n_full": scorer.n_full, "weights": len(weights),
                  "params": int(sum(w.params for w in weights)), "formats": {}}
        for name, (transform, ratio) in FORMATS.items():
            t0 = time.perf_counter()
            candidate = {w.name: transform(originals[w.name], w) for w in weights}
            value = scorer.score([candidate], subset="full")[0]
            if name in CODEBOOK_BITS:
                bits, k = CODEBOOK_BITS[name]
                params = sum(w.params for w in weights)
                ratio = 32 * params / (bits * params + 32 * k * len(weights))
            result["formats"][name] = {"value": value, "loss_pp": 100 * (baseline - value), "ratio": ratio,
                                       "seconds": round(time.perf_counter() - t0, 1)}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, default=Path.home() / ".cache" / "onnxws-zoo")
    parser.add_argument("--out", type=Path, default=Path("/tmp/zoo-results"))
    parser.add_argument("--models", default="", help="comma-separated subset of the zoo (default: all)")
    args = parser.parse_args()
    zoo, out = args.zoo.expanduser().resolve(), args.out.expanduser().resolve()
    only = [m.strip() for m in args.models.split(",") if m.strip()]
    out.mkdir(parents=True, exist_ok=True)
    for meta_path in sorted(zoo.glob("*.json")):
        name = meta_path.stem
        if (only and name not in only) or not (zoo / f"{name}.onnx").exists():
            continue
        meta = json.loads(meta_path.read_text())
        result = reference(zoo / f"{name}.onnx", zoo / f"{name}.npz", meta.get("metric_spec"))
        (out / f"{name}.reference.json").write_text(json.dumps(result, indent=1) + "\n")
        losses = ", ".join(f"{f} {v['loss_pp']:.2f} pp" for f, v in result["formats"].items())
        print(f"{name}: baseline {100 * result['baseline']:.2f} % on {result['n_full']} samples; {losses}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
