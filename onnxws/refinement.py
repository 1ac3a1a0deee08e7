"""Output-aware refinement of shared weights (the ``refine`` stage, after clustering).

k-means minimises the error of the weights; what a layer passes on is the error of its
output. For a weight read by Gemm, MatMul or Conv, one output channel ``w`` (a row of the
weight seen as [output channels, inputs]) rebuilt as ``w'`` changes the layer's output by
``(w - w') . x``; over the layer's inputs ``x`` its mean squared change is
``(w - w')^T H (w - w')`` with ``H = E[x x^T]``, measured once on the search subset
(Conv: on sampled input patches, one H per convolution group). A one-direction LSTM/GRU/RNN
is the same per time step: W meets the input sequence, R the hidden state of the step
before (read from the op's Y output; for GRU's hidden gate with ``linear_before_reset=0``
R meets ``r * h``, so there the objective is an approximation).

For each candidate of the clustering stage this stage keeps the encoding (a codebook and
indices into it) and lowers that output error:

1. **Assignment with error feedback**: the indices are chosen column by column, most
   important input first (largest ``H_jj``), and each column's rounding error is folded
   into the columns not yet assigned through ``H^-1`` (the optimal-brain-quantisation update
   of GPTQ, Frantar et al. 2023, here with a codebook instead of a uniform grid);
2. **Codebook refit**: the codebook values that minimise the same error for those indices
   (a least-squares problem in the k values, solved by conjugate gradients);

repeated for a few rounds. The candidate keeps whichever of the k-means form and the rounds
has the smallest output error, so refinement never makes that error worse; the layer and
network stages then measure the real loss as before. Weights read by other ops (Gather,
Einsum, ...) or too large to refine keep their k-means form; the report says which and why.

**Bias correction.** Where the weight's one consumer adds a constant bias per output channel
(Conv ``B``, Gemm ``C``, a MatMul followed by ``Add`` of a constant; for a Conv without bias
followed by an inference BatchNormalization, that one's running mean), sharing also moves the
mean of every output channel by ``(w' - w) . E[x]``; the candidate then carries the bias
``b + (w - w') . E[x]`` (Gemm: times ``alpha / beta``), which cancels that shift on the
measured inputs, and what is left of the output error is ``(w - w')^T C (w - w')`` with the
covariance ``C = H - E[x] E[x]^T``: the objective of both steps above for such a weight.
(Nagel et al., *Data-Free Quantization*, ICCV 2019, correct the bias of quantised
depthwise convolutions the same way; measured on the zoo's MobileNetV2, k-means alone at k=32
in every layer: 80 pp of top-1 agreement lost, 38 pp with the bias corrected.)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxws.sharing import SharedWeight

ROUNDS = 4  # assignment + refit rounds per candidate
DAMPING = 0.01  # added to H's diagonal, as a fraction of its mean (GPTQ's default)
REFIT_ITERATIONS = 8  # conjugate-gradient steps of a codebook refit (exact for k <= 8, one codebook)
SAMPLE_ROWS = 65536  # most input vectors sampled per layer to estimate H ...
ROWS_PER_INPUT = 32  # ... aiming at this many per input (H has inputs^2 entries) ...
MIN_ROWS = 4096  # ... and at least this many
MAX_INPUTS = 8192  # inputs per output channel (H is that squared, float64)
MAX_WORK = 2e10  # multiply-adds of one pass over a weight (outputs x inputs^2) plus factoring H (inputs^3): above, not refined
BLOCK = 128  # columns assigned between two whole-matrix error updates
_RECURRENT = {"LSTM", "GRU", "RNN"}
_FLOAT_CASTS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


@dataclass(frozen=True)
class Probe:
    """How one consumer node reads a weight.

    Attributes:
        activation: the consumer's data input (the tensor whose second moments are measured).
        op: ``gemm``, ``matmul``, ``conv``, ``sequence`` (LSTM/GRU/RNN W: the input sequence)
            or ``recurrent`` (their R: the hidden sequence Y, one step behind).
        out_axis: axis of the stored weight holding the consumer's output channels.
        transposed: Gemm ``transA``: the data input is [inputs, rows].
        kernel, strides, dilations, pads (begin..., end...), auto_pad, group: Conv attributes.
        time_axis: axis of the time steps in a recurrent op's X and Y (its ``layout``).
    """

    activation: str
    op: str
    out_axis: int
    transposed: bool = False
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    auto_pad: str = "NOTSET"
    group: int = 1
    time_axis: int = 0


@dataclass(frozen=True)
class Bias:
    """The constant bias a weight's consumer adds per output channel: the tensor's name, and the
    factor between a change of the weight's output and the bias change that cancels it (a Gemm's
    ``alpha / beta``, -1 for the running mean of a BatchNormalization after a Conv, else 1)."""

    name: str
    scale: float = 1.0


@dataclass
class Plan:
    """What the refine stage can do: the probes of each refinable weight, and why the others are
    not refined; the bias of each refinable weight whose bias is corrected, and why the others'
    is not."""

    probes: dict[str, list[Probe]] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    biases: dict[str, Bias] = field(default_factory=dict)
    bias_reasons: dict[str, str] = field(default_factory=dict)


@dataclass
class Moments:
    """``H = E[x x^T]`` of one weight's inputs: [blocks, inputs, inputs] float64 (Conv: one block
    per convolution group, whose output channels are consecutive), the weight's row layout, and
    the mean input ``E[x]`` [blocks, inputs]."""

    h: np.ndarray
    out_axis: int
    rows: int = 0
    mean: np.ndarray | None = None


# --------------------------------------------------------------------------------------------
# Which weights can be refined


def _attr(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            value = onnx.helper.get_attribute_value(attr)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _probe(node: onnx.NodeProto, index: int, shape: tuple[int, ...]) -> Probe | str:
    """The probe of ``node`` reading a weight of ``shape`` at input ``index``, or why there is none."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return f"read by {node.domain}.{op}"
    if op == "Gemm" and index == 1 and len(shape) == 2:
        return Probe(node.input[0], "gemm", 0 if _attr(node, "transB", 0) else 1, transposed=bool(_attr(node, "transA", 0)))
    if op == "MatMul" and index == 1 and len(shape) == 2:
        return Probe(node.input[0], "matmul", 1)
    if op == "Conv" and index == 1 and len(shape) in (3, 4):
        spatial = len(shape) - 2
        kernel = tuple(int(d) for d in shape[2:])
        pads = tuple(int(p) for p in _attr(node, "pads", [0] * (2 * spatial)))
        return Probe(node.input[0], "conv", 0, kernel=kernel,
                     strides=tuple(int(s) for s in _attr(node, "strides", [1] * spatial)),
                     dilations=tuple(int(d) for d in _attr(node, "dilations", [1] * spatial)),
                     pads=pads, auto_pad=str(_attr(node, "auto_pad", "NOTSET")), group=int(_attr(node, "group", 1)))
    if op in _RECURRENT and index in (1, 2):
        if len(shape) != 3 or shape[0] != 1:
            return f"{op} weight of a bidirectional layer"
        time_axis = 1 if _attr(node, "layout", 0) else 0
        if index == 1:  # W multiplies the input sequence x_t
            return Probe(node.input[0], "sequence", 1, time_axis=time_axis)
        if len(node.output) == 0 or not node.output[0]:
            return f"{op} does not output its hidden sequence Y (what R multiplies)"
        # R multiplies h_(t-1): Y without its last step (h_0, the initial state, is left out)
        return Probe(node.output[0], "recurrent", 1, time_axis=time_axis)
    if op == "Conv":
        return "read by a 3-D convolution"
    if op in ("Gemm", "MatMul"):
        return f"first operand or batched weight of {op}"
    return f"read by {op} (only Gemm, MatMul, Conv and LSTM/GRU/RNN weights are refined)"


