"""The shared input checks of pkd._validation: one scalar check, one non-finite search."""

import math

import numpy as np
import pytest

from pkd import _validation as V


@pytest.mark.parametrize(
    ("value", "kwargs", "error", "match"),
    [
        (True, {}, TypeError, r"x must be a real number, got True \(bool\)"),
        (np.bool_(False), {"integer": True}, TypeError, "x must be an int"),
        ("1", {"low": 0}, TypeError, r"x must be a real number >= 0, got '1' \(str\)"),
        (1.0, {"integer": True}, TypeError, "x must be an int"),
        (math.nan, {}, ValueError, "x must be finite, got nan"),
        (math.inf, {"low": 0}, ValueError, "x must be finite and >= 0, got inf"),
        (-1e-300, {"low": 0}, ValueError, "x must be finite and >= 0"),
        (0.0, {"low": 0, "low_inclusive": False}, ValueError, "x must be finite and > 0"),
        (math.nan, {"low": 0, "high": 1}, ValueError, r"x must be in \[0, 1\], got nan"),
        (1.5, {"low": 0, "high": 1}, ValueError, r"x must be in \[0, 1\]"),
        (-1, {"integer": True, "low": 0, "hint": " (why)"}, ValueError,
         r"x must be >= 0, got -1 \(why\)"),
    ],
)
def test_check_scalar_refuses_with_a_message_naming_the_argument(value, kwargs, error, match):
    with pytest.raises(error, match=match):
        V.check_scalar(value, "x", **kwargs)


def test_check_scalar_returns_python_numbers():
    assert V.check_scalar(np.float32(0.5), "x", low=0, high=1) == 0.5
    assert type(V.check_scalar(np.float32(0.5), "x")) is float
    assert type(V.check_scalar(np.int64(3), "n", integer=True, low=0)) is int
    assert V.check_scalar(0, "n", integer=True, low=0) == 0  # the bound itself is in
    assert V.check_scalar(1.0, "x", low=0, high=1) == 1.0


def test_the_scalar_checkers_keep_their_messages():
    with pytest.raises(ValueError, match="hidden_weight must be finite and >= 0, got -1.0"):
        V.check_nonnegative(-1, "hidden_weight")
    with pytest.raises(ValueError, match="steps must be > 0, got 0"):
        V.check_positive_int(0, "steps")
    with pytest.raises(ValueError, match="temperature must be finite and > 0, got inf"):
        V.check_positive(math.inf, "temperature")
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 2.0"):
        V.check_fraction(2, "alpha")
    with pytest.raises(ValueError, match="negative indices do not wrap"):
        V.check_mapping([(0, -1)])


def test_find_nonfinite_counts_and_finds_the_first_in_c_order():
    a = np.zeros((3, 4), dtype=np.float32)
    assert V.find_nonfinite(a) is None
    a[2, 0] = np.inf
    a[1, 3] = np.nan
    assert V.find_nonfinite(a) == (2, (1, 3))
    assert V.find_nonfinite(a, np.isinf(a)) == (1, (2, 0))  # only the entries asked about
    assert V.find_nonfinite(a, np.zeros(a.shape, dtype=bool)) is None


def test_check_choice_and_check_float_dtype():
    assert V.check_choice("adam", "method", ("adam", "sgd")) == "adam"
    with pytest.raises(ValueError, match="method must be one of 'adam', 'sgd'; got 'lbfgs'"):
        V.check_choice("lbfgs", "method", ("adam", "sgd"))
    with pytest.raises(ValueError, match="one of"):
        V.check_choice(["adam"], "method", ("adam", "sgd"))
    assert V.check_float_dtype("float32") == np.float32
    with pytest.raises(TypeError, match="dtype must be float32 or float64, got float16"):
        V.check_float_dtype(np.float16)
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        V.check_float_dtype("not a dtype")


def test_check_lower_bound_names_the_count_the_minimum_and_the_first_index():
    values = np.array([[1.0, np.nan], [-2.0, 0.0]])
    V.check_lower_bound(np.array([0.0, np.nan, 3.0]), "x")  # NaN and the bound itself pass
    with pytest.raises(ValueError, match=r"x has 1 negative value\(s\) \(minimum -2, first at "
                                         r"index \(1, 0\)\); do this"):
        V.check_lower_bound(values, "x", advice="do this")
    with pytest.raises(ValueError, match=r"x has 2 value\(s\) <= 0 \(minimum -2, first at "
                                         r"index \(1, 0\)\)$"):
        V.check_lower_bound(values, "x", strict=True, problem="value(s) <= 0")
