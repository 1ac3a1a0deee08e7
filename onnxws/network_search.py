"""Network optimization: choose one k per layer so the network meets the loss budget.

Strategies:
- ``predictor`` (default): the paper's linear predictor fitted on a few scored random tuples
  near the budget, its predicted Pareto front searched exactly (onnxws.predictor), then
  active refinement: the most compressive tuples predicted within budget are scored for real,
  added to the fit, and the loop repeats until the best verified tuple stops improving.
- ``exhaustive``: the exact optimum over the product of the layer stage's candidate sets:
  tuples in descending-CR order on the search subset, the first within budget wins.
- ``greedy``: from every layer at its safest candidate, repeatedly take the one-layer step
  down that saves the most bits while staying within budget (real scoring of every step).

Every strategy returns tuples verified on the search subset, best first; ``verify`` then
checks them on the full set and steps back along that list until one holds.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import numpy as np

from onnxws.exploration import BudgetExhausted, Layer, SearchContext, Tuple_, within_budget
from onnxws.predictor import FrontPoint, LinearLossPredictor, pareto_front

logger = logging.getLogger(__name__)

UNSHARED = 0  # item k meaning "leave this layer unshared"
FIT_WINDOW = 1.5  # the predictor is fitted on scored tuples with loss <= FIT_WINDOW * budget


@dataclass
class SearchOutcome:
    """What a strategy found.

    Attributes:
        feasible: tuples within budget on the search subset, best (highest CR) first.
        front: the last predicted front (tuple, ratio, predicted loss), for the report.
        predictor: fit statistics, or None.
    """

    feasible: list[Tuple_] = field(default_factory=list)
    front: list[tuple[Tuple_, float, float]] = field(default_factory=list)
    predictor: dict | None = None


def _items(layer: Layer) -> list[tuple[int, int, float]]:
    """(k, size_bits, loss alone) for each candidate of a layer, plus 'unshared'."""
    out = [(k, layer.option(k).size_bits, layer.loss_alone[k]) for k in layer.candidates]
    out.append((UNSHARED, layer.full_bits, 0.0))
    return out


def _tuple(layers: list[Layer], ks: tuple[int, ...]) -> Tuple_:
    return {layer.name: k for layer, k in zip(layers, ks) if k != UNSHARED}


def _features(layers: list[Layer], tup: Tuple_) -> np.ndarray:
    return np.array([layer.loss_alone.get(tup.get(layer.name, UNSHARED), 0.0) if layer.name in tup else 0.0
                     for layer in layers])


def _feasible_sorted(ctx: SearchContext, subset: str = "search") -> list[Tuple_]:
    rows = []
    for entry in ctx.explored:
        if entry.k and entry.subset == subset and within_budget(entry.loss_measured, ctx.target):
            rows.append(entry.k)
    unique = {SearchContext.key(t): t for t in rows}
    return sorted(unique.values(), key=lambda t: (-ctx.ratio(t), ctx.known(t) or 0.0))


# ---------------------------------------------------------------------------------------
def predictor_search(
    ctx: SearchContext,
    *,
    seed: int = 0,
    n_random: int | None = None,
    per_round: int = 2,
    patience: int = 4,
    ridge: float = 0.3,
) -> SearchOutcome:
    """The paper's predictor + exact front search + active refinement (module docstring)."""
    layers = ctx.layers
    items = [_items(layer) for layer in layers]
    rng = np.random.default_rng(seed)
    predictor = LinearLossPredictor(len(layers), ridge=ridge)
    outcome = SearchOutcome()
    if n_random is None:
        n_random = int(min(2 * len(layers) + 1, 12))
    X_rows: list[np.ndarray] = []
    y_rows: list[float] = []
    randoms: list[Tuple_] = []

    def absorb(tuples: list[Tuple_], losses: list[float]) -> None:
        for tup, loss in zip(tuples, losses):
            X_rows.append(_features(layers, tup))
            y_rows.append(loss)

    def fit_predictor() -> None:
        """Fit on the tuples near the budget: the linear model only has to hold there, and
        tuples far past it are super-additive (several layers at their edge at once)."""
        X = np.array(X_rows).reshape(-1, len(layers))
        y = np.array(y_rows)
        near = y <= FIT_WINDOW * ctx.budget
        if near.sum() >= 2:
            X, y = X[near], y[near]
        predictor.fit(X, y)

    def front_for(alphas: np.ndarray, limit: float) -> list[FrontPoint]:
        weighted = [[(size, float(a) * loss) for _, size, loss in layer_items]
                    for a, layer_items in zip(alphas, items)]
        return pareto_front(weighted, loss_limit=limit)

    try:
        # 1. Random tuples near the budget for the regression (the paper's sample).
        for _ in range(n_random * 4):
            if len(randoms) >= n_random:
                break
            noise = np.exp(rng.uniform(np.log(0.33), np.log(3.0), size=len(layers)))
            level = ctx.target * rng.uniform(0.4, 1.6)
            points = front_for(noise, level)
            if not points:
                continue
            pick = points[0] if rng.random() < 0.5 else points[int(rng.integers(len(points)))]
            tup = _tuple(layers, tuple(items[i][c][0] for i, c in enumerate(pick.choice)))
            if tup and all(SearchContext.key(tup) != SearchContext.key(t) for t in randoms):
                randoms.append(tup)
        ctx.progress("fit", 0, len(randoms), "scoring random tuples for the predictor")
        if randoms:
            absorb(randoms, ctx.losses(randoms, "search", stage="fit"))

        # 2. Active refinement.
        stale = 0
        best_ratio = max((ctx.ratio(t) for t in _feasible_sorted(ctx)), default=0.0)
        while True:
            fit_predictor()
            # Explore within the predictor's own error band: a tuple predicted just above the
            # target may well be within it, and scoring it is what improves the fit there.
            band = predictor.loo_mae_ if predictor.loo_mae_ is not None else 0.25 * ctx.target
            front = front_for(predictor.alphas_, ctx.target + band)
            better = []
            for point in front:  # ascending size = descending CR
                tup = _tuple(layers, tuple(items[i][c][0] for i, c in enumerate(point.choice)))
                if tup and ctx.known(tup) is None and ctx.ratio(tup) > best_ratio:
                    better.append((tup, point.loss))
            inside = [p for p in better if p[1] <= ctx.target + 1e-12]
            proposals = inside[:per_round] or sorted(better, key=lambda p: p[1])[:per_round]
            outcome.front = [(_tuple(layers, tuple(items[i][c][0] for i, c in enumerate(p.choice))),
                              ctx.total_full_bits / max(p.size_bits, 1), p.loss) for p in front
                             if p.loss <= ctx.target + 1e-12]
            if not proposals:
                break
            tuples = [p[0] for p in proposals]
            losses = ctx.losses(tuples, "search", stage="network", predicted=[p[1] for p in proposals])
            absorb(tuples, losses)
            new_best = max((ctx.ratio(t) for t in _feasible_sorted(ctx)), default=0.0)
            ctx.progress("network", len(y_rows), 0, _best_message(ctx))
            if new_best > best_ratio + 1e-9:
                best_ratio, stale = new_best, 0
            else:
                stale += 1
                if stale >= patience:
                    break
    except BudgetExhausted:
        logger.info("network search stopped by %s", ctx.stopped_by)
    if y_rows:
        fit_predictor()
        outcome.predictor = {
            "alphas": {layer.name: float(a) for layer, a in zip(layers, predictor.alphas_)},
            "intercept": 0.0,
            "r2": predictor.r2_,
            "loo_mae": predictor.loo_mae_,
            "n_fit": predictor.n_fit_,
            "n_random": len(randoms),
            "ridge": ridge,
        }
        outcome.alphas = predictor.alphas_  # type: ignore[attr-defined]
    outcome.feasible = _feasible_sorted(ctx)
    return outcome


