"""The paired comparison against independent computations: its verdict, its sign test and its
bootstrap interval; and the sweep's tables built on it."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from levyattn.training.compare import format_difference, paired_comparison, verdict_sentence
from levyattn.training.sweep import SweepResult, compare_with_softmax, correlations, summarise


def test_the_sign_test_and_the_interval_must_point_the_same_way():
    # Five large wins lift the interval above 0 while fifteen small losses make the sign test
    # significant the other way (binomtest(5, 20) p = 0.041): neither side is shown.
    a, b = [10.0] * 5 + [0.0] * 15, [0.0] * 5 + [0.1] * 15
    c = paired_comparison(a, b)
    assert c["ci"][0] > 0 and c["sign_p"] < 0.05 and (c["wins"], c["losses"]) == (5, 15)
    assert c["verdict"] == "no clear difference"
    assert verdict_sentence("A", "B", c).startswith("no clear difference between A and B")
    assert paired_comparison(b, a)["verdict"] == "no clear difference"
    negated = paired_comparison([-x for x in a], [-x for x in b], higher_is_better=False)
    assert negated["verdict"] == "no clear difference"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_refused_not_counted_as_ties(bad):
    # A NaN difference counted as a seed "level"; an infinite one gave the interval "+1.0000 to +nan".
    with pytest.raises(ValueError, match=r"a must hold finite values, got (nan|inf|-inf) at position 0"):
        paired_comparison([bad, 1, 1, 1, 1, 1, 1], [0] * 7)
    with pytest.raises(ValueError, match="b must hold finite values"):
        paired_comparison([1, 1], [0, bad])


def _row(attention, alpha, seed, ppl):
    return {"attention": attention, "alpha": alpha, "seed": seed, "ppl": ppl, "spectral_gap": 0.1, "params": 10,
            "train_time_s": 1.0}


@pytest.mark.parametrize("failed", [None, float("nan"), float("inf")])
def test_a_sweep_seed_without_a_finite_metric_is_said_not_averaged_away(failed):
    fna = [_row("fna", 1.2, s, v) for s, v in enumerate([10.0, 11.0, 12.0, failed, 10.5, 11.5])]
    softmax = [_row("softmax", None, s, v) for s, v in enumerate([12.0, 13.0, 14.0, 12.5, 13.5, 14.5])]
    summary = summarise(fna + softmax, "ppl")
    # The mean over the five seeds with a value was shown with "6" seeds (None, NaN) or as "inf ± nan".
    assert summary[0]["n"] == 5 and summary[0]["seeds"] == [0, 1, 2, 4, 5]
    assert summary[0]["ppl_mean"] == pytest.approx(11.0) and summary[0]["left_out"] == [3]
    assert summary[1]["n"] == 6 and summary[1]["left_out"] == []
    comparisons = compare_with_softmax(fna + softmax, "ppl", higher_is_better=False)
    (c,) = comparisons
    assert c["seeds"] == [0, 1, 2, 4, 5] and c["left_out"] == [3] and c["n"] == 5
    assert c["mean_b"] == pytest.approx(13.4) and c["verdict"] == "no clear difference"  # 5 of 5: p = 0.0625
    table = SweepResult(None, fna + softmax, summary, correlations([0.9], [0.1]), metric="ppl",
                        higher_is_better=False, comparisons=comparisons).table()
    assert "| fna | 1.2 | 5 of 6 | 11.0000 ± 0.7906 |" in table and "| softmax | - | 6 | 13.2500 ± 0.9354 |" in table
    assert "FNA alpha 1.2: ppl over 5 of 6 seeds; left out, without a finite ppl: seed 3 (" in table
    said = "level on 0 of 5 seeds (sign test p = 0.0625). Seeds left out, without a finite ppl on both sides: 3."
    assert said in table


def test_sweep_comparison_pairs_seeds_by_value_and_says_the_unpaired():
    fna = [_row("fna", 1.2, s, 10.0 + s) for s in (5, 1, 3, 0)]
    softmax = [_row("softmax", None, s, 20.0 + s) for s in (0, 1, 2, 3)]
    (c,) = compare_with_softmax(fna + softmax, "ppl", higher_is_better=False)
    assert c["seeds"] == [0, 1, 3] and c["left_out"] == [2, 5] and c["mean_diff"] == pytest.approx(-10.0)
    nothing = compare_with_softmax([_row("fna", 1.2, 0, 10.0), _row("softmax", None, 0, float("inf"))], "ppl")
    assert nothing == [{"a": "FNA alpha 1.2", "b": "softmax", "alpha": 1.2, "seeds": [], "left_out": [0], "n": 0}]
    table = SweepResult(None, [], [], correlations([0.9], [0.1]), metric="ppl", comparisons=nothing).table()
    assert "no seed has a finite ppl on both sides, so no comparison. Seeds left out" in table


def test_a_claimed_interval_never_reads_as_touching_zero():
    # Six seeds of a 50000-item test set, each ahead by one item: the claim came with
    # "paired difference +0.0000 (95% bootstrap interval +0.0000 to +0.0000)".
    a = [(40000 + k) / 50000 for k in range(6)]
    b = [(40000 + k - 1) / 50000 for k in range(6)]
    c = paired_comparison(a, b)
    sentence = verdict_sentence("A", "B", c)
    assert c["verdict"] == "ahead" and "0.0000" not in sentence
    assert "paired difference +2e-05 (95% bootstrap interval +2e-05 to +2e-05)" in sentence
    assert format_difference(-3e-5) == "-3e-05" and format_difference(0.0) == "+0.0000"
    assert format_difference(0.01234) == "+0.0123" and format_difference(-0.00005) == "-0.0001"


@settings(max_examples=200, deadline=None)
@given(st.floats(-1, 1, allow_nan=False))
def test_a_shown_difference_keeps_its_sign(value):
    shown = format_difference(value)
    assert float(shown) == 0 if value == 0 else (float(shown) > 0) == (value > 0)


def _sign_p(wins: int, losses: int) -> float:
    """The two-sided exact sign test written out: twice the smaller binomial tail, at most 1."""
    n = wins + losses
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


# Dyadic values (multiples of 1/64 below 64): sums and differences are exact in float64.
_dyadic = st.integers(0, 64 * 63).map(lambda k: k / 64)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_dyadic, _dyadic), min_size=1, max_size=12), st.integers(-100, 100), st.booleans())
def test_shifting_both_arms_changes_no_comparison(pairs, shift, higher_is_better):
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    plain = paired_comparison(a, b, higher_is_better=higher_is_better)
    moved = paired_comparison([x + shift for x in a], [x + shift for x in b], higher_is_better=higher_is_better)
    assert moved["mean_a"] == pytest.approx(plain["mean_a"] + shift) and moved["mean_b"] == pytest.approx(
        plain["mean_b"] + shift)
    for key in ("n", "mean_diff", "ci", "wins", "losses", "ties", "sign_p", "verdict"):
        assert moved[key] == plain[key], key
    swapped = paired_comparison(b, a, higher_is_better=higher_is_better)
    mirrored = {"ahead": "behind", "behind": "ahead"}
    assert swapped["verdict"] == mirrored.get(plain["verdict"], plain["verdict"])
    flipped = paired_comparison(a, b, higher_is_better=not higher_is_better)
    assert (flipped["wins"], flipped["losses"]) == (plain["losses"], plain["wins"])
    assert flipped["verdict"] == mirrored.get(plain["verdict"], plain["verdict"])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=20))
def test_the_sign_test_is_exact_two_sided_over_the_untied_seeds(diffs):
    c = paired_comparison([float(d) for d in diffs], [0.0] * len(diffs))
    wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    assert (c["wins"], c["losses"], c["ties"]) == (wins, losses, len(diffs) - wins - losses)
    if wins + losses == 0:
        assert c["sign_p"] is None
    else:
        assert c["sign_p"] == pytest.approx(_sign_p(wins, losses), rel=1e-12)
    if c["verdict"] in ("ahead", "behind"):
        assert wins + losses >= 6 and c["sign_p"] < 0.05 and (wins > losses) == (c["verdict"] == "ahead")


@pytest.mark.parametrize("n", [2, 3, 6, 10])
def test_the_interval_is_a_95_percent_percentile_bootstrap_of_the_mean(n):
    from scipy.stats import bootstrap

    diffs = np.random.default_rng(n).normal(0.02, 0.03, n)
    c = paired_comparison(list(diffs), [0.0] * n)
    reference = bootstrap((diffs,), np.mean, n_resamples=10000, confidence_level=0.95, method="percentile",
                          random_state=0).confidence_interval
    # Two independent 10000-resample bootstraps: the ends agree to a few percent of the spread.
    width = diffs.max() - diffs.min()
    assert c["ci"][0] == pytest.approx(reference.low, abs=0.03 * width)
    assert c["ci"][1] == pytest.approx(reference.high, abs=0.03 * width)
    assert paired_comparison(list(diffs), [0.0] * n)["ci"] == c["ci"]  # a fixed seed: the same interval again


def test_tied_seeds_are_left_out_of_the_sign_test():
    # 7 seeds, 6 ahead and 1 level: the sign test is over the 6 that differ, p = 2 / 64.
    c = paired_comparison([0.9, 0.8, 0.7, 0.95, 0.85, 0.75, 0.6], [0.8, 0.7, 0.6, 0.9, 0.8, 0.7, 0.6])
    assert (c["wins"], c["losses"], c["ties"]) == (6, 0, 1) and c["sign_p"] == pytest.approx(2 / 64)
    assert c["verdict"] == "ahead" and "ahead on 6, behind on 0, level on 1 of 7 seeds" in verdict_sentence("A", "B", c)


def test_numpy_arrays_compare_as_lists_do():
    # an array's truth value is ambiguous: the emptiness check raised on any two-seed array
    a, b = [0.9, 0.8, 0.7], [0.7, 0.6, 0.7]
    assert paired_comparison(np.array(a), np.array(b)) == paired_comparison(a, b)
    with pytest.raises(ValueError, match="one value per seed"):
        paired_comparison(np.array([]), np.array([]))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(_dyadic, _dyadic), min_size=2, max_size=10), st.randoms(use_true_random=False))
def test_the_order_of_the_seeds_changes_nothing(pairs, random):
    # The same seeds listed in another order gave another interval: 0.0667 to 0.1733 and,
    # reversed, 0.0633 to 0.1733 on six seeds.
    diffs = {x - y for x, y in pairs}
    assume(not any(d != 0 and -d in diffs for d in diffs))  # opposite differences keep their listed order
    shuffled = list(pairs)
    random.shuffle(shuffled)
    plain = paired_comparison([p[0] for p in pairs], [p[1] for p in pairs])
    again = paired_comparison([p[0] for p in shuffled], [p[1] for p in shuffled])
    assert again["ci"] == pytest.approx(plain["ci"], abs=1e-12) and again["verdict"] == plain["verdict"]
    a, b = [0.9, 0.95, 0.99, 0.97, 0.92, 0.96], [0.7, 0.8, 0.9, 0.95, 0.72, 0.9]
    assert paired_comparison(a[::-1], b[::-1])["ci"] == pytest.approx(paired_comparison(a, b)["ci"], abs=1e-12)
