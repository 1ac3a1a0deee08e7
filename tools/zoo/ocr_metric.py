"""Exact-match accuracy of a CTC text recogniser (RapidOCR's PP-OCRv4 rec model) for onnxws.

    onnxws compress ppocr_rec.onnx --data ppocr_rec.npz --metric tools.zoo.ocr_metric:exact_match

Run from the repository root (or with it on ``PYTHONPATH``) so ``tools.zoo`` imports. Needs only
numpy: the character dictionary (``ppocr_rec_keys.txt`` beside this file, 6,623 characters, the
one stored in the model's ``character`` metadata; checked by ``tools/zoo/build.py``) is read
once and cached.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

KEYS = Path(__file__).with_name("ppocr_rec_keys.txt")


@lru_cache(maxsize=1)
def characters() -> tuple[str, ...]:
    """The recogniser's classes: ``"blank"`` (index 0), the 6,623 dictionary characters, then ``" "``.

    Same order as RapidOCR's ``CTCLabelDecode``: blank inserted first, space appended last.
    """
    lines = KEYS.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return ("blank", *lines, " ")


def decode(probs: np.ndarray) -> list[str]:
    """Greedy CTC decoding, as RapidOCR does it: argmax per step, merge repeats, drop blanks.

    Args:
        probs: [N, T, C] per-step class scores (softmax or logits; only the argmax is used),
            C = ``len(characters())`` = 6,625.

    Returns:
        N strings.

    Raises:
        ValueError: ``probs`` is not 3-D or its class axis does not match the dictionary.
    """
    chars = characters()
    if probs.ndim != 3 or probs.shape[2] != len(chars):
        raise ValueError(f"recogniser output has shape {probs.shape}; expected [N, T, {len(chars)}] "
                         f"(samples, time steps, classes of {KEYS.name} plus blank and space)")
    index = probs.argmax(axis=2)  # [N, T]
    keep = np.ones(index.shape, dtype=bool)
    keep[:, 1:] = index[:, 1:] != index[:, :-1]
    keep &= index != 0
    return ["".join(chars[i] for i in row[mask]) for row, mask in zip(index, keep)]


def exact_match(outputs: list[np.ndarray], data: dict[str, np.ndarray]) -> float:
    """Fraction of text lines read exactly: decoded string == ``data["text"]``, both stripped.

    Leading and trailing spaces are ignored (the model often emits a space at a line's edge);
    spaces between words, case, digits and punctuation all count.

    Args:
        outputs: the model's outputs, concatenated over the samples; ``outputs[0]`` is [N, T, 6625].
        data: the evaluation arrays; ``text`` is a unicode array [N] of the rendered lines.

    Returns:
        Exact-match accuracy in [0, 1], higher is better.

    Raises:
        ValueError: no ``text`` array, or its length differs from the outputs'.
    """
    if "text" not in data:
        raise ValueError(f"exact_match needs the ground-truth lines as a unicode array 'text' in the data; "
                         f"found {sorted(data)}")
    texts = data["text"]
    decoded = decode(np.asarray(outputs[0]))
    if len(decoded) != len(texts):
        raise ValueError(f"{len(decoded)} decoded lines but {len(texts)} entries in 'text'; one line per sample expected")
    return float(np.mean([got.strip() == str(want).strip() for got, want in zip(decoded, texts)]))
