"""One update of :class:`pkd.AlignmentStats`: input checks, the fold rule, the chunk buffers.

A chunk of ``m`` selected rows is copied once (shifted, float64, feature-major:
:func:`pkd.kernels.gram.fill_shifted_transposed`) into reusable buffers that
the BLAS calls of :meth:`pkd._moments.Moments.add_chunk` read without a copy.
"""

from __future__ import annotations

import numpy as np

from ._validation import (
    as_layers,
    check_finite_rows,
    check_float_array,
    check_mask,
    check_paired,
)

_SIDES = ("student", "teacher")


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

    def fill(self, side: str, layers, shift, rows, buffer) -> np.ndarray:
        """Shifted, float64, feature-major copy of the rows; returns their column sums."""
        from .kernels.gram import fill_shifted_transposed

        sums = np.zeros(self.layout.total[side])
        transposed = buffer.T  # (Σd, m), C-contiguous: row j is feature j
        for k, values in enumerate(layers):
            block = self.layout.block(side, k)
            fill_shifted_transposed(values, rows, shift[block], transposed[block], sums[block])
        return sums

    def first_shift(self, students, teachers, rows) -> dict[str, np.ndarray]:
        """Column means of the rows, rounded to each layer's dtype (exact shifted copies)."""
        xs, xt = self.views(rows.size)
        shift = {}
        for side, layers, buffer in (("student", students, xs), ("teacher", teachers, xt)):
            means = self.fill(side, layers, np.zeros(self.layout.total[side]), rows,
                              buffer) / rows.size
            for k, values in enumerate(layers):
                block = self.layout.block(side, k)
                means[block] = means[block].astype(values.dtype)
            shift[side] = means
        return shift

    def add_rows(self, moments, students, teachers, rows) -> None:
        """Accumulate ``rows`` of the layers into ``moments``."""
        xs, xt = self.views(rows.size)
        sum_s = self.fill("student", students, moments.shift["student"], rows, xs)
        sum_t = self.fill("teacher", teachers, moments.shift["teacher"], rows, xt)
        moments.add_chunk(xs, xt, sum_s, sum_t)
