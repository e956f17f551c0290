"""The projected MSE of one layer pair, its normalized variant, and their gradients.

Notation (DESIGN.md §1): student rows ``S`` (N × d_s), teacher rows ``T``
(N × d_t), optional projection ``P`` (d_s × d_t), ``Y = S P``, selected rows
``w`` (0/1, ``n_w`` of them)::

    MSE:         ℓ = Σ_i w_i ‖y_i − t_i‖² / (n_w d_t)
    normalized:  ℓ = Σ_i w_i ‖u_i − v_i‖² / n_w,  u = y/max(‖y‖, ε), v = t/max(‖t‖, ε)
    backward:    ∂ℓ/∂P = Sᵀ G,   ∂ℓ/∂S = G Pᵀ  (= G without a projection)

How one pair is computed (``pair_loss_and_grad``): the selected student rows
are gathered (only when a mask drops rows, so masked rows cost no GEMM work),
``Y = S P`` goes to BLAS, one fused Numba pass turns Y into G in place while
summing the loss in float64, and two more GEMMs give the gradients. Without a
projection there is no GEMM at all: one pass reads S and T and writes ∂ℓ/∂S.
"""

from __future__ import annotations

import functools
import math
import sys
import threading

import numpy as np

from . import _validation as V

# Below this many elements in the fused pass the serial twin is used.
# Measured on the 2-core Zen 3 and Xeon VMs: no consistent gain (see README, "Performance").
# Again on the Zen 4 VM (family 25, model 17; interleaved A/B runs against the GEMMs,
# N = 4096 and 16384, d_s = 128 to 768, plain, masked and normalized): the parallel
# twin ran from 7% faster to 5% slower than the serial one, with no consistent sign.
PARALLEL_MIN_ELEMENTS = 1 << 62


@functools.cache
def _kernel_table() -> dict:
    """(normalize, projected) -> (serial, parallel) kernels.

    Imported on first use, so that ``import pkd`` imports neither numba nor
    scipy (0.5 s of a 1.1 s import on the Zen 3 VM).
    """
    from .kernels import mse, normalized

    return {
        (False, True): (mse.mse_compact_serial, mse.mse_compact_parallel),
        (False, False): (mse.mse_direct_serial, mse.mse_direct_parallel),
        (True, True): (normalized.normalized_compact_serial,
                       normalized.normalized_compact_parallel),
        (True, False): (normalized.normalized_direct_serial,
                        normalized.normalized_direct_parallel),
    }


@functools.cache
def _scatter_rows():
    from .kernels.rows import scatter_rows

    return scatter_rows


def _pick(normalize: bool, projected: bool, n_elements: int):
    serial, parallel = _kernel_table()[(normalize, projected)]
    return parallel if n_elements >= PARALLEL_MIN_ELEMENTS else serial


# Free-threaded CPython defers reference counts, so "no array left" cannot be read there.
_CAN_REUSE_BLOCKS = getattr(sys, "_is_gil_enabled", lambda: True)()


