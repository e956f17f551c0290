"""Scatter of the selected rows' student gradient back into the full gradient.

With a mask, the GEMMs run on the gathered rows only, so ``G Pᵀ`` comes out
compacted (one row per selected row) and must be written back to rows
``rows`` of the student gradient, the other rows being exactly zero.

NumPy spells this ``out.fill(0); out[rows] = values`` (or ``out[rows] +=
values``); its fancy-index assignment is several times slower than this loop,
which runs at the speed of a plain copy and zeroes the rows not selected in
the same pass, so each row of ``out`` is written once (docs/performance.md,
"Kernels"). Serial: a copy is memory-bound.
"""

from __future__ import annotations

from ._jit import kernel


@kernel
def scatter_rows(values, rows, out, accumulate):
    """Write ``values[k]`` to ``out[rows[k]]``; zero the other rows unless ``accumulate``.

    values : (M, d); rows : (M,) int64, sorted, unique, in ``range(N)``;
    out : (N, d), same dtype. With ``accumulate`` the values are added to
    ``out[rows]`` and the other rows are left untouched.
    """
    width = out.shape[1]
    if accumulate:
        for k in range(rows.shape[0]):
            i = rows[k]
            for j in range(width):
                out[i, j] += values[k, j]
        return
    k = 0
    for i in range(out.shape[0]):
        if k < rows.shape[0] and rows[k] == i:
            for j in range(width):
                out[i, j] = values[k, j]
            k += 1
        else:
            for j in range(width):
                out[i, j] = 0
