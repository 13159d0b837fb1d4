"""Diffusion maps (Coifman & Lafon 2006) with the FNA kernel, in scikit-learn's style.

From a point cloud ``X`` (N, d):

1. ``log K_ij = log Phi_alpha(dist(x_i, x_j))`` through :func:`levyattn.kernels.log_kernel`
   (``rescale=False``: distances in the data's units). The default alpha = 2 is the Gaussian
   kernel ``exp(-|x - y|^2 / eps)`` (also ``kernel="gaussian"``); ``alpha < 2`` the power law.
2. Density normalisation with exponent ``density_a`` (1: the Laplace-Beltrami normalisation,
   which makes the embedding reflect the manifold's geometry and not the sampling density;
   FNA attention itself uses 0): ``log K~_ij = log K_ij - a log q_i - a log q_j`` with
   ``q_i = sum_j K_ij``. Everything stays in the log domain (logsumexp), so no kernel value
   underflows, as in the FNA operator.
3. The Markov matrix ``P = D^-1 K~`` is reversible; its eigenpairs come from the symmetric
   ``D^-1/2 K~ D^-1/2`` (``scipy.linalg.eigh``, only the top ``n_components + 1``).
4. Right eigenvectors ``psi_k`` are normalised in ``L2(pi)`` (``sum_i pi_i psi_k(i)^2 = 1``,
   pi the stationary distribution, ``psi_0 = 1``); the embedding is
   ``Psi_t(i) = (lambda_1^t psi_1(i), ..., lambda_m^t psi_m(i))``, whose Euclidean distances
   approximate the diffusion distance ``D_t(i, j)^2 = sum_l (P^t_il - P^t_jl)^2 / pi_l``
   (equal when every component is kept). Each ``psi_k`` is signed so its entry of largest
   modulus is positive.

From a given Markov/attention matrix (``kernel="precomputed"``, ``X`` (N, N)
row-stochastic): steps 3-4 on ``X`` itself. A reversible ``X`` (``pi_i X_ij = pi_j X_ji``,
e.g. FNA with a shared query/key projection) is handled exactly as above. A non-reversible
one (most attention) uses its complex right eigenvectors by descending ``|lambda|`` (ties:
larger real part first, then positive imaginary part): a real eigenvalue gives one
coordinate ``Re(lambda^t psi)``; a complex pair gives two, ``Re`` and ``Im`` of
``lambda^t psi`` (a directed cycle embeds as a circle). An eigenvector that lives on
transient tokens only (stationary probability 0, as in causal attention, where the walk
ends on the first token) has no ``L2(pi)`` norm and keeps unit Euclidean norm.

Nyström extension (:meth:`DiffusionMap.transform`): a new point ``y`` gets the transition
row ``p(y, .)`` to the training points (same kernel and density normalisation, using the
training densities) and ``psi_k(y) = p(y, .) psi_k / lambda_k``; for training points this
reproduces the fit exactly. For ``"precomputed"`` pass the (M, N) transition rows directly.
"""

from __future__ import annotations

import numpy as np

from levyattn.analysis._checks import check_rows, prepare, to_numpy

