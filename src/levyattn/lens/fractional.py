"""The fractional reading of a decay exponent gamma (docs/lens.md §2).

Matching the power-law attention kernel ``d^-gamma`` with the Lévy jump density
``l^-(1 + alpha)`` gives

- the Lévy index ``alpha = gamma - 1``, a stable index only for ``alpha in (0, 2)``
  (``gamma in (1, 3)``); outside it the analogy does not hold;
- the order ``s = alpha / 2 = (gamma - 1) / 2`` of ``(-Laplacian)^s``;
- the regime: ``smoothing`` (gamma < 1, s < 0, integration / long-range averaging),
  ``crossover`` (gamma = 1, s = 0, the identity) or ``differentiating`` (gamma > 1, s > 0).

A gamma whose confidence interval contains 1 is the crossover, not forced to a side. With no
interval, ``|gamma - 1| <= tol`` is the crossover; the default ``tol = 0.05`` is the published
diagnostic's own crossover band (its "Hagedorn" label covers 0.95 <= gamma <= 1.05).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

__all__ = ["CAVEAT", "CROSSOVER_TOL", "FractionalReading", "fractional_order"]

#: Half-width of the crossover band used when no confidence interval is given.
CROSSOVER_TOL = 0.05

CAVEAT = (
    "alpha = gamma - 1 and s = (gamma - 1)/2 are interpretations by analogy of power-law kernels, not theorems; "
    "the decay measured here is over token positions, which is not FNA's feature-space kernel."
)


@dataclass(frozen=True)
class FractionalReading:
    """gamma read as a fractional order. ``*_ci`` are None without a confidence interval."""

    gamma: float
    gamma_ci: tuple[float, float] | None
    alpha: float
    alpha_ci: tuple[float, float] | None
    s: float
    s_ci: tuple[float, float] | None
    regime: str
    regime_rule: str
    levy_valid: bool
    levy_note: str
    caveat: str = CAVEAT

    def as_dict(self) -> dict:
        out = asdict(self)
        for key in ("gamma_ci", "alpha_ci", "s_ci"):
            if out[key] is not None:
                out[key] = list(out[key])
        return out


def _finite(x: object, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) and not hasattr(x, "__float__"):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    v = float(x)  # type: ignore[arg-type]
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def gamma_in_interval(gamma: float, ci: tuple[float, float]) -> bool:
    """Whether ``lo <= gamma <= hi`` up to a relative 1e-9 (a bootstrap slope and a least-squares
    fit of the same curve round apart)."""
    slack = 1e-9 * max(1.0, abs(gamma))
    return ci[0] - slack <= gamma <= ci[1] + slack


def fractional_order(
    gamma: float, ci: Sequence[float] | None = None, tol: float = CROSSOVER_TOL, ci_level: float | None = None
) -> FractionalReading:
    """Read gamma as a Lévy index and a fractional order, with its regime.

    ``ci`` is an optional (lo, hi) confidence interval for gamma (lo <= gamma <= hi) and ``ci_level``
    its confidence level in (0, 1), named in ``regime_rule`` (None: not known). ``tol`` is the
    crossover half-width used only when ``ci`` is None.
    """
    g = _finite(gamma, "gamma")
    t = _finite(tol, "tol")
    if t < 0:
        raise ValueError(f"tol must be >= 0, got {t}")
    if ci_level is not None and not 0.0 < _finite(ci_level, "ci_level") < 1.0:
        raise ValueError(f"ci_level must be in (0, 1) or None, got {ci_level}")
    ci_t: tuple[float, float] | None = None
    if ci is not None:
        if isinstance(ci, (str, bytes)) or len(ci) != 2:
            raise ValueError(f"ci must be a pair (lo, hi), got {ci!r}")
        lo, hi = _finite(ci[0], "ci[0]"), _finite(ci[1], "ci[1]")
        if lo > hi:
            raise ValueError(f"ci must satisfy lo <= hi, got ({lo}, {hi})")
        ci_t = (lo, hi)
        if not gamma_in_interval(g, ci_t):
            raise ValueError(f"gamma {g} lies outside its confidence interval ci [{lo}, {hi}]")
        if lo <= 1.0 <= hi:
            regime = "crossover"
        elif hi < 1.0:
            regime = "smoothing"
        else:
            regime = "differentiating"
        name = "CI" if ci_level is None else f"{ci_level * 100:g}% CI"
        rule = f"{name} [{lo:.4g}, {hi:.4g}] {'contains' if regime == 'crossover' else 'excludes'} 1"
    else:
        if abs(g - 1.0) <= t:
            regime = "crossover"
        else:
            regime = "smoothing" if g < 1.0 else "differentiating"
        rule = f"no CI: |gamma - 1| = {abs(g - 1.0):.4g} {'<=' if regime == 'crossover' else '>'} tol {t:g}"
    alpha = g - 1.0
    levy = 0.0 < alpha < 2.0
    if levy:
        note = f"alpha = {alpha:.4g} lies in (0, 2): a valid Lévy stable index"
    elif alpha <= 0:
        note = f"alpha = {alpha:.4g} <= 0 (gamma <= 1): no Lévy stable index; the analogy does not hold"
    else:
        note = f"alpha = {alpha:.4g} >= 2 (gamma >= 3): beyond the stable range; the analogy does not hold"
    if ci_t is not None and levy and not (0.0 < ci_t[0] - 1.0 and ci_t[1] - 1.0 < 2.0):
        note += "; the confidence interval crosses the edge of (0, 2)"
    return FractionalReading(
        gamma=g,
        gamma_ci=ci_t,
        alpha=alpha,
        alpha_ci=None if ci_t is None else (ci_t[0] - 1.0, ci_t[1] - 1.0),
        s=alpha / 2.0,
        s_ci=None if ci_t is None else ((ci_t[0] - 1.0) / 2.0, (ci_t[1] - 1.0) / 2.0),
        regime=regime,
        regime_rule=rule,
        levy_valid=levy,
        levy_note=note,
    )