class Workspace:
    """Scratch buffers, one flat buffer per (tag, dtype), grown on demand.

    A buffer is handed out as a view of its first ``prod(shape)`` elements, so
    the memory held is the largest request seen, whatever the shapes; the
    view is kept for the next request of the same shape (at most
    ``KEPT_VIEWS``, and none of an outgrown buffer). Only scratch lives here
    (the N×d_t buffer of Y/G, the gathered rows): nothing a caller gets back
    ever aliases it.

    The blocks the returned gradients are carved from (:func:`empty_views`)
    are kept too, at most ``KEPT_GRADIENT_BLOCKS`` per dtype, and handed out
    again only once no array carved from them is alive anywhere: each of
    those arrays holds a reference to its block (its ``base``), so a block
    whose only reference is the workspace's is unreachable from user code.
    Two, because ``result = cfg.loss_and_grad(...)`` in a loop still holds
    the previous result while the next call runs.
    """

    KEPT_GRADIENT_BLOCKS = 2
    KEPT_VIEWS = 64

    def __init__(self) -> None:
        self._buffers: dict = {}
        self._views: dict = {}
        self._gradient_blocks: dict = {}
        self._arange = np.arange(0, dtype=np.int64)

    def get(self, tag: str, shape: tuple, dtype) -> np.ndarray:
        # Called several times per pair: the view handed out is kept per request, so a
        # loop's repeated request is one dict lookup (0.2 against 0.9 µs carving it).
        key = (tag, shape, dtype)
        view = self._views.get(key)
        if view is None:
            if len(self._views) >= self.KEPT_VIEWS:  # shapes that vary from call to call
                self._views.clear()
            view = self._views[key] = self._carve(tag, shape, np.dtype(dtype))
        return view

    def _carve(self, tag: str, shape: tuple, dtype: np.dtype) -> np.ndarray:
        size = math.prod(shape)  # not np.prod (0.1 against 8 µs)
        buf = self._buffers.get((tag, dtype))
        if buf is None or buf.size < size:
            buf = self._buffers[(tag, dtype)] = np.empty(size, dtype=dtype)
            # Views of the smaller buffer would keep it alive: forget them.
            self._views = {key: view for key, view in self._views.items()
                           if key[0] != tag or np.dtype(key[2]) != dtype}
        return buf[:size].reshape(shape)

    def arange(self, n: int) -> np.ndarray:
        """``np.arange(n)`` as int64, kept between calls (it only ever grows); never written."""
        if self._arange.shape[0] < n:
            self._arange = np.arange(n, dtype=np.int64)
        return self._arange[:n]

    def gradient_block(self, size: int, dtype) -> np.ndarray:
        """An uninitialised 1-D array of ``size`` elements to carve returned gradients from.

        A kept block is reused when nothing else references it and it is at
        most twice the size (so a small gradient kept for long does not pin a
        large block); otherwise a new block is allocated, and kept in place of
        a smaller free one, or while fewer than ``KEPT_GRADIENT_BLOCKS`` are
        kept (a free larger one stays: calls of two sizes may alternate).
        """
        if not _CAN_REUSE_BLOCKS or size == 0:
            return np.empty(size, dtype=dtype)
        kept = self._gradient_blocks.setdefault(np.dtype(dtype), [])
        smaller = None  # the first free block too small for this request
        for k in range(len(kept)):
            # getrefcount(kept[k]) == 2: the list's reference and the argument's.
            if sys.getrefcount(kept[k]) == 2:
                if size <= kept[k].size <= 2 * size:
                    return kept[k][:size]
                if smaller is None and kept[k].size < size:
                    smaller = k
        block = np.empty(size, dtype=dtype)
        if smaller is not None:
            kept[smaller] = block
        elif len(kept) < self.KEPT_GRADIENT_BLOCKS:
            kept.append(block)
        return block

    def release_gradient_blocks(self) -> None:
        """Forget the kept gradient blocks (the next call allocates its gradients anew)."""
        self._gradient_blocks.clear()

    def clear(self) -> None:
        self._buffers.clear()
        self._views.clear()
        self._gradient_blocks.clear()
        self._arange = np.arange(0, dtype=np.int64)


_local = threading.local()


def thread_workspace() -> Workspace:
    """This thread's workspace, reused from call to call.

    Reusing the N×d_t scratch buffer saves the page faults of a fresh
    allocation on every call (3–4% of a call at d_t = 256, measured on the
    2-core Zen 3 VM), at the price of keeping the largest buffer
    alive between calls; :func:`clear_workspace` frees it.
    """
    workspace = getattr(_local, "workspace", None)
    if workspace is None:
        workspace = _local.workspace = Workspace()
    return workspace


def clear_workspace() -> None:
    """Free this thread's scratch buffers and kept gradient blocks (re-created on the next call)."""
    thread_workspace().clear()


