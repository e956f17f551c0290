"""The best-reachable loss and CKA from shifted moments: in-sample, held out, debiased.

Functions of :class:`pkd._moments.Moments` used by the queries of
:class:`pkd.alignment.AlignmentStats`; the algebra is written out in
``docs/numerics.md``.
"""

from __future__ import annotations

import numpy as np

from ._moments import Moments, shifted_product, symmetric
from .closed_form import Solver

# min_mse recomputes pairs whose best residual is below this fraction of q_t (the
# subtraction q_t − explained would keep fewer than ~10 of float64's 16 digits).
NEAR_EXACT_FIT = 1e-6
# Entries of C' from which its centring pass runs on Numba's threads (when it has more
# than one); the result is the same either way.
PARALLEL_MIN_ENTRIES = 1 << 17


def basis_times_cross(m: Moments, solver: Solver, s: int) -> np.ndarray:
    """``Bᵀ C_s·`` for every teacher column, (rank, Σd_t), without forming ``C_s·``.

    ``C_s· = C'_s· + a'_s c_tᵀ + c_s (b' + n c_t)ᵀ``: one product on the contiguous
    rows of ``C'`` (triangular when the solver's basis is, see :class:`Solver`) and a
    rank-2 update, all in scipy's BLAS (one thread pool).
    """
    from scipy.linalg import blas

    block = m.layout.block("student", s)
    c_s, c_t = m.shift["student"][block], m.shift["teacher"]
    right = np.asfortranarray(np.vstack([c_t, m.sum["teacher"] + float(m.n) * c_t]))
    sums = np.column_stack([m.sum["student"][block], c_s])
    if solver.upper is None:
        product = blas.dgemm(1.0, solver.basis, m.cross[block].T, trans_a=True, trans_b=True)
        left = blas.dgemm(1.0, solver.basis, sums, trans_a=True)
        return blas.dgemm(1.0, left, right, beta=1.0, c=product, overwrite_c=True)
    # Transposed, (Σd_t, d): C'ᵀ Uᵀ with C'ᵀ the Fortran view of C's rows; the rows of U
    # past the rank are zero, so are those columns.
    product = blas.dtrmm(1.0, solver.upper, m.cross[block].T, side=1, trans_a=1)
    left = blas.dgemm(1.0, solver.upper, sums)  # scipy's BLAS: one thread pool
    product = blas.dgemm(1.0, right, left, trans_a=True, trans_b=True, beta=1.0, c=product,
                         overwrite_c=True)
    return product[:, : solver.rank].T


def residual_sum(m: Moments, s: int, t: int, P: np.ndarray) -> float:
    """``Σ_i w_i ‖Pᵀ s_i − t_i‖²`` in shifted coordinates (no cancellation of large means).

    With ``δ = c_t − Pᵀ c_s``: ``q' − 2 tr(Pᵀ C') + tr(Pᵀ G' P) + 2 δ·(b' − Pᵀ a') + n ‖δ‖²``.
    """
    layout = m.layout
    block_s, block_t = layout.block("student", s), layout.block("teacher", t)
    gram = symmetric(m.gram["student"][s])
    a, b = m.sum["student"][block_s], m.sum["teacher"][block_t]
    delta = m.shift["teacher"][block_t] - P.T @ m.shift["student"][block_s]
    return float(np.trace(m.gram["teacher"][t]) - 2.0 * np.vdot(P, m.cross[block_s, block_t])
                 + np.vdot(P, gram @ P) + 2.0 * (delta @ (b - P.T @ a))
                 + m.n * (delta @ delta))


def min_residuals(m: Moments, s: int, solver: Solver) -> np.ndarray:
    """Smallest ``Σ w ‖Pᵀ s − t‖²`` of student layer ``s`` for every teacher layer: (n_t,)."""
    layout = m.layout
    q = m.teacher_sq_norms()
    if solver.rank == 0:  # an all-zero layer explains nothing
        return q.copy()
    z = basis_times_cross(m, solver, s)
    explained = (np.einsum("ij,ij->j", z, z) if np.all(solver.gain == 1.0)
                 else np.einsum("ij,ij->j", z, z * solver.gain[:, None]))  # (Σd_t,)
    residual = q - layout.reduce("teacher", explained)
    # q − explained cancels when the fit is nearly exact: those pairs are recomputed from
    # P* in the shifted coordinates of residual_sum.
    for t in np.flatnonzero(residual < NEAR_EXACT_FIT * q):
        block = layout.block("teacher", t)
        P = solver.basis @ (z[:, block] * solver.inverse[:, None])
        residual[t] = residual_sum(m, s, t, P)
    return residual


def difference_gram(total_gram: np.ndarray, total: Moments, part: Moments,
                    s: int) -> np.ndarray:
    """Uncentred ``G_s`` of the rows of ``total`` not in ``part`` (same shift).

    ``total_gram`` is ``symmetric(total.gram["student"][s])``, shared by every fold.
    """
    block = total.layout.block("student", s)
    a = total.sum["student"][block] - part.sum["student"][block]
    c = total.shift["student"][block]
    gram = total_gram - symmetric(part.gram["student"][s])
    return shifted_product(gram, a, a, c, c, float(total.n - part.n))


