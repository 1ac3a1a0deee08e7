"""RapidOCR's PP-OCRv4 text recogniser (a Paddle model converted to ONNX) with rendered text lines.

The model ships inside the PyPI wheel ``rapidocr-onnxruntime`` (Apache-2.0), installed with
``--no-deps`` so it brings no second onnxruntime (nor opencv). It is copied as it is: opset 12,
every weight in a ``Constant`` node (no initializers), input ``x`` float32 [N, 3, 48, W] with a
dynamic width, output ``softmax_11.tmp_0`` [N, W/8, 6625] (CTC over blank + 6,623 characters +
space; the dictionary is the model's ``character`` metadata).

Evaluation lines are rendered with PIL and preprocessed as ``TextRecognizer.resize_norm_img``
does: BGR (as cv2 loads), resized to height 48 keeping the aspect ratio, scaled to [-1, 1],
zero-padded on the right to the fixed width 320 (``rec_img_shape`` [3, 48, 320]; a line wider
than 320/48 is redrawn, so every sample has the same width and batches concatenate). PIL's
bilinear filter stands in for cv2.resize's.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from tools.zoo import common, ocr_metric

PACKAGE = "rapidocr-onnxruntime==1.4.4"
MODEL = "ch_PP-OCRv4_rec_infer.onnx"
HEIGHT, WIDTH = 48, 320
# Fonts tried in this order (Debian: fonts-dejavu-core, fonts-liberation); PIL's bundled Aileron
# is always added, so the lines render on a machine without system fonts too.
FONTS = ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf",
         "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf",
         "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
         "/usr/share/fonts/truetype/liberation/LiberationSerif-Regular.ttf")
PIL_FONT = "PIL bundled Aileron Regular"


def model_path() -> Path:
    return common.packaged_file("rapidocr_onnxruntime", "models", MODEL, what="RapidOCR is", package=PACKAGE)


def vocabulary() -> list[str]:
    """The distinct words of the Zen of Python (stdlib ``this``, rot13-encoded there), lower case."""
    import sys

    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the poem
        this = sys.modules.get("this") or __import__("this")
    zen = codecs.decode(this.s, "rot13")
    return sorted({w.strip(".,!*-'").lower() for w in zen.split() if w.strip(".,!*-'").isalpha()})


def random_line(rng: np.random.Generator, words: list[str]) -> str:
    """One line: an integer, a decimal, a date, or 1-2 words (lower, Title or UPPER case) and maybe a number."""
    kind = int(rng.integers(0, 6))
    if kind == 0:
        return str(rng.integers(0, 10 ** int(rng.integers(1, 7))))
    if kind == 1:
        return f"{rng.integers(1, 999)}.{rng.integers(0, 100):02d}"
    if kind == 2:
        return f"{rng.integers(2000, 2030)}-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}"
    picked = [words[i] for i in rng.integers(0, len(words), int(rng.integers(1, 3)))]
    case = int(rng.integers(0, 3))
    picked = [w.title() if case == 1 else w.upper() if case == 2 else w for w in picked]
    if kind == 3:
        picked.append(str(rng.integers(1, 100)))
    return " ".join(picked)


def render(text: str, font: str | None, rng: np.random.Generator) -> np.ndarray:
    """A tight text-line crop, as a detector would hand it over: dark text on a light plain background, RGB uint8."""
    from PIL import Image, ImageDraw, ImageFont

    size = int(rng.integers(26, 40))
    face = ImageFont.truetype(font, size) if font else ImageFont.load_default(size=size)
    left, top, right, bottom = face.getbbox(text)
    pad = int(rng.integers(4, 12))
    width, height = right - left + 2 * pad, int(size * 1.5)
    background, ink = int(rng.integers(215, 256)), int(rng.integers(0, 70))
    img = Image.new("RGB", (width, height), (background,) * 3)
    ImageDraw.Draw(img).text((pad - left, (height - (bottom - top)) // 2 - top), text, font=face, fill=(ink,) * 3)
    return np.asarray(img)


def preprocess(rgb: np.ndarray) -> np.ndarray:
    """RapidOCR's ``resize_norm_img`` for a fixed width 320: float32 [3, 48, 320] in [-1, 1], zero-padded."""
    from PIL import Image

    bgr = np.ascontiguousarray(rgb[..., ::-1])
    h, w = bgr.shape[:2]
    resized_w = min(WIDTH, math.ceil(HEIGHT * w / h))
    resized = np.asarray(Image.fromarray(bgr).resize((resized_w, HEIGHT), Image.BILINEAR), dtype=np.float32)
    resized = (resized.transpose(2, 0, 1) / 255 - 0.5) / 0.5
    out = np.zeros((3, HEIGHT, WIDTH), dtype=np.float32)
    out[:, :, :resized_w] = resized
    return out


