"""The pair engine: every hidden-state loss in pkd runs its layer pairs through here.

Notation (docs/math.md): student rows ``S`` (N × d_s), teacher rows ``T``
(N × d_t), optional projection ``P`` (d_s × d_t), ``Y = S P``, selected rows
``w`` (0/1, ``n_w`` of them)::

    MSE:         ℓ = Σ_i w_i ‖y_i − t_i‖² / (n_w d_t)
    normalized:  ℓ = Σ_i w_i ‖u_i − v_i‖² / n_w,  u = y/max(‖y‖, ε), v = t/max(‖t‖, ε)
    backward:    ∂ℓ/∂P = Sᵀ G,   ∂ℓ/∂S = G Pᵀ  (= G without a projection)

How one pair is computed (:func:`pair_loss_and_grad`): the selected student
rows are gathered (only when a mask drops rows, so masked rows cost no GEMM
work), ``Y = S P`` goes to BLAS, one fused Numba pass turns Y into G in place
while summing the loss in float64, and two more GEMMs give the gradients.
Without a projection there is no GEMM at all: one pass reads S and T and
writes ∂ℓ/∂S.

The interface, for :mod:`pkd.loss`, :class:`pkd.ProgressiveDistillation`
(and through it :class:`pkd.PKDObjective`), :mod:`pkd.torch` and
:mod:`pkd.fit`:

- :func:`pair_loss_and_grad`: one pair on validated, flattened arrays;
- :func:`hidden_loss`: ``L_hidden = λ Σ_k ω_k ℓ_k / Σ_k ω_k`` over a
  configuration's mapped pairs, from the user's per-layer hidden states
  (validated here), with the gradients asked for; returns a :class:`HiddenPass`;
- :func:`projection_applies`: the ``project`` rule deciding whether a pair
  goes through its projection;
- :func:`fused_pass`: the Numba kernel of the fused pass for a case;
- :func:`named_gradients`: a result's gradients named as ``out=`` errors name them.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import NamedTuple

import numpy as np

from . import _validation as V
from .workspace import Workspace, empty_views, thread_workspace

__all__ = ["HiddenPass", "SkippedPairWarning", "block_rows", "fused_pass", "hidden_loss",
           "named_gradients", "pair_loss_and_grad", "projection_applies"]


class SkippedPairWarning(UserWarning):
    """A layer pair was skipped because ``skip_invalid=True``."""


@functools.cache
def _kernel_table() -> dict:
    """(normalize, projected) -> fused-pass kernel, imported on first use.

    ``import pkd`` imports neither numba nor scipy: they are most of its import time.
    """
    from .kernels import mse, normalized

    return {
        (False, True): mse.mse_compact,
        (False, False): mse.mse_direct,
        (True, True): normalized.normalized_compact,
        (True, False): normalized.normalized_direct,
    }


@functools.cache
def _scatter_rows():
    from .kernels.rows import scatter_rows

    return scatter_rows


def fused_pass(normalize: bool, projected: bool):
    """The fused-pass kernel of a case (serial: see :mod:`pkd.kernels.mse`).

    Parameters
    ----------
    normalize : bool
        The normalized loss's pass instead of the MSE's.
    projected : bool
        The pass over ``Y = S P`` (compacted rows, G written in place) rather
        than the direct pass over S (G written into the student gradient).
    """
    return _kernel_table()[(normalize, projected)]


class _PairTask(NamedTuple):
    """One pair's validated inputs and where its results go (see :func:`pair_loss_and_grad`)."""

    student: np.ndarray  # (N, d_s)
    teacher: np.ndarray  # (N, d_t)
    projection: np.ndarray | None  # (d_s, d_t)
    rows: np.ndarray | None  # (n_w,) selected rows, None for all
    teacher_rows: np.ndarray  # (n_w,) the rows of T the pass compares with
    grad_scale: object  # the gradient's factor, in the kernel's scalar type
    row_loss: np.ndarray  # (n_w,) float64, receives each row's loss
    kernel: object  # the fused pass (fused_pass)
    grad_student: np.ndarray | None  # (N, d_s)
    accumulate_student: bool
    grad_projection: np.ndarray | None  # (d_s, d_t)
    accumulate_projection: bool
    workspace: Workspace


