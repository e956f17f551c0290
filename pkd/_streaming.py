"""The chunk loop over two hidden-state dumps: :meth:`pkd.AlignmentStats.from_dumps`.

The same loop serves the whole dumps in one process and a row range in a Dask
task (:mod:`pkd._dask`), so both read, mask and assign folds identically.
"""

from __future__ import annotations

import sys

import numpy as np

from ._validation import check_mask, rows_mask, select_rows


def check_dumps(student, teacher) -> None:
    """Both are :class:`pkd.io.Dump` of the same leading shape."""
    from .io import Dump

    for name, dump in (("student", student), ("teacher", teacher)):
        if not isinstance(dump, Dump):
            raise TypeError(
                f"{name} must be a pkd.io.Dump (from pkd.io.load_dump), got "
                f"{type(dump).__name__}"
            )
    if student.lead_shape != teacher.lead_shape:
        raise ValueError(
            f"the dumps disagree on rows: student {student.path} has leading shape "
            f"{student.lead_shape}, teacher {teacher.path} has {teacher.lead_shape}; both "
            "must hold the hidden states of the same inputs"
        )


def resolve_mask(student, teacher, mask, tokens) -> np.ndarray | None:
    """The flat bool mask of the rows that count (None: all of them).

    ``mask="auto"``: the teacher's attention mask if it has one, else the
    student's; two different masks are refused. ``tokens`` then selects
    positions of 3-D dumps.
    """
    lead = student.lead_shape
    if isinstance(mask, str):
        if mask != "auto":
            raise ValueError(f"mask must be 'auto', an array or None, got {mask!r}")
        masks = [m for m in (teacher.attention_mask, student.attention_mask) if m is not None]
        if len(masks) == 2 and not np.array_equal(masks[0], masks[1]):
            differ = int((masks[0] != masks[1]).sum())
            raise ValueError(
                f"mask='auto': the dumps' attention masks differ in {differ} of {masks[0].size} "
                f"rows (teacher {teacher.path}, student {student.path}): they must mark the "
                "same tokens of the same inputs; pass the mask to use explicitly"
            )
        mask = masks[0] if masks else None
    elif mask is not None:
        mask = check_mask(mask, lead, "mask")
    if tokens == "all":
        if mask is not None and not mask.any():
            raise ValueError(
                f"the mask selects no row of the dumps {student.path} and {teacher.path}: "
                "there is nothing to accumulate"
            )
        return None if mask is None else mask.reshape(-1)
    selected = rows_mask(lead, select_rows(lead, mask, tokens, mask_name="mask"))
    return None if selected is None else selected.reshape(-1)


def _range_chunks(student, teacher, start: int, stop: int, chunk_rows: int):
    for lo in range(start, stop, chunk_rows):
        hi = min(lo + chunk_rows, stop)
        yield lo, hi, [x.rows(lo, hi) for x in student.layers], \
            [x.rows(lo, hi) for x in teacher.layers]


def stream_dumps(stats, student, teacher, flat_mask, start: int, stop: int, *,
                 progress: bool = False, where: str = "") -> None:
    """Accumulate rows ``[start, stop)`` of both dumps into ``stats``, a chunk at a time.

    Chunks the mask leaves empty are not read. Rows of a 3-D dump belong to
    the example (sequence) ``row // T`` for the fold rule.
    """
    chunk_rows = stats.chunk_rows
    if start == 0 and stop == student.n_rows:
        pairs = zip(student.iter_chunks(chunk_rows), teacher.iter_chunks(chunk_rows),
                    strict=True)
        chunks = ((lo, hi, s, t) for (lo, hi, s), (_, _, t) in pairs)
    else:
        chunks = _range_chunks(student, teacher, start, stop, chunk_rows)
    per_example = student.lead_shape[1] if len(student.lead_shape) == 2 else 1
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=stop - start, desc="streaming", unit="rows", file=sys.stderr)
    try:
        for lo, hi, s_chunk, t_chunk in chunks:
            rows = None if flat_mask is None else flat_mask[lo:hi]
            if rows is None or rows.any():
                examples = np.arange(lo, hi, dtype=np.int64) // per_example
                try:
                    stats.update(s_chunk, t_chunk, rows, examples=examples)
                except (ValueError, TypeError) as error:
                    raise type(error)(
                        f"{where}rows [{lo}, {hi}) of {student.path} and {teacher.path} "
                        f"(row numbers below count from {lo}): {error}") from error
            if bar is not None:
                bar.update(hi - lo)
    finally:
        if bar is not None:
            bar.close()
    if stats.n_rows == 0 and start == 0 and stop == student.n_rows:
        raise ValueError(
            f"the mask selects no row of the dumps {student.path} and {teacher.path}: "
            "there is nothing to accumulate"
        )
