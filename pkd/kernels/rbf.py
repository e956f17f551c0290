"""The Numba passes of RBF CKA, between the one GEMM per layer (``G = X Xᵀ``) and the result.

A symmetric n × n matrix is kept as its strict lower triangle, packed row
by row (``packed[i(i−1)/2 + j]`` holds entry ``(i, j)``, ``j < i``), with its
diagonal apart: half the memory of the full matrix, and every pass reads
contiguous rows. The passes (the algebra is in :mod:`pkd.cka`):

1. ``squared_distances``: ``D_ij = G_ii + G_jj − 2 G_ij`` from the lower
   triangle of the float64 Gram matrix (clamped at 0: rounding may leave
   ``−1e−16`` where two rows coincide), counted in a histogram as written;
2. the median of D: ``gather`` copies out the few entries in the
   histogram's median bin, which NumPy partitions (``histogram`` recounts a
   narrower range when the bin holds too many): no copy of D, and one
   parallel pass instead of a serial partition of n(n−1)/2 entries;
3. ``rbf_row_sums``: ``K_ij = exp(−D_ij / denominator)`` in place, and the row
   sums of the full symmetric ``K`` (unit diagonal);
4. ``centre_packed``: ``K_ij − μ_i − μ_j + μ̄`` in place (double centring,
   ``μ`` the row means, ``μ̄`` the grand mean), and the centred diagonal;
5. ``packed_inner_products``: the Frobenius inner products ``⟨A_k, B⟩`` of
   symmetric matrices, ``2 Σ_packed + Σ_diagonal``: the HSIC sums.

Results do not depend on the thread count. Every entry is written by one
thread. The histogram counts are integers, per fixed group of rows
(``N_GROUPS``), and ``gather`` writes each group's entries at offsets taken
from those counts. ``rbf_row_sums`` sums each row's lower part in one
thread, and its upper part (a column of the triangle) in fixed blocks of
``BLOCK_ROWS`` rows whose partial sums are added in block order after the
parallel loop. ``packed_inner_products`` splits the packed vectors into
fixed chunks of ``CHUNK`` entries and adds the chunks' sums in order. Rows
(or blocks) ``h`` and ``n − 1 − h`` go to the same iteration, so that every
iteration over a triangle has the same work (prange hands each thread a
contiguous range of iterations).

Every kernel has a serial and a ``prange`` twin (:func:`pkd.kernels._jit.twins`);
:mod:`pkd.cka` picks one by a documented rule.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ._jit import kernel, twins

# Rows per block of the row-sum pass; fixed, so that sums do not depend on the threads.
BLOCK_ROWS = 64
# Packed entries per chunk of the inner-product pass (128 KiB of float64, L2-resident).
CHUNK = 1 << 14
# The median's histogram: bins over [lo, hi), plus a slot below and one above.
N_BINS = 4096
# Fixed groups of rows, each with its own histogram row (exact integer counts).
N_GROUPS = 64


def _squared_distances(gram, norms, lo, hi, out, counts):
    """Write the packed squared distances and count them per histogram slot.

    gram : (n, n) float64, C-contiguous; only entries ``(i, j)`` with ``j < i`` are read.
    norms : (n,) float64, the diagonal ``G_ii`` (contiguous: read for every entry).
    lo, hi : float, ``lo < hi``: the histogram's range (see :func:`_slot`).
    out : (n(n−1)/2,) float64, receives ``max(G_ii + G_jj − 2 G_ij, 0)`` (NaN stays NaN).
    counts : (N_GROUPS, N_BINS + 2) int64, overwritten: row g counts the entries of the
        rows of group g (:func:`_group_pairs`).
    """
    n = gram.shape[0]
    scale = N_BINS / (hi - lo)
    counts[:] = 0
    for task in prange(N_GROUPS):
        g = np.int64(task)  # prange's index may be unsigned: keep the arithmetic signed
        row = counts[g]
        for i in _group_rows(n, g):
            start = i * (i - 1) // 2
            g_ii = norms[i]
            for j in range(i):
                d = g_ii + norms[j] - 2.0 * gram[i, j]
                if d < 0.0:
                    d = 0.0
                out[start + j] = d
                row[_slot(d, lo, hi, scale)] += 1


def _rbf_row_sums(packed, n, denominator, row_sums, column_partials):
    """Replace ``packed`` by ``exp(−packed / denominator)``; row sums of the full kernel.

    packed : (n(n−1)/2,) float64, the squared distances, overwritten by the kernel values.
    n : int, the matrix's order.
    denominator : float, ``2σ²``.
    row_sums : (n,) float64, receives ``Σ_j K_ij`` over the full symmetric matrix, the
        unit diagonal included.
    column_partials : (ceil(n / BLOCK_ROWS), n) float64, scratch.
    """
    n_blocks = column_partials.shape[0]
    for task in prange((n_blocks + 1) // 2):
        h = np.int64(task)  # prange's index may be unsigned: keep the arithmetic signed
        for side in range(2):
            b = np.int64(h) if side == 0 else n_blocks - 1 - np.int64(h)
            if side == 1 and b == h:
                break
            partial = column_partials[b]
            for j in range(n):
                partial[j] = 0.0
            for i in range(b * BLOCK_ROWS, min(n, (b + 1) * BLOCK_ROWS)):
                start = i * (i - 1) // 2
                acc = 0.0
                for j in range(i):
                    k = np.exp(-packed[start + j] / denominator)
                    packed[start + j] = k
                    acc += k
                    partial[j] += k
                row_sums[i] = acc
    # Serial, in block order: the upper part of row i is column i of the lower triangle.
    # Block-outer, so that the partials are read along their rows.
    for i in range(n):
        row_sums[i] = 1.0 + row_sums[i]
    for b in range(n_blocks):
        for i in range(n):
            row_sums[i] += column_partials[b, i]


def _centre_packed(packed, n, row_means, grand_mean, diagonal, centred_diagonal):
    """Double-centre a packed symmetric matrix in place: ``K_ij − μ_i − μ_j + μ̄``.

    packed : (n(n−1)/2,) float64, overwritten.
    n : int.
    row_means : (n,) float64, ``μ_i = Σ_j K_ij / n``.
    grand_mean : float, ``μ̄ = Σ_ij K_ij / n²``.
    diagonal : (n,) float64, ``K_ii``.
    centred_diagonal : (n,) float64, receives ``K_ii − 2μ_i + μ̄``.
    """
    for task in prange((n + 1) // 2):
        h = np.int64(task)  # prange's index may be unsigned: keep the arithmetic signed
        for side in range(2):
            i = np.int64(h) if side == 0 else n - 1 - np.int64(h)
            if side == 1 and i == h:
                break
            start = i * (i - 1) // 2
            shift = grand_mean - row_means[i]
            for j in range(i):
                packed[start + j] = packed[start + j] + shift - row_means[j]
            centred_diagonal[i] = diagonal[i] + shift - row_means[i]


def _packed_inner_products(stack, stack_diagonal, vector, vector_diagonal, out):
    """``out[k] = ⟨A_k, B⟩_F`` for symmetric matrices stored packed.

    stack : (p, m) float64, the packed strict lower triangles of ``A_0 … A_{p−1}``.
    stack_diagonal : (p, n) float64, their diagonals.
    vector : (m,) float64, the packed strict lower triangle of ``B``.
    vector_diagonal : (n,) float64, its diagonal.
    out : (p,) float64, receives ``2 Σ_e stack[k, e]·vector[e] + Σ_i diag_k[i]·diag_B[i]``.
    """
    p, m = stack.shape
    n_chunks = (m + CHUNK - 1) // CHUNK
    partials = np.zeros((max(n_chunks, 1), p))
    for task in prange(n_chunks):
        c = np.int64(task)  # prange's index may be unsigned: keep the arithmetic signed
        lo = c * CHUNK
        hi = min(m, lo + CHUNK)
        for k in range(p):
            acc = 0.0
            for e in range(lo, hi):
                acc += stack[k, e] * vector[e]
            partials[c, k] = acc
    for k in range(p):
        total = 0.0
        for c in range(n_chunks):
            total += partials[c, k]
        diagonal = 0.0
        for i in range(vector_diagonal.shape[0]):
            diagonal += stack_diagonal[k, i] * vector_diagonal[i]
        out[k] = 2.0 * total + diagonal


@kernel
def _slot(value, lo, hi, scale):
    """Histogram slot of ``value``: 0 below ``lo``, N_BINS + 1 at or above ``hi``, else 1 + bin."""
    if value < lo:
        return 0
    if value >= hi:
        return N_BINS + 1
    b = int((value - lo) * scale)
    return 1 + (b if b < N_BINS else N_BINS - 1)


@kernel
def _group_rows(n, g):
    """The rows of group ``g``, int64: rows ``h`` and ``n − 1 − h`` for each of its pairs ``h``."""
    first, stop = _group_pairs(n, g)
    rows = np.empty(2 * (stop - first), np.int64)
    k = 0
    for h in range(first, stop):
        rows[k] = h
        k += 1
        if n - 1 - h != h:
            rows[k] = n - 1 - h
            k += 1
    return rows[:k]


@kernel
def _group_pairs(n, g):
    """Row pairs ``[first, stop)`` of group ``g``: pair ``h`` is rows ``h`` and ``n − 1 − h``."""
    group = np.int64(g)
    half = (n + 1) // 2
    per = (half + N_GROUPS - 1) // N_GROUPS
    return min(half, group * per), min(half, (group + 1) * per)


def _histogram(packed, n, lo, hi, counts):
    """Count the packed entries per slot of :func:`_slot`, per group of rows.

    packed : (n(n−1)/2,) float64, finite.
    n : int.
    lo, hi : float, ``lo < hi``.
    counts : (N_GROUPS, N_BINS + 2) int64, overwritten as in :func:`_squared_distances`.
    """
    scale = N_BINS / (hi - lo)
    counts[:] = 0
    for task in prange(N_GROUPS):
        g = np.int64(task)  # prange's index may be unsigned: keep the arithmetic signed
        row = counts[g]
        for i in _group_rows(n, g):
            start = i * (i - 1) // 2
            for e in range(start, start + i):
                row[_slot(packed[e], lo, hi, scale)] += 1


def _gather(packed, n, lo, hi, first_slot, last_slot, offsets, out):
    """Copy the entries whose slot is in ``[first_slot, last_slot]`` to ``out``, group by group.

    Slots of bins only: ``1 <= first_slot <= last_slot <= N_BINS``.

    offsets : (N_GROUPS,) int64, where each group's entries start in ``out`` (from the
        counts of the same ``lo``, ``hi``).
    out : (Σ counts,) float64.
    """
    scale = N_BINS / (hi - lo)
    # A value window one bin wider on each side than the slots: the slot itself (the
    # histogram's rounding) is computed only for the few values inside it.
    width = (hi - lo) / N_BINS
    window_lo = lo + (first_slot - 2) * width
    window_hi = lo + (last_slot + 1) * width
    for task in prange(N_GROUPS):
        g = np.int64(task)  # prange's index may be unsigned: keep the arithmetic signed
        k = offsets[g]
        for i in _group_rows(n, g):
            start = i * (i - 1) // 2
            for e in range(start, start + i):
                value = packed[e]
                if window_lo <= value < window_hi:
                    s = _slot(value, lo, hi, scale)
                    if first_slot <= s <= last_slot:
                        out[k] = value
                        k += 1


squared_distances_serial, squared_distances_parallel = twins(
    _squared_distances)
rbf_row_sums_serial, rbf_row_sums_parallel = twins(_rbf_row_sums)
centre_packed_serial, centre_packed_parallel = twins(_centre_packed)
histogram_serial, histogram_parallel = twins(_histogram)
gather_serial, gather_parallel = twins(_gather)
# Sums of products only, so FMAs and split SIMD lanes are safe (see _jit).
packed_inner_products_serial, packed_inner_products_parallel = twins(
    _packed_inner_products, reassociate=True, fuse_multiply_add=True)
