from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from levyattn.lens import CAVEAT, fractional_order


@given(st.floats(0.01, 5.0))
def test_mappings(gamma):
    r = fractional_order(gamma)
    assert r.alpha == pytest.approx(gamma - 1) and r.s == pytest.approx((gamma - 1) / 2)
    assert r.levy_valid == (0 < gamma - 1 < 2)
    assert r.caveat == CAVEAT


@pytest.mark.parametrize(
    "gamma, ci, regime",
    [
        (0.7, None, "smoothing"),
        (1.3, None, "differentiating"),
        (1.04, None, "crossover"),
        (0.96, None, "crossover"),
        (0.94, None, "smoothing"),
        (1.02, (0.83, 1.16), "crossover"),  # the published pythia-160m case: CI contains 1
        (0.9, (0.85, 0.99), "smoothing"),
        (1.02, (1.01, 1.03), "differentiating"),  # near 1 but the CI excludes it: not forced to crossover
    ],
)
def test_regimes(gamma, ci, regime):
    r = fractional_order(gamma, ci)
    assert r.regime == regime
    if ci:
        assert r.s_ci == pytest.approx(((ci[0] - 1) / 2, (ci[1] - 1) / 2))
        assert r.alpha_ci == pytest.approx((ci[0] - 1, ci[1] - 1))


def test_levy_edges():
    assert not fractional_order(1.0).levy_valid  # alpha = 0 excluded
    assert fractional_order(1.5).levy_valid
    assert not fractional_order(3.0).levy_valid and "beyond" in fractional_order(3.0).levy_note
    assert "does not hold" in fractional_order(0.7).levy_note
    assert "crosses" in fractional_order(1.1, (0.95, 1.2)).levy_note
    assert "position" in CAVEAT and "interpretation" in CAVEAT


def test_the_rule_names_the_level_of_the_interval():
    assert fractional_order(0.9, (0.85, 0.95), ci_level=0.8).regime_rule == "80% CI [0.85, 0.95] excludes 1"
    assert fractional_order(0.9, (0.85, 0.95)).regime_rule == "CI [0.85, 0.95] excludes 1"  # level not known


def test_tolerance_is_configurable():
    assert fractional_order(1.08).regime == "differentiating"
    assert fractional_order(1.08, tol=0.1).regime == "crossover"


@pytest.mark.parametrize(
    "kwargs, err",
    [
        ({"gamma": math.nan}, ValueError),
        ({"gamma": "1.0"}, TypeError),
        ({"gamma": 1.0, "ci": (1.2, 0.9)}, ValueError),
        ({"gamma": 1.0, "ci": (0.9,)}, ValueError),
        ({"gamma": 1.0, "tol": -0.1}, ValueError),
        ({"gamma": 1.0, "ci": (0.9, 1.1), "ci_level": 95}, ValueError),
        ({"gamma": 1.3, "ci": (0.9, 1.1)}, ValueError),  # a gamma outside its own interval
    ],
)
def test_bad_input(kwargs, err):
    with pytest.raises(err):
        fractional_order(**kwargs)
