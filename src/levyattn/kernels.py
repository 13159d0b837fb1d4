"""The fractional kernel in the log domain: distances, kappa and ``log Phi_alpha``.

Conventions (docs/operator.md, "The operator, per head" and "Numerics"):
- q: (..., Nq, d), k: (..., Nk, d); kernels return (..., Nq, Nk) log-weights.
- Row normalisation of Phi is ``softmax(log Phi)``; computing ``log Phi`` directly keeps
  every scale exact where ``Phi`` itself underflows.
- Distances reach the kernel as a *squared* quantity ``sq`` (squared Euclidean distance,
  or squared chord length on the unit sphere). Every backend (materialising, tiled, the
  FlexAttention score modifier) goes through :func:`log_phi_from_sq`, so they all compute
  the same function with the same guards.
- ``alpha`` and ``bandwidth`` are floats, or tensors broadcastable to the log-weights
  (one value per head: shape (H, 1, 1)).
"""

from __future__ import annotations

import math

import torch

Scalar = float | torch.Tensor


def kappa(alpha: Scalar, head_dim: int, rescale: bool = True, manifold: str = "euclidean") -> Scalar:
    """Distance rescaling: ``sqrt(d)/(2**(1/d) - 1)`` for alpha < 2, ``sqrt(d)`` at alpha = 2.

    1 when ``rescale`` is off or on the sphere (where the radius sets the scale).
    """
    if not rescale or manifold == "sphere":
        return 1.0
    below_two = math.sqrt(head_dim) / (2.0 ** (1.0 / head_dim) - 1.0)
    at_two = math.sqrt(head_dim)
    if isinstance(alpha, torch.Tensor):
        return torch.full_like(alpha, below_two).where(alpha < 2, at_two)
    return below_two if alpha < 2 else at_two


def intrinsic_dim(head_dim: int, manifold: str = "euclidean", d_intrinsic: float | None = None) -> float:
    """d_M: head_dim on the Euclidean manifold, head_dim - 1 on the sphere, unless given."""
    if d_intrinsic is not None:
        return float(d_intrinsic)
    return float(head_dim - 1 if manifold == "sphere" else head_dim)


