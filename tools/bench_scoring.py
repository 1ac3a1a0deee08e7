"""Benchmark of the scoring engines: time per candidate vs a plain forward of the model.

For each model it prints, side by side, the plain ONNX Runtime forward of the original
model over the search subset (a normal ``InferenceSession``, same samples, same batch
size) and the time per candidate of each scoring engine, as ratios. Medians of
``--repeats`` runs, ORT intra-op threads pinned (``--threads``).

Models: LeNet-5 (``models/lenet5/model.onnx`` + ``eval.npz`` if present, else a LeNet-5
with random weights on random images) and large ones built here with random weights
(ResNet-50-shaped, MobileNetV2-shaped; 224x224, a few images, so it stays quick).

Candidates are "network-stage" ones (every shareable weight changed: the worst case,
one candidate per ``score`` call) and "layer-stage" ones (one weight changed): a round
scores one candidate per layer in one ``score`` call, as the layer search does, and the
time per candidate is the round's time / its candidates. The first (warm-up) round of the
layer stage also pays for the cached prefix activations; its time is printed too.

    .venv/bin/python tools/bench_scoring.py                 # LeNet-5 + MobileNetV2 + ResNet-50
    .venv/bin/python tools/bench_scoring.py --models lenet --repeats 9
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxws.data import EvalData, load_data  # noqa: E402
from onnxws.metrics import resolve_metric  # noqa: E402
from onnxws.data import concat_outputs, plan_batches  # noqa: E402
from onnxws.scoring import Scorer  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Models with random weights (onnx.helper; built in well under a second)


class _Builder:
    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, group: int = 1, act: str | None = "relu") -> str:
        self.count += 1
        name = f"conv{self.count}"
        fan = cin // group * k * k
        w = self.rng.standard_normal((cout, cin // group, k, k), dtype=np.float32) * np.float32(np.sqrt(2.0 / fan))
        self.inits.append(numpy_helper.from_array(w, f"{name}.weight"))
        self.inits.append(numpy_helper.from_array(self.rng.standard_normal(cout, dtype=np.float32) * np.float32(0.01), f"{name}.bias"))
        pad = k // 2
        self.nodes.append(helper.make_node("Conv", [x, f"{name}.weight", f"{name}.bias"], [f"{name}.out"], kernel_shape=[k, k],
                                           strides=[stride, stride], pads=[pad] * 4, group=group))
        y = f"{name}.out"
        if act == "relu":
            self.nodes.append(helper.make_node("Relu", [y], [y + ".act"]))
            y += ".act"
        elif act == "relu6":
            self.nodes.append(helper.make_node("Clip", [y, "zero", "six"], [y + ".act"]))
            y += ".act"
        return y

    def add(self, a: str, b: str, relu: bool) -> str:
        self.count += 1
        y = f"add{self.count}"
        self.nodes.append(helper.make_node("Add", [a, b], [y]))
        if relu:
            self.nodes.append(helper.make_node("Relu", [y], [y + ".act"]))
            y += ".act"
        return y

    def head(self, x: str, cin: int, classes: int = 1000) -> None:
        self.nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"]))
        self.nodes.append(helper.make_node("Flatten", ["gap"], ["flat"]))
        w = self.rng.standard_normal((classes, cin), dtype=np.float32) / np.float32(np.sqrt(cin))
        self.inits.append(numpy_helper.from_array(w, "fc.weight"))
        self.inits.append(numpy_helper.from_array(np.zeros(classes, np.float32), "fc.bias"))
        self.nodes.append(helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], transB=1))

    def model(self, name: str, res: int, classes: int = 1000) -> onnx.ModelProto:
        if any(n.op_type == "Clip" for n in self.nodes):
            self.inits += [numpy_helper.from_array(np.array(0, np.float32), "zero"), numpy_helper.from_array(np.array(6, np.float32), "six")]
        graph = helper.make_graph(self.nodes, name, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, res, res])],
                                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def resnet50(res: int = 224, seed: int = 0) -> onnx.ModelProto:
    """ResNet-50-shaped (BN folded into conv biases, as exported for inference): 25.5 M weights."""
    b = _Builder(seed)
    x = b.conv("input", 3, 64, 7, 2)
    b.nodes.append(helper.make_node("MaxPool", [x], ["pool0"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
    x, cin = "pool0", 64
    for width, blocks, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
        for i in range(blocks):
            s = stride if i == 0 else 1
            y = b.conv(x, cin, width, 1)
            y = b.conv(y, width, width, 3, s)
            y = b.conv(y, width, width * 4, 1, act=None)
            shortcut = b.conv(x, cin, width * 4, 1, s, act=None) if i == 0 else x
            x, cin = b.add(y, shortcut, relu=True), width * 4
    b.head(x, cin)
    return b.model("resnet50", res)


def mobilenetv2(res: int = 224, seed: int = 0) -> onnx.ModelProto:
    """MobileNetV2-shaped (depthwise separable, ReLU6, BN folded): 3.5 M weights."""
    b = _Builder(seed)
    x, cin = b.conv("input", 3, 32, 3, 2, act="relu6"), 32
    for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]:
        for i in range(n):
            stride, hidden, y = (s if i == 0 else 1), cin * t, x
            if t != 1:
                y = b.conv(y, cin, hidden, 1, act="relu6")
            y = b.conv(y, hidden, hidden, 3, stride, group=hidden, act="relu6")
            y = b.conv(y, hidden, c, 1, act=None)
            x = b.add(y, x, relu=False) if stride == 1 and cin == c else y
            cin = c
    x = b.conv(x, cin, 1280, 1, act="relu6")
    b.head(x, 1280)
    return b.model("mobilenetv2", res)


def lenet5(seed: int = 0) -> onnx.ModelProto:
    """LeNet-5 as shipped: UINT8 [N,1,28,28] scaled in-graph, logits [N,10]."""
    rng = np.random.default_rng(seed)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(np.prod(shape[1:]))), name)

    def bias(name: str, n: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(n, dtype=np.float32) * np.float32(0.01), name)

    inits = [weight("conv1.weight", 6, 1, 5, 5), bias("conv1.bias", 6), weight("conv2.weight", 16, 6, 5, 5), bias("conv2.bias", 16),
             weight("fc1.weight", 120, 400), bias("fc1.bias", 120), weight("fc2.weight", 84, 120), bias("fc2.bias", 84),
             weight("fc3.weight", 10, 84), bias("fc3.bias", 10), numpy_helper.from_array(np.array(1 / 255, np.float32), "scale")]
    nodes = [
        helper.make_node("Cast", ["input"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["xf", "scale"], ["x0"]),
        helper.make_node("Conv", ["x0", "conv1.weight", "conv1.bias"], ["c1"], pads=[2, 2, 2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "conv2.weight", "conv2.bias"], ["c2"]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("MaxPool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p2"], ["f"]),
        helper.make_node("Gemm", ["f", "fc1.weight", "fc1.bias"], ["g1"], transB=1),
        helper.make_node("Relu", ["g1"], ["h1"]),
        helper.make_node("Gemm", ["h1", "fc2.weight", "fc2.bias"], ["g2"], transB=1),
        helper.make_node("Relu", ["g2"], ["h2"]),
        helper.make_node("Gemm", ["h2", "fc3.weight", "fc3.bias"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(nodes, "lenet5", [helper.make_tensor_value_info("input", TensorProto.UINT8, ["N", 1, 28, 28])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# ---------------------------------------------------------------------------------------------


def weight_names(model: onnx.ModelProto, min_params: int = 64) -> list[str]:
    """Conv/Gemm/MatMul weight initializers (what discovery would pick on these models)."""
    inits = {t.name: t for t in model.graph.initializer}
    names = []
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in inits:
            t = inits[node.input[1]]
            if int(np.prod(t.dims)) >= min_params and node.input[1] not in names:
                names.append(node.input[1])
    return names


def _plain_session(model: onnx.ModelProto, threads: int, spinning: bool = True) -> ort.InferenceSession:
    """A normal session of the original model: default options, threads pinned.

    ``spinning=False`` only for the interleaved rounds: an idle session's intra-op threads
    keep spinning (> 200 ms measured) and slow down whatever runs next on a 2-core machine.
    Its own speed is the same either way (checked: the isolated default-options figure is
    printed beside it).
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _network_candidates(originals: dict[str, np.ndarray], count: int) -> list[dict[str, np.ndarray]]:
    """Distinct candidates (no cache hit), every weight changed."""
    return [{n: v * np.float32(1.0 + 1e-3 * (i + 1)) for n, v in originals.items()} for i in range(count)]