# The record without NamedTuple's Python-level __new__ (as its own ``_make`` does): the
# engine runs it per pair, where microseconds count on small inputs.
_new_task = tuple.__new__


def pair_loss_and_grad(
    student: np.ndarray,
    teacher: np.ndarray,
    projection: np.ndarray | None,
    rows: np.ndarray | None,
    *,
    normalize: bool,
    coef: float = 1.0,
    grad_student: np.ndarray | None = None,
    accumulate_student: bool = False,
    grad_projection: np.ndarray | None = None,
    accumulate_projection: bool = False,
    workspace: Workspace | None = None,
) -> float:
    """Loss of one pair, and ``coef`` times its gradients written into the given outputs.

    Trusts its inputs (validated by the caller): C-contiguous arrays of one
    float dtype, ``rows`` sorted in-range indices or ``None`` for all rows.

    Parameters
    ----------
    student : (N, d_s) array
    teacher : (N, d_t) array
    projection : (d_s, d_t) array or None
        ``None`` means Y = S (then d_s == d_t).
    rows : (n_w,) int64 array or None
        Selected rows; ``None`` selects all N.
    normalize : bool
        PKD's normalized loss instead of the MSE.
    coef : float
        Weight of this pair in the caller's total loss; scales the gradients only.
    grad_student : (N, d_s) array or None
        Receives ``coef·∂ℓ/∂S``: assigned (rows not selected are set to zero),
        or added with ``accumulate_student`` (rows not selected are untouched).
    grad_projection : (d_s, d_t) array or None
        Receives ``coef·∂ℓ/∂P`` (assigned, or added with ``accumulate_projection``).
    workspace : Workspace, optional
        Scratch buffers shared by the pairs of one call (this thread's by default).

    Returns
    -------
    float
        The pair's loss ℓ (not multiplied by ``coef``), accumulated in float64.
    """
    workspace = workspace or thread_workspace()
    dtype = student.dtype
    n_total, width_t = teacher.shape
    n_selected = n_total if rows is None else rows.shape[0]
    if normalize:
        grad_scale = np.float64(2.0 * coef / n_selected)
    else:
        grad_scale = dtype.type(2.0 * coef / (n_selected * width_t))
    row_loss = np.empty(n_selected, dtype=np.float64)
    task = _new_task(_PairTask, (
        student, teacher, projection, rows, workspace.arange(n_total) if rows is None else rows,
        grad_scale, row_loss, _kernel_table()[(normalize, projection is not None)],
        grad_student, accumulate_student, grad_projection, accumulate_projection, workspace))
    # Non-finite input is reported by the caller (V.explain_nonfinite), not by BLAS warnings.
    with np.errstate(invalid="ignore", over="ignore"):
        if projection is None:
            _run_direct(task)
        else:
            _run_projected(task)
    denominator = n_selected if normalize else n_selected * width_t
    return float(row_loss.sum() / denominator)


def _run_direct(task: _PairTask) -> None:
    """Y = S: one pass reads S and T and writes ∂ℓ/∂S."""
    out, accumulate = task.grad_student, task.accumulate_student
    if out is None:
        out, accumulate = task.workspace.get("grad", task.student.shape, task.student.dtype), False
    elif task.rows is not None and not accumulate:
        out.fill(0)  # the kernel writes the selected rows only
    task.kernel(task.student, task.teacher, task.teacher_rows, task.grad_scale, out, accumulate,
                task.row_loss)