def alpha_in(alpha: Scalar, dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor:
    """alpha (a float or a tensor) as a tensor of ``dtype``, each value below 2 kept below 2.

    alpha = 2 is another function (the Gaussian), not the limit of the power law, so a value that
    rounds up to 2.0 in a narrower dtype (2 - 1e-16 in float32) would change which function is
    computed, not only its last bits: such a value becomes the largest number below 2 in ``dtype``.
    Differentiable (the nudge, under one unit in the last place, is a constant).
    """
    given = alpha if isinstance(alpha, torch.Tensor) else torch.tensor(alpha, dtype=torch.float64)
    given = given.to(device=device) if device is not None else given
    cast = given.to(dtype)
    two = torch.tensor(2.0, dtype=dtype, device=cast.device)
    below_two = torch.nextafter(two, torch.zeros_like(two))
    rounded_up = (given.detach() < 2) & (cast.detach() >= 2)
    return torch.where(rounded_up, cast + (below_two - cast).detach(), cast)


def log_phi(z: torch.Tensor, alpha: Scalar, bandwidth: Scalar, d_intrinsic: float) -> torch.Tensor:
    """``log Phi_alpha(z)`` for distances z >= 0 (already divided by kappa).

    alpha < 2: ``-(d_M + alpha) * log1p(z / eps**(1/alpha))``; alpha = 2: ``-z**2 / eps``.
    """
    if isinstance(alpha, torch.Tensor):
        # Both branches, no data-dependent Python branch: also traceable inside score_mod. The
        # Gaussian sees only its own heads' distances: a power-law head's z**2 may overflow, and its
        # gradient, times the 0 that where gives it, would be NaN.
        gaussian = alpha >= 2
        z_gaussian = torch.where(gaussian, z, 0.0)
        return torch.where(
            gaussian, -(z_gaussian * z_gaussian) / bandwidth, _power_law(z, alpha, bandwidth, d_intrinsic)
        )
    if alpha >= 2:
        return -(z * z) / bandwidth
    return _power_law(z, alpha, bandwidth, d_intrinsic)


# c = eps**(-1/alpha) from which the power law's parameter gradients leave out log c (_power_law):
# there c z >= 1 for every distance from 0.1 up, most pairs' in practice.
_FAR_SCALE = 10.0


def _power_law(z: torch.Tensor, alpha: Scalar, bandwidth: Scalar, d_intrinsic: float) -> torch.Tensor:
    """``-(d_M + alpha) * log1p(c z)``, c = eps**(-1/alpha); for a learnable alpha or eps with a
    large c, its gradient taken without the part that is the same for every pair of a head.

    Where c z >> 1, log1p(c z) = log c + log(z + 1/c), and d/d alpha (d/d eps) of the logits is
    nearly the constant -(d_M + alpha) d log c, which every normalisation removes exactly (the
    gradients of a head's logits sum to 0) but which multiplied their rounding: float32 alpha's
    gradient lost 8x its accuracy at eps = 1e-12 with the density term. So the gradient comes from
    ``-(d_M + alpha) (log1p(c z) - log c)``, the same function but for that constant, on the heads
    with c >= ``_FAR_SCALE``, where most pairs are far (near pairs would take the constant on
    instead: at c = 1 that cost eps's gradient 30x its accuracy). The choice depends on alpha and
    eps alone, so every tile of a head makes the same one.
    """
    scale = bandwidth ** (-1.0 / alpha)
    cz = z * scale
    log1p_cz = torch.log1p(cz)
    value = -(d_intrinsic + alpha) * log1p_cz
    learnable = any(isinstance(x, torch.Tensor) and x.requires_grad for x in (alpha, bandwidth))
    if not (learnable and torch.is_grad_enabled()):
        return value
    log_scale = -torch.log(torch.as_tensor(bandwidth, dtype=z.dtype, device=z.device)) / alpha
    near = cz < 1  # there log1p(c z) - log c; elsewhere log(z + 1/c) = log z + log1p(1 / (c z))
    # Each side sees only its own entries: the other's could be log 0 or 1/0, whose gradient,
    # times the 0 that where gives it, is NaN.
    near_value = torch.log1p(torch.where(near, cz, 0.0)) - log_scale
    far_value = torch.log(torch.where(near, 1.0, z)) + torch.log1p(1.0 / torch.where(near, 1.0, cz))
    shifted = torch.where(
        torch.as_tensor(scale >= _FAR_SCALE).detach(), torch.where(near, near_value, far_value), log1p_cz
    )
    stable = -(d_intrinsic + alpha) * shifted
    return value.detach() + (stable - stable.detach())


def _safe_sqrt(sq: torch.Tensor) -> torch.Tensor:
    # sqrt has an infinite derivative at 0: below the smallest normal number the
    # distance is treated as a constant, so zero distances get gradient 0, not NaN.
    return sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt()


def log_phi_from_sq(
    sq: torch.Tensor,
    *,
    alpha: Scalar,
    bandwidth: Scalar,
    d_intrinsic: float,
    kappa: Scalar = 1.0,
    manifold: str = "euclidean",
    sphere_radius: float = 1.0,
) -> torch.Tensor:
    """``log Phi_alpha`` of a squared distance.

    Euclidean: ``sq = ||q - k||^2``, ``z = sqrt(sq) / kappa``.
    Sphere: ``sq = ||q^ - k^||^2`` for unit vectors (the squared chord), and
    ``z = r * 2 * asin(chord / 2)``, which is ``r * arccos(q^ . k^)`` written so that its
    derivative stays finite at zero distance. The chord is clamped just below 2 so the
    derivative also stays finite at exactly antipodal points.
    """
    sq = sq.clamp_min(0)
    if manifold == "sphere":
        upper = 4.0 * (1.0 - torch.finfo(sq.dtype).eps)
        half_chord = _safe_sqrt(sq.clamp_max(upper)) * 0.5
        z = (2.0 * sphere_radius) * torch.asin(half_chord)
        return log_phi(z, alpha, bandwidth, d_intrinsic)
    if not isinstance(alpha, torch.Tensor) and alpha >= 2:
        # Gaussian: -z^2/eps needs no square root.
        return -sq / (kappa * kappa * bandwidth)
    return log_phi(_safe_sqrt(sq) / kappa, alpha, bandwidth, d_intrinsic)


def center(q: torch.Tensor, k: torch.Tensor, key_used: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift q and k by the centre of the keys (:func:`key_center`): distances are unchanged,
    cancellation in ``||q||^2 + ||k||^2 - 2 q.k`` is reduced. The shift is detached (distances
    do not depend on it, so gradients are unchanged)."""
    shift = key_center(k, key_used)
    return q - shift, k - shift


def key_center(k: torch.Tensor, key_used: torch.Tensor | None = None) -> torch.Tensor:
    """The detached centre of the keys k (..., Nk, d): (..., 1, d), the mean of the half of the
    keys nearest to their mean (by squared distance: those up to the lower median).

    A key far from the others (a huge activation) drags the plain mean towards it, and every
    distance computed around that mean into cancellation (a key at 1e4 among 16 others cost 2%
    of every float32 output); it does not move this centre. ``key_used``: bool, broadcastable to
    (..., Nk); only those keys count, so a key that no query sees (padding: far away, or garbage)
    cannot spoil the conditioning of the others. With none left, the centre is 0. k must be
    finite (``fractional_attention`` replaces non-finite entries before it gets here)."""
    keys = k.detach()
    used = keys.new_ones(keys.shape[:-1], dtype=torch.bool) if key_used is None else key_used.expand(keys.shape[:-1])
    spread = (keys - _mean_of(keys, used)).square().sum(-1).masked_fill(~used, float("inf"))  # (..., Nk)
    lower_median = spread.sort(-1).values.gather(-1, (used.sum(-1, keepdim=True) - 1).clamp_min(0) // 2)
    return _mean_of(keys, used & (spread <= lower_median))


def _mean_of(keys: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """The mean of the keys (..., Nk, d) that ``chosen`` (bool (..., Nk)) marks: (..., 1, d), 0
    where none is."""
    weights = chosen.to(keys.dtype).unsqueeze(-2)  # (..., 1, Nk)
    return (weights @ keys) / weights.sum(-1, keepdim=True).clamp_min(1)


def squared_distances(q: torch.Tensor, k: torch.Tensor, manifold: str = "euclidean") -> torch.Tensor:
    """(..., Nq, d), (..., Nk, d) -> (..., Nq, Nk) squared distances as ``log_phi_from_sq`` takes.

    Euclidean inputs should already be centred (:func:`center`). On the sphere q and k
    are L2-normalised here and the squared chord ``2 - 2 q^.k^`` is returned.
    """
    if manifold == "sphere":
        qn = torch.nn.functional.normalize(q, dim=-1)
        kn = torch.nn.functional.normalize(k, dim=-1)
        return 2.0 - 2.0 * (qn @ kn.transpose(-1, -2))
    q_sq = (q * q).sum(-1, keepdim=True)
    k_sq = (k * k).sum(-1).unsqueeze(-2)
    return q_sq + k_sq - 2.0 * (q @ k.transpose(-1, -2))


def gaussian_logits_shifted(q: torch.Tensor, k: torch.Tensor, scale: Scalar) -> torch.Tensor:
    """The Gaussian's ``log Phi = -scale ||q - k||^2`` of centred q (..., Nq, d) and k (..., Nk, d)
    less its row constant ``-scale ||q||^2``: ``scale (2 q.k - ||k||^2)``, (..., Nq, Nk). The
    weights of a row, normalised over its keys, are the same; but ``||q||^2`` of a query far from
    every key would dwarf, and round away, the differences between the keys that make them."""
    k_sq = (k * k).sum(-1).unsqueeze(-2)
    return (2.0 * (q @ k.transpose(-1, -2)) - k_sq) * scale


def log_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    alpha: Scalar,
    bandwidth: Scalar,
    manifold: str = "euclidean",
    rescale: bool = True,
    d_intrinsic: float | None = None,
    sphere_radius: float = 1.0,
) -> torch.Tensor:
    """``log Phi_alpha`` between every query and key: (..., Nq, d), (..., Nk, d) -> (..., Nq, Nk)."""
    head_dim = q.shape[-1]
    if manifold == "euclidean":
        q, k = center(q, k)
    sq = squared_distances(q, k, manifold)
    return log_phi_from_sq(
        sq,
        alpha=alpha,
        bandwidth=bandwidth,
        d_intrinsic=intrinsic_dim(head_dim, manifold, d_intrinsic),
        kappa=kappa(alpha, head_dim, rescale, manifold),
        manifold=manifold,
        sphere_radius=sphere_radius,
    )


def phi(z: torch.Tensor, alpha: float, bandwidth: float, d_intrinsic: float) -> torch.Tensor:
    """``Phi_alpha(z)`` in the direct form of docs/operator.md (underflows for large z; for tests
    and illustrations, never used by the attention backends)."""
    if alpha >= 2:
        return torch.exp(-((z / bandwidth ** (1.0 / alpha)) ** (alpha / (alpha - 1.0))))
    return (1.0 + z / bandwidth ** (1.0 / alpha)) ** (-(d_intrinsic + alpha))
