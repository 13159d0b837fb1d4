"""From a measurement to a reading: fits, bootstrap CI, per-layer/head gamma, JSON, PNGs, HTML."""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import t as student_t

from levyattn.io import atomic_write_json
from levyattn.lens import fit
from levyattn.lens.atlas import PUBLISHED_SOURCE, AtlasEntry, entry_from_lens_result
from levyattn.lens.fractional import CAVEAT, CROSSOVER_TOL, FractionalReading, fractional_order, gamma_in_interval
from levyattn.lens.measure import DecayMeasurement, _nan_to_none
from levyattn.lens.options import check_lens_options

__all__ = ["LensResult", "analyze_decay", "write_lens_outputs"]


@dataclass
class LensResult:
    """Everything the lens says about one measurement.

    ``point_ci`` (D, 2): the interval of each aggregate A(d) over its prompts at the run's
    ``level`` (the error bars): mean +- t * sd / sqrt(n), t the Student quantile with n - 1
    degrees of freedom (a normal quantile would be 1.96 / 3.18 = 0.62 of the width at 4 prompts);
    ``layer_gamma`` (Ly,), ``head_gamma`` (Ly, H): power-law gamma of each layer's / head's
    mean curve (NaN where fewer than two positive points >= d_min). ``n_boot_valid``: the
    bootstrap resamples of ``n_boot`` that were valid (None without an interval; see
    :func:`levyattn.lens.bootstrap_gamma`).
    """

    measurement: DecayMeasurement
    d_min: float
    power: fit.PowerLawFit
    expo: fit.ExponentialFit
    choice: fit.ModelChoice
    gamma_ci: tuple[float, float] | None
    level: float
    n_boot: int
    n_boot_valid: int | None
    reading: FractionalReading
    point_ci: np.ndarray
    layer_gamma: np.ndarray
    layer_r2: np.ndarray
    head_gamma: np.ndarray

    @property
    def fitted(self) -> np.ndarray:
        """(D,) bool: the distances the fits use, ``d >= d_min`` with a finite positive aggregate A(d)."""
        agg = self.measurement.aggregate
        return (self.measurement.distances >= self.d_min) & np.isfinite(agg) & (agg > 0)

    @property
    def left_out(self) -> list[int]:
        """The distances ``>= d_min`` the fits leave out: A(d) zero (e.g. past a sliding window) or missing."""
        return [int(d) for d in self.measurement.distances[(self.measurement.distances >= self.d_min) & ~self.fitted]]

    @property
    def ci_half_width(self) -> float:
        return float("nan") if self.gamma_ci is None else (self.gamma_ci[1] - self.gamma_ci[0]) / 2.0

    def to_dict(self) -> dict:
        return {
            "gamma": self.power.gamma,
            "gamma_ci": None if self.gamma_ci is None else list(self.gamma_ci),
            "ci_level": self.level,
            "ci_method": f"percentile bootstrap over prompts ({self.n_boot} resamples, "
            f"{'paired curves' if self.measurement.paired else 'per distance'})",
            "n_boot": self.n_boot,
            "n_boot_valid": self.n_boot_valid,
            "d_min": self.d_min,
            "fitted_distances": [int(d) for d in self.measurement.distances[self.fitted]],
            "left_out_distances": self.left_out,
            "fit_power_law": asdict(self.power),
            "fit_exponential": asdict(self.expo),
            "delta_r2_power_minus_exp": self.choice.delta_r2,
            "model_choice": asdict(self.choice),
            "fractional": self.reading.as_dict(),
            "per_layer_gamma": _nan_to_none(self.layer_gamma.tolist()),
            "per_layer_r2": _nan_to_none(self.layer_r2.tolist()),
            "per_head_gamma": _nan_to_none(self.head_gamma.tolist()),
            "aggregate_ci": _nan_to_none(self.point_ci.tolist()),
            "measurement": self.measurement.to_dict(),
            "caveat": CAVEAT,
        }

    def atlas_entry(self, corpus: str | None = None, notes: str = "") -> AtlasEntry:
        """This measurement as a user-atlas entry (see :func:`entry_from_lens_result`)."""
        return entry_from_lens_result(self.to_dict(), corpus=corpus, notes=notes or None)


def _safe_power(d: np.ndarray, v: np.ndarray, d_min: float) -> fit.PowerLawFit | None:
    try:
        return fit.fit_power_law(d, v, d_min)
    except ValueError:
        return None


