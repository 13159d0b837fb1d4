"""Figures for the analyses (matplotlib, Agg; written atomically as PNG).

Figures are built with ``matplotlib.figure.Figure`` directly, not pyplot: no global state,
no display needed, safe in worker processes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from levyattn.io import atomic_write


def _save(fig, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def _figure(width: float = 5.0, height: float = 4.0):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def plot_spectrum(spectra: Mapping[str, np.ndarray], path: str | os.PathLike, title: str = "Eigenvalues") -> Path:
    """Eigenvalues in the complex plane with the unit circle; one colour per entry."""
    fig = _figure(5, 5)
    ax = fig.add_subplot()
    theta = np.linspace(0, 2 * np.pi, 400)
    ax.plot(np.cos(theta), np.sin(theta), color="0.6", lw=0.8)
    for label, vals in spectra.items():
        vals = np.asarray(vals)
        vals = vals[np.isfinite(vals)]
        ax.scatter(vals.real, vals.imag, s=10, alpha=0.7, label=label)
    ax.set_aspect("equal")
    ax.set_xlabel("Re λ")
    ax.set_ylabel("Im λ")
    ax.set_title(title)
    if len(spectra) <= 12:
        ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


def draw_attention(fig, ax, P: np.ndarray, title: str = "Attention", floor: float = 1e-12) -> None:
    """One (N, N) matrix as a heatmap on ``ax`` with its colour bar and integer ticks: on a log
    scale when the weights span two decades or more (weights below ``floor`` show as ``floor``),
    else on a linear scale from 0."""
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.ticker import MaxNLocator

    positive = P[P > 0]
    low = max(float(positive.min()) if positive.size else floor, floor)
    high = max(float(P.max()), low)
    if high >= 100 * low:
        image = ax.imshow(np.clip(P, low, None), norm=LogNorm(vmin=low, vmax=high), cmap="viridis")
    else:
        image = ax.imshow(P, norm=Normalize(vmin=0.0, vmax=high if high > 0 else 1.0), cmap="viridis")
    fig.colorbar(image, ax=ax, label="P_ij")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(nbins=6, integer=True))
    ax.set_xlabel("key j")
    ax.set_ylabel("query i")
    ax.set_title(title)


def plot_attention(P: np.ndarray, path: str | os.PathLike, title: str = "Attention") -> Path:
    """Heatmap of one (N, N) matrix with its colour bar (scales as in :func:`draw_attention`)."""
    fig = _figure(5, 4.2)
    draw_attention(fig, fig.add_subplot(), P, title)
    return _save(fig, path)


def plot_embedding(
    coords: np.ndarray,
    path: str | os.PathLike,
    color: np.ndarray | None = None,
    title: str = "Diffusion map",
    color_label: str = "token position",
) -> Path:
    """Scatter of the first two diffusion coordinates, coloured by ``color`` (default: index)."""
    fig = _figure(5, 4.2)
    ax = fig.add_subplot()
    c = np.arange(coords.shape[0]) if color is None else color
    y = coords[:, 1] if coords.shape[1] > 1 else np.zeros(coords.shape[0])
    points = ax.scatter(coords[:, 0], y, c=c, s=12, cmap="viridis")
    fig.colorbar(points, ax=ax, label=color_label)
    ax.set_xlabel("ψ1")
    ax.set_ylabel("ψ2")
    ax.set_title(title)
    return _save(fig, path)


def plot_lines(
    x: Sequence[float],
    series: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    xlabel: str,
    ylabel: str,
    title: str = "",
) -> Path:
    """One line per series over a shared x (e.g. gap vs intrinsic dimension, one per alpha)."""
    fig = _figure(5.5, 4)
    ax = fig.add_subplot()
    for label, ys in series.items():
        ax.plot(list(x), [np.nan if v is None else v for v in ys], marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)
