"""Tests of pkd.alignment.AlignmentStats and its kernel pkd.kernels.gram.

Witnesses: tests/reference.py (float64 NumPy formulas on the rows),
scipy.linalg.lstsq / numpy.linalg.lstsq for the closed form, tests/naive.py
for the kernel.
"""

from __future__ import annotations

import os
import tracemalloc

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st

import naive
import pkd
import reference
from pkd import _estimates
from pkd.alignment import AlignmentStats
from pkd.closed_form import Solver
from pkd.kernels import gram as gram_kernels
from pkd.kernels.gram import fill_shifted_transposed


def make_layers(rng, n, student_widths, teacher_widths, *, dtype=np.float64, mean=0.0,
                spread=1.0, rank=3):
    """Student and teacher layers that share a low-rank signal (so fits are non-trivial)."""
    latent = rng.standard_normal((n, rank))

    def layer(d):
        x = latent @ rng.standard_normal((rank, d)) + 0.5 * rng.standard_normal((n, d))
        return (mean + spread * x).astype(dtype)

    return [layer(d) for d in student_widths], [layer(d) for d in teacher_widths]


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300)


def selected(layers, mask):
    return [x.reshape(-1, x.shape[-1])[np.asarray(mask, bool).ravel()] for x in layers]


# ------------------------------------------------------------------ kernel


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fill_kernel_matches_naive_twin(dtype):
    rng = np.random.default_rng(1)
    values = (rng.standard_normal((40, 7)) * 10 + 3).astype(dtype)
    rows = np.array([0, 3, 4, 10, 39, 17], dtype=np.int64)  # any order
    shift = rng.standard_normal(7)
    big = np.zeros((11, 6))  # the kernel writes a row block of a bigger buffer
    out, expected_out = big[2:9], np.zeros((7, 6))
    sums = rng.standard_normal(7)
    expected_sums = sums.copy()
    squares_of_columns = np.full((6, 3), 5.0, order="F")  # stale values are overwritten
    squares, expected_squares = squares_of_columns[:, 1], np.empty(6)
    fill_shifted_transposed(values, rows, shift, out, sums, squares)
    naive.fill_shifted_transposed(values, rows, shift, expected_out, expected_sums,
                                  expected_squares)
    np.testing.assert_array_equal(out, expected_out)
    np.testing.assert_array_equal(sums, expected_sums)
    np.testing.assert_allclose(squares, expected_squares, rtol=1e-14)
    assert np.all(squares_of_columns[:, [0, 2]] == 5.0)
    assert np.all(big[:2] == 0) and np.all(big[9:] == 0)


@pytest.mark.parametrize("twin", ["serial", "parallel"])
def test_centring_kernels_of_the_cka_query_match_their_twins(twin):
    rng = np.random.default_rng(4)
    upper = np.asfortranarray(rng.standard_normal((9, 9)))
    upper[np.tril_indices(9, -1)] = np.nan  # dsyrk leaves the lower triangle: never read
    sums = rng.standard_normal(9) * 5
    assert gram_kernels.centred_gram_square_norm(upper, sums, 7.0) == pytest.approx(
        naive.centred_gram_square_norm(upper, sums, 7.0), rel=1e-13)
    cross = rng.standard_normal((5, 11))
    student_sums, centre = rng.standard_normal(5), rng.standard_normal(11)
    offsets = np.array([0, 4, 4, 11], dtype=np.int64)  # an empty layer too
    out, expected = np.empty((5, 3)), np.empty((5, 3))
    getattr(gram_kernels, f"centred_cross_row_squares_{twin}")(cross, student_sums, centre,
                                                                offsets, out)
    naive.centred_cross_row_squares(cross, student_sums, centre, offsets, expected)
    np.testing.assert_allclose(out, expected, rtol=1e-13)
    assert np.all(out[:, 1] == 0)


def test_triangular_basis_gives_the_products_of_the_rotated_basis():
    """The lower-trapezoidal basis is G-orthonormal, and its triangular product is Bᵀ C."""
    rng = np.random.default_rng(5)
    student, teacher = make_layers(rng, 300, [12], [7, 5])
    student[0] += 4.0  # a mean: the shifted form's rank-2 update matters
    student[0][:, 3] = 2 * student[0][:, 0] - student[0][:, 5]  # rank 11 of 12
    student[0][:, 8] = 1e-30  # a dead column: rank 10
    stats = AlignmentStats.from_arrays(student, teacher, chunk_rows=64)
    moments = stats._total()
    gram = moments.gram_of("student", 0, False)
    solver = Solver(gram, 0.0, 1e-6)
    assert solver.rank == 10
    np.testing.assert_array_equal(solver.upper, np.triu(solver.upper))
    np.testing.assert_allclose(solver.basis.T @ gram @ solver.basis, np.eye(10), atol=1e-9)
    cross = student[0].T @ np.hstack(teacher)  # C_s· from the rows
    np.testing.assert_allclose(_estimates.basis_times_cross(moments, solver, 0),
                               solver.basis.T @ cross, rtol=1e-10,
                               atol=1e-10 * np.abs(solver.basis.T @ cross).max())

    np.testing.assert_allclose(_estimates.basis_gram(gram, solver),
                               solver.basis.T @ gram @ solver.basis, atol=1e-12)


def test_cholesky_shortcut_is_the_eigendecomposition_where_nothing_can_be_cut(monkeypatch):
    """Full rank, no cut possible: the Cholesky factor gives the same numbers as the
    eigendecomposition; wherever a rule could cut, the shortcut declines."""
    from pkd import closed_form

    def shortcut(gram, cutoff):
        return closed_form._certain_full_rank_factor(gram, cutoff,
                                                     closed_form._largest_eigenvalue(gram))

    rng = np.random.default_rng(8)
    X = rng.standard_normal((500, 6)) @ rng.standard_normal((6, 6)) + 3.0
    T = [X @ rng.standard_normal((6, 4)) + rng.standard_normal((500, 4)) for _ in range(2)]
    factor = shortcut(X.T @ X, 1e-6)
    assert factor is not None and factor.flags.f_contiguous
    np.testing.assert_array_equal(factor, np.triu(factor))
    np.testing.assert_allclose(factor.T @ factor, np.linalg.inv(X.T @ X), rtol=1e-9)
    fast = AlignmentStats.from_arrays([X], T, folds=3)
    values = (fast.min_mse(), fast.projection(0, 1), fast.min_mse(heldout=True).mean)
    monkeypatch.setattr(closed_form, "_certain_full_rank_factor", lambda *args: None)
    slow = AlignmentStats.from_arrays([X], T, folds=3)
    expected = (slow.min_mse(), slow.projection(0, 1), slow.min_mse(heldout=True).mean)
    for got, want in zip(values, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-11)
    monkeypatch.undo()
    declined = {
        "dead column": np.column_stack([X, np.full(500, 1e-30)]),
        "rank deficient": np.column_stack([X, X[:, 0] - 2 * X[:, 1]]),
        "below the float32 cut": X * np.r_[np.ones(5), 1e-8],
    }
    for name, S in declined.items():
        assert shortcut(S.T @ S, 1e-6) is None, name
    # The float64 cut keeps the column at 1e-8: no direction is near it.
    S = declined["below the float32 cut"]
    assert shortcut(S.T @ S, 2e-15) is not None


