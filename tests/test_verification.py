"""Full-set verification: the subset's sampling error, the step-back and the edge push."""

from __future__ import annotations

import numpy as np
import pytest

from onnxws.exploration import SearchContext, within_budget
from onnxws.verification import EDGE_MIN_PROBABILITY, SubsetNoise, search_and_verify

from test_exploration import make_layers


def test_noise_matches_binomial_sampling():
    """Simulated per-sample losses (each sample lost with probability q, none gained): the spread
    of full-set minus subset loss is what ``sd_full`` states."""
    rng = np.random.default_rng(0)
    n_search, n_full, q = 2000, 10000, 0.012
    lost = rng.random((4000, n_full)) < q
    loss_search = lost[:, :n_search].mean(axis=1) * 100
    loss_full = lost.mean(axis=1) * 100
    noise = SubsetNoise(n_search, n_full, per_sample=True, unit_per_fraction=100.0)
    assert np.std(loss_full - loss_search) == pytest.approx(noise.sd_full(q * 100), rel=0.06)


def test_noise_from_a_tuples_own_spread():
    """A tuple that flips samples both ways has a larger error than the floor: net loss 26 of
    2,000 samples from 32 lost and 6 gained (spread 38 / 2,000)."""
    noise = SubsetNoise(2000, 10000, per_sample=True, unit_per_fraction=100.0)
    frac, spread = 26 / 2000, 38 / 2000
    assert noise.variance(frac * 100, spread) == pytest.approx(spread - frac**2)
    assert noise.sd_full(frac * 100, spread) > noise.sd_full(frac * 100)
    assert noise.pass_probability(1.3, 1.0, spread) > noise.pass_probability(1.3, 1.0)
    before = noise.edge_target(1.0)
    noise.calibrate([(1.3, spread), (0.8, 28 / 2000), (0.0, 0.001)])  # spread per loss: 1.46, 1.75
    assert noise.spread_ratio == pytest.approx(1.75) and noise.edge_target(1.0) > before


def test_pass_probability_and_edge_target():
    noise = SubsetNoise(2000, 10000, per_sample=True, unit_per_fraction=100.0)
    assert noise.pass_probability(1.0, 1.0) == pytest.approx(0.5)
    probs = [noise.pass_probability(x, 1.0) for x in (0.6, 0.9, 1.1, 1.3, 1.6)]
    assert probs == sorted(probs, reverse=True) and probs[0] > 0.9 and probs[-1] < 0.01
    edge = noise.edge_target(1.0)
    assert edge > 1.0
    assert noise.pass_probability(edge, 1.0) == pytest.approx(EDGE_MIN_PROBABILITY, abs=1e-3)


def test_noise_without_a_rest_or_a_per_sample_metric():
    whole = SubsetNoise(500, 500, per_sample=True, unit_per_fraction=100.0)  # the subset is the full set
    assert whole.sd_full(1.0) == 0 and whole.edge_target(1.0) == 1.0
    assert whole.pass_probability(1.01, 1.0) == 0 and whole.pass_probability(0.99, 1.0) == 1
    custom = SubsetNoise(2000, 10000, per_sample=False, unit_per_fraction=100.0)
    assert custom.sd_full(1.0) == 0  # nothing known about a custom metric's spread ...
    custom.observe(0.8, 0.6)  # ... until a tuple is measured on both sets
    assert custom.sd_full(1.0) > 0
    floor = SubsetNoise(2000, 10000, per_sample=True, unit_per_fraction=100.0)
    before = floor.sd_full(1.0)
    floor.observe(1.0, 1.0 + 1e-6)  # a tiny observed gap never lowers the per-sample floor
    assert floor.sd_full(1.0) == pytest.approx(before)


