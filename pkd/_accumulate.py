"""One update of :class:`pkd.AlignmentStats`: input checks, the fold rule, the chunk buffers.

A chunk of ``m`` selected rows is copied once (shifted, float64, feature-major:
:func:`pkd.kernels.gram.fill_shifted_transposed`) into reusable buffers that
the BLAS calls of :meth:`pkd._moments.Moments.add_chunk` read without a copy.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Sequence

import numpy as np

from ._validation import (
    as_layers,
    check_finite_rows,
    check_float_array,
    check_mask,
    check_paired,
    check_positive_int,
)

_SIDES = ("student", "teacher")


def check_widths(widths, name: str) -> tuple[int, ...]:
    if isinstance(widths, (str, bytes)) or not isinstance(widths, (Sequence, np.ndarray)):
        raise TypeError(f"{name} must be a sequence of layer widths (ints), got {widths!r}")
    if len(widths) == 0:
        raise ValueError(f"{name} is empty: give one width per layer")
    return tuple(check_positive_int(w, f"{name}[{k}]") for k, w in enumerate(widths))


def check_folds(folds) -> int:
    """``None`` → 1 (no folds); otherwise an int >= 2."""
    if folds is None:
        return 1
    if isinstance(folds, (bool, np.bool_)) or not isinstance(folds, numbers.Integral):
        raise TypeError(f"folds must be an int >= 2 or None, got {folds!r}")
    if folds < 2:
        raise ValueError(
            f"folds must be >= 2 (fit on k − 1 folds, score on the other), got {folds}; "
            "pass folds=None for in-sample statistics only"
        )
    return int(folds)


def check_constant(constant) -> str:
    if constant not in ("nan", "raise"):
        raise ValueError(f"constant must be 'nan' or 'raise', got {constant!r}")
    return constant


def coarser(a, b):
    """The coarser of two float dtypes (None: unknown, the other wins)."""
    if a is None or b is None:
        return b if a is None else a
    return a if a.itemsize <= b.itemsize else b


def prepare(layout, student_layers, teacher_layers, mask, check_finite: bool, block_rows: int):
    """Validate one update; returns 2-D views, the flat bool mask (or None), the lead shape.

    ``layout`` (or None before the first update) holds the widths every update must match.
    """
    students = as_layers(student_layers, "student_layers")
    teachers = as_layers(teacher_layers, "teacher_layers")
    arrays = {}
    for side, layers in (("student_layers", students), ("teacher_layers", teachers)):
        for k, layer in enumerate(layers):
            name = f"{side}[{k}]"
            arrays[name] = check_float_array(layer, name, check_finite=False)
    reference_name = "student_layers[0]"
    reference = arrays[reference_name]
    for name, array in arrays.items():
        if name != reference_name:
            check_paired(reference, array, None, names=(reference_name, name))
    if layout is not None:
        for side, layers in (("student", students), ("teacher", teachers)):
            widths = layout.widths[side]
            if len(layers) != len(widths):
                raise ValueError(
                    f"{side}_layers has {len(layers)} layer(s), but these statistics hold "
                    f"{len(widths)} {side} layer(s) of widths {widths}: every update must "
                    "give the same layers"
                )
            for k in range(len(layers)):
                width = arrays[f"{side}_layers[{k}]"].shape[-1]
                if width != widths[k]:
                    raise ValueError(
                        f"{side}_layers[{k}] has width {width}, but these statistics were "
                        f"built for {side} widths {widths} (layer {k}: {widths[k]}): every "
                        "update must give the same layers"
                    )
    lead_shape = reference.shape[:-1]
    selected = None
    if mask is not None:
        selected = check_mask(mask, lead_shape, "mask").reshape(-1)
        if not selected.any():
            raise ValueError(
                f"mask selects no row of the {selected.size} rows (leading shape "
                f"{lead_shape}): there is nothing to accumulate; skip this chunk"
            )
    # Non-contiguous 3-D input is copied once here; contiguous input is a view.
    flat = {name: a.reshape(-1, a.shape[-1]) for name, a in arrays.items()}
    if check_finite:
        for name, values in flat.items():
            check_finite_rows(values, name, selected, block_rows=block_rows)
    views = list(flat.values())
    return views[:len(students)], views[len(students):], selected, lead_shape


def example_ids(lead_shape: tuple, examples, first: int) -> np.ndarray:
    """The example of every flattened row: given, or counted from ``first``.

    Default: the row index for ``(N,)`` input, the sequence index for ``(B, T)``
    input (whole sequences go to one fold).
    """
    if examples is None:
        ids = np.arange(first, first + lead_shape[0], dtype=np.int64)
        return np.repeat(ids, lead_shape[1]) if len(lead_shape) == 2 else ids
    examples = np.asarray(examples)
    if examples.shape != tuple(lead_shape) or examples.dtype.kind not in "iu":
        raise ValueError(
            f"examples must be an int array of the leading shape {tuple(lead_shape)} (one "
            f"example index per row), got dtype {examples.dtype} and shape {examples.shape}"
        )
    if examples.size and examples.min() < 0:
        raise ValueError(f"examples must be >= 0, got a minimum of {int(examples.min())}")
    return examples.reshape(-1).astype(np.int64)


class ChunkBuffers:
    """Reusable float64 chunk buffers and the shifted copy of rows into them."""

    def __init__(self, layout, chunk_rows: int):
        self.layout, self.chunk_rows = layout, chunk_rows
        self._flat: tuple[np.ndarray, np.ndarray] | None = None

    def views(self, m: int):
        """Fortran-ordered (m, Σd_s) and (m, Σd_t) views."""
        total_s, total_t = self.layout.total["student"], self.layout.total["teacher"]
        if self._flat is None or self._flat[0].size < m * total_s:
            rows = max(min(self.chunk_rows, m), m, 1)
            self._flat = (np.empty(rows * total_s), np.empty(rows * total_t))
        flat_s, flat_t = self._flat
        return (flat_s[: m * total_s].reshape((m, total_s), order="F"),
                flat_t[: m * total_t].reshape((m, total_t), order="F"))

    def fill(self, students, teachers, shift, rows, buffers, threads: int = 1):
        """Shifted, float64, feature-major copy of the rows into ``buffers`` (xs, xt).

        One task per layer on ``threads`` threads (each writes its own block). Returns,
        per side, the column sums (Σd,) and each layer's squared row norms
        (m, n_layers), Fortran order.
        """
        from ._threads import on_threads
        from .kernels.gram import fill_shifted_transposed

        layers = {"student": students, "teacher": teachers}
        buffer = dict(zip(_SIDES, buffers, strict=True))
        sums = {side: np.zeros(self.layout.total[side]) for side in _SIDES}
        squares = {side: np.empty((rows.size, len(layers[side])), order="F")
                   for side in _SIDES}

        def task(item: tuple[str, int]) -> None:
            side, k = item
            block = self.layout.block(side, k)
            transposed = buffer[side].T  # (Σd, m), C-contiguous: row j is feature j
            fill_shifted_transposed(layers[side][k], rows, shift[side][block],
                                    transposed[block], sums[side][block], squares[side][:, k])

        on_threads([(side, k) for side in ("teacher", "student")
                    for k in range(len(layers[side]))], task, threads)
        return sums, squares

    def first_shift(self, students, teachers, rows) -> dict[str, np.ndarray]:
        """Column means of the rows, rounded to each layer's dtype (exact shifted copies).

        Read in the rows' own order by NumPy (float64 sums), not through the chunk buffer:
        a transposing copy costs more than the sums it would give.
        """
        # ``rows`` (not empty) increase: without a mask they are a slice, read without a copy.
        contiguous = rows[-1] - rows[0] == rows.size - 1
        picked = slice(int(rows[0]), int(rows[-1]) + 1) if contiguous else rows
        shift = {}
        for side, layers in (("student", students), ("teacher", teachers)):
            means = np.empty(self.layout.total[side])
            for k, values in enumerate(layers):
                total = np.add.reduce(values[picked], axis=0, dtype=np.float64)
                means[self.layout.block(side, k)] = (total / rows.size).astype(values.dtype)
            shift[side] = means
        return shift

    def add_rows(self, moments, students, teachers, rows, threads: int = 1) -> None:
        """Accumulate ``rows`` of the layers into ``moments``, on ``threads`` threads."""
        xs, xt = self.views(rows.size)
        sums, squares = self.fill(students, teachers, moments.shift, rows, (xs, xt), threads)
        moments.add_chunk(xs, xt, (sums["student"], sums["teacher"]),
                          (squares["student"], squares["teacher"]), threads)


@contextlib.contextmanager
def update_threads(layout, chunk_rows: int):
    """``with update_threads(...) as threads``: the threads of an update's chunks.

    In the main thread, BLAS is held to one thread for the whole update (a threaded
    BLAS call need not give the bits of a single-threaded one: docs/performance.md),
    and the chunks run on pkd's threads when a chunk of ``chunk_rows`` rows is large
    enough to be split into tasks (``pkd._moments.TASK_MIN_WORK``), else on the
    calling thread. In another thread, one thread and BLAS as the user set it
    (:func:`pkd._threads.own_threads` says why).
    """
    from ._moments import TASK_MIN_WORK
    from ._threads import in_main_thread, single_threaded_blas

    if not in_main_thread():
        yield 1
        return
    work = chunk_rows * layout.total["student"] * layout.total["teacher"]
    with single_threaded_blas as blas_threads:
        yield blas_threads if work >= TASK_MIN_WORK else 1


def accumulate_chunks(stats, chunks, check_finite: bool, progress: bool) -> None:
    """``stats.update`` on every ``(student_layers, teacher_layers[, mask])`` of ``chunks``."""
    iterator = iter(chunks)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, unit="chunk", desc="alignment statistics")
    count = 0
    for k, chunk in enumerate(iterator):
        if not isinstance(chunk, (tuple, list)) or len(chunk) not in (2, 3):
            raise TypeError(
                f"chunks[{k}] must be a tuple (student_layers, teacher_layers) or "
                f"(student_layers, teacher_layers, mask), got {type(chunk).__name__}"
                + (f" of length {len(chunk)}" if isinstance(chunk, (tuple, list)) else "")
            )
        try:
            stats.update(chunk[0], chunk[1], chunk[2] if len(chunk) == 3 else None,
                         check_finite=check_finite)
        except (ValueError, TypeError) as error:
            raise type(error)(f"chunks[{k}]: {error}") from error
        count += 1
    if count == 0:
        raise ValueError("chunks is empty: there is nothing to accumulate")


def check_same_layers(first, second) -> None:
    """Two :class:`pkd.AlignmentStats` hold the same layer widths (to merge them)."""
    if (first.student_widths, first.teacher_widths) != (second.student_widths,
                                                        second.teacher_widths):
        raise ValueError(
            "cannot merge statistics of different layers: "
            f"{first.n_student} student layers of widths {first.student_widths} and "
            f"{first.n_teacher} teacher layers of widths {first.teacher_widths}, vs "
            f"{second.n_student} student layers of widths {second.student_widths} and "
            f"{second.n_teacher} teacher layers of widths {second.teacher_widths}"
        )


def check_heldout(n_folds: int, fold_rows, examples: int) -> None:
    """Held-out estimates need folds, each holding rows."""
    if n_folds == 1:
        raise ValueError(
            "heldout=True needs statistics accumulated with folds=k (k >= 2), e.g. "
            "AlignmentStats.from_arrays(..., folds=5); these have no folds"
        )
    empty = [f for f, n in enumerate(fold_rows) if n == 0]
    if empty:
        raise ValueError(
            f"fold(s) {empty} of folds={n_folds} hold no rows: there are fewer examples "
            f"({examples}) than folds, or the mask leaves none in them; use fewer folds "
            "or more rows"
        )


@contextlib.contextmanager
def row_bar(student_layers, show: bool):
    """A tqdm bar over the rows of the layers (None when not shown)."""
    if not show:
        yield None
        return
    from tqdm.auto import tqdm

    first = as_layers(student_layers, "student_layers")[0]
    bar = tqdm(total=int(np.prod(np.shape(first)[:-1])), unit="row",
               desc="alignment statistics")
    try:
        yield bar
    finally:
        bar.close()
