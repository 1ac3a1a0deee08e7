"""Tuple loss models: a network tuple's loss predicted from what its layers lost alone.

The network stage (``network_search.predictor_search``) fits one of these on the tuples scored
so far and searches its predicted Pareto front exactly:

- ``AdditiveLoss``: the paper's model, ``AL = sum_i alpha_i * AL_i(k_i)``;
- ``DivergenceLoss``: the layers' output divergences add up, a fitted link turns the sum into a loss;
- ``BestOfLoss`` (``auto``): both fitted every round, the one with the smaller leave-one-out
  error predicts.

A model only decides which tuples are scored next; every reported loss is a real scoring.
"""

from __future__ import annotations

import numpy as np

from onnxws.exploration import Layer, SearchContext, Tuple_
from onnxws.predictor import DivergenceLink, LinearLossPredictor

UNSHARED = 0  # item k meaning "leave this layer unshared"
FIT_WINDOW = 1.5  # the predictor is fitted on scored tuples with loss <= FIT_WINDOW * budget
MIN_LOSS_LEVELS = 2.0  # ``auto`` starts from the paper's model only above this (``loss_levels``)


def choice_items(layer: Layer, damage: dict[int, float] | None = None) -> list[tuple[int, int, float]]:
    """(k, size_bits, damage alone) for each candidate of a layer, plus 'unshared'.

    Damage is the loss alone unless another per-k measure (the output divergence) is given.
    """
    damage = layer.loss_alone if damage is None else damage
    out = [(k, layer.option(k).size_bits, damage[k]) for k in layer.candidates]
    out.append((UNSHARED, layer.full_bits, 0.0))
    return out


class AdditiveLoss:
    """The paper's model: ``AL = sum_i alpha_i * AL_i(k_i)``, alphas regressed on scored tuples
    near the budget (tuples far past it are super-additive: several layers at their edge)."""

    name = "additive"

    def __init__(self, ctx: SearchContext, ridge: float) -> None:
        self.ctx = ctx
        self.linear = LinearLossPredictor(len(ctx.layers), ridge=ridge)
        self.items = [choice_items(layer) for layer in ctx.layers]

    def features(self, tup: Tuple_) -> np.ndarray:
        return np.array([layer.loss_alone[tup[layer.name]] if layer.name in tup else 0.0 for layer in self.ctx.layers])

    def fit(self, tuples: list[Tuple_], exclude: tuple | None = None) -> None:
        """Fit on scored tuples; ``exclude`` (a tuple key) leaves one point out entirely."""
        tuples = [t for t in tuples if SearchContext.key(t) != exclude]
        X = np.array([self.features(t) for t in tuples]).reshape(-1, len(self.ctx.layers))
        y = np.array([self.ctx.known(t) for t in tuples], dtype=np.float64)
        near = y <= FIT_WINDOW * self.ctx.budget
        if near.sum() >= 2:
            X, y = X[near], y[near]
        self.linear.fit(X, y)

    def predict(self, tup: Tuple_) -> float:
        return self.loss(float(self.features(tup) @ self.linear.alphas_))

    def loss(self, feature_sum: float) -> float:
        return feature_sum

    def feature_limit(self, loss: float) -> float:
        return loss

    def band(self) -> float:
        mae = self.linear.loo_mae_ if self.linear.n_fit_ else None
        return mae if mae is not None else 0.25 * self.ctx.target

    def stats(self) -> dict:
        return {"model": self.name, "r2": self.linear.r2_, "loo_mae": self.linear.loo_mae_, "n_fit": self.linear.n_fit_}


class DivergenceLoss(AdditiveLoss):
    """``AL = g(sum_i alpha_i * D_i(k_i))``: the divergences of the layers alone add up to the
    tuple's (alphas regressed on the divergence each scored tuple measured, ridge towards 1),
    and ``g`` (``predictor.DivergenceLink``) turns a divergence into a loss."""

    name = "divergence"

    def __init__(self, ctx: SearchContext, ridge: float) -> None:
        super().__init__(ctx, ridge)
        self.items = [choice_items(layer, layer.divergence_alone) for layer in ctx.layers]
        self.link = DivergenceLink()
        self.loss_errors: list[float] = []

    def features(self, tup: Tuple_) -> np.ndarray:
        return np.array([layer.divergence_alone[tup[layer.name]] if layer.name in tup else 0.0 for layer in self.ctx.layers])

    def fit(self, tuples: list[Tuple_], exclude: tuple | None = None) -> None:
        ctx = self.ctx
        tuples = [t for t in tuples if SearchContext.key(t) != exclude]
        scored = [(e.divergence, e.loss_measured) for e in ctx.explored
                  if e.subset == "search" and e.divergence is not None and e.k and SearchContext.key(e.k) != exclude]
        self.link.fit(np.array([d for d, _ in scored]), np.array([loss for _, loss in scored]))
        X = np.array([self.features(t) for t in tuples]).reshape(-1, len(ctx.layers))
        d = np.array([ctx.divergence(t) for t in tuples], dtype=np.float64)
        ok = np.isfinite(d)
        self.linear.fit(X[ok], d[ok])
        # How well the whole model predicted the scored tuples' losses (in-sample).
        self.loss_errors = [abs(float(self.link.loss(x @ self.linear.alphas_)) - ctx.known(t))
                            for x, t in zip(X, tuples)]

    def loss(self, feature_sum: float) -> float:
        return float(self.link.loss(feature_sum))

    def feature_limit(self, loss: float) -> float:
        return self.link.divergence_limit(loss)

    def band(self) -> float:
        if len(self.loss_errors) >= 3:
            return float(np.mean(self.loss_errors))
        return 0.25 * self.ctx.target

    def stats(self) -> dict:
        return {"model": self.name, "r2": self.linear.r2_, "loo_mae": self.linear.loo_mae_, "n_fit": self.linear.n_fit_,
                "loss_mae": float(np.mean(self.loss_errors)) if self.loss_errors else None,
                "link_points": self.link.n_fit_}