def _context(full_offset: float, budget: float = 1.0):
    """Stub network whose full-set loss is the subset loss plus ``full_offset``."""
    layers, truth = make_layers([150, 2400, 4800, 600], [0.3, 0.2, 0.05, 0.1])

    def evaluate(tuples, subset):
        out = []
        for tup in tuples:
            loss = sum(truth[n][k] for n, k in tup.items()) * (1.1 if len(tup) > 1 else 1.0)
            out.append(0.99 - (loss + (full_offset if subset == "full" else 0.0)) / 100.0)
        return out

    ctx = SearchContext(layers, evaluate, {"search": 0.99, "full": 0.99}, budget, "absolute")
    for layer in layers:  # what the layer stage would have kept
        layer.candidates = [opt.k for opt in layer.options if opt.bits >= 1]
        layer.loss_alone = {k: truth[layer.name][k] for k in layer.candidates}
    return ctx


def _full_loss(ctx, tup):
    return ctx.known(tup, "full")


def test_edge_push_finds_more_when_the_full_set_is_kinder():
    noise = SubsetNoise(2000, 10000, per_sample=True, unit_per_fraction=100.0)
    plain = search_and_verify(_context(-0.3), strategy="exhaustive", noise=None)
    pushed_ctx = _context(-0.3)
    pushed = search_and_verify(pushed_ctx, strategy="exhaustive", noise=noise, edge_tries=4)
    assert plain.chosen is not None and pushed.chosen is not None
    assert within_budget(_full_loss(pushed_ctx, pushed.chosen), 1.0)
    assert pushed_ctx.ratio(pushed.chosen) > pushed_ctx.ratio(plain.chosen)
    edge = [entry for entry in pushed.log if entry[4] == "edge"]
    assert 1 <= len(edge) <= 4
    assert all(noise.pass_probability(s, 1.0) >= EDGE_MIN_PROBABILITY for _, s, _, _, _ in edge)
    assert pushed.edge_target is not None and pushed.edge_target > 1.0


def test_edge_push_keeps_the_verified_tuple_when_the_full_set_is_harsher():
    noise = SubsetNoise(2000, 10000, per_sample=True, unit_per_fraction=100.0)
    ctx = _context(+0.05)
    result = search_and_verify(ctx, strategy="exhaustive", noise=noise, edge_tries=3)
    assert result.chosen is not None and within_budget(_full_loss(ctx, result.chosen), 1.0)
    first_pass = next(t for t, _, full, _, phase in result.log if phase != "edge" and within_budget(full, 1.0))
    assert ctx.ratio(result.chosen) >= ctx.ratio(first_pass)
    assert sum(1 for entry in result.log if entry[4] == "edge") <= 3


def test_no_edge_push_when_disabled():
    noise = SubsetNoise(2000, 10000, per_sample=True, unit_per_fraction=100.0)
    result = search_and_verify(_context(-0.3), strategy="exhaustive", noise=noise, edge_tries=0)
    assert all(entry[4] != "edge" for entry in result.log) and result.edge_target is None


def _harsh_context(penalty: float, min_layers: int, *, layer_stage: bool, harsh=None) -> SearchContext:
    """Stub network whose full set is ``penalty`` pp harsher than the subset for every tuple sharing
    ``min_layers`` or more layers (or for which ``harsh(tuple)`` holds); ``layer_stage``: each layer
    alone already measured on the subset."""
    layers, truth = make_layers([150, 2400, 4800, 600], [0.3, 0.2, 0.05, 0.1])
    if harsh is None:
        def harsh(tup):
            return len(tup) >= min_layers

    def evaluate(tuples, subset):
        out = []
        for tup in tuples:
            loss = sum(truth[n][k] for n, k in tup.items()) * (1.1 if len(tup) > 1 else 1.0)
            if subset == "full" and harsh(tup):
                loss += penalty
            out.append(0.99 - loss / 100.0)
        return out

    ctx = SearchContext(layers, evaluate, {"search": 0.99, "full": 0.99}, 1.0, "absolute", max_scorings=400)
    for layer in layers:
        layer.candidates = [opt.k for opt in layer.options if opt.bits >= 1]
        layer.loss_alone = {k: truth[layer.name][k] for k in layer.candidates}
    if layer_stage:
        for layer in layers:
            ctx.losses([{layer.name: k} for k in layer.candidates], "search", stage="layer")
    return ctx


