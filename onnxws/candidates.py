"""Cluster stage: every shareable tensor's candidates, one per codebook size k.

For each tensor the run's settings give the widths to try; ``clustering`` finds the exact
1-D k-means codebook for every k in one pass, and ``refinement`` (where the tensor's consumer
allows it) lowers each candidate's output error using the input moments measured once on the
search subset (``calibrate``). The result is ``Candidates``: for every tensor its ``Layer``
(the options the search chooses from, each with its size and damage proxy) and the shared
forms behind them, which decode to the arrays the scorer runs.

With granularity ``auto`` a tensor gets both a per-tensor and a per-channel set of candidates;
the layer stage measures both and keeps one (``use_granularities``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxws.clustering import share_weight_all_k
from onnxws.config import CompressConfig
from onnxws.discovery import Discovery
from onnxws.exploration import Layer, Option
from onnxws.refinement import Moments, Plan, measure_moments, refine_all
from onnxws.refinement import plan as plan_refinement
from onnxws.scoring import Scorer
from onnxws.sharing import Granularity, SharedWeight, index_bits

ProgressFn = Callable[[str, int, int, str], None]
ReadFn = Callable[[list[str]], Iterable[Mapping[str, np.ndarray]]]


def dtype_bits(dtype: str) -> int:
    """Bits of one stored value of a float tensor of ``dtype`` (a codebook entry keeps it)."""
    return 16 if dtype in ("float16", "bfloat16") else 32


def refinement_plan(model: onnx.ModelProto, discovery: Discovery, config: CompressConfig) -> Plan:
    """Which weights the run refines and whose biases it corrects (and why not the others)."""
    if not config.refine:
        return Plan(reasons={w.name: "refinement off (--no-refine)" for w in discovery.weights})
    found = plan_refinement(model, {w.name: w.shape for w in discovery.weights})
    if not config.bias_correction:
        found.bias_reasons.update({name: "bias correction off (--no-bias-correction)" for name in found.biases})
        found.biases.clear()
    return found


def calibrate(read: ReadFn, n_batches: int, refine: Plan, discovery: Discovery, config: CompressConfig,
              notify: ProgressFn) -> dict[str, Moments]:
    """Input moments of the refinable weights: one pass of ``read`` (activations of the unmodified
    model over the search subset, ``n_batches`` runs) when refinement is on, else none."""
    if not config.refine:
        return {}
    done = [0]

    def measured(message: str) -> None:
        done[0] += 1
        notify("calibrate", done[0], max(done[0], n_batches), message)  # more runs when read in groups

    shapes = {w.name: w.shape for w in discovery.weights}
    return measure_moments(read, refine, shapes, n_batches, seed=config.seed, progress=measured)


@dataclass
class Candidates:
    """The cluster stage's result.

    Attributes:
        layers: one ``Layer`` per shareable tensor (discovery order): its options by k.
        shares: tensor -> k -> the shared form of that option (the granularity in use).
        variants: for granularity ``auto``: tensor -> granularity -> (options, shared forms).
        output_errors: tensor -> granularity -> k -> refined output error (refined tensors).
        refined_rows: tensor -> input vectors its moments were measured on.
        refine_seconds: time spent refining (inside the stage's time).
    """

    layers: list[Layer]
    shares: dict[str, dict[int, SharedWeight]]
    variants: dict[str, dict[str, tuple[list[Option], dict[int, SharedWeight]]]] = field(default_factory=dict)
    output_errors: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)
    refined_rows: dict[str, int] = field(default_factory=dict)
    refine_seconds: float = 0.0

    def arrays(self, tup: Mapping[str, int]) -> dict[str, np.ndarray]:
        """The decoded arrays of a tuple (tensor -> k): what the scorer runs."""
        return {key: value for name, k in tup.items() for key, value in self.shares[name][k].tensors().items()}

    def lazily(self, tuples: Iterable[Mapping[str, int]]) -> Iterator[dict[str, np.ndarray]]:
        """Each tuple's arrays, decoded only when the scorer reaches it: a request of n whole-model
        tuples would otherwise hold n decoded copies of the weights at once."""
        return (self.arrays(tup) for tup in tuples)

    def evaluator(self, scorer: Scorer) -> Callable[..., list[tuple]]:
        """The search context's evaluator: tuples scored by ``scorer`` (value, divergence, spread);
        ``stop`` is called between the batches of each scoring (an interruptible ``SearchContext``);
        with ``reject_below`` a scoring may stop early with a ``Rejected`` (``rejects_early``)."""
        return lambda tuples, subset, stop=None, reject_below=None: scorer.score_with_divergence(
            self.lazily(tuples), subset, spread=True, stop=stop, reject_below=reject_below)

    def variant_scorer(self, scorer: Scorer) -> Callable[[list[tuple[str, str, int]]], list[tuple]]:
        """The layer stage's scorer of (tensor, granularity, k) requests (search subset)."""
        return lambda requests: scorer.score_with_divergence(self.variant_arrays(requests))

    def variant_options(self) -> dict[str, dict[str, list[Option]]]:
        """For granularity ``auto``: tensor -> granularity -> its options."""
        return {name: {g: opts for g, (opts, _) in by_g.items()} for name, by_g in self.variants.items()}

    def variant_arrays(self, requests: Iterable[tuple[str, str, int]]) -> Iterator[dict[str, np.ndarray]]:
        """The decoded arrays of (tensor, granularity, k) requests, one at a time."""
        return (self.variants[name][g][1][k].tensors() for name, g, k in requests)

    def use_granularities(self, picked: Mapping[str, str]) -> None:
        """Keep the granularity the layer stage picked for each ``auto`` tensor."""
        for name, g in picked.items():
            self.shares[name] = self.variants[name][g][1]

    def chosen(self, tup: Mapping[str, int]) -> list[SharedWeight]:
        """The shared forms of the answer; every other candidate is dropped (memory before emit)."""
        shared = [self.shares[name][k] for name, k in tup.items()]
        self.shares = {name: {k: self.shares[name][k]} for name, k in tup.items()}
        self.variants.clear()
        return shared


def build_candidates(discovery: Discovery, config: CompressConfig, originals: Mapping[str, np.ndarray],
                     moments: dict[str, Moments], refine: Plan, notify: ProgressFn) -> Candidates:
    """Cluster (and refine) every shareable tensor at every k its settings allow.

    ``moments`` is emptied as it is used (a weight's H can be large).
    """
    found = Candidates([], {}, refined_rows={name: m.rows for name, m in moments.items()})
    for i, info in enumerate(discovery.weights):
        notify("cluster", i, len(discovery.weights), info.name)
        settings = config.settings_for(info.name, info.op_type)
        ks = sorted({min(2 ** b, settings.k_max) for b in settings.bits})
        values = originals[info.name]
        cb_bits = dtype_bits(info.dtype)
        kinds = [settings.granularity]
        if settings.granularity.kind == "auto":  # both measured in the layer stage
            kinds = [Granularity("tensor")]
            if values.ndim >= 2 and values.shape[info.channel_axis] > 1:
                kinds.append(Granularity("channel"))
        for granularity in kinds:
            by_k = share_weight_all_k(info.name, values, ks, granularity, info.channel_axis)
            damage = {k: float(sw.inertia) for k, sw in by_k.items()}
            if info.name in moments:  # damage proxy: the output error (refined), not the weights'
                t_refine = time.perf_counter()
                bias = refine.biases.get(info.name)
                by_k, damage = refine_all(by_k, values, moments[info.name],
                                          bias=None if bias is None else (bias, originals[bias.name]))
                found.output_errors.setdefault(info.name, {})[str(granularity)] = damage
                found.refine_seconds += time.perf_counter() - t_refine
            options = [Option(k, index_bits(k), sw.stored_bits(cb_bits), damage[k]) for k, sw in sorted(by_k.items())]
            if granularity is kinds[0]:
                found.shares[info.name] = by_k
                found.layers.append(Layer(info.name, info.params, info.params * cb_bits, options))
            if len(kinds) > 1:
                found.variants.setdefault(info.name, {})[granularity.kind] = (options, by_k)
        del values
    moments.clear()
    notify("cluster", len(discovery.weights), len(discovery.weights), "done")
    return found
