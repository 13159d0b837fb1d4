"""Figures of the lens: the log-log decay with both fits, the per-layer/per-head gamma heatmap,
and the per-layer curves. matplotlib's object API (no pyplot state); PNGs written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from levyattn.io import atomic_write

if TYPE_CHECKING:
    from levyattn.lens.report import LensResult

__all__ = ["plot_decay", "plot_gamma_heatmap", "plot_layer_decay"]


def _figure(size: tuple[float, float]):  # noqa: ANN202 - matplotlib type
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:  # noqa: ANN001
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def plot_decay(result: LensResult, path: str | os.PathLike) -> Path:
    """log-log A(d): the aggregate with error bars over prompts at the run's level, both fits over d >= d_min."""
    m = result.measurement
    d = m.distances.astype(float)
    a = m.aggregate
    lo, hi = result.point_ci[:, 0], result.point_ci[:, 1]
    fig = _figure((6.4, 4.6))
    ax = fig.add_subplot(1, 1, 1)
    used = result.fitted
    yerr = np.vstack([np.clip(a - lo, 0, None), np.clip(hi - a, 0, None)])
    bars = f"{result.level * 100:g}% interval"
    ax.errorbar(d[used], a[used], yerr=yerr[:, used], fmt="o", color="C0", capsize=3, label=f"A(d), fitted ({bars})")
    if (~used).any():
        ax.errorbar(d[~used], a[~used], yerr=yerr[:, ~used], fmt="o", mfc="none", color="C0", capsize=3,
                    label=f"A(d), not fitted (d < d_min={result.d_min:g} or A(d) = 0)")
    xs = np.geomspace(max(d[used].min(), 1.0), d[used].max(), 200)
    g = result.power.gamma
    ci = f" [{result.gamma_ci[0]:.3f}, {result.gamma_ci[1]:.3f}]" if result.gamma_ci else ""
    ax.plot(xs, result.power.predict(xs), "-", color="C3",
            label=f"power law: gamma={g:.3f}{ci}, R²={result.power.r2:.3f}")
    ax.plot(xs, result.expo.predict(xs), "--", color="C2",
            label=f"exponential: lambda={result.expo.lam:.2e}, R²={result.expo.r2:.3f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("distance d (tokens)")
    ax.set_ylabel("mean attention weight A(d)")
    ax.set_title(f"{m.model_name} — {m.protocol} ({m.passes})", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


def plot_gamma_heatmap(result: LensResult, path: str | os.PathLike) -> Path:
    """gamma per (layer, head), diverging around the crossover gamma = 1; per-layer gamma at the right."""
    gh = result.head_gamma
    gl = result.layer_gamma
    ly, h = gh.shape
    grid = np.concatenate([gh, np.full((ly, 1), np.nan), gl[:, None]], axis=1)
    finite = grid[np.isfinite(grid)]
    span = max(0.25, float(np.max(np.abs(finite - 1.0)))) if finite.size else 1.0
    fig = _figure((min(2.0 + 0.55 * (h + 2), 16), min(1.6 + 0.4 * ly, 14)))
    ax = fig.add_subplot(1, 1, 1)
    img = ax.imshow(np.ma.masked_invalid(grid), cmap="RdBu_r", vmin=1.0 - span, vmax=1.0 + span, aspect="auto")
    fig.colorbar(img, ax=ax, label="gamma (1 = crossover)")
    ax.set_xticks(list(range(h)) + [h + 1])
    ax.set_xticklabels([str(i) for i in range(h)] + ["layer"], fontsize=7)
    ax.set_yticks(range(ly))
    ax.set_yticklabels([str(i) for i in range(ly)], fontsize=7)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    if ly * (h + 2) <= 300:
        for i in range(ly):
            for j in range(h + 2):
                if np.isfinite(grid[i, j]):
                    dark = abs(grid[i, j] - 1.0) > 0.6 * span  # white text on saturated cells
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if dark else "black")
    ax.set_title(f"gamma per layer and head (whole model {result.power.gamma:.3f})", fontsize=10)
    return _save(fig, path)


def plot_layer_decay(result: LensResult, path: str | os.PathLike) -> Path:
    """A(d) of each layer (mean over heads and prompts) on log-log axes."""
    m = result.measurement
    d = m.distances.astype(float)
    fig = _figure((6.4, 4.6))
    ax = fig.add_subplot(1, 1, 1)
    values = m.layer_values
    cmap = __import__("matplotlib").colormaps["viridis"]
    for i, row in enumerate(values):
        ok = np.isfinite(row) & (row > 0)
        ax.plot(d[ok], row[ok], "-o", ms=3, color=cmap(i / max(1, len(values) - 1)),
                label=f"layer {i}" if len(values) <= 12 else None)
    ax.plot(d, m.aggregate, "k--", lw=2, label="all layers")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("distance d (tokens)")
    ax.set_ylabel("A(d)")
    ax.set_title("decay per layer", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)