def _constants(graph: onnx.GraphProto) -> dict[str, tuple[tuple[int, ...], int]]:
    """Shape and element type of every main-graph initializer and ``Constant`` tensor."""
    found = {t.name: (tuple(int(d) for d in t.dims), int(t.data_type)) for t in graph.initializer}
    for node in graph.node:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or not node.output:
            continue
        for attr in node.attribute:
            if attr.name == "value":
                found[node.output[0]] = (tuple(int(d) for d in attr.t.dims), int(attr.t.data_type))
            elif attr.name == "value_float":
                found[node.output[0]] = ((), onnx.TensorProto.FLOAT)
            elif attr.name == "value_floats":
                found[node.output[0]] = ((len(attr.floats),), onnx.TensorProto.FLOAT)
    return found


def _bias(node: onnx.NodeProto, probe: Probe, outputs: int, uses: Mapping[str, list[tuple[onnx.NodeProto, int]]],
          constants: Mapping[str, tuple[tuple[int, ...], int]], graph_outputs: set[str],
          weights: Mapping[str, tuple[int, ...]]) -> Bias | str:
    """The bias ``node`` (the weight's only consumer) adds per output channel, or why there is none to correct."""
    scale = 1.0
    if probe.op == "conv":
        name = node.input[2] if len(node.input) > 2 else ""
        if not name:  # Conv -> BatchNormalization (not folded): its running mean absorbs the shift
            readers = uses.get(node.output[0] if node.output else "", [])
            if len(readers) == 1 and readers[0][0].op_type == "BatchNormalization" and readers[0][1] == 0 \
                    and readers[0][0].domain in ("", "ai.onnx") and len(readers[0][0].input) == 5 \
                    and not _attr(readers[0][0], "training_mode", 0) and node.output[0] not in graph_outputs:
                name, scale = readers[0][0].input[3], -1.0  # mean' = mean - (w - w').E[x]
    elif probe.op == "gemm":
        name = node.input[2] if len(node.input) > 2 else ""
        beta = float(_attr(node, "beta", 1.0))
        if name and beta == 0.0:
            return "its Gemm's beta is 0"
        scale = float(_attr(node, "alpha", 1.0)) / beta
    elif probe.op == "matmul":
        product = node.output[0] if node.output else ""
        readers = uses.get(product, [])
        if product in graph_outputs or len(readers) != 1 or readers[0][0].op_type != "Add" \
                or readers[0][0].domain not in ("", "ai.onnx") or len(readers[0][0].input) != 2:
            return "its MatMul is not followed by one Add"
        add, index = readers[0]
        name = add.input[1 - index]
    else:
        return f"{probe.op} weights are not bias-corrected"
    if not name:
        return f"its {node.op_type} has no bias"
    if name not in constants:
        return f"its bias {name!r} is not a constant"
    shape, dtype = constants[name]
    if dtype not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
        return f"its bias {name!r} is not float32/16/64"
    if math.prod(shape) != outputs or (shape and shape[-1] != outputs):
        return f"its bias {name!r} has shape {list(shape)}, not one value per output channel"
    if name in weights or len(uses.get(name, [])) != 1 or name in graph_outputs:
        return f"its bias {name!r} is read elsewhere too"
    return Bias(name, scale)