def empty_views(shapes, dtype, workspace: Workspace | None = None) -> list[np.ndarray]:
    """Uninitialised arrays of the given shapes, carved out of one block.

    Every gradient a call returns comes from here. The block is one the
    workspace kept from an earlier call once nothing references it any more
    (:meth:`Workspace.gradient_block`): a fresh block of tens of MB costs its
    page faults at every call, and the kernel must zero each page first. On
    the Xeon reference VM fresh gradients took 8% of a call at N = 16384,
    768 × 768 float32 (306–324 ms against 284–300 ms with ``out=``, GEMMs
    274–280 ms). Separate arrays allocated
    and freed together at every call can grow glibc's heap past its trim
    threshold, and glibc then hands the pages back to the kernel, so the next
    call page-faults them all again. Measured on the Zen 3 VM (4 pairs,
    N = 256, 128 × 256 float32, a fresh process per run, three alternating
    runs): the student block and a separate projection gradient took 101
    faults per call, 1.40–1.57× the GEMMs; one block takes 3, 1.19–1.46×.
    Whether a call faults depends on the process's allocation history: in
    ``pkd bench``, where other contenders allocate in between, the difference
    was within the noise.

    Parameters
    ----------
    shapes : sequence of tuple of int
    dtype : numpy dtype
    workspace : Workspace, optional
        Whose kept blocks to use (this thread's by default).

    Returns
    -------
    list of arrays, C-contiguous, one per shape (views of one block).
    """
    sizes = [math.prod(shape) for shape in shapes]
    block = (workspace or thread_workspace()).gradient_block(sum(sizes), dtype)
    views, offset = [], 0
    for k, shape in enumerate(shapes):
        views.append(block[offset:offset + sizes[k]].reshape(shape))
        offset += sizes[k]
    return views


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
        Scratch buffers shared by the pairs of one call.

    Returns
    -------
    float
        The pair's loss ℓ (not multiplied by ``coef``), accumulated in float64.
    """
    workspace = workspace or thread_workspace()
    dtype = student.dtype
    n_total, width_t = teacher.shape
    n_selected = n_total if rows is None else rows.shape[0]
    teacher_rows = workspace.arange(n_total) if rows is None else rows
    if normalize:
        grad_scale = np.float64(2.0 * coef / n_selected)
    else:
        grad_scale = dtype.type(2.0 * coef / (n_selected * width_t))
    row_loss = np.empty(n_selected, dtype=np.float64)
    run = _pick(normalize, projection is not None, n_selected * width_t)

    # Non-finite input is reported by the caller (V.explain_nonfinite), not by
    # BLAS warnings.
    with np.errstate(invalid="ignore", over="ignore"):
        _run_pair(student, teacher, projection, rows, teacher_rows, grad_scale, row_loss, run,
                  grad_student, accumulate_student, grad_projection, accumulate_projection,
                  workspace)
    denominator = n_selected if normalize else n_selected * width_t
    return float(row_loss.sum() / denominator)


def _run_pair(student, teacher, projection, rows, teacher_rows, grad_scale, row_loss, run,
              grad_student, accumulate_student, grad_projection, accumulate_projection,
              workspace):
    dtype = student.dtype
    n_selected, width_t = row_loss.shape[0], teacher.shape[1]
    if projection is None:
        if grad_student is None:
            out = workspace.get("grad", student.shape, dtype)
            accumulate_student = False
        else:
            out = grad_student
            if rows is not None and not accumulate_student:
                out.fill(0)  # the kernel writes the selected rows only
        run(student, teacher, teacher_rows, grad_scale, out, accumulate_student, row_loss)
        return
    # mode="clip": under the default mode="raise" NumPy buffers ``out`` and copies it
    # (3× slower, 4.7 against 1.8 ms at 4096 × 768 float32); rows are already in range.
    selected = student if rows is None else student.take(
        rows, axis=0, out=workspace.get("gather", (n_selected, student.shape[1]), dtype),
        mode="clip")
    block = n_selected if grad_student is None else block_rows(n_selected, *projection.shape,
                                                               dtype.itemsize)
    if block >= n_selected:
        y = workspace.get("y", (n_selected, width_t), dtype)
        np.matmul(selected, projection, out=y)
        run(y, teacher, teacher_rows, grad_scale, row_loss)  # y now holds G
        _backward_projection(selected, y, grad_projection, accumulate_projection, workspace)
        if grad_student is not None:
            _backward_student(y, projection, rows, grad_student, accumulate_student, selected,
                              workspace)
        return
    # Row blocks: both backward GEMMs of a block are taken while its G is still in
    # cache (see block_rows), so Y never goes to memory: Y_b and G_b live in one
    # block-sized buffer, and S_bᵀ G_b is added into ∂ℓ/∂P block by block. (Not
    # with BLAS's beta = 1: scipy's gemm is another OpenBLAS, whose threads fought
    # numpy's, 5× slower.) The gathered S is read by those GEMMs, so G_b Pᵀ of
    # masked rows goes through a block-sized scratch instead, and is added block by
    # block into a gradient zeroed first.
    y = workspace.get("y", (block, width_t), dtype)
    scratch = workspace.get("grad_block", (block, student.shape[1]), dtype)
    if rows is not None and not accumulate_student:
        grad_student.fill(0)
        accumulate_student = True
    for start in range(0, n_selected, block):
        stop = min(start + block, n_selected)
        y_block, selected_block = y[:stop - start], selected[start:stop]
        np.matmul(selected_block, projection, out=y_block)
        run(y_block, teacher, teacher_rows[start:stop], grad_scale, row_loss[start:stop])
        _backward_projection(selected_block, y_block, grad_projection,
                             accumulate_projection or start > 0, workspace)
        if rows is None:
            _backward_student(y_block, projection, None, grad_student[start:stop],
                              accumulate_student, None, workspace)
        else:
            _backward_student(y_block, projection, rows[start:stop], grad_student,
                              accumulate_student, scratch[:stop - start], workspace)


# Row blocking of the projected pass (medians of interleaved runs against the
# GEMMs alone). With a narrow student the three GEMMs do only 6·d_s flops per
# element of Y, so the memory traffic of the fused pass shows; taking G_b Pᵀ
# right after the fused pass of a block of G (1 MiB then, 2 MiB now: below),
# while it is in cache, brought N = 16384, 128 × 256 float32 from 1.09–1.11×
# to 1.02× its GEMMs (masked too; Zen 3 VM). Taking S_bᵀ G_b there too, so
# that Y never leaves the cache and needs a block-sized buffer only (16 MiB →
# 1 MiB then), read 1.04–1.17× against 1.11–1.18× in three A/B runs on the
# Xeon VM, where the pass (reading T from memory) costs 14% of the GEMMs. Where the GEMMs dominate
# (float64 at d_s = 128, where a flop costs twice as much; d_s ≥ 312 float32)
# smaller GEMMs lose more than the cache gains (1.07 → 1.10, 1.04 → 1.13, Zen 3), and
# below ~8 MiB of Y the gain was within the noise: those cases run in one block.
# Block size, on the Zen 4 VM (family 25, model 17; 1 MiB of L2 per core), 128 × 256
# float32, interleaved rounds against the GEMMs (the VM's speed moved the GEMMs by up
# to 1.6× between rounds): at N = 16384, 2 MiB blocks were faster than 1 MiB ones in 11
# of 12 rounds, by up to 0.08× the GEMMs, and tied in one (1.01–1.22× against
# 1.04–1.29×); faster than one block in 7 of 8, than 4 MiB in 4 of 4 and 512 KiB in 3
# of 3; at N = 65536, faster than 1 MiB in 3 of 4 (1.01–1.20× against 1.01–1.23×).
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
    # to the call's peak memory (4 shared pairs, N = 256, 768 × 768: 4% over budget).
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
    """Loss of one layer pair: ``ℓ = Σ w‖y − t‖²/(n_w d_t)`` with ``Y = S P`` (DESIGN §1).

    Parameters
    ----------
    student : (N, d_s) or (B, T, d_s) array of float32/float64
    teacher : (N, d_t) or (B, T, d_t) array, same leading shape
    projection : (d_s, d_t) array, optional
        Required when d_s != d_t; without it Y = S.
    mask : (N,) or (B, T) array of 0/1 or bool, optional
        Rows that count; the others contribute nothing.
    tokens : {"all", "cls"} or int
        For 3-D input, which positions count ("cls" = position 0).
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
        returned, once nothing references it: see :func:`empty_views`).

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
