"""The uniform baseline: one codebook size for every layer, what users would otherwise do.

The best single width within budget is found by bisection on the search subset, then checked
on the full set (``verify_uniform``); the report compares the per-layer answer with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from onnxws.exploration import BudgetExhausted, Layer, SearchContext, Tuple_, within_budget


@dataclass
class UniformBaseline:
    """The uniform baseline of a run: its tuple (None if no width fits), its full-set loss, and
    the search-subset loss of every k tried."""

    tuple: Tuple_ | None = None
    loss_full: float | None = None
    tried: dict[int, float] = field(default_factory=dict)


def uniform_stage(ctx: SearchContext, widths: list[int]) -> UniformBaseline:
    """Bisection on the search subset, then the full-set check (``verify_uniform``)."""
    found, tried = uniform_baseline(ctx, widths)
    found, full = verify_uniform(ctx, widths, found, tried)
    return UniformBaseline(found, full, tried)


def uniform_baseline(ctx: SearchContext, widths: list[int]) -> tuple[Tuple_ | None, dict[int, float]]:
    """Best single k for every layer within budget (search subset), by bisection on width.

    Returns the tuple (None if no width fits) and the measured loss per width tried.
    """
    ks = sorted({2 ** b for b in widths})
    tried: dict[int, float] = {}
    lo, hi = 0, len(ks) - 1
    best: int | None = None
    try:
        while lo <= hi:
            mid = (lo + hi) // 2
            loss = ctx.losses([_uniform_tuple(ctx, ks[mid])], "search", stage="uniform")[0]
            tried[ks[mid]] = loss
            if within_budget(loss, ctx.target):
                best, hi = ks[mid], mid - 1
            else:
                lo = mid + 1
    except BudgetExhausted:
        pass
    return (_uniform_tuple(ctx, best) if best is not None else None), tried


def verify_uniform(ctx: SearchContext, widths: list[int], found: Tuple_ | None,
                   tried: dict[int, float]) -> tuple[Tuple_ | None, float | None]:
    """The uniform baseline's tuple measured on the full set, and its loss there.

    When it misses the budget, the next wider width is measured (on the subset first, unless
    ``uniform_baseline`` already did) and, if it holds there, on the full set: the subset's best
    width can miss by a sample (the zoo's LSTM: k=4 lost 5 of 497), and the baseline a per-layer
    answer is compared with should be one that holds. Returns the original tuple and its loss
    when that step does not hold either. ``tried`` gains the width measured on the subset.
    """
    if found is None:
        return None, None
    full = ctx.losses([found], "full", stage="uniform", force=True)[0]
    wider = [2 ** b for b in sorted(set(widths)) if 2 ** b > max(found.values())]
    if within_budget(full, ctx.budget) or not wider:
        return found, full
    step = _uniform_tuple(ctx, wider[0])
    if SearchContext.key(step) == SearchContext.key(found):
        return found, full
    try:
        if wider[0] not in tried:
            tried[wider[0]] = ctx.losses([step], "search", stage="uniform")[0]
        if not within_budget(tried[wider[0]], ctx.target):
            return found, full
        step_full = ctx.losses([step], "full", stage="uniform")[0]
    except BudgetExhausted:
        return found, full
    return (step, step_full) if within_budget(step_full, ctx.budget) else (found, full)


def _uniform_tuple(ctx: SearchContext, k: int) -> Tuple_:
    """Every layer at ``k`` shared values (or its largest option below, where a layer caps k)."""
    return {layer.name: _nearest_k(layer, k) for layer in ctx.layers}


def _nearest_k(layer: Layer, k: int) -> int:
    """The layer's option with the largest k not above ``k`` (layers may cap k)."""
    ks = sorted(opt.k for opt in layer.options)
    below = [x for x in ks if x <= k]
    return below[-1] if below else ks[0]
