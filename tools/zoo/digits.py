"""Sequence models trained here on scikit-learn's bundled digits: an LSTM and a small transformer.

Each 8x8 digit is a sequence of its 8 rows (8 features a step). The split is fixed (seed 0:
1,300 train, 497 test) and training is deterministic on one CPU thread. They give the zoo an
``LSTM`` op (W/R/B weights in ONNX's gate layout) and transformer ``MatMul`` weights
(attention and MLP projections, exported as MatMul + Add on 3-D activations) with real labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tools.zoo import common

SPLIT = 1300


def digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): x float32 [n, 8, 8] in [0, 1], y int64 [n]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    train, test = order[:SPLIT], order[SPLIT:]
    return x[train], y[train], x[test], y[test]


def train(net: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, lr: float, seed: int = 0) -> nn.Module:
    """Adam, cross-entropy, batches of 64 in a seeded order; returns ``net`` in eval mode."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    rng = np.random.default_rng(seed)
    net.train()
    for _ in range(epochs):
        perm = torch.from_numpy(rng.permutation(len(x)))
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(net(xt[idx]), yt[idx]).backward()
            opt.step()
        sched.step()
    return net.eval()


class DigitsLSTM(nn.Module):
    """LSTM(8 -> 128) over the rows, Linear(128 -> 10) on the last step."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class Block(nn.Module):
    """Pre-norm transformer encoder block with explicit attention (exports as plain MatMul/Softmax)."""

    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp)
        self.fc2 = nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5, dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(n, t, d))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class DigitsTransformer(nn.Module):
    """Rows embedded (Linear 8 -> 64 + learned positions), 2 blocks (4 heads, MLP 128), mean-pooled, Linear -> 10."""

    def __init__(self, dim: int = 64, depth: int = 2, heads: int = 4, mlp: int = 128) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.pos = nn.Parameter(torch.zeros(1, 8, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.embed(x) + self.pos)
        return self.head(self.norm(x).mean(1))


def _build(name: str, net: nn.Module, out: Path, epochs: int, lr: float, origin: str) -> dict[str, Any]:
    x_train, y_train, x_test, y_test = digits_split()
    train(net, x_train, y_train, epochs, lr)
    path = out / f"{name}.onnx"
    model = common.export_torch(net, path, torch.zeros(1, 8, 8), "rows")
    np.savez(out / f"{name}.npz", rows=x_test, y=y_test)
    logits = common.run_batched(common.ort_session(path), {"rows": x_test})[0]
    with torch.no_grad():
        ref = net(torch.from_numpy(x_test)).numpy()
    return {
        "origin": origin,
        "licence": "code: this repository; digits: UCI ML hand-written digits (CC BY 4.0) as shipped by scikit-learn",
        "input": "rows float32 [N, 8, 8] (the 8 rows of an 8x8 digit, pixel / 16)",
        "output": "logits float32 [N, 10]",
        "params": common.count_params(model),
        "graph": common.graph_summary(model),
        "inputs": int(len(x_test)),
        "metric": "top1_accuracy (labels y)",
        "baseline": float(np.mean(logits.argmax(1) == y_test)),
        "torch_vs_ort_max_abs_diff": float(np.max(np.abs(ref - logits))),
    }


def build_lstm(out: Path) -> dict[str, Any]:
    return _build("digits_lstm", DigitsLSTM(), out, epochs=60, lr=3e-3,
                  origin="LSTM(8->128) + Linear(128->10) trained by tools/zoo/digits.py on scikit-learn's digits "
                         f"({SPLIT} train / 497 test, rows as time steps), Adam 3e-3 cosine, 60 epochs, seed 0")


def build_transformer(out: Path) -> dict[str, Any]:
    return _build("digits_transformer", DigitsTransformer(), out, epochs=80, lr=2e-3,
                  origin="2-block pre-norm transformer (dim 64, 4 heads, MLP 128) trained by tools/zoo/digits.py on "
                         f"scikit-learn's digits ({SPLIT} train / 497 test, rows as tokens), Adam 2e-3 cosine, "
                         "80 epochs, seed 0")