def make_lines(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``n`` rendered lines: x float32 [n, 3, 48, 320], text unicode [n], and the fonts used (in turn)."""
    rng = np.random.default_rng(seed)
    words = vocabulary()
    fonts: list[str | None] = [f for f in FONTS if Path(f).exists()] + [None]
    xs, texts = [], []
    while len(texts) < n:
        text = random_line(rng, words)
        rgb = render(text, fonts[len(texts) % len(fonts)], rng)
        if rgb.shape[1] / rgb.shape[0] > WIDTH / HEIGHT:
            continue  # wider than the fixed input: RapidOCR would widen the batch; draw another line
        xs.append(preprocess(rgb))
        texts.append(text)
    return np.stack(xs), np.array(texts, dtype=str), [f or PIL_FONT for f in fonts]


def check_dictionary(model: onnx.ModelProto) -> None:
    """The committed dictionary must be the model's ``character`` metadata, else the metric misreads classes."""
    meta = {p.key: p.value for p in model.metadata_props}
    if "character" not in meta:
        raise SystemExit(f"{MODEL} has no 'character' metadata; cannot check {ocr_metric.KEYS}")
    shipped = meta["character"].splitlines()
    committed = list(ocr_metric.characters()[1:-1])
    if shipped != committed:
        raise SystemExit(f"{ocr_metric.KEYS} ({len(committed)} characters) differs from the model's dictionary "
                         f"({len(shipped)}); rewrite it from the model's 'character' metadata")


def build(out: Path, n: int = 300, seed: int = 0) -> dict[str, Any]:
    """Copy the recogniser to ``out/ppocr_rec.onnx`` and write ``out/ppocr_rec.npz`` (``x``, ``text``)."""
    source = model_path()
    target = out / "ppocr_rec.onnx"
    shutil.copyfile(source, target)
    model = onnx.load(str(target))
    check_dictionary(model)
    x, text, fonts = make_lines(n, seed)
    np.savez_compressed(out / "ppocr_rec.npz", x=x, text=text)
    probs = common.run_batched(common.ort_session(target), {"x": x}, batch=50)[0]
    baseline = ocr_metric.exact_match([probs], {"text": text})
    return {
        "origin": f"RapidOCR's PP-OCRv4 Chinese+English text-line recogniser {MODEL} (PaddleOCR model converted by "
                  f"paddle2onnx), copied unchanged from the PyPI wheel {PACKAGE}",
        "licence": "Apache-2.0 (RapidOCR and PaddleOCR); rendered text: words of the Zen of Python (PSF licence) and "
                   "random numbers",
        "input": f"x float32 [N, 3, {HEIGHT}, {WIDTH}] (model: [N, 3, 48?, W] dynamic), BGR scaled to [-1, 1], "
                 "right-padded with 0",
        "output": f"{model.graph.output[0].name} float32 [N, {WIDTH // 8}, 6625] (softmax over CTC classes)",
        "params": common.count_params(model),
        "graph": common.graph_summary(model),
        "inputs": int(n),
        "distinct_lines": int(len(set(text.tolist()))),
        "fonts": fonts,
        "metric": "tools.zoo.ocr_metric:exact_match (greedy CTC decode with the model's dictionary, line == text, "
                  "edges stripped)",
        "metric_spec": "tools.zoo.ocr_metric:exact_match",
        "baseline": baseline,
        "output_bytes_per_sample": int(probs[0].nbytes),
    }
