"""Every fused kernel against its loop twin in tests/naive.py."""

import numpy as np
import pytest

import naive
from pkd.kernels import mse, normalized, softmax
from pkd.kernels import rows as row_kernels

DTYPES = [np.float32, np.float64]
TOL = {np.float32: 2e-6, np.float64: 1e-13}


def _data(dtype, n=23, d=7, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.standard_normal((n, d)).astype(dtype)
    teacher = rng.standard_normal((n, d)).astype(dtype)
    rows = np.sort(rng.choice(n, size=n // 2 + 1, replace=False)).astype(np.int64)
    return y, teacher, rows


@pytest.mark.parametrize("dtype", DTYPES)
def test_mse_compact_matches_twin(dtype):
    y, teacher, rows = _data(dtype)
    y = y[: len(rows)].copy()
    scale = dtype(0.37)
    expected_grad, expected_loss = naive.mse_compact(y, teacher, rows, scale)
    row_loss = np.empty(len(rows))
    mse.mse_compact(y, teacher, rows, scale, row_loss)
    np.testing.assert_allclose(row_loss, expected_loss, rtol=TOL[dtype])
    np.testing.assert_array_equal(y, expected_grad)  # same float ops, same rounding
    assert y.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("accumulate", [False, True])
def test_mse_direct_matches_twin(dtype, accumulate):
    student, teacher, rows = _data(dtype, seed=1)
    scale = dtype(0.5)
    expected_grad, expected_loss = naive.mse_direct(student, teacher, rows, scale)
    out = np.full_like(student, 2.0) if accumulate else np.zeros_like(student)
    row_loss = np.empty(len(rows))
    mse.mse_direct(student, teacher, rows, scale, out, accumulate, row_loss)
    base = 2.0 if accumulate else 0.0
    np.testing.assert_allclose(out[rows], base + expected_grad[rows], rtol=TOL[dtype])
    untouched = np.setdiff1d(np.arange(len(student)), rows)
    np.testing.assert_array_equal(out[untouched], base)
    np.testing.assert_allclose(row_loss, expected_loss, rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_normalized_compact_matches_twin(dtype):
    y, teacher, rows = _data(dtype, seed=2)
    y = y[: len(rows)].copy()
    y[1] = 0.0  # a zero row takes the ‖y‖ ≤ ε branch
    y[3] *= 1e-13 / np.linalg.norm(y[3])  # so does a tiny one, where u = y/ε is not 0
    teacher[rows[2]] = 0.0  # a zero teacher row
    expected = [naive.normalized_row(y[i], teacher[rows[i]], 0.25) for i in range(len(rows))]
    row_loss = np.empty(len(rows))
    normalized.normalized_compact(y, teacher, rows, 0.25, row_loss)
    np.testing.assert_allclose(row_loss, [e[0] for e in expected], rtol=TOL[dtype])
    np.testing.assert_allclose(y, np.array([e[1] for e in expected]), rtol=TOL[dtype] * 10,
                               atol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("accumulate", [False, True])
def test_normalized_direct_matches_twin(dtype, accumulate):
    student, teacher, rows = _data(dtype, seed=3)
    out = np.ones_like(student)
    row_loss = np.empty(len(rows))
    normalized.normalized_direct(student, teacher, rows, 2.0, out, accumulate, row_loss)
    for k, i in enumerate(rows):
        loss, grad = naive.normalized_row(student[i], teacher[i], 2.0)
        assert row_loss[k] == pytest.approx(loss, rel=TOL[dtype])
        np.testing.assert_allclose(out[i], grad + (1.0 if accumulate else 0.0),
                                   rtol=TOL[dtype] * 10, atol=TOL[dtype])
    untouched = np.setdiff1d(np.arange(len(student)), rows)
    np.testing.assert_array_equal(out[untouched], 1.0)  # rows not selected are not written


def test_parallel_twin_has_its_own_cache_entry():
    # Numba's on-disk cache keys an entry by the function's name, line and bytecode, not by
    # parallel=True: twins compiled from one function object would share one entry.
    serial, parallel = softmax.logit_loss_grad_serial, softmax.logit_loss_grad_parallel
    assert parallel.targetoptions.get("parallel") and not serial.targetoptions.get("parallel")
    assert serial.py_func.__qualname__ != parallel.py_func.__qualname__
    assert serial.py_func.__code__ is parallel.py_func.__code__  # the same source


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("which", ["some", "first and last", "one", "all"])
def test_scatter_rows_matches_twin(dtype, accumulate, which):
    values, _, rows = _data(dtype, n=29, d=5, seed=6)
    rows = {"some": rows, "first and last": np.array([0, 28]), "one": np.array([13]),
            "all": np.arange(29)}[which].astype(np.int64)
    values = values[: len(rows)].copy()
    out = np.random.default_rng(7).standard_normal((29, 5)).astype(dtype)  # stale values
    expected = naive.scatter_rows(values, rows, out, accumulate)
    row_kernels.scatter_rows(values, rows, out, accumulate)
    np.testing.assert_array_equal(out, expected)  # copies and one add per element: exact
    assert out.dtype == dtype
