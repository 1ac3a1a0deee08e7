"""1-D k-means for weight sharing: exact dynamic programming, fast on large tensors.

Optimal 1-D k-means partitions the sorted values into k contiguous runs. The dynamic
program ``D_k[j] = min_i D_{k-1}[i] + cost(i, j)`` over weighted points (prefix sums give
each run's cost in O(1)) is solved for every k up to ``max(ks)`` in one pass with the
divide-and-conquer optimisation (the optimal split is monotone in j), vectorised over all
sub-problems of one recursion depth.

- Up to ``exact_points`` distinct values: the DP runs on the distinct values weighted by
  their counts, which is the exact optimum.
- Larger tensors: the DP runs on ``exact_points`` weighted bins (half equal-width, half
  equal-count edges, each bin at the mean of its values), then Lloyd iterations on the raw
  values refine it. Measured near-exact (tests/test_clustering.py bounds it vs the exact path).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

import numpy as np

from onnxws.sharing import Granularity, SharedWeight

logger = logging.getLogger(__name__)

MAX_K = 256
EXACT_POINTS = 4096
LLOYD_ITERATIONS = 20
FINE_BINS = 65536
FINISH_CHUNK = 1 << 20  # values labelled per step in compact mode


def _validate(values: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    flat = np.asarray(values).reshape(-1)
    if flat.size == 0:
        raise ValueError("cannot cluster an empty tensor")
    if not np.issubdtype(flat.dtype, np.floating):
        raise ValueError(f"values must be floating point, got {flat.dtype}")
    flat = flat.astype(np.float64)
    if not np.all(np.isfinite(flat)):
        raise ValueError("values hold NaN or Inf; such tensors are skipped, not clustered")
    for k in ks:
        if not 1 <= int(k) <= MAX_K:
            raise ValueError(f"k={k}: must be in 1..{MAX_K}")
    return flat


def _dp_split_tables(groups: Sequence[tuple[np.ndarray, np.ndarray]], kmax: int) -> tuple[list[np.ndarray], list[int]]:
    """Optimal split tables of the weighted 1-D k-means DP for k = 1..kmax, for several
    independent point sets at once (per-channel codebooks batch into the same numpy calls).

    Args:
        groups: per group, (sorted positions, positive weights).
        kmax: largest k.

    Returns:
        (``opts``, ``bases``): ``opts[k-1][bases[g] + j]`` is the (global) start index of the
        last run of the optimal k-partition of the first j points of group g.
    """
    sizes = [len(x) for x, _ in groups]
    bases = np.cumsum([0] + [m + 1 for m in sizes[:-1]]).tolist()
    W_parts, S_parts, Q_parts = [], [], []
    for x, w in groups:
        mean = float(np.average(x, weights=w))
        std = float(np.sqrt(np.average((x - mean) ** 2, weights=w))) or 1.0
        z = (x - mean) / std  # centred and scaled: well-conditioned prefix-sum differences
        W_parts.append(np.concatenate([[0.0], np.cumsum(w)]))
        S_parts.append(np.concatenate([[0.0], np.cumsum(w * z)]))
        Q_parts.append(np.concatenate([[0.0], np.cumsum(w * z * z)]))
    W, S, Q = np.concatenate(W_parts), np.concatenate(S_parts), np.concatenate(Q_parts)
    prev = np.full(len(W), np.inf)
    prev[bases] = 0.0
    sizes_arr, bases_arr = np.array(sizes), np.array(bases)
    opts: list[np.ndarray] = []
    for k in range(1, min(kmax, max(sizes)) + 1):
        D = np.full(len(W), np.inf)
        opt = np.zeros(len(W), dtype=np.int64)
        live = sizes_arr >= k
        # Pending sub-problems: targets j in [jlo, jhi], split candidates i in [ilo, ihi].
        jlo, jhi = bases_arr[live] + k, bases_arr[live] + sizes_arr[live]
        ilo, ihi = bases_arr[live] + k - 1, bases_arr[live] + sizes_arr[live] - 1
        while len(jlo):
            mid = (jlo + jhi) // 2
            hi = np.minimum(ihi, mid - 1)
            counts = hi - ilo + 1
            starts = np.cumsum(counts) - counts
            total = int(counts.sum())
            task = np.repeat(np.arange(len(mid)), counts)
            i = ilo[task] + (np.arange(total) - starts[task])
            j = mid[task]
            run_w = W[j] - W[i]
            run_s = S[j] - S[i]
            value = prev[i] + np.maximum(Q[j] - Q[i] - run_s * run_s / run_w, 0.0)
            best_value = np.minimum.reduceat(value, starts)
            first = np.minimum.reduceat(np.where(value <= best_value[task], np.arange(total), total), starts)
            best = i[first]
            D[mid] = best_value
            opt[mid] = best
            left = jlo <= mid - 1
            right = mid + 1 <= jhi
            jlo, jhi, ilo, ihi = (
                np.concatenate([jlo[left], (mid + 1)[right]]),
                np.concatenate([(mid - 1)[left], jhi[right]]),
                np.concatenate([ilo[left], best[right]]),
                np.concatenate([best[left], ihi[right]]),
            )
        opts.append(opt)
        prev = D
    return opts, bases


def _runs(opts: list[np.ndarray], base: int, m: int, k: int) -> np.ndarray:
    """Start indices (local to the group) of the k runs of a group's optimal partition."""
    starts = np.empty(k, dtype=np.int64)
    j = base + m
    for c in range(k, 0, -1):
        i = int(opts[c - 1][j])
        starts[c - 1] = i - base
        j = i
    return starts