def _layer_rounds(originals: dict[str, np.ndarray], count: int, layers: int) -> list[list[dict[str, np.ndarray]]]:
    """``count`` rounds of one-weight candidates, one per layer for ``layers`` layers spread over the net."""
    names = list(originals)
    picked = [names[i] for i in np.linspace(0, len(names) - 1, min(layers, len(names))).round().astype(int)]
    return [[{n: originals[n] * np.float32(1.0 + 1e-3 * (i + 1))} for n in picked] for i in range(count)]


def bench(label: str, model: onnx.ModelProto, data: EvalData, samples: int, threads: int, repeats: int,
          engines: list[str], batch: int | None, layers: int) -> dict[str, float]:
    """Time per candidate of each engine and the plain forward, interleaved round-robin so that
    machine noise hits every contestant alike; returns median ms by contestant."""
    names = weight_names(model)
    metric = resolve_metric(None, data, model)
    subset = data.head(samples)
    # Plain forward alone first, with default options (spinning on), before anything else exists.
    isolated = _plain_session(model, threads)
    iso_batches = plan_batches(subset, batch or 1000, None)
    iso = []
    for rep in range(repeats + 2):
        t0 = time.perf_counter()
        concat_outputs([isolated.run(None, f) for f, _ in iso_batches], iso_batches)
        if rep >= 2:
            iso.append(time.perf_counter() - t0)
    del isolated
    scorers = {}
    for engine in engines:
        t0 = time.perf_counter()
        scorer = Scorer(model, names, data, metric, device="cpu", search_samples=samples, batch_size=batch, engine=engine, threads=threads)
        label_engine = f"auto->{scorer.engine}" if engine == "auto" else engine
        scorers[label_engine] = scorer
        print(f"  [{label_engine}: scorer ready in {time.perf_counter() - t0:.2f} s]", file=sys.stderr)
    batch_used = next(iter(scorers.values())).batch_size
    plain = _plain_session(model, threads, spinning=False)
    batches = plan_batches(subset, batch_used, None)
    contestants: dict[str, object] = {"plain": lambda: concat_outputs([plain.run(None, f) for f, _ in batches], batches)}
    per_call = {"plain": 1}
    for engine, scorer in scorers.items():
        network = iter(_network_candidates(scorer.originals, 2 + repeats))
        contestants[f"{engine}|network"] = lambda s=scorer, c=network: s.score([next(c)])
        per_call[f"{engine}|network"] = 1
        rounds = _layer_rounds(scorer.originals, 2 + repeats, layers)
        contestants[f"{engine}|layer"] = lambda s=scorer, r=iter(rounds): s.score(next(r))
        per_call[f"{engine}|layer"] = len(rounds[0])
    times: dict[str, list[float]] = {k: [] for k in contestants}
    first: dict[str, float] = {}
    for rep in range(repeats + 2):  # two warm-up rounds
        for key, fn in contestants.items():
            time.sleep(0.01)  # let the previous session's spinning threads go idle
            t0 = time.perf_counter()
            fn()
            elapsed = (time.perf_counter() - t0) / per_call[key]
            if rep == 0:
                first[key] = elapsed
            if rep >= 2:
                times[key].append(elapsed)
    for scorer in scorers.values():
        scorer.close()
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    n_params = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.name in names)
    print(f"\n{label}: {len(names)} weights, {n_params:,} params, search subset {subset.n} samples, batch {batch_used}, "
          f"intra_op_threads {threads}, median of {repeats} interleaved rounds")
    print(f"  {'plain ORT forward (original model)':<46} {med['plain']:9.1f} ms   ratio 1.00"
          f"   (alone, default options: {statistics.median(iso) * 1e3:.1f} ms)")
    for key, ms in med.items():
        if key != "plain":
            engine, kind = key.split("|")
            extra = f"   (first round, with prefix runs: {first[key] * 1e3:.1f} ms)" if kind == "layer" else ""
            print(f"  {engine + ' engine, ' + kind + '-stage candidate':<46} {ms:9.1f} ms   ratio {ms / med['plain']:.2f}{extra}")
    sys.stdout.flush()
    return med


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="lenet,mobilenetv2,resnet50", help="comma list: lenet, mobilenetv2, resnet50")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (pinned for every session)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats (median); >= 5")
    parser.add_argument("--lenet-samples", type=int, default=2000, help="LeNet search subset (the default --search-samples)")
    parser.add_argument("--large-samples", type=int, default=16, help="images per candidate for the large models")
    parser.add_argument("--engines", default="session,inputs,auto")
    parser.add_argument("--layers", type=int, default=6, help="layer-stage round: this many layers, spread over the net")
    args = parser.parse_args()
    engines = args.engines.split(",")
    ort.set_default_logger_severity(3)
    for name in args.models.split(","):
        t0 = time.perf_counter()
        if name == "lenet":
            path = ROOT / "models" / "lenet5" / "model.onnx"
            if path.is_file() and (path.parent / "eval.npz").is_file():
                model = onnx.load(str(path))
                data = load_data(path.parent / "eval.npz", model)
                label = f"LeNet-5 ({path.relative_to(ROOT)}, trained)"
            else:
                model = lenet5()
                rng = np.random.default_rng(1)
                data = load_data({"input": rng.integers(0, 256, (args.lenet_samples, 1, 28, 28), dtype=np.uint8)}, model)
                label = "LeNet-5 (random weights, random images)"
            samples, batch = args.lenet_samples, None
        elif name in ("mobilenetv2", "resnet50"):
            model = mobilenetv2() if name == "mobilenetv2" else resnet50()
            rng = np.random.default_rng(1)
            data = load_data({"input": rng.standard_normal((args.large_samples, 3, 224, 224), dtype=np.float32)}, model)
            label = f"{name} (random weights, 224x224, built in {time.perf_counter() - t0:.2f} s)"
            samples, batch = args.large_samples, args.large_samples
        else:
            raise SystemExit(f"unknown model {name!r}: expected lenet, mobilenetv2 or resnet50")
        bench(label, model, data, samples, args.threads, args.repeats, engines, batch, args.layers)


if __name__ == "__main__":
    main()
