"""The paper's linear accuracy-loss predictor and the exact search of its Pareto front.

``AL(tuple) = sum_i alpha_i * AL_i(k_i)``: the loss of a tuple predicted from the losses of
its layers measured alone. The alphas come from a regression on really-scored tuples
(Dupuis et al.). With few scored tuples and many layers plain least squares is
under-determined, so the fit is ridge-regularised towards alpha = 1 (exact additivity, which
was measured to hold roughly on the models tried) and constrained to alpha >= 0; with enough
tuples the data dominate and it is the paper's multivariate regression.

The predicted front (min stored bits for each predicted loss) is found exactly by merging
per-layer Pareto sets layer by layer (a multiple-choice knapsack solved by Pareto-set
dynamic programming): no enumeration of the product of choices.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import nnls
from sklearn.isotonic import IsotonicRegression

logger = logging.getLogger(__name__)


class LinearLossPredictor:
    """Ridge-to-one, non-negative linear regression of tuple loss on per-layer losses.

    Args:
        n_layers: number of layers (columns of X).
        ridge: regularisation strength relative to the data scale; 0 = the paper's plain fit.
    """

    def __init__(self, n_layers: int, ridge: float = 0.3) -> None:
        self.n_layers = n_layers
        self.ridge = ridge

    def fit(self, X: np.ndarray, y: np.ndarray) -> LinearLossPredictor:
        """Fit alphas.

        Args:
            X: [T, N] loss alone of each tuple's choice per layer (0 for unshared layers).
            y: [T] measured loss of each tuple.

        Sets ``alphas_`` [N], ``r2_`` (in-sample), ``loo_mae_`` (leave-one-out mean absolute
        error, None below 3 tuples), ``n_fit_``.
        """
        X = np.asarray(X, dtype=np.float64).reshape(-1, self.n_layers)
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        self.n_fit_ = len(y)
        self.alphas_ = self._solve(X, y)
        pred = X @ self.alphas_
        total = float(np.sum((y - y.mean()) ** 2)) if len(y) > 1 else 0.0
        self.r2_ = None if total <= 1e-12 else 1.0 - float(np.sum((y - pred) ** 2)) / total
        self.loo_mae_ = None
        if len(y) >= 3:
            errors = []
            for t in range(len(y)):
                mask = np.arange(len(y)) != t
                alphas = self._solve(X[mask], y[mask])
                errors.append(abs(float(X[t] @ alphas) - y[t]))
            self.loo_mae_ = float(np.mean(errors))
        return self

    def _solve(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        n = self.n_layers
        if len(y) == 0:
            return np.ones(n)
        scale = float(np.mean(np.sum(X * X, axis=0))) + 1e-9
        lam = np.sqrt(self.ridge * scale)
        A = np.vstack([X, lam * np.eye(n)])
        b = np.concatenate([y, lam * np.ones(n)])
        alphas, _ = nnls(A, b, maxiter=50 * n)
        return alphas

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X, dtype=np.float64).reshape(-1, self.n_layers) @ self.alphas_


class DivergenceLink:
    """Monotone map from output divergence to accuracy loss, fitted on every scored point.

    A top-1 metric on a few hundred samples is quantised (one flipped sample is 1/n) and
    noisy, so the loss of a layer alone is 0 for many harmless layers and one or two flips
    for others, and sums of such losses over 50 layers say little. The output divergence
    (``metrics.output_divergence``) measured in the same runs is smooth, and the divergences
    of layers perturbed together add up (independent errors: variances add). The loss of any
    tuple is then modelled as ``g(D)``, one monotone function of its divergence, fitted by
    isotonic regression on all scored points (layers alone and tuples) and anchored at
    ``g(0) = 0``; it is interpolated linearly in ``sqrt(D)`` (for small errors the share of
    flipped top-1 decisions grows with the output error's standard deviation) and
    extrapolated past the last point along the line from the origin through it.
    """

    def fit(self, divergences: np.ndarray, losses: np.ndarray) -> DivergenceLink:
        x = np.sqrt(np.maximum(np.asarray(divergences, dtype=np.float64), 0.0))
        y = np.asarray(losses, dtype=np.float64)
        ok = np.isfinite(x) & np.isfinite(y)
        x, y = np.concatenate([[0.0], x[ok]]), np.concatenate([[0.0], y[ok]])
        iso = IsotonicRegression(increasing=True, out_of_bounds="clip").fit(x, y)
        self.x_, self.y_ = np.asarray(iso.X_thresholds_, dtype=np.float64), np.asarray(iso.y_thresholds_, dtype=np.float64)
        self.n_fit_ = int(ok.sum())
        return self

    def loss(self, divergence: np.ndarray | float) -> np.ndarray:
        """Predicted loss for divergences (array in, array out)."""
        x = np.sqrt(np.maximum(np.asarray(divergence, dtype=np.float64), 0.0))
        out = np.interp(x, self.x_, self.y_)
        x_max, y_max = self.x_[-1], self.y_[-1]
        if x_max > 0 and y_max > 0:
            out = np.where(x > x_max, y_max * x / x_max, out)
        return out

    def divergence_limit(self, loss: float) -> float:
        """The largest divergence whose predicted loss is <= ``loss`` (inf if every one is)."""
        x_max, y_max = self.x_[-1], self.y_[-1]
        if y_max <= loss:
            return np.inf if y_max <= 0 else float((x_max * loss / y_max) ** 2)
        above = int(np.argmax(self.y_ > loss))  # first threshold over the loss (index >= 1: y_[0] = g(0) <= 0 <= loss)
        if above == 0:
            return 0.0
        x0, x1, y0, y1 = self.x_[above - 1], self.x_[above], self.y_[above - 1], self.y_[above]
        x = x0 if y1 == y0 else x0 + (loss - y0) / (y1 - y0) * (x1 - x0)
        return float(x * x)


@dataclass(frozen=True)
class FrontPoint:
    """A tuple on the predicted Pareto front."""

    choice: tuple[int, ...]  # index into each layer's item list
    size_bits: int
    loss: float


def pareto_front(
    items: Sequence[Sequence[tuple[int, float]]],
    *,
    loss_limit: float = np.inf,
    resolution: float = 0.0,
    max_points: int = 4096,
) -> list[FrontPoint]:
    """Exact Pareto front (min size for each loss) of a multiple-choice knapsack.

    Args:
        items: per layer, the (size_bits, predicted loss contribution) of each choice.
        loss_limit: points whose loss exceeds it are dropped while merging (losses are
            clamped at >= 0 for this test only, since a layer cannot pay back another's loss
            for sure).
        resolution: losses closer than this are merged keeping the smaller size (0 = exact);
            the merge falls back to a resolution of limit / max_points when a front grows
            beyond ``max_points``.
        max_points: cap on the size of an intermediate front.

    Returns:
        Non-dominated points sorted by size ascending (so loss descending).
    """
    sizes = np.zeros(1, dtype=np.int64)
    losses = np.zeros(1)
    choices = np.zeros((1, 0), dtype=np.int32)
    for layer_items in items:
        s = np.array([it[0] for it in layer_items], dtype=np.int64)
        l = np.array([it[1] for it in layer_items], dtype=np.float64)
        new_sizes = (sizes[:, None] + s[None, :]).reshape(-1)
        new_losses = (losses[:, None] + l[None, :]).reshape(-1)
        parent = np.repeat(np.arange(len(sizes)), len(s))
        pick = np.tile(np.arange(len(s)), len(sizes))
        keep = np.maximum(new_losses, 0.0) <= loss_limit + 1e-12
        new_sizes, new_losses, parent, pick = new_sizes[keep], new_losses[keep], parent[keep], pick[keep]
        idx = _non_dominated(new_sizes, new_losses, resolution)
        if len(idx) > max_points:
            span = max(float(np.max(new_losses[idx]) - np.min(new_losses[idx])), 1e-9)
            idx = _non_dominated(new_sizes, new_losses, max(resolution, span / max_points))
        choices = np.concatenate([choices[parent[idx]], pick[idx, None].astype(np.int32)], axis=1)
        sizes, losses = new_sizes[idx], new_losses[idx]
    return [FrontPoint(tuple(int(c) for c in choices[i]), int(sizes[i]), float(losses[i])) for i in range(len(sizes))]


def _non_dominated(sizes: np.ndarray, losses: np.ndarray, resolution: float) -> np.ndarray:
    """Indices of points not dominated in (size, loss), sorted by size ascending."""
    order = np.lexsort((losses, sizes))
    kept = []
    best = np.inf
    for i in order:
        if losses[i] < best - max(resolution, 1e-12):
            kept.append(i)
            best = losses[i]
    return np.array(kept, dtype=np.int64)