def _best_message(ctx: SearchContext) -> str:
    feasible = _feasible_sorted(ctx)
    if not feasible:
        return "no tuple within budget yet"
    best = feasible[0]
    return f"best {ctx.ratio(best):.1f}x at {ctx.known(best):.2f}"


# ---------------------------------------------------------------------------------------
def exhaustive_search(ctx: SearchContext, *, batch: int = 8, max_tuples: int = 5_000_000) -> SearchOutcome:
    """Score tuples of the candidate product in descending CR order; first within budget wins."""
    layers = ctx.layers
    items = [_items(layer) for layer in layers]
    total = int(np.prod([len(it) for it in items], dtype=np.float64))
    if total > max_tuples:
        raise ValueError(f"exhaustive search over {total} tuples is too large (limit {max_tuples}); "
                         "use --strategy predictor or restrict bits in the config")
    sizes = np.zeros(1, dtype=np.int64)
    for layer_items in items:
        sizes = (sizes[:, None] + np.array([it[1] for it in layer_items])[None, :]).reshape(-1)
    order = np.argsort(sizes, kind="stable")
    shape = [len(it) for it in items]
    outcome = SearchOutcome()
    found = False
    try:
        for start in range(0, len(order), batch):
            chunk = order[start:start + batch]
            tuples = [_tuple(layers, tuple(items[i][c][0] for i, c in enumerate(np.unravel_index(flat, shape))))
                      for flat in chunk]
            tuples = [t for t in tuples if t]
            losses = ctx.losses(tuples, "search", stage="network")
            ctx.progress("network", ctx.scorings, 0, _best_message(ctx))
            if any(within_budget(loss, ctx.target) for loss in losses):
                found = True
                break
    except BudgetExhausted:
        logger.info("exhaustive search stopped by %s", ctx.stopped_by)
    outcome.feasible = _feasible_sorted(ctx)
    ctx.exhaustive_order = (order, items, shape, start + batch if found else len(order))  # type: ignore[attr-defined]
    return outcome