@pytest.mark.parametrize("upper", [True, False])
@pytest.mark.parametrize("transpose", [True, False])
def test_trmm_right_is_scipys_dtrmm_without_the_gil(upper, transpose):
    from scipy.linalg import blas

    from pkd._blas import trmm_right

    rng = np.random.default_rng(6)
    a, b = np.asfortranarray(rng.standard_normal((6, 6))), np.asfortranarray(
        rng.standard_normal((9, 6)))
    expected = blas.dtrmm(1.0, a, b, side=1, lower=not upper, trans_a=transpose)
    triangle = np.triu(a) if upper else np.tril(a)  # the other triangle is not read
    np.testing.assert_allclose(expected, b @ (triangle.T if transpose else triangle),
                               rtol=1e-13)
    out = trmm_right(b, a, upper=upper, transpose=transpose)
    assert out is b
    np.testing.assert_array_equal(out, expected)
    with pytest.raises(ValueError, match="b must be a 2-D float64 array in column-major"):
        trmm_right(np.ascontiguousarray(b), a, upper=upper, transpose=transpose)
    with pytest.raises(ValueError, match=r"a must be \(6, 6\)"):
        trmm_right(b, np.asfortranarray(a[:5, :5]), upper=upper, transpose=transpose)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_gemm_and_syrk_are_scipys_on_column_slices_in_place(beta):
    """``gemm_tn``/``syrk_t`` equal scipy.linalg.blas's dgemm/dsyrk bit for bit, in place
    in a column slice of a wider matrix (its leading dimension), and touch nothing else."""
    from scipy.linalg import blas
    from threadpoolctl import threadpool_limits

    from pkd._blas import gemm_tn, syrk_t

    rng = np.random.default_rng(8)
    a = np.asfortranarray(rng.standard_normal((40, 11)))
    b_wide = np.asfortranarray(rng.standard_normal((40, 9)))
    c_wide = np.asfortranarray(rng.standard_normal((11, 9)))
    b, c = b_wide[:, 2:7], c_wide[:, 3:8]  # column slices: leading dimensions 40 and 11
    before = c_wide.copy()
    with threadpool_limits(1, user_api="blas"):
        expected = blas.dgemm(1.0, a, np.asfortranarray(b), beta=beta,
                              c=np.asfortranarray(c), trans_a=True)
        out = gemm_tn(a, b, c, beta)
    assert out is c
    np.testing.assert_array_equal(c, expected)
    np.testing.assert_allclose(c, a.T @ b + beta * before[:, 3:8], rtol=1e-13)
    np.testing.assert_array_equal(np.delete(c_wide, range(3, 8), axis=1),
                                  np.delete(before, range(3, 8), axis=1))
    rows, before = c_wide[1:10, 3:8], c_wide.copy()  # leading dimension 11, 9 rows
    gemm_tn(a[:, 1:10], b, rows, 0.0)
    np.testing.assert_allclose(rows, a[:, 1:10].T @ b, rtol=1e-13)
    np.testing.assert_array_equal(c_wide[[0, 10]], before[[0, 10]])

    gram_wide = np.asfortranarray(rng.standard_normal((5, 9)))
    gram, gram_before = gram_wide[:, 4:9], gram_wide.copy()
    with threadpool_limits(1, user_api="blas"):
        expected = blas.dsyrk(1.0, np.asfortranarray(b), beta=beta,
                              c=np.asfortranarray(gram), trans=1)
        syrk_t(b, gram, beta)
    upper = np.triu_indices(5)
    np.testing.assert_array_equal(gram[upper], expected[upper])
    np.testing.assert_allclose(gram[upper], (b.T @ b + beta * gram_before[:, 4:9])[upper],
                               rtol=1e-13)
    lower = np.tril_indices(5, -1)  # neither read nor written
    np.testing.assert_array_equal(gram[lower], gram_before[:, 4:9][lower])
    np.testing.assert_array_equal(gram_wide[:, :4], gram_before[:, :4])

    one_column = np.asfortranarray(b[:, :1])  # NumPy gives its columns a stride of 8 bytes
    column = gemm_tn(a, one_column, np.zeros((11, 1), order="F"), 0.0)
    np.testing.assert_allclose(column, a.T @ one_column, rtol=1e-13)
    with pytest.raises(ValueError, match="gemm_tn: a must be a 2-D float64 array in column-"):
        gemm_tn(np.ascontiguousarray(a), b, c, beta)
    with pytest.raises(ValueError, match="gemm_tn: b must be a 2-D float64 array in column-"):
        gemm_tn(a, b[::-1], c, beta)  # reversed rows
    with pytest.raises(ValueError, match=r"gemm_tn: shapes a \(40, 11\), b \(40, 4\)"):
        gemm_tn(a, b[:, :4], c, beta)
    with pytest.raises(ValueError, match="syrk_t: c must be a 2-D float64"):
        syrk_t(b, gram.astype(np.float32), beta)
    with pytest.raises(ValueError, match=r"syrk_t: c must be \(5, 5\)"):
        syrk_t(b, np.asfortranarray(gram[:4, :4]), beta)


@pytest.mark.parametrize("rank", [7, 4, 0])
def test_gram_factor_is_triangular_whatever_the_rank(rank):
    """``w = Rᵀ R`` with R upper triangular: Cholesky, or pivoted Cholesky and a QR."""
    rng = np.random.default_rng(7)
    root = rng.standard_normal((rank, 7)) * np.logspace(0, -4, 7)  # badly scaled columns
    w = root.T @ root
    factor = _estimates.gram_factor(w)
    assert factor.flags.f_contiguous and factor.shape == (7, 7)
    np.testing.assert_array_equal(factor, np.triu(factor))
    np.testing.assert_allclose(factor.T @ factor, w, rtol=0, atol=1e-14 * max(w.max(), 1.0))
    z = rng.standard_normal((7, 3))  # the quadratic forms the held-out query reads
    np.testing.assert_allclose(np.sum((factor @ z) ** 2, axis=0),
                               np.einsum("ij,ik,kj->j", z, w, z), rtol=1e-10, atol=1e-14)


# ------------------------------------------------------------------ statistics


@pytest.mark.parametrize("use_mask", [False, True])
def test_statistics_match_reference(use_mask):
    rng = np.random.default_rng(2)
    S, T = make_layers(rng, 300, (5, 3), (4, 6, 2), mean=2.0)
    S[1] = S[1].astype(np.float32)
    mask = (rng.random(300) < 0.6) if use_mask else None
    stats = AlignmentStats.from_arrays(S, T, mask, chunk_rows=64)
    w = None if mask is None else mask.astype(np.float64)
    ref = reference.reference_gram_stats(S, T, w)
    assert stats.n_rows == (300 if mask is None else int(mask.sum()))
    assert (stats.n_student, stats.n_teacher) == (2, 3)
    assert stats.student_widths == (5, 3) and stats.teacher_widths == (4, 6, 2)
    for s in range(2):
        assert rel_err(stats.student_gram(s), ref["G"][s]) < 1e-13
        assert rel_err(stats.student_sum(s), ref["a"][s]) < 1e-13
        for t in range(3):
            assert rel_err(stats.cross_gram(s, t), ref["C"][s][t]) < 1e-13
    for t in range(3):
        assert rel_err(stats.teacher_gram(t), ref["H"][t]) < 1e-13
        assert rel_err(stats.teacher_sum(t), ref["b"][t]) < 1e-13
        assert abs(stats.teacher_sq_norm(t) - ref["q"][t]) < 1e-13 * ref["q"][t]
    # Centred forms Ĝ = G − a aᵀ/n_w etc.
    n_w = ref["n_w"]
    for s in range(2):
        G_hat = ref["G"][s] - np.outer(ref["a"][s], ref["a"][s]) / n_w
        assert rel_err(stats.student_gram(s, centered=True), G_hat) < 1e-12
        for t in range(3):
            C_hat = ref["C"][s][t] - np.outer(ref["a"][s], ref["b"][t]) / n_w
            assert rel_err(stats.cross_gram(s, t, centered=True), C_hat) < 1e-12
    H_hat = ref["H"][1] - np.outer(ref["b"][1], ref["b"][1]) / n_w
    assert rel_err(stats.teacher_gram(1, centered=True), H_hat) < 1e-12


# ------------------------------------------------------------------ closed form


