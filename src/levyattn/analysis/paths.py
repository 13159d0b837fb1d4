"""Shortest paths in the attention graph.

The graph: one node per (valid) token and a directed edge ``i -> j`` wherever query ``i``
attends to key ``j`` (``P_ij > 0``, ``i != j``; self-loops never shorten a path). Information
travels along ``j -> i`` across layers, so ``d(i, j)`` is how many "attention hops" token
``i`` needs to hear from token ``j``.

Two edge lengths (``kind``):
- ``"weighted"``: ``-log P_ij`` -- a path's length is minus the log of the probability the
  walk follows it, so short paths are likely ones.
- ``"hops"``: unweighted, keeping only edges with ``P_ij >= threshold``; the default threshold
  is ``1/n`` (n = valid tokens): an edge where a query attends at least uniformly. An entry
  within ``HOP_RTOL`` (1e-6, relative) of the threshold counts as reaching it, so exactly
  uniform attention, which float32 or renormalisation rounds just under 1/n, keeps its edges.

Reported per matrix: mean shortest-path length over ordered pairs ``i != j`` that are
reachable, the fraction of such pairs that are reachable, each token's eccentricity
``max_j d(i, j)`` and the diameter ``max_i ecc(i)`` (``inf`` when some pair is unreachable).

Computation is all-pairs through ``scipy.sparse.csgraph`` (no Python loop over nodes):
breadth-first distances for ``"hops"`` (dense graphs by matrix products, see
:func:`hop_distances`); Dijkstra for ``"weighted"``, on a graph pruned **exactly** (see
:func:`weighted_distances`): most direct edges are certified shortest by a lower bound on
every path of two or more edges, and an edge stays in the graph only if it can lie on such
a path that beats a direct edge. Near-uniform attention (FNA on random inputs) needs no
Dijkstra at all; random-layer softmax keeps a few percent of its edges.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from levyattn.analysis._checks import finish, prepare

KINDS = ("weighted", "hops")
STRONG_EDGES = 8  # each token's strongest in- and out-edges, used for the distance bounds
_LIMIT_GROUPS = 4  # Dijkstra calls, sources grouped by how far they must search
_SLACK = 1e-9  # relative: keep edges at a bound despite rounding (ties are kept)
DENSE_HOPS = 0.02
HOP_RTOL = 1e-6  # relative: an edge at the threshold up to rounding is kept


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


@dataclass(frozen=True)
class SearchWork:
    """What one :func:`weighted_distances` call had left to search after the exact pruning.

    ``certified``: ordered pairs ``i != j`` whose direct edge is certified shortest;
    ``sources``: tokens Dijkstra ran from (those with an uncertified target);
    ``edges``: edges of the pruned graph it ran on.
    """

    certified: int
    sources: int
    edges: int


def _edges(W: np.ndarray, keep: np.ndarray):
    from scipy.sparse import csr_matrix

    rows, cols = np.nonzero(keep)
    n = W.shape[0]
    return csr_matrix((W[rows, cols], (rows, cols)), shape=(n, n))


def _strongest(W: np.ndarray, k: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row (axis 1) or column (axis 0) of W: the k shortest edges' indices, (n, k), and
    the (k + 1)-th shortest length, (n,) -- a lower bound on every edge outside the k."""
    order = np.argpartition(W, k, axis=axis)
    if axis == 1:
        return order[:, :k], np.take_along_axis(W, order[:, k : k + 1], 1)[:, 0]
    return order[:k].T, np.take_along_axis(W, order[k : k + 1], 0)[0]


def _upper_bounds(W: np.ndarray, out_idx: np.ndarray, in_idx: np.ndarray) -> np.ndarray:
    """Path lengths no shorter than the distances: the direct edge, then paths that start
    with one of the source's strongest edges, then paths that end with one of the target's
    (each pass builds on the last, so strong-first-and-last three-edge paths count too)."""
    n = W.shape[0]
    rows = np.arange(n)
    upper = W.copy()
    for j in range(out_idx.shape[1]):
        via = out_idx[:, j]  # via[u]: u's j-th strongest out-neighbour
        np.minimum(upper, W[rows, via][:, None] + upper[via, :], out=upper)
    upper_t = np.ascontiguousarray(upper.T)  # row gathers instead of column gathers
    w_t = np.ascontiguousarray(W.T)
    for j in range(in_idx.shape[1]):
        via = in_idx[:, j]  # via[v]: v's j-th strongest in-neighbour
        np.minimum(upper_t, w_t[rows, via][:, None] + upper_t[via, :], out=upper_t)
    upper = np.ascontiguousarray(upper_t.T)
    np.fill_diagonal(upper, 0.0)
    return upper


