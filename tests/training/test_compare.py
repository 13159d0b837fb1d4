"""The paired comparison against independent computations: its verdict, its sign test and its
bootstrap interval; and the sweep's tables built on it."""

from __future__ import annotations

import pytest

from levyattn.training.compare import paired_comparison, verdict_sentence


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
