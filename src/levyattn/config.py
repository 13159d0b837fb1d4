"""FNAConfig: one validated, frozen description of the fractional kernel.

Every hyperparameter enters levyattn through the checks in this module, so a bad
value fails once, early, with a ``ValueError`` that names the parameter, the value
and the valid range. ``alpha`` and ``bandwidth`` may also be tensors (one value per
head, for learnable kernels); they are checked by value here too.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

MANIFOLDS = ("euclidean", "sphere")

Scalar = float | torch.Tensor


def did_you_mean(value: Any, choices: Any) -> str:
    """``"; did you mean 'x'?"`` when ``value`` is close to one of ``choices`` (a misspelling), else ""."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    """``value`` as an int in ``[lo, hi]`` (``hi=None``: no upper bound), else ValueError/TypeError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        rng = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an int {rng}, got {value}")
    return value


def check_float(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> float:
    """``value`` as a float in the interval from ``lo`` to ``hi`` (open ends as flagged); NaN fails."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    bad_lo = value <= lo if lo_open else value < lo
    bad_hi = value >= hi if hi_open else value > hi
    if bad_lo or bad_hi or value != value:
        rng = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must be in {rng}, got {value}")
    return value


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}{did_you_mean(value, choices)}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def _check_values(name: str, value: Scalar, valid: Callable[[Any], Any], requirement: str) -> Scalar:
    """``value``, a real number or a floating-point tensor (checked element by element), if
    ``valid`` (written to work on both) holds for it; else a ValueError "{name} must
    {requirement}, got ..." naming the first bad value."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} tensor must be floating point, got dtype {value.dtype}")
        values = value.detach()
        bad = ~valid(values)
        if bool(bad.any()):
            raise ValueError(f"{name} must {requirement}, got {values[bad].flatten()[0].item()!r} in the {name} tensor")
        return value
    number = _as_float(name, value)
    if not valid(number):
        raise ValueError(f"{name} must {requirement}, got {number!r}")
    return number


def check_alpha(alpha: Scalar) -> Scalar:
    """alpha in (0, 2]: the Lévy index; 2 is the Gaussian (Brownian) kernel."""
    # Comparisons reject NaN as well.
    return _check_values(
        "alpha", alpha, lambda a: (a > 0) & (a <= 2), "lie in (0, 2] (Lévy index; 2 is the Gaussian kernel)"
    )


def check_bandwidth(bandwidth: Scalar) -> Scalar:
    """bandwidth (epsilon) > 0 and finite."""
    return _check_values("bandwidth", bandwidth, lambda b: (b > 0) & (b < math.inf), "be > 0 and finite")


def check_positive(name: str, value: Any) -> float:
    v = _as_float(name, value)
    if not (v > 0.0 and math.isfinite(v)):
        raise ValueError(f"{name} must be > 0 and finite, got {v!r}")
    return v


def check_density_a(density_a: Any) -> float:
    v = _as_float("density_a", density_a)
    if not (0.0 <= v <= 1.0):
        raise ValueError(f"density_a must lie in [0, 1] (Coifman-Lafon normalisation), got {v!r}")
    return v


def check_manifold(manifold: Any) -> str:
    if manifold not in MANIFOLDS:
        raise ValueError(f"manifold must be one of {MANIFOLDS}, got {manifold!r}{did_you_mean(manifold, MANIFOLDS)}")
    return manifold


def check_d_intrinsic(d_intrinsic: Any) -> float | None:
    if d_intrinsic is None:
        return None
    return check_positive("d_intrinsic", d_intrinsic)


@dataclass(frozen=True)
class FNAConfig:
    """The fractional kernel ``Phi_alpha`` and how distances enter it (docs/operator.md, "The operator, per head").

    alpha:        Lévy index in (0, 2]; < 2 power law ``(1 + z/eps^(1/alpha))^-(d_M+alpha)``,
                  = 2 Gaussian ``exp(-z^2/eps)``.
    bandwidth:    eps > 0.
    manifold:     "euclidean" (z = ||q - k|| / kappa) or "sphere" (z = r * angle(q, k)).
    rescale:      divide Euclidean distances by kappa (see ``levyattn.kernels.kappa``).
    d_intrinsic:  d_M in the power-law exponent; default head_dim (Euclidean) or
                  head_dim - 1 (sphere).
    sphere_radius: r > 0 on the sphere.
    density_a:    Coifman-Lafon density normalisation exponent in [0, 1].
    exclude_self: give each query's own position weight 0 (shared query/key projections).
    """

    alpha: float = 1.2
    bandwidth: float = 1.0
    manifold: str = "euclidean"
    rescale: bool = True
    d_intrinsic: float | None = None
    sphere_radius: float = 1.0
    density_a: float = 0.0
    exclude_self: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", check_alpha(self.alpha))
        object.__setattr__(self, "bandwidth", check_bandwidth(self.bandwidth))
        check_manifold(self.manifold)
        object.__setattr__(self, "d_intrinsic", check_d_intrinsic(self.d_intrinsic))
        object.__setattr__(self, "sphere_radius", check_positive("sphere_radius", self.sphere_radius))
        object.__setattr__(self, "density_a", check_density_a(self.density_a))
        if not isinstance(self.rescale, bool):
            raise TypeError(f"rescale must be a bool, got {self.rescale!r}")
        if not isinstance(self.exclude_self, bool):
            raise TypeError(f"exclude_self must be a bool, got {self.exclude_self!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain values; also the keyword arguments of ``levyattn.fractional_attention``."""
        return asdict(self)
