"""Shared machinery of the exploration stages: the search space, loss units, budgets, the log.

The stages (layer_search, network_search) only see a ``SearchContext``: they ask it to
evaluate tuples (``{tensor name: k}``) on the search subset or the full set and get losses
back in the budget's unit. The context turns tuples into candidates, calls the evaluator
(the ORT scorer in the pipeline, a stub in tests), enforces the time and scoring budgets,
and records every explored tuple for the report.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

Tuple_ = dict[str, int]  # tensor name -> k
MARGIN = 1e-6
"""Loss (budget unit) by which a scoring stopped early must be past its threshold: float sums
over samples in another order never turn a rejection into an acceptance."""


@dataclass(frozen=True)
class Rejected:
    """What an evaluator returns for a candidate whose scoring it stopped early (``reject_below``):
    its metric is at most ``value_at_most``, below the caller's threshold whatever the samples
    not run would have given.

    Attributes:
        value_at_most: the highest metric the candidate could still have reached (fraction).
        samples: samples run before the stop.
    """

    value_at_most: float
    samples: int


def loss_between(baseline: float, value: float, mode: str) -> float:
    """Accuracy loss of ``value`` vs ``baseline`` (metric fractions) in the budget's unit.

    ``absolute``: percentage points (0.9903 -> 0.9803 is 1.0). ``relative``: percent of the baseline.
    """
    if mode == "absolute":
        return (baseline - value) * 100.0
    if baseline == 0:
        return 0.0 if value >= 0 else math.inf
    return (baseline - value) / abs(baseline) * 100.0


def value_after_loss(baseline: float, loss: float | None, mode: str) -> float:
    """The metric value (fraction) that loses ``loss`` (in the budget's unit) from ``baseline``:
    the inverse of ``loss_between``; NaN for an unknown loss."""
    if loss is None:
        return math.nan
    return baseline - loss / 100.0 * (1.0 if mode == "absolute" else abs(baseline))


def loss_unit(mode: str) -> str:
    return "pp" if mode == "absolute" else "percent_of_baseline"


def within_budget(loss: float, budget: float) -> bool:
    """The stop test: a loss is acceptable when it does not exceed the budget (float-safe)."""
    return loss <= budget + 1e-9


@dataclass(frozen=True)
class Option:
    """One candidate k of one layer.

    Attributes:
        k: shared values per codebook.
        bits: index width.
        size_bits: theoretical stored size of the layer at this k (indices + codebooks), bits.
        damage: score-free proxy of the damage sharing does: the output error of a refined
            candidate (refinement), else the clustering squared error; compared within a layer.
    """

    k: int
    bits: int
    size_bits: int
    damage: float


@dataclass
class Layer:
    """A shareable tensor and its options, plus what the layer stage learned."""

    name: str
    params: int
    full_bits: int  # size unshared, bits (params * 32, or 16 for fp16)
    options: list[Option]
    loss_alone: dict[int, float] = field(default_factory=dict)  # k -> measured loss of this layer alone
    divergence_alone: dict[int, float] = field(default_factory=dict)  # k -> output divergence, this layer alone
    loss_source: dict[int, str] = field(default_factory=dict)  # k -> "measured" | "proxy" | "lower_bound"
    candidates: list[int] = field(default_factory=list)  # Pareto-efficient k kept for the network stage

    def measured_losses(self) -> dict[int, float]:
        """k -> loss alone for the widths scored (not those estimated by the proxy)."""
        return {k: loss for k, loss in self.loss_alone.items() if self.loss_source.get(k) == "measured"}

    def forget_measurements(self) -> None:
        """Drop what the layer stage learned (measured on a search subset that is gone)."""
        self.loss_alone.clear()
        self.divergence_alone.clear()
        self.loss_source.clear()
        self.candidates.clear()

    def option(self, k: int) -> Option:
        for opt in self.options:
            if opt.k == k:
                return opt
        raise KeyError(f"{self.name}: no option k={k}")


@dataclass
class Explored:
    """One evaluated tuple (for the report's plot and table)."""

    k: Tuple_
    ratio: float
    loss_measured: float
    subset: str
    stage: str
    loss_predicted: float | None = None
    divergence: float | None = None


class BudgetExhausted(Exception):
    """Raised inside a stage when the time or scoring budget is spent."""


class SearchContext:
    """Evaluates tuples for the stages, with budgets and a log.

    Args:
        layers: the search space, in graph order.
        evaluate: ``(tuples, subset) -> metric values`` (higher is better), one per tuple;
            layers absent from a tuple keep their original weights. An evaluator may return
            ``(value, output divergence)`` pairs instead (``metrics.output_divergence``):
            the stages then use the divergence as their smooth measure of damage; or
            ``(value, divergence, spread)`` triples, the spread giving the sampling error of
            the loss (``verification.SubsetNoise``).
        baseline: metric of the unshared model per subset, ``{"search": .., "full": ..}``.
        budget: allowed loss in the unit of ``loss_mode``.
        loss_mode: ``absolute`` (pp) or ``relative`` (percent of baseline).
        time_budget: seconds for the whole exploration, or None.
        max_scorings: maximum evaluations requested (cache hits included), or None.
        progress: optional callback ``(stage, done, total, message)``.
        clock, start: the clock and the instant the time budget counts from (default: now).
        interruptible: ``evaluate`` takes a keyword ``stop``, a callable it calls between the
            batches of a scoring and that raises ``BudgetExhausted`` once the time budget is
            spent: a scoring in progress then stops there instead of running to its end. The
            forced scorings (final verification) are never stopped.
        rejects_early: ``evaluate`` takes a keyword ``reject_below`` (a metric value) and may then
            return a ``Rejected`` for a tuple whose metric is certainly below it before its
            scoring ends (``losses(reject_above=...)``); without it every scoring runs to its end.
    """

    def __init__(
        self,
        layers: Sequence[Layer],
        evaluate: Callable[[list[Tuple_], str], list[float]],
        baseline: Mapping[str, float],
        budget: float,
        loss_mode: str = "absolute",
        *,
        time_budget: float | None = None,
        max_scorings: int | None = None,
        progress: Callable[[str, int, int, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        start: float | None = None,
        interruptible: bool = False,
        rejects_early: bool = False,
    ) -> None:
        self.layers = list(layers)
        self.by_name = {layer.name: layer for layer in self.layers}
        self._evaluate = evaluate
        self._interruptible = interruptible
        self._rejects_early = rejects_early
        self.baseline = dict(baseline)
        self.budget = budget
        # The loss the search aims at on the search subset; the pipeline tightens it when
        # tuples verified on the subset fail on the full set (subset optimism).
        self.target = budget
        self.loss_mode = loss_mode
        self.time_budget = time_budget
        self.max_scorings = max_scorings
        self.progress = progress or (lambda stage, done, total, message: None)
        self._clock = clock
        self._start = clock() if start is None else start  # the time budget counts from here
        self.scorings = 0
        self.scorings_by_stage: dict[str, int] = {}
        self.explored: list[Explored] = []
        self.stopped_by = "converged"
        self._memo: dict[tuple[str, tuple[tuple[str, int], ...]], float] = {}
        self._divergence: dict[tuple[str, tuple[tuple[str, int], ...]], float] = {}
        self._spread: dict[tuple[str, tuple[tuple[str, int], ...]], float] = {}
        # Tuples rejected by a scoring stopped early: the least loss they can have (budget unit).
        self._lower_bounds: dict[tuple[str, tuple[tuple[str, int], ...]], float] = {}
        self.stopped_early = 0  # scorings stopped early (part of ``scorings``)
        self.total_full_bits = sum(layer.full_bits for layer in self.layers)

    def new_search_subset(self, baseline: float, label: str) -> None:
        """The evaluator's search subset changed (the pipeline grew it): what was measured on the
        old one stops counting for the search and the layer stage's findings are cleared; the
        log keeps those entries with ``subset`` relabelled ``label``; full-set measurements stay."""
        self.baseline["search"] = baseline
        self.target = self.budget
        for store in (self._memo, self._divergence, self._spread, self._lower_bounds):
            for key in [key for key in store if key[0] == "search"]:
                del store[key]
        for entry in self.explored:
            if entry.subset == "search":
                entry.subset = label
        for layer in self.layers:
            layer.forget_measurements()

    # -- sizes -------------------------------------------------------------------------
    def size_bits(self, tup: Mapping[str, int]) -> int:
        """Stored bits of the shared tensors for a tuple (layers absent stay unshared)."""
        return sum(
            layer.option(tup[layer.name]).size_bits if layer.name in tup else layer.full_bits
            for layer in self.layers
        )

    def ratio(self, tup: Mapping[str, int]) -> float:
        """Theoretical CR over the shared tensors (docs/design.md, Definitions)."""
        return self.total_full_bits / max(self.size_bits(tup), 1)

    # -- budgets -----------------------------------------------------------------------
    def elapsed(self) -> float:
        return self._clock() - self._start

    def remaining_scorings(self) -> int | None:
        return None if self.max_scorings is None else max(self.max_scorings - self.scorings, 0)

    def check_budget(self, wanted: int = 1) -> None:
        """Raise BudgetExhausted if ``wanted`` more scorings would break a budget."""
        if self.max_scorings is not None and self.scorings + wanted > self.max_scorings:
            self.stopped_by = "max_scorings"
            raise BudgetExhausted
        self.check_time()

    def check_time(self) -> None:
        """Raise BudgetExhausted if the time budget is spent (an interruptible evaluator calls it
        between the batches of a scoring)."""
        if self.time_budget is not None and self.elapsed() >= self.time_budget:
            self.stopped_by = "time_budget"
            raise BudgetExhausted

    def can_score(self, wanted: int = 1) -> bool:
        try:
            self.check_budget(wanted)
        except BudgetExhausted:
            return False
        return True

    # -- evaluation --------------------------------------------------------------------
    @staticmethod
    def key(tup: Mapping[str, int]) -> tuple[tuple[str, int], ...]:
        return tuple(sorted(tup.items()))

    def known(self, tup: Mapping[str, int], subset: str = "search") -> float | None:
        """Loss already measured for this tuple in this run, or None."""
        return self._memo.get((subset, self.key(tup)))

    def divergence(self, tup: Mapping[str, int], subset: str = "search") -> float | None:
        """Output divergence measured for this tuple in this run, or None (not scored, or the
        evaluator gives none)."""
        return self._divergence.get((subset, self.key(tup)))

    def spread(self, tup: Mapping[str, int], subset: str = "search") -> float | None:
        """Per-sample outcome spread measured for this tuple (``Scorer.score_with_divergence``), or None."""
        return self._spread.get((subset, self.key(tup)))

    @property
    def has_divergence(self) -> bool:
        """Whether the evaluator reports output divergences (every scoring so far had one)."""
        return bool(self._divergence) and len(self._divergence) == len(self._memo)

    def lower_bound(self, tup: Mapping[str, int], subset: str = "search") -> float | None:
        """The least loss of a tuple whose scoring was stopped early (``losses(reject_above=)``),
        or None (not scored, or scored to the end)."""
        return self._lower_bounds.get((subset, self.key(tup)))

    def losses(
        self,
        tuples: Sequence[Mapping[str, int]],
        subset: str = "search",
        stage: str = "network",
        predicted: Sequence[float | None] | None = None,
        *,
        force: bool = False,
        reject_above: float | None = None,
    ) -> list[float]:
        """Measured losses of tuples (budget unit). Repeats within the run are free.

        ``reject_above``: the caller only needs to know that a tuple loses more than this. The
        evaluator may then stop a scoring once its loss is certainly above it (by ``MARGIN``),
        whatever the samples not run give; such a tuple's entry is the least loss it can have
        (``lower_bound``), above ``reject_above``, and it is not ``known``. An evaluator that
        cannot bound its metric scores to the end.

        Raises BudgetExhausted (before scoring anything) if the batch would break a budget,
        unless ``force`` (used by the final verification, which must happen).
        """
        def settled(key: tuple) -> bool:
            bound = self._lower_bounds.get((subset, key))
            return (subset, key) in self._memo or (reject_above is not None and bound is not None and bound > reject_above)

        unique: dict[tuple, dict] = {}
        for t in tuples:
            if not settled(self.key(t)):
                unique.setdefault(self.key(t), dict(t))
        if unique:
            if not force:
                self.check_budget(len(unique))
            options: dict[str, object] = {}
            if self._interruptible and not force and self.time_budget is not None:
                options["stop"] = self.check_time
            if reject_above is not None and self._rejects_early:
                options["reject_below"] = value_after_loss(self.baseline[subset], reject_above + MARGIN, self.loss_mode)
            values = self._evaluate(list(unique.values()), subset, **options)
            predicted_by_key = {}
            if predicted is not None:
                predicted_by_key = {self.key(t): p for t, p in zip(tuples, predicted)}
            for (key, tup), value in zip(unique.items(), values):
                if isinstance(value, Rejected):
                    self.count(stage)
                    self.stopped_early += 1
                    self._lower_bounds[(subset, key)] = loss_between(self.baseline[subset], value.value_at_most,
                                                                     self.loss_mode)
                else:
                    self.record(tup, value, subset, stage, predicted_by_key.get(key))
        return [self._memo.get((subset, self.key(t)), self._lower_bounds.get((subset, self.key(t)))) for t in tuples]

    def count(self, stage: str, n: int = 1) -> None:
        """Count ``n`` scorings a stage did outside the search space's tuples."""
        self.scorings += n
        self.scorings_by_stage[stage] = self.scorings_by_stage.get(stage, 0) + n

    def record(self, tup: Mapping[str, int], value: float | tuple[float, float], subset: str = "search",
               stage: str = "network", predicted: float | None = None) -> float:
        """Count one scoring done for ``tup`` (by ``losses`` or by a stage that called the
        scorer itself) and remember its loss; ``value`` is a metric value, (value, divergence) or
        (value, divergence, spread)."""
        key = self.key(tup)
        self.count(stage)
        divergence = None
        if isinstance(value, tuple):
            value, divergence, *rest = value
            self._divergence[(subset, key)] = float(divergence)
            if rest and rest[0] is not None:
                self._spread[(subset, key)] = float(rest[0])
        loss = loss_between(self.baseline[subset], value, self.loss_mode)
        self._memo[(subset, key)] = loss
        self.explored.append(Explored(dict(tup), self.ratio(tup), loss, subset, stage, predicted,
                                      None if divergence is None else float(divergence)))
        return loss