@pytest.mark.parametrize("use_mask", [False, True])
def test_min_mse_and_projection_match_scipy_lstsq(use_mask):
    rng = np.random.default_rng(3)
    S, T = make_layers(rng, 400, (6, 12), (9, 4, 12), mean=0.5)
    mask = (rng.random(400) < 0.7) if use_mask else np.ones(400, bool)
    stats = AlignmentStats.from_arrays(S, T, mask if use_mask else None, chunk_rows=50)
    mse = stats.min_mse()
    assert mse.shape == (2, 3)
    for s, x in enumerate(selected(S, mask)):
        for t, y in enumerate(selected(T, mask)):
            P_ref = scipy.linalg.lstsq(x, y)[0]
            mse_ref = np.mean((x @ P_ref - y) ** 2)
            assert abs(mse[s, t] - mse_ref) < 1e-10 * mse_ref
            assert rel_err(stats.projection(s, t), P_ref) < 1e-9


def test_rank_deficient_duplicate_and_zero_columns_give_min_norm_solution():
    rng = np.random.default_rng(4)
    base = rng.standard_normal((200, 4))
    # Duplicate, scaled-duplicate, sum of two and an all-zero column: rank 4 of 8.
    S = np.column_stack([base, base[:, 0], 3 * base[:, 1], base[:, 2] + base[:, 3],
                         np.zeros(200)])
    T = base @ rng.standard_normal((4, 5)) + 0.3 * rng.standard_normal((200, 5))
    stats = AlignmentStats.from_arrays([S], [T])
    mse_ref, P_ref = reference.reference_min_mse(S, T)
    assert abs(stats.min_mse()[0, 0] - mse_ref) < 1e-10 * mse_ref
    P = stats.projection(0, 0)
    assert rel_err(P, P_ref) < 1e-8  # numpy's lstsq returns the minimum-norm solution
    assert abs(stats.pair_loss(0, 0, P) - mse_ref) < 1e-10 * mse_ref
    # A plain solve of G P = C cannot even be attempted: G is singular.
    G = stats.student_gram(0)
    assert np.linalg.matrix_rank(G) == 4


def test_rank_deficient_hyperplane_layernorm_rows():
    rng = np.random.default_rng(5)
    raw = rng.standard_normal((300, 10)) @ rng.standard_normal((10, 10))
    S = raw - raw.mean(axis=1, keepdims=True)  # rows sum to 0: LayerNorm's hyperplane
    T = raw[:, :6] @ rng.standard_normal((6, 7)) + 0.1 * rng.standard_normal((300, 7))
    stats = AlignmentStats.from_arrays([S], [T], chunk_rows=64)
    mse_ref, P_ref = reference.reference_min_mse(S, T)
    assert abs(stats.min_mse()[0, 0] - mse_ref) < 1e-9 * mse_ref
    P = stats.projection(0, 0)
    assert rel_err(P, P_ref) < 1e-7
    assert np.abs(P.sum(axis=0)).max() < 1e-8 * np.abs(P).max()  # no weight along 1/√d
    # Rows on an affine hyperplane (sum = 5): centred data is rank-deficient; CKA still fine.
    S5 = S + 0.5
    stats5 = AlignmentStats.from_arrays([S5], [T], chunk_rows=64)
    assert abs(stats5.cka()[0, 0] - reference.reference_cka(S5, T)) < 1e-12
    mse5, _ = reference.reference_min_mse(S5, T)
    assert abs(stats5.min_mse()[0, 0] - mse5) < 1e-9 * mse5


def test_float32_rounding_directions_are_cut():
    # docs/numerics.md: float32 LayerNorm outputs have one direction at float32 rounding level;
    # a solve that keeps it fits noise with enormous weights.
    rng = np.random.default_rng(6)
    raw = rng.standard_normal((2000, 16))
    S = (raw - raw.mean(axis=1, keepdims=True)).astype(np.float32)
    T = (raw[:, :8] @ rng.standard_normal((8, 6))
         + 0.5 * rng.standard_normal((2000, 6))).astype(np.float32)
    S64, T64 = S.astype(np.float64), T.astype(np.float64)
    sigma = np.linalg.svd(S64, compute_uv=False)
    assert sigma[-1] / sigma[0] < 1e-7  # the rounding direction is really there
    P_noise = np.linalg.lstsq(S64, T64, rcond=None)[0]  # keeps it
    P_signal = np.linalg.lstsq(S64, T64, rcond=1e-6)[0]  # cut at float32 precision
    assert np.abs(P_noise).max() > 1e3
    stats = AlignmentStats.from_arrays([S], [T])
    P = stats.projection(0, 0)
    assert np.abs(P).max() < 10
    assert rel_err(P, P_signal) < 1e-5
    mse_signal = np.mean((S64 @ P_signal - T64) ** 2)
    assert abs(stats.min_mse()[0, 0] - mse_signal) < 1e-8 * mse_signal


def test_badly_scaled_columns_are_kept():
    rng = np.random.default_rng(7)
    scales = np.array([1e-3, 1e3, 1.0, 1e-3, 1e3, 10.0])
    X = rng.standard_normal((500, 6))
    S = X * scales
    T = X @ rng.standard_normal((6, 4)) + 0.01 * rng.standard_normal((500, 4))
    stats = AlignmentStats.from_arrays([S], [T], chunk_rows=128)
    # Unscaled, G's smallest eigenvalue is below the 1e-12 cutoff: only the Jacobi
    # scaling keeps the 1e-3 columns, which carry most of T here.
    eigenvalues = np.linalg.eigvalsh(stats.student_gram(0))
    assert eigenvalues[0] < 1e-12 * eigenvalues[-1]
    mse_ref, P_ref = reference.reference_min_mse(S, T)
    assert abs(stats.min_mse()[0, 0] - mse_ref) < 1e-8 * mse_ref
    P = stats.projection(0, 0)
    P_scipy = scipy.linalg.lstsq(S, T)[0]
    for row in range(6):  # each row of P has its own scale (1/column scale)
        assert rel_err(P[row], P_ref[row]) < 1e-7
        assert rel_err(P[row], P_scipy[row]) < 1e-7


@pytest.mark.parametrize("ridge", [1e-3, 0.7, 50.0])
def test_ridge_matches_closed_form(ridge):
    rng = np.random.default_rng(8)
    S, T = make_layers(rng, 250, (7,), (5, 3), mean=1.0)
    mask = rng.random(250) < 0.8
    stats = AlignmentStats.from_arrays(S, T, mask, chunk_rows=40)
    ref = reference.reference_gram_stats(selected(S, mask), selected(T, mask))
    mse = stats.min_mse(ridge)
    for t in range(2):
        P_ref = np.linalg.solve(ref["G"][0] + ridge * np.eye(7), ref["C"][0][t])
        assert rel_err(stats.projection(0, t, ridge), P_ref) < 1e-10
        direct = reference.projected_mse(selected(S, mask)[0], selected(T, mask)[t], P_ref)[0]
        assert abs(mse[0, t] - direct) < 1e-10 * direct
    assert np.all(mse >= stats.min_mse() * (1 - 1e-12))  # ridge never beats the optimum


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mean", [0.0, 100.0])
def test_pair_loss_matches_direct_computation(dtype, mean):
    rng = np.random.default_rng(9)
    S, T = make_layers(rng, 300, (6,), (8,), dtype=dtype, mean=mean)
    mask = rng.random(300) < 0.5
    stats = AlignmentStats.from_arrays(S, T, mask, chunk_rows=70)
    bound = np.sqrt(6.0 / (6 + 8))
    P = rng.uniform(-bound, bound, (6, 8)).astype(dtype)  # a Xavier init
    expected = reference.projected_mse(S[0], T[0], P, mask.astype(np.float64))[0]
    assert abs(stats.pair_loss(0, 0, P) - expected) < 1e-11 * expected


def test_pair_loss_of_closed_form_is_min_mse():
    rng = np.random.default_rng(10)
    S, T = make_layers(rng, 200, (5, 9), (4, 7), mean=-3.0)
    stats = AlignmentStats.from_arrays(S, T, chunk_rows=33)
    mse = stats.min_mse()
    for s in range(2):
        for t in range(2):
            loss = stats.pair_loss(s, t, stats.projection(s, t))
            assert abs(loss - mse[s, t]) < 1e-10 * mse[s, t]
            # and it is a minimum: a perturbed projection is worse
            P = stats.projection(s, t) + 1e-3 * rng.standard_normal(
                (stats.student_widths[s], stats.teacher_widths[t]))
            assert stats.pair_loss(s, t, P) > mse[s, t]


