"""Fused pass of PKD's normalized ("patient") loss and its gradient.

Per row (docs/math.md): u = y/max(‖y‖, ε), v = t/max(‖t‖, ε),
ℓ_i = ‖u − v‖², and ∂ℓ_i/∂y = ((u·v) u − v)/‖y‖ (‖y‖ > ε) or (u − v)/ε.
The caller's ``grad_scale`` carries 2 w_i / n_w and the pair's weight.

Everything per row is computed in float64 (norms, dot product, loss, the
gradient) and the gradient is rounded once into the input's dtype. The loss
is summed directly as Σ (u_j − v_j)², not as 2 − 2 u·v, which would lose all
digits when the student is close to the teacher.

``EPS`` is the ε of the normalized loss, defined here once. Serial, like the
MSE's pass: memory-bound (docs/performance.md, "Parallel kernels").
"""

from __future__ import annotations

import math

import numpy as np

from ._jit import kernel

EPS = 1e-12


@kernel(reassociate=True, fuse_multiply_add=True)
def _row_sums(y, i, teacher, r):
    """(‖y_i‖², ‖t_r‖², y_i·t_r) in float64; reads only, so it vectorises as a helper."""
    y_sq = 0.0
    t_sq = 0.0
    dot = 0.0
    for j in range(y.shape[1]):
        yj = np.float64(y[i, j])
        tj = np.float64(teacher[r, j])
        y_sq += yj * yj
        t_sq += tj * tj
        dot += yj * tj
    return y_sq, t_sq, dot


@kernel
def _row_coefficients(y_sq, t_sq, dot, grad_scale):
    """From ‖y‖², ‖t‖², y·t: (1/max(‖y‖,ε), 1/max(‖t‖,ε), u-coefficient, v-coefficient).

    The gradient row is ``u_coef·y − v_coef·t``: ``grad_scale·((u·v)u − v)/‖y‖`` when
    ‖y‖ > ε, ``grad_scale·(u − v)/ε`` otherwise.
    """
    y_norm = math.sqrt(y_sq)
    y_den = max(y_norm, EPS)
    t_den = max(math.sqrt(t_sq), EPS)
    inv_y = 1.0 / y_den
    inv_t = 1.0 / t_den
    cosine = dot * inv_y * inv_t  # u·v
    # Products of reciprocals, no quotient: LLVM moves a quotient used once by the
    # caller's reassociating loop into that loop, one division per SIMD vector.
    if y_norm > EPS:
        scale = grad_scale * (1.0 / y_norm)
        return inv_y, inv_t, scale * cosine * inv_y, scale * inv_t
    scale = grad_scale * (1.0 / EPS)
    return inv_y, inv_t, scale * inv_y, scale * inv_t


@kernel
def _rescaled_row(y_row, t_row, grad_scale, out_row, accumulate):
    """The row's loss and gradient when ‖y‖² or ‖t‖² overflows float64 (a norm above ~1e154).

    Both rows are divided by their largest magnitude first, as ``hypot`` does;
    the loss does not depend on scale, and ``grad_scale·((u·v)u − v)/‖y‖`` is
    formed without ‖y‖². ``out_row`` may be ``y_row`` (read before written).
    Non-finite input gives NaN, which the caller reports.
    """
    y_max = 0.0
    t_max = 0.0
    for j in range(y_row.shape[0]):
        y_max = max(y_max, abs(np.float64(y_row[j])))
        t_max = max(t_max, abs(np.float64(t_row[j])))
    y_max = y_max if y_max > 0 else 1.0
    t_max = t_max if t_max > 0 else 1.0
    y_sq, t_sq, dot = 0.0, 0.0, 0.0
    for j in range(y_row.shape[0]):
        yj = np.float64(y_row[j]) / y_max
        tj = np.float64(t_row[j]) / t_max
        y_sq += yj * yj
        t_sq += tj * tj
        dot += yj * tj
    y_norm = y_max * math.sqrt(y_sq)
    inv_y = 1.0 / max(math.sqrt(y_sq), EPS / y_max)  # of the scaled row
    inv_t = 1.0 / max(math.sqrt(t_sq), EPS / t_max)
    cosine = dot * inv_y * inv_t
    coef = grad_scale / max(y_norm, EPS)
    loss = 0.0
    for j in range(y_row.shape[0]):
        u = np.float64(y_row[j]) / y_max * inv_y
        v = np.float64(t_row[j]) / t_max * inv_t
        loss += (u - v) * (u - v)
        g = coef * (cosine * u - v) if y_norm > EPS else coef * (u - v)
        if accumulate:
            out_row[j] += g
        else:
            out_row[j] = g
    return loss


# The two kernels index the 2-D arrays directly (no per-row helper taking views):
# with one base array for the load and the store of Y, LLVM vectorises the loops
# (docs/performance.md, "Kernels").


@kernel(reassociate=True)
def normalized_compact(y, teacher, teacher_rows, grad_scale, row_loss):
    """y : (M, d_t), overwritten with the scaled ∂ℓ/∂Y; see module docstring.

    teacher : (N, d_t); teacher_rows : (M,) int64; grad_scale : float64;
    row_loss : (M,) float64, receives ‖u_i − v_i‖².
    """
    n_rows, width = y.shape
    for i in range(n_rows):
        r = teacher_rows[i]
        y_sq, t_sq, dot = _row_sums(y, i, teacher, r)
        if y_sq == math.inf or t_sq == math.inf:
            row_loss[i] = _rescaled_row(y[i], teacher[r], grad_scale, y[i], False)
            continue
        inv_y, inv_t, u_coef, v_coef = _row_coefficients(y_sq, t_sq, dot, grad_scale)
        loss = 0.0
        for j in range(width):
            yj = np.float64(y[i, j])
            tj = np.float64(teacher[r, j])
            diff = yj * inv_y - tj * inv_t
            loss += diff * diff
            y[i, j] = u_coef * yj - v_coef * tj
        row_loss[i] = loss


@kernel(reassociate=True)
def normalized_direct(student, teacher, rows, grad_scale, grad_student, accumulate, row_loss):
    """No projection: rows ``rows`` of student vs teacher, ∂ℓ/∂S into grad_student."""
    width = student.shape[1]
    for k in range(rows.shape[0]):
        i = rows[k]
        y_sq, t_sq, dot = _row_sums(student, i, teacher, i)
        if y_sq == math.inf or t_sq == math.inf:
            row_loss[k] = _rescaled_row(student[i], teacher[i], grad_scale, grad_student[i],
                                        accumulate)
            continue
        inv_y, inv_t, u_coef, v_coef = _row_coefficients(y_sq, t_sq, dot, grad_scale)
        loss = 0.0
        for j in range(width):
            yj = np.float64(student[i, j])
            tj = np.float64(teacher[i, j])
            diff = yj * inv_y - tj * inv_t
            loss += diff * diff
            if accumulate:
                grad_student[i, j] += u_coef * yj - v_coef * tj
            else:
                grad_student[i, j] = u_coef * yj - v_coef * tj
        row_loss[k] = loss
