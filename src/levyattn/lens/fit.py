"""Fits of an attention-decay curve ``A(d)``: power law, exponential, bootstrap CI, model choice.

Conventions
-----------
- ``distances`` (D,) positive token distances; ``values`` (D,) the mean attention weight
  ``A(d)`` at those distances. Points with ``d < d_min``, non-finite or non-positive values
  are left out of a fit (a log cannot be taken of them), exactly as the published tool does.
- Both fits are ordinary least squares **in log space** (docs/lens.md §1):

  power law    ``log A = log_A - gamma  * log d``
  exponential  ``log A = log_A - lam    * d``

  ``r2`` is the coefficient of determination of that log-space regression,
  ``1 - SS_res / SS_tot`` (0 when all log values are equal, as published). Fed a published
  ``A(d)`` table these return the published gamma, log_A and R^2.
- The bootstrap resamples **prompts** (rows of a (N, D) per-prompt table), recomputes the
  mean curve and refits on the points the whole sample's fit uses; the interval is the
  percentile interval, widened (or refused) when resamples are invalid (:func:`bootstrap_gamma`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from levyattn.lens.options import check_lens_options

__all__ = [
    "D_MIN_FIT",
    "ExponentialFit",
    "GammaBootstrap",
    "ModelChoice",
    "PowerLawFit",
    "bootstrap_gamma",
    "choose_model",
    "fit_exponential",
    "fit_power_law",
]

#: The published minimum distance used in fits (docs/lens.md §1).
D_MIN_FIT = 30


@dataclass(frozen=True)
class _LogLinearFit:
    """A least-squares line through ``(x, log A)`` on ``n_points`` distances ``>= d_min``:
    intercept ``log_A``, R^2 and residual sum of squares in log space."""

    log_A: float
    r2: float
    n_points: int
    rss: float


@dataclass(frozen=True)
class PowerLawFit(_LogLinearFit):
    """``log A = log_A - gamma * log d`` (see :class:`_LogLinearFit`)."""

    gamma: float

    def predict(self, distances: Sequence[float] | np.ndarray) -> np.ndarray:
        d = np.asarray(distances, dtype=np.float64)
        return np.exp(self.log_A - self.gamma * np.log(d))


@dataclass(frozen=True)
class ExponentialFit(_LogLinearFit):
    """``log A = log_A - lam * d`` (see :class:`_LogLinearFit`)."""

    lam: float

    def predict(self, distances: Sequence[float] | np.ndarray) -> np.ndarray:
        d = np.asarray(distances, dtype=np.float64)
        return np.exp(self.log_A - self.lam * d)


def _as_1d(x: object, name: str) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a sequence of numbers, got {type(x).__name__}") from err
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    return arr


def _select(distances: object, values: object, d_min: float) -> tuple[np.ndarray, np.ndarray]:
    """The (d, log A) points a fit uses; raises if fewer than two are usable."""
    d = _as_1d(distances, "distances")
    v = _as_1d(values, "values")
    if d.shape != v.shape:
        raise ValueError(f"distances and values must have the same length, got {d.size} and {v.size}")
    if not math.isfinite(float(d_min)) or d_min <= 0:
        raise ValueError(f"d_min must be a positive finite number, got {d_min}")
    if np.any(~np.isfinite(d)) or np.any(d <= 0):
        raise ValueError(f"distances must be positive and finite, got {d.tolist()}")
    keep = (d >= d_min) & np.isfinite(v) & (v > 0)
    if int(keep.sum()) < 2:
        raise ValueError(
            f"a fit needs at least 2 distances >= d_min={d_min} with finite positive values; "
            f"got {int(keep.sum())} (distances {d.tolist()}, values {v.tolist()})"
        )
    if np.unique(d[keep]).size < 2:
        raise ValueError(f"a fit needs at least 2 different distances >= d_min={d_min}, got {np.unique(d[keep])}")
    return d[keep], np.log(v[keep])


def _ols(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    """OLS of ``y = a - b x`` as published (``lstsq`` on the design [1, -x]) -> (a, b, r2, rss)."""
    design = np.stack([np.ones_like(x), -x], axis=1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    a, b = float(coef[0]), float(coef[1])
    resid = y - (a - b * x)
    rss = float(np.sum(resid**2))
    tss = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - rss / tss if tss > 0 else 0.0
    return a, b, r2, rss


def fit_power_law(
    distances: Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray, d_min: float = D_MIN_FIT
) -> PowerLawFit:
    """OLS of ``log A`` on ``log d`` over the distances ``>= d_min`` (the published gamma fit).

    Returns gamma (the decay exponent, ``A ~ d^-gamma``), log_A (intercept, natural log),
    r2 (log space) and n_points. Raises ValueError with fewer than two usable points.
    """
    d, y = _select(distances, values, d_min)
    a, b, r2, rss = _ols(np.log(d), y)
    return PowerLawFit(gamma=b, log_A=a, r2=r2, n_points=int(d.size), rss=rss)


def fit_exponential(
    distances: Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray, d_min: float = D_MIN_FIT
) -> ExponentialFit:
    """OLS of ``log A`` on ``d`` over the distances ``>= d_min`` (the published alternative).

    Returns lam (decay rate per token, ``A ~ exp(-lam d)``), log_A, r2 (log space) and n_points.
    """
    d, y = _select(distances, values, d_min)
    a, b, r2, rss = _ols(d, y)
    return ExponentialFit(lam=b, log_A=a, r2=r2, n_points=int(d.size), rss=rss)


@dataclass(frozen=True)
class ModelChoice:
    """Power law vs exponential by AICc on the log-space residuals.

    Both models have two coefficients and share the data, so the AICc difference reduces to
    ``n log(RSS_exp / RSS_pow)`` and the choice always agrees with the larger R^2; what the
    criterion adds is a scale for the evidence: ``weight_power_law`` is the Akaike weight
    ``1 / (1 + exp(-delta_aicc / 2))`` and ``evidence`` is "weak" (|delta| < 2), "positive"
    (< 6), "strong" (< 10) or "very strong" (Burnham & Anderson's rule of thumb).
    """

    choice: str
    aicc_power_law: float
    aicc_exponential: float
    delta_aicc: float
    weight_power_law: float
    evidence: str
    delta_r2: float


def _aicc(rss: float, n: int, k: int = 3) -> float:
    # Gaussian log-likelihood of the log-space residuals; k counts intercept, slope and sigma.
    # A perfect fit (rss == 0) has AIC = -inf; floor the RSS so the difference stays finite.
    rss = max(rss, 1e-300)
    aic = n * math.log(rss / n) + 2 * k
    if n - k - 1 > 0:
        aic += 2 * k * (k + 1) / (n - k - 1)
    return aic


def choose_model(power: PowerLawFit, expo: ExponentialFit) -> ModelChoice:
    """Choose power law or exponential for one curve (both fitted on the same points)."""
    if power.n_points != expo.n_points:
        raise ValueError(
            f"the two fits must use the same points, got n_points {power.n_points} (power) and {expo.n_points} (exp)"
        )
    n = power.n_points
    a_pow, a_exp = _aicc(power.rss, n), _aicc(expo.rss, n)
    delta = a_exp - a_pow  # > 0 favours the power law
    weight = 1.0 / (1.0 + math.exp(-min(max(delta / 2.0, -700.0), 700.0)))
    mag = abs(delta)
    evidence = "weak" if mag < 2 else "positive" if mag < 6 else "strong" if mag < 10 else "very strong"
    return ModelChoice(
        choice="power_law" if delta >= 0 else "exponential",
        aicc_power_law=a_pow,
        aicc_exponential=a_exp,
        delta_aicc=delta,
        weight_power_law=weight,
        evidence=evidence,
        delta_r2=power.r2 - expo.r2,
    )


def _slopes(log_d: np.ndarray, log_v: np.ndarray) -> np.ndarray:
    """Vectorised OLS slope of rows of ``log_v`` (B, D) on ``log_d`` (D,), NaN where < 2 points."""
    ok = np.isfinite(log_v)
    n = ok.sum(axis=1)
    x = np.where(ok, log_d[None, :], 0.0)
    y = np.where(ok, log_v, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mx = x.sum(1) / n
        my = y.sum(1) / n
        sxy = (np.where(ok, (x - mx[:, None]) * (y - my[:, None]), 0.0)).sum(1)
        sxx = (np.where(ok, (x - mx[:, None]) ** 2, 0.0)).sum(1)
        slope = sxy / sxx
    slope[(n < 2) | (sxx <= 0)] = np.nan
    return slope


@dataclass(frozen=True)
class GammaBootstrap:
    """A percentile bootstrap interval ``[lo, hi]`` for gamma at ``level``.

    ``gammas`` (n_boot,): the gamma of every resample, NaN for an invalid one (see
    :func:`bootstrap_gamma`); ``n_valid`` of the ``n_boot`` resamples requested were valid.
    """

    lo: float
    hi: float
    level: float
    gammas: np.ndarray
    n_boot: int
    n_valid: int

    @property
    def n_invalid(self) -> int:
        return self.n_boot - self.n_valid


def bootstrap_gamma(
    prompt_values: np.ndarray,
    distances: Sequence[float] | np.ndarray,
    d_min: float = D_MIN_FIT,
    n_boot: int = 2000,
    level: float = 0.95,
    paired: bool = True,
    seed: int = 0,
) -> GammaBootstrap:
    """Percentile bootstrap interval for gamma, resampling prompts.

    ``prompt_values`` (N, D): ``A(d)`` of each prompt (NaN where a prompt did not measure a
    distance). ``paired=True`` when one prompt gave every distance (the one-pass shortcut,
    the dense protocol): rows are resampled together so the correlation between distances is
    kept. ``paired=False`` when each distance had its own prompts (one pass per distance with
    independent prompts): each column is resampled on its own.

    Every resample is fitted on the points the fit of the whole sample uses: the distances
    ``>= d_min`` whose mean over all prompts is finite and positive. A resample whose mean is
    zero or missing at one of them is **invalid**: its gamma is not the same statistic (fitted
    on fewer points it would read another curve), and its log-space slope does not exist (a
    mean of zero at a far distance is a decay steeper than any power law). ``gammas`` holds NaN
    for it and ``n_valid`` counts the others.

    Leaving the invalid resamples out would condition the interval on validity, and validity is
    not independent of gamma: the resamples that miss the few prompts with weight at the far
    distances are exactly the steepest curves, so dropping them moves the interval towards
    shallow decay (a silent, one-sided bias). Instead each end is taken over all ``n_boot``
    resamples with the invalid ones placed where they widen it (at -inf for ``lo``, at +inf for
    ``hi``): the interval contains the percentile interval of any values they could stand for,
    and equals the usual one when every resample is valid. When the invalid resamples
    outnumber a tail (``(1 - level) / 2 * n_boot``) an end is unbounded and the bootstrap is
    refused (ValueError with the count); below that a RuntimeWarning gives the count.
    """
    pv = np.asarray(prompt_values, dtype=np.float64)
    d = _as_1d(distances, "distances")
    if pv.ndim != 2 or pv.shape[1] != d.size:
        raise ValueError(f"prompt_values must have shape (N, {d.size}), got {pv.shape}")
    check_lens_options(n_boot=n_boot, level=level)
    n = pv.shape[0]
    if n < 2:
        raise ValueError(f"the bootstrap needs at least 2 prompts, got {n}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column is left out below
        whole = np.nanmean(pv, axis=0)
    cols = np.flatnonzero((d >= d_min) & np.isfinite(whole) & (whole > 0))
    if cols.size < 2:
        raise ValueError(
            f"the bootstrap needs at least 2 distances >= d_min={d_min} with a finite positive mean, got "
            f"{d[cols].tolist()} of {d.tolist()}"
        )
    pv = pv[:, cols]
    rng = np.random.default_rng(seed)
    log_d = np.log(d[cols])
    gammas = np.empty(n_boot)
    chunk = max(1, min(n_boot, 2_000_000 // max(1, n * cols.size)))  # bound the (chunk, N, D) temporary
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        if paired:
            idx = rng.integers(0, n, size=(b, n))
            sample = pv[idx]  # (b, N, D)
        else:
            idx = rng.integers(0, n, size=(b, n, cols.size))
            sample = np.take_along_axis(pv[None, :, :].repeat(b, 0), idx, axis=1)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            means = np.nanmean(sample, axis=1) if np.isnan(sample).any() else sample.mean(axis=1)
        valid = np.all(np.isfinite(means) & (means > 0), axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_m = np.log(np.where(valid[:, None], means, 1.0))
        gammas[start : start + b] = np.where(valid, -_slopes(log_d, log_m), np.nan)
    finite = gammas[np.isfinite(gammas)]
    n_invalid = n_boot - finite.size
    tail = (1.0 - level) / 2.0
    with np.errstate(invalid="ignore"):  # an end interpolated against an infinite resample is NaN: unbounded
        lo = float(np.quantile(np.concatenate([np.full(n_invalid, -np.inf), finite]), tail))
        hi = float(np.quantile(np.concatenate([finite, np.full(n_invalid, np.inf)]), 1.0 - tail))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(
            f"the bootstrap is refused: {n_invalid} of {n_boot} resampled curves were zero or missing at a distance "
            f"the fit uses ({d[cols].tolist()}), more than the {tail * 100:g}% tail of a {level * 100:g}% interval, "
            "so an end of the interval is not bounded by the data; measure more prompts, or fit only the distances "
            "most prompts reach (d_min, distances)"
        )
    if n_invalid:
        warnings.warn(
            f"{n_invalid} of {n_boot} bootstrap resamples of gamma were zero or missing at a distance the fit uses; "
            f"the {level * 100:g}% interval is widened to hold any gamma they could stand for",
            RuntimeWarning,
            stacklevel=2,
        )
    return GammaBootstrap(lo=lo, hi=hi, level=float(level), gammas=gammas, n_boot=n_boot, n_valid=int(finite.size))
