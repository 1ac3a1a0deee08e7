"""1-D k-means: hand-worked cases, the exact optimum by brute force, near-exactness, properties."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from onnxws.clustering import KMeans1D, cluster_sizes, share_weight, share_weight_all_k
from onnxws.sharing import Granularity, index_bits


def brute_force_inertia(values: np.ndarray, k: int) -> float:
    """Best sum of squared errors over every partition of the sorted values into k contiguous runs."""
    x = np.sort(values.astype(np.float64))
    n = len(x)
    best = np.inf
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        sse = sum(float(np.sum((x[a:b] - x[a:b].mean()) ** 2)) for a, b in zip(bounds[:-1], bounds[1:]))
        best = min(best, sse)
    return best


def test_hand_worked_example():
    codebook, labels, inertia = cluster_sizes(np.array([0.0, 1.0, 10.0, 11.0]), [2])[2]
    np.testing.assert_array_equal(codebook, [0.5, 10.5])
    np.testing.assert_array_equal(labels, [0, 0, 1, 1])
    assert inertia == pytest.approx(1.0)


def test_duplicates_weigh_in():
    # three 0s and one 4: k=1 centroid is the weighted mean 1.0, inertia 3*1 + 9 = 12
    codebook, labels, inertia = cluster_sizes(np.array([0.0, 0.0, 0.0, 4.0]), [1])[1]
    assert codebook[0] == pytest.approx(1.0) and inertia == pytest.approx(12.0)


@pytest.mark.parametrize("seed", range(6))
def test_exact_optimum_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    values = rng.normal(size=int(rng.integers(3, 10))).astype(np.float32)
    ks = list(range(1, len(values) + 1))
    result = cluster_sizes(values, ks)
    for k in ks:
        assert result[k][2] == pytest.approx(brute_force_inertia(values, k), rel=1e-9, abs=1e-12)


def test_binned_path_is_near_exact():
    rng = np.random.default_rng(0)
    values = rng.laplace(size=6000).astype(np.float32)
    exact = cluster_sizes(values, [2, 8, 32, 128], n_bins=10_000)
    binned = cluster_sizes(values, [2, 8, 32, 128], n_bins=1024)
    for k in exact:
        assert binned[k][2] <= exact[k][2] * 1.01


def test_inertia_never_grows_with_k():
    values = np.random.default_rng(1).normal(size=3000).astype(np.float32)
    ks = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    inertias = [cluster_sizes(values, ks)[k][2] for k in ks]
    assert all(a >= b - 1e-9 for a, b in zip(inertias, inertias[1:]))


def test_not_worse_than_sklearn():
    from sklearn.cluster import KMeans

    values = np.random.default_rng(2).normal(size=400)
    for k in (2, 5, 9):
        ours = cluster_sizes(values, [k])[k][2]
        theirs = KMeans(n_clusters=k, n_init=10, random_state=0).fit(values.reshape(-1, 1)).inertia_
        assert ours <= theirs * (1 + 1e-9)


def test_fewer_distinct_values_than_k_pads_the_codebook():
    codebook, labels, _ = cluster_sizes(np.array([1.0, 1.0, 2.0]), [4])[4]
    assert len(codebook) == 4 and np.all(np.isfinite(codebook))
    assert set(codebook[labels]) == {1.0, 2.0}


def test_estimator_shape():
    model = KMeans1D(3).fit(np.array([[0.0, 0.1], [5.0, 5.1], [9.0, 9.2]]))
    assert model.labels_.shape == (3, 2) and len(model.codebook_) == 3 and model.inertia_ > 0


@pytest.mark.parametrize("bad, message", [(np.array([]), "empty"), (np.array([1.0, np.nan]), "NaN"),
                                          (np.array([1, 2]), "floating")])
def test_validation(bad, message):
    with pytest.raises(ValueError, match=message):
        cluster_sizes(bad, [2])
    with pytest.raises(ValueError, match="1..256"):
        cluster_sizes(np.ones(3), [257])


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group:2"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_shared_weight_decodes_codebook_lookup(granularity, dtype):
    w = np.random.default_rng(3).normal(size=(5, 3, 2, 2)).astype(dtype)
    g = Granularity.parse(granularity)
    shared = share_weight_all_k("w", w, [1, 4, 8], g, channel_axis=0)
    for k, sw in shared.items():
        assert sw.codebooks.shape == (g.n_groups(w.shape, 0), k) and sw.codebooks.dtype == dtype
        decoded = sw.decode()
        assert decoded.shape == w.shape and decoded.dtype == dtype
        for c in range(w.shape[0]):
            group = 0 if g.kind == "tensor" else c // (1 if g.kind == "channel" else 2)
            np.testing.assert_array_equal(decoded[c], sw.codebooks[group][sw.indices[c].astype(int)])
        assert sw.bits == index_bits(k)
        assert sw.inertia == pytest.approx(float(np.sum((decoded.astype(np.float64) - w.astype(np.float64)) ** 2)))


def test_channel_axis_of_matmul_weight():
    w = np.random.default_rng(4).normal(size=(6, 4)).astype(np.float32)
    sw = share_weight("w", w, 2, Granularity.parse("channel"), channel_axis=1)
    assert sw.codebooks.shape == (4, 2)
    for c in range(4):
        assert len(np.unique(sw.decode()[:, c])) <= 2


def test_deterministic():
    values = np.random.default_rng(5).laplace(size=20000).astype(np.float32)
    a = share_weight("w", values, 16)
    b = share_weight("w", values, 16)
    assert a.codebooks.tobytes() == b.codebooks.tobytes() and a.indices.tobytes() == b.indices.tobytes()


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.integers(1, 60), elements=st.floats(-1e3, 1e3, width=32)), st.integers(1, 16))
def test_properties(values, k):
    codebook, labels, inertia = cluster_sizes(values, [k])[k]
    decoded = codebook[labels]
    assert len(np.unique(decoded)) <= k
    assert np.all(np.isfinite(codebook)) and labels.min() >= 0 and labels.max() < k
    # no worse than equal-count (quantile) binning with bin means
    x = np.sort(values.astype(np.float64))
    parts = np.array_split(x, min(k, len(x)))
    baseline = sum(float(np.sum((p - p.mean()) ** 2)) for p in parts if len(p))
    assert inertia <= baseline * (1 + 1e-9) + 1e-9


@pytest.mark.parametrize("n", [3000, 300_000])  # exact DP, and binned + Lloyd (over EXACT_POINTS distinct values)
def test_compact_labels_are_the_same_labels(n, monkeypatch):
    """share_weight_all_k's compact path (uint8 labels labelled in chunks, sums accumulated in value
    order) gives the int64 path's codebooks and labels bit for bit, and the float64 inertia."""
    import onnxws.clustering as clustering

    monkeypatch.setattr(clustering, "FINISH_CHUNK", 1000)  # many chunks
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.standard_normal(n - 40), np.full(40, 7.5)]).astype(np.float32)
    ks = [1, 4, 16, 256]
    plain = clustering.cluster_groups([values], ks)[0]
    compact = clustering.cluster_groups([values], ks, compact=True)[0]
    shared = clustering.share_weight_all_k("w", values, ks)
    for k in ks:
        assert compact[k][1].dtype == np.uint8 and plain[k][1].dtype == np.int64
        assert compact[k][0].tobytes() == plain[k][0].tobytes()
        np.testing.assert_array_equal(compact[k][1], plain[k][1])
        assert shared[k].indices.tobytes() == plain[k][1].astype(np.uint8).tobytes()
        decoded = plain[k][0].astype(np.float32)[plain[k][1]].astype(np.float64)
        assert shared[k].inertia == float(np.sum((decoded - values.astype(np.float64)) ** 2))


def test_an_empty_cluster_is_dropped_in_compact_mode_too():
    from onnxws.clustering import _finish

    flat = np.concatenate([np.random.default_rng(0).standard_normal(3000), [9.0, 9.5]])
    centroids = np.array([-1.0, 0.0, 1.0, 9.2, 30.0])  # nothing lies nearest to 30
    codebook, labels, _ = _finish(flat, centroids, 6)
    small, compact, inertia = _finish(flat, centroids, 6, compact=True)
    assert codebook.tobytes() == small.tobytes() and len(np.unique(labels)) == 4
    np.testing.assert_array_equal(labels, compact)
    assert np.isnan(inertia)
