"""ImageNet classifiers of the zoo: in-graph preprocessing and the checks run on their photographs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tools.zoo import common

# ImageNet classes of the photographs whose subject is unambiguous: a wrong weight load or a
# wrong preprocessing shows up here first.
EXPECTED = {
    "skimage.chelsea": {281, 282, 285, 287},  # tabby, tiger cat, Egyptian cat, lynx
    "skimage.coffee": {504, 967, 968},  # coffee mug, espresso, cup
}


class ImagePreprocess(nn.Module):
    """uint8 NHWC RGB [N, 224, 224, 3] -> ``(x - mean) / std`` float NCHW, inside the graph.

    Exported as Cast, Transpose, Sub, Div in front of the network, so the evaluation data is
    stored as uint8 (150 KB a photograph instead of 602 KB as float32).
    """

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.to(torch.float32).permute(0, 3, 1, 2)
        return self.net((x - self.mean) / self.std)


def export_and_check(wrapped: nn.Module, path: Path, images: np.ndarray, sources: list[str]) -> dict[str, Any]:
    """Export an ``ImagePreprocess``-wrapped classifier and measure it on ``images`` in ORT.

    Returns the metadata every image model records: parameters, graph summary, torch-vs-ORT
    difference, prediction statistics (how varied and how confident the fp32 top-1 is, which is
    what top-1 agreement can resolve) and the centre-crop classes of unambiguous photographs.

    Raises:
        SystemExit: a photograph in ``EXPECTED`` is not classified as expected (wrong weights or
            preprocessing).
    """
    model = common.export_torch(wrapped, path, torch.zeros(1, 224, 224, 3, dtype=torch.uint8), "image")
    session = common.ort_session(path)
    logits = common.run_batched(session, {"image": images})[0]
    with torch.no_grad():
        ref = wrapped.eval()(torch.from_numpy(images[:32])).numpy()
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    top2 = np.sort(probs, axis=1)[:, -2:]
    top1 = logits.argmax(1)
    centre = {src: int(top1[i]) for i, src in enumerate(sources) if i < len(set(sources))}
    for src, allowed in EXPECTED.items():
        if src in centre and centre[src] not in allowed:
            raise SystemExit(f"{path.name}: the centre crop of {src} is class {centre[src]}, expected one of "
                             f"{sorted(allowed)}: the weights or the preprocessing are wrong")
    return {
        "params": common.count_params(model),
        "graph": common.graph_summary(model),
        "inputs": int(len(images)),
        "metric": "top1_agreement (no labels: top-1 agreement with this fp32 model)",
        "baseline": 1.0,
        "torch_vs_ort_max_abs_diff": float(np.max(np.abs(ref - logits[:32]))),
        "distinct_top1_classes": int(len(np.unique(top1))),
        "mean_top1_probability": round(float(top2[:, 1].mean()), 4),
        "fraction_top1_top2_gap_below_0.05": round(float(np.mean(top2[:, 1] - top2[:, 0] < 0.05)), 4),
        "centre_crop_top1": centre,
        "top1": top1,
    }
