"""Full-set verification: the search subset's answer checked on the whole evaluation set.

The exploration measures tuples on a fixed search subset (the first ``--search-samples``
samples); the budget holds on the full set. The two disagree by the subset's sampling error,
a few tenths of a point on a top-1 metric over a few thousand samples, in both directions:

- **step back**: a tuple the strategy picked at the budget's edge is optimistic on the subset
  (it was picked *because* it looked good there); a full-set miss tightens the search target
  by the gap just observed and the strategy continues; then the subset-feasible tuples likely
  to hold (by the subset's sampling error and the optimism observed) are verified most
  compressive first, and the safest one (least subset loss) last; if none holds, the verified
  tuple that missed by the least is **shrunk**: the half of its layers that save the most bits
  per unit of damage alone is verified, halving again on a miss, then bisecting back up.
- **edge push**: once a tuple holds on the full set with loss to spare, a tuple that measured
  just over the budget on the subset may well hold on the full set. Each such tuple's chance
  is estimated from the subset's sampling error (``SubsetNoise``); the strategy first scores
  the tuples within that error of the budget, then the most compressive ones whose chance is at
  least ``EDGE_MIN_PROBABILITY`` are verified on the full set, at most ``edge_tries`` of them.

The answer is always a tuple measured within budget on the full set.

- **grow the subset** (``subset_misled``, run by ``search_stage``): when a tuple that held on
  the subset missed on the full set and the verified answer is well below what the subset
  promised (``GROW_BELOW``), the subset was too small to rank tuples at this budget: it grows
  ``GROW_FACTOR`` times (at most to the full set) and the layer stage, the network stage and
  this verification run again; the better of the verified answers wins.

``search_stage`` is the network stage of a run as the pipeline calls it: search, verify, grow
the subset while it misled, and the answer (or ``BudgetError``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from onnxws.config import CompressConfig
from onnxws.errors import BudgetError, LimitError
from onnxws.exploration import SearchContext, Tuple_, loss_unit, within_budget
from onnxws.layer_search import layer_sensitivity
from onnxws.network_search import (
    SearchOutcome,
    exhaustive_continue,
    exhaustive_search,
    greedy_search,
    predictor_search,
    verify_full,
)

# Full-set misses after which the search stops aiming lower and steps back instead.
MAX_ROUNDS = 4
STEP_BACK_TRIES = 4
# Step-back: tuples tried first when their estimated chance to hold on the full set is at least this.
STEP_BACK_MIN_PROBABILITY = 0.8
# Shrink (after the step-back found nothing): full-set scorings halving the shared layers, then
# bisecting back up.
SHRINK_TRIES = 6
# Edge push: a tuple over the budget on the subset is verified when its estimated chance of
# holding on the full set is at least this (one-sided: about 1.28 standard errors over).
EDGE_MIN_PROBABILITY = 0.1
# Growing the search subset: when the verified answer's CR is below GROW_BELOW times the CR of
# a tuple that held on the subset and missed on the full set, the subset grows GROW_FACTOR
# times (at most to the full set) and the search runs again.
GROW_BELOW = 0.9
GROW_FACTOR = 4


@dataclass
class SubsetNoise:
    """Sampling error of a loss measured on the search subset, as a predictor of the full-set loss.

    The search subset is the first ``n_search`` of the ``n_full`` samples, so the full-set loss
    is ``(n_search * L_search + n_rest * L_rest) / n_full`` and only the rest is unknown: given
    the subset loss, the full-set loss is about normal around it, with a variance that follows
    from the per-sample variance ``v`` of the metric's change: ``(n_rest / n_full)**2 * v *
    (1 / n_search + 1 / n_rest)``.

    ``v`` is known best from the tuple's own per-sample outcomes (``spread``: the mean squared
    per-sample change, e.g. the fraction of samples flipped either way by a top-1 metric:
    ``v = spread - L**2``). Without it: ``spread_ratio`` (spread per unit of loss, the median over
    the scored tuples, see ``calibrate``), the floor ``L (1 - L)`` of a metric whose outcomes are
    0/1 (``per_sample``), and for other metrics the gaps seen between subset and full-set losses.

    Attributes:
        n_search, n_full: samples in the subset and the full set.
        per_sample: the metric is a mean of per-sample outcomes in [0, 1] (top-1 accuracy or agreement).
        unit_per_fraction: budget units per metric fraction (100 for pp; 100 / |baseline| for
            percent of baseline).
        observed: (subset loss, full loss) of the tuples measured on both, budget unit.
        spread_ratio: spread per unit of loss (fractions), or None.
    """

    n_search: int
    n_full: int
    per_sample: bool
    unit_per_fraction: float
    observed: list[tuple[float, float]] = field(default_factory=list)
    spread_ratio: float | None = None

    @property
    def n_rest(self) -> int:
        return self.n_full - self.n_search

    def observe(self, loss_search: float | None, loss_full: float) -> None:
        """Record a tuple measured on both sets (its rest-of-set loss is an independent estimate)."""
        if loss_search is not None and math.isfinite(loss_search) and math.isfinite(loss_full):
            self.observed.append((loss_search, loss_full))

    def calibrate(self, scored: list[tuple[float, float | None]]) -> None:
        """Learn the spread per unit of loss from scored ``(subset loss, spread)`` pairs."""
        ratios = sorted(spread / (loss / self.unit_per_fraction) for loss, spread in scored
                        if spread is not None and loss > 0)
        if ratios:
            self.spread_ratio = ratios[len(ratios) // 2]

    def variance(self, loss: float, spread: float | None = None) -> float:
        """Per-sample variance (metric fraction squared) for a tuple of subset loss ``loss``."""
        frac = min(max(loss / self.unit_per_fraction, 0.0), 1.0)
        if spread is not None:
            return max(spread - frac * frac, 0.0)
        floor = 0.0
        if self.per_sample:
            floor = frac * (1.0 - frac)
            if self.spread_ratio is not None:
                floor = max(floor, self.spread_ratio * frac - frac * frac)
        if not self.observed or self.n_rest <= 0:
            return floor
        scale = 1.0 / self.n_search + 1.0 / self.n_rest
        bias = self.optimism * self.n_full / self.n_rest  # rest minus subset loss, on average
        gaps = []
        for search, full in self.observed:  # the spread of the gaps around the optimism
            rest = (self.n_full * full - self.n_search * search) / self.n_rest
            gaps.append(((rest - search - bias) / self.unit_per_fraction) ** 2)
        return max(floor, sum(gaps) / len(gaps) / scale)

    def sd_full(self, loss: float, spread: float | None = None) -> float:
        """Standard deviation of the full-set loss (budget unit) given the subset loss ``loss``."""
        if self.n_rest <= 0:
            return 0.0
        v = self.variance(loss, spread)
        sd = (self.n_rest / self.n_full) * math.sqrt(v * (1.0 / self.n_search + 1.0 / self.n_rest))
        return sd * self.unit_per_fraction

    @property
    def optimism(self) -> float:
        """How much worse the full set measured than the subset on average over the tuples
        measured on both (0 if not worse): tuples picked near the edge look better on the subset."""
        if not self.observed:
            return 0.0
        return max(sum(full - search for search, full in self.observed) / len(self.observed), 0.0)

    def pass_probability(self, loss: float, budget: float, spread: float | None = None) -> float:
        """Estimated chance that a tuple of subset loss ``loss`` is within ``budget`` on the full set
        (its expected full-set loss: ``loss`` plus the observed ``optimism``)."""
        sd = self.sd_full(loss, spread)
        expected = loss + self.optimism
        if sd <= 0:
            return 1.0 if within_budget(expected, budget) else 0.0
        return _normal_cdf((budget - expected) / sd)

    def edge_target(self, budget: float) -> float:
        """The subset loss up to which a tuple's chance is at least ``EDGE_MIN_PROBABILITY``
        (by the error expected at that loss: no tuple's own spread)."""
        z = -_normal_ppf(EDGE_MIN_PROBABILITY)
        loss = budget
        for _ in range(50):  # fixed point: the error grows with the loss
            nxt = budget - self.optimism + z * self.sd_full(loss)
            if abs(nxt - loss) < 1e-9:
                break
            loss = nxt
        return loss


def _normal_cdf(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def _normal_ppf(p: float) -> float:
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if _normal_cdf(mid) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@dataclass
class Verification:
    """What verification did: the answer and every full-set measurement.

    Attributes:
        chosen: the best tuple measured within budget on the full set (None: none).
        log: ``(tuple, subset loss, full loss, seconds, phase)``; phase ``verify`` (the strategy's
            pick), ``step_back`` or ``edge`` (the edge push).
        outcome: the strategy's last SearchOutcome.
        edge_target: subset loss up to which the edge push looked (None: no push).
    """

    chosen: Tuple_ | None = None
    log: list[tuple[Tuple_, float | None, float, float, str]] = field(default_factory=list)
    outcome: SearchOutcome | None = None
    edge_target: float | None = None

    @property
    def seconds(self) -> float:
        return sum(entry[3] for entry in self.log)


def search_and_verify(ctx: SearchContext, *, strategy: str, predictor: str = "auto", seed: int = 0,
                      noise: SubsetNoise | None = None, edge_tries: int = 4,
                      uniform: tuple[Tuple_ | None, float | None] = (None, None)) -> Verification:
    """Run the strategy, verify its best tuple on the full set, step back on a miss, push on slack.

    Args:
        ctx: the search context (its ``target`` is adjusted and restored here).
        strategy: ``predictor``, ``exhaustive`` or ``greedy``.
        noise: the subset's sampling error; None disables the edge push.
        edge_tries: most full-set scorings of the edge push (0 disables it).
        uniform: the uniform-k tuple and its full-set loss: it wins if more compressive.
    """
    result = Verification()
    rejected: set = set()

    def run_strategy(attempt: int) -> list[Tuple_]:
        if strategy == "exhaustive":
            if attempt == 0:
                result.outcome = exhaustive_search(ctx)
                return untried(result.outcome.feasible)[:1]
            nxt = exhaustive_continue(ctx, rejected)
            return [nxt] if nxt else []
        if strategy == "greedy":
            if attempt > 0:
                return []  # greedy restarts from scratch: step back instead
            result.outcome = greedy_search(ctx)
            return untried(result.outcome.feasible)[:1]
        result.outcome = predictor_search(ctx, seed=seed, model=predictor)
        return untried(result.outcome.feasible)[:1]

    def verify(tup: Tuple_, phase: str) -> bool:
        ctx.progress("verify", len(result.log), 0, f"full set: {ctx.ratio(tup):.1f}x")
        t0 = time.perf_counter()
        found, tried = verify_full(ctx, [tup], max_tries=1)
        for t, search_loss, full_loss in tried:
            result.log.append((t, search_loss, full_loss, time.perf_counter() - t0, phase))
            if noise is not None:
                noise.observe(search_loss, full_loss)
            if not within_budget(full_loss, ctx.budget):
                rejected.add(SearchContext.key(t))
                if phase == "verify" and search_loss is not None:  # aim lower by the optimism just observed
                    ctx.target = min(ctx.target, ctx.budget - max(full_loss - search_loss, 0.0))
        return found is not None

    def untried(tuples: list[Tuple_]) -> list[Tuple_]:
        return [t for t in tuples if SearchContext.key(t) not in rejected and ctx.known(t, "full") is None]

    ctx.progress("network", 0, 0, f"strategy {strategy}")
    for attempt in range(MAX_ROUNDS):
        top = run_strategy(attempt)
        if not top:
            break
        if verify(top[0], "verify"):
            result.chosen = top[0]
        if result.chosen is not None or ctx.target <= 0 or not ctx.can_score():
            break
    if result.chosen is None:
        _step_back(ctx, result, noise, untried, verify)
    if result.chosen is not None and noise is not None and edge_tries > 0:
        _edge_push(ctx, result, noise, edge_tries, lambda: run_strategy(0) if strategy == "predictor" else None,
                   untried, verify)
    tup, loss = uniform
    if tup is not None and loss is not None and within_budget(loss, ctx.budget):
        if result.chosen is None or ctx.ratio(tup) > ctx.ratio(result.chosen):
            result.chosen = tup
    return result


def subset_misled(ctx: SearchContext, result: Verification) -> dict | None:
    """Whether the search subset misled the search enough to search again on a larger one.

    Evidence: verified tuples within the budget on the subset that missed it on the full set
    (the edge push's tuples, over the budget on the subset already, are not evidence). The most
    compressive of them is what the subset promised (ratios as ``SearchContext.ratio``: over every
    shareable tensor, the unshared ones at full size); when the verified answer is below
    ``GROW_BELOW`` times that (or there is none), returns ``{"promised_ratio", "verified_ratio",
    "misses", "threshold"}``; else None.
    """
    missed = [tup for tup, search_loss, full_loss, _, _ in result.log
              if search_loss is not None and within_budget(search_loss, ctx.budget) and not within_budget(full_loss, ctx.budget)]
    if not missed:
        return None
    promised = max(ctx.ratio(tup) for tup in missed)
    verified = ctx.ratio(result.chosen) if result.chosen is not None else 0.0
    if verified >= GROW_BELOW * promised:
        return None
    return {"promised_ratio": promised, "verified_ratio": verified or None, "misses": len(missed), "threshold": GROW_BELOW}


class SearchSubset(Protocol):
    """What the search stage needs of the scorer: the subset sizes, their baselines, and growth."""

    n_search: int
    n_full: int
    baseline_search: float

    @property
    def baseline_full(self) -> float: ...

    def grow_search(self, n: int) -> None: ...


def subset_noise(subset: SearchSubset, per_sample: bool, loss_mode: str) -> SubsetNoise | None:
    """The search subset's sampling error (``SubsetNoise``); None when it cannot be stated."""
    if loss_mode == "absolute":
        unit = 100.0
    elif subset.baseline_full != 0:
        unit = 100.0 / abs(subset.baseline_full)
    else:
        return None
    return SubsetNoise(subset.n_search, subset.n_full, per_sample, unit)


@dataclass
class Searched:
    """The search stage's result.

    Attributes:
        verification: the answer and every full-set measurement (all rounds).
        proxy_stats: the last layer stage's proxy statistics.
        growth: one entry per search-subset growth (from, to, why, the layer stage's scorings).
        seconds_network, seconds_verify: time in the strategies and in full-set verification.
        seconds_layer: time in the layer stages of the grown rounds.
    """

    verification: Verification
    proxy_stats: dict
    growth: list[dict] = field(default_factory=list)
    seconds_network: float = 0.0
    seconds_verify: float = 0.0
    seconds_layer: float = 0.0

    @property
    def chosen(self) -> Tuple_:
        return self.verification.chosen


def search_stage(ctx: SearchContext, subset: SearchSubset, config: CompressConfig, *, per_sample: bool,
                 uniform: tuple[Tuple_ | None, float | None], proxy_stats: dict) -> Searched:
    """Search and verify; while the subset misled the search (``subset_misled``) and
    ``config.grow_subset`` allows, grow it and search again; the better verified answer wins.

    Raises:
        BudgetError: no tuple holds within the budget on the full set.
    """
    searched = Searched(Verification(), proxy_stats)
    verification = latest = _search_round(ctx, subset, config, per_sample, uniform, searched)
    while config.grow_subset and subset.n_search < subset.n_full:
        misled = subset_misled(ctx, latest)  # the last round's own verification is the evidence
        if misled is None or not ctx.can_score():
            break
        before, grown = subset.n_search, min(subset.n_full, GROW_FACTOR * subset.n_search)
        searched.growth.append({"from_samples": before, "to_samples": grown, **misled})
        ctx.progress("layer", 0, 0, f"search subset {before} -> {grown} samples: the full set disagreed")
        t0 = time.perf_counter()
        subset.grow_search(grown)
        measured_before = {layer.name: layer.measured_losses() for layer in ctx.layers}
        ctx.new_search_subset(subset.baseline_search, f"search_{before}")
        layer_before = ctx.scorings_by_stage.get("layer", 0)
        searched.proxy_stats = layer_sensitivity(ctx, earlier=measured_before)
        searched.growth[-1]["layer_scorings"] = ctx.scorings_by_stage.get("layer", 0) - layer_before
        searched.growth[-1]["layer_walks_from_earlier_edge"] = searched.proxy_stats["started_at_earlier_edge"]
        searched.seconds_layer += time.perf_counter() - t0
        again = _search_round(ctx, subset, config, per_sample, uniform, searched)
        earlier, latest = verification.chosen, again
        verification = Verification(again.chosen, verification.log + again.log, again.outcome, again.edge_target)
        if earlier is not None and (again.chosen is None or ctx.ratio(earlier) > ctx.ratio(again.chosen)):
            verification.chosen = earlier
    searched.verification = verification
    chosen = verification.chosen
    if chosen is not None and ctx.known(chosen) is None and ctx.can_score():  # an earlier subset's answer won
        ctx.losses([chosen], "search", stage="verify")  # its loss on this subset, for the report
    if chosen is None:
        smallest = min((e.loss_measured for e in ctx.explored if e.subset == "full"), default=None)
        if smallest is None:
            smallest = min((e.loss_measured for e in ctx.explored), default=math.nan)
        unit = loss_unit(config.loss_mode)
        found = (f"the smallest loss found was {smallest:.3f} {unit}" if math.isfinite(smallest)
                 else "no candidate was scored")
        if ctx.stopped_by != "converged":
            limit = (f"--time-budget {config.time_budget:g} s" if ctx.stopped_by == "time_budget"
                     else f"--max-scorings {config.max_scorings}")
            raise LimitError(f"stopped by {limit} after {ctx.scorings} scoring(s), before any shared layer was verified "
                             f"within the budget of {config.loss:g} {unit} ({found}); raise the limit")
        raise BudgetError(f"no layer can be shared within the loss budget of {config.loss:g} {unit}: {found}; "
                          "raise --loss or check the evaluation data")
    return searched


def _search_round(ctx: SearchContext, subset: SearchSubset, config: CompressConfig, per_sample: bool,
                  uniform: tuple[Tuple_ | None, float | None], searched: Searched) -> Verification:
    """One network stage + verification on the current subset; its time goes to ``searched``."""
    t0 = time.perf_counter()
    found = search_and_verify(
        ctx, strategy=config.strategy, predictor=config.predictor, seed=config.seed,
        noise=subset_noise(subset, per_sample, config.loss_mode), edge_tries=config.edge_tries, uniform=uniform)
    searched.seconds_network += time.perf_counter() - t0 - found.seconds
    searched.seconds_verify += found.seconds
    return found


def _subset_tuples(ctx: SearchContext, untried: Callable, limit: float) -> list[Tuple_]:
    """Untried tuples measured on the subset within ``limit``, most compressive first."""
    rows = {SearchContext.key(e.k): e.k for e in ctx.explored
            if e.k and e.subset == "search" and within_budget(e.loss_measured, limit)}
    return untried(sorted(rows.values(), key=lambda t: -ctx.ratio(t)))


def _step_back(ctx: SearchContext, result: Verification, noise: SubsetNoise | None, untried: Callable,
               verify: Callable[[Tuple_, str], bool]) -> None:
    """Step back along the subset-feasible tuples: the most compressive of those likely to hold on
    the full set first, then the safest one (least loss on the subset).

    The likelihood is ``SubsetNoise.pass_probability``: the subset's sampling error, and the
    optimism the failed verifications showed; without a noise model, CR order only.
    """
    ranked = _subset_tuples(ctx, untried, ctx.budget)
    if noise is None or not ranked:
        for tup in ranked[:STEP_BACK_TRIES]:
            if verify(tup, "step_back"):
                result.chosen = tup
                return
        _shrink(ctx, result, verify)
        return
    def chance(tup: Tuple_) -> float:
        return noise.pass_probability(ctx.known(tup), ctx.budget, ctx.spread(tup))

    likely = [t for t in ranked if chance(t) >= STEP_BACK_MIN_PROBABILITY]
    order = likely[:STEP_BACK_TRIES - 1]
    # Last, the safest: the least loss on the subset (the optimism was seen on tuples picked at
    # the edge, not on these), the most compressive among equals.
    safest = min(ranked, key=lambda t: (ctx.known(t), -ctx.ratio(t)))
    if all(SearchContext.key(safest) != SearchContext.key(t) for t in order):
        order.append(safest)
    for tup in order:
        if verify(tup, "step_back"):
            result.chosen = tup
            return
    _shrink(ctx, result, verify)


def _shrink(ctx: SearchContext, result: Verification, verify: Callable[[Tuple_, str], bool]) -> None:
    """Last resort when no subset-feasible tuple held on the full set: the subset cannot rank
    tuples this close to the budget. Start from the verified tuple that missed by the least, keep
    the half of its shared layers that save the most bits per unit of damage alone (output
    divergence, else loss), verify, and halve again on a miss, down to one layer; once a prefix
    holds, bisect back up between it and the shortest that failed (at most ``SHRINK_TRIES``
    full-set scorings in all). If even its first layer alone misses, that layer at its widest
    candidate (the least damage that still shares it) is verified last: the zoo's MobileNetV2
    on a 250-view subset missed the budget with every tuple the shrink reached, down to one
    layer at a narrow k, and ended with nothing (exit 3)."""
    if not result.log:
        return
    start = min(result.log, key=lambda entry: (entry[2], -ctx.ratio(entry[0])))[0]

    def damage(name: str, k: int) -> float:
        layer = ctx.by_name[name]
        value = layer.divergence_alone.get(k) if ctx.has_divergence else None
        if value is None:
            value = layer.loss_alone.get(k, 0.0)
        return max(float(value), 0.0)

    def value(item: tuple[str, int]) -> float:
        name, k = item
        layer = ctx.by_name[name]
        return (layer.full_bits - layer.option(k).size_bits) / (damage(name, k) + 1e-12)

    ranked = sorted(start.items(), key=lambda item: (-value(item), item[0]))
    failing, passing = len(ranked), 0  # the shortest prefix known to fail, the longest known to hold
    for _ in range(SHRINK_TRIES):
        size = failing // 2 if not passing else (passing + failing) // 2  # halve, then bisect back up
        if size <= passing or size < 1 or not ctx.can_score():
            break
        tup = dict(ranked[:size])
        if verify(tup, "shrink"):
            result.chosen, passing = tup, size
        else:
            failing = size
    if passing or failing > 1 or not ranked or not ctx.can_score():
        return
    name, k = ranked[0]
    widest = max(ctx.by_name[name].candidates, default=k)
    if widest > k and ctx.known({name: widest}, "full") is None:
        tup = {name: widest}
        if verify(tup, "shrink"):
            result.chosen = tup


def _edge_push(ctx: SearchContext, result: Verification, noise: SubsetNoise, tries: int,
               search_edge: Callable[[], object], untried: Callable, verify: Callable[[Tuple_, str], bool]) -> None:
    """Verify the most compressive tuples just over the budget on the subset (module docstring)."""
    chosen_full = ctx.known(result.chosen, "full")
    if noise.n_rest <= 0 or chosen_full is None or not ctx.budget - chosen_full > 1e-9:
        return
    noise.calibrate([(e.loss_measured, ctx.spread(e.k)) for e in ctx.explored
                     if e.k and e.subset == "search" and 0 < e.loss_measured <= 2 * ctx.budget])
    edge = noise.edge_target(ctx.budget)
    result.edge_target = edge
    saved = ctx.target
    ctx.target = edge  # the strategy scores the tuples within the subset's error of the budget
    try:
        search_edge()
    finally:
        ctx.target = saved
    for tup in _subset_tuples(ctx, untried, edge):
        if tries <= 0:
            break
        if ctx.ratio(tup) <= ctx.ratio(result.chosen) + 1e-12:
            break  # most compressive first: nothing better remains
        if noise.pass_probability(ctx.known(tup), ctx.budget, ctx.spread(tup)) < EDGE_MIN_PROBABILITY:
            continue
        if not ctx.can_score():
            break
        tries -= 1
        if verify(tup, "edge"):
            result.chosen = tup
            break
