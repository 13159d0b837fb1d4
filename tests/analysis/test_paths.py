"""Shortest paths: exact against unpruned Dijkstra, hops against csgraph, known graphs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.sparse.csgraph import csgraph_from_dense, dijkstra, shortest_path

from levyattn.analysis import path_lengths
from levyattn.analysis.paths import hop_distances, weighted_distances


def reference_weighted(P):
    with np.errstate(divide="ignore"):
        W = -np.log(P)
    np.fill_diagonal(W, np.inf)
    D = dijkstra(csgraph_from_dense(W, null_value=np.inf))
    np.fill_diagonal(D, 0)
    return D


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 40), seed=st.integers(0, 10_000), sharp=st.floats(0.05, 8.0))
def test_pruned_dijkstra_is_exact(n, seed, sharp):
    P = torch.softmax(torch.from_numpy(np.random.default_rng(seed).normal(size=(n, n)) * sharp), -1).numpy()
    np.testing.assert_allclose(weighted_distances(P), reference_weighted(P), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("density", [0.01, 0.3, 0.9])
def test_dense_bfs_equals_csgraph(density):
    rng = np.random.default_rng(3)
    n = 120
    P = rng.random((n, n)) * (rng.random((n, n)) < density) + 1e-9
    P /= P.sum(1, keepdims=True)
    thr = 1.0 / n
    keep = (P >= thr) & ~np.eye(n, dtype=bool)
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