KERNELS = ("fna", "gaussian", "precomputed")
_REVERSIBLE_RTOL = 1e-8
_TRANSIENT_NORM = 1e-8  # an L2(pi) norm below this is rounding: the vector lives where pi = 0


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    peak = np.max(a, axis=axis, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    return (np.log(np.exp(a - peak).sum(axis=axis, keepdims=True)) + peak).squeeze(axis)


def _signed(vectors: np.ndarray) -> np.ndarray:
    """Flip each column so its entry of largest modulus is positive (a deterministic sign)."""
    pick = np.abs(vectors).argmax(axis=0)
    signs = np.sign(vectors[pick, np.arange(vectors.shape[1])].real)
    signs[signs == 0] = 1.0
    return vectors * signs


class DiffusionMap:
    """Diffusion-map embedding of a point cloud (FNA or Gaussian kernel) or a Markov matrix.

    Args:
        n_components: embedding dimension m >= 1.
        t: diffusion time (number of steps) >= 0; coordinates are scaled by ``lambda^t``.
        alpha: Lévy index of the FNA kernel in (0, 2]. The default 2 is its Gaussian member
            ``exp(-|x - y|^2 / eps)``, the classic diffusion map, which follows the data's
            manifold; ``alpha < 2`` (e.g. 1.2, the FNA default elsewhere) gives the power-law
            kernel, whose heavy tail jumps across the ambient gaps between nearby sheets of a
            manifold (see the note below). Ignored for ``kernel="gaussian"`` (alpha = 2) and
            ``"precomputed"``.
        kernel: "fna", "gaussian" (the same as "fna" at alpha = 2) or "precomputed" (``fit``
            takes an (N, N) Markov matrix).
        bandwidth: eps > 0 as in docs/operator.md (length scale ``eps**(1/alpha)``), or "auto": the
            length scale is the median distance of a point to its ``n_neighbors``-th nearest
            neighbour and ``eps = scale**alpha``.
        density_a: Coifman-Lafon density normalisation exponent in [0, 1]. The default 1 (the
            Laplace-Beltrami normalisation, which removes the sampling density) differs on purpose
            from ``fractional_attention``'s 0, which keeps attention as the paper defines it.
        manifold: "euclidean" or "sphere" (geodesic distances on the sphere of
            ``sphere_radius``; points are projected onto it).
        d_intrinsic: d_M in the FNA exponent ``-(d_M + alpha)`` for alpha < 2; default the
            ambient dimension d (d - 1 on the sphere). Larger values steepen the tail. No effect
            at alpha = 2.
        n_neighbors: for ``bandwidth="auto"``.

    Attributes after ``fit``: ``eigenvalues_`` (m,) (complex for a non-reversible matrix),
    ``eigenvectors_`` (N, m) right eigenvectors psi (complex when non-reversible),
    ``embedding_`` (N, m) real coordinates, ``stationary_`` (N,), ``markov_`` (N, N),
    ``reversible_``, ``bandwidth_`` (eps used, None when precomputed).

    The power-law kernel and the manifold: with ``alpha < 2`` every point keeps a weight
    ``~ r^-(d_M + alpha)`` for points an ambient distance r away, across the gap between two
    sheets as well as along the manifold, so the walk takes shortcuts and the embedding
    follows the ambient shape. On scikit-learn's Swiss roll (1000 points, no noise) the first
    coordinate's |Spearman| with the roll's parameter is 1.00 at the default alpha = 2, 0.19
    at alpha 1.2 with d_M = 3 (PCA: 0.20), 0.19 with d_M = 2 (the roll's intrinsic dimension,
    what an intrinsic-dimension estimator would give), 0.997 with d_M = 10 (a tail steep
    enough to act locally). Use alpha < 2 for its multiscale walk, not to unroll a manifold.
    """

    def __init__(
        self,
        n_components: int = 2,
        t: int = 1,
        alpha: float = 2.0,
        kernel: str = "fna",
        bandwidth: float | str = "auto",
        density_a: float = 1.0,
        manifold: str = "euclidean",
        d_intrinsic: float | None = None,
        sphere_radius: float = 1.0,
        n_neighbors: int = 7,
    ) -> None:
        self.n_components = n_components
        self.t = t
        self.alpha = alpha
        self.kernel = kernel
        self.bandwidth = bandwidth
        self.density_a = density_a
        self.manifold = manifold
        self.d_intrinsic = d_intrinsic
        self.sphere_radius = sphere_radius
        self.n_neighbors = n_neighbors

    # ----------------------------------------------------------------- checks
    def _check_params(self) -> None:
        from levyattn.config import (
            check_alpha,
            check_d_intrinsic,
            check_density_a,
            check_int,
            check_manifold,
            check_positive,
        )

        check_int("n_components", self.n_components, 1)
        check_int("t (diffusion steps)", self.t, 0)
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        if self.kernel == "fna":
            check_alpha(self.alpha)
            check_d_intrinsic(self.d_intrinsic)  # a negative d_M made the kernel grow with distance
        check_manifold(self.manifold)
        check_positive("sphere_radius", self.sphere_radius)
        if isinstance(self.bandwidth, str):
            if self.bandwidth != "auto":
                raise ValueError(f"bandwidth must be a number > 0 or 'auto', got {self.bandwidth!r}")
        else:
            check_positive("bandwidth", self.bandwidth)
        check_density_a(self.density_a)
        check_int("n_neighbors", self.n_neighbors, 1)

    def _points(self, X: object, name: str = "X") -> np.ndarray:
        arr, _ = to_numpy(X, name)
        if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
            raise ValueError(f"{name} must be a non-empty point cloud of shape (N, d), got {tuple(arr.shape)}")
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} has {int((~np.isfinite(arr)).sum())} non-finite entries (NaN or Inf)")
        if hasattr(self, "X_fit_") and arr.shape[1] != self.X_fit_.shape[1]:
            raise ValueError(f"{name} has {arr.shape[1]} features but the map was fitted on {self.X_fit_.shape[1]}")
        return arr

    # ----------------------------------------------------------------- kernel
    @property
    def _alpha(self) -> float:
        return 2.0 if self.kernel == "gaussian" else float(self.alpha)

    def _log_kernel(self, Y: np.ndarray, X: np.ndarray, eps: float) -> np.ndarray:
        import torch

        from levyattn.kernels import log_kernel

        with torch.no_grad():
            out = log_kernel(
                torch.from_numpy(Y),
                torch.from_numpy(X),
                alpha=self._alpha,
                bandwidth=eps,
                manifold=self.manifold,
                rescale=False,
                d_intrinsic=self.d_intrinsic,
                sphere_radius=self.sphere_radius,
            )
        return out.numpy()

    def _distances(self, X: np.ndarray) -> np.ndarray:
        sq = np.maximum((X * X).sum(1)[:, None] + (X * X).sum(1)[None, :] - 2 * X @ X.T, 0.0)
        if self.manifold == "sphere":
            U = X / np.linalg.norm(X, axis=1, keepdims=True)
            chord = np.sqrt(np.clip(2 - 2 * U @ U.T, 0.0, 4.0))
            return self.sphere_radius * 2 * np.arcsin(np.clip(chord / 2, 0.0, 1.0))
        return np.sqrt(sq)

    def _auto_bandwidth(self, X: np.ndarray) -> float:
        n = X.shape[0]
        if n < 2:
            raise ValueError("bandwidth='auto' needs at least 2 points")
        k = min(self.n_neighbors, n - 1)
        dist = self._distances(X)
        kth = np.partition(dist, k, axis=1)[:, k]  # column 0 is the point itself
        scale = float(np.median(kth))
        if scale <= 0:
            raise ValueError("bandwidth='auto' found duplicate points only (median neighbour distance 0)")
        return scale**self._alpha

    def _normalised_log_kernel(self, logK: np.ndarray, log_q_rows: np.ndarray, log_q_train: np.ndarray) -> np.ndarray:
        a = float(self.density_a)
        return logK - a * log_q_rows[:, None] - a * log_q_train[None, :]

    # ----------------------------------------------------------------- fit
    def fit(self, X: object, y: object = None) -> DiffusionMap:
        """Fit on a point cloud (N, d) or, with ``kernel="precomputed"``, a Markov matrix (N, N)."""
        self._check_params()
        for attr in ("X_fit_", "log_q_"):
            self.__dict__.pop(attr, None)
        if self.kernel == "precomputed":
            return self._fit_markov(X)
        X = self._points(X)
        n = X.shape[0]
        if n < self.n_components + 1:
            raise ValueError(f"need at least n_components + 1 = {self.n_components + 1} points, got {n}")
        eps = self._auto_bandwidth(X) if self.bandwidth == "auto" else float(self.bandwidth)
        logK = self._log_kernel(X, X, eps)
        logK = 0.5 * (logK + logK.T)  # symmetric up to rounding; make it exactly so
        log_q = _logsumexp(logK, axis=1)
        logKt = self._normalised_log_kernel(logK, log_q, log_q)
        log_d = _logsumexp(logKt, axis=1)
        self.X_fit_ = X
        self.log_q_ = log_q
        self.bandwidth_ = eps
        self.markov_ = np.exp(logKt - log_d[:, None])
        log_pi = log_d - _logsumexp(log_d, axis=0)
        S = np.exp(logKt - 0.5 * log_d[:, None] - 0.5 * log_d[None, :])
        self._fit_symmetric(0.5 * (S + S.T), np.exp(log_pi))
        return self

    def _fit_symmetric(self, S: np.ndarray, pi: np.ndarray) -> None:
        from scipy.linalg import eigh

        n, m = S.shape[0], self.n_components
        vals, vecs = eigh(S, subset_by_index=[n - m - 1, n - 1])
        order = np.argsort(-vals)
        vals, vecs = vals[order], vecs[:, order]
        psi = vecs / np.sqrt(pi)[:, None]  # right eigenvectors of P, orthonormal in L2(pi)
        self.reversible_ = True
        self.stationary_ = pi
        self.eigenvalues_ = vals[1 : m + 1]
        self.eigenvectors_ = _signed(psi[:, 1 : m + 1])
        self.embedding_ = self._coordinates(self.eigenvectors_)

    def _fit_markov(self, X: object) -> DiffusionMap:
        from levyattn.analysis.mixing import stationary

        prep = prepare(X, name="X (precomputed Markov matrix)")
        if prep.batch_shape != ():
            raise ValueError(f"kernel='precomputed' needs one (N, N) matrix, got batch shape {prep.batch_shape}")
        P = prep.P[0]
        n, m = P.shape[0], self.n_components
        if n < m + 1:
            raise ValueError(f"need at least n_components + 1 = {m + 1} tokens, got {n}")
        pi = stationary(P)
        if pi is None:
            raise ValueError(
                "X (precomputed Markov matrix) has several closed classes: no unique stationary distribution"
            )
        self.markov_ = P
        self.bandwidth_ = None
        flow = pi[:, None] * P
        if (pi > 0).all() and np.allclose(flow, flow.T, rtol=_REVERSIBLE_RTOL, atol=1e-14):
            root = np.sqrt(pi)
            S = root[:, None] * P / root[None, :]
            self._fit_symmetric(0.5 * (S + S.T), pi)
            return self
        vals, vecs = np.linalg.eig(P)
        # lambda_1 = 1 (the stationary pair) first, then by descending modulus, ties (every
        # eigenvalue of a directed cycle has modulus 1) by the larger real part, then Im > 0;
        # moduli are rounded so that rounding noise does not decide a tie.
        first = np.zeros(n, dtype=bool)
        first[np.argmin(np.abs(vals - 1))] = True
        modulus = np.round(np.abs(vals), 10)
        order = np.lexsort((-vals.imag, -vals.real.round(10), -modulus, ~first))
        vals, vecs = vals[order], vecs[:, order]
        norms = np.sqrt((pi[:, None] * np.abs(vecs) ** 2).sum(axis=0))
        # An eigenvector on transient tokens only (pi = 0 there) has norm 0 in L2(pi), up to
        # rounding; dividing by that rounding would blow it up to ~1e14. It keeps unit norm.
        vecs = vecs / np.where(norms > _TRANSIENT_NORM, norms, 1.0)
        self.reversible_ = False
        self.stationary_ = pi
        # Drop lambda_1 = 1; keep eigenpairs until there are m real coordinates. A complex
        # eigenvalue gives two (Re, Im); its conjugate partner adds nothing new and is skipped.
        kept, width, skip = [], 0, set()
        for k in range(1, n):
            if width >= m:
                break
            if k in skip:
                continue
            kept.append(k)
            if _is_complex(vals[k]):
                width += 2
                partner = np.abs(vals[k + 1 :] - np.conj(vals[k]))
                if partner.size:
                    skip.add(k + 1 + int(partner.argmin()))
            else:
                width += 1
        self.eigenvalues_ = vals[kept]
        self.eigenvectors_ = _signed(vecs[:, kept])
        self.embedding_ = self._coordinates(self.eigenvectors_)
        return self

    def _coordinates(self, psi: np.ndarray) -> np.ndarray:
        """(M, k) eigenvector values -> (M, n_components) real coordinates ``lambda^t psi``."""
        scaled = psi * self.eigenvalues_[None, :] ** self.t
        if self.reversible_:
            return np.real(scaled)
        cols = []
        for j, lam in enumerate(self.eigenvalues_):
            cols.append(scaled[:, j].real)
            if _is_complex(lam):
                cols.append(scaled[:, j].imag)
        return np.stack(cols, axis=1)[:, : self.n_components]

    # ----------------------------------------------------------------- transform
    def _check_fitted(self) -> None:
        if not hasattr(self, "embedding_"):
            raise RuntimeError("this DiffusionMap is not fitted yet: call fit first")

    def transform(self, X: object) -> np.ndarray:
        """Nyström extension: (M, d) new points -> (M, n_components) coordinates.

        With ``kernel="precomputed"``, X is (M, N): each row the transition probabilities of a
        new node to the N training nodes (rows sum to 1).
        """
        self._check_fitted()
        if self.kernel == "precomputed":
            arr, _ = to_numpy(X, "X")
            n = self.markov_.shape[0]
            if arr.ndim != 2 or arr.shape[1] != n or arr.shape[0] == 0:
                raise ValueError(
                    f"X must be (M, N = {n}) transition rows to the training nodes, got {tuple(arr.shape)}"
                )
            T = check_rows(arr, name="X (transition rows to the training nodes)")
        else:
            Y = self._points(X)
            logK = self._log_kernel(Y, self.X_fit_, self.bandwidth_)
            logKt = self._normalised_log_kernel(logK, _logsumexp(logK, axis=1), self.log_q_)
            T = np.exp(logKt - _logsumexp(logKt, axis=1)[:, None])
        psi = (T @ self.eigenvectors_) / self.eigenvalues_[None, :]
        return self._coordinates(psi)

    def fit_transform(self, X: object, y: object = None) -> np.ndarray:
        """Fit and return ``embedding_`` (N, n_components)."""
        return self.fit(X).embedding_

    def diffusion_distances(self, exact: bool = False) -> np.ndarray:
        """(N, N) diffusion distances between the training points at time ``t``.

        ``exact=False``: Euclidean distances of the embedding (the m-term approximation).
        ``exact=True``: ``sqrt(sum_l (P^t_il - P^t_jl)^2 / pi_l)`` from the Markov matrix
        (states with ``pi_l = 0`` contribute nothing), O(N^3 log t).
        """
        self._check_fitted()
        if not exact:
            E = self.embedding_
            sq = (E * E).sum(1)[:, None] + (E * E).sum(1)[None, :] - 2 * E @ E.T
            np.fill_diagonal(sq, 0.0)  # exact zero, not the Gram expansion's rounding
            return np.sqrt(np.maximum(sq, 0.0))
        Pt = np.linalg.matrix_power(self.markov_, self.t)
        pi = self.stationary_
        w = np.where(pi > 0, 1.0 / np.where(pi > 0, pi, 1.0), 0.0)
        G = Pt * np.sqrt(w)[None, :]
        sq = (G * G).sum(1)[:, None] + (G * G).sum(1)[None, :] - 2 * G @ G.T
        np.fill_diagonal(sq, 0.0)
        return np.sqrt(np.maximum(sq, 0.0))


def _is_complex(value: complex) -> bool:
    return abs(value.imag) > 1e-10 * max(abs(value), 1e-300)
