"""The shared form of one weight tensor: codebook(s) + integer indices.

This is the contract between clustering (which produces it), scoring (which runs its
decoded floats) and encoding (which writes it into the graph). ``decode()`` is the one
definition of the rebuilt weight: the emitted ONNX graph must reproduce it bit for bit.
A weight may carry a corrected bias (refinement's bias correction): the values its
consumer's bias takes with it, scored and written together with the weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


_DECODE_CHUNK = 1 << 20  # indices gathered per step in SharedWeight.decode


def index_bits(k: int) -> int:
    """Index width in bits for ``k`` shared values: ``ceil(log2 k)``, 0 for k=1."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return 0 if k == 1 else math.ceil(math.log2(k))


@dataclass(frozen=True)
class Granularity:
    """How many codebooks a tensor gets.

    ``kind`` is ``"tensor"`` (one codebook), ``"channel"`` (one per output channel) or
    ``"group"`` (one per ``group_size`` consecutive output channels). ``"auto"`` is a
    setting, not an encoding: the pipeline measures tensor and channel codebooks per tensor
    and keeps one (``layer_search.choose_granularities``).
    """

    kind: str = "tensor"
    group_size: int = 1

    @classmethod
    def parse(cls, text: str) -> Granularity:
        """Parse ``tensor``, ``channel`` or ``group:N`` (N >= 1 output channels per group)."""
        text = text.strip().lower()
        if text in ("tensor", "channel", "auto"):
            return cls(text, 1)
        if text.startswith("group:"):
            try:
                n = int(text.split(":", 1)[1])
            except ValueError:
                n = 0
            if n >= 1:
                return cls("group", n)
        raise ValueError(f"invalid granularity {text!r}: expected tensor, channel, group:N with N >= 1, or auto")

    def __str__(self) -> str:
        return self.kind if self.kind != "group" else f"group:{self.group_size}"

    def n_groups(self, shape: tuple[int, ...], channel_axis: int) -> int:
        """Number of codebooks for a tensor of ``shape`` whose output channels run along ``channel_axis``."""
        if self.kind == "tensor" or len(shape) == 0:
            return 1
        channels = shape[channel_axis]
        size = 1 if self.kind == "channel" else self.group_size
        return -(-channels // size)


@dataclass(frozen=True, eq=False)
class SharedWeight:
    """One weight tensor in shared form.

    Attributes:
        name: the tensor's name in the graph (initializer or Constant output).
        codebooks: [G, k] array in the weight's dtype; G = 1 for per-tensor sharing.
        indices: integer array with the weight's shape, values in [0, k).
        channel_axis: axis of the weight along which groups of channels run (ignored for G = 1).
        group_size: consecutive channels that share one codebook (channel granularity: 1).
        granularity: the granularity that produced it, for reports.
        inertia: sum of squared errors of the decoded weight vs the original (float64).
        bias_name: the bias tensor of the weight's consumer that this form rewrites ("" for none).
        bias: that bias's new values (its dtype and shape), or None.
    """

    name: str
    codebooks: np.ndarray
    indices: np.ndarray
    channel_axis: int = 0
    group_size: int = 1
    granularity: Granularity = field(default_factory=Granularity)
    inertia: float = 0.0
    bias_name: str = ""
    bias: np.ndarray | None = None

    @property
    def k(self) -> int:
        """Shared values per codebook."""
        return int(self.codebooks.shape[1])

    @property
    def n_codebooks(self) -> int:
        return int(self.codebooks.shape[0])

    @property
    def bits(self) -> int:
        return index_bits(self.k)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.indices.shape)

    @property
    def params(self) -> int:
        return int(self.indices.size)

    def group_ids(self) -> np.ndarray:
        """Codebook id of every element, broadcastable to ``shape`` (int64); zeros for G = 1."""
        if self.n_codebooks == 1:
            return np.zeros((1,) * max(len(self.shape), 1), dtype=np.int64)
        axis = self.channel_axis % len(self.shape)
        ids = np.arange(self.shape[axis], dtype=np.int64) // self.group_size
        view = [1] * len(self.shape)
        view[axis] = self.shape[axis]
        return ids.reshape(view)

    def decode(self) -> np.ndarray:
        """The rebuilt weight (the weight's dtype and shape): ``codebooks[group, index]``."""
        flat = self.codebooks.reshape(-1)
        if self.n_codebooks == 1:
            # Gathered in chunks: indexing with the whole index array would first make an int64
            # copy of it (8 bytes per weight, twice a float32 weight's size).
            indices = self.indices.reshape(-1)
            out = np.empty(indices.size, dtype=flat.dtype)
            for start in range(0, indices.size, _DECODE_CHUNK):
                np.take(flat, indices[start:start + _DECODE_CHUNK], out=out[start:start + _DECODE_CHUNK])
            return out.reshape(self.indices.shape)
        return flat[self.indices.astype(np.int64) + self.group_ids() * self.k]

    def tensors(self) -> dict[str, np.ndarray]:
        """What this form puts in the graph: the decoded weight, and the corrected bias if any."""
        out = {self.name: self.decode()}
        if self.bias_name and self.bias is not None:
            out[self.bias_name] = self.bias
        return out

    def squared_error(self, original: np.ndarray) -> float:
        """``sum((decode() - original)**2)`` in float64 (float32/16 -> float64 is exact), computed in place."""
        error = self.decode().astype(np.float64)
        np.subtract(error, original, out=error)
        np.square(error, out=error)
        return float(np.sum(error))

    def stored_bits(self, codebook_bits: int) -> int:
        """Theoretical size in bits: ``n * b + G * k * codebook_bits`` (docs/design.md, CR)."""
        return self.params * self.bits + self.n_codebooks * self.k * codebook_bits