def test_relative_min_mse_is_fraction_of_teacher_variance():
    rng = np.random.default_rng(11)
    S, T = make_layers(rng, 300, (6,), (4, 4))
    T[1] = 30.0 * T[0] + 7.0  # a larger-variance teacher layer
    order = np.argsort(T[0][:, 0])  # sorted rows: the first chunk's mean is far off
    S, T = [x[order] for x in S], [y[order] for y in T]
    mask = rng.random(300) < 0.9
    stats = AlignmentStats.from_arrays(S, T, mask, chunk_rows=16)
    w = mask.astype(np.float64)
    variance = np.array([
        np.mean(np.average((y - np.average(y, axis=0, weights=w)) ** 2, axis=0, weights=w))
        for y in T
    ])
    assert rel_err(stats.teacher_variance(), variance) < 1e-12
    relative = stats.relative_min_mse()
    assert rel_err(relative, stats.min_mse() / variance) < 1e-12
    # Scale-free: the two teacher layers differ by an affine map, hence similar 1 − R²
    # (not identical: the projection has no intercept), while raw MSE differs by ~900×.
    assert np.all((relative > 0) & (relative < 1))
    assert abs(relative[0, 1] - relative[0, 0]) < 0.25 * relative[0, 0]
    assert stats.min_mse()[0, 1] > 100 * stats.min_mse()[0, 0]


# ------------------------------------------------------------------ CKA


def test_cka_matches_reference():
    rng = np.random.default_rng(12)
    S, T = make_layers(rng, 250, (4, 9), (6, 3, 5), mean=1.5)
    mask = rng.random(250) < 0.7
    stats = AlignmentStats.from_arrays(S, T, mask, chunk_rows=31)
    cka = stats.cka()
    for s, x in enumerate(S):
        for t, y in enumerate(T):
            assert abs(cka[s, t] - reference.reference_cka(x, y, mask.astype(float))) < 1e-12
    assert np.all((cka >= 0) & (cka <= 1))
    same = AlignmentStats.from_arrays([S[0]], [S[0] * 3.0 + 1.0])
    assert abs(same.cka()[0, 0] - 1.0) < 1e-12


def test_cka_large_mean_small_spread_no_cancellation():
    rng = np.random.default_rng(13)
    S, T = make_layers(rng, 600, (8,), (6,), dtype=np.float32, mean=100.0, spread=1e-3)
    expected = reference.reference_cka(S[0], T[0])  # float64, explicitly centred
    one_shot = AlignmentStats.from_arrays(S, T)
    chunked = AlignmentStats.from_arrays(S, T, chunk_rows=37)
    parts = [AlignmentStats.from_arrays([S[0][a:b]], [T[0][a:b]], chunk_rows=50)
             for a, b in ((0, 100), (100, 450), (450, 600))]
    merged = parts[2] + parts[0] + parts[1]
    for stats in (one_shot, chunked, merged):
        assert abs(stats.cka()[0, 0] - expected) < 1e-9 * expected
    # The test has teeth: the same formula on uncentred float64 sums (no shift) loses
    # ~10 of 16 digits to cancellation (mean² / variance ≈ 1e10).
    ref = reference.reference_gram_stats(S, T)
    n = ref["n_w"]
    G = ref["G"][0] - np.outer(ref["a"][0], ref["a"][0]) / n
    H = ref["H"][0] - np.outer(ref["b"][0], ref["b"][0]) / n
    C = ref["C"][0][0] - np.outer(ref["a"][0], ref["b"][0]) / n
    naive_cka = np.sum(C**2) / (np.linalg.norm(G) * np.linalg.norm(H))
    assert abs(naive_cka - expected) > 1e-7 * expected


def test_constant_layer_gives_nan_cka_and_relative_mse():
    rng = np.random.default_rng(14)
    S = [rng.standard_normal((50, 3))]
    T = [np.full((50, 2), 4.0), rng.standard_normal((50, 2))]
    stats = AlignmentStats.from_arrays(S, T)
    cka = stats.cka()
    assert np.isnan(cka[0, 0]) and np.isfinite(cka[0, 1])
    relative = stats.relative_min_mse()
    assert np.isnan(relative[0, 0]) and np.isfinite(relative[0, 1])


# ------------------------------------------------------------------ chunks, merges, masks


def assert_same_stats(a, b, tol=1e-12):
    assert a.n_rows == b.n_rows
    for s in range(a.n_student):
        assert rel_err(a.student_gram(s), b.student_gram(s)) <= tol
        assert rel_err(a.student_gram(s, centered=True), b.student_gram(s, centered=True)) <= tol
        for t in range(a.n_teacher):
            assert rel_err(a.cross_gram(s, t), b.cross_gram(s, t)) <= tol
    for t in range(a.n_teacher):
        assert rel_err(a.teacher_gram(t), b.teacher_gram(t)) <= tol
        assert abs(a.teacher_sq_norm(t) - b.teacher_sq_norm(t)) <= tol * b.teacher_sq_norm(t)
    assert rel_err(a.min_mse(), b.min_mse()) <= 1e3 * tol
    assert rel_err(a.cka(), b.cka()) <= 1e2 * tol
    if b.n_rows >= 4:  # the fourth-order moments (debiased CKA) merge and chunk alike
        assert rel_err(a.cka(debiased=True), b.cka(debiased=True)) <= 1e3 * tol


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 299, 300, 5000])
def test_chunked_equals_one_shot(chunk_rows):
    rng = np.random.default_rng(15)
    S, T = make_layers(rng, 300, (5, 3), (4, 6), mean=10.0)
    mask = rng.random(300) < 0.75
    one_shot = AlignmentStats.from_arrays(S, T, mask, chunk_rows=10_000)
    assert_same_stats(AlignmentStats.from_arrays(S, T, mask, chunk_rows=chunk_rows), one_shot)
    # Several update() calls of different sizes: the same statistics.
    stats = AlignmentStats(chunk_rows=chunk_rows)
    for a, b in ((0, 1), (1, 120), (120, 300)):
        if mask[a:b].any():
            stats.update([x[a:b] for x in S], [y[a:b] for y in T], mask[a:b])
    assert_same_stats(stats, one_shot)


def test_merge_equals_one_shot_with_different_shifts():
    rng = np.random.default_rng(16)
    S, T = make_layers(rng, 400, (4, 5), (3, 6))
    # Parts with very different means, so their shifts differ a lot.
    bounds = ((0, 90), (90, 250), (250, 400))
    for k, (a, b) in enumerate(bounds):
        for x in S + T:
            x[a:b] += 1000.0 * k
    one_shot = AlignmentStats.from_arrays(S, T)
    parts = [AlignmentStats.from_arrays([x[a:b] for x in S], [y[a:b] for y in T],
                                        chunk_rows=32) for a, b in bounds]
    assert not np.allclose(parts[0].to_dict()["student_shift"],
                           parts[2].to_dict()["student_shift"])
    for merged in (parts[0] + parts[1] + parts[2], parts[2].merge(parts[0].merge(parts[1])),
                   sum(parts)):
        assert_same_stats(merged, one_shot, tol=1e-11)
        for s in range(2):
            for t in range(2):
                expected = reference.reference_cka(S[s], T[t])
                assert abs(merged.cka()[s, t] - expected) < 1e-10
    # The operands are left untouched.
    fresh = AlignmentStats.from_arrays([x[0:90] for x in S], [y[0:90] for y in T], chunk_rows=32)
    assert_same_stats(parts[0], fresh, tol=0.0)


