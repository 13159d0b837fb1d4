"""The lens's option checks, in one place: :func:`measure_decay`, :func:`analyze_decay`,
:func:`bootstrap_gamma` and ``levyattn lens`` (before it loads a model) all call
:func:`check_lens_options`.

Only what can be checked without the model is checked here; the model's context and vocabulary
are checked once it is loaded (``measure_decay``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["check_lens_options"]


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def check_lens_options(
    *,
    protocol: str | None = None,
    passes: str | None = None,
    prompt_stream: str | None = None,
    capture: str | None = None,
    distances: Sequence[int] | None = None,
    n_prompts: int | None = None,
    seeds: Sequence[int] | None = None,
    batch_size: int | None = None,
    corpus: str | os.PathLike | None = None,
    token_range: Sequence[int] | None = None,
    seq_len: int | None = None,
    d_min: float | None = None,
    n_boot: int | None = None,
    level: float | None = None,
    tol: float | None = None,
    names: Mapping[str, str] | None = None,
) -> None:
    """Refuse a bad lens option with ValueError (TypeError for a wrong kind) naming it, its value
    and what is valid; every argument left None is not checked.

    - ``protocol`` "published" or "dense"; ``passes`` "auto", "one" or "per_distance";
      ``prompt_stream`` "nested" or "published"; ``capture`` "auto" or "eager";
    - ``distances``: integers >= 1; with ``d_min``, at least 2 of them >= ``d_min`` (the fit's
      minimum); with ``seq_len`` (the dense pass length of a :class:`DenseOptions`, which
      checks it), each < ``seq_len`` unless ``protocol`` is "published";
    - ``n_prompts``, ``batch_size``: integers >= 1; ``seeds``: distinct integers, at least one
      (a repeated seed draws the same prompts again, and counted twice they would narrow the CI
      without new data);
    - ``corpus``: "random" or an existing file; ``token_range``: integers ``0 <= low <= high``;
    - ``d_min`` > 0; ``n_boot`` an integer >= 10; ``level`` in (0, 1); ``tol`` >= 0.

    ``names`` maps a parameter to the name the messages use (``{"n_prompts": "--prompts"}`` for
    the command line); unmapped parameters are called by their own names.
    """
    names = names or {}

    def name(param: str) -> str:
        return names.get(param, param)

    for param, value, choices in (
        ("protocol", protocol, ("published", "dense")),
        ("passes", passes, ("auto", "one", "per_distance")),
        ("prompt_stream", prompt_stream, ("nested", "published")),
        ("capture", capture, ("auto", "eager")),
    ):
        if value is not None and value not in choices:
            options = ", ".join(repr(c) for c in choices[:-1]) + f" or {choices[-1]!r}"
            raise ValueError(f"{name(param)} must be {options}, got {value!r}")
    for param, value, minimum in (("n_prompts", n_prompts, 1), ("batch_size", batch_size, 1), ("n_boot", n_boot, 10)):
        if value is None:
            continue
        if not _is_int(value):
            raise ValueError(f"{name(param)} must be an integer >= {minimum}, got {value!r}")
        if value < minimum:
            unit = " resamples" if param == "n_boot" else ""
            raise ValueError(f"{name(param)} must be >= {minimum}{unit}, got {value!r}")
    if seeds is not None:
        if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__iter__"):
            raise ValueError(f"{name('seeds')} must be a non-empty sequence of integers, got {seeds!r}")
        seeds = tuple(seeds)
        if not seeds or not all(_is_int(s) for s in seeds):
            raise ValueError(f"{name('seeds')} must be a non-empty sequence of integers, got {seeds!r}")
        listed = [int(s) for s in seeds]
        repeated = sorted({s for s in listed if listed.count(s) > 1})
        if repeated:
            raise ValueError(f"{name('seeds')} must be distinct, got {listed} with {repeated} repeated")
    if d_min is not None and not (_is_real(d_min) and math.isfinite(d_min) and d_min > 0):
        raise ValueError(f"{name('d_min')} must be a positive number, got {d_min!r}")
    if level is not None and not (_is_real(level) and 0.0 < level < 1.0):
        raise ValueError(f"{name('level')} must be in (0, 1), got {level!r}")
    if tol is not None and not (_is_real(tol) and math.isfinite(tol) and tol >= 0):
        raise ValueError(f"{name('tol')} must be a number >= 0, got {tol!r}")
    if distances is not None:
        if isinstance(distances, (str, bytes)) or not hasattr(distances, "__iter__"):
            raise TypeError(f"{name('distances')} must be a sequence of integers, got {type(distances).__name__}")
        grid = list(distances)
        if not grid:
            raise ValueError(f"{name('distances')} must not be empty")
        for d in grid:
            if not _is_int(d) or d < 1:
                raise ValueError(f"{name('distances')} must be integers >= 1, got {d!r}")
        grid = sorted({int(d) for d in grid})
        if d_min is not None:
            fitted = [d for d in grid if d >= d_min]
            if len(fitted) < 2:
                raise ValueError(
                    f"{name('distances')} {grid} leave {len(fitted)} distance(s) >= {name('d_min')} {d_min:g}; "
                    "the fit needs at least 2"
                )
        if seq_len is not None and protocol in (None, "dense"):
            too_long = [d for d in grid if d >= seq_len]
            if too_long:
                raise ValueError(
                    f"{name('distances')} {too_long} do not fit a dense pass of {name('seq_len')} {seq_len} "
                    f"(need d < {name('seq_len')})"
                )
    if corpus is not None:
        if not isinstance(corpus, (str, os.PathLike)):
            raise TypeError(f"{name('corpus')} must be 'random' or a path, got {type(corpus).__name__}")
        if not (isinstance(corpus, str) and corpus == "random") and not Path(corpus).is_file():
            raise FileNotFoundError(
                f"{name('corpus')} {os.fspath(corpus)}: file not found (use 'random' for random tokens)"
            )
    if token_range is not None:
        _check_token_range(token_range, name("token_range"))


def _check_token_range(token_range: Any, label: str) -> None:
    if isinstance(token_range, (str, bytes)) or not hasattr(token_range, "__len__") or len(token_range) != 2:
        raise ValueError(f"{label} must be (low, high) integers, got {token_range!r}")
    if not all(_is_int(t) for t in token_range):
        raise ValueError(f"{label} must be (low, high) integers, got {tuple(token_range)!r}")
    low, high = (int(t) for t in token_range)
    if low < 0 or high < low:
        raise ValueError(
            f"{label} ({low}, {high}) is empty or negative; it needs 0 <= low <= high"
            + (" (--token-range LOW HIGH on the command line)" if label == "token_range" else "")
        )