def plan(model: onnx.ModelProto, weights: Mapping[str, tuple[int, ...]]) -> Plan:
    """Probes of each weight (``name -> shape``): every node reading it, directly or through
    float Casts, must be a Gemm/MatMul second operand or a 1-D/2-D Conv weight, all with the
    same output axis. A weight with one consumer whose constant bias no one else reads gets
    that bias corrected (``Plan.biases``)."""
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name:
                uses.setdefault(name, []).append((node, i))
    constants = _constants(model.graph)
    graph_outputs = {o.name for o in model.graph.output}
    out = Plan()
    for name, shape in weights.items():
        probes: list[Probe] = []
        consumers: list[onnx.NodeProto] = []
        reason = ""
        pending, seen = [name], 0
        while pending and not reason:
            tensor = pending.pop()
            seen += 1
            for node, index in uses.get(tensor, []):
                if node.op_type == "Cast" and _attr(node, "to", 0) in _FLOAT_CASTS and seen < 4:
                    pending.extend(o for o in node.output if o)
                    continue
                probe = _probe(node, index, shape)
                if isinstance(probe, str):
                    reason = probe
                    break
                probes.append(probe)
                consumers.append(node)
        if not reason and not probes:
            reason = "no consumer node in the main graph"
        if not reason and len({(p.out_axis, p.group) for p in probes}) > 1:
            reason = "its consumers read it with different layouts"
        if not reason:
            outputs = shape[probes[0].out_axis]
            inputs = math.prod(shape) // max(outputs, 1)
            if inputs > MAX_INPUTS:
                reason = f"{inputs} inputs per output channel > {MAX_INPUTS}"
            elif outputs * inputs * inputs + inputs ** 3 > MAX_WORK:
                reason = (f"too large to refine ({outputs} x {inputs}^2 multiply-adds per pass + {inputs}^3 to factor H "
                          f"> {MAX_WORK:.0e})")
        if reason:
            out.reasons[name] = reason
            continue
        out.probes[name] = probes
        bias: Bias | str = "it has several consumers"
        if len(consumers) == 1:
            bias = _bias(consumers[0], probes[0], shape[probes[0].out_axis], uses, constants, graph_outputs, weights)
        if isinstance(bias, Bias):
            out.biases[name] = bias
        else:
            out.bias_reasons[name] = bias
    return out