def test_merge_with_empty_statistics():
    rng = np.random.default_rng(17)
    S, T = make_layers(rng, 60, (3,), (2,))
    stats = AlignmentStats.from_arrays(S, T)
    empty = AlignmentStats((3,), (2,))
    assert empty.n_rows == 0 and empty.student_widths == (3,)
    for merged in (empty + stats, stats + empty, AlignmentStats() + stats, stats.merge(empty)):
        assert_same_stats(merged, stats, tol=0.0)
    assert (empty + empty).n_rows == 0


@pytest.mark.parametrize("as_int", [False, True])
def test_row_mask_equals_dropping_rows(as_int):
    rng = np.random.default_rng(18)
    S, T = make_layers(rng, 120, (4,), (5, 3))
    mask = rng.random(120) < 0.5
    given_mask = mask.astype(np.int64) if as_int else mask
    masked = AlignmentStats.from_arrays(S, T, given_mask, chunk_rows=16)
    dropped = AlignmentStats.from_arrays(selected(S, mask), selected(T, mask), chunk_rows=16)
    assert_same_stats(masked, dropped)


def test_attention_mask_on_3d_input_equals_dropping_rows():
    rng = np.random.default_rng(19)
    B, L = 6, 9
    S, T = make_layers(rng, B * L, (4, 4), (5,))
    S3, T3 = [x.reshape(B, L, -1) for x in S], [y.reshape(B, L, -1) for y in T]
    lengths = rng.integers(1, L + 1, size=B)
    attention = (np.arange(L)[None, :] < lengths[:, None]).astype(np.int32)
    masked = AlignmentStats.from_arrays(S3, T3, attention, chunk_rows=10)
    dropped = AlignmentStats.from_arrays(selected(S, attention), selected(T, attention))
    assert masked.n_rows == attention.sum()
    assert_same_stats(masked, dropped)
    # A stacked (L, B, T, d) array is the same as the list of its layers.
    stacked = AlignmentStats.from_arrays(np.stack(S3), T3, attention)
    assert_same_stats(stacked, masked)


def test_from_chunks_equals_from_arrays():
    rng = np.random.default_rng(20)
    S, T = make_layers(rng, 200, (3, 5), (4,))
    mask = rng.random(200) < 0.8
    bounds = ((0, 50), (50, 130), (130, 200))
    chunks = [([x[a:b] for x in S], [y[a:b] for y in T], mask[a:b]) for a, b in bounds]
    expected = AlignmentStats.from_arrays(S, T, mask)
    assert_same_stats(AlignmentStats.from_chunks(iter(chunks), chunk_rows=20), expected)
    unmasked = [(c[0], c[1]) for c in chunks]
    assert_same_stats(AlignmentStats.from_chunks(unmasked),
                      AlignmentStats.from_arrays(S, T))
    with_none = [(c[0], c[1], None) for c in chunks]
    assert_same_stats(AlignmentStats.from_chunks(with_none), AlignmentStats.from_arrays(S, T))


def test_memory_mapped_and_strided_inputs(tmp_path):
    rng = np.random.default_rng(31)
    S, T = make_layers(rng, 90, (8,), (3,), dtype=np.float32)
    np.save(tmp_path / "s.npy", S[0])
    mapped = np.load(tmp_path / "s.npy", mmap_mode="r")
    expected = AlignmentStats.from_arrays(S, T)
    assert_same_stats(AlignmentStats.from_arrays([mapped], T, chunk_rows=20), expected, 1e-13)
    # Every other feature of a wider layer, and a non-contiguous 3-D view.
    wide = np.repeat(S[0], 2, axis=1)
    assert_same_stats(AlignmentStats.from_arrays([wide[:, ::2]], T), expected, tol=0.0)
    S3 = np.repeat(S[0].reshape(9, 10, 8), 2, axis=2)[:, :, ::2]
    assert_same_stats(AlignmentStats.from_arrays([S3], [T[0].reshape(9, 10, 3)]), expected,
                      tol=1e-13)


def test_progress_bar(capsys):
    rng = np.random.default_rng(21)
    S, T = make_layers(rng, 100, (3,), (2,))
    stats = AlignmentStats.from_arrays(S, T, chunk_rows=30, progress=True)
    assert "alignment statistics" in capsys.readouterr().err
    assert_same_stats(stats, AlignmentStats.from_arrays(S, T), tol=1e-13)
    stats = AlignmentStats.from_chunks([(S, T)], progress=True)
    assert "chunk" in capsys.readouterr().err
    assert stats.n_rows == 100


def test_to_dict_round_trip(tmp_path):
    rng = np.random.default_rng(22)
    S, T = make_layers(rng, 80, (3, 4), (5,), mean=7.0)
    stats = AlignmentStats.from_arrays(S, T, chunk_rows=25)
    data = stats.to_dict()
    assert all(isinstance(v, np.ndarray) for v in data.values())
    assert sorted(data) == sorted([
        "format_version", "student_widths", "teacher_widths", "folds", "examples",
        "student_dtype_bits", "teacher_dtype_bits", "n_rows", "student_shift",
        "teacher_shift", "student_sum", "teacher_sum", "cross_gram", "student_gram_0",
        "student_gram_1", "teacher_gram_0", "quartic_cross", "student_quartic",
        "teacher_quartic", "student_cubic_cross", "teacher_cubic_cross", "student_cubic",
        "teacher_cubic"])
    assert data["n_rows"].shape == (1,) and data["cross_gram"].shape == (1, 7, 5)
    assert_same_stats(AlignmentStats.from_dict(data), stats, tol=0.0)
    np.savez(tmp_path / "stats.npz", **data)
    with np.load(tmp_path / "stats.npz") as loaded:
        restored = AlignmentStats.from_dict(loaded)
    assert_same_stats(restored, stats, tol=0.0)
    # Restored statistics keep accumulating and merging like the original.
    more = [x[:10] for x in S], [y[:10] for y in T]
    assert_same_stats(restored.update(*more), stats.update(*more), tol=0.0)
    empty = AlignmentStats.from_dict(AlignmentStats((2,), (3,)).to_dict())
    assert empty.n_rows == 0 and empty.teacher_widths == (3,)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(2, 40),
    student_widths=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    teacher_widths=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    chunk_rows=st.integers(1, 50),
    masked=st.booleans(),
    float32=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_statistics_and_closed_form(n, student_widths, teacher_widths, chunk_rows,
                                             masked, float32, seed):
    rng = np.random.default_rng(seed)
    dtype = np.float32 if float32 else np.float64
    S, T = make_layers(rng, n, student_widths, teacher_widths, dtype=dtype, mean=2.0)
    mask = rng.random(n) < 0.6 if masked else np.ones(n, bool)
    mask[rng.integers(n)] = True
    stats = AlignmentStats.from_arrays(S, T, mask if masked else None, chunk_rows=chunk_rows)
    x_sel, y_sel = selected(S, mask), selected(T, mask)
    ref = reference.reference_gram_stats(x_sel, y_sel)
    assert stats.n_rows == mask.sum()
    mse = stats.min_mse()
    for s, x in enumerate(x_sel):
        assert rel_err(stats.student_gram(s), ref["G"][s]) < 1e-12
        for t, y in enumerate(y_sel):
            assert rel_err(stats.cross_gram(s, t), ref["C"][s][t]) < 1e-12
            mse_ref, _ = reference.reference_min_mse(x, y)
            scale = ref["q"][t] / (mask.sum() * y.shape[1])  # the MSE of P = 0
            assert abs(mse[s, t] - mse_ref) <= 1e-8 * scale
            if mask.sum() > 1:
                expected = reference.reference_cka(x, y)
                if np.isfinite(expected):
                    assert abs(stats.cka()[s, t] - expected) < 1e-9


def test_peak_memory_does_not_grow_with_rows():
    rng = np.random.default_rng(23)
    widths = (32, 32)

    def peak(n):
        S, T = make_layers(rng, n, widths, widths)
        mask = np.ones(n, bool)
        mask[::3] = False
        AlignmentStats.from_arrays(S, T, mask, chunk_rows=256)  # compile, warm up
        tracemalloc.start()
        AlignmentStats.from_arrays(S, T, mask, chunk_rows=256)
        result = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return result

    small, large = peak(2_000), peak(16_000)
    # 14,000 more rows of 128 float64 features would be 14 MB if anything copied the data.
    assert large - small < 300_000


