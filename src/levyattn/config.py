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
from dataclasses import dataclass, fields
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


# The largest scale eps**(-1/alpha) (power law; 1/eps for the Gaussian) a kernel may have: float64
# holds it with room for the distances it multiplies.
KERNEL_SCALE_LIMIT = 1e300


def check_kernel_scale(alpha: Scalar, bandwidth: Scalar) -> None:
    """Float alpha and bandwidth (checked each): the kernel's scale eps**(-1/alpha) (1/eps at
    alpha = 2) must stay below :data:`KERNEL_SCALE_LIMIT` (a small bandwidth with a small alpha
    can pass float64's range: eps = 1e-100 at alpha = 0.3 gives 1e333)."""
    if isinstance(alpha, torch.Tensor) or isinstance(bandwidth, torch.Tensor):
        return
    log10_scale = -math.log10(bandwidth) / (alpha if alpha < 2 else 1.0)
    if log10_scale > math.log10(KERNEL_SCALE_LIMIT):
        raise ValueError(
            f"bandwidth={bandwidth!r} with alpha={alpha!r} puts the kernel's scale eps**(-1/alpha) at "
            f"1e{log10_scale:.0f}; it must stay <= {KERNEL_SCALE_LIMIT:g}: take a larger bandwidth or alpha"
        )


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
        check_kernel_scale(self.alpha, self.bandwidth)
        check_manifold(self.manifold)
        object.__setattr__(self, "d_intrinsic", check_d_intrinsic(self.d_intrinsic))
        object.__setattr__(self, "sphere_radius", check_positive("sphere_radius", self.sphere_radius))
        object.__setattr__(self, "density_a", check_density_a(self.density_a))
        if not isinstance(self.rescale, bool):
            raise TypeError(f"rescale must be a bool, got {self.rescale!r}")
        if not isinstance(self.exclude_self, bool):
            raise TypeError(f"exclude_self must be a bool, got {self.exclude_self!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain values; also the keyword arguments of ``levyattn.fractional_attention``. (The
        fields are numbers, strings and None: no deep copy, which ``asdict`` makes on every
        attention call.)"""
        return {field.name: getattr(self, field.name) for field in fields(self)}


@dataclass(frozen=True)
class RetrofitOptions:
    """What :func:`levyattn.integrations.hf_retrofit.retrofit` (``levyattn convert``) does; saved
    with the checkpoints, and a resumed run must match.

    alpha: FNA's Lévy index in (0, 2] (every layer and head at the start).
    window: tokens per training and evaluation window. batch_size: windows per step.
    calibration_windows: at most this many windows of the training text are used (the rest is
        not read); both stages train on them.
    stage1_steps: optimiser steps per layer in stage 1 (0 skips stage 1). stage1_lr: Adam's
        learning rate for the log-bandwidths and alphas (the projection updates use a tenth).
    qk_rank: rank of the update of each layer's query and key projections in stage 1 (0: the
        bandwidths, and alphas with ``fit_alpha``, only). fit_alpha: also fit one alpha per head.
    stage2_steps: LoRA fine-tuning steps (0 skips stage 2). stage2_lr: AdamW's peak learning
        rate (linear warm-up over the first 5% of the steps, cosine decay to 10%).
    lora_rank: rank of the stage-2 adapters (``lora_alpha`` is twice the rank).
    checkpoint_every: stage-2 steps between checkpoints. seed: window order and initialisation.
    """

    alpha: float = 1.2
    window: int = 128
    batch_size: int = 8
    calibration_windows: int = 256
    stage1_steps: int = 150
    stage1_lr: float = 0.02
    qk_rank: int = 8
    fit_alpha: bool = False
    stage2_steps: int = 200
    stage2_lr: float = 5e-4
    lora_rank: int = 16
    checkpoint_every: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        check_float("alpha", self.alpha, 0.0, 2.0, lo_open=True)
        check_int("window", self.window, 2)
        check_int("batch_size", self.batch_size, 1)
        check_int("calibration_windows", self.calibration_windows, 1)
        check_int("stage1_steps", self.stage1_steps, 0)
        check_float("stage1_lr", self.stage1_lr, 0.0, math.inf, lo_open=True)
        check_int("qk_rank", self.qk_rank, 0)
        check_bool("fit_alpha", self.fit_alpha)
        check_int("stage2_steps", self.stage2_steps, 0)
        check_float("stage2_lr", self.stage2_lr, 0.0, math.inf, lo_open=True)
        check_int("lora_rank", self.lora_rank, 1)
        check_int("checkpoint_every", self.checkpoint_every, 1)
        check_int("seed", self.seed, 0)
