"""The Numba work around the GEMMs of :class:`pkd.AlignmentStats`.

One chunk of ``m`` selected rows is accumulated as (DESIGN §1, shifted form)::

    X_S = [S_0 - c_0 | ... | S_{n_s-1} - c_{n_s-1}]        (m × Σd_s, float64)
    X_T = [T_0 - c'_0 | ... | T_{n_t-1} - c'_{n_t-1}]      (m × Σd_t, float64)
    G'_s += X_sᵀ X_s   (dsyrk)   H'_t += X_tᵀ X_t   (dsyrk)   C' += X_Sᵀ X_T   (one dgemm)
    a' += X_Sᵀ 1       b' += X_Tᵀ 1                          (this kernel, fused in the copy)

The kernel below does everything but the BLAS calls, in one pass over the
input: gathers the selected rows (0/1 mask → row indices), subtracts the
per-feature shift, casts float32 → float64 and writes the chunk buffer in
feature-major order (``out`` is ``X_Sᵀ``: row ``j`` holds feature ``j`` of
all ``m`` rows), so that each layer's block of columns of ``X_S`` is a
Fortran-contiguous matrix that ``scipy.linalg.blas.dsyrk``/``dgemm`` take
without a copy, with ``beta=1`` accumulating straight into the float64 sums.

Why float64 GEMMs (cast the chunk, then dgemm) rather than float32 GEMMs
added into float64 accumulators: a float32 GEMM sums each chunk's products
in float32, an error of ~1e-7·λ_max in every entry of ``G_s``, far above the
1e-12·λ_max eigenvalue cutoff the closed form relies on (DESIGN §1,
rank-deficient paragraph): the small directions that separate signal from
noise would be drowned. With float64 GEMMs the products of float32 inputs
are exact and only the float64 sum rounds. The price, measured on this
machine (2-core AMD EPYC Zen 4, scipy's OpenBLAS 0.3.30; 6 student × 12
teacher layers, d_s = 384, d_t = 768, N = 20,000 float32 rows, medians of 5,
by a scratch script that belongs in ``pkd bench``): the float64 dsyrk/dgemm
calls alone take 10.2 s (99 GFLOP/s); float32 GEMMs plus float64 adds would
take 5.6 s. The
whole accumulation (validation, this kernel, the GEMMs) takes 11.7 s at
``chunk_rows = 4096``, 1.15× its GEMMs alone (1.08× at 1024: a smaller
buffer costs fewer first-touch page faults).

Why feature-major (a transposing copy) rather than copying the chunk's rows
as they are and handing BLAS a leading dimension: the row-major copy is
1.3–1.8× faster, but scipy's ``blas`` wrappers take no leading dimension (a
layer's columns of a row-major chunk are not contiguous), and through
``scipy.linalg.cython_blas`` with ``lda`` (dsyrk ``N``, dgemm ``N T``, a
scratch script, 2-core AMD EPYC family 25 model 17) the whole accumulation
took 0.98–1.14× the time of this one (1 × 1 and 6 × 12 layers, N = 4096):
what the copy gains, BLAS loses in the other orientation.

Serial, on purpose: a ``parallel=True`` twin (prange over features, same
fixed-order sums) measured 1.0–3.8× *slower* on this 2-core machine
(d = 384/768, m = 4096, float32/float64 input), and the kernel is a few
percent of the GEMM time anyway. Each feature's column sum is a serial loop
over the chunk's rows in a fixed order, so results are deterministic.
"""

from __future__ import annotations

import numpy as np

from ._jit import kernel


@kernel
def fill_shifted_transposed(values, rows, shift, out, column_sums):
    """Write ``out[j, i] = values[rows[i], j] - shift[j]`` and add its row sums.

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
    """
    m = rows.shape[0]
    d = values.shape[1]
    # Feature-outer order: the writes are contiguous, and the m input cache
    # lines a feature reads (m·64 B, 256 KiB at m = 4096) stay in L2 for the
    # next 15 (float32) features. Measured 2.8× faster than row-outer order.
    for j in range(d):
        c = shift[j]
        total = 0.0
        for i in range(m):
            v = np.float64(values[rows[i], j]) - c
            out[j, i] = v
            total += v
        column_sums[j] += total
