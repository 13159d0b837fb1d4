"""Comparisons over seeds: spreads, the paired comparison of two variants and its verdict in words.

Two variants trained on the same seeds (same data, initialisation stream and batch order)
give one paired difference per seed. The verdict claims a difference only when the 95%
percentile-bootstrap interval of the mean difference excludes 0 **and** the two-sided exact
sign test over the seeds that differ (tied seeds left out) gives p < ``SIGN_TEST_LEVEL`` (with 6
or 7 such seeds: every one on one side; 5 or fewer can never reach it), the two on the same
side. Otherwise it says "no clear difference".
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np

SIGN_TEST_LEVEL = 0.05
BOOTSTRAP_RESAMPLES = 10000


def format_spread(mean: float, std: float, n: int, spec: str = ".4f") -> str:
    """``mean ± std`` over ``n`` seeds in the format ``spec``; the value alone for one seed, which
    has no spread. Spectral gaps take ``spec=".2g"``: they span decades, and four decimals show
    a small gap as ``0.0000``."""
    if n == 1:
        return f"{mean:{spec}}"
    return f"{mean:{spec}} ± {std:{spec}}"


def format_difference(value: float) -> str:
    """A signed difference to 4 decimals, or to 2 significant digits where 4 decimals would show a
    nonzero difference as ``+0.0000`` (an interval above 0 must not read as touching it)."""
    if value != 0 and round(value, 4) == 0:
        return f"{value:+.2g}"
    return f"{value:+.4f}"


def spread(values: Sequence[float], spec: str = ".4f") -> str:
    """``mean ± std`` over seeds in the format ``spec``; the value alone for one seed (no spread)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return format_spread(statistics.fmean(values), std, len(values), spec)


def paired_comparison(
    a: Sequence[float], b: Sequence[float], seed: int = 0, higher_is_better: bool = True
) -> dict[str, Any]:
    """Compare two variants measured on the same seeds: ``a[i]`` and ``b[i]`` share seed i.

    Returns ``n``, ``mean_a``, ``mean_b``, ``mean_diff`` (mean of a - b), ``ci`` (95% percentile-bootstrap interval of
    the mean difference, resampling seeds; None below 2 seeds), ``wins``, ``losses``, ``ties`` (seeds where
    ``a`` is better, worse, level), ``sign_p`` (two-sided exact sign test over the non-tied seeds; None without
    any) and ``verdict``: "ahead" or "behind" (``a`` better or worse than ``b``) when the interval excludes 0,
    ``sign_p < 0.05`` and both point the same way (more seeds ahead than behind for "ahead"), else
    "no clear difference" ("one seed" for n = 1). ``higher_is_better=False`` for a metric such as
    perplexity: ``a`` is then ahead where it is lower. Non-finite values are refused (ValueError).
    """
    from scipy.stats import binomtest

    if len(a) != len(b) or len(a) == 0:
        raise ValueError(f"a and b must hold one value per seed, the same seeds, got {len(a)} and {len(b)}")
    for name, values in (("a", a), ("b", b)):
        bad = [(i, v) for i, v in enumerate(values) if not np.isfinite(v)]
        if bad:
            # A NaN difference would count as a tie, and one infinite value makes the interval NaN.
            position, value = bad[0]
            raise ValueError(f"{name} must hold finite values, got {value} at position {position} of {list(values)}")
    diffs = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = diffs.size
    better = diffs if higher_is_better else -diffs
    wins, losses = int((better > 0).sum()), int((better < 0).sum())
    out: dict[str, Any] = {
        "n": n,
        "mean_a": float(np.mean(a)),
        "mean_b": float(np.mean(b)),
        "mean_diff": float(diffs.mean()),
        "wins": wins,
        "losses": losses,
        "ties": n - wins - losses,
        "ci": None,
        "sign_p": None,
    }
    if wins + losses:
        out["sign_p"] = float(binomtest(wins, wins + losses, 0.5, alternative="two-sided").pvalue)
    if n == 1:
        out["verdict"] = "one seed"
        return out
    # Resampled in order of |difference| (stable), so the seeds' order does not change the interval
    # (but for two opposite differences, which keep theirs), and negated differences (the arms
    # swapped) give exactly the mirrored one.
    ordered = diffs[np.argsort(np.abs(diffs), kind="stable")]
    rng = np.random.default_rng(seed)
    means = ordered[rng.integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    out["ci"] = (float(lo), float(hi))
    significant = out["sign_p"] is not None and out["sign_p"] < SIGN_TEST_LEVEL
    # The two must point the same way: a few large wins can lift the interval above 0 while
    # most seeds, and the sign test, say the opposite.
    better_interval = lo > 0 if higher_is_better else hi < 0
    worse_interval = hi < 0 if higher_is_better else lo > 0
    if significant and better_interval and wins > losses:
        out["verdict"] = "ahead"
    elif significant and worse_interval and losses > wins:
        out["verdict"] = "behind"
    else:
        out["verdict"] = "no clear difference"
    return out


def verdict_sentence(name_a: str, name_b: str, comparison: dict[str, Any]) -> str:
    """One sentence: the paired difference of ``name_a`` over ``name_b`` with its uncertainty."""
    c = comparison
    if c["n"] == 1:
        return (
            f"{name_a} - {name_b}: {format_difference(c['mean_diff'])} on one seed (n = 1): no spread, so no verdict; "
            "run more seeds."
        )
    lo, hi = c["ci"]
    sign = "no seed differs" if c["sign_p"] is None else f"sign test p = {c['sign_p']:.3g}"
    head = {
        "ahead": f"{name_a} is ahead of {name_b}",
        "behind": f"{name_a} is behind {name_b}",
        "no clear difference": f"no clear difference between {name_a} and {name_b}",
    }[c["verdict"]]
    return (
        f"{head}: mean {c['mean_a']:.4f} against {c['mean_b']:.4f}, paired difference "
        f"{format_difference(c['mean_diff'])} (95% bootstrap interval {format_difference(lo)} to "
        f"{format_difference(hi)}), ahead on {c['wins']}, behind on {c['losses']}, "
        f"level on {c['ties']} of {c['n']} seeds ({sign})."
    )


__all__ = ["BOOTSTRAP_RESAMPLES", "SIGN_TEST_LEVEL", "format_difference", "format_spread", "paired_comparison",
           "spread", "verdict_sentence"]
