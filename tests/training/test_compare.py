"""The paired comparison against independent computations: its verdict, its sign test and its
bootstrap interval; and the sweep's tables built on it."""

from __future__ import annotations

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