# --------------------------------------------------------------------------------------------
# Second moments of the inputs


def _conv_patches(x: np.ndarray, probe: Probe, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` input patches [count, group, channels/group * prod(kernel)] of ``x`` [N, C, *spatial]
    at output positions drawn uniformly (all of them when there are fewer)."""
    spatial = len(probe.kernel)
    if spatial == 1:  # a 1-D convolution is a 2-D one with a unit first axis
        x = x[:, :, None, :]
        kernel, strides, dilations = (1, *probe.kernel), (1, *probe.strides), (1, *probe.dilations)
        pads = (0, probe.pads[0], 0, probe.pads[1]) if probe.pads else (0, 0, 0, 0)
    else:
        kernel, strides, dilations, pads = probe.kernel, probe.strides, probe.dilations, probe.pads
    n, channels, height, width = x.shape
    span = [(kernel[i] - 1) * dilations[i] + 1 for i in range(2)]
    size = (height, width)
    if probe.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        out = [-(-size[i] // strides[i]) for i in range(2)]
        total = [max((out[i] - 1) * strides[i] + span[i] - size[i], 0) for i in range(2)]
        small = [t // 2 for t in total]
        begin = small if probe.auto_pad == "SAME_UPPER" else [t - s for t, s in zip(total, small)]
        pads = (begin[0], begin[1], total[0] - begin[0], total[1] - begin[1])
    elif probe.auto_pad == "VALID" or not pads:
        pads = (0, 0, 0, 0)
    if kernel == (1, 1) and not any(pads):  # pointwise: the patches are pixels, no padded copy
        sample, oy, ox = _positions(n, [(size[i] - 1) // strides[i] + 1 for i in range(2)], count, rng)
        return x[sample, :, oy * strides[0], ox * strides[1]].reshape(len(sample), probe.group, -1)
    padded = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    out = [(padded.shape[2 + i] - span[i]) // strides[i] + 1 for i in range(2)]
    if n * out[0] * out[1] <= 0:
        return np.zeros((0, probe.group, channels // probe.group * math.prod(kernel)), dtype=np.float64)
    sample, oy, ox = _positions(n, out, count, rng)
    ys = oy[:, None] * strides[0] + np.arange(kernel[0]) * dilations[0]
    xs = ox[:, None] * strides[1] + np.arange(kernel[1]) * dilations[1]
    patches = padded[sample[:, None, None, None], np.arange(channels)[None, :, None, None], ys[:, None, :, None], xs[:, None, None, :]]
    return patches.reshape(len(sample), probe.group, -1)


def _positions(n: int, out: list[int], count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sample, row, column) of ``count`` output positions drawn uniformly from ``n`` samples of
    ``out`` = [rows, columns] positions each, in order (all of them when there are fewer)."""
    positions = n * out[0] * out[1]
    chosen = np.arange(positions) if positions <= count else np.sort(rng.choice(positions, count, replace=False))
    sample, rest = np.divmod(chosen, out[0] * out[1])
    oy, ox = np.divmod(rest, out[1])
    return sample, oy, ox


def _inputs_per_block(shape: tuple[int, ...], probe: Probe) -> int:
    return math.prod(shape) // max(shape[probe.out_axis], 1)


def _rows(x: np.ndarray, probe: Probe, count: int, rng: np.random.Generator) -> np.ndarray:
    """Input vectors [rows, blocks, inputs] of one batch of ``probe``'s activation."""
    if probe.op == "conv":
        return _conv_patches(x, probe, count, rng)
    if probe.op == "gemm":
        vectors = x.T if probe.transposed else x
    elif probe.op == "recurrent":
        steps = x.shape[probe.time_axis]
        vectors = np.take(x, np.arange(steps - 1), axis=probe.time_axis).reshape(-1, x.shape[-1])
    else:
        vectors = x.reshape(-1, x.shape[-1])
    if len(vectors) > count:
        vectors = vectors[np.sort(rng.choice(len(vectors), count, replace=False))]
    return vectors[:, None, :]


def measure_moments(read: Callable[[list[str]], Iterable[Mapping[str, np.ndarray]]], plan_: Plan,
                    shapes: Mapping[str, tuple[int, ...]], n_batches: int, *, seed: int = 0,
                    rows: int = SAMPLE_ROWS, progress: Callable[[str], None] | None = None) -> dict[str, Moments]:
    """``H`` of every weight in ``plan_`` from the activations ``read(names)`` yields (dicts of
    activation arrays per batch; ``n_batches`` per name). Up to ``rows`` input vectors per
    weight, spread evenly over the batches, drawn with ``seed``. Weights whose activations
    do not have the expected shape move to ``plan_.reasons``."""
    rng = np.random.default_rng(seed)
    wanted = {name: min(rows, max(MIN_ROWS, ROWS_PER_INPUT * _inputs_per_block(shapes[name], probes[0])))
              for name, probes in plan_.probes.items()}
    by_activation: dict[str, list[tuple[str, Probe]]] = {}
    for name, probes in plan_.probes.items():
        for probe in probes:
            by_activation.setdefault(probe.activation, []).append((name, probe))
    sums: dict[str, np.ndarray] = {}
    totals: dict[str, np.ndarray] = {}  # sums of the input vectors, for E[x]
    counts: dict[str, int] = {}
    broken: dict[str, str] = {}
    for batch in read(list(by_activation)):
        for activation, value in batch.items():
            for name, probe in by_activation.get(activation, []):
                if name in broken:
                    continue
                why = _check_activation(value, probe, shapes[name])
                if why:
                    broken[name] = why
                    continue
                per_batch = max(1, -(-wanted[name] // max(n_batches, 1)))
                vectors = _rows(np.asarray(value), probe, per_batch, rng).astype(np.float32, copy=False)
                if vectors.shape[-1] * vectors.shape[1] == 0:
                    continue
                # One block per convolution group; H summed over every consumer of the weight.
                # Products in float32 (BLAS sums them blockwise), accumulated over batches in float64.
                grouped = vectors.transpose(1, 0, 2)
                block = np.matmul(grouped.transpose(0, 2, 1), grouped).astype(np.float64)
                sums[name] = block if name not in sums else sums[name] + block
                total = grouped.sum(axis=1, dtype=np.float64)
                totals[name] = total if name not in totals else totals[name] + total
                counts[name] = counts.get(name, 0) + len(vectors)
        if progress is not None:
            progress(f"{len(batch)} activations")
    out: dict[str, Moments] = {}
    for name, probes in list(plan_.probes.items()):
        if name in broken or not counts.get(name):
            plan_.reasons[name] = broken.get(name, "no input vectors measured")
            del plan_.probes[name]
            continue
        out[name] = Moments(sums[name] / counts[name], probes[0].out_axis, counts[name], totals[name] / counts[name])
    return out


def _check_activation(value: np.ndarray, probe: Probe, shape: tuple[int, ...]) -> str:
    if value.dtype.kind != "f":
        return f"its input {probe.activation!r} is {value.dtype}, not float"
    inputs = math.prod(shape) // shape[probe.out_axis]
    if probe.op == "conv":
        if value.ndim != len(shape) or value.shape[1] != shape[1] * probe.group:
            return f"its input {probe.activation!r} has shape {list(value.shape)}"
        return ""
    width = value.shape[0] if probe.transposed else value.shape[-1]
    if value.ndim < 1 or width != inputs or (probe.op == "gemm" and value.ndim != 2):
        return f"its input {probe.activation!r} has shape {list(value.shape)}"
    return ""


# --------------------------------------------------------------------------------------------
# Refinement of one candidate


class _Problem:
    """One weight's refinement problem: its rows [blocks, rows per block, inputs] (float64), H per
    block (the covariance when the bias is corrected), and per block the column order (largest
    ``H_jj`` first) with the upper Cholesky factor ``U`` of the damped, reordered H's inverse
    (``H^-1 = U^T U``). Shared by all its candidates."""

    def __init__(self, original: np.ndarray, moments: Moments, centred: bool = False):
        self.shape = tuple(original.shape)
        self.out_axis = moments.out_axis
        self.mean = moments.mean
        self.h = moments.h
        if centred:
            if self.mean is None:
                raise ValueError("bias correction needs the mean input (Moments.mean)")
            self.h = self.h - self.mean[:, :, None] * self.mean[:, None, :]
        blocks, inputs = self.h.shape[0], self.h.shape[-1]
        outputs = self.shape[self.out_axis]
        self.moved = (outputs, *[d for i, d in enumerate(self.shape) if i != self.out_axis])
        self.dims = (blocks, outputs // blocks, inputs)
        self.weights = self.rows(original.astype(np.float64))
        self.weighted = np.matmul(self.weights, self.h)  # W H: the refit's right-hand side, for every candidate
        self.orders = np.argsort(-np.diagonal(self.h, axis1=1, axis2=2), axis=1, kind="stable")
        self.factors = _inverse_factors(_reorder(self.h, self.orders))

    def rows(self, array: np.ndarray) -> np.ndarray:
        """A stored-layout array (or one broadcastable to it) as [blocks, rows, inputs]."""
        return np.moveaxis(np.broadcast_to(array, self.shape), self.out_axis, 0).reshape(self.dims)

    def stored(self, rows: np.ndarray) -> np.ndarray:
        return np.moveaxis(rows.reshape(self.moved), 0, self.out_axis)

    def error(self, rebuilt: np.ndarray) -> float:
        """Output error of rebuilt rows: sum over rows of (w - w')^T H (w - w')."""
        diff = self.weights - rebuilt
        return float(np.sum(np.matmul(diff, self.h) * diff))

    def bias_shift(self, rebuilt: np.ndarray) -> np.ndarray:
        """``(w - w') . E[x]`` per output channel [outputs] (float64): what the bias must gain."""
        return np.einsum("bri,bi->br", self.weights - rebuilt, self.mean).reshape(-1)


def _reorder(h: np.ndarray, orders: np.ndarray) -> np.ndarray:
    rows = np.take_along_axis(h, orders[:, :, None], axis=1)
    return np.take_along_axis(rows, orders[:, None, :], axis=2)


def _inverse_factors(h: np.ndarray) -> np.ndarray | None:
    """Per block, the upper Cholesky factor of the damped H's inverse; None if H is degenerate."""
    h = h.copy()
    diag = np.diagonal(h, axis1=1, axis2=2).copy()
    dead = diag <= 0
    diag[dead] = 1.0
    mean = diag.mean(axis=1)
    idx = np.arange(h.shape[-1])
    for damping in (DAMPING, DAMPING * 10, DAMPING * 100):
        damped = h.copy()
        damped[:, idx, idx] = diag + damping * mean[:, None]
        try:
            return np.swapaxes(np.linalg.cholesky(np.linalg.inv(damped)), 1, 2)
        except np.linalg.LinAlgError:
            continue
    return None


def _assign(problem: _Problem, books: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """Indices [blocks, rows, inputs]: columns taken in each block's order, each column's rounding
    error folded into the later ones through the inverse factor (``groups``: each element's
    codebook, None for one codebook)."""
    factors = problem.factors
    orders = np.broadcast_to(problem.orders[:, None, :], problem.dims)
    work = np.take_along_axis(problem.weights, orders, axis=2)
    cols = None if groups is None else np.take_along_axis(groups, orders, axis=2)
    if groups is None:  # one codebook: nearest value by binary search over the sorted values
        order = np.argsort(books[0], kind="stable")
        values = books[0][order]
        bounds = (values[1:] + values[:-1]) / 2.0
    flat_books = books.reshape(-1)
    k = books.shape[1]
    indices = np.empty(problem.dims, dtype=np.int64)
    n = problem.dims[2]
    for start in range(0, n, BLOCK):
        stop = min(start + BLOCK, n)
        errors = np.empty((*problem.dims[:2], stop - start))
        for j in range(start, stop):
            column = work[:, :, j]
            if cols is None:
                chosen = order[np.searchsorted(bounds, column)]
                picked = books[0][chosen]
            else:
                chosen = np.argmin(np.abs(column[..., None] - books[cols[:, :, j]]), axis=-1)
                picked = flat_books[cols[:, :, j] * k + chosen]
            indices[:, :, j] = chosen
            error = (column - picked) / factors[:, j, j][:, None]
            work[:, :, j + 1:stop] -= error[:, :, None] * factors[:, None, j, j + 1:stop]
            errors[:, :, j - start] = error
        if stop < n:
            work[:, :, stop:] -= np.matmul(errors, factors[:, start:stop, stop:])
    out = np.empty_like(indices)
    np.put_along_axis(out, orders, indices, axis=2)
    return out


def _refit(problem: _Problem, indices: np.ndarray, groups: np.ndarray, books: np.ndarray) -> np.ndarray:
    """Codebook values minimising the output error for fixed indices (conjugate gradients on the
    normal equations, from the current values; values no index uses stay as they are)."""
    k = books.shape[1]
    slots = (groups * k + indices).reshape(-1)
    n = books.size

    def apply(values: np.ndarray) -> np.ndarray:
        return np.bincount(slots, weights=np.matmul(values[slots].reshape(problem.dims), problem.h).reshape(-1), minlength=n)

    values = books.reshape(-1).astype(np.float64)
    target = np.bincount(slots, weights=problem.weighted.reshape(-1), minlength=n)
    residual = target - apply(values)
    direction = residual.copy()
    norm = float(residual @ residual)
    scale = float(target @ target)
    for _ in range(min(REFIT_ITERATIONS, n)):
        if norm <= 1e-24 * max(scale, 1e-300):
            break
        step = apply(direction)
        curvature = float(direction @ step)
        if curvature <= 0:
            break
        alpha = norm / curvature
        values += alpha * direction
        residual -= alpha * step
        new_norm = float(residual @ residual)
        direction = residual + (new_norm / norm) * direction
        norm = new_norm
    return values.reshape(books.shape)


def _with_bias(shared: SharedWeight, problem: _Problem, bias: tuple[Bias, np.ndarray] | None) -> SharedWeight:
    """``shared`` carrying its consumer's corrected bias ``b + scale * (w - w') . E[x]`` (``bias``:
    the bias and its original values), or ``shared`` itself without one."""
    if bias is None:
        return shared
    target, values = bias
    shift = problem.bias_shift(problem.rows(shared.decode().astype(np.float64)))
    corrected = (values.astype(np.float64).reshape(-1) + target.scale * shift).astype(values.dtype).reshape(values.shape)
    return dataclasses.replace(shared, bias_name=target.name, bias=corrected)


def refine(shared: SharedWeight, original: np.ndarray, moments: Moments, *, rounds: int = ROUNDS,
           problem: _Problem | None = None, bias: tuple[Bias, np.ndarray] | None = None) -> tuple[SharedWeight, float, float]:
    """A refined form of ``shared`` (same k, codebook layout and dtype), its output error and
    the k-means form's, both ``sum over output channels of (w - w')^T H (w - w')``. Returns
    ``shared`` itself when no round lowers the error (or H cannot be factored). ``problem``:
    the weight's ``_Problem`` when several candidates of it are refined.

    ``bias``: the consumer's bias and its original values, to correct: the form returned then
    carries the corrected bias, and H is the covariance (the error left after the correction)."""
    problem = problem or _Problem(original, moments, centred=bias is not None)
    groups = problem.rows(shared.group_ids()).astype(np.int64) if shared.n_codebooks > 1 else np.zeros(problem.dims, np.int64)
    dtype = shared.codebooks.dtype
    best_error = start_error = problem.error(problem.rows(shared.decode().astype(np.float64)))
    if problem.factors is None:
        return _with_bias(shared, problem, bias), start_error, start_error
    best: tuple[np.ndarray, np.ndarray] | None = None
    books = shared.codebooks.astype(np.float64)
    for _ in range(rounds):
        indices = _assign(problem, books, None if shared.n_codebooks == 1 else groups)
        books = _refit(problem, indices, groups, books)
        stored_books = books.astype(dtype)  # the error of what will be stored
        error = problem.error(stored_books.astype(np.float64).reshape(-1)[groups * shared.k + indices])
        if error < best_error:
            best_error, best = error, (stored_books, indices)
    if best is None:
        return _with_bias(shared, problem, bias), start_error, start_error
    stored_books, indices = best
    stored_indices = np.ascontiguousarray(problem.stored(indices)).astype(shared.indices.dtype)
    rebuilt = dataclasses.replace(shared, codebooks=stored_books, indices=stored_indices)
    rebuilt = dataclasses.replace(rebuilt, inertia=rebuilt.squared_error(original))
    return _with_bias(rebuilt, problem, bias), best_error, start_error


def refine_all(candidates: Mapping[int, SharedWeight], original: np.ndarray, moments: Moments, *,
               bias: tuple[Bias, np.ndarray] | None = None) -> tuple[dict[int, SharedWeight], dict[int, float]]:
    """``refine`` for every k of one weight (``bias``: as ``refine``): the kept forms and their output errors."""
    problem = _Problem(original, moments, centred=bias is not None)
    kept: dict[int, SharedWeight] = {}
    errors: dict[int, float] = {}
    for k, shared in sorted(candidates.items()):
        kept[k], errors[k], _ = refine(shared, original, moments, problem=problem, bias=bias)
    return kept, errors


__all__: Sequence[str] = ("Bias", "Plan", "Probe", "Moments", "plan", "measure_moments", "refine", "refine_all")
