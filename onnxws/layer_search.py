"""Layer optimization: the loss of each layer shared alone, and its Pareto-efficient k.

Only one k per index width is a candidate: exact k-means error never grows with k, and
k < 2**b costs the same index bits as 2**b, so k = 2**b (capped by the allowed k range)
dominates its width. The stage walks each layer's widths from a probe width down until the
loss passes a cap (lower widths only lose more) and up until it is negligible; the widths
above that are estimated by the score-free proxy (loss proportional to the option's damage:
its output error when refined, else its clustering error; calibrated on the layer's last
measured point), never scored. Layers advance in
rounds, one tuple each, scored in chunks of ``ROUND_CHUNK`` with the budgets checked between
chunks; after the first round (every layer's probe) the stage stops at ``budget_share`` of
a time or scoring budget, so the network stage can still combine what was measured. When the
search subset has grown, each walk starts at the edge its layer had on the smaller subset.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from onnxws.exploration import BudgetExhausted, Layer, Option, SearchContext

logger = logging.getLogger(__name__)

ROUND_CHUNK = 8
"""Layers scored between two budget checks (a round of a 100-layer model is not one block)."""


@dataclass(frozen=True)
class LayerSearchSettings:
    """Knobs of the layer stage, in multiples of the loss budget B.

    Attributes:
        probe_bits: width scored first for every layer (the closest available).
        cap: a width whose loss alone exceeds ``cap * B`` ends the walk down; it is kept
            out of the candidates (no tuple containing it can meet the budget).
        negligible: a loss at or below ``negligible * B`` ends the walk up.
        budget_share: share of ``--time-budget`` / ``--max-scorings`` the stage may use, so
            that a budget too small for the whole walk still leaves the network stage room
            to combine what was measured (the walk stops between rounds).
    """

    probe_bits: int = 4
    cap: float = 1.5
    negligible: float = 0.05
    budget_share: float = 0.6


@dataclass
class _Walk:
    layer: Layer
    order: list[int]  # option indices sorted by bits ascending
    probe: int  # where the walk starts: the probe width, or the edge found on an earlier subset
    down: int | None  # next index to score going down, None when done
    up: int | None

    def next_index(self) -> int | None:
        if self.down is not None:
            return self.down
        return self.up


def _probe_option(options: list[Option], probe_bits: int) -> Option:
    """The option scored first: the width closest to ``probe_bits`` (the narrower on a tie)."""
    return min(options, key=lambda o: abs(o.bits - probe_bits) + 0.01 * o.bits)


def choose_granularities(
    ctx: SearchContext,
    variants: Mapping[str, Mapping[str, list[Option]]],
    score: Callable[[list[tuple[str, str, int]]], list],
    settings: LayerSearchSettings = LayerSearchSettings(),
) -> dict[str, str]:
    """Per layer with several codebook granularities (``{name: {"tensor": options, "channel": options}}``),
    score each alone at the probe width and keep the better one; sets ``layer.options``.

    The other granularities are probed at the width whose stored size is closest to the
    per-tensor probe's, and win when their damage (output divergence, else loss) is below what
    the per-tensor codebook is estimated to do at that size (its probe scaled by the
    damage proxy of the widest per-tensor option that is not larger): per-channel scales
    (batch norm folded into convolutions) make one codebook per tensor waste its values on
    the wide channels, but a channel codebook also costs ``32 k`` bits per channel.
    ``score([(name, granularity, k), ...])`` returns a metric value or (value, divergence)
    per request; the kept probe is recorded as the layer stage's first scoring of that layer.

    Returns:
        ``{name: granularity}`` for the layers that had a choice (all "tensor" if a budget
        stops the probe).
    """
    requests = []
    for layer in ctx.layers:
        if len(variants.get(layer.name, {})) < 2:
            continue
        probe = _probe_option(variants[layer.name]["tensor"], settings.probe_bits)
        requests.append((layer.name, "tensor", probe))
        for g, opts in variants[layer.name].items():  # the other granularities near the same size
            smaller = [o for o in opts if o.size_bits < layer.full_bits]
            if g != "tensor" and smaller:
                requests.append((layer.name, g, min(smaller, key=lambda o: (abs(o.size_bits - probe.size_bits), o.k))))
    if not requests:
        return {}
    try:
        ctx.check_budget(len(requests))
    except BudgetExhausted:
        return {name: "tensor" for name, _, _ in requests}
    ctx.progress("layer", 0, len(requests), "granularity probes")
    results = score([(name, g, opt.k) for name, g, opt in requests])
    measured: dict[str, dict[str, tuple[Option, object]]] = {}
    for (name, g, opt), value in zip(requests, results):
        measured.setdefault(name, {})[g] = (opt, value)
    chosen = {}
    for name, by_g in measured.items():
        layer = ctx.by_name[name]
        if len(by_g) < 2:  # no other granularity smaller than the unshared tensor
            chosen[name] = "tensor"
            opt, value = by_g["tensor"]
            ctx.record({name: opt.k}, value, "search", "layer")
            continue
        g = _better_granularity(layer, variants[name], by_g, ctx)
        chosen[name] = g
        layer.options = list(variants[name][g])
        opt, value = by_g[g]
        ctx.record({name: opt.k}, value, "search", "layer")
        ctx.count("layer", len(by_g) - 1)
    return chosen


def _damage(value: object, ctx: SearchContext) -> float:
    if isinstance(value, tuple):
        return float(value[1])
    return max(ctx.baseline["search"] - float(value), 0.0)


def _better_granularity(layer: Layer, variants: Mapping[str, list[Option]],
                        measured: Mapping[str, tuple[Option, object]], ctx: SearchContext) -> str:
    t_opt, t_value = measured["tensor"]
    t_damage = _damage(t_value, ctx)
    best, best_ratio = "tensor", 1.0  # another granularity must do strictly less damage
    for g, (opt, value) in measured.items():
        if g == "tensor":
            continue
        fits = [o for o in variants["tensor"] if o.size_bits <= opt.size_bits]
        ref = max(fits, key=lambda o: o.size_bits) if fits else t_opt
        estimate = t_damage * (ref.damage / t_opt.damage) if t_opt.damage > 0 else 0.0
        if estimate <= 0:
            continue
        ratio = _damage(value, ctx) / estimate
        if ratio < best_ratio:
            best, best_ratio = g, ratio
    return best


def layer_sensitivity(ctx: SearchContext, settings: LayerSearchSettings = LayerSearchSettings(),
                      earlier: Mapping[str, Mapping[int, float]] | None = None) -> dict:
    """Measure each layer alone and set ``layer.loss_alone``, ``loss_source`` and ``candidates``.

    ``earlier``: each layer's measured losses alone on a previous (smaller) search subset. A
    layer with such measurements starts its walk at its earlier edge (the narrowest width
    that was within the cap, else the width above the widest measured) instead of at the
    probe width: the losses move when the subset grows, but rarely by several widths, so
    the walk re-measures the edge and its neighbours instead of every width from the probe.

    Returns:
        Proxy statistics for the report: ``{"spearman": mean per-layer rank correlation of
        damage proxy vs measured loss, "estimated_points": m, "rounds": r,
        "started_at_earlier_edge": layers whose walk started from ``earlier``}``.
    """
    budget = ctx.budget
    cap = settings.cap * budget
    negligible = settings.negligible * budget
    walks: list[_Walk] = []
    from_earlier = 0
    for layer in ctx.layers:
        order = sorted(range(len(layer.options)), key=lambda i: layer.options[i].bits)
        start_k = _earlier_edge(layer, order, (earlier or {}).get(layer.name), cap)
        if start_k is None:
            start_k = _probe_option(layer.options, settings.probe_bits).k
        else:
            from_earlier += 1
        start = next(pos for pos, i in enumerate(order) if layer.options[i].k == start_k)
        walks.append(_Walk(layer, order, start, start, None))
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
            for start in range(0, len(requests), ROUND_CHUNK):  # budgets are checked between chunks
                chunk = requests[start:start + ROUND_CHUNK]
                if round_index > 1:
                    _check_share(ctx, settings.budget_share, len(chunk))
                # A width past the cap ends its walk whatever its exact loss: its scoring may stop early.
                losses = ctx.losses([tup for _, _, tup in chunk], "search", stage="layer", reject_above=cap)
                for (walk, pos, tup), loss in zip(chunk, losses):
                    _advance(walk, pos, tup, loss, ctx.divergence(tup), cap, negligible,
                             bounded=ctx.lower_bound(tup) is not None)
            active = [w for w in active if w.next_index() is not None]
    except BudgetExhausted:
        logger.info("layer stage stopped by %s", ctx.stopped_by)
    estimated = 0
    for walk in walks:
        estimated += _estimate_unscored(walk)
        walk.layer.candidates = pareto_candidates(walk.layer, cap)
    return {"spearman": proxy_rank_correlation(ctx.layers), "estimated_points": estimated,
            "rounds": round_index, "started_at_earlier_edge": from_earlier}


def _earlier_edge(layer: Layer, order: list[int], losses: Mapping[int, float] | None, cap: float) -> int | None:
    """The k a walk starts from given the layer's losses alone on an earlier subset, or None."""
    known = [layer.options[i] for i in order if losses and layer.options[i].k in losses]
    if not known:
        return None
    within = [opt for opt in known if losses[opt.k] <= cap]
    if within:
        return within[0].k  # ``order`` is ascending in bits: the narrowest width within the cap
    wider = [layer.options[i] for i in order if layer.options[i].bits > known[-1].bits]
    return (wider[0] if wider else known[-1]).k


