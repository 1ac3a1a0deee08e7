"""Exploration stages driven by a stub evaluator (no model): the search logic alone.

The stub network has known per-layer loss curves; a tuple's loss is the sum of its layers'
losses times a mild interaction factor, so the exact optimum is computable by brute force.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from onnxws.exploration import BudgetExhausted, Layer, Option, SearchContext, loss_between, within_budget
from onnxws.layer_search import LayerSearchSettings, layer_sensitivity, pareto_candidates
from onnxws.network_search import (
    exhaustive_search,
    greedy_search,
    predictor_search,
    uniform_baseline,
    verify_full,
)
from onnxws.predictor import LinearLossPredictor, pareto_front

BITS = list(range(9))


def make_layers(params: list[int], sensitivity: list[float]) -> tuple[list[Layer], dict]:
    """Layers with k = 2**b options; true loss alone = s * 4**(3 - b) (quantisation noise ~ 4**-b)."""
    layers, truth = [], {}
    for i, (n, s) in enumerate(zip(params, sensitivity)):
        name = f"w{i}"
        options = [Option(2**b, b, n * b + 32 * 2**b, float(n) * 4.0 ** (-b)) for b in BITS]
        layers.append(Layer(name, n, 32 * n, options))
        truth[name] = {2**b: s * 4.0 ** (3 - b) for b in BITS}
    return layers, truth


def stub_evaluate(truth: dict, interaction: float = 1.1, full_offset: float = 0.0, calls: list | None = None):
    def evaluate(tuples, subset):
        if calls is not None:
            calls.append((len(tuples), subset))
        values = []
        for tup in tuples:
            total = sum(truth[name][k] for name, k in tup.items())
            total *= interaction if len(tup) > 1 else 1.0
            if subset == "full":
                total += full_offset
            values.append(0.99 - total / 100.0)
        return values

    return evaluate


def context(layers, truth, budget=1.0, **kw):
    evaluate = stub_evaluate(truth, **{k: kw.pop(k) for k in ("interaction", "full_offset", "calls") if k in kw})
    return SearchContext(layers, evaluate, {"search": 0.99, "full": 0.99}, budget, "absolute", **kw)


def brute_force_best(ctx: SearchContext, truth: dict, interaction: float = 1.1) -> float:
    """Best CR over the product of every layer's candidates (+ unshared) within budget."""
    choices = [[None] + layer.candidates for layer in ctx.layers]
    best = 0.0
    for combo in itertools.product(*choices):
        tup = {layer.name: k for layer, k in zip(ctx.layers, combo) if k is not None}
        if not tup:
            continue
        loss = sum(truth[n][k] for n, k in tup.items()) * (interaction if len(tup) > 1 else 1.0)
        if within_budget(loss, ctx.budget):
            best = max(best, ctx.ratio(tup))
    return best


def test_loss_units():
    assert loss_between(0.9903, 0.9803, "absolute") == pytest.approx(1.0)
    assert loss_between(0.80, 0.792, "relative") == pytest.approx(1.0)
    assert within_budget(1.0 + 1e-12, 1.0) and not within_budget(1.01, 1.0)


def test_ratio_matches_design_formula():
    layers, truth = make_layers([1000, 500], [1.0, 1.0])
    ctx = context(layers, truth)
    tup = {"w0": 4, "w1": 16}
    expected = (32 * 1500) / (1000 * 2 + 32 * 4 + 500 * 4 + 32 * 16)
    assert ctx.ratio(tup) == pytest.approx(expected)


def test_layer_stage_walks_and_keeps_pareto_candidates():
    layers, truth = make_layers([4000, 2000, 1000], [0.05, 0.5, 2.0])
    ctx = context(layers, truth)
    stats = layer_sensitivity(ctx, LayerSearchSettings(probe_bits=4, cap=1.5, negligible=0.05))
    for layer in layers:
        measured = {k for k, src in layer.loss_source.items() if src == "measured"}
        # measured values are the true losses alone
        for k in measured:
            assert layer.loss_alone[k] == pytest.approx(truth[layer.name][k])
        # candidates: losses alone within the cap, sizes strictly decreasing losses
        for k in layer.candidates:
            assert layer.loss_alone[k] <= 1.5 + 1e-9
        losses = [layer.loss_alone[k] for k in layer.candidates]
        assert losses == sorted(losses, reverse=True)
    # far fewer scorings than every width of every layer
    assert ctx.scorings < 3 * len(BITS)
    assert stats["spearman"] is None or stats["spearman"] > 0.9
    # proxy estimates exist for the widths above the walk and are below the measured neighbour
    sensitive = layers[2]
    assert any(src == "proxy" for src in layers[0].loss_source.values()) or len(layers[0].loss_source) == 9
    # the sensitive layer's walk down stopped at the first width past the cap (b=3: 2.0 pp)
    assert sensitive.loss_alone[8] == pytest.approx(2.0) and 4 not in sensitive.loss_alone
    assert 8 not in sensitive.candidates


def test_pareto_candidates_drop_dominated_widths():
    layer = Layer("w", 100, 3200, [Option(2**b, b, 100 * b + 32 * 2**b, 1.0) for b in range(4)])
    layer.loss_alone = {1: 5.0, 2: 0.4, 4: 0.5, 8: 0.1}  # k=4 is dominated by k=2 (noise)
    assert pareto_candidates(layer, cap=1.5) == [2, 8]


