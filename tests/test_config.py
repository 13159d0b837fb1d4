"""The shared argument checks of ``levyattn.config``."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from levyattn.config import check_alpha, check_bandwidth, check_bool, check_choice, check_float, check_int

FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)


def _accepts(check, value) -> bool:
    try:
        check(value)
    except ValueError:
        return False
    return True


@given(FLOATS)
def test_alpha_and_bandwidth_ranges_hold_for_numbers_and_tensors_alike(x):
    assert _accepts(check_alpha, x) == (0 < x <= 2)
    assert _accepts(check_bandwidth, x) == (0 < x < math.inf)
    for check in (check_alpha, check_bandwidth):
        assert _accepts(check, torch.tensor([1.0, x])) == _accepts(check, x)


def test_alpha_and_bandwidth_messages_name_the_value():
    with pytest.raises(ValueError, match=r"alpha must lie in \(0, 2\] .*got 3.0 in the alpha tensor"):
        check_alpha(torch.tensor([1.0, 3.0]))
    with pytest.raises(ValueError, match="bandwidth must be > 0 and finite, got nan"):
        check_bandwidth(float("nan"))
    with pytest.raises(TypeError, match="alpha tensor must be floating point"):
        check_alpha(torch.tensor([1]))
    with pytest.raises(TypeError, match="alpha must be a real number, got bool"):
        check_alpha(True)


def test_int_float_choice_bool():
    assert check_int("n", 3, 1, 5) == 3
    with pytest.raises(ValueError, match=r"n must be an int >= 1, got 0"):
        check_int("n", 0, 1)
    with pytest.raises(ValueError, match=r"n must be an int in \[1, 5\], got 6"):
        check_int("n", 6, 1, 5)
    with pytest.raises(TypeError, match="n must be an int, got bool"):
        check_int("n", True, 0)
    assert check_float("p", 1, 0.0, 1.0) == 1.0
    with pytest.raises(ValueError, match=r"p must be in \[0.0, 1.0\), got 1.0"):
        check_float("p", 1.0, 0.0, 1.0, hi_open=True)
    with pytest.raises(ValueError, match=r"t must be in \[0.0, inf\), got inf"):
        check_float("t", math.inf, 0.0, math.inf, hi_open=True)
    with pytest.raises(ValueError, match="p must be in"):
        check_float("p", float("nan"), 0.0, 1.0)
    with pytest.raises(ValueError, match=r"k must be one of \('a', 'b'\), got 'c'"):
        check_choice("k", "c", ("a", "b"))
    with pytest.raises(TypeError, match="flag must be a bool, got int 1"):
        check_bool("flag", 1)
