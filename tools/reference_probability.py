"""expected_accuracy as a custom metric, for comparing commits that predate the built-in one.

Issue 22 compares run times against an older commit "under the new default metric". Commits
before the built-in ``expected_accuracy`` cannot compute it (their custom metrics do not receive
the uncompressed model's outputs), so this tool stores those outputs' probabilities in the data
and offers the same metric as a ``module:function`` that reads them:

    python tools/reference_probability.py MODEL.onnx DATA.npz OUT.npz
    onnxws compress MODEL.onnx --data OUT.npz --metric tools.reference_probability:expected_accuracy

(run from the repository root, or with it on PYTHONPATH). ``OUT.npz`` is ``DATA.npz`` plus
``reference_probability`` [samples, classes] float64: the softmax of the model's first output
(or the output itself where it already holds probabilities), computed as onnxws's built-in metric
computes it, so both give the same numbers on the same outputs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

REFERENCE_PROBABILITY = "reference_probability"


def probabilities(scores: np.ndarray) -> np.ndarray:
    """[samples, classes] float64 probabilities: a softmax of logits, or the scores themselves."""
    from onnxws.metrics import log_normaliser

    scores = np.asarray(scores).reshape(len(scores), -1)
    normaliser = log_normaliser(scores)
    if normaliser is None:
        return scores.astype(np.float64)
    return np.exp(scores.astype(np.float64) - normaliser[:, None])


def expected_accuracy(outputs: list[np.ndarray], data: dict[str, np.ndarray]) -> float:
    """Mean over samples of the uncompressed model's probability of the compressed model's top-1 class."""
    scores = np.asarray(outputs[0]).reshape(len(outputs[0]), -1)
    reference = data[REFERENCE_PROBABILITY]
    return float(np.take_along_axis(reference, scores.argmax(axis=1)[:, None], axis=1).mean())


def main() -> int:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--batch", type=int, default=50)
    args = parser.parse_args()
    arrays = dict(np.load(args.data))
    session = ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    count = len(arrays[names[0]])
    first = [session.run(None, {n: arrays[n][s:s + args.batch] for n in names})[0]
             for s in range(0, count, args.batch)]
    arrays[REFERENCE_PROBABILITY] = probabilities(np.concatenate(first))
    np.savez(args.out, **arrays)
    print(f"{args.out}: {count} samples, {arrays[REFERENCE_PROBABILITY].shape[1]} classes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