def analyze_decay(
    measurement: DecayMeasurement,
    d_min: float = fit.D_MIN_FIT,
    n_boot: int = 2000,
    level: float = 0.95,
    tol: float = CROSSOVER_TOL,
    seed: int = 0,
) -> LensResult:
    """Fit the aggregate curve (power law, exponential, AICc choice), bootstrap gamma over
    prompts, fit every layer and head, and read gamma as a fractional order.

    Raises ValueError when the bootstrap interval at ``level`` does not contain the fitted
    gamma (a few very noisy prompts at a low level), rather than reporting such an interval.
    Distances ``>= d_min`` whose aggregate A(d) is zero or missing cannot enter a log-space fit
    and are left out, as published; a RuntimeWarning names them (``LensResult.left_out``), since
    a fit on the rest (say, only the distances inside a sliding window) reads another curve.
    """
    if not isinstance(measurement, DecayMeasurement):
        raise TypeError(f"measurement must be a DecayMeasurement, got {type(measurement).__name__}")
    check_lens_options(distances=measurement.distances.tolist(), d_min=d_min, n_boot=n_boot, level=level, tol=tol)
    m = measurement
    d = m.distances.astype(np.float64)
    agg = m.aggregate
    power = fit.fit_power_law(d, agg, d_min)
    expo = fit.fit_exponential(d, agg, d_min)
    choice = fit.choose_model(power, expo)
    flat = m.flat_prompt_values()
    gamma_ci = None
    n_boot_valid = None
    if flat.shape[0] >= 2:
        boot = fit.bootstrap_gamma(flat, d, d_min=d_min, n_boot=n_boot, level=level, paired=m.paired, seed=seed)
        lo, hi, n_boot_valid = boot.lo, boot.hi, boot.n_valid
        # a percentile interval of a skewed, few-prompt bootstrap can miss the estimate it should qualify
        if not gamma_in_interval(power.gamma, (lo, hi)):
            raise ValueError(
                f"the {level * 100:g}% bootstrap interval [{lo:.6g}, {hi:.6g}] of gamma does not contain the fitted "
                f"gamma {power.gamma:.6g}: the {flat.shape[0]} prompts' curves are too noisy for an interval at this "
                "level; measure more prompts (n_prompts, --prompts) or seeds, or ask for a higher level"
            )
        gamma_ci = (lo, hi)
    reading = fractional_order(power.gamma, gamma_ci, tol=tol, ci_level=level)
    with np.errstate(invalid="ignore", divide="ignore"):
        n = np.isfinite(flat).sum(0)
        sd = np.nanstd(flat, axis=0, ddof=1) if flat.shape[0] > 1 else np.full(d.shape, np.nan)
        t = student_t.ppf(0.5 + level / 2.0, np.where(n > 1, n - 1, np.nan))
        half = t * sd / np.sqrt(n)
    point_ci = np.stack([agg - half, agg + half], axis=1)
    layer_fits = [_safe_power(d, row, d_min) for row in m.layer_values]
    layer_gamma = np.array([f.gamma if f else np.nan for f in layer_fits])
    layer_r2 = np.array([f.r2 if f else np.nan for f in layer_fits])
    head_gamma = np.full(m.layer_head.shape[:2], np.nan)
    for i in range(head_gamma.shape[0]):
        for j in range(head_gamma.shape[1]):
            f = _safe_power(d, m.layer_head[i, j], d_min)
            head_gamma[i, j] = f.gamma if f else np.nan
    result = LensResult(
        measurement=m,
        d_min=d_min,
        power=power,
        expo=expo,
        choice=choice,
        gamma_ci=gamma_ci,
        level=level,
        n_boot=n_boot,
        n_boot_valid=n_boot_valid,
        reading=reading,
        point_ci=point_ci,
        layer_gamma=layer_gamma,
        layer_r2=layer_r2,
        head_gamma=head_gamma,
    )
    if result.left_out:
        warnings.warn(
            f"A(d) is zero or missing at the distances {result.left_out} >= d_min={d_min:g}: the fits use the other "
            f"{power.n_points} distance(s) only, and their gamma and R² describe those",
            RuntimeWarning,
            stacklevel=2,
        )
    return result