def loo_error(model: AdditiveLoss, tuples: list[Tuple_]) -> float | None:
    """Leave-one-out mean absolute error (loss unit) of a loss model over the scored tuples
    (None below 3 of them); leaves ``model`` fitted on all of them.

    Predictions and measurements are clipped at the fit window (``FIT_WINDOW * budget``): past
    it, how far past does not matter to the search, but a tuple measured far past the budget
    and predicted within it is the error that wastes the network stage's scorings (on
    PP-OCR the paper's model, fitted near the budget, predicted 0.8 pp for tuples that lost
    25 pp; judged only on the tuples near the budget it still looked the better model).
    """
    window = FIT_WINDOW * model.ctx.budget
    errors = []
    if len(tuples) >= 3:
        for t in tuples:
            model.fit(tuples, exclude=SearchContext.key(t))
            errors.append(abs(min(model.predict(t), window) - min(model.ctx.known(t), window)))
    model.fit(tuples)
    return float(np.mean(errors)) if errors else None


def loss_levels(layers: list[Layer]) -> float:
    """Mean number of distinct non-zero losses alone among a layer's candidates.

    The paper's model orders a layer's candidates by their loss alone only. A top-1 loss on a
    few hundred samples is quantised (a layer alone often loses 0 or 1 sample at every width):
    below 2 levels per layer it can at best tell "free" from "costly", predicts 0 for most
    tuples, and its front collapses onto a few tuples.
    """
    if not layers:
        return 0.0
    levels = [len({round(layer.loss_alone[k], 9) for k in layer.candidates
                   if layer.loss_alone.get(k, 0.0) > 0}) for layer in layers]
    return sum(levels) / len(levels)


class BestOfLoss:
    """``auto``: both models fitted every round; the one with the smaller leave-one-out error
    on the scored tuples (``loo_error``) predicts (until there are 3 tuples to compare, the paper's, unless most
    layers have too few distinct losses alone (``loss_levels``); a tie in error keeps the paper's).
    Deep networks scored by top-1 on a few hundred samples favour the divergence model (a
    layer alone loses 0 or 1 sample); shallow ones with many samples can favour the paper's."""

    def __init__(self, ctx: SearchContext, ridge: float) -> None:
        self.ctx = ctx
        self.models = [AdditiveLoss(ctx, ridge), DivergenceLoss(ctx, ridge)]
        self.first = self.models[0] if loss_levels(ctx.layers) >= MIN_LOSS_LEVELS else self.models[1]
        self.active = self.first
        self.errors: dict[str, float | None] = {}

    def fit(self, tuples: list[Tuple_]) -> None:
        self.errors = {m.name: loo_error(m, tuples) for m in self.models}
        known = [m for m in self.models if self.errors[m.name] is not None]
        self.active = min(known, key=lambda m: self.errors[m.name]) if len(known) == len(self.models) else self.first

    def __getattr__(self, name: str):  # items, linear, loss, feature_limit, band, predict
        return getattr(self.active, name)

    def stats(self) -> dict:
        return {**self.active.stats(), "loo_mae_by_model": dict(self.errors)}


def loss_model_for(ctx: SearchContext, model: str, ridge: float):
    """The model asked for; ``divergence`` and ``auto`` need a divergence for every candidate
    (else the paper's additive model)."""
    divergences = ctx.has_divergence and all(
        k in layer.divergence_alone for layer in ctx.layers for k in layer.candidates)
    if model == "auto" and divergences:
        return BestOfLoss(ctx, ridge)
    if model == "divergence" and divergences:
        return DivergenceLoss(ctx, ridge)
    return AdditiveLoss(ctx, ridge)
