from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import naive
from pkd.mapping import (
    MAPPINGS,
    last,
    optimal,
    parse_mapping,
    skip,
    to_hidden_states_indices,
    uniform,
)

# --------------------------------------------------------------- fixed schemes


def test_exact_values_from_design():
    # uniform(4, 12) is the reference implementation's default mapping.
    assert uniform(4, 12) == [(0, 2), (1, 5), (2, 8), (3, 11)]
    assert skip(6, 12) == [(0, 1), (1, 3), (2, 5), (3, 7), (4, 9)]
    assert last(6, 12) == [(0, 6), (1, 7), (2, 8), (3, 9), (4, 10)]


def test_more_exact_values():
    assert uniform(3, 12) == [(0, 3), (1, 7), (2, 11)]
    assert uniform(1, 12) == [(0, 11)]
    assert uniform(5, 12) == [(0, 1), (1, 3), (2, 6), (3, 8), (4, 11)]
    assert skip(4, 12) == [(0, 2), (1, 5), (2, 8)]
    assert last(4, 12) == [(0, 8), (1, 9), (2, 10)]
    assert skip(2, 2) == [(0, 0)]
    assert last(2, 2) == [(0, 0)]
    assert uniform(7, 7) == [(m, m) for m in range(7)]


def test_results_are_plain_ints():
    for scheme in (uniform, skip, last):
        for s, t in scheme(6, 24):
            assert type(s) is int and type(t) is int


counts = st.integers(1, 48).flatmap(lambda n_t: st.tuples(st.integers(1, n_t), st.just(n_t)))


def _check_valid(mapping, n_students, n_t):
    assert [s for s, _ in mapping] == list(range(n_students))
    teachers = [t for _, t in mapping]
    assert all(0 <= t < n_t for t in teachers)
    assert all(a < b for a, b in zip(teachers, teachers[1:], strict=False))


@settings(max_examples=40, deadline=None)
@given(counts)
def test_uniform_properties(sizes):
    n_s, n_t = sizes
    mapping = uniform(n_s, n_t)
    _check_valid(mapping, n_s, n_t)
    assert mapping[-1] == (n_s - 1, n_t - 1)
    # Witness: the formula with exact rationals.
    assert mapping == [(m, math.floor(Fraction((m + 1) * n_t, n_s)) - 1) for m in range(n_s)]
    # Evenly spread: consecutive gaps differ by at most one layer.
    gaps = np.diff([-1] + [t for _, t in mapping])
    assert gaps.max() - gaps.min() <= 1


@settings(max_examples=40, deadline=None)
@given(counts.filter(lambda c: c[0] >= 2))
def test_skip_and_last_properties(sizes):
    n_s, n_t = sizes
    sk, la = skip(n_s, n_t), last(n_s, n_t)
    _check_valid(sk, n_s - 1, n_t)
    _check_valid(la, n_s - 1, n_t)
    assert sk == uniform(n_s, n_t)[:-1]
    # PKD-Last uses the n_s - 1 teacher layers just below the teacher's last one.
    assert [t for _, t in la] == list(range(n_t - n_s, n_t - 1))


@pytest.mark.parametrize("scheme", [uniform, skip, last])
def test_more_students_than_teachers(scheme):
    with pytest.raises(ValueError, match=r"n_s=5 student and n_t=4 teacher"):
        scheme(5, 4)


@pytest.mark.parametrize("scheme", [uniform, skip, last])
@pytest.mark.parametrize(
    ("n_s", "n_t", "error", "match"),
    [
        (0, 12, ValueError, "n_s"),
        (-2, 12, ValueError, "n_s"),
        (4, 0, ValueError, "n_t"),
        (4.0, 12, TypeError, "n_s"),
        (True, 12, TypeError, "n_s"),
        ("4", 12, TypeError, "n_s"),
        (4, None, TypeError, "n_t"),
    ],
)
def test_bad_counts(scheme, n_s, n_t, error, match):
    with pytest.raises(error, match=match):
        scheme(n_s, n_t)


@pytest.mark.parametrize("scheme", [skip, last])
def test_skip_last_need_two_student_layers(scheme):
    with pytest.raises(ValueError, match=r"logit loss.*n_s must be >= 2"):
        scheme(1, 12)


def test_numpy_int_counts_accepted():
    assert uniform(np.int64(4), np.int32(12)) == [(0, 2), (1, 5), (2, 8), (3, 11)]


# --------------------------------------------------------------------- optimal


def _total(cost, mapping):
    return sum(cost[s, t] for s, t in mapping)


