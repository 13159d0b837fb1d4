"""Shortest paths: exact against unpruned Dijkstra, hops against csgraph, known graphs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.sparse.csgraph import csgraph_from_dense, dijkstra, shortest_path

from levyattn.analysis import path_lengths
from levyattn.analysis.paths import HOP_RTOL, SearchWork, hop_distances, weighted_distances


def reference_weighted(P):
    with np.errstate(divide="ignore"):
        W = -np.log(P)
    np.fill_diagonal(W, np.inf)
    D = dijkstra(csgraph_from_dense(W, null_value=np.inf))
    np.fill_diagonal(D, 0)
    return D


def softmax_rows(logits):
    E = np.exp(logits - logits.max(axis=1, keepdims=True))
    return E / E.sum(axis=1, keepdims=True)


def attention_like(kind, n, seed, sharp):
    """Row-stochastic (n, n): softmax-like, FNA-like sparse rows, random zeros, causal."""
    rng = np.random.default_rng(seed)
    P = softmax_rows(rng.normal(size=(n, n)) * sharp)
    if kind == "sparse":  # each query keeps its few strongest keys, as a compact kernel does
        m = max(1, n // 4)
        P = P * (P >= np.sort(P, axis=1)[:, -m][:, None])
    elif kind == "zeros":
        P = P * (rng.random((n, n)) < 0.6)
        P[np.arange(n), rng.integers(0, n, n)] += 1e-3  # no empty row
    elif kind == "causal":
        P = np.tril(P)
    return P / P.sum(axis=1, keepdims=True)


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(["softmax", "sparse", "zeros", "causal"]),
    n=st.integers(1, 40),
    seed=st.integers(0, 10_000),
    sharp=st.floats(0.02, 8.0),
    masked=st.booleans(),
)
def test_pruned_dijkstra_is_exact(kind, n, seed, sharp, masked):
    P = attention_like(kind, n, seed, sharp)
    np.testing.assert_allclose(weighted_distances(P), reference_weighted(P), rtol=1e-12, atol=1e-12)
    if masked and n > 1:  # through path_lengths: restricted to valid tokens, renormalised
        valid = np.random.default_rng(seed).random(n) < 0.7
        valid[0] = True
        sub = P[np.ix_(valid, valid)]
        sums = sub.sum(axis=1, keepdims=True)
        if (sums > 0).all():  # a valid row with all its weight on masked keys is refused
            out = path_lengths(P, mask=valid, return_distances=True)
            ref = reference_weighted(sub / sums)
            np.testing.assert_allclose(out.distances[np.ix_(valid, valid)], ref, rtol=1e-12, atol=1e-12)
            assert np.isnan(out.distances[~valid]).all() and np.isnan(out.distances[:, ~valid]).all()


@pytest.mark.parametrize("n", [3, 24, 150])
@pytest.mark.parametrize("sharp", [0.3, 1.0, 3.0])
def test_pruned_dijkstra_is_exact_named(n, sharp):
    P = attention_like("softmax", n, seed=n, sharp=sharp)
    np.testing.assert_allclose(weighted_distances(P), reference_weighted(P), rtol=1e-12, atol=1e-12)


def test_two_hop_shortcut_beats_direct_edge():
    # 0 -> 2 directly costs -log 0.02; 0 -> 1 -> 2 costs -log 0.49 - log 0.9, far less.
    P = np.array([[0.49, 0.49, 0.02], [0.05, 0.05, 0.9], [0.3, 0.3, 0.4]])
    D = weighted_distances(P)
    assert D[0, 2] == pytest.approx(-np.log(0.49) - np.log(0.9))
    np.testing.assert_allclose(D, reference_weighted(P), rtol=1e-12)


def test_absorbing_token_and_mask_keep_conventions():
    P = attention_like("softmax", 12, seed=1, sharp=2.0)
    P[4] = 0.0
    P[4, 4] = 1.0  # token 4 attends only to itself: it hears from nobody
    out = path_lengths(P, return_distances=True)
    assert np.isinf(out.distances[4, np.arange(12) != 4]).all() and out.distances[4, 4] == 0
    assert out.diameter == np.inf and out.reachable_fraction == pytest.approx(1 - 11 / (12 * 11))
    mask = np.arange(12) != 4
    masked = path_lengths(P, mask=mask, return_distances=True)
    sub = P[np.ix_(mask, mask)]
    np.testing.assert_allclose(
        masked.distances[np.ix_(mask, mask)], reference_weighted(sub / sub.sum(1, keepdims=True)), rtol=1e-12
    )
    assert np.isnan(masked.distances[4]).all() and np.isnan(masked.eccentricity[4])


def test_certificate_settles_near_uniform_attention_without_search():
    # FNA-like: weights so close to uniform that every direct edge is shorter than any
    # two-edge path, so no Dijkstra runs at all.
    P = attention_like("softmax", 64, seed=0, sharp=0.2)
    D, work = weighted_distances(P, return_work=True)
    assert work == SearchWork(certified=64 * 63, sources=0, edges=0)
    expected = -np.log(P)
    np.fill_diagonal(expected, 0.0)
    np.testing.assert_array_equal(D, expected)


def test_softmax_search_runs_on_a_few_edges():
    # Softmax attention about as peaked as a random layer's: nearly every edge is a shortest
    # path; most are certified, some tokens need no search, and only edges short enough to
    # sit on a multi-edge shortest path stay in the graph Dijkstra runs on.
    n = 200
    P = attention_like("softmax", n, seed=0, sharp=0.7)
    D, work = weighted_distances(P, return_work=True)
    np.testing.assert_allclose(D, reference_weighted(P), rtol=1e-12)
    pairs = n * (n - 1)
    assert work.certified > 0.95 * pairs
    assert 0 < work.sources < n
    assert 0 < work.edges < 0.01 * pairs


@pytest.mark.parametrize("density", [0.01, 0.3, 0.9])
def test_dense_bfs_equals_csgraph(density):
    rng = np.random.default_rng(3)
    n = 120
    P = rng.random((n, n)) * (rng.random((n, n)) < density) + 1e-9
    P /= P.sum(1, keepdims=True)
    thr = 1.0 / n
    keep = (P >= thr * (1 - HOP_RTOL)) & ~np.eye(n, dtype=bool)  # rows left empty are uniform: 1/n, rounded
    ref = shortest_path(keep.astype(float), unweighted=True)
    np.testing.assert_array_equal(hop_distances(P, thr), ref)


def test_cycle_paths():
    n = 6
    P = np.zeros((n, n))
    i = np.arange(n)
    P[i, (i + 1) % n] = 1.0  # a directed cycle: i attends only to i + 1
    hops = path_lengths(P, kind="hops")
    assert hops.diameter == n - 1 and hops.mean == pytest.approx(np.mean(np.arange(1, n)))
    weighted = path_lengths(P)  # every edge has -log 1 = 0
    assert weighted.mean == 0 and weighted.reachable_fraction == 1
    np.testing.assert_array_equal(hops.eccentricity, np.full(n, n - 1))


def test_unreachable_and_mask():
    P = np.tril(np.ones((5, 5)))
    P /= P.sum(1, keepdims=True)  # causal: nobody reaches later tokens
    res = path_lengths(P, kind="hops", threshold=0.2)
    assert res.diameter == np.inf and res.reachable_fraction == pytest.approx(0.5)
    batch = np.stack([P, np.full((5, 5), 0.2)])
    out = path_lengths(batch, lengths=np.array([3, 5]), return_distances=True)
    assert out.mean.shape == (2,) and np.isnan(out.eccentricity[0, 3:]).all()
    assert np.isnan(out.distances[0, 3:, :]).all()
    assert out.mean[1] == pytest.approx(-np.log(0.2))


def test_bad_kind_and_threshold():
    P = np.full((3, 3), 1 / 3)
    with pytest.raises(ValueError, match="kind"):
        path_lengths(P, kind="bogus")
    with pytest.raises(ValueError, match="threshold"):
        path_lengths(P, kind="hops", threshold=2.0)
    with pytest.raises(ValueError, match="threshold"):
        path_lengths(P, kind="hops", threshold=True)  # not the number 1


@pytest.mark.parametrize("masked", [False, True])
def test_uniform_attention_keeps_every_hop_edge_despite_rounding(masked):
    """Uniform attention attends exactly 1/n, the default threshold; float32 rounds it to
    just under 1/25 and renormalising 1/9 over 5 valid tokens to just under 1/5. Every edge
    must stay: one hop between any two tokens."""
    import torch

    if masked:
        r = path_lengths(np.full((9, 9), 1 / 9), lengths=np.array(5), kind="hops")
    else:
        P = torch.softmax(torch.zeros(25, 25), -1)
        assert float(P[0, 0]) < 1 / 25
        r = path_lengths(P, kind="hops")
    assert (r.mean, r.diameter, r.reachable_fraction) == (1.0, 1.0, 1.0)