def _run_projected(task: _PairTask) -> None:
    """Y = S P in one block of rows, or in row blocks (see :func:`block_rows`)."""
    (student, teacher, projection, rows, teacher_rows, grad_scale, row_loss, kernel,
     grad_student, accumulate_student, grad_projection, accumulate_projection,
     workspace) = task
    dtype = student.dtype
    n_selected, width_t = row_loss.shape[0], teacher.shape[1]
    # mode="clip": under the default mode="raise" NumPy buffers ``out`` and copies it;
    # rows are already in range.
    selected = student if rows is None else student.take(
        rows, axis=0, out=workspace.get("gather", (n_selected, student.shape[1]), dtype),
        mode="clip")
    block = n_selected if grad_student is None else block_rows(n_selected, *projection.shape,
                                                               dtype.itemsize)
    if block >= n_selected:
        y = workspace.get("y", (n_selected, width_t), dtype)
        np.matmul(selected, projection, out=y)
        kernel(y, teacher, teacher_rows, grad_scale, row_loss)  # y now holds G
        _backward_projection(selected, y, grad_projection, accumulate_projection, workspace)
        if grad_student is not None:
            _backward_student(y, projection, rows, grad_student, accumulate_student, selected,
                              workspace)
        return
    # Row blocks: both backward GEMMs of a block are taken while its G is still in
    # cache, so Y never goes to memory: Y_b and G_b live in one block-sized buffer,
    # and S_bᵀ G_b is added into ∂ℓ/∂P block by block (not with BLAS's beta = 1:
    # scipy's gemm is another OpenBLAS, whose threads fight numpy's). The gathered S
    # is read by those GEMMs, so G_b Pᵀ of masked rows goes through a block-sized
    # scratch instead, and is added block by block into a gradient zeroed first.
    y = workspace.get("y", (block, width_t), dtype)
    scratch = workspace.get("grad_block", (block, student.shape[1]), dtype)
    if rows is not None and not accumulate_student:
        grad_student.fill(0)
        accumulate_student = True
    for start in range(0, n_selected, block):
        stop = min(start + block, n_selected)
        y_block, selected_block = y[:stop - start], selected[start:stop]
        np.matmul(selected_block, projection, out=y_block)
        kernel(y_block, teacher, teacher_rows[start:stop], grad_scale, row_loss[start:stop])
        _backward_projection(selected_block, y_block, grad_projection,
                             accumulate_projection or start > 0, workspace)
        if rows is None:
            _backward_student(y_block, projection, None, grad_student[start:stop],
                              accumulate_student, None, workspace)
        else:
            _backward_student(y_block, projection, rows[start:stop], grad_student,
                              accumulate_student, scratch[:stop - start], workspace)


# Row blocking pays only where the fused pass's memory traffic shows next to the
# GEMMs (a narrow student, a large Y); elsewhere smaller GEMMs lose more than the
# cache gains (docs/performance.md, "Row blocks").
BLOCK_MAX_STUDENT_BYTES = 512  # d_s · itemsize: float32 up to d_s = 128
BLOCK_MIN_Y_BYTES = 8 << 20
BLOCK_BYTES = 2 << 20