def exhaustive_continue(ctx: SearchContext, rejected: set, batch: int = 8) -> Tuple_ | None:
    """Step back along the descending-CR order after full-set rejections (exhaustive mode)."""
    order, items, shape, pos = ctx.exhaustive_order  # type: ignore[attr-defined]
    layers = ctx.layers
    while pos < len(order):
        chunk = order[pos:pos + batch]
        pos += batch
        ctx.exhaustive_order = (order, items, shape, pos)  # type: ignore[attr-defined]
        tuples = [_tuple(layers, tuple(items[i][c][0] for i, c in enumerate(np.unravel_index(flat, shape))))
                  for flat in chunk]
        tuples = [t for t in tuples if t]
        losses = ctx.losses(tuples, "search", stage="network")
        for tup, loss in zip(tuples, losses):
            if within_budget(loss, ctx.target) and SearchContext.key(tup) not in rejected:
                return tup
    return None


# ---------------------------------------------------------------------------------------
def greedy_search(ctx: SearchContext) -> SearchOutcome:
    """Greedy baseline: one-layer steps down, each round scoring every layer's next step."""
    layers = ctx.layers
    items = [_items(layer) for layer in layers]
    # Items sorted by size descending: position 0 is unshared, then the safest candidate, ...
    ladders = [sorted(it, key=lambda x: -x[1]) for it in items]
    position = [1 if len(ladder) > 1 else 0 for ladder in ladders]
    outcome = SearchOutcome()

    def current() -> Tuple_:
        return _tuple(layers, tuple(ladders[i][p][0] for i, p in enumerate(position)))

    try:
        start = current()
        if start:
            ctx.losses([start], "search", stage="network")
        while True:
            steps = []
            for i, ladder in enumerate(ladders):
                if position[i] + 1 < len(ladder):
                    trial = list(position)
                    trial[i] += 1
                    steps.append((i, _tuple(layers, tuple(ladders[j][p][0] for j, p in enumerate(trial)))))
            if not steps:
                break
            losses = ctx.losses([t for _, t in steps], "search", stage="network")
            ctx.progress("network", ctx.scorings, 0, _best_message(ctx))
            ok = [(ctx.size_bits(t), loss, i) for (i, t), loss in zip(steps, losses) if within_budget(loss, ctx.target)]
            if not ok:
                break
            ok.sort()
            position[ok[0][2]] += 1
    except BudgetExhausted:
        logger.info("greedy search stopped by %s", ctx.stopped_by)
    outcome.feasible = _feasible_sorted(ctx)
    return outcome


# ---------------------------------------------------------------------------------------
def uniform_baseline(ctx: SearchContext, widths: list[int]) -> tuple[Tuple_ | None, dict[int, float]]:
    """Best single k for every layer within budget (search subset), by bisection on width.

    Returns the tuple (None if no width fits) and the measured loss per width tried.
    """
    ks = sorted({2 ** b for b in widths})
    tried: dict[int, float] = {}

    def tup_for(k: int) -> Tuple_:
        return {layer.name: _nearest_k(layer, k) for layer in ctx.layers}

    lo, hi = 0, len(ks) - 1
    best: int | None = None
    try:
        while lo <= hi:
            mid = (lo + hi) // 2
            loss = ctx.losses([tup_for(ks[mid])], "search", stage="uniform")[0]
            tried[ks[mid]] = loss
            if within_budget(loss, ctx.target):
                best, hi = ks[mid], mid - 1
            else:
                lo = mid + 1
    except BudgetExhausted:
        pass
    return (tup_for(best) if best is not None else None), tried


def _nearest_k(layer: Layer, k: int) -> int:
    """The layer's option with the largest k not above ``k`` (layers may cap k)."""
    ks = sorted(opt.k for opt in layer.options)
    below = [x for x in ks if x <= k]
    return below[-1] if below else ks[0]


# ---------------------------------------------------------------------------------------
def verify_full(ctx: SearchContext, ranked: list[Tuple_], *, max_tries: int = 6) -> tuple[Tuple_ | None, list]:
    """Score ranked tuples on the full set; the first within budget is the answer (step-back).

    Returns (tuple or None, [(tuple, search loss, full loss), ...] tried).
    """
    tried = []
    for tup in ranked[:max_tries]:
        loss = ctx.losses([tup], "full", stage="verify", force=True)[0]
        tried.append((tup, ctx.known(tup, "search"), loss))
        if within_budget(loss, ctx.budget):
            return tup, tried
    return None, tried