def _advance(walk: _Walk, pos: int, tup: dict[str, int], loss: float, divergence: float | None,
             cap: float, negligible: float, bounded: bool = False) -> None:
    """Record a layer-alone measurement (``bounded``: the least loss of a scoring stopped early,
    above the cap) and move the layer's walk to its next width (or end it)."""
    layer = walk.layer
    k = tup[layer.name]
    layer.loss_alone[k] = loss
    layer.loss_source[k] = "lower_bound" if bounded else "measured"
    if divergence is not None:
        layer.divergence_alone[k] = divergence
    if walk.down is not None:  # walking down from the probe
        if pos == walk.probe:
            walk.up = pos + 1 if (loss > negligible and pos + 1 < len(walk.order)) else None
        walk.down = None if (loss > cap or pos == 0) else pos - 1
    else:  # walking up
        walk.up = pos + 1 if (loss > negligible and pos + 1 < len(walk.order)) else None


def _check_share(ctx: SearchContext, share: float, wanted: int) -> None:
    """Raise BudgetExhausted (recording which budget) when the stage has used its share."""
    if ctx.time_budget is not None and ctx.elapsed() >= share * ctx.time_budget:
        ctx.stopped_by = "time_budget"
        raise BudgetExhausted
    if ctx.max_scorings is not None and ctx.scorings + wanted > share * ctx.max_scorings:
        ctx.stopped_by = "max_scorings"
        raise BudgetExhausted


