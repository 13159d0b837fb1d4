"""Mixing of the attention random walk, measured directly.

``t_mix(eps) = min { t : max_i || e_i P^t - pi ||_TV <= eps }`` with ``eps = 1/4`` by
default, ``pi`` the stationary distribution and ``||mu||_TV = 1/2 sum_j |mu_j|``.

- Exact (at most ``exact_max_n`` = 1024 valid tokens by default): ``d(t) = max_i ||e_i P^t -
  pi||_TV`` is non-increasing in t for every stochastic P, so t_mix is found by repeated
  squaring (``P, P^2, P^4, ...`` until ``d <= eps``) and then a binary search between the
  last two powers, using the stored powers: about ``2 log2(t_mix)`` dense products in all.
- Estimate (beyond ``exact_max_n``): the walk is advanced step by step from ``n_starts``
  starting tokens only -- the tokens whose one-step distribution is farthest from ``pi``,
  then random ones -- at ``n_starts * N^2`` per step. The maximum over a subset of starts
  can only be smaller, so the estimate is a **lower bound** on the exact mixing time.

``pi`` is computed exactly: the closed communicating classes of the walk are found with
``scipy.sparse.csgraph.connected_components``; a walk with more than one closed class has no
unique stationary distribution and never mixes (t_mix = inf); otherwise ``pi`` solves
``pi (P - I) = 0, sum pi = 1`` on the closed class. A periodic walk never mixes either: any
t_mix above ``max_steps`` is reported as ``inf``.
"""

from __future__ import annotations

import numpy as np

from levyattn.analysis._checks import finish, prepare

EXACT_MAX_N = 1024


def stationary(P: np.ndarray) -> np.ndarray | None:
    """The stationary distribution of one (n, n) stochastic matrix, or None if not unique."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    n = P.shape[0]
    support = csr_matrix(P > 0)
    count, labels = connected_components(support, directed=True, connection="strong")
    if count == 1:
        closed = np.ones(n, dtype=bool)
    else:
        rows, cols = support.nonzero()
        leaving = labels[rows] != labels[cols]
        open_classes = np.unique(labels[rows[leaving]])
        closed_classes = np.setdiff1d(np.arange(count), open_classes)
        if closed_classes.size != 1:
            return None
        closed = labels == closed_classes[0]
    Q = P[np.ix_(closed, closed)]
    m = Q.shape[0]
    A = Q.T - np.eye(m)
    A[-1, :] = 1.0  # replace one (redundant) balance equation by the normalisation
    b = np.zeros(m)
    b[-1] = 1.0
    try:
        pi_closed = np.linalg.solve(A, b)
    except np.linalg.LinAlgError:
        # Rows within rounding of one-hot (sharp trained attention) make the walk
        # numerically reducible: no unique stationary distribution, so it never mixes.
        return None
    pi_closed = np.clip(pi_closed, 0.0, None)
    pi = np.zeros(n)
    pi[closed] = pi_closed / pi_closed.sum()
    return pi


def _tv_max(M: np.ndarray, pi: np.ndarray) -> float:
    return float(0.5 * np.abs(M - pi).sum(axis=-1).max())


def _exact(P: np.ndarray, pi: np.ndarray, eps: float, max_steps: int) -> float:
    n = P.shape[0]
    if _tv_max(np.eye(n), pi) <= eps:
        return 0.0
    powers = [P]  # powers[j] = P^(2^j)
    while _tv_max(powers[-1], pi) > eps:
        if 2 ** (len(powers) - 1) >= max_steps:
            return float("inf")
        powers.append(powers[-1] @ powers[-1])
    j = len(powers) - 1
    if j == 0:
        return 1.0
    lo, current = 2 ** (j - 1), powers[j - 1]  # d(lo) > eps >= d(2 lo)
    for i in range(j - 2, -1, -1):
        candidate = current @ powers[i]
        if _tv_max(candidate, pi) > eps:
            lo, current = lo + 2**i, candidate
    t = lo + 1
    return float(t) if t <= max_steps else float("inf")


def _estimate(P: np.ndarray, pi: np.ndarray, eps: float, max_steps: int, n_starts: int, seed: int) -> float:
    n = P.shape[0]
    if n_starts >= n:
        starts = np.arange(n)
    else:
        # Half the starts where one step leaves the walk farthest from pi, half at random.
        one_step = 0.5 * np.abs(P - pi).sum(axis=1)
        worst = np.argsort(-one_step)[: n_starts // 2]
        rest = np.setdiff1d(np.arange(n), worst)
        extra = np.random.default_rng(seed).choice(rest, size=n_starts - worst.size, replace=False)
        starts = np.concatenate([worst, extra])
    X = np.zeros((starts.size, n))
    X[np.arange(starts.size), starts] = 1.0
    if _tv_max(X, pi) <= eps:
        return 0.0
    for t in range(1, max_steps + 1):
        X = X @ P
        if _tv_max(X, pi) <= eps:
            return float(t)
    return float("inf")


def mixing_time(
    P: object,
    mask: object = None,
    *,
    lengths: object = None,
    eps: float = 0.25,
    max_steps: int = 10_000,
    exact_max_n: int = EXACT_MAX_N,
    n_starts: int = 64,
    seed: int = 0,
    return_exact: bool = False,
    atol: float | None = None,
) -> float | np.ndarray | tuple[float | np.ndarray, bool | np.ndarray]:
    """Steps until the attention walk is within ``eps`` of stationarity from every start.

    Args:
        P: (..., N, N) row-stochastic torch tensor or numpy array.
        mask: bool (..., N), True = valid token, as in :func:`spectral_gap`.
        lengths: (...,) instead of ``mask``: the first ``lengths`` tokens are valid.
        eps: total-variation threshold in (0, 1); 1/4 is the standard mixing time.
        max_steps: larger mixing times (and walks that never mix) are reported as ``inf``.
        exact_max_n: exact up to this many valid tokens, the sampled lower bound beyond.
        n_starts: starting tokens of the estimate.
        seed: seeds the random starts of the estimate.
        return_exact: also return whether each value is exact (True) or the estimate.

    Returns:
        Mixing steps as floats (``inf`` = does not mix within ``max_steps``): a float for one
        matrix, else an array of shape ``P.shape[:-2]``; with ``return_exact`` also the flags.
    """
    from levyattn.config import check_int

    if isinstance(eps, bool) or not (isinstance(eps, (int, float)) and 0 < eps < 1):
        raise ValueError(f"eps must lie in (0, 1), got {eps!r}")
    for name, value in (("max_steps", max_steps), ("exact_max_n", exact_max_n), ("n_starts", n_starts)):
        check_int(name, value, 1)
    prep = prepare(P, mask=mask, lengths=lengths, atol=atol)
    steps = np.empty(prep.P.shape[0])
    exact = np.empty(prep.P.shape[0], dtype=bool)
    for m, sub, _ in prep.matrices():
        pi = stationary(sub)
        exact[m] = sub.shape[0] <= exact_max_n
        if pi is None:
            steps[m] = float("inf")
        elif exact[m]:
            steps[m] = _exact(sub, pi, eps, max_steps)
        else:
            steps[m] = _estimate(sub, pi, eps, max_steps, n_starts, seed)
    out = finish(steps, prep.batch_shape)
    if return_exact:
        flags = finish(exact, prep.batch_shape)
        return out, (bool(flags) if isinstance(flags, float) else flags)
    return out