def summary_rows(result: LensResult) -> list[tuple[str, str]]:
    """The table the CLI prints and the report shows: (quantity, value)."""
    r, f = result.reading, result
    ci = f"[{f.gamma_ci[0]:.4f}, {f.gamma_ci[1]:.4f}]" if f.gamma_ci else "n/a (one prompt)"
    sci = f"[{r.s_ci[0]:.4f}, {r.s_ci[1]:.4f}]" if r.s_ci else ""
    m = f.measurement
    return [
        ("model", m.model_name),
        ("protocol", f"{m.protocol} ({m.passes}, {'causal' if m.causal else 'bidirectional'})"),
        ("prompts", f"{m.n_prompts} x {len(m.seeds)} seeds {list(m.seeds)}; {m.n_passes} passes"),
        ("distances", ", ".join(str(int(x)) for x in m.distances) + f"  (fit d >= {f.d_min:g}"
         + (f"; A(d) zero or missing, left out: {', '.join(map(str, f.left_out))})" if f.left_out else ")")),
        ("gamma", f"{f.power.gamma:.4f}"),
        (f"gamma {f.level * 100:g}% CI", ci),
        ("bootstrap", f"{f.n_boot_valid} of {f.n_boot} resamples valid" if f.gamma_ci else "n/a"),
        ("R² power law", f"{f.power.r2:.4f}"),
        ("R² exponential", f"{f.expo.r2:.4f}"),
        ("delta R²", f"{f.choice.delta_r2:+.4f}"),
        ("AICc choice", f"{f.choice.choice} ({f.choice.evidence}, weight {f.choice.weight_power_law:.3f})"),
        ("alpha = gamma - 1", f"{r.alpha:+.4f}"),
        ("s = (gamma - 1)/2", f"{r.s:+.4f} {sci}".strip()),
        ("regime", f"{r.regime}  ({r.regime_rule})"),
        ("Lévy analogy", ("holds: " if r.levy_valid else "does not hold: ") + r.levy_note),
        ("time", f"{m.wall_time_s:.1f} s"),
    ]


def write_lens_outputs(
    result: LensResult, out_dir: str | os.PathLike, *, plots: bool = True, title: str | None = None
) -> dict[str, Path]:
    """Write ``lens.json`` (all A(d) data), PNG plots and ``report.html`` into ``out_dir``."""
    from levyattn.report import Section, write_html_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {"json": atomic_write_json(out / "lens.json", result.to_dict())}
    figures: dict[str, Path] = {}
    if plots:
        from levyattn.lens.plots import plot_decay, plot_gamma_heatmap, plot_layer_decay

        figures["decay"] = plot_decay(result, out / "decay.png")
        figures["heatmap"] = plot_gamma_heatmap(result, out / "gamma_heatmap.png")
        figures["layers"] = plot_layer_decay(result, out / "layers.png")
        paths.update({f"{k}_png": v for k, v in figures.items()})
    m = result.measurement
    rows_d: list[list[Any]] = []
    fitted = result.fitted
    for k, dist in enumerate(m.distances):
        rows_d.append(
            [
                int(dist),
                float(m.aggregate[k]),
                float(result.point_ci[k, 0]),
                float(result.point_ci[k, 1]),
                int(m.sample_counts[k]),
                int(m.pair_counts[k]),
                "yes" if fitted[k] else "no",
            ]
        )
    pct = f"{result.level * 100:g}%"
    layer_rows = [[i, float(g), float(r2)] for i, (g, r2) in enumerate(zip(result.layer_gamma, result.layer_r2))]
    sections = [
        Section("Summary", text=[result.reading.caveat], header=["quantity", "value"], rows=summary_rows(result)),
        Section(
            "Decay",
            text=[f"lo, hi: the {pct} interval of A(d) over the prompts (Student t)."],
            header=["d", "A(d)", f"{pct} lo", f"{pct} hi", "prompts", "pairs", "fitted"],
            rows=rows_d,
            figures=[figures["decay"]] if "decay" in figures else [],
        ),
        Section(
            "Per layer and head",
            text=["gamma of each layer's and head's mean curve (d >= d_min)."],
            header=["layer", "gamma", "R²"],
            rows=layer_rows,
            figures=[figures[k] for k in ("heatmap", "layers") if k in figures],
        ),
        Section(
            "Where the published numbers come from",
            text=[
                PUBLISHED_SOURCE,
                "Compare with `levyattn atlas`; the published runs used 150 prompts per distance, seeds 42, 123, 7.",
            ],
        ),
    ]
    paths["html"] = write_html_report(
        out / "report.html",
        title or f"Fractional lens: {m.model_name}",
        sections,
        note=f"levyattn lens, {m.protocol} protocol; all A(d) data in lens.json",
    )
    return paths