def test_optimal_simple_known_answer():
    # Cost |t - 2s - 1| is zero exactly on the mapping s -> 2s + 1.
    cost = np.abs(np.arange(8)[None, :] - 2 * np.arange(4)[:, None] - 1).astype(float)
    assert optimal(cost) == [(0, 1), (1, 3), (2, 5), (3, 7)]


def test_optimal_respects_strict_order():
    # Every row prefers teacher 0; only one row may have it.
    cost = np.array([[0.0, 5.0, 9.0], [0.0, 1.0, 9.0]])
    assert optimal(cost) == [(0, 0), (1, 1)]
    cost = np.array([[0.0, 5.0, 9.0], [0.0, 9.0, 1.0]])
    assert optimal(cost) == [(0, 0), (1, 2)]


def test_optimal_ties_go_to_earliest_teachers():
    assert optimal(np.zeros((3, 6))) == [(0, 0), (1, 1), (2, 2)]
    # (0,2), (0,3), (1,2), (1,3) all cost 0: the lexicographically smallest wins.
    cost = np.array([[0.0, 0.0, 9.0, 9.0], [9.0, 9.0, 0.0, 0.0]])
    assert optimal(cost) == [(0, 0), (1, 2)]
    # (0,1,4) and (0,3,4) tie at 1: the earliest second teacher wins.
    cost = np.array([[0.0, 5.0, 5.0, 5.0, 5.0], [5.0, 1.0, 5.0, 1.0, 5.0], [5.0] * 4 + [0.0]])
    assert optimal(cost) == [(0, 0), (1, 1), (2, 4)]


def test_optimal_square_is_diagonal():
    rng = np.random.default_rng(0)
    cost = rng.random((5, 5))
    assert optimal(cost) == [(m, m) for m in range(5)]


def test_optimal_inf_forbids_pairs():
    cost = np.zeros((2, 4))
    cost[0, :2] = np.inf
    assert optimal(cost) == [(0, 2), (1, 3)]


def test_optimal_all_forbidden_raises():
    cost = np.zeros((2, 4))
    cost[1, 1:] = np.inf
    with pytest.raises(ValueError, match=r"no feasible mapping.*\+inf"):
        optimal(cost)  # row 1 may only use teacher 0, leaving nothing for row 0
    with pytest.raises(ValueError, match="no feasible mapping"):
        optimal(np.full((3, 3), np.inf))


def test_optimal_says_when_finite_costs_overflow():
    inf = np.inf
    for cost in (np.full((2, 2), 1e308), [[1e308, 1e308, inf], [1e308, 1e308, 1e308]],
                 [[-1e308, -1e308, inf], [-1e308, -1e308, -1e308]]):
        with pytest.raises(ValueError, match="overflows float64 when summed .* rescale it"):
            optimal(cost)
    assert optimal(np.full((2, 2), 1e308) / 1e308) == [(0, 0), (1, 1)]


def test_optimal_student_layers_subset_and_unused_nan():
    cost = np.full((4, 6), np.nan)
    cost[1] = [5, 0, 5, 5, 5, 5]
    cost[3] = [5, 5, 5, 5, 0, 5]
    assert optimal(cost, student_layers=[1, 3]) == [(1, 1), (3, 4)]
    assert optimal(cost, student_layers=np.array([1, 3])) == [(1, 1), (3, 4)]


def test_optimal_float32_and_plain_int_output():
    cost = np.random.default_rng(1).random((3, 5)).astype(np.float32)
    result = optimal(cost)
    assert result == optimal(cost.astype(np.float64))
    assert all(type(s) is int and type(t) is int for s, t in result)


def _cost_matrices(draw, integer: bool):
    n_t = draw(st.integers(1, 7))
    n_s = draw(st.integers(1, 4))
    if integer:
        # Few distinct integer values: many exact ties, and exact sums in any order.
        values = st.sampled_from([0.0, 1.0, 2.0, 3.0, np.inf])
    else:
        values = st.one_of(
            st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False),
            st.just(np.inf),
        )
    cost = np.array(
        [[draw(values) for _ in range(n_t)] for _ in range(n_s)], dtype=np.float64
    ).reshape(n_s, n_t)
    subset = draw(st.booleans())
    rows = None
    if subset:
        chosen = draw(st.sets(st.integers(0, n_s - 1), min_size=1, max_size=n_s))
        rows = sorted(chosen)
    return cost, rows


@st.composite
def integer_costs(draw):
    return _cost_matrices(draw, integer=True)