# ------------------------------------------------------------------ bad input


@pytest.fixture
def stats():
    rng = np.random.default_rng(24)
    S, T = make_layers(rng, 40, (3, 4), (5,))
    return AlignmentStats.from_arrays(S, T)


def test_mismatched_rows_are_refused():
    rng = np.random.default_rng(25)
    with pytest.raises(ValueError, match=r"student_layers\[0\] and teacher_layers\[0\].*"
                                         r"\(10, 3\) and \(11, 4\)"):
        AlignmentStats.from_arrays([rng.standard_normal((10, 3))], [rng.standard_normal((11, 4))])
    with pytest.raises(ValueError, match=r"student_layers\[1\].*disagree on rows"):
        AlignmentStats.from_arrays(
            [rng.standard_normal((10, 3)), rng.standard_normal((9, 3))],
            [rng.standard_normal((10, 4))])
    with pytest.raises(ValueError, match="disagree on rows"):  # 2-D vs 3-D
        AlignmentStats.from_arrays([rng.standard_normal((2, 5, 3))],
                                   [rng.standard_normal((10, 4))])


def test_changing_widths_or_layer_counts_between_updates_is_refused(stats):
    rng = np.random.default_rng(26)
    before = stats.to_dict()
    with pytest.raises(ValueError, match=r"student_layers\[1\] has width 6.*\(3, 4\)"):
        stats.update([rng.standard_normal((5, 3)), rng.standard_normal((5, 6))],
                     [rng.standard_normal((5, 5))])
    with pytest.raises(ValueError, match=r"teacher_layers has 2 layer\(s\).*1 teacher"):
        stats.update([rng.standard_normal((5, 3)), rng.standard_normal((5, 4))],
                     [rng.standard_normal((5, 5))] * 2)
    fixed = AlignmentStats((3,), (5,))
    with pytest.raises(ValueError, match=r"teacher_layers\[0\] has width 4"):
        fixed.update([rng.standard_normal((5, 3))], [rng.standard_normal((5, 4))])
    after = stats.to_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_bad_masks_are_refused(stats):
    rng = np.random.default_rng(27)
    S, T = make_layers(rng, 12, (3, 4), (5,))
    with pytest.raises(ValueError, match=r"mask has shape \(11,\).*\(12,\)"):
        stats.update(S, T, np.ones(11))
    with pytest.raises(ValueError, match="selects no row"):
        stats.update(S, T, np.zeros(12))
    with pytest.raises(ValueError, match="only 0 and 1"):
        stats.update(S, T, np.full(12, 2))
    with pytest.raises(TypeError, match="mask"):
        stats.update(S, T, np.array(["a"] * 12))
    assert stats.n_rows == 40


def test_non_finite_input_is_refused_and_leaves_statistics_unchanged(stats):
    rng = np.random.default_rng(28)
    S, T = make_layers(rng, 5000, (3, 4), (5,))
    T[0][4500, 2] = np.nan  # in the second block of rows: nothing may be added before it
    before = stats.to_dict()
    with pytest.raises(ValueError, match=r"teacher_layers\[0\] contains NaN/Inf.*row 4500, "
                                         r"column 2"):
        stats.update(S, T)
    after = stats.to_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    mask = np.ones(5000, bool)
    mask[4500] = False  # a masked-out row may hold anything (padding)
    assert stats.update(S, T, mask).n_rows == 40 + 4999
    forced = AlignmentStats.from_arrays(S, T, check_finite=False)
    assert np.isnan(forced.cka()[:, 0]).all()


def test_bad_arrays_are_refused():
    rng = np.random.default_rng(29)
    with pytest.raises(TypeError, match=r"student_layers\[0\].*int64"):
        AlignmentStats.from_arrays([np.ones((4, 3), dtype=np.int64)], [rng.standard_normal((4, 2))])
    with pytest.raises(ValueError, match="teacher_layers is an empty sequence"):
        AlignmentStats.from_arrays([rng.standard_normal((4, 3))], [])
    with pytest.raises(ValueError, match=r"teacher_layers\[0\] must be 2-D or 3-D"):
        AlignmentStats.from_arrays([rng.standard_normal((4, 3))], [rng.standard_normal(4)])


def test_bad_arguments_of_the_analysis_are_refused(stats):
    with pytest.raises(ValueError, match="ridge"):
        stats.min_mse(-1.0)
    with pytest.raises(ValueError, match="ridge"):
        stats.projection(0, 0, ridge=float("nan"))
    with pytest.raises(ValueError, match="cutoff"):
        stats.min_mse(cutoff=1.0)
    with pytest.raises(ValueError, match="cutoff"):
        stats.relative_min_mse(cutoff=-1e-3)
    with pytest.raises(ValueError, match=r"s=2 is out of range.*2 student layer"):
        stats.projection(2, 0)
    with pytest.raises(ValueError, match=r"t=1 is out of range.*1 teacher layer"):
        stats.pair_loss(0, 1, np.zeros((3, 5)))
    with pytest.raises(ValueError, match="negative indices do not wrap"):
        stats.cross_gram(-1, 0)
    with pytest.raises(TypeError, match="must be an int"):
        stats.student_gram(1.0)
    with pytest.raises(ValueError, match=r"projection for layer pair \(1, 0\) has shape "
                                         r"\(3, 5\).*must be \(4, 5\)"):
        stats.pair_loss(1, 0, np.zeros((3, 5)))
    with pytest.raises(ValueError, match="NaN"):
        stats.pair_loss(0, 0, np.full((3, 5), np.nan))


def test_statistics_without_rows_are_refused():
    empty = AlignmentStats((3,), (2,))
    for call in (empty.min_mse, empty.cka, empty.relative_min_mse, empty.teacher_variance,
                 lambda: empty.projection(0, 0), lambda: empty.student_gram(0)):
        with pytest.raises(ValueError, match="hold no rows"):
            call()
    with pytest.raises(ValueError, match="no layers yet"):
        AlignmentStats().to_dict()


def test_bad_construction_merge_and_chunks_are_refused(stats):
    with pytest.raises(ValueError, match="both student_widths and teacher_widths"):
        AlignmentStats((3,), None)
    with pytest.raises(ValueError, match=r"student_widths\[1\] must be > 0"):
        AlignmentStats((3, 0), (2,))
    with pytest.raises(ValueError, match="chunk_rows must be > 0"):
        AlignmentStats(chunk_rows=0)
    with pytest.raises(ValueError, match=r"cannot merge.*\(3, 4\).*\(3, 5\)"):
        stats + AlignmentStats((3, 5), (5,))
    with pytest.raises(ValueError, match="cannot merge"):
        stats.merge(AlignmentStats((3, 4), (5, 5)))
    with pytest.raises(TypeError, match="can only merge"):
        stats.merge(np.zeros(3))
    with pytest.raises(TypeError):
        stats + 1
    with pytest.raises(ValueError, match="chunks is empty"):
        AlignmentStats.from_chunks([])
    with pytest.raises(TypeError, match=r"chunks\[0\] must be a tuple"):
        AlignmentStats.from_chunks([np.zeros((3, 3))])
    rng = np.random.default_rng(30)
    good = ([rng.standard_normal((4, 3))], [rng.standard_normal((4, 2))])
    bad = ([rng.standard_normal((4, 3))], [rng.standard_normal((5, 2))])
    with pytest.raises(ValueError, match=r"chunks\[1\]: .*disagree on rows"):
        AlignmentStats.from_chunks([good, bad])