def test_predictor_recovers_alphas():
    rng = np.random.default_rng(0)
    X = rng.uniform(0, 1, size=(40, 3))
    alphas = np.array([0.5, 1.0, 2.0])
    y = X @ alphas
    pred = LinearLossPredictor(3, ridge=1e-6).fit(X, y)
    assert pred.alphas_ == pytest.approx(alphas, abs=1e-3)
    assert pred.r2_ == pytest.approx(1.0, abs=1e-6)
    assert pred.loo_mae_ < 1e-3


def test_predictor_with_no_data_is_additive():
    pred = LinearLossPredictor(4).fit(np.zeros((0, 4)), np.zeros(0))
    assert pred.alphas_ == pytest.approx(np.ones(4))


def test_pareto_front_is_exact_against_enumeration():
    rng = np.random.default_rng(1)
    items = [[(int(rng.integers(10, 1000)), float(rng.uniform(0, 1))) for _ in range(4)] for _ in range(4)]
    front = pareto_front(items, loss_limit=np.inf)
    combos = [(sum(items[i][c][0] for i, c in enumerate(cs)), sum(items[i][c][1] for i, c in enumerate(cs)))
              for cs in itertools.product(range(4), repeat=4)]
    losses = sorted(l for _, l in combos)
    for limit in (losses[0], losses[len(losses) // 4], losses[len(losses) // 2], losses[-1]):
        best_brute = min(s for s, l in combos if l <= limit)
        best_front = min(p.size_bits for p in front if p.loss <= limit)
        assert best_front == best_brute
    for p in front:  # every front point is realisable
        s = sum(items[i][c][0] for i, c in enumerate(p.choice))
        assert s == p.size_bits


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_predictor_strategy_close_to_exhaustive_with_few_scorings(seed):
    layers, truth = make_layers([150, 2400, 48000, 10080, 840], [0.3, 0.2, 0.05, 0.1, 0.4])
    ctx = context(layers, truth)
    layer_sensitivity(ctx)
    before = ctx.scorings
    outcome = predictor_search(ctx, seed=seed)
    best = outcome.feasible[0]
    assert within_budget(ctx.known(best), 1.0)
    optimum = brute_force_best(ctx, truth)
    assert ctx.ratio(best) >= 0.97 * optimum
    assert ctx.scorings - before <= 60
    assert outcome.predictor["n_fit"] >= 2


def test_exhaustive_finds_the_exact_optimum():
    layers, truth = make_layers([150, 2400, 4800], [0.3, 0.2, 0.05])
    ctx = context(layers, truth)
    layer_sensitivity(ctx)
    outcome = exhaustive_search(ctx)
    assert ctx.ratio(outcome.feasible[0]) == pytest.approx(brute_force_best(ctx, truth))


def test_greedy_is_feasible():
    layers, truth = make_layers([150, 2400, 4800], [0.3, 0.2, 0.05])
    ctx = context(layers, truth)
    layer_sensitivity(ctx)
    outcome = greedy_search(ctx)
    assert outcome.feasible and within_budget(ctx.known(outcome.feasible[0]), 1.0)


def test_max_scorings_stops_every_stage_and_says_so():
    layers, truth = make_layers([150, 2400, 4800, 900], [0.3, 0.2, 0.05, 0.1])
    ctx = context(layers, truth, max_scorings=12)
    layer_sensitivity(ctx)
    predictor_search(ctx)
    assert ctx.scorings <= 12
    assert ctx.stopped_by == "max_scorings"
    with pytest.raises(BudgetExhausted):
        ctx.check_budget()


def test_time_budget_stops_the_search():
    layers, truth = make_layers([150, 2400, 4800, 900], [0.3, 0.2, 0.05, 0.1])
    ticks = iter(range(10_000))
    ctx = context(layers, truth, time_budget=5.0, clock=lambda: float(next(ticks)))
    layer_sensitivity(ctx)
    predictor_search(ctx)
    assert ctx.stopped_by == "time_budget"


def test_uniform_baseline_bisects_widths():
    layers, truth = make_layers([150, 2400, 4800], [0.3, 0.2, 0.05])
    ctx = context(layers, truth)
    tup, tried = uniform_baseline(ctx, BITS)
    ks = set(tup.values())
    assert len(ks) == 1
    k = ks.pop()
    assert within_budget(ctx.known(tup), 1.0)
    # the next smaller width breaks the budget
    smaller = {name: k // 2 for name in tup}
    loss = sum(truth[n][v] for n, v in smaller.items()) * 1.1
    assert loss > 1.0
    assert len(tried) <= 4


def test_verify_steps_back_when_the_full_set_disagrees():
    layers, truth = make_layers([150, 2400], [0.3, 0.2])
    ctx = context(layers, truth, full_offset=0.3)
    a, b = {"w0": 4, "w1": 4}, {"w0": 16, "w1": 16}
    ctx.losses([a, b], "search")
    assert ctx.known(a) > 0.7  # a passes on search but fails on full
    chosen, tried = verify_full(ctx, [a, b])
    assert chosen == b and len(tried) == 2


def test_repeated_tuples_are_scored_once():
    layers, truth = make_layers([150, 2400], [0.3, 0.2])
    calls: list = []
    ctx = context(layers, truth, calls=calls)
    ctx.losses([{"w0": 4}, {"w0": 4}], "search")
    ctx.losses([{"w0": 4}], "search")
    assert ctx.scorings == 1 and calls == [(1, "search")]
