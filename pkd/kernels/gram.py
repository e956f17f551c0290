"""The Numba work around the GEMMs of :class:`pkd.AlignmentStats`: the chunk copy, and the
centred squared norms of its CKA query.

One chunk of ``m`` selected rows is accumulated as (docs/numerics.md, shifted form)::

    X_S = [S_0 - c_0 | ... | S_{n_s-1} - c_{n_s-1}]        (m × Σd_s, float64)
    X_T = [T_0 - c'_0 | ... | T_{n_t-1} - c'_{n_t-1}]      (m × Σd_t, float64)
    G'_s += X_sᵀ X_s   (dsyrk)   H'_t += X_tᵀ X_t   (dsyrk)   C' += X_Sᵀ X_T   (one dgemm)
    a' += X_Sᵀ 1       b' += X_Tᵀ 1       ‖x'_i‖² per layer      (this kernel, fused in the copy)

The kernel below does everything but the BLAS calls, in one pass over the
input: gathers the selected rows (0/1 mask → row indices), subtracts the
per-feature shift, casts float32 → float64 and writes the chunk buffer in
feature-major order (``out`` is ``X_Sᵀ``: row ``j`` holds feature ``j`` of
all ``m`` rows), so that each layer's block of columns of ``X_S`` is a
Fortran-contiguous matrix that ``scipy.linalg.blas.dsyrk``/``dgemm`` take
without a copy, with ``beta=1`` accumulating straight into the float64 sums.

Float64 GEMMs (cast the chunk, then dgemm) rather than float32 GEMMs added into
float64 accumulators: a float32 GEMM sums each chunk's products in float32, an
error of ~1e-7·λ_max in every entry of ``G_s``, far above the closed form's cut
(a singular value at most ``cutoff``·σ₁ is noise, like lstsq's ``rcond``: 1e-6
for float32 data, so eigenvalues of ``G_s`` down to 1e-12·λ_max are kept; see
docs/numerics.md, "The closed form and its cut"), whereas the products of
float32 inputs are exact in float64 and only the sum rounds. The
price, about twice the GEMM time of float32, is in docs/performance.md
("Alignment statistics").

Feature-major (a transposing copy) rather than the chunk's rows as they are
with a leading dimension: scipy's ``blas`` wrappers take no leading dimension,
and through ``scipy.linalg.cython_blas`` what the faster row-major copy gains,
BLAS loses in the other orientation (docs/performance.md).

Serial, on purpose: the kernel is a few percent of the GEMM time, and a
``parallel=True`` twin (prange over features) was slower on two cores. Each
feature's column sum is a serial loop over the chunk's rows in a fixed order,
so results are deterministic.
"""

from __future__ import annotations

import numba
import numpy as np

from ._jit import kernel, twins


@kernel
def fill_shifted_transposed(values, rows, shift, out, column_sums, row_squares):
    """Write ``out[j, i] = values[rows[i], j] - shift[j]``; add its row sums and squared norms.

    Parameters
    ----------
    values : ndarray, shape (N, d), float32 or float64
        One layer's hidden states, rows flattened.
    rows : ndarray, shape (m,), int64
        Indices (into ``values``) of the chunk's selected rows, in order.
    shift : ndarray, shape (d,), float64
        The layer's shift vector ``c``.
    out : ndarray, shape (d, m), float64
        Receives the shifted chunk, transposed (feature-major).
    column_sums : ndarray, shape (d,), float64
        Incremented by ``Σ_i out[j, i]`` for every feature ``j``.
    row_squares : ndarray, shape (m,), float64
        Set to ``Σ_j out[j, i]²`` for every row ``i`` (the third- and fourth-order
        moments' ``‖x'_i‖²``, here while the values are in registers).
    """
    m = rows.shape[0]
    d = values.shape[1]
    row_squares[:] = 0.0
    # Feature-outer order: the writes are contiguous, and the m input cache lines a
    # feature reads stay in L2 for the next features of the same lines (several
    # times faster than row-outer order: docs/performance.md).
    for j in range(d):
        c = shift[j]
        total = 0.0
        for i in range(m):
            v = np.float64(values[rows[i], j]) - c
            out[j, i] = v
            total += v
            row_squares[i] += v * v
        column_sums[j] += total


# The CKA query needs only ‖Ĝ_l‖_F² and ‖Ĉ_st‖_F²: one read of the stored statistics,
# centred on the fly, instead of forming full centred copies (docs/performance.md).


@kernel(reassociate=True)
def centred_gram_square_norm(upper, column_sums, n):
    """``‖G' − a aᵀ/n‖_F²`` from the upper triangle of ``G'``.

    Parameters
    ----------
    upper : ndarray, shape (d, d), float64
        ``G'``; only its upper triangle (diagonal included) is read.
    column_sums : ndarray, shape (d,), float64
        ``a = Σ w x'``.
    n : float
        ``Σ w``.

    Returns
    -------
    float
        The squared Frobenius norm of the centred Gram matrix ``Ĝ``.
    """
    d = upper.shape[0]
    total = 0.0
    for j in range(d):
        mean_j = -column_sums[j] / n
        off_diagonal = 0.0
        for i in range(j):
            v = upper[i, j] + column_sums[i] * mean_j
            off_diagonal += v * v
        v = upper[j, j] + column_sums[j] * mean_j
        total += 2.0 * off_diagonal + v * v
    return total


def _centred_cross_row_squares(cross, student_sums, teacher_centre, teacher_offsets, out):
    """``out[i, t] = Σ_{j ∈ t} (C'_ij + a_i δ_j)²`` with ``δ = −b/n``: the rows of ``Ĉ``, squared.

    Parameters
    ----------
    cross : ndarray, shape (Σd_s, Σd_t), float64
        ``C'``.
    student_sums : ndarray, shape (Σd_s,), float64
        ``a``.
    teacher_centre : ndarray, shape (Σd_t,), float64
        ``δ = −b/n`` (``b = Σ w y'``).
    teacher_offsets : ndarray, shape (n_t + 1,), int64
        Column offsets of the teacher layers.
    out : ndarray, shape (Σd_s, n_t), float64
        Receives the sums (each row by one thread, so the result is the same for any
        thread count).
    """
    n_t = teacher_offsets.shape[0] - 1
    for i in numba.prange(cross.shape[0]):
        a = student_sums[i]
        for t in range(n_t):
            total = 0.0
            for j in range(teacher_offsets[t], teacher_offsets[t + 1]):
                v = cross[i, j] + a * teacher_centre[j]
                total += v * v
            out[i, t] = total


centred_cross_row_squares_serial, centred_cross_row_squares_parallel = twins(
    _centred_cross_row_squares, reassociate=True)
