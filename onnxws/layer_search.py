"""Layer optimization: the loss of each layer shared alone, and its Pareto-efficient k.

Only one k per index width is a candidate: exact k-means error never grows with k, and
k < 2**b costs the same index bits as 2**b, so k = 2**b (capped by the allowed k range)
dominates its width. The stage walks each layer's widths from a probe width down until the
loss passes a cap (lower widths only lose more) and up until it is negligible; the widths
above that are estimated by the score-free proxy (loss proportional to the clustering
error, calibrated on the layer's last measured point), never scored. Layers advance in
rounds, one tuple each, so a round is one batch for the scorer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from onnxws.exploration import BudgetExhausted, Layer, SearchContext

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerSearchSettings:
    """Knobs of the layer stage, in multiples of the loss budget B.

    Attributes:
        probe_bits: width scored first for every layer (the closest available).
        cap: a width whose loss alone exceeds ``cap * B`` ends the walk down; it is kept
            out of the candidates (no tuple containing it can meet the budget).
        negligible: a loss at or below ``negligible * B`` ends the walk up.
    """

    probe_bits: int = 4
    cap: float = 1.5
    negligible: float = 0.05


@dataclass
class _Walk:
    layer: Layer
    order: list[int]  # option indices sorted by bits ascending
    probe: int
    down: int | None  # next index to score going down, None when done
    up: int | None

    def next_index(self) -> int | None:
        if self.down is not None:
            return self.down
        return self.up


def layer_sensitivity(ctx: SearchContext, settings: LayerSearchSettings = LayerSearchSettings()) -> dict:
    """Measure each layer alone and set ``layer.loss_alone``, ``loss_source`` and ``candidates``.

    Returns:
        Proxy statistics for the report: ``{"spearman": mean per-layer rank correlation of
        clustering error vs measured loss, "layers_with_proxy": n, "estimated_points": m}``.
    """
    budget = ctx.budget
    walks: list[_Walk] = []
    for layer in ctx.layers:
        order = sorted(range(len(layer.options)), key=lambda i: layer.options[i].bits)
        bits = [layer.options[i].bits for i in order]
        probe_pos = int(np.argmin([abs(b - settings.probe_bits) + 0.01 * b for b in bits]))
        walks.append(_Walk(layer, order, probe_pos, probe_pos, None))
    cap = settings.cap * budget
    negligible = settings.negligible * budget
    active = list(walks)
    round_index = 0
    try:
        while active:
            round_index += 1
            requests = []
            for walk in active:
                pos = walk.next_index()
                option = walk.layer.options[walk.order[pos]]
                requests.append((walk, pos, {walk.layer.name: option.k}))
            ctx.progress("layer", sum(len(w.layer.loss_alone) for w in walks), 0, f"round {round_index}")
            losses = ctx.losses([tup for _, _, tup in requests], "search", stage="layer")
            for (walk, pos, tup), loss in zip(requests, losses):
                k = tup[walk.layer.name]
                walk.layer.loss_alone[k] = loss
                walk.layer.loss_source[k] = "measured"
                if walk.down is not None:  # walking down from the probe
                    if pos == walk.probe:
                        walk.up = pos + 1 if (loss > negligible and pos + 1 < len(walk.order)) else None
                    if loss > cap or pos == 0:
                        walk.down = None
                    else:
                        walk.down = pos - 1
                else:  # walking up
                    walk.up = pos + 1 if (loss > negligible and pos + 1 < len(walk.order)) else None
            active = [w for w in active if w.next_index() is not None]
    except BudgetExhausted:
        logger.info("layer stage stopped by %s", ctx.stopped_by)
    estimated = 0
    for walk in walks:
        estimated += _estimate_unscored(walk)
        walk.layer.candidates = pareto_candidates(walk.layer, cap)
    return {"spearman": proxy_rank_correlation(ctx.layers), "estimated_points": estimated,
            "rounds": round_index}


def _estimate_unscored(walk: _Walk) -> int:
    """Proxy for the widths above the highest measured one: loss scales with clustering error."""
    layer = walk.layer
    measured = [i for i in walk.order if layer.options[i].k in layer.loss_alone]
    if not measured:
        return 0
    top = max(measured, key=lambda i: layer.options[i].bits)
    ref = layer.options[top]
    ref_loss = max(layer.loss_alone[ref.k], 0.0)
    count = 0
    for i in walk.order:
        option = layer.options[i]
        if option.bits > ref.bits and option.k not in layer.loss_alone:
            scale = option.inertia / ref.inertia if ref.inertia > 0 else 0.0
            layer.loss_alone[option.k] = ref_loss * min(scale, 1.0)
            layer.loss_source[option.k] = "proxy"
            count += 1
    return count


def pareto_candidates(layer: Layer, cap: float) -> list[int]:
    """Ks on the (size, loss-alone) Pareto front with loss <= cap, smallest size first."""
    known = [opt for opt in layer.options if opt.k in layer.loss_alone and layer.loss_alone[opt.k] <= cap]
    known.sort(key=lambda opt: (opt.size_bits, layer.loss_alone[opt.k]))
    kept: list[int] = []
    best = np.inf
    for opt in known:  # ascending size: keep an option that loses strictly less than every smaller one
        loss = layer.loss_alone[opt.k]
        if loss < best - 1e-12:
            kept.append(opt.k)
            best = loss
    return kept


def proxy_rank_correlation(layers: list[Layer]) -> float | None:
    """Mean over layers (>= 3 measured widths) of Spearman's rho between clustering error and loss."""
    rhos = []
    for layer in layers:
        pts = [(layer.option(k).inertia, loss) for k, loss in layer.loss_alone.items()
               if layer.loss_source.get(k) == "measured"]
        if len(pts) < 3:
            continue
        x = _ranks(np.array([p[0] for p in pts]))
        y = _ranks(np.array([p[1] for p in pts]))
        if np.std(x) == 0 or np.std(y) == 0:
            continue
        rhos.append(float(np.corrcoef(x, y)[0, 1]))
    return float(np.mean(rhos)) if rhos else None


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    return ranks