def _bins(flat_sorted: np.ndarray, n_points: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted points summarising sorted values: (positions, weights, bin id of each value)."""
    lo, hi = flat_sorted[0], flat_sorted[-1]
    half = max(n_points // 2, 1)
    uniform = np.linspace(lo, hi, half + 1)[1:-1]
    quantile = flat_sorted[np.linspace(0, len(flat_sorted) - 1, half + 1).astype(np.int64)[1:-1]]
    edges = np.unique(np.concatenate([uniform, quantile]))
    ids = np.searchsorted(edges, flat_sorted, side="right")
    counts = np.bincount(ids, minlength=len(edges) + 1).astype(np.float64)
    sums = np.bincount(ids, weights=flat_sorted, minlength=len(edges) + 1)
    keep = counts > 0
    return sums[keep] / counts[keep], counts[keep], ids


def _lloyd(points: np.ndarray, weights: np.ndarray, centroids: np.ndarray, iterations: int) -> np.ndarray:
    """Refine sorted centroids by weighted Lloyd steps (keeps centroids of empty clusters)."""
    k = len(centroids)
    for _ in range(iterations):
        labels = np.searchsorted((centroids[1:] + centroids[:-1]) / 2.0, points)
        counts = np.bincount(labels, weights=weights, minlength=k)
        sums = np.bincount(labels, weights=weights * points, minlength=k)
        updated = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        updated = np.sort(updated)
        if np.array_equal(updated, centroids):
            break
        centroids = updated
    return centroids


def _finish(flat: np.ndarray, centroids: np.ndarray, k: int, *, compact: bool = False
            ) -> tuple[np.ndarray, np.ndarray, float]:
    """Labels by nearest centroid, exact means, inertia; codebook padded to k entries.

    ``compact``: uint8 labels made in chunks of FINISH_CHUNK values and no inertia (NaN), for
    callers that measure the error themselves (share_weight_all_k): the same labels and
    codebook bit for bit at ~1/4 of the memory (int64 labels and their temporaries cost
    8 bytes per value each: 24-40 bytes per weight on a large tensor).
    """
    centroids = np.unique(centroids)
    bounds = (centroids[1:] + centroids[:-1]) / 2.0
    if compact:
        labels = np.empty(len(flat), dtype=np.uint8)  # k <= 256
        counts = np.zeros(len(centroids), dtype=np.int64)
        sums = np.zeros(len(centroids))
        for start in range(0, len(flat), FINISH_CHUNK):
            part = flat[start:start + FINISH_CHUNK]
            ids = np.searchsorted(bounds, part) if len(centroids) > 1 else np.zeros(len(part), np.int64)
            labels[start:start + FINISH_CHUNK] = ids
            counts += np.bincount(ids, minlength=len(centroids))
            np.add.at(sums, ids, part)  # in value order, as bincount adds: the same sums bit for bit
    else:
        labels = np.searchsorted(bounds, flat) if len(centroids) > 1 else np.zeros(len(flat), np.int64)
        counts = np.bincount(labels, minlength=len(centroids))
        sums = np.bincount(labels, weights=flat, minlength=len(centroids))
    used = counts > 0
    centroids = (sums[used] / counts[used])
    remap = np.cumsum(used) - 1
    if compact:
        if not used.all():  # an empty cluster was dropped: renumber the labels above it
            narrow = remap.astype(np.uint8)
            for start in range(0, len(labels), FINISH_CHUNK):
                labels[start:start + FINISH_CHUNK] = narrow[labels[start:start + FINISH_CHUNK]]
        inertia = math.nan
    else:
        labels = remap[labels]
        inertia = float(np.sum((flat - centroids[labels]) ** 2))
    if len(centroids) < k:  # fewer distinct values than k: repeat the last centroid (never read by labels)
        centroids = np.concatenate([centroids, np.full(k - len(centroids), centroids[-1])])
    return centroids, labels if compact else labels.astype(np.int64), inertia


def cluster_sizes(values: np.ndarray, ks: Sequence[int], *, n_bins: int = EXACT_POINTS
                  ) -> dict[int, tuple[np.ndarray, np.ndarray, float]]:
    """Cluster one tensor for several k in one DP pass.

    Args:
        values: any shape, float dtype, finite.
        ks: the k values wanted (1..256).
        n_bins: most weighted points the DP runs on; up to this many distinct values the
            result is the exact optimum.

    Returns:
        ``{k: (codebook float64 [k] ascending (padded by repeating its last value when the
        tensor has fewer than k distinct values), labels int64 [n] (flattened order),
        inertia float = sum of squared errors)}``.

    Raises:
        ValueError: empty input, non-float or non-finite values, k outside 1..256.
    """
    return cluster_groups([values], ks, n_bins=n_bins)[0]


def cluster_groups(groups: Sequence[np.ndarray], ks: Sequence[int], *, n_bins: int = EXACT_POINTS,
                   compact: bool = False) -> list[dict[int, tuple[np.ndarray, np.ndarray, float]]]:
    """``cluster_sizes`` for several independent arrays (e.g. the channels of one tensor) at once.

    ``compact``: uint8 labels and NaN inertia (see ``_finish``); codebooks and labels unchanged.
    """
    ks = sorted({int(k) for k in ks})
    flats = [_validate(values, ks) for values in groups]
    points, fine, exact = [], [], []
    for flat in flats:
        distinct, counts = np.unique(flat, return_counts=True)
        if len(distinct) <= n_bins:
            points.append((distinct, counts.astype(np.float64)))
            fine.append(None)
            exact.append(True)
        else:
            del distinct, counts  # as large as the tensor: free them before sorting it
            ordered = np.sort(flat, kind="stable")
            pos, weight, _ = _bins(ordered, n_bins)
            points.append((pos, weight))
            # Lloyd refines on a fine histogram of the raw values (65,536 bins), not on every value.
            fpos, fweight, _ = _bins(ordered, FINE_BINS)
            del ordered
            fine.append((fpos, fweight))
            exact.append(False)
    opts, bases = _dp_split_tables(points, max(ks))
    results = []
    for g, flat in enumerate(flats):
        x, w = points[g]
        m = len(x)
        W = np.concatenate([[0.0], np.cumsum(w)])
        S = np.concatenate([[0.0], np.cumsum(w * x)])
        out = {}
        for k in ks:
            kk = min(k, m)
            starts = _runs(opts, bases[g], m, kk)
            ends = np.append(starts[1:], m)
            centroids = (S[ends] - S[starts]) / (W[ends] - W[starts])
            if not exact[g]:
                centroids = _lloyd(fine[g][0], fine[g][1], np.sort(centroids), LLOYD_ITERATIONS)
            out[k] = _finish(flat, np.sort(centroids), k, compact=compact)
        results.append(out)
    return results


class KMeans1D:
    """Exact (or near-exact above ``n_bins`` distinct values) 1-D k-means, estimator-shaped.

    Attributes set by ``fit``: ``codebook_`` (float64 [k'] ascending, k' <= n_clusters),
    ``labels_`` (int64, the input's shape), ``inertia_`` (sum of squared errors).
    """

    def __init__(self, n_clusters: int, *, n_bins: int = EXACT_POINTS, random_state: int | None = 0) -> None:
        self.n_clusters = n_clusters
        self.n_bins = n_bins
        self.random_state = random_state  # the method is deterministic; kept for the estimator API

    def fit(self, values: np.ndarray) -> KMeans1D:
        values = np.asarray(values)
        codebook, labels, inertia = cluster_sizes(values, [self.n_clusters], n_bins=self.n_bins)[self.n_clusters]
        used = int(labels.max()) + 1 if labels.size else 0
        self.codebook_ = codebook[:used]
        self.labels_ = labels.reshape(values.shape)
        self.inertia_ = inertia
        return self


def _group_slices(shape: tuple[int, ...], granularity: Granularity, channel_axis: int) -> list[tuple[slice, ...]]:
    if granularity.kind == "tensor" or len(shape) == 0:
        return [tuple(slice(None) for _ in shape)]
    axis = channel_axis % len(shape)
    size = 1 if granularity.kind == "channel" else granularity.group_size
    out = []
    for start in range(0, shape[axis], size):
        index = [slice(None)] * len(shape)
        index[axis] = slice(start, min(start + size, shape[axis]))
        out.append(tuple(index))
    return out


def share_weight_all_k(name: str, values: np.ndarray, ks: Sequence[int], granularity: Granularity = Granularity(),
                       channel_axis: int = 0, *, n_bins: int = EXACT_POINTS) -> dict[int, SharedWeight]:
    """SharedWeight of a tensor for each k (one DP pass per codebook group).

    Codebooks are cast to the tensor's dtype (float32 or float16); inertia is measured on
    the decoded (cast) values against the original ones.
    """
    values = np.asarray(values)
    if values.dtype not in (np.float32, np.float16):
        raise ValueError(f"{name}: weights must be float32 or float16, got {values.dtype}")
    ks = sorted({int(k) for k in ks})
    groups = _group_slices(values.shape, granularity, channel_axis)
    books = {k: np.empty((len(groups), k), dtype=values.dtype) for k in ks}
    indices = {k: np.empty(values.shape, dtype=np.uint8) for k in ks}
    parts = [values[index] for index in groups]
    results = cluster_groups(parts, ks, n_bins=n_bins, compact=True)
    for g, (index, part) in enumerate(zip(groups, parts)):
        for k, (codebook, labels, _) in results[g].items():
            books[k][g] = codebook.astype(values.dtype)
            indices[k][index] = labels.reshape(part.shape)
        results[g] = {}  # its labels are copied: free them
    out = {}
    size = 1 if granularity.kind == "channel" else granularity.group_size
    for k in ks:
        sw = SharedWeight(name, books[k], indices[k], channel_axis=channel_axis % max(values.ndim, 1),
                          group_size=size if granularity.kind != "tensor" else 1, granularity=granularity)
        out[k] = dataclasses.replace(sw, inertia=sw.squared_error(values))
    return out


def share_weight(name: str, values: np.ndarray, k: int, granularity: Granularity = Granularity(),
                 channel_axis: int = 0, *, n_bins: int = EXACT_POINTS) -> SharedWeight:
    """SharedWeight of a tensor for one k."""
    return share_weight_all_k(name, values, [k], granularity, channel_axis, n_bins=n_bins)[k]