def _estimate_unscored(walk: _Walk) -> int:
    """Proxy for the widths above the highest measured one: loss (and output divergence)
    scale with the damage proxy."""
    layer = walk.layer
    measured = [i for i in walk.order if layer.options[i].k in layer.loss_alone]
    if not measured:
        return 0
    top = max(measured, key=lambda i: layer.options[i].bits)
    ref = layer.options[top]
    ref_loss = max(layer.loss_alone[ref.k], 0.0)
    ref_divergence = layer.divergence_alone.get(ref.k)
    count = 0
    for i in walk.order:
        option = layer.options[i]
        if option.bits > ref.bits and option.k not in layer.loss_alone:
            scale = min(option.damage / ref.damage, 1.0) if ref.damage > 0 else 0.0
            layer.loss_alone[option.k] = ref_loss * scale
            layer.loss_source[option.k] = "proxy"
            if ref_divergence is not None:
                layer.divergence_alone[option.k] = ref_divergence * scale
            count += 1
    return count


def pareto_candidates(layer: Layer, cap: float) -> list[int]:
    """Ks with loss alone <= cap on the Pareto front of (size, damage), smallest size first.

    Damage is the output divergence when every such k has one (smooth: a wider index that
    measures the same quantised loss on the search subset still does less damage), else
    the loss alone.
    """
    known = [opt for opt in layer.options if opt.k in layer.loss_alone and layer.loss_alone[opt.k] <= cap]
    damage = layer.divergence_alone if all(opt.k in layer.divergence_alone for opt in known) else layer.loss_alone
    known.sort(key=lambda opt: (opt.size_bits, damage[opt.k]))
    kept: list[int] = []
    best = np.inf
    for opt in known:  # ascending size: keep an option that does strictly less damage than every smaller one
        if damage[opt.k] < best - 1e-15:
            kept.append(opt.k)
            best = damage[opt.k]
    return kept


def proxy_rank_correlation(layers: list[Layer]) -> float | None:
    """Mean over layers (>= 3 measured widths) of Spearman's rho between damage proxy and loss."""
    rhos = []
    for layer in layers:
        pts = [(layer.option(k).damage, loss) for k, loss in layer.measured_losses().items()]
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