def heldout_residuals(total: Moments, test: Moments, s: int, solver: Solver,
                      test_traces: np.ndarray, scratch: tuple[np.ndarray, np.ndarray]
                      ) -> np.ndarray:
    """``Σ_test w ‖Pᵀ s − t‖²`` for every teacher layer, ``P`` fitted on ``total − test``: (n_t,).

    ``P = B Z`` with ``Z = diag(inverse) Bᵀ C_train``; the residual on the test rows
    is :func:`residual_sum`'s formula for every teacher column at once. Two GEMMs
    over all teacher columns, ``Y = Bᵀ C'_test`` and ``Bᵀ C'_total`` (``Z`` is their
    difference plus a rank-2 update); for ``ridge = 0`` the basis is rotated to
    diagonalise ``Bᵀ G'_test B``, so ``tr(Pᵀ G'_test P)`` is a weighted sum of
    ``Z ∘ Z``. ``test_traces`` is ``test.teacher_traces()``; ``scratch`` two flat
    float64 buffers of at least ``d_s · Σd_t`` values, reused by every fold (``Y``, ``Z``).
    """
    import scipy.linalg
    from scipy.linalg import blas

    from ._threads import single_threaded_blas

    layout = test.layout
    if solver.rank == 0:
        return test.teacher_sq_norms()
    basis = solver.basis
    block = layout.block("student", s)
    c_s, c_t = test.shift["student"][block], test.shift["teacher"]
    # Bᵀ G'_test B; every product here in scipy's BLAS (one thread pool: docs/performance.md).
    w = blas.dgemm(1.0, basis, blas.dgemm(1.0, symmetric(test.gram["student"][s]), basis),
                   trans_a=True)
    ridge_free = bool(np.all(solver.inverse == 1.0))
    if ridge_free:
        # Rotate B (still G_train-orthonormal) to diagonalise W: tr(PᵀG'P) needs no GEMM.
        with single_threaded_blas:  # as Solver's: see closed_form.py
            w, rotation = scipy.linalg.eigh(w, driver="evd")
        basis = blas.dgemm(1.0, basis, rotation)
    shape = (basis.shape[1], layout.total["teacher"])
    y, z = (buffer[: shape[0] * shape[1]].reshape(shape, order="F") for buffer in scratch)
    y = blas.dgemm(1.0, basis, test.cross[block].T, beta=0.0, c=y, trans_a=True,
                   trans_b=True, overwrite_c=True)
    z = blas.dgemm(1.0, basis, total.cross[block].T, beta=0.0, c=z, trans_a=True,
                   trans_b=True, overwrite_c=True)
    np.subtract(z, y, out=z)  # Bᵀ C'_train
    # C_train = C'_train + a'_train c_tᵀ + c_s (b'_train + n_train c_t)ᵀ (a rank-2 update).
    n_train = float(total.n - test.n)
    a_train = total.sum["student"][block] - test.sum["student"][block]
    b_train = total.sum["teacher"] - test.sum["teacher"]
    left = blas.dgemm(1.0, basis, np.column_stack([a_train, c_s]), trans_a=True)
    right = np.asfortranarray(np.vstack([c_t, b_train + n_train * c_t]))
    z = blas.dgemm(1.0, left, right, beta=1.0, c=z, overwrite_c=True)
    if ridge_free:
        quad = np.einsum("i,ij,ij->j", w, z, z)
    else:
        z *= solver.inverse[:, None]
        quad = np.einsum("ij,ij->j", z, blas.dgemm(1.0, w, z))
    quad -= 2.0 * np.einsum("ij,ij->j", z, y)  # tr(Pᵀ G'_test P) − 2 tr(Pᵀ C'_test)
    # Pᵀ c_s and Pᵀ a'_test in one pass over Z.
    sums = np.column_stack([c_s, test.sum["student"][block]])
    fitted = blas.dgemm(1.0, z, blas.dgemm(1.0, basis, sums, trans_a=True), trans_a=True)
    delta = c_t - fitted[:, 0]
    per_column = quad + 2.0 * delta * (test.sum["teacher"] - fitted[:, 1]) + test.n * delta**2
    return test_traces + layout.reduce("teacher", per_column)


def teacher_variance(m: Moments) -> np.ndarray:
    """``(q_t − ‖b_t‖²/n) / (n d_t)`` from the shifted sums (shift invariant): (n_t,)."""
    widths = np.asarray(m.layout.widths["teacher"], dtype=np.float64)
    return np.maximum(m.centred_traces("teacher"), 0.0) / (m.n * widths)