def test_bad_dicts_are_refused(stats):
    data = stats.to_dict()
    missing = {k: v for k, v in data.items() if k != "cross_gram"}
    with pytest.raises(ValueError, match="no key 'cross_gram'"):
        AlignmentStats.from_dict(missing)
    with pytest.raises(ValueError, match=r"data\['student_gram_1'\].*\(1, 4, 4\).*\(3, 3\)"):
        AlignmentStats.from_dict({**data, "student_gram_1": np.zeros((3, 3))})
    with pytest.raises(ValueError, match="format 2.*accumulated again"):
        AlignmentStats.from_dict({**data, "format_version": np.asarray(1)})
    with pytest.raises(ValueError, match="n_rows"):
        AlignmentStats.from_dict({**data, "n_rows": np.asarray([-1])})
    with pytest.raises(ValueError, match="NaN"):
        AlignmentStats.from_dict({**data, "teacher_sum": np.full((1, 5), np.nan)})
    with pytest.raises(ValueError, match="folds"):
        AlignmentStats.from_dict({**data, "folds": np.asarray(1)})
    with pytest.raises(ValueError, match="dtype_bits"):
        AlignmentStats.from_dict({**data, "student_dtype_bits": np.asarray([16, 64])})


# ------------------------------------------------------------------ edge cases of min_mse


@pytest.mark.parametrize("ridge", [0.0, 0.5])
def test_min_mse_of_an_all_zero_student_layer_is_the_mse_of_a_zero_projection(ridge):
    rng = np.random.default_rng(40)
    S, T = make_layers(rng, 60, (4, 3), (2, 5), mean=1.5)
    S[0][:] = 0.0
    stats = AlignmentStats.from_arrays(S, T, chunk_rows=16)
    mse = stats.min_mse(ridge)
    np.testing.assert_allclose(mse[0], [np.mean(t**2) for t in T], rtol=1e-12)
    for t in range(2):  # the other layer is unaffected, and P* of the zero layer is 0
        assert abs(mse[1, t] - stats.pair_loss(1, t, stats.projection(1, t, ridge))) \
            < 1e-10 * mse[1, t]
        np.testing.assert_array_equal(stats.projection(0, t, ridge), 0.0)


def test_min_mse_keeps_its_digits_on_a_near_exact_fit():
    """q_t − explained cancels when the residual is tiny against q_t (a large teacher mean)."""
    rng = np.random.default_rng(41)
    X = rng.standard_normal((2000, 8))
    S = np.column_stack([X, np.ones(2000)])  # a constant feature: the mean is reachable
    T = 10.0 + X @ rng.standard_normal((8, 6)) + 1e-3 * rng.standard_normal((2000, 6))
    stats = AlignmentStats.from_arrays([S], [T], chunk_rows=256)
    best = np.linalg.lstsq(S, T, rcond=None)[0]
    expected = np.mean((S @ best - T) ** 2)  # ~1e-6, against q_t/(n d_t) ~ 100
    assert abs(stats.min_mse()[0, 0] - expected) < 1e-9 * expected


# ------------------------------------------------------------------ solve_projection


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ridge", [0.0, 0.3])
def test_solve_projection_is_the_least_squares_solution(dtype, ridge):
    rng = np.random.default_rng(42)
    S = rng.standard_normal((300, 6))
    if dtype == np.float64:  # rank-deficient: the minimum-norm solution is wanted (a float32
        S[:, 5] = S[:, 0] - S[:, 1]  # G's own rounding, ~1e-7·λ₁, is above the cutoff)
    T = S @ rng.standard_normal((6, 4)) + 0.1 * rng.standard_normal((300, 4))
    w = rng.uniform(0.5, 1.5, 300)  # row weights: (Sᵀ W) S is a GEMM, not exactly symmetric
    gram, cross = (S.T * w) @ S, (S.T * w) @ T  # accumulated in float64, as AlignmentStats
    assert np.abs(gram - gram.T).max() > 0  # the tolerance is what accepts it
    P = pkd.solve_projection(gram.astype(dtype), cross.astype(dtype), ridge)
    root = np.sqrt(w)[:, None]
    if ridge == 0:
        expected = scipy.linalg.lstsq(root * S, root * T, cond=1e-10)[0]
    else:
        expected = scipy.linalg.lstsq(np.vstack([root * S, np.sqrt(ridge) * np.eye(6)]),
                                      np.vstack([root * T, np.zeros((6, 4))]))[0]
    assert P.dtype == np.float64
    assert rel_err(P, expected) < (1e-4 if dtype == np.float32 else 1e-10)


def test_solve_projection_accepts_a_gram_computed_in_float32():
    """A float32 GEMM's rounding makes G − Gᵀ ~1e-7·|G|: within the float32 tolerance."""
    rng = np.random.default_rng(45)
    S = rng.standard_normal((300, 5)).astype(np.float32)
    T = rng.standard_normal((300, 3)).astype(np.float32)
    w = rng.uniform(0.5, 1.5, 300).astype(np.float32)
    gram = (S.T * w) @ S
    assert np.abs(gram - gram.T).max() > 0
    P = pkd.solve_projection(gram, (S.T * w) @ T)
    root = np.sqrt(w.astype(np.float64))[:, None]
    expected = scipy.linalg.lstsq(root * S, root * T)[0]
    assert rel_err(P, expected) < 1e-4


def test_solve_projection_refuses_what_is_not_a_gram_matrix():
    rng = np.random.default_rng(43)
    S = rng.standard_normal((50, 3))
    gram, cross = S.T @ S, S.T @ rng.standard_normal((50, 2))
    cases = [
        (gram + np.triu(np.ones((3, 3)), 1), cross, ValueError, "gram .* is not symmetric"),
        (-gram, cross, ValueError, "gram .* has a negative diagonal entry"),
        (np.where(np.eye(3) > 0, np.nan, gram), cross, ValueError, "gram .*NaN"),
        (gram, np.full((3, 2), np.inf), ValueError, "cross .*Inf"),
        (np.zeros((0, 0)), np.zeros((0, 2)), ValueError, "gram is empty"),
        (gram.astype(int), cross, TypeError, "gram must be float32 or float64"),
        (gram, cross[:2], ValueError, r"gram must be \(d_s, d_s\) and cross \(d_s, d_t\)"),
        (gram[0], cross, ValueError, "gram must be 2-D"),
    ]
    for g, c, error, message in cases:
        with pytest.raises(error, match=message):
            pkd.solve_projection(g, c)


def test_relative_min_mse_exceeds_one_when_the_teacher_mean_is_out_of_reach():
    """No intercept: an unreachable teacher mean is unexplained (R² < 0, as r2_score says)."""
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(44)
    S = rng.standard_normal((500, 4))
    S -= S.mean(0)  # zero-mean student: Pᵀ s cannot produce a constant
    T = 5.0 + S @ rng.standard_normal((4, 3)) + 0.1 * rng.standard_normal((500, 3))
    stats = AlignmentStats.from_arrays([S], [T])
    best = np.linalg.lstsq(S, T, rcond=None)[0]
    r2 = sklearn_metrics.r2_score(T, S @ best, multioutput="variance_weighted")
    assert stats.relative_min_mse()[0, 0] > 1
    assert abs(stats.relative_min_mse()[0, 0] - (1 - r2)) < 1e-10


def test_queries_after_update_or_merge_see_the_new_rows(monkeypatch):
    """min_mse and relative_min_mse share one cached solve, dropped by every update."""
    import pkd._estimates as estimates

    rng = np.random.default_rng(31)
    students, teachers = make_layers(rng, 120, (3, 4), (5,), dtype=np.float32)
    first = [x[:60] for x in students], [x[:60] for x in teachers]
    second = [x[60:] for x in students], [x[60:] for x in teachers]
    solves = []
    real = estimates.residuals
    monkeypatch.setattr(estimates, "residuals", lambda *a: solves.append(1) or real(*a))

    stats = AlignmentStats.from_arrays(*first, folds=3)
    early = stats.min_mse()
    early_relative = stats.relative_min_mse()
    stats.relative_min_mse(heldout=True)
    assert len(solves) == 2  # in-sample once for both queries, held-out once
    early[...] = -1.0  # a caller's array is its own: the cache is not touched
    np.testing.assert_array_equal(stats.min_mse(), AlignmentStats.from_arrays(
        *first, folds=3).min_mse())

    merged = stats.merge(AlignmentStats.from_arrays(*second, folds=3))
    copied = stats.copy()
    stats.update(*second)
    whole = AlignmentStats.from_arrays(students, teachers, folds=3)
    for fresh in (stats, merged):
        np.testing.assert_allclose(fresh.min_mse(), whole.min_mse(), rtol=1e-10)
        np.testing.assert_allclose(fresh.relative_min_mse(heldout=True).mean,
                                   whole.relative_min_mse(heldout=True).mean, rtol=1e-10)
        assert not np.allclose(fresh.relative_min_mse(), early_relative)
    np.testing.assert_array_equal(copied.relative_min_mse(), early_relative)


