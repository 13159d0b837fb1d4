"""Spectral gap and mixing time: exact answers on graphs with known spectra, numpy agreement."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from levyattn.analysis import mixing_time, spectral_gap, stationary


def cycle(n: int, lazy: bool = False) -> np.ndarray:
    P = np.zeros((n, n))
    i = np.arange(n)
    P[i, (i + 1) % n] += 0.5
    P[i, (i - 1) % n] += 0.5
    return 0.5 * (np.eye(n) + P) if lazy else P


def blocks(m: int, eps: float) -> np.ndarray:
    J = np.full((m, m), 1.0 / m)
    return np.block([[(1 - eps) * J, eps * J], [eps * J, (1 - eps) * J]])


@pytest.mark.parametrize("n", [5, 7, 8, 12])
def test_cycle_gaps(n):
    lazy_expected = (1 - math.cos(2 * math.pi / n)) / 2
    assert spectral_gap(cycle(n, lazy=True)) == pytest.approx(lazy_expected, abs=1e-12)
    plain_expected = 0.0 if n % 2 == 0 else 1 - math.cos(math.pi / n)  # even cycles are periodic
    assert spectral_gap(cycle(n)) == pytest.approx(plain_expected, abs=1e-12)


def test_complete_graph_and_blocks():
    n = 9
    P = (np.ones((n, n)) - np.eye(n)) / (n - 1)
    assert spectral_gap(P) == pytest.approx(1 - 1 / (n - 1), abs=1e-12)
    assert spectral_gap(np.full((n, n), 1 / n)) == pytest.approx(1.0, abs=1e-12)
    for eps in (0.1, 1e-3, 1e-7):
        assert spectral_gap(blocks(4, eps)) == pytest.approx(2 * eps, rel=1e-6, abs=1e-12)


def random_stochastic(rng, shape, sharp=1.0):
    return torch.softmax(torch.from_numpy(rng.normal(size=shape) * sharp), -1).numpy()


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 30), seed=st.integers(0, 10_000), sharp=st.floats(0.1, 5.0))
def test_gap_equals_numpy(n, seed, sharp):
    P = random_stochastic(np.random.default_rng(seed), (n, n), sharp)
    gap, spec = spectral_gap(P, return_spectrum=True)
    mods = np.sort(np.abs(np.linalg.eigvals(P)))[::-1]
    assert gap == pytest.approx(max(0.0, 1 - mods[1]), abs=1e-9)
    np.testing.assert_allclose(np.abs(spec), mods, atol=1e-9)
    assert spec[0] == pytest.approx(1.0, abs=1e-9)


def test_batched_torch_and_iterative_match_dense():
    rng = np.random.default_rng(0)
    P = random_stochastic(rng, (2, 3, 40, 40), 2.0)
    gaps = spectral_gap(torch.from_numpy(P).float())
    assert gaps.shape == (2, 3)
    for b in range(2):
        for h in range(3):
            assert gaps[b, h] == pytest.approx(spectral_gap(P[b, h]), abs=1e-5)
    big = random_stochastic(rng, (600, 600), 3.0)
    assert spectral_gap(big, method="iterative") == pytest.approx(spectral_gap(big, method="dense"), abs=1e-8)


def test_mask_and_lengths_restrict_and_renormalise():
    inner = cycle(5, lazy=True)
    P = np.zeros((8, 8))
    P[:5, :5] = 0.9 * inner
    P[:5, 5:] = 0.1 / 3
    P[5:] = 1 / 8
    expected = (1 - math.cos(2 * math.pi / 5)) / 2
    mask = np.array([True] * 5 + [False] * 3)
    assert spectral_gap(P, mask) == pytest.approx(expected, abs=1e-12)
    assert spectral_gap(P[None], lengths=np.array([5])) == pytest.approx(np.array([expected]), abs=1e-12)
    _, spec = spectral_gap(np.stack([P, P]), lengths=np.array([5, 8]), return_spectrum=True)
    assert np.isnan(spec[0, 5:]).all() and np.isfinite(spec[1]).all()


def brute_mixing(P, eps=0.25, limit=10_000):
    pi = stationary(P)
    M = np.eye(len(P))
    for t in range(limit + 1):
        if 0.5 * np.abs(M - pi).sum(1).max() <= eps:
            return t
        M = M @ P
    return math.inf


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 12), seed=st.integers(0, 10_000), sharp=st.floats(0.5, 6.0))
def test_mixing_matches_brute_force(n, seed, sharp):
    P = random_stochastic(np.random.default_rng(seed), (n, n), sharp)
    assert mixing_time(P) == brute_mixing(P)


def test_mixing_known_cases_and_estimate():
    assert mixing_time(np.full((6, 6), 1 / 6)) == 1
    assert mixing_time(cycle(8)) == math.inf  # periodic: never mixes
    assert mixing_time(np.eye(3)) == math.inf  # three closed classes
    lazy = cycle(10, lazy=True)
    assert mixing_time(lazy) == brute_mixing(lazy)
    steps, exact = mixing_time(lazy, exact_max_n=4, n_starts=10, return_exact=True)
    assert not exact and steps == brute_mixing(lazy)  # every start sampled: the estimate is exact
    P = random_stochastic(np.random.default_rng(1), (60, 60), 4.0)
    est = mixing_time(P, exact_max_n=10, n_starts=8)
    assert 1 <= est <= mixing_time(P)  # a lower bound


def test_stationary_with_transient_states():
    P = np.array([[0.5, 0.5, 0.0], [0.0, 0.2, 0.8], [0.0, 0.6, 0.4]])
    pi = stationary(P)
    assert pi[0] == 0 and np.allclose(pi @ P, pi)


def test_numerically_singular_walk_has_no_stationary_distribution(monkeypatch):
    # Sharp trained attention (rows within rounding of one-hot) can make the balance
    # equations exactly singular in floating point: no unique pi, so the walk never mixes.
    def singular(*_):
        raise np.linalg.LinAlgError("Singular matrix")

    P = np.full((4, 4), 0.25)
    assert stationary(P) is not None
    monkeypatch.setattr(np.linalg, "solve", singular)
    assert stationary(P) is None
    assert math.isinf(mixing_time(P))


def test_hard_walk_falls_back_to_dense_after_bounded_arpack_work():
    """A permutation's eigenvalues all have modulus 1: ARPACK never converges on it. It must
    give up after a bounded number of products (100 n restarts took minutes at 600 tokens)
    and the dense answer, gap 0, must come back."""
    from scipy.sparse.linalg import aslinearoperator

    from levyattn.analysis.spectral import _iterative, eigenvalues

    n = 200
    P = np.eye(n)[np.random.default_rng(0).permutation(n)]
    products = 0

    def matvec(x):
        nonlocal products
        products += 1
        return P @ x

    op = aslinearoperator(P)
    op.matvec = matvec
    op._matvec = matvec
    assert _iterative(op, 6) is None
    assert products < 40_000
    assert 1 - abs(eigenvalues(P, method="iterative")[1]) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        (dict(eps=0.0), ValueError),
        (dict(eps=True), ValueError),
        (dict(max_steps=0), ValueError),
        (dict(max_steps=True), TypeError),  # not the number 1
        (dict(n_starts=2.5), TypeError),
        (dict(exact_max_n=-1), ValueError),
    ],
)
def test_mixing_time_parameters_are_checked(kwargs, error):
    name = next(iter(kwargs))
    with pytest.raises(error, match=name):
        mixing_time(np.full((3, 3), 1 / 3), **kwargs)
