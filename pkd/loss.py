"""The projected MSE of one layer pair, its normalized variant, and their gradients.

The public functions for one pair of arrays: :func:`projected_mse` and
:func:`projected_mse_grad` validate the user's input and run the pair through
the pair engine (:func:`pkd.engine.pair_loss_and_grad`, where the formulas and
the computation are described). The engine's building blocks are re-exported
here for the callers that reuse buffers: :class:`~pkd.workspace.Workspace`,
:func:`~pkd.workspace.thread_workspace`, :func:`~pkd.workspace.clear_workspace`,
:func:`~pkd.workspace.empty_views`.
"""

from __future__ import annotations

import math

import numpy as np

from . import _validation as V
from .engine import pair_loss_and_grad
from .workspace import Workspace, clear_workspace, empty_views, thread_workspace

__all__ = ["Workspace", "clear_workspace", "empty_views", "pair_loss_and_grad",
           "projected_mse", "projected_mse_grad", "thread_workspace"]


def _prepare(student, teacher, projection, mask, tokens, normalize, check_finite):
    """Validate the functional API's arguments; return flattened, same-dtype arrays."""
    V.check_bool(normalize, "normalize")
    V.check_bool(check_finite, "check_finite")
    # Finiteness is checked after the kernel, at no cost (see V.explain_nonfinite).
    student = V.check_float_array(student, "student", check_finite=False)
    teacher = V.check_float_array(teacher, "teacher", check_finite=False)
    V.check_paired(student, teacher, None)
    d_s, d_t = student.shape[-1], teacher.shape[-1]
    if projection is None:
        if d_s != d_t:
            raise ValueError(
                f"student width {d_s} differs from teacher width {d_t} (shapes "
                f"{student.shape} and {teacher.shape}): pass a projection of shape ({d_s}, {d_t})"
            )
    else:
        projection = V.check_projection(projection, d_s, d_t, check_finite=False)
    rows = V.select_rows(student.shape[:-1], mask, tokens, mask_name="mask")
    dtype = V.result_dtype(student, teacher, projection)
    s2 = np.ascontiguousarray(student.reshape(-1, d_s), dtype=dtype)
    t2 = np.ascontiguousarray(teacher.reshape(-1, d_t), dtype=dtype)
    p = None if projection is None else np.ascontiguousarray(projection, dtype=dtype)
    return student.shape, s2, t2, p, rows


def projected_mse(
    student,
    teacher,
    projection=None,
    *,
    mask=None,
    tokens="all",
    normalize: bool = False,
    check_finite: bool = True,
) -> float:
    """Loss of one layer pair: ``ℓ = Σ w‖y − t‖²/(n_w d_t)`` with ``Y = S P`` (docs/math.md).

    Parameters
    ----------
    student : (N, d_s) or (B, T, d_s) array of float32/float64
    teacher : (N, d_t) or (B, T, d_t) array, same leading shape
    projection : (d_s, d_t) array, optional
        Required when d_s != d_t; without it Y = S.
    mask : (N,) or (B, T) array of 0/1 or bool, optional
        Rows that count; the others contribute nothing.
    tokens : {"all", "cls"} or int
        For 3-D input, which positions count ("cls": the first position the
        attention mask keeps in each sequence, position 0 without a mask).
    normalize : bool
        PKD's normalized loss ``Σ w‖u − v‖²/n_w`` on L2-normalised rows.
    check_finite : bool
        Raise ``ValueError`` when a NaN/Inf takes part in the loss (default).
        The check costs nothing on finite input: the kernel's loss is
        non-finite exactly when a value it reads is, and only then are the
        inputs searched to name the culprit. Rows the mask leaves out are
        never read, so padding may hold anything.

    Returns
    -------
    float
        The loss, accumulated in float64.
    """
    _, s2, t2, p, rows = _prepare(student, teacher, projection, mask, tokens, normalize,
                                  check_finite)
    loss = pair_loss_and_grad(s2, t2, p, rows, normalize=normalize)
    _check_result(loss, check_finite, s2, t2, p, rows)
    return loss


def _check_result(loss, check_finite, s2, t2, p, rows):
    if check_finite and not math.isfinite(loss):
        V.explain_nonfinite([("student", s2, True), ("teacher", t2, True),
                             ("projection", p, False)], None, rows)


def projected_mse_grad(
    student,
    teacher,
    projection=None,
    *,
    mask=None,
    tokens="all",
    normalize: bool = False,
    check_finite: bool = True,
    out: tuple | None = None,
) -> tuple[float, np.ndarray, np.ndarray | None]:
    """Loss of one layer pair and its gradients.

    Same arguments as :func:`projected_mse`, and:

    out : (grad_student, grad_projection), optional
        Arrays to write the gradients into (``grad_projection`` is ``None``
        without a projection): C-contiguous, the student's shape and
        ``(d_s, d_t)``, in the computation's dtype. A training loop that
        reuses them keeps its memory fixed, whatever results it holds
        (without ``out=`` the gradients come from a block an earlier call
        returned, once nothing references it: see
        :func:`pkd.workspace.empty_views`).

    Returns
    -------
    loss : float
    grad_student : array of the student's shape and the common dtype
        ∂ℓ/∂S; zero on rows that do not count.
    grad_projection : (d_s, d_t) array or None
        ∂ℓ/∂P, ``None`` without a projection.
    """
    shape, s2, t2, p, rows = _prepare(student, teacher, projection, mask, tokens, normalize,
                                       check_finite)
    if out is None:  # rows that do not count get 0 in grad_student
        grad_student, *rest = empty_views([s2.shape] + ([] if p is None else [p.shape]),
                                          s2.dtype)
        grad_projection = rest[0] if rest else None
    else:
        grad_student, grad_projection = _check_out(out, shape, s2.dtype, s2, t2, p)
    loss = pair_loss_and_grad(
        s2, t2, p, rows, normalize=normalize,
        grad_student=grad_student.reshape(s2.shape), grad_projection=grad_projection,
    )
    _check_result(loss, check_finite, s2, t2, p, rows)
    return loss, (grad_student if out is not None else grad_student.reshape(shape)), \
        grad_projection


def _check_out(out, shape, dtype, student, teacher, projection):
    """Validate the ``out`` buffers of :func:`projected_mse_grad`."""
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError("out must be a (grad_student, grad_projection) pair")
    grad_student = V.check_output(out[0], "out[0] (grad_student)", shape, dtype)
    if projection is None:
        if out[1] is not None:
            raise ValueError("out[1] (grad_projection) must be None without a projection")
        grad_projection = None
    else:
        grad_projection = V.check_output(out[1], "out[1] (grad_projection)", projection.shape,
                                         dtype)
    V.check_no_overlap(
        [("out[0] (grad_student)", grad_student), ("out[1] (grad_projection)", grad_projection)],
        [("student", student), ("teacher", teacher), ("projection", projection)])
    return grad_student, grad_projection
