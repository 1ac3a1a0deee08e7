"""Network optimization: choose one k per layer so the network meets the loss budget.

Strategies:
- ``predictor`` (default): the paper's linear predictor fitted on a few scored random tuples
  near the budget, its predicted Pareto front searched exactly (onnxws.predictor), then
  active refinement: the most compressive tuples predicted within budget are scored for real,
  added to the fit, and the loop repeats until the best verified tuple stops improving.
  Proposals stay within a trust region (``TRUST_RADIUS`` above the best feasible CR), which
  halves when a round's proposals all lose more than the fit window and doubles on a new best:
  a model fitted near the budget is least reliable where it extrapolates furthest (PP-OCR:
  tuples 35 % past the best feasible one, predicted at 0.8 pp, lost 6-37 pp).
- ``exhaustive``: the exact optimum over the product of the layer stage's candidate sets:
  tuples in descending-CR order on the search subset, the first within budget wins.
- ``greedy``: from every layer at its safest candidate, repeatedly take the one-layer step
  down that saves the most bits while staying within budget (real scoring of every step).

Every strategy returns tuples verified on the search subset, best first; ``verify`` then
checks them on the full set and steps back along that list until one holds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from onnxws.exploration import BudgetExhausted, Layer, SearchContext, Tuple_, within_budget
from onnxws.loss_models import FIT_WINDOW, UNSHARED, choice_items, loss_model_for
from onnxws.predictor import FrontPoint, pareto_front

logger = logging.getLogger(__name__)

TRUST_RADIUS = 0.25  # active refinement proposes tuples at most this fraction more compressive than the best
TRUST_MAX = 1.0      # feasible one (halved after a round whose proposals all land past the fit window,
                     # doubled on a new best up to TRUST_MAX)


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


def _tuple(layers: list[Layer], ks: tuple[int, ...]) -> Tuple_:
    return {layer.name: k for layer, k in zip(layers, ks) if k != UNSHARED}


def _feasible_sorted(ctx: SearchContext, subset: str = "search") -> list[Tuple_]:
    rows = []
    for entry in ctx.explored:
        if entry.k and entry.subset == subset and within_budget(entry.loss_measured, ctx.target):
            rows.append(entry.k)
    unique = {SearchContext.key(t): t for t in rows}
    return sorted(unique.values(), key=lambda t: (-ctx.ratio(t), ctx.known(t) or 0.0))


def predictor_search(
    ctx: SearchContext,
    *,
    seed: int = 0,
    n_random: int | None = None,
    per_round: int = 2,
    patience: int = 4,
    ridge: float = 0.3,
    model: str = "auto",
) -> SearchOutcome:
    """The predictor + exact front search + active refinement (module docstring).

    Args:
        model: ``divergence`` (the loss as a fitted function of the summed output divergences,
            used when the evaluator reports divergences), ``additive`` (the paper's sum of
            weighted losses alone) or ``auto`` (each round, the one with the smaller
            leave-one-out error on the tuples scored so far).
    """
    layers = ctx.layers
    loss_model = loss_model_for(ctx, model, ridge)
    rng = np.random.default_rng(seed)
    outcome = SearchOutcome()
    if n_random is None:
        n_random = int(min(2 * len(layers) + 1, 12))
    fitted: list[Tuple_] = []  # the scored tuples of this stage
    randoms: list[Tuple_] = []

    def front_for(alphas: np.ndarray, limit: float) -> list[FrontPoint]:
        weighted = [[(size, float(a) * feature) for _, size, feature in layer_items]
                    for a, layer_items in zip(alphas, loss_model.items)]
        return pareto_front(weighted, loss_limit=limit)

    def tuple_of(point: FrontPoint) -> Tuple_:
        return _tuple(layers, tuple(loss_model.items[i][c][0] for i, c in enumerate(point.choice)))

    try:
        # 1. Random tuples near the budget for the regression (the paper's sample); the
        #    divergence model's link is first fitted on the layers alone.
        loss_model.fit([])
        for _ in range(n_random * 4):
            if len(randoms) >= n_random:
                break
            noise = np.exp(rng.uniform(np.log(0.33), np.log(3.0), size=len(layers)))
            level = loss_model.feature_limit(ctx.target * rng.uniform(0.4, 1.6))
            points = front_for(noise, level)
            if not points:
                continue
            pick = points[0] if rng.random() < 0.5 else points[int(rng.integers(len(points)))]
            tup = tuple_of(pick)
            if tup and all(SearchContext.key(tup) != SearchContext.key(t) for t in randoms):
                randoms.append(tup)
        left = ctx.remaining_scorings()
        if left is not None:  # keep scorings for the refinement too
            randoms = randoms[:max(left - 2 * per_round, min(left, 2))]
        ctx.progress("fit", 0, len(randoms), "scoring random tuples for the predictor")
        if randoms:
            ctx.losses(randoms, "search", stage="fit")
            fitted.extend(randoms)

        # 2. Active refinement, within a trust region above the best feasible tuple.
        stale = 0
        radius = TRUST_RADIUS
        best_ratio = max((ctx.ratio(t) for t in _feasible_sorted(ctx)), default=0.0)
        while True:
            loss_model.fit(fitted)
            alphas = loss_model.linear.alphas_
            # Explore within the predictor's own error band: a tuple predicted just above the
            # target may well be within it, and scoring it is what improves the fit there.
            front = front_for(alphas, loss_model.feature_limit(ctx.target + loss_model.band()))
            predicted = [loss_model.loss(p.loss) for p in front]
            better = []
            for point, loss in zip(front, predicted):  # ascending size = descending CR
                tup = tuple_of(point)
                if tup and ctx.known(tup) is None and ctx.ratio(tup) > best_ratio:
                    better.append((tup, loss))
            if best_ratio > 0:  # the most compressive within the region, else the nearest beyond it
                cap = best_ratio * (1.0 + radius)
                better = [p for p in better if ctx.ratio(p[0]) <= cap] or better[::-1]
            inside = [p for p in better if p[1] <= ctx.target + 1e-12]
            proposals = inside[:per_round] or sorted(better, key=lambda p: p[1])[:per_round]
            outcome.front = [(tuple_of(p), ctx.total_full_bits / max(p.size_bits, 1), loss)
                             for p, loss in zip(front, predicted) if loss <= ctx.target + 1e-12]
            if not proposals:
                break
            tuples = [p[0] for p in proposals]
            ctx.losses(tuples, "search", stage="network", predicted=[p[1] for p in proposals])
            fitted.extend(tuples)
            new_best = max((ctx.ratio(t) for t in _feasible_sorted(ctx)), default=0.0)
            ctx.progress("network", len(fitted), 0, _best_message(ctx))
            if new_best > best_ratio + 1e-9:
                best_ratio, stale = new_best, 0
                radius = min(2 * radius, TRUST_MAX)
            else:
                if all(ctx.known(t) > FIT_WINDOW * ctx.budget for t in tuples):
                    radius /= 2
                stale += 1
                if stale >= patience:
                    break
    except BudgetExhausted:
        logger.info("network search stopped by %s", ctx.stopped_by)
    fitted = [t for t in fitted if ctx.known(t) is not None]
    if fitted:
        loss_model.fit(fitted)
        outcome.predictor = {
            "alphas": {layer.name: float(a) for layer, a in zip(layers, loss_model.linear.alphas_)},
            "intercept": 0.0,
            **loss_model.stats(),
            "n_random": len(randoms),
            "ridge": ridge,
        }
    outcome.feasible = _feasible_sorted(ctx)
    return outcome


def _best_message(ctx: SearchContext) -> str:
    feasible = _feasible_sorted(ctx)
    if not feasible:
        return "no tuple within budget yet"
    best = feasible[0]
    band = " (edge band)" if ctx.target > ctx.budget + 1e-9 else ""
    return f"best {ctx.ratio(best):.1f}x at {ctx.known(best):.2f}{band}"


# ---------------------------------------------------------------------------------------
def exhaustive_search(ctx: SearchContext, *, batch: int = 8, max_tuples: int = 5_000_000) -> SearchOutcome:
    """Score tuples of the candidate product in descending CR order; first within budget wins."""
    layers = ctx.layers
    items = [choice_items(layer) for layer in layers]
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
    items = [choice_items(layer) for layer in layers]
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
