"""How a default ``onnxws compress`` run grows with model size: ResNet-shaped models of several sizes.

    python tools/bench_size.py --out /tmp/bench-size [--zoo ~/.cache/onnxws-zoo] [--sizes resnet18,resnet34,resnet50]
                               [--images 100] [--resolution 224] [--onnxws .venv/bin/onnxws]

No trained ResNet-50 ships offline (no PyPI wheel or Debian package carries its weights), so the
models are built here with ResNet's layer shapes (torchvision's ResNet-18/34 basic blocks,
ResNet-50 bottlenecks; batch norm folded into the convolutions, as exported for inference) and
weight statistics like those of trained, BN-folded convolutions rather than a plain Gaussian:

- heavy tails: each weight Laplace-distributed (trained conv weights are peaked at zero with long
  tails, which is what makes a few shared values hold);
- per-output-channel scales spread log-normally (sigma 0.5): a folded batch norm multiplies each
  output channel by its own gamma / sigma;
- each residual branch's last convolution scaled down (0.2), as trained residual nets keep the
  branch small against the identity (and the signal stays finite through 16 blocks);
- a classifier centred on the data (its bias cancels the logits' mean over the images, so the
  class follows the image rather than one class winning everywhere) and scaled so that the
  model's mean top-1 probability on the data is about 0.55 (MobileNetV2's on the zoo's views):
  ``expected_accuracy`` then sees a model about as sure of itself as a real one.

The data: the first ``--images`` views of the zoo's photographs (``ZOO/mobilenetv2.npz``, uint8
NHWC, ImageNet preprocessing in the graph) when ``--zoo`` is given, else smooth random images.
Each model is compressed by the installed ``onnxws compress MODEL --loss 1 --no-cache`` with every
other option at its default (no time budget); the table gives parameters, seconds per stage,
scorings (run / stopped early) and the answer, one row per size, and is written to
``OUT/size_results.md``. The weights are not a trained model's: the losses and ratios say how the
search behaves on these shapes, not what a trained ResNet-50 would reach; the times and scorings
are the point.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
SIZES = {  # name -> (block kind, blocks per stage)
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}
CHANNEL_SIGMA = 0.5  # log-normal spread of the per-output-channel scales (folded batch norm)
BRANCH_SCALE = 0.2  # the last convolution of each residual branch
TARGET_CONFIDENCE = 0.55  # mean top-1 probability the classifier is scaled to
MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255


class ResNetBuilder:
    """A ResNet-shaped ONNX graph with BN-folded, trained-like weight statistics (module docstring)."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def weight(self, shape: tuple[int, ...], gain: float = 1.0) -> np.ndarray:
        fan_in = int(np.prod(shape[1:]))
        laplace = self.rng.laplace(0.0, 1.0 / np.sqrt(2.0), size=shape)  # unit variance
        channel = np.exp(self.rng.normal(-CHANNEL_SIGMA ** 2 / 2, CHANNEL_SIGMA, size=(shape[0],) + (1,) * (len(shape) - 1)))
        return (laplace * channel * gain * np.sqrt(2.0 / fan_in)).astype(np.float32)

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, relu: bool = True, gain: float = 1.0) -> str:
        self.count += 1
        name = f"conv{self.count}"
        self.inits.append(numpy_helper.from_array(self.weight((cout, cin, k, k), gain), f"{name}.weight"))
        self.inits.append(numpy_helper.from_array((self.rng.standard_normal(cout) * 0.05).astype(np.float32), f"{name}.bias"))
        self.nodes.append(helper.make_node("Conv", [x, f"{name}.weight", f"{name}.bias"], [f"{name}.out"],
                                           kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4))
        y = f"{name}.out"
        if relu:
            self.nodes.append(helper.make_node("Relu", [y], [y + ".relu"]))
            y += ".relu"
        return y

    def add_relu(self, a: str, b: str) -> str:
        self.count += 1
        y = f"add{self.count}"
        self.nodes += [helper.make_node("Add", [a, b], [y]), helper.make_node("Relu", [y], [y + ".relu"])]
        return y + ".relu"

    def build(self, kind: str, blocks: tuple[int, ...], classes: int = 1000) -> onnx.ModelProto:
        self.inits += [numpy_helper.from_array(MEAN.reshape(1, 3, 1, 1), "mean"),
                       numpy_helper.from_array(STD.reshape(1, 3, 1, 1), "std")]
        self.nodes += [helper.make_node("Cast", ["image"], ["image_f"], to=TensorProto.FLOAT),
                       helper.make_node("Transpose", ["image_f"], ["nchw"], perm=[0, 3, 1, 2]),
                       helper.make_node("Sub", ["nchw", "mean"], ["centred"]),
                       helper.make_node("Div", ["centred", "std"], ["x0"])]
        x = self.conv("x0", 3, 64, 7, 2)
        self.nodes.append(helper.make_node("MaxPool", [x], ["pool0"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4))
        x, cin = "pool0", 64
        expansion = 4 if kind == "bottleneck" else 1
        for stage, (width, n) in enumerate(zip((64, 128, 256, 512), blocks)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                if kind == "bottleneck":
                    y = self.conv(x, cin, width, 1)
                    y = self.conv(y, width, width, 3, stride)
                    y = self.conv(y, width, width * 4, 1, relu=False, gain=BRANCH_SCALE)
                else:
                    y = self.conv(x, cin, width, 3, stride)
                    y = self.conv(y, width, width, 3, relu=False, gain=BRANCH_SCALE)
                cout = width * expansion
                shortcut = self.conv(x, cin, cout, 1, stride, relu=False) if (stride != 1 or cin != cout) else x
                x, cin = self.add_relu(y, shortcut), cout
        self.nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"]), helper.make_node("Flatten", ["gap"], ["features"])]
        self.inits.append(numpy_helper.from_array(self.weight((classes, cin)), "fc.weight"))
        self.inits.append(numpy_helper.from_array(np.zeros(classes, np.float32), "fc.bias"))
        self.nodes.append(helper.make_node("Gemm", ["features", "fc.weight", "fc.bias"], ["logits"], transB=1))
        graph = helper.make_graph(self.nodes, "resnet", [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", "H", "W", 3])],
                                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        onnx.checker.check_model(model, full_check=True)
        return model


def calibrate_classifier(model: onnx.ModelProto, images: np.ndarray) -> float:
    """Centre the classifier on ``images`` (its bias cancels the logits' mean over the images, which
    random deep features make one class dominate) and scale it so that the mean top-1 probability
    is about ``TARGET_CONFIDENCE``; returns the scale applied."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = np.concatenate([session.run(None, {"image": images[i:i + 50]})[0] for i in range(0, len(images), 50)])
    bias = -logits.astype(np.float64).mean(axis=0)  # the fc bias is zero as built
    logits = logits.astype(np.float64) + bias

    def confidence(scale: float) -> float:
        z = logits * scale
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return float((p.max(axis=1) / p.sum(axis=1)).mean())

    lo, hi = 1e-3, 1e3
    for _ in range(60):  # bisection in log space: confidence grows with the scale
        mid = np.sqrt(lo * hi)
        lo, hi = (mid, hi) if confidence(mid) < TARGET_CONFIDENCE else (lo, mid)
    scale = float(np.sqrt(lo * hi))
    for tensor in model.graph.initializer:
        if tensor.name == "fc.weight":
            tensor.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(tensor) * scale).astype(np.float32), "fc.weight"))
        elif tensor.name == "fc.bias":
            tensor.CopyFrom(numpy_helper.from_array((bias * scale).astype(np.float32), "fc.bias"))
    return scale


def load_images(zoo: Path | None, count: int, resolution: int, seed: int = 0) -> np.ndarray:
    """uint8 [count, resolution, resolution, 3]: the zoo's photograph views, or smooth random images."""
    if zoo is not None:
        views = np.load(zoo / "mobilenetv2.npz")["image"][:count]
        if views.shape[1] != resolution:  # nearest-neighbour resize, enough for a timing benchmark
            idx = np.arange(resolution) * views.shape[1] // resolution
            views = views[:, idx][:, :, idx]
        return np.ascontiguousarray(views)
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (count, 8, 8, 3)).astype(np.float32)
    idx = np.arange(resolution) * 8 // resolution
    return coarse[:, idx][:, :, idx].astype(np.uint8)


def run_size(name: str, out: Path, images: np.ndarray, onnxws: str, seed: int) -> dict:
    """Build, calibrate and compress one size; the row of the table."""
    kind, blocks = SIZES[name]
    model = ResNetBuilder(seed).build(kind, blocks)
    scale = calibrate_classifier(model, images)
    path = out / f"{name}.onnx"
    onnx.save(model, path)
    np.savez(out / f"{name}.npz", image=images)
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.name.endswith(".weight"))
    command = [onnxws, "compress", str(path), "--loss", "1", "--no-cache", "--force", "-o", str(out / f"{name}.ws.onnx")]
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    row = {"model": name, "params": params, "classifier_scale": scale, "wall_s": wall, "rc": done.returncode,
           "command": " ".join(command)}
    report_path = out / f"{name}.ws.report" / "report.json"
    if done.returncode != 0 or not report_path.exists():
        row["error"] = (done.stderr.strip().splitlines() or ["?"])[-1]
        return row
    report = json.loads(report_path.read_text())
    e, c, f = report["exploration"], report["compression"], report["final"]
    row.update(seconds=e["seconds"], scorings=e["scorings"], scorings_run=e["scorings_run"],
               stopped_early=e.get("scorings_stopped_early"), by_stage=e["scorings_by_stage"], stopped_by=e["stopped_by"],
               loss=f["loss"], ratio=c["ratio_theoretical"], ratio_whole=c["ratio_whole_theoretical"],
               n_search=report["data"].get("n_search"), n_full=report["data"].get("n_full"))
    return row


def table(rows: list[dict], header: str) -> str:
    lines = [header, "", "| model | params | samples (search / full) | total s | layer s | refine s | network s | "
             "scorings (run, stopped early) | s per scoring run | loss | CR shared / whole | stopped by |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['params']:,} | | failed (rc {r['rc']}): {r['error'][:120]} |" + " |" * 8)
            continue
        s = r["seconds"]
        lines.append(f"| {r['model']} | {r['params']:,} | {r['n_search']} / {r['n_full']} | {s['total']:.0f} | {s.get('layer', 0):.0f} | "
                     f"{s.get('refine', 0):.0f} | {s.get('network', 0):.0f} | {r['scorings']} ({r['scorings_run']}, "
                     f"{r['stopped_early']}) | {s['total'] / max(r['scorings_run'], 1):.2f} | {r['loss']:.2f} | "
                     f"{r['ratio']:.2f}x / {r['ratio_whole']:.2f}x | {r['stopped_by']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-size"))
    parser.add_argument("--zoo", type=Path, default=None, help="the zoo folder (tools/zoo/build.py): its photograph views")
    parser.add_argument("--sizes", default="resnet18,resnet34,resnet50")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--onnxws", default=shutil.which("onnxws") or str(ROOT / ".venv" / "bin" / "onnxws"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    images = load_images(args.zoo, args.images, args.resolution, args.seed)
    rows = []
    for name in args.sizes.split(","):
        print(f"{name}: building and compressing ...", flush=True)
        rows.append(run_size(name, args.out, images, args.onnxws, args.seed))
        print(json.dumps(rows[-1], default=str), flush=True)
        (args.out / "size_rows.json").write_text(json.dumps(rows, indent=1, default=str))
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    header = (f"Measured {dt.datetime.now():%Y-%m-%d %H:%M}, commit {commit}, {platform.processor() or platform.machine()}, "
              f"onnxruntime {ort.__version__}, {len(images)} images at {args.resolution}x{args.resolution} "
              f"({'zoo views' if args.zoo else 'random images'}); `onnxws compress MODEL --loss 1 --no-cache` (defaults otherwise)")
    text = table(rows, header)
    (args.out / "size_results.md").write_text(text)
    print(text)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