def test_solvers_hold_blas_to_one_thread_and_restore_it_even_when_run_concurrently():
    """The solvers hold BLAS to one thread (pkd._threads) and restore it, from any thread.

    Inside is checked in the main thread only: OpenBLAS reports (and, it seems, applies)
    a limit set from another thread as not set (docs/performance.md).
    """
    import threading

    from threadpoolctl import threadpool_info

    def limits():
        return {i["filepath"]: i["num_threads"] for i in threadpool_info()
                if i["user_api"] == "blas"}

    rng = np.random.default_rng(6)
    student, teacher = make_layers(rng, 200, [24, 16], [20])
    before = limits()
    inside = []

    def query():
        stats = AlignmentStats.from_arrays(student, teacher, folds=2)
        stats.min_mse()
        stats.relative_min_mse(heldout=True)

    original = Solver._decompose

    def spy(self, *args):
        if threading.current_thread() is threading.main_thread():
            inside.append(set(limits().values()))
        return original(self, *args)

    Solver._decompose = spy
    try:
        query()
        threads = [threading.Thread(target=query) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        Solver._decompose = original
    assert inside and all(seen == {1} for seen in inside)
    assert limits() == before


def test_large_updates_run_on_pkd_threads_with_the_same_bits(monkeypatch):
    """Large updates: fill and products as tasks on pkd's threads, BLAS held to one thread;
    every statistic bit-identical whatever the thread count (folds, several chunks)."""
    import contextlib
    import threading

    from threadpoolctl import threadpool_limits

    import pkd._accumulate as accumulate
    import pkd._moments as moments
    import pkd._threads as threads_module

    rng = np.random.default_rng(12)
    students, teachers = make_layers(rng, 700, (24, 40, 8), (56, 32), dtype=np.float32)
    seen = []
    real = threads_module.on_threads
    monkeypatch.setattr(threads_module, "on_threads",
                        lambda items, task, n: seen.append(n) or real(items, task, n))
    monkeypatch.setattr(moments, "TASK_MIN_WORK", 0)  # every chunk split into tasks
    results = []
    for count in (1, 2, 3):
        monkeypatch.setattr(accumulate, "update_threads",
                            lambda layout, rows, count=count: contextlib.nullcontext(count))
        seen.clear()
        with threadpool_limits(1, user_api="blas"):
            stats = AlignmentStats.from_arrays(students, teachers, folds=3, chunk_rows=128)
        assert set(seen) == {count}  # the fill and the products of every chunk
        results.append({key: value.tobytes() for key, value in stats.to_dict().items()})
    assert results[0] == results[1] == results[2]
    # The tasks compute every statistic the whole-array calls of small chunks do.
    monkeypatch.undo()
    whole = AlignmentStats.from_arrays(students, teachers, folds=3, chunk_rows=128).to_dict()
    for key, value in stats.to_dict().items():
        scale = max(float(np.abs(whole[key]).max()), 1.0)
        np.testing.assert_allclose(value, whole[key], rtol=0, atol=1e-13 * scale, err_msg=key)
    reference_stats = AlignmentStats.from_arrays(students, teachers, chunk_rows=128)
    np.testing.assert_allclose(stats.min_mse(), reference_stats.min_mse(), rtol=1e-10)

    # The rule: from the main thread BLAS is held to one thread for every update, and pkd's
    # threads run those with chunks large enough for tasks; from another thread, one thread.
    from threadpoolctl import threadpool_info

    layout = reference_stats._layout
    work = 700 * layout.total["student"] * layout.total["teacher"]
    monkeypatch.setattr(moments, "TASK_MIN_WORK", work)

    def blas_limits():
        return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    with threadpool_limits(2, user_api="blas"):
        for rows, expected in ((700, 2), (699, 1)):
            with accumulate.update_threads(layout, rows) as count:
                assert count == expected and blas_limits() == {1}
            assert blas_limits() == {2}
        elsewhere = []

        def worker_task():
            with accumulate.update_threads(layout, 700) as count:
                elsewhere.append(count)

        worker = threading.Thread(target=worker_task)
        worker.start()
        worker.join()
    assert elsewhere == [1]


def test_blas_routines_refuse_a_signature_they_do_not_declare():
    """pkd._blas checks scipy's C signature (LP64 ints) before it calls a routine."""
    from pkd import _blas

    double = "__pyx_t_5scipy_6linalg_11cython_blas_d *"
    lp64 = f"void (char *, char *, int *, int *, {double}, {double}, int *, {double}, " \
           f"{double}, int *)"
    _blas._check_signature("dsyrk", lp64)
    with pytest.raises(RuntimeError, match="cython_blas.dsyrk has the C signature"):
        _blas._check_signature("dsyrk", lp64.replace("int *", "npy_int64 *"))
    with pytest.raises(RuntimeError, match="not the LP64 one"):
        _blas._check_signature("dgemm", lp64)
    for name in _blas._SIGNATURES:  # the scipy installed here passes
        _blas._routine(name)


def test_queries_start_threads_only_from_the_main_thread(monkeypatch):
    """From another thread (where a BLAS limit does not hold for OpenBLAS) the queries run
    on the calling thread alone; from the main thread on as many as BLAS had."""
    import threading

    from threadpoolctl import threadpool_limits

    import pkd._threads as threads_module

    rng = np.random.default_rng(13)
    student, teacher = make_layers(rng, 200, [24, 16], [20, 12])
    seen = []
    real = threads_module.on_threads
    monkeypatch.setattr(threads_module, "on_threads",
                        lambda items, task, n: seen.append(n) or real(items, task, n))

    def queries():
        stats = AlignmentStats.from_arrays(student, teacher, folds=2)  # small: one thread
        seen.clear()
        return stats.min_mse(), stats.relative_min_mse(heldout=True).mean

    with threadpool_limits(2, user_api="blas"):
        in_main = queries()
        assert seen and set(seen) == {2}
        results = []
        worker = threading.Thread(target=lambda: results.append(queries()))
        worker.start()
        worker.join()
    assert seen and set(seen) == {1}
    for mine, theirs in zip(in_main, results[0], strict=True):
        np.testing.assert_array_equal(mine, theirs)


def test_the_first_update_of_a_process_holds_every_blas_to_one_thread():
    """scipy's BLAS, which the accumulation calls, is loaded before the limit is set, so that
    the limit covers it even when nothing had imported scipy.linalg (a fresh process)."""
    import subprocess
    import sys

    script = """
import sys, numpy as np
import pkd, pkd._moments as moments
from threadpoolctl import threadpool_info
assert "scipy.linalg" not in sys.modules
seen, real = [], moments.Moments.add_chunk
def spy(self, *args):
    seen.append({i["filepath"]: i["num_threads"] for i in threadpool_info()
                 if i["user_api"] == "blas"})
    return real(self, *args)
moments.Moments.add_chunk = spy
rng = np.random.default_rng(0)
pkd.AlignmentStats.from_arrays([rng.standard_normal((300, 16)).astype(np.float32)],
                               [rng.standard_normal((300, 24)).astype(np.float32)])
print(seen)
assert len(seen[0]) >= 2 and all(set(s.values()) == {1} for s in seen), seen
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={**os.environ, "OPENBLAS_NUM_THREADS": "2"})
    assert run.returncode == 0, run.stdout + run.stderr
