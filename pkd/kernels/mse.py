"""Fused pass of the projected MSE: residual, mask, loss, and ∂ℓ/∂Y in one sweep.

The GEMMs (Y = S P, and the backward Sᵀ G, G Pᵀ) run in BLAS; this pass is
everything between them, so each N×d_t array is read once and written once.

Row indexing: ``y[i]`` is compared with ``teacher[teacher_rows[i]]`` and the
scaled residual is written to ``out[i]``. With a projection, ``y`` is the
compacted buffer S[rows] P (rows = the selected tokens), ``teacher_rows`` the
selected rows and ``out`` aliases ``y``. Without one, ``mse_direct`` reads the
student itself and writes straight into the student gradient.

Each row's squared residual goes into ``row_loss[i]`` (float64); the caller
sums them in a fixed order. Serial: the pass is memory-bound, and a
``parallel=True`` twin gained nothing measurable on two threads while losing
heavily when the cores are shared (docs/performance.md, "Parallel kernels").
"""

from __future__ import annotations

import numpy as np

from ._jit import kernel


@kernel(reassociate=True, fuse_multiply_add=True)
def mse_compact(y, teacher, teacher_rows, grad_scale, row_loss):
    """y : (M, d_t), overwritten with G = grad_scale·(y − teacher[teacher_rows]).

    teacher : (N, d_t); teacher_rows : (M,) int64; grad_scale : scalar of y's dtype;
    row_loss : (M,) float64, receives Σ_j (y_ij − t_ij)².
    """
    n_rows, width = y.shape
    for i in range(n_rows):
        t_row = teacher[teacher_rows[i]]
        acc = 0.0
        for j in range(width):
            r = y[i, j] - t_row[j]
            acc += np.float64(r) * np.float64(r)
            y[i, j] = grad_scale * r
        row_loss[i] = acc


@kernel(reassociate=True, fuse_multiply_add=True)
def mse_direct(student, teacher, rows, grad_scale, grad_student, accumulate, row_loss):
    """No projection (Y = S): rows ``rows`` of student vs teacher, G into grad_student.

    student, teacher, grad_student : (N, d); rows : (M,) int64;
    row_loss : (M,) float64. With ``accumulate`` G is added to grad_student.
    """
    width = student.shape[1]
    for k in range(rows.shape[0]):
        i = rows[k]
        acc = 0.0
        for j in range(width):
            r = student[i, j] - teacher[i, j]
            acc += np.float64(r) * np.float64(r)
            if accumulate:
                grad_student[i, j] += grad_scale * r
            else:
                grad_student[i, j] = grad_scale * r
        row_loss[k] = acc
