"""The Numba passes of RBF CKA, between the one GEMM per layer (``G = X Xᵀ``) and the result.

A symmetric n × n matrix is kept as its strict lower triangle, packed row
by row (``packed[i(i−1)/2 + j]`` holds entry ``(i, j)``, ``j < i``), with its
diagonal apart: half the memory of the full matrix, and every pass reads
contiguous rows. The passes (the algebra is in :mod:`pkd.cka`, their driver in
:mod:`pkd._rbf_workspace`):

1. ``squared_distances``: ``D_ij = G_ii + G_jj − 2 G_ij`` from the lower
   triangle of the float64 Gram matrix (clamped at 0: rounding may leave
   ``−1e−16`` where two rows coincide). It counts the entries below and
   inside a bracket ``[lo, hi)`` that a sample says holds the median, and
   copies those inside to a small buffer, which NumPy partitions: the exact
   median without a copy or a sort of the n(n−1)/2 entries. When the bracket
   misses (or a buffer overflows), ``gather_window`` copies the bracket's
   entries in a second pass, or ``histogram`` and ``gather`` search the
   median bin by bin;
2. ``block_row_sums``: after NumPy's ``exp`` of one block of ``BLOCK_ROWS``
   rows (:func:`pkd._rbf_workspace.kernel_values`), the block's row sums and column
   sums, while the block is in cache;
3. ``centred_inner_products``: ``⟨K̃_k, L̃⟩`` for every kept kernel ``K_k``
   and ``⟨L̃, L̃⟩`` of the streamed one, double-centring each row as it is read
   (``K_ij − μ_i − μ_j + μ̄``, ``μ`` the row means, ``μ̄`` the grand mean;
   no kernel is centred in memory), and the kept kernels' ``⟨K̃_k, K̃_k⟩``
   on the way: the HSIC sums.

Results do not depend on the thread count. Every entry is written by one
thread. Counts are integers, per fixed group of rows (``N_GROUPS``), and
each group's gathered entries go to its own buffer row (or at offsets taken
from the counts). Sums are taken per fixed group of rows (or per block of
``BLOCK_ROWS`` rows) and those partial sums are added in order after the
parallel loop. Rows (or blocks) ``h`` and ``n − 1 − h`` go to the same
iteration, so that every iteration over a triangle has the same work
(prange hands each thread a contiguous range of iterations).

Every prange kernel has a serial twin (:func:`pkd.kernels._jit.twins`);
:func:`pkd._rbf_workspace.twin` picks one by a documented rule. ``block_row_sums`` is
one serial kernel that :mod:`pkd._rbf_workspace` calls from as many threads as that rule
allows (block by block, interleaved with NumPy's ``exp``).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ._jit import kernel, twins

# Rows per block of the row-sum pass; fixed, so that sums do not depend on the threads.
BLOCK_ROWS = 64
# The median's histogram: bins over [lo, hi), plus a slot below and one above.
N_BINS = 4096
# Entries per block of the bracket's gather, skipped as a whole when none is inside.
GATHER_BLOCK = 16
# Fixed groups of rows, each with its own counts (exact integers) and partial sums.
N_GROUPS = 64


def _squared_distances(gram, norms, lo, hi, out, counts, window):
    """Write the packed squared distances; count and copy out those in ``[lo, hi)``.

    gram : (n, n) float64, C-contiguous; only entries ``(i, j)`` with ``j < i`` are read.
    norms : (n,) float64, the diagonal ``G_ii`` (contiguous: read for every entry).
    lo, hi : float, the median's bracket (:mod:`pkd._rbf_workspace` draws it from a sample).
    out : (n(n−1)/2,) float64, receives ``max(G_ii + G_jj − 2 G_ij, 0)`` (NaN stays NaN).
    counts : (N_GROUPS, 2) int64, overwritten: row g counts the entries below ``lo`` and
        those in ``[lo, hi)`` of the rows of group g (:func:`_group_pairs`).
    window : (N_GROUPS, capacity + 1) float64: row g receives group g's first ``capacity``
        entries in ``[lo, hi)`` (rows in :func:`_group_rows` order); its last slot is
        scratch. A group with more (``counts[g, 1] > capacity``) needs :func:`_gather_window`.
    """
    n = gram.shape[0]
    capacity = window.shape[1] - 1
    for task in prange(N_GROUPS):
        g = np.int64(task)  # prange's index may be unsigned: keep the arithmetic signed
        below = 0
        inside = 0
        slots = window[g]
        for i in _group_rows(n, g):
            start = i * (i - 1) // 2
            g_ii = norms[i]
            for first in range(start, start + i, GATHER_BLOCK):
                stop = min(start + i, first + GATHER_BLOCK)
                hits = 0
                for e in range(first, stop):
                    d = g_ii + norms[e - start] - 2.0 * gram[i, e - start]
                    if d < 0.0:
                        d = 0.0
                    out[e] = d
                    # Branch-free counts: the block's loop stays vectorised.
                    below += d < lo
                    hits += (d >= lo) & (d < hi)
                if hits == 0:  # most blocks hold no entry of the bracket
                    continue
                for e in range(first, stop):
                    d = out[e]
                    # Stored always, kept by advancing the slot: no branch per entry.
                    slots[min(inside, capacity)] = d
                    inside += (d >= lo) & (d < hi)
        counts[g, 0] = below
        counts[g, 1] = inside


@kernel(reassociate=True)
def block_row_sums(packed, n, block, row_sums, column_partials):
    """Sums of one block of rows of the packed kernel: the rows' own and the columns'.

    packed : (n(n−1)/2,) float64, the kernel values (only block ``block``'s rows are read).
    n : int, the matrix's order.
    block : int, rows ``block·BLOCK_ROWS`` up to ``(block + 1)·BLOCK_ROWS`` (or n).
    row_sums : (n,) float64, receives ``Σ_{j<i} K_ij`` for the block's rows i.
    column_partials : (ceil(n / BLOCK_ROWS), n) float64, row ``block`` receives
        ``Σ_{i in block, i>j} K_ij`` for every column j (0 where no row of the block is
        below j): the upper part of row j, one block at a time.
    """
    partial = column_partials[block]
    for j in range(n):
        partial[j] = 0.0
    for i in range(block * BLOCK_ROWS, min(n, (block + 1) * BLOCK_ROWS)):
        start = i * (i - 1) // 2
        # The sum in a loop with no store. In a loop that also stores, LLVM checks at run
        # time whether the arrays overlap, over every index Numba's wraparound allows
        # (``start + j`` is not known to be >= 0: up to len(packed) past its end), and
        # where they might it runs the scalar loop, which adds in another order: the
        # bits would depend on where the arrays lie in memory (docs/numerics.md).
        acc = 0.0
        for j in range(i):
            acc += packed[start + j]
        row_sums[i] = acc
        for j in range(i):  # one addition per entry: the same bits on either path
            partial[j] += packed[start + j]


@kernel(reassociate=True, fuse_multiply_add=True)
def _centre_row(packed, start, length, shift, row_means, out):
    """``out[j] = packed[start + j] + shift − μ_j`` for ``j < length``; returns ``Σ out_j²``.

    With ``shift = μ̄ − μ_i``: row i of the double-centred matrix, ``K_ij − μ_i − μ_j + μ̄``.
    """
    for j in range(length):
        out[j] = packed[start + j] + shift - row_means[j]
    # The sum over the row just written, in a loop with no store (block_row_sums says why).
    square = 0.0
    for j in range(length):
        square += out[j] * out[j]
    return square


def _centred_inner_products(stack, stack_means, stack_grand_means, stack_diagonal, packed, n,
                            row_means, grand_mean, diagonal, out):
    """``⟨Ã_k, B̃⟩_F``, ``⟨B̃, B̃⟩_F`` and ``⟨Ã_k, Ã_k⟩_F``, every matrix double-centred on the fly.

    stack : (p, n(n−1)/2) float64, the packed strict lower triangles of ``A_0 … A_{p−1}``
        (not centred; read only).
    stack_means : (p, n) float64, their row means; stack_grand_means : (p,) float64.
    stack_diagonal : (p, n) float64, the diagonals of the centred ``Ã_k``.
    packed : (n(n−1)/2,) float64, the strict lower triangle of ``B`` (not centred; read only).
    n : int.
    row_means : (n,) float64, ``μ_i`` of ``B``; grand_mean : float, ``μ̄``.
    diagonal : (n,) float64, the diagonal of ``B̃``.
    out : (2p + 1,) float64, receives ``⟨Ã_k, B̃⟩`` for k < p, then ``⟨B̃, B̃⟩``, then
        ``⟨Ã_k, Ã_k⟩`` for k < p; each ``2 Σ_packed + Σ_diagonal``, with
        ``B̃_ij = B_ij − μ_i − μ_j + μ̄`` (:func:`_centre_row`).

    ``⟨Ã, B̃⟩`` is the same float as ``⟨B̃, Ã⟩`` (``A`` and ``B`` swapped), and a
    matrix's ``⟨B̃, B̃⟩`` the same whether it is ``B`` or one of the ``A_k``.
    """
    p = stack.shape[0]
    partials = np.zeros((N_GROUPS, 2 * p + 1))
    rows = np.empty((N_GROUPS, 2, n))  # each group's centred rows, reused row after row
    for task in prange(N_GROUPS):
        g = np.int64(task)  # prange's index may be unsigned: keep the arithmetic signed
        row, other = rows[g, 0], rows[g, 1]
        sums = partials[g]
        for i in _group_rows(n, g):
            start = i * (i - 1) // 2
            sums[p] += _centre_row(packed, start, i, grand_mean - row_means[i], row_means,
                                   row)
            for k in range(p):
                means = stack_means[k]
                sums[p + 1 + k] += _centre_row(stack[k], start, i,
                                               stack_grand_means[k] - means[i], means, other)
                sums[k] += _dot(row, other, i)
    for k in range(2 * p + 1):
        total = 0.0
        for g in range(N_GROUPS):
            total += partials[g, k]
        if k < p:
            diagonal_sum = _dot(stack_diagonal[k], diagonal, n)
        elif k == p:
            diagonal_sum = _dot(diagonal, diagonal, n)
        else:
            diagonal_sum = _dot(stack_diagonal[k - p - 1], stack_diagonal[k - p - 1], n)
        out[k] = 2.0 * total + diagonal_sum


@kernel(reassociate=True, fuse_multiply_add=True)
def _dot(a, b, length):
    """``Σ_{j<length} a_j b_j`` (the same float with ``a`` and ``b`` swapped)."""
    acc = 0.0
    for j in range(length):
        acc += a[j] * b[j]
    return acc


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


def _gather_window(packed, n, lo, hi, offsets, out):
    """Copy the entries in ``[lo, hi)`` to ``out``, group by group, each with a spare slot.

    packed : (n(n−1)/2,) float64.
    n : int.
    lo, hi : float.
    offsets : (N_GROUPS,) int64, where group g's entries start in ``out``; its slots are
        ``offsets[g] … offsets[g] + c_g``, ``c_g`` its count in ``[lo, hi)``: the last slot
        receives scratch values.
    out : (Σ (c_g + 1),) float64.
    """
    for task in prange(N_GROUPS):
        g = np.int64(task)  # prange's index may be unsigned: keep the arithmetic signed
        k = offsets[g]
        for i in _group_rows(n, g):
            start = i * (i - 1) // 2
            for first in range(start, start + i, GATHER_BLOCK):
                stop = min(start + i, first + GATHER_BLOCK)
                # A vectorised count first: most blocks hold no entry of the window.
                hits = 0
                for e in range(first, stop):
                    value = packed[e]
                    hits += (value >= lo) & (value < hi)
                if hits == 0:
                    continue
                for e in range(first, stop):
                    value = packed[e]
                    # Stored always, kept by advancing k: no branch per entry.
                    out[k] = value
                    k += (value >= lo) & (value < hi)


squared_distances_serial, squared_distances_parallel = twins(
    _squared_distances)
gather_window_serial, gather_window_parallel = twins(_gather_window)
histogram_serial, histogram_parallel = twins(_histogram)
gather_serial, gather_parallel = twins(_gather)
# Sums of products only, so FMAs and split SIMD lanes are safe (see _jit).
centred_inner_products_serial, centred_inner_products_parallel = twins(
    _centred_inner_products, reassociate=True, fuse_multiply_add=True)
