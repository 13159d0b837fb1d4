"""Attention as a random walk: the spectral gap ``1 - |lambda_2|``.

An attention matrix ``P`` (rows = queries, row-stochastic) is the transition matrix of a
random walk on tokens. Its eigenvalue of largest modulus is 1; ``lambda_2`` is the
eigenvalue of **second-largest modulus** (complex in general: attention matrices are not
symmetric). A larger gap ``1 - |lambda_2|`` means the walk forgets its start faster: fewer
layers are needed before every token has influenced every other.

Solvers: matrices with at most ``DENSE_MAX_N`` valid tokens use the dense QR algorithm
(``numpy.linalg.eigvals``, every eigenvalue); larger ones use ARPACK
(``scipy.sparse.linalg.eigs``, the ``k`` eigenvalues of largest modulus), falling back to the
dense solver if ARPACK does not converge within ``ARPACK_RESTARTS`` restarts (a second or
two at 600 tokens). ``method`` overrides the choice.
"""

from __future__ import annotations

import numpy as np

from levyattn.analysis._checks import Prepared, finish, prepare

DENSE_MAX_N = 512
METHODS = ("auto", "dense", "iterative")
ARPACK_RESTARTS = 300


def _by_modulus(eigenvalues: np.ndarray) -> np.ndarray:
    # Descending modulus; ties broken by the real part so 1 comes before -1.
    order = np.lexsort((-eigenvalues.real, -np.abs(eigenvalues)))
    return eigenvalues[order]


def _iterative(P: np.ndarray, k: int) -> np.ndarray | None:
    from scipy.sparse.linalg import ArpackNoConvergence, eigs

    n = P.shape[0]
    k = max(3, min(k, n - 2))
    try:
        # A generous Krylov space: attention spectra have a bulk of eigenvalues of similar
        # modulus, where a small space converges slowly.
        # Attention that converges at all does so in a few restarts (0.1 s at 2048 tokens); a
        # hard walk whose eigenvalues all have modulus 1 (a permutation, a previous-token
        # head) never does, and 100 n restarts ran for minutes before the dense fallback.
        vals = eigs(
            P,
            k=k,
            which="LM",
            ncv=min(n, max(2 * k + 1, 40)),
            tol=1e-12,
            maxiter=ARPACK_RESTARTS,
            return_eigenvectors=False,
        )
    except ArpackNoConvergence:
        return None
    return vals


def eigenvalues(P: np.ndarray, method: str = "auto", k: int = 6) -> np.ndarray:
    """Eigenvalues of one (n, n) matrix by descending modulus: all of them (dense) or the top k."""
    n = P.shape[0]
    use_dense = method == "dense" or (method == "auto" and n <= DENSE_MAX_N) or n <= 3
    if not use_dense:
        vals = _iterative(P, k)
        if vals is not None:
            return _by_modulus(vals)
    return _by_modulus(np.linalg.eigvals(P))


def _gap(spectrum: np.ndarray) -> float:
    if spectrum.size < 2:
        return 1.0  # one token: the walk is mixed from the start
    # |lambda_2| can exceed 1 by rounding only; the gap of a stochastic matrix lies in [0, 1].
    return float(np.clip(1.0 - abs(spectrum[1]), 0.0, 1.0))


def _check_method(method: str, k: int) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(k, int) or k < 2:
        raise ValueError(f"k (eigenvalues computed by the iterative solver) must be an int >= 2, got {k!r}")


def spectra(prep: Prepared, method: str = "auto", k: int = 6) -> list[np.ndarray]:
    """Per matrix of a prepared batch, its eigenvalues by descending modulus."""
    _check_method(method, k)
    if prep.all_valid and (method == "dense" or (method == "auto" and prep.n <= DENSE_MAX_N)):
        # One batched LAPACK call for the whole batch.
        vals = np.linalg.eigvals(prep.P)
        return [_by_modulus(v) for v in vals]
    return [eigenvalues(sub, method, k) for _, sub, _ in prep.matrices()]


def spectral_gap(
    P: object,
    mask: object = None,
    *,
    lengths: object = None,
    return_spectrum: bool = False,
    method: str = "auto",
    k: int = 6,
    atol: float | None = None,
) -> float | np.ndarray | tuple[float | np.ndarray, np.ndarray]:
    """Spectral gap ``1 - |lambda_2|`` of row-stochastic matrices.

    Args:
        P: (..., N, N) torch tensor or numpy array, rows summing to 1 (row i = query i).
        mask: optional bool (..., N), True = valid token; P is restricted to valid tokens and
            its rows renormalised. ``lengths`` (...,): the first ``lengths`` tokens are valid.
        return_spectrum: also return the eigenvalues.
        method: "auto" (dense up to ``DENSE_MAX_N`` = 512 tokens, ARPACK beyond), "dense" or
            "iterative".
        k: how many eigenvalues the iterative solver computes (>= 3 are always computed, so
            a complex-conjugate pair at |lambda_2| is never split).
        atol: tolerance on the row sums (default 1e-3; 1e-2 for float16/bfloat16 input).

    Returns:
        The gap, a float for one (N, N) matrix, else an array of shape ``P.shape[:-2]``; with
        ``return_spectrum``, also a complex array ``P.shape[:-2] + (K,)`` of eigenvalues by
        descending modulus (K = N for the dense solver, the top k for the iterative one;
        matrices with fewer valid tokens are padded with NaN). A single token has gap 1.
        A reducible or periodic walk (several eigenvalues of modulus 1) has gap 0.
    """
    _check_method(method, k)
    prep = prepare(P, mask=mask, lengths=lengths, atol=atol)
    specs = spectra(prep, method, k)
    gaps = np.array([_gap(s) for s in specs], dtype=np.float64)
    gap = finish(gaps, prep.batch_shape)
    if not return_spectrum:
        return gap
    width = max(s.size for s in specs)
    out = np.full((len(specs), width), np.nan + 1j * np.nan, dtype=np.complex128)
    for m, s in enumerate(specs):
        out[m, : s.size] = s
    return gap, out.reshape(prep.batch_shape + (width,))