def block_rows(n_rows: int, d_s: int, d_t: int, itemsize: int) -> int:
    """Rows per block of the projected pass; ``n_rows`` (one block) outside the measured regime."""
    if d_s * itemsize > BLOCK_MAX_STUDENT_BYTES or n_rows * d_t * itemsize < BLOCK_MIN_Y_BYTES:
        return n_rows
    return max(64, BLOCK_BYTES // (d_t * itemsize) // 64 * 64)


def _backward_projection(selected, grad_y, grad_projection, accumulate, workspace):
    """∂ℓ/∂P = Sᵀ G over the selected rows (assigned, or added with ``accumulate``)."""
    if grad_projection is None:
        return
    if not accumulate:
        np.matmul(selected.T, grad_y, out=grad_projection)
        return
    # Through a kept scratch buffer: a fresh d_s × d_t temporary per pair would add
    # to the call's peak memory.
    product = workspace.get("grad_projection", grad_projection.shape, grad_projection.dtype)
    np.add(grad_projection, np.matmul(selected.T, grad_y, out=product), out=grad_projection)


def _backward_student(grad_y, projection, rows, grad_student, accumulate, selected, workspace):
    """∂ℓ/∂S = G Pᵀ, scattered back to the selected rows (the others zero, or untouched).

    With ``rows``, ``selected`` (the gathered S, no longer needed, or a scratch
    of the same shape) receives G Pᵀ before the scatter.
    """
    if rows is None and not accumulate:
        np.matmul(grad_y, projection.T, out=grad_student)
        return
    if rows is None:
        product = workspace.get("gather", grad_student.shape, grad_student.dtype)
        np.add(grad_student, np.matmul(grad_y, projection.T, out=product), out=grad_student)
        return
    np.matmul(grad_y, projection.T, out=selected)
    _scatter_rows()(selected, rows, grad_student, accumulate)


# -- all the pairs of a configuration ----------------------------------------------------


def projection_applies(project: str, projection, d_s, d_t) -> bool:
    """Whether a pair of widths ``d_s``, ``d_t`` goes through ``projection`` (or None).

    ``project="auto"`` (the reference implementation's rule): only when the
    widths differ; ``"always"``: whenever there is a projection.
    """
    return projection is not None and (project == "always" or d_s != d_t)


def named_gradients(grad_student: list, grad_projection) -> list:
    """``(name, array or None)`` of a result's gradients, named as ``out=`` errors name them."""
    named = [(f"out.grad_student[{s}]", g) for s, g in enumerate(grad_student)]
    if isinstance(grad_projection, dict):
        named += [(f"out.grad_projection[{pair}]", g) for pair, g in grad_projection.items()]
    else:
        named.append(("out.grad_projection", grad_projection))
    return named


class HiddenPass(NamedTuple):
    """What :func:`hidden_loss` computed, in the field order of :class:`pkd.HiddenLossResult`."""

    loss: float
    layer_losses: np.ndarray  # (n_pairs,) float64, NaN for a skipped pair
    pairs: list
    grad_student: list  # one entry per student layer, None where not computed
    grad_projection: np.ndarray | dict | None
    skipped: list


_CONFIGURED = object()  # hidden_loss's default: the configuration's own projection
_UNSET = object()


def _flat(cache: dict, key, layer: np.ndarray, dtype) -> np.ndarray:
    """``layer`` as a C-contiguous ``(rows, width)`` array of ``dtype``, once per key."""
    if layer.ndim == 2 and layer.dtype == dtype and layer.flags.c_contiguous:
        return layer  # the common case, without the cache (three calls per pair)
    if key not in cache:
        cache[key] = np.ascontiguousarray(layer.reshape(-1, layer.shape[-1]), dtype=dtype)
    return cache[key]


def hidden_loss(config, student_hidden, teacher_hidden, *, attention_mask=None, tokens=None,
                skip_invalid: bool = False, check_finite: bool = True,
                grad_student: bool = True, grad_projection: bool = True, out=None,
                projection=_CONFIGURED) -> HiddenPass:
    """``L_hidden`` over ``config``'s mapped pairs, with the gradients asked for.

    The one loop over layer pairs behind :meth:`pkd.ProgressiveDistillation.loss_and_grad`
    and :class:`pkd.torch.PKDHiddenLoss`. Validates the hidden states pair by
    pair, runs each pair through :func:`pair_loss_and_grad`, and adds the
    gradients of pairs that share a student layer or a projection in place.

    Parameters
    ----------
    config : ProgressiveDistillation
        Read for ``layer_mapping``, ``hidden_weight``, ``layer_weights``,
        ``normalize``, ``project``, ``tokens`` and ``projection``.
    student_hidden, teacher_hidden : list of arrays, or one stacked array
        As :meth:`pkd.ProgressiveDistillation.loss_and_grad` takes them.
    attention_mask, tokens, skip_invalid, check_finite
        As :meth:`pkd.ProgressiveDistillation.loss_and_grad` takes them
        (``tokens=None``: the configuration's).
    grad_student, grad_projection : bool
        Which gradients to compute; those not asked for are ``None`` and cost
        no GEMM. Both ``False``: the loss only.
    out : HiddenLossResult, optional
        An earlier result whose gradient arrays are checked and overwritten
        (only with ``grad_student`` and ``grad_projection`` both ``True``).
    projection : array, dict or None, optional
        Used instead of ``config.projection`` (same structure); a dict may
        leave out pairs that do not go through a projection.

    Returns
    -------
    HiddenPass
    """
    skip_invalid = V.check_bool(skip_invalid, "skip_invalid")
    check_finite = V.check_bool(check_finite, "check_finite")
    student_layers = V.as_layers(student_hidden, "student_hidden")
    teacher_layers = V.as_layers(teacher_hidden, "teacher_hidden")
    tokens = config.tokens if tokens is None else tokens
    if projection is _CONFIGURED:
        projection = config.projection
    shared = not isinstance(projection, dict)
    pairs = config.layer_mapping
    # Python floats: NumPy scalar arithmetic per pair costs µs, which count on small inputs.
    weights = ([1.0] * len(pairs) if config.layer_weights is None
               else config.layer_weights.tolist())

    planned, skipped, reasons = {}, [], []
    float64 = False
    for k, pair in enumerate(pairs):
        try:  # structure first: these are the pairs the reference implementation skips
            plan = planned[k] = _plan_pair(config.project, projection, shared, pair,
                                           student_layers, teacher_layers)
        except ValueError as error:
            if not skip_invalid:
                raise
            skipped.append(pair)
            reasons.append(f"{pair}: {error}")
            continue
        float64 = float64 or V.result_dtype(*plan) == V.FLOAT_DTYPES[1]
    if skipped:
        warnings.warn(
            "skip_invalid=True skipped layer pair(s):\n  " + "\n  ".join(reasons),
            SkippedPairWarning, stacklevel=3,
        )
    dtype = V.FLOAT_DTYPES[1] if float64 else V.FLOAT_DTYPES[0]
    total_weight = float(sum(weights[k] for k in planned))
    layer_losses = [math.nan] * len(pairs)
    n_layers = len(student_layers)
    if out is not None:
        grads_s = _reused_student_gradients(out, planned, pairs, n_layers, dtype)
        grads_p = _reused_projection_gradients(out, projection, shared, dtype)
        _check_out_overlap(pairs, planned, grads_s, grads_p)
    elif grad_student or grad_projection:
        grads_s, grads_p = _gradient_buffers(pairs, planned, n_layers, dtype, grad_student,
                                             projection if grad_projection else None)
    else:
        grads_s, grads_p = [None] * n_layers, None
    returned = grads_s  # the caller's arrays, in the layers' own shapes
    grads_s = [g if g is None or g.ndim == 2 else g.reshape(-1, g.shape[-1]) for g in grads_s]
    written: set = set()  # student layers whose gradient holds a first pair's values
    touched_projection: set = set()
    rows_cache: dict = {}
    flat: dict = {}  # a layer mapped twice is flattened (and cast, if at all) once
    workspace = thread_workspace()
    loss = 0.0

    for k, (student, teacher, pair_projection) in planned.items():
        pair = pairs[k]
        s = pair[0]
        lead = student.shape[:-1]
        rows = rows_cache.get(lead, _UNSET)
        if rows is _UNSET:
            rows = rows_cache[lead] = V.select_rows(lead, attention_mask, tokens)
        coef = config.hidden_weight * weights[k] / total_weight if total_weight > 0 else 0.0
        s2 = _flat(flat, ("student", s), student, dtype)
        t2 = _flat(flat, ("teacher", pair[1]), teacher, dtype)
        p = None if pair_projection is None else _flat(flat, ("projection", id(pair_projection)),
                                                       pair_projection, dtype)
        accumulate_s = s in written  # the first pair assigns, rows not counted → 0
        written.add(s)
        g_p, accumulate_p = None, False
        if grads_p is not None and p is not None:
            key = "shared" if shared else pair
            g_p = grads_p if shared else grads_p[pair]
            accumulate_p = key in touched_projection
            touched_projection.add(key)
        layer_losses[k] = pair_loss_and_grad(
            s2, t2, p, rows, normalize=config.normalize, coef=coef,
            grad_student=grads_s[s], accumulate_student=accumulate_s,
            grad_projection=g_p, accumulate_projection=accumulate_p, workspace=workspace,
        )
        if check_finite and not math.isfinite(layer_losses[k]):
            V.explain_nonfinite([(f"student_hidden[{s}]", student, True),
                                 (f"teacher_hidden[{pair[1]}]", teacher, True),
                                 ("projection", pair_projection, False)], pair, rows)
        loss += coef * layer_losses[k]

    _zero_untouched(grads_p, touched_projection)
    return HiddenPass(float(loss), np.array(layer_losses), list(pairs), returned, grads_p,
                      skipped)


def _plan_pair(project, projection, shared, pair, student_layers, teacher_layers):
    """Check one pair's structure; return (S, T, P or None) or raise ValueError."""
    s, t = pair
    student = V.layer_at(student_layers, s, "student_hidden", pair, check_finite=False)
    teacher = V.layer_at(teacher_layers, t, "teacher_hidden", pair, check_finite=False)
    V.check_paired(student, teacher, pair,
                   names=(f"student_hidden[{s}]", f"teacher_hidden[{t}]"))
    d_s, d_t = student.shape[-1], teacher.shape[-1]
    if projection is not None and not shared:
        projection = projection.get(pair)  # pkd.torch leaves out those no pair goes through
    if not projection_applies(project, projection, d_s, d_t):
        if d_s != d_t:
            raise ValueError(
                f"layer pair {pair}: student width {d_s} differs from teacher width {d_t} "
                f"(shapes {student.shape} and {teacher.shape}) and no projection is set; "
                f"use .with_projection({d_s}, {d_t})"
            )
        return student, teacher, None
    return student, teacher, V.check_projection(projection, d_s, d_t, pair=pair,
                                                check_finite=False)


def _gradient_buffers(pairs, planned, n_layers, dtype, student_grads, projection):
    """Fresh, uninitialised gradients, all views of one block (see ``empty_views``).

    The mapped student layers' (``None`` elsewhere, or everywhere without
    ``student_grads``), and ``projection``'s (``None`` for no projection).
    """
    student_shapes = {}
    if student_grads:
        for k, plan in planned.items():
            student_shapes.setdefault(pairs[k][0], plan[0].shape)
    layers = sorted(student_shapes)
    shapes = [student_shapes[s] for s in layers]
    if isinstance(projection, dict):
        shapes += [p.shape for p in projection.values()]
    elif projection is not None:
        shapes.append(projection.shape)
    views = empty_views(shapes, dtype)
    grads = [None] * n_layers
    for s, view in zip(layers, views, strict=False):
        grads[s] = view
    if projection is None:
        return grads, None
    if isinstance(projection, dict):
        return grads, dict(zip(projection, views[len(layers):], strict=True))
    return grads, views[-1]


def _reused_student_gradients(out, planned: dict, pairs, n_layers: int, dtype) -> list:
    """The student gradients of ``out`` that this call writes, checked; ``None`` elsewhere.

    A ``None`` entry (a layer the previous call did not use, e.g. a skipped pair)
    gets a fresh array, so a loop can always hand its last result back.
    """
    given = out.grad_student
    if not isinstance(given, (list, tuple)) or len(given) != n_layers:
        count = len(given) if isinstance(given, (list, tuple)) else type(given).__name__
        raise ValueError(
            f"out.grad_student must hold one entry per student layer ({n_layers}), got "
            f"{count}: pass the result of a call on hidden states of the same layout"
        )
    grads = [None] * n_layers
    for k, (student, _, _) in planned.items():
        s = pairs[k][0]
        if grads[s] is None and given[s] is None:
            grads[s] = np.empty(student.shape, dtype=dtype)
        elif grads[s] is None:
            grads[s] = V.check_output(given[s], f"out.grad_student[{s}]", student.shape, dtype,
                                      pair=pairs[k])
    return grads


def _reused_projection_gradients(out, projection, shared: bool, dtype):
    """The projection gradients of ``out``, checked against the configuration's projection."""
    if projection is None:
        return None
    given = out.grad_projection
    if shared:
        return V.check_output(given, "out.grad_projection", projection.shape, dtype)
    if not isinstance(given, dict):
        raise ValueError(
            f"out.grad_projection must be a dict {{pair: array}} for per-pair "
            f"projections, got {type(given).__name__}"
        )
    return {pair: V.check_output(given.get(pair), f"out.grad_projection[{pair}]",
                                 p.shape, dtype, pair=pair)
            for pair, p in projection.items()}


def _check_out_overlap(pairs, planned, grads_s, grads_p) -> None:
    """Reused gradients must not alias an input the kernels read."""
    outputs = named_gradients(grads_s, grads_p)
    inputs, seen = [], set()
    for k, arrays in planned.items():
        pair = pairs[k]
        names = (f"student_hidden[{pair[0]}]", f"teacher_hidden[{pair[1]}]", "projection")
        for name, array in zip(names, arrays, strict=True):
            if array is not None and id(array) not in seen:
                seen.add(id(array))
                inputs.append((name, array))
    V.check_no_overlap(outputs, inputs)


def _zero_untouched(grads_p, touched: set) -> None:
    """Projection gradients no pair wrote (no pair goes through them) are zero."""
    if grads_p is None:
        return
    if not isinstance(grads_p, dict):
        if "shared" not in touched:
            grads_p.fill(0)
        return
    for pair, grad in grads_p.items():
        if pair not in touched:
            grad.fill(0)
