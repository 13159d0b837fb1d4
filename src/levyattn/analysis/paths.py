"""Shortest paths in the attention graph.

The graph: one node per (valid) token and a directed edge ``i -> j`` wherever query ``i``
attends to key ``j`` (``P_ij > 0``, ``i != j``; self-loops never shorten a path). Information
travels along ``j -> i`` across layers, so ``d(i, j)`` is how many "attention hops" token
``i`` needs to hear from token ``j``.

Two edge lengths (``kind``):
- ``"weighted"``: ``-log P_ij`` -- a path's length is minus the log of the probability the
  walk follows it, so short paths are likely ones.
- ``"hops"``: unweighted, keeping only edges with ``P_ij >= threshold``; the default threshold
  is ``1/n`` (n = valid tokens): an edge where a query attends more than uniformly.

Reported per matrix: mean shortest-path length over ordered pairs ``i != j`` that are
reachable, the fraction of such pairs that are reachable, each token's eccentricity
``max_j d(i, j)`` and the diameter ``max_i ecc(i)`` (``inf`` when some pair is unreachable).

Computation is all-pairs through ``scipy.sparse.csgraph`` (no Python loop over nodes):
breadth-first distances for ``"hops"`` (dense graphs by matrix products, see
:func:`hop_distances`); Dijkstra for ``"weighted"``, on a graph pruned
**exactly**: with ``w_min`` the shortest edge and ``U`` an upper bound on the diameter
(from the all-pairs distances of the subgraph of each token's 8 strongest edges, and the
direct edges), every edge of a shortest path with two or more edges is at most
``U - w_min`` long, so ``d = min(W, d_S)`` with ``S`` the edges of length ``<= U - w_min``.
For near-uniform attention ``S`` is almost empty; for peaked attention it drops the long
tail. Graphs with missing edges (zeros in P, e.g. causal masks) are solved unpruned.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from levyattn.analysis._checks import finish, prepare

KINDS = ("weighted", "hops")
_TOP_K = 8
DENSE_HOPS = 0.02


@dataclass(frozen=True)
class PathLengths:
    """Shortest-path statistics of a batch of attention graphs.

    Shapes: ``mean``, ``diameter``, ``reachable_fraction``: ``P.shape[:-2]`` (floats for one
    matrix); ``eccentricity``: ``P.shape[:-1]`` with NaN at masked tokens; ``distances``
    (only with ``return_distances``): ``P.shape`` with NaN at masked pairs, ``inf`` where
    unreachable.
    """

    kind: str
    mean: float | np.ndarray
    diameter: float | np.ndarray
    reachable_fraction: float | np.ndarray
    eccentricity: np.ndarray
    threshold: float | None = None
    distances: np.ndarray | None = None


def _dense_graph(W: np.ndarray):
    from scipy.sparse.csgraph import csgraph_from_dense

    # null_value=inf: length-0 edges (P_ij = 1) stay edges.
    return csgraph_from_dense(W, null_value=np.inf)


def _edges(W: np.ndarray, keep: np.ndarray):
    from scipy.sparse import csr_matrix

    rows, cols = np.nonzero(keep)
    n = W.shape[0]
    return csr_matrix((W[rows, cols], (rows, cols)), shape=(n, n))


def weighted_distances(P: np.ndarray) -> np.ndarray:
    """All-pairs ``-log P`` shortest-path lengths of one (n, n) matrix (exact, pruned)."""
    from scipy.sparse.csgraph import dijkstra

    n = P.shape[0]
    with np.errstate(divide="ignore"):
        W = -np.log(P)
    np.fill_diagonal(W, np.inf)
    off = ~np.eye(n, dtype=bool)
    if n <= 2 or not np.isfinite(W[off]).all():
        D = dijkstra(_dense_graph(W), directed=True)
        np.fill_diagonal(D, 0.0)
        return D
    w_min = float(W[off].min())
    k = min(_TOP_K, n - 1)
    strongest = np.argpartition(W, k - 1, axis=1)[:, :k]  # the diagonal is inf, never among them
    keep = np.zeros((n, n), dtype=bool)
    keep[np.arange(n)[:, None], strongest] = True
    upper = np.minimum(W, dijkstra(_edges(W, keep), directed=True))
    diameter_bound = float(upper[off].max())
    tau = diameter_bound - w_min
    tau += 1e-9 * max(1.0, abs(tau))  # ties and rounding: keep edges at the bound
    short = (W <= tau) & off
    D = np.minimum(W, dijkstra(_edges(W, short), directed=True)) if short.any() else W.copy()
    np.fill_diagonal(D, 0.0)
    return D


def hop_distances(P: np.ndarray, threshold: float) -> np.ndarray:
    """All-pairs unweighted distances over edges ``P_ij >= threshold`` (i != j).

    Sparse graphs (at most ``DENSE_HOPS`` of the possible edges) go through csgraph's
    breadth-first search, ``O(n * edges)``. Dense graphs -- near-uniform attention keeps
    about half of all edges -- use a level-synchronous breadth-first search in which one
    matrix product advances every source by one hop (0/1 counts in float32 are exact up to
    2**24), ``O(n^3 * diameter)`` at BLAS speed: several times faster at n = 2048 when the
    diameter is a few hops. Both give the same distances (tested).
    """
    n = P.shape[0]
    keep = P >= threshold
    np.fill_diagonal(keep, False)
    if keep.mean() <= DENSE_HOPS or n < 64:
        from scipy.sparse.csgraph import shortest_path

        D = shortest_path(_edges(np.ones((n, n)), keep), method="D", directed=True, unweighted=True)
        np.fill_diagonal(D, 0.0)
        return D
    adjacency = keep.astype(np.float32)
    D = np.full((n, n), np.inf)
    np.fill_diagonal(D, 0.0)
    reached = np.eye(n, dtype=bool)
    frontier = np.eye(n, dtype=np.float32)
    for hop in range(1, n):
        new = ((frontier @ adjacency) > 0) & ~reached
        if not new.any():
            break
        D[new] = hop
        reached |= new
        frontier = new.astype(np.float32)
    return D


def _stats(D: np.ndarray) -> tuple[float, float, float, np.ndarray]:
    n = D.shape[0]
    ecc = D.max(axis=1)
    if n == 1:
        return 0.0, 0.0, 1.0, ecc
    off = ~np.eye(n, dtype=bool)
    finite = np.isfinite(D) & off
    count = int(finite.sum())
    mean = float(D[finite].mean()) if count else float("inf")
    return mean, float(ecc.max()), count / (n * (n - 1)), ecc


def path_lengths(
    P: object,
    mask: object = None,
    *,
    lengths: object = None,
    kind: str = "weighted",
    threshold: float | None = None,
    return_distances: bool = False,
    atol: float | None = None,
) -> PathLengths:
    """Shortest-path lengths of attention graphs (see the module docstring for the graph).

    Args:
        P: (..., N, N) row-stochastic torch tensor or numpy array.
        mask / lengths: valid tokens (True = valid), as in :func:`spectral_gap`.
        kind: "weighted" (edge length ``-log P_ij``) or "hops" (unweighted, thresholded).
        threshold: for "hops", keep edges with ``P_ij >= threshold``; default ``1/n``.
            Must lie in (0, 1].
        return_distances: also return the all-pairs distance matrices.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if threshold is not None:
        if kind != "hops":
            raise ValueError(f"threshold applies to kind='hops' only, got kind={kind!r}")
        if not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
            raise ValueError(f"threshold must lie in (0, 1], got {threshold!r}")
    prep = prepare(P, mask=mask, lengths=lengths, atol=atol)
    M, n = prep.P.shape[0], prep.n
    means = np.empty(M)
    diameters = np.empty(M)
    reach = np.empty(M)
    ecc = np.full((M, n), np.nan)
    dists = np.full((M, n, n), np.nan) if return_distances else None
    for m, sub, idx in prep.matrices():
        if kind == "weighted":
            D = weighted_distances(sub)
        else:
            D = hop_distances(sub, threshold if threshold is not None else 1.0 / sub.shape[0])
        means[m], diameters[m], reach[m], ecc[m, idx] = _stats(D)
        if dists is not None:
            dists[m][np.ix_(idx, idx)] = D
    shape = prep.batch_shape
    return PathLengths(
        kind=kind,
        mean=finish(means, shape),
        diameter=finish(diameters, shape),
        reachable_fraction=finish(reach, shape),
        eccentricity=ecc.reshape(shape + (n,)),
        threshold=threshold if kind == "hops" else None,
        distances=None if dists is None else dists.reshape(shape + (n, n)),
    )