def test_step_back_goes_to_the_tuples_likely_to_hold():
    """The full set is much harsher than the subset for every tuple that shares several layers
    (+1.2 pp), not for a layer alone: after the strategy's picks fail, a CR-ordered step-back
    tries near-edge tuples that fail too, while the noise model, having seen that optimism,
    steps back to a tuple likely to hold and emits it."""
    plain_ctx = _harsh_context(1.2, 2, layer_stage=True)
    plain = search_and_verify(plain_ctx, strategy="greedy", noise=None, edge_tries=0)
    ctx = _harsh_context(1.2, 2, layer_stage=True)
    stepped = search_and_verify(ctx, strategy="greedy", noise=SubsetNoise(2000, 10000, per_sample=True, unit_per_fraction=100.0),
                                edge_tries=0)
    # The CR-ordered step-back fails; only the last resort (shrink) finds a tuple, a far smaller one.
    assert [phase for *_, phase in plain.log if phase == "step_back"]
    assert plain.log[-1][4] == "shrink" and plain.chosen is not None
    assert plain_ctx.ratio(plain.chosen) < ctx.ratio(stepped.chosen)
    assert stepped.chosen is not None and within_budget(ctx.known(stepped.chosen, "full"), 1.0)
    assert any(phase == "step_back" for *_, phase in stepped.log)


def test_shrink_when_no_subset_feasible_tuple_holds():
    """The full set is far harsher (+1.5 pp) for every tuple sharing 3 or more layers, and the
    subset measured only such tuples: every step-back candidate fails, and the shrink keeps the
    half of the best-missing tuple's layers that save the most bits per unit of damage, which holds."""
    ctx = _harsh_context(1.5, 3, layer_stage=False)
    result = search_and_verify(ctx, strategy="exhaustive", noise=SubsetNoise(2000, 10000, per_sample=True, unit_per_fraction=100.0),
                               edge_tries=0)
    phases = [phase for *_, phase in result.log]
    assert "shrink" in phases and phases[-1] == "shrink"
    assert result.chosen is not None and len(result.chosen) == 2
    assert within_budget(ctx.known(result.chosen, "full"), 1.0)
    # from the verified tuple that missed by the least, the two layers with the most bits saved per unit of loss alone
    start = min((entry for entry in result.log if entry[4] != "shrink"), key=lambda entry: entry[2])[0]
    ranked = sorted(start, key=lambda n: -(ctx.by_name[n].full_bits - ctx.by_name[n].option(start[n]).size_bits)
                    / (ctx.by_name[n].loss_alone[start[n]] + 1e-12))
    assert result.chosen == {n: start[n] for n in ranked[:2]}


def test_shrink_ends_on_one_layer_at_its_widest_candidate():
    """The full set is far harsher (+1.5 pp) for every tuple with a layer below its widest
    candidate: every step-back and shrink candidate misses, down to one layer at a narrow k; the
    shrink then verifies that layer at its widest candidate, which holds (before: nothing emitted)."""
    ctx = _harsh_context(1.5, 1, layer_stage=False, harsh=lambda tup: any(k < 256 for k in tup.values()))
    result = search_and_verify(ctx, strategy="exhaustive", noise=SubsetNoise(2000, 10000, per_sample=True, unit_per_fraction=100.0),
                               edge_tries=0)
    assert result.log[-1][4] == "shrink" and result.chosen is not None
    assert len(result.chosen) == 1 and list(result.chosen.values()) == [256]
    assert within_budget(ctx.known(result.chosen, "full"), 1.0)
    assert all(not within_budget(full, 1.0) for _, _, full, _, _ in result.log[:-1])


# -- growing the search subset ---------------------------------------------------------------