@st.composite
def float_costs(draw):
    return _cost_matrices(draw, integer=False)


def _compare_with_brute_force(cost, rows, exact: bool):
    k = cost.shape[0] if rows is None else len(rows)
    expected, expected_total = naive.optimal_mapping(cost, rows)
    if k > cost.shape[1]:
        with pytest.raises(ValueError, match="teacher layer"):
            optimal(cost, rows)
        return
    if expected is None:
        with pytest.raises(ValueError, match="no feasible mapping"):
            optimal(cost, rows)
        return
    got = optimal(cost, rows)
    assert [s for s, _ in got] == (list(range(cost.shape[0])) if rows is None else rows)
    teachers = [t for _, t in got]
    assert all(a < b for a, b in zip(teachers, teachers[1:], strict=False))
    if exact:
        assert got == expected
    else:
        assert _total(cost, got) == pytest.approx(expected_total, rel=1e-12, abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(integer_costs())
def test_optimal_matches_brute_force_with_ties(case):
    _compare_with_brute_force(*case, exact=True)


@settings(max_examples=40, deadline=None)
@given(float_costs())
def test_optimal_matches_brute_force_random(case):
    _compare_with_brute_force(*case, exact=False)


def test_optimal_large_beats_fixed_schemes():
    # Too big for brute force: the optimum is no worse than any feasible mapping.
    rng = np.random.default_rng(2)
    cost = rng.random((24, 48))
    best = _total(cost, optimal(cost))
    assert best <= _total(cost, uniform(24, 48)) + 1e-12
    for _ in range(50):
        teachers = np.sort(rng.choice(48, size=24, replace=False))
        assert best <= _total(cost, list(enumerate(teachers))) + 1e-12


@pytest.mark.parametrize(
    ("cost", "error", "match"),
    [
        (np.zeros(5), ValueError, "2-D"),
        (np.zeros((2, 3, 4)), ValueError, "2-D"),
        (np.zeros((0, 4)), ValueError, "empty"),
        (np.zeros((3, 0)), ValueError, "empty"),
        (np.zeros((3, 4), dtype=np.int64), TypeError, "float32 or float64"),
        (np.zeros((3, 4), dtype=bool), TypeError, "float32 or float64"),
        ("cost", TypeError, "float array"),
        (None, TypeError, "float array"),
        (np.zeros((5, 4)), ValueError, r"5 student layer\(s\) to map onto only 4"),
    ],
)
def test_optimal_bad_cost(cost, error, match):
    with pytest.raises(error, match=match):
        optimal(cost)


def test_optimal_nan_in_used_row():
    cost = np.zeros((3, 4))
    cost[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"NaN/-inf.*first at \(1, 2\)"):
        optimal(cost)
    with pytest.raises(ValueError, match=r"first at \(1, 2\)"):
        optimal(cost, student_layers=[1, 2])
    assert optimal(cost, student_layers=[0, 2]) == [(0, 0), (2, 1)]


def test_optimal_minus_inf_refused():
    cost = np.zeros((2, 4))
    cost[0, 3] = -np.inf
    with pytest.raises(ValueError, match=r"NaN/-inf.*first at \(0, 3\)"):
        optimal(cost)


@pytest.mark.parametrize(
    ("rows", "error", "match"),
    [
        ([], ValueError, "empty"),
        ([1, 1], ValueError, "strictly increasing"),
        ([2, 0], ValueError, "strictly increasing"),
        ([0, 4], ValueError, "out of range"),
        ([-1, 2], ValueError, ">= 0"),
        ([0.0, 1.0], TypeError, "int"),
        ([True, 2], TypeError, "int"),
        ("01", TypeError, "sequence"),
        (3, TypeError, "sequence"),
        (np.array([[0, 1]]), ValueError, "1-D"),
    ],
)
def test_optimal_bad_student_layers(rows, error, match):
    with pytest.raises(error, match=match):
        optimal(np.zeros((4, 6)), student_layers=rows)


def test_optimal_too_many_student_layers_for_teachers():
    with pytest.raises(ValueError, match=r"3 student layer\(s\) to map onto only 2"):
        optimal(np.zeros((4, 2)), student_layers=[0, 1, 3])


# ------------------------------------------------------------- hidden_states


def test_to_hidden_states_indices():
    assert to_hidden_states_indices(uniform(4, 12)) == [(1, 3), (2, 6), (3, 9), (4, 12)]
    assert to_hidden_states_indices([(0, 2)], student_offset=0) == [(0, 3)]
    assert to_hidden_states_indices(
        [(1, 3), (2, 6)], student_offset=-1, teacher_offset=-1
    ) == [(0, 2), (1, 5)]
    assert to_hidden_states_indices(np.array([[0, 1]])) == [(1, 2)]


def test_to_hidden_states_indices_bad_input():
    with pytest.raises(ValueError, match=r"negative index pair \(-1, 1\)"):
        to_hidden_states_indices([(0, 2)], student_offset=-1, teacher_offset=-1)
    with pytest.raises(TypeError, match="student_offset"):
        to_hidden_states_indices([(0, 2)], student_offset=1.0)
    with pytest.raises(TypeError, match="teacher_offset"):
        to_hidden_states_indices([(0, 2)], teacher_offset=True)
    with pytest.raises(ValueError, match="empty"):
        to_hidden_states_indices([])
    with pytest.raises(TypeError, match="layer_mapping"):
        to_hidden_states_indices("0:2")
    with pytest.raises(ValueError, match="negative indices do not wrap"):
        to_hidden_states_indices([(-1, 2)])


# --------------------------------------------------------------- parse_mapping


def test_mappings_registry():
    assert set(MAPPINGS) == {"uniform", "skip", "last"}
    assert MAPPINGS["skip"] is skip


@pytest.mark.parametrize("name", ["uniform", "skip", "last"])
def test_parse_named(name):
    assert parse_mapping(name, 6, 12) == MAPPINGS[name](6, 12)
    assert parse_mapping(f"  {name.upper()} ", 6, 12) == MAPPINGS[name](6, 12)


def test_parse_explicit():
    assert parse_mapping("0:2,1:5", 4, 12) == [(0, 2), (1, 5)]
    assert parse_mapping(" 0 : 2 , 3:11 ", 4, 12) == [(0, 2), (3, 11)]


def test_parse_optimal_explains():
    with pytest.raises(ValueError, match=r"optimal.*needs a cost matrix"):
        parse_mapping("optimal", 4, 12)


@pytest.mark.parametrize(
    ("text", "error", "match"),
    [
        ("tinybert", ValueError, r"unknown mapping.*'uniform'"),
        ("", ValueError, "unknown mapping"),
        ("0:2,", ValueError, r"cannot read ''"),
        ("0:2,1-5", ValueError, r"cannot read '1-5'"),
        ("0:2:3", ValueError, "cannot read"),
        ("a:b", ValueError, "cannot read 'a:b'"),
        ("0:1.5", ValueError, "cannot read"),
        ("0:12", ValueError, r"\(0, 12\).*teacher layers 0..11"),
        ("4:1", ValueError, r"\(4, 1\).*student layers are 0..3"),
        ("-1:2", ValueError, "out of range"),
        (None, TypeError, "str"),
        ([(0, 2)], TypeError, "str"),
    ],
)
def test_parse_bad(text, error, match):
    with pytest.raises(error, match=match):
        parse_mapping(text, 4, 12)


def test_parse_bad_counts():
    with pytest.raises(ValueError, match="n_s"):
        parse_mapping("0:1", 0, 12)
    with pytest.raises(ValueError, match="n_s=5 student and n_t=4"):
        parse_mapping("uniform", 5, 4)


def test_optimal_maximize_picks_the_greatest_similarity():
    rng = np.random.default_rng(60)
    similarity = rng.random((3, 7))
    assert optimal(similarity, maximize=True) == optimal(-similarity)
    assert optimal(1.0 - similarity, maximize=False) == optimal(similarity, maximize=True)
    # brute force over every strictly increasing mapping
    import itertools

    best = max(itertools.combinations(range(7), 3),
               key=lambda ts: sum(similarity[i, t] for i, t in enumerate(ts)))
    assert optimal(similarity, maximize=True) == list(enumerate(best))
    forbidden = similarity.copy()
    forbidden[:, 0] = -np.inf  # -inf forbids a pair of a similarity
    assert all(t != 0 for _, t in optimal(forbidden, maximize=True))
    with pytest.raises(ValueError, match=r"similarity matrix has 3 NaN/\+inf.*constant layer"):
        optimal(np.where(np.eye(3, 7) > 0, np.nan, similarity), maximize=True)
    with pytest.raises(ValueError, match=r"cost has 3 NaN/-inf.*constant layer"):
        optimal(np.where(np.eye(3, 7) > 0, np.nan, similarity))
    with pytest.raises(TypeError, match="maximize"):
        optimal(similarity, maximize="yes")
