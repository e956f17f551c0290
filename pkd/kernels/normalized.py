"""Fused pass of PKD's normalized ("patient") loss and its gradient.

Per row (DESIGN.md §1): u = y/max(‖y‖, ε), v = t/max(‖t‖, ε),
ℓ_i = ‖u − v‖², and ∂ℓ_i/∂y = ((u·v) u − v)/‖y‖ (‖y‖ > ε) or (u − v)/ε.
The caller's ``grad_scale`` carries 2 w_i / n_w and the pair's weight.

Everything per row is computed in float64 (norms, dot product, loss, the
gradient) and the gradient is rounded once into the input's dtype. The loss
is summed directly as Σ (u_j − v_j)², not as 2 − 2 u·v, which would lose all
digits when the student is close to the teacher.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from ._jit import kernel, twins

EPS = 1e-12


@kernel(reassociate=True)
def _normalized_row(y_row, t_row, grad_scale, out_row, accumulate):
    """One row: returns ‖u − v‖², writes (or adds) grad_scale·∂ℓ/∂y into out_row."""
    width = y_row.shape[0]
    y_sq = 0.0
    t_sq = 0.0
    dot = 0.0
    for j in range(width):
        yj = np.float64(y_row[j])
        tj = np.float64(t_row[j])
        y_sq += yj * yj
        t_sq += tj * tj
        dot += yj * tj
    y_norm = math.sqrt(y_sq)
    y_den = max(y_norm, EPS)
    t_den = max(math.sqrt(t_sq), EPS)
    cosine = dot / (y_den * t_den)  # u·v
    if y_norm > EPS:
        u_coef = grad_scale * cosine / (y_den * y_norm)
        v_coef = grad_scale / (t_den * y_norm)
    else:
        u_coef = grad_scale / (y_den * EPS)
        v_coef = grad_scale / (t_den * EPS)
    loss = 0.0
    for j in range(width):
        yj = np.float64(y_row[j])
        tj = np.float64(t_row[j])
        diff = yj / y_den - tj / t_den
        loss += diff * diff
        g = u_coef * yj - v_coef * tj
        if accumulate:
            out_row[j] += g
        else:
            out_row[j] = g
    return loss



def _normalized_compact(y, teacher, teacher_rows, grad_scale, row_loss):
    """y : (M, d_t), overwritten with the scaled ∂ℓ/∂Y; see module docstring.

    teacher : (N, d_t); teacher_rows : (M,) int64; grad_scale : float64;
    row_loss : (M,) float64, receives ‖u_i − v_i‖².
    """
    n_rows, width = y.shape
    for i in prange(n_rows):
        t_row = teacher[teacher_rows[i]]
        row_loss[i] = _normalized_row(y[i], t_row, grad_scale, y[i], False)


def _normalized_direct(student, teacher, rows, grad_scale, grad_student, accumulate, row_loss):
    """No projection: rows ``rows`` of student vs teacher, ∂ℓ/∂S into grad_student."""
    for k in prange(rows.shape[0]):
        i = rows[k]
        row_loss[k] = _normalized_row(student[i], teacher[i], grad_scale, grad_student[i],
                                      accumulate)


normalized_compact_serial, normalized_compact_parallel = twins(_normalized_compact,
                                                               reassociate=True)
normalized_direct_serial, normalized_direct_parallel = twins(_normalized_direct,
                                                             reassociate=True)