def test_subset_misled_needs_a_miss_and_an_answer_well_below_the_promise():
    from onnxws.verification import GROW_BELOW, Verification, subset_misled

    ctx = _harsh_context(1.2, 2, layer_stage=False)
    big = {"w0": 4, "w1": 4, "w2": 4, "w3": 4}
    small = {"w2": 64}
    held = Verification(chosen=small, log=[(small, 0.0, 0.1, 0.0, "verify")])
    assert subset_misled(ctx, held) is None  # nothing missed
    edge = Verification(chosen=small, log=[(big, 1.3, 1.5, 0.0, "edge"), (small, 0.0, 0.1, 0.0, "verify")])
    assert subset_misled(ctx, edge) is None  # over the budget on the subset already: no evidence
    missed = Verification(chosen=small, log=[(big, 0.6, 1.8, 0.0, "verify"), (small, 0.0, 0.1, 0.0, "step_back")])
    found = subset_misled(ctx, missed)
    assert found == {"promised_ratio": ctx.ratio(big), "verified_ratio": ctx.ratio(small), "misses": 1,
                     "threshold": GROW_BELOW}
    nothing = Verification(chosen=None, log=[(big, 0.6, 1.8, 0.0, "verify")])
    assert subset_misled(ctx, nothing)["verified_ratio"] is None
    close = {"w0": 8, "w1": 4, "w2": 4, "w3": 4}
    assert ctx.ratio(close) >= GROW_BELOW * ctx.ratio(big)
    assert subset_misled(ctx, Verification(chosen=close, log=missed.log)) is None


def test_a_new_search_subset_clears_the_search_and_keeps_the_full_set():
    ctx = _harsh_context(1.2, 2, layer_stage=True)
    tup = {"w1": 4, "w2": 4}
    ctx.losses([tup], "search")
    ctx.losses([tup], "full")
    ctx.target = 0.5
    before = len(ctx.explored)
    ctx.new_search_subset(0.98, "search_250")
    assert ctx.known(tup) is None and ctx.known(tup, "full") is not None
    assert ctx.baseline["search"] == 0.98 and ctx.target == ctx.budget
    assert len(ctx.explored) == before
    assert {e.subset for e in ctx.explored} == {"search_250", "full"}
    assert all(not layer.loss_alone and not layer.candidates for layer in ctx.layers)


def _misleading_lenet_data(n_easy: int, n_hard: int) -> dict[str, np.ndarray]:
    """LeNet-5's test digits ordered so that the search subset (the first ``n_easy``) holds the
    ones the model is surest of (largest top-2 logit margin) and the rest the least sure."""
    import onnxruntime as ort

    from conftest import LENET

    data = np.load(LENET / "eval.npz")
    session = ort.InferenceSession(str(LENET / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: data["input"]})[0]
    top = np.sort(logits, axis=1)
    order = np.argsort(top[:, -1] - top[:, -2], kind="stable")
    pick = np.concatenate([order[::-1][:n_easy], order[:n_hard]])
    return {"input": data["input"][pick], "y": data["y"][pick]}


def test_compress_grows_a_misleading_search_subset(tmp_path):
    """A search subset of easy digits calls nearly every tuple free; on the full set (mostly hard
    digits) the verified tuples miss, and without growth the answer shrinks to one layer. Grown
    4x, the search runs again where the subset ranks tuples like the full set, and the answer is
    more than twice as compressive, still within the budget on the full set."""
    import onnxws

    from conftest import LENET

    data = _misleading_lenet_data(100, 600)
    results = {}
    for label, grow in (("grown", True), ("fixed", False)):
        result = onnxws.compress(LENET / "model.onnx", data, loss=1.0, search_samples=100, cache=False, grow_subset=grow)
        assert within_budget(result.report["final"]["loss"], 1.0)
        result.save(tmp_path / f"{label}.onnx", report_dir=tmp_path / label)
        results[label] = result.report
    grown, fixed = results["grown"], results["fixed"]
    assert fixed["exploration"]["search_subset_growth"] == [] and fixed["data"]["n_search"] == 100
    assert fixed["config"]["global"]["grow_subset"] is False
    growth = grown["exploration"]["search_subset_growth"]
    assert [(g["from_samples"], g["to_samples"]) for g in growth][:1] == [(100, 400)]
    assert grown["data"]["n_search"] >= 400
    assert any(e["subset"] == "search_100" for e in grown["exploration"]["explored"])
    assert grown["compression"]["ratio_whole_theoretical"] > 2 * fixed["compression"]["ratio_whole_theoretical"]
    html = (tmp_path / "grown" / "report.html").read_text()
    assert "Search subset grown from 100 to 400 samples" in html
    assert "Search subset grown" not in (tmp_path / "fixed" / "report.html").read_text()