def _needed_edges(W: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Edges that can lie on a shortest path of two or more edges, and distance upper bounds.

    On such a path every edge ``x -> y`` has a neighbour edge on it, before (``z -> x``) or
    after (``y -> v``), and a two-edge piece of a shortest path is a shortest path, so
    ``w_zx + w_xy = d(z, y) <= upper(z, y)`` or ``w_xy + w_yv = d(x, v) <= upper(x, v)``.
    An edge is kept when one of these can hold: exactly for ``z`` among ``x``'s k strongest
    in-neighbours (``v`` among ``y``'s k strongest out-neighbours); every other ``z`` has
    ``w_zx`` at least the (k + 1)-th shortest in-edge of ``x``, so there
    ``w_xy <= max_z upper(z, y) - that edge`` is the test (and symmetrically for ``v``).
    """
    n = W.shape[0]
    rows = np.arange(n)
    out_idx, out_next = _strongest(W, k, axis=1)
    in_idx, in_next = _strongest(W, k, axis=0)
    upper = _upper_bounds(W, out_idx, in_idx)
    with np.errstate(invalid="ignore"):  # inf - inf (unknown) gives NaN, which keeps the edge
        before = upper.max(axis=0)[None, :] - in_next[:, None]  # (x, y): a z -> x comes first
        after_t = upper.max(axis=1)[None, :] - out_next[:, None]  # (y, x): a y -> v comes next
        upper_t = np.ascontiguousarray(upper.T)  # row gathers instead of column gathers
        for j in range(k):
            z = in_idx[:, j]  # z[x]
            np.maximum(before, upper[z, :] - W[z, rows][:, None], out=before)
            v = out_idx[:, j]  # v[y]
            np.maximum(after_t, upper_t[v, :] - W[rows, v][:, None], out=after_t)
        bound = np.maximum(before, after_t.T)
        bound += _SLACK * np.maximum(1.0, np.abs(bound))
    keep = np.isfinite(W) & ~(W > bound)  # the diagonal is inf: never kept
    return keep, upper


def weighted_distances(P: np.ndarray, *, return_work: bool = False) -> np.ndarray | tuple[np.ndarray, SearchWork]:
    """All-pairs ``-log P`` shortest-path lengths of one (n, n) matrix, exact.

    Returns the (n, n) distances (0 on the diagonal, ``inf`` where unreachable), and with
    ``return_work`` also a :class:`SearchWork`. Steps, all vectorised:

    1. Certificate: with ``w = -log P`` (self-loops ignored), a path of two or more edges
       from ``u`` to ``v`` is at least ``out_min(u) + in_min(v)`` long (the shortest edge
       leaving ``u`` plus the shortest entering ``v``), so where ``w_uv`` is at most that,
       ``d(u, v) = w_uv``. The bound holds in floating point too: Dijkstra's sums of
       non-negative lengths are rounded monotonically.
    2. Only tokens with an uncertified target need a search; if none has one, ``d = w``.
    3. The graph keeps only the edges that can lie on a shortest path of two or more edges
       (see ``_needed_edges``), and Dijkstra runs from those tokens alone, each stopped at
       the largest upper bound among its uncertified targets (sources grouped by that
       limit): a path no longer than the bound has every node within it.

    Zeros in P are missing edges; missing bounds (``inf - inf``) keep every edge they touch,
    so such graphs are exact too, only less pruned.
    """
    from scipy.sparse.csgraph import dijkstra

    n = P.shape[0]
    with np.errstate(divide="ignore"):
        W = -np.log(P)
    np.fill_diagonal(W, np.inf)
    out_min, in_min = W.min(axis=1), W.min(axis=0)
    uncertified = W > out_min[:, None] + in_min[None, :]
    np.fill_diagonal(uncertified, False)
    sources = np.flatnonzero(uncertified.any(axis=1))
    D = W.copy()
    edges = 0
    if sources.size:  # an uncertified pair needs a third token, so n >= 3 here
        keep, upper = _needed_edges(W, min(STRONG_EDGES, n - 2))
        edges = int(keep.sum())
        graph = _edges(W, keep)
        reach = np.where(uncertified[sources], upper[sources], -np.inf).max(axis=1)
        order = np.argsort(reach)
        for group in np.array_split(order, min(_LIMIT_GROUPS, sources.size)):
            limit = float(reach[group].max())
            limit += _SLACK * max(1.0, limit)
            rows = sources[group]
            D[rows] = np.minimum(D[rows], dijkstra(graph, directed=True, indices=rows, limit=limit))
    np.fill_diagonal(D, 0.0)
    if not return_work:
        return D
    certified = n * (n - 1) - int(uncertified.sum())
    return D, SearchWork(certified=certified, sources=int(sources.size), edges=edges)


def hop_distances(P: np.ndarray, threshold: float) -> np.ndarray:
    """All-pairs unweighted distances over edges ``P_ij >= threshold`` (i != j), within a
    relative ``HOP_RTOL``: exactly uniform attention, 1/n, is 1 ulp under 1/n after rounding.

    Sparse graphs (at most ``DENSE_HOPS`` of the possible edges) go through csgraph's
    breadth-first search, ``O(n * edges)``. Dense graphs -- near-uniform attention keeps
    about half of all edges -- use a level-synchronous breadth-first search in which one
    matrix product advances every source by one hop (0/1 counts in float32 are exact up to
    2**24), ``O(n^3 * diameter)`` at BLAS speed: several times faster at n = 2048 when the
    diameter is a few hops. Both give the same distances (tested).
    """
    n = P.shape[0]
    keep = P >= threshold * (1 - HOP_RTOL)
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
        mask: bool (..., N), True = valid token, as in :func:`spectral_gap`.
        lengths: (...,) instead of ``mask``: the first ``lengths`` tokens are valid.
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
        if isinstance(threshold, bool) or not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
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