def centred_norms(m: Moments, side: str) -> np.ndarray:
    """``‖Ĝ_l‖_F`` for every layer of ``side``."""
    from .kernels.gram import centred_gram_square_norm

    sums = [m.sum[side][m.layout.block(side, k)] for k in range(m.layout.count(side))]
    return np.sqrt([max(centred_gram_square_norm(g, a, float(m.n)), 0.0)
                    for g, a in zip(m.gram[side], sums, strict=True)])


def cross_squares(m: Moments) -> np.ndarray:
    """``‖Ĉ_st‖_F²`` for every pair: (n_s, n_t), one pass over ``C'``."""
    from .kernels import gram
    from .kernels._jit import available_threads

    layout = m.layout
    rows = np.empty((layout.total["student"], layout.count("teacher")))
    centre = -m.sum["teacher"] / float(m.n)
    parallel = m.cross.size >= PARALLEL_MIN_ENTRIES and available_threads() > 1
    kernel = (gram.centred_cross_row_squares_parallel if parallel
              else gram.centred_cross_row_squares_serial)
    kernel(m.cross, m.sum["student"], centre, layout.offsets["teacher"], rows)
    return layout.reduce("student", rows.T).T


def linear_cka(m: Moments, debiased: bool, constant: str = "nan") -> np.ndarray:
    """Linear CKA of every pair, (n_s, n_t); NaN where a layer has no (estimated) variance.

    Debiased: the unbiased HSIC estimator (Song et al. 2012) in its feature-space
    form (Kornblith et al. 2019),
    ``‖Ĉ‖² − n/(n−2) Σ_i r̂^s_i r̂^t_i + tr Ĝ tr Ĥ / ((n−1)(n−2))`` with ``r̂_i`` the
    squared norm of a centred row: the fourth-order moments at the mean shift.
    """
    products = cross_squares(m)
    norm_s, norm_t = centred_norms(m, "student") ** 2, centred_norms(m, "teacher") ** 2
    if debiased:
        n = float(m.n)
        centre = {side: -m.sum[side] / n for side in ("student", "teacher")}
        u, q_s, q_t = m.quartic_at(centre)
        tr_s, tr_t = m.centred_traces("student"), m.centred_traces("teacher")
        ratio, scale = n / (n - 2.0), 1.0 / ((n - 1.0) * (n - 2.0))
        products = products - ratio * u + scale * np.outer(tr_s, tr_t)
        norm_s = norm_s - ratio * q_s + scale * tr_s**2
        norm_t = norm_t - ratio * q_t + scale * tr_t**2
    denominator = np.sqrt(np.maximum(norm_s, 0.0))[:, None] * np.sqrt(np.maximum(norm_t, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.where(denominator > 0, products / denominator, np.nan)
    if constant == "raise" and np.isnan(values).any():
        s, t = np.argwhere(np.isnan(values))[0]
        raise ValueError(
            f"cka: the pair (student {s}, teacher {t}) is undefined: a layer is constant "
            "over the rows used (or, debiased, too few rows to estimate its variance); "
            "drop it, or pass constant='nan'"
        )
    return values


def residuals(total: Moments, folds, ridge: float, cutoffs) -> np.ndarray:
    """Best residual sums of every pair: (n_s, n_t) in-sample (``folds`` None), else
    (k, n_s, n_t) on each held-out fold with ``P`` fitted on the other folds."""
    n_s = total.layout.count("student")
    if folds is None:
        return np.stack([min_residuals(total, s, Solver(total.gram_of("student", s, False),
                                                        ridge, cutoffs[s]))
                         for s in range(n_s)])
    out = np.empty((len(folds), n_s, total.layout.count("teacher")))
    traces = [test.teacher_traces() for test in folds]
    size = max(total.layout.widths["student"]) * total.layout.total["teacher"]
    scratch = (np.empty(size), np.empty(size))
    for s in range(n_s):
        total_gram = symmetric(total.gram["student"][s])
        for f, test in enumerate(folds):
            solver = Solver(difference_gram(total_gram, total, test, s), ridge, cutoffs[s],
                            triangular=False)
            out[f, s] = heldout_residuals(total, test, s, solver, traces[f], scratch)
    return out


def relative(m: Moments, residual: np.ndarray, constant: str, what: str) -> np.ndarray:
    """``residual / (n d_t var_t)`` (1 − R²) with the teacher variance of ``m``; NaN (or a
    ValueError, ``constant="raise"``) for a constant teacher layer."""
    variance = teacher_variance(m)
    if constant == "raise" and not np.all(variance > 0):
        layers = np.flatnonzero(~(variance > 0)).tolist()
        raise ValueError(
            f"{what}: teacher layer(s) {layers} are constant over the rows used (variance "
            "0), so the measure is undefined for them; drop those layers, or pass "
            "constant='nan' to get NaN there"
        )
    widths = np.asarray(m.layout.widths["teacher"], dtype=np.float64)
    mse = np.maximum(residual, 0.0) / (m.n * widths)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(variance > 0, mse / variance, np.nan)
