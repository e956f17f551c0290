"""Alignment statistics on Dask: per-block statistics on the workers, a tree of merges.

The statistics of :class:`~pkd.alignment.AlignmentStats` are sums over rows,
so a dataset split into row blocks gives one set of statistics per block,
computed where the block lives, and :meth:`~pkd.alignment.AlignmentStats.merge`
combines them exactly (different shifts included). Two entry points, both
reached through classmethods of :class:`~pkd.alignment.AlignmentStats`:

* :func:`from_dask`: layers given as dask arrays chunked along rows; one task
  per row block.
* :func:`from_dumps`: two dump files (``.safetensors``) read by the workers
  themselves; one task per range of ``task_rows`` rows, which the task
  streams ``chunk_rows`` at a time. Only paths, row ranges and mask slices
  travel to the workers, so the files must be readable under the same path
  on every worker (a shared filesystem).

Each task returns its statistics as :meth:`~pkd.alignment.AlignmentStats.to_dict`
(plain numpy arrays, cheap to serialise), or ``None`` when its mask selects
no row. The results are merged pairwise-in-order in a tree with a fixed
fan-in (``split_every``): the order of every merge is fixed by the row
order, so the result does not depend on the scheduler, the number of workers
or the order in which tasks finish.

Sizes: every task emits the full statistics, ``Σd_s·Σd_t + Σd_s² + Σd_t²``
float64 values (480 MB for a 6-layer student and a 12-layer teacher of width
768, all ``hidden_states`` included). Row blocks should be large next to that
(the default ``task_rows`` of :func:`from_dumps` reads 8× more values than it
emits), and a merge task holds ``split_every`` results plus two working
copies in memory.

Dask is imported inside the functions: importing this module (and ``pkd``)
never imports dask.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ._validation import FLOAT_DTYPES, check_mask, check_positive_int

__all__ = ["DEFAULT_SPLIT_EVERY", "from_dask", "from_dumps"]

DEFAULT_SPLIT_EVERY = 4
"""Fan-in of the merge tree: a merge task holds this many statistics at once."""

TASK_VALUES_RATIO = 8
"""Default ``task_rows``: a task reads at least this many times the values it emits."""

# Workers reopen dumps under a mask key no file has: the mask travels from the
# client (already validated there), so a worker never reads or re-checks it.
_CLIENT_MASK_KEY = "\x00pkd: the mask is sent by the client"

_INSTALL_HINT = "install the extra: pip install 'pkd[dask]'"


def _import_dask():
    try:
        import dask
        import dask.array
    except ImportError as error:
        raise ImportError(
            f"distributed alignment statistics need dask ({error}); {_INSTALL_HINT}"
        ) from error
    return dask


# ---------------------------------------------------------------------------
# Tasks (module-level functions: workers import them by reference).


def _prefix_error(error: Exception, where: str) -> Exception:
    """The same exception type with ``where`` in front of the message."""
    try:
        return type(error)(f"{where}: {error}")
    except TypeError:  # an exception class with a different constructor
        return ValueError(f"{where}: {error}")


def alignment_block(students, teachers, mask, start: int, chunk_rows: int,
                    folds: int | None = None, per_example: int = 1):
    """Statistics of one row block, as ``to_dict()`` arrays, or None if the mask selects none.

    Parameters
    ----------
    students, teachers : list of ndarray, each (n, d)
        The block's rows of every layer.
    mask : ndarray (n,) or None
    start : int
        The block's first row in the whole dataset (for messages and the fold rule).
    per_example : int
        Rows per example (``T`` for flattened 3-D input): row ``r`` is example ``r // T``.
    """
    from .alignment import AlignmentStats

    n = students[0].shape[0]
    where = (f"the block of rows [{start}, {start + n}) of the dask arrays (row numbers "
             "below count from its start)")
    try:
        if mask is not None:
            mask = check_mask(mask, (n,), "mask")
            if not mask.any():
                return None
        stats = AlignmentStats(chunk_rows=chunk_rows, folds=folds)
        stats.update(students, teachers, mask,
                     examples=np.arange(start, start + n, dtype=np.int64) // per_example)
    except (ValueError, TypeError) as error:
        raise _prefix_error(error, where) from error
    return stats.to_dict()


def alignment_merge(*parts):
    """Merge ``to_dict()`` statistics in the order given (``None`` entries skipped)."""
    from .alignment import AlignmentStats

    total = None
    for part in parts:
        if part is None:
            continue
        stats = AlignmentStats.from_dict(part)
        total = stats if total is None else total.merge(stats)
    return None if total is None else total.to_dict()


def _open_on_worker(path: str, expected, role: str):
    """Reopen a dump on a worker and check it is the file the client saw."""
    from .io import load_dump

    host = socket.gethostname()
    try:
        dump = load_dump(path, mask_key=_CLIENT_MASK_KEY)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{role} dump {path} does not exist on worker host {host!r}: the workers open "
            "the dumps by path, so the files must be on a filesystem every worker shares, "
            "under the same path as on the client"
        ) from error
    found = [(layer.shape, str(layer.stored_dtype)) for layer in dump.layers]
    if found != list(expected):
        dump.close()
        raise ValueError(
            f"{role} dump {path} on worker host {host!r} differs from the file the client "
            f"opened (layers (shape, dtype) {found} vs {list(expected)}): every worker must "
            "see the same file (a shared filesystem); was it rewritten during the run?"
        )
    return dump


def alignment_dump_rows(student_path: str, teacher_path: str, student_expected,
                        teacher_expected, start: int, stop: int, mask, chunk_rows: int,
                        folds: int | None = None):
    """Statistics of rows ``[start, stop)`` of two dumps: the chunk loop of ``from_dumps``.

    ``mask`` is the flat bool mask of these rows (or None). Returns ``to_dict()``
    arrays, or None if it selects no row.
    """
    from ._streaming import stream_dumps
    from .alignment import AlignmentStats

    stats = AlignmentStats(chunk_rows=chunk_rows, folds=folds)
    flat = None
    with contextlib.ExitStack() as stack:
        student = stack.enter_context(_open_on_worker(student_path, student_expected, "student"))
        teacher = stack.enter_context(_open_on_worker(teacher_path, teacher_expected, "teacher"))
        if mask is not None:
            flat = np.zeros(student.n_rows, dtype=bool)
            flat[start:stop] = mask
        stream_dumps(stats, student, teacher, flat, start, stop)
    return None if stats.n_rows == 0 else stats.to_dict()


# ---------------------------------------------------------------------------
# Graph building and running.


def _check_split_every(split_every) -> int:
    split_every = check_positive_int(split_every, "split_every")
    if split_every < 2:
        raise ValueError(f"split_every must be >= 2 (the merge tree's fan-in), got {split_every}")
    return split_every


def _tree(parts: list, split_every: int):
    """One delayed result merging ``parts`` in order, ``split_every`` at a time per level."""
    import dask

    merge = dask.delayed(alignment_merge, pure=True)
    while len(parts) > 1:
        parts = [merge(*parts[i:i + split_every]) for i in range(0, len(parts), split_every)]
    return parts[0]


def _check_scheduler(scheduler):
    """Refuse a scheduler string dask does not know, before any work."""
    if scheduler is None or not isinstance(scheduler, str) or "://" in scheduler:
        return
    from dask.base import named_schedulers

    known = sorted(set(named_schedulers) | {"distributed"})
    if scheduler.lower() not in known and scheduler.lower() != "dask.distributed":
        raise ValueError(
            f"scheduler={scheduler!r} is neither a scheduler name ({', '.join(known)}) nor "
            "the address of a dask.distributed scheduler ('tcp://host:8786')"
        )


@contextlib.contextmanager
def _scheduler(scheduler) -> Iterator:
    """What ``dask.compute(scheduler=...)`` takes; an address gets a Client, closed after."""
    if not (isinstance(scheduler, str) and "://" in scheduler):
        yield scheduler
        return
    try:
        from distributed import Client
    except ImportError as error:
        raise ImportError(
            f"scheduler={scheduler!r} is a dask.distributed address, which needs the "
            f"'distributed' package ({error}); {_INSTALL_HINT}"
        ) from error
    try:
        client = Client(scheduler, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as error:
        raise ValueError(
            f"scheduler={scheduler!r}: cannot connect to a dask.distributed scheduler there "
            f"({type(error).__name__}: {error}); start one (`dask scheduler`, then "
            "`dask worker ADDRESS` on each machine) or check the address"
        ) from error
    try:
        yield client
    finally:
        client.close()


def _run(parts: list, split_every: int, scheduler, what: str) -> dict:
    import dask

    if not parts:
        raise ValueError(f"the mask selects no row of {what}: there is nothing to accumulate")
    final = _tree(parts, split_every)
    with _scheduler(scheduler) as resolved:
        (result,) = dask.compute(final, scheduler=resolved)
    if result is None:
        raise ValueError(f"the mask selects no row of {what}: there is nothing to accumulate")
    return result


# ---------------------------------------------------------------------------
# from_dask


def _dask_layers(layers, name: str) -> list:
    """A list of dask arrays from a list/tuple of them or one stacked dask array."""
    import dask.array as da

    if isinstance(layers, da.Array):
        if layers.ndim in (3, 4):
            return [layers[i] for i in range(layers.shape[0])]
        raise ValueError(
            f"{name} must be a list of per-layer dask arrays or one stacked dask array of "
            f"shape (L, N, d) or (L, B, T, d), got a dask array of shape {layers.shape}"
        )
    if not isinstance(layers, (list, tuple)):
        hint = (" (in-memory arrays: use AlignmentStats.from_arrays, or wrap them with "
                "dask.array.from_array(x, chunks=(rows, -1)))")
        raise TypeError(
            f"{name} must be a list/tuple of dask arrays or a stacked dask array, got "
            f"{type(layers).__name__}" + (hint if hasattr(layers, "shape") else "")
        )
    if len(layers) == 0:
        raise ValueError(f"{name} is an empty sequence: pass one dask array per layer")
    for k, x in enumerate(layers):
        if not isinstance(x, da.Array):
            raise TypeError(
                f"{name}[{k}] must be a dask array, got {type(x).__name__} (wrap in-memory "
                "arrays with dask.array.from_array(x, chunks=(rows, -1)), or use "
                "AlignmentStats.from_arrays)"
            )
    return list(layers)


def _check_dask_layer(x, name: str) -> None:
    if any(isinstance(n, float) and math.isnan(n) for n in x.shape):
        raise ValueError(
            f"{name} has unknown chunk sizes (shape {x.shape}); call "
            f"x.compute_chunk_sizes() first"
        )
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got dtype {x.dtype}")
    if x.ndim not in (2, 3):
        raise ValueError(f"{name} must be 2-D (N, d) or 3-D (B, T, d), got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{name} is empty (shape {x.shape})")


def _flat_rows(x):
    """(N, d) view of a layer, one chunk along the width (3-D: whole sequences per chunk)."""
    if x.ndim == 3:
        return x.rechunk({1: -1, 2: -1}).reshape(-1, x.shape[-1])
    return x.rechunk({1: -1})


def _flat_mask(mask, lead_shape: tuple, row_chunks: tuple):
    """The mask as one entry per row block: numpy slices, or a dask (N,) array's blocks."""
    import dask.array as da

    n_rows = sum(row_chunks)
    if isinstance(mask, da.Array):
        if mask.shape != tuple(lead_shape):
            raise ValueError(
                f"mask has shape {mask.shape} but the hidden states have leading shape "
                f"{tuple(lead_shape)}: one entry per row (2-D input) or per (batch, position) "
                "(3-D input)"
            )
        if mask.dtype.kind not in "biuf":
            raise TypeError(f"mask must hold 0/1 integers or bools, got dtype {mask.dtype}")
        if mask.ndim == 2:
            mask = mask.rechunk({1: -1})
        flat = mask.reshape(n_rows).rechunk((row_chunks,))
        return list(flat.to_delayed().ravel())
    flat = check_mask(mask, lead_shape, "mask").reshape(-1)
    bounds = np.concatenate([[0], np.cumsum(row_chunks)])
    return [flat[bounds[k]:bounds[k + 1]] for k in range(len(row_chunks))]


def from_dask(student_layers, teacher_layers, mask=None, *, chunk_rows: int,
              split_every: int = DEFAULT_SPLIT_EVERY, scheduler=None, folds=None) -> dict:
    """The ``to_dict()`` statistics of layers held in dask arrays (``AlignmentStats.from_dask``).

    Parameters
    ----------
    student_layers, teacher_layers : list of dask.array.Array, or one stacked dask array
        Each ``(N, d)`` or ``(B, T, d)`` (or stacked ``(L, N, d)`` /
        ``(L, B, T, d)``), float32 or float64, with known chunk sizes. Blocks
        are row blocks of the first student layer (for 3-D input: its batch
        chunks, whole sequences); other layers are rechunked to them and the
        width to one chunk. Each block emits the full statistics, so make row
        chunks large next to ``Σd_s·Σd_t`` (tens of thousands of rows for
        BERT-size models).
    mask : array_like or dask.array.Array, optional
        0/1 of shape ``(N,)`` / ``(B, T)``. A numpy mask is checked here and
        blocks it leaves empty get no task; a dask mask is checked in the tasks.
    chunk_rows : int
        Rows per accumulation step inside a task.
    split_every : int
        Fan-in (>= 2) of the merge tree.
    scheduler : None, str, or distributed.Client
        ``None``: dask's default; a scheduler name (``"threads"``,
        ``"processes"``, ``"synchronous"``); a Client; or an address
        (``"tcp://host:8786"``: a Client is connected, and closed at the end).
    folds : int, optional
        As in ``AlignmentStats``: example ``i`` (row, or sequence of 3-D input)
        goes to fold ``i mod k`` wherever its block is; ``k`` times the
        statistics per task.

    Raises
    ------
    TypeError, ValueError
        Before any work for what the client can see (layer types, dtypes,
        shapes, a numpy mask, folds); errors raised in a task keep their type
        and name the rows of the block. A mask that selects no row.
    ImportError
        dask is not installed.
    """
    from .alignment import AlignmentStats

    dask = _import_dask()
    chunk_rows = check_positive_int(chunk_rows, "chunk_rows")
    split_every = _check_split_every(split_every)
    AlignmentStats(folds=folds)  # checks folds before any work
    _check_scheduler(scheduler)
    students = _dask_layers(student_layers, "student_layers")
    teachers = _dask_layers(teacher_layers, "teacher_layers")
    named = [(f"student_layers[{k}]", x) for k, x in enumerate(students)]
    named += [(f"teacher_layers[{k}]", x) for k, x in enumerate(teachers)]
    for name, x in named:
        _check_dask_layer(x, name)
    reference_name, reference = named[0]
    for name, x in named[1:]:
        if x.shape[:-1] != reference.shape[:-1]:
            raise ValueError(
                f"{reference_name} and {name} disagree on rows: shapes {reference.shape} and "
                f"{x.shape} must match in every dimension but the last (hidden width)"
            )
    lead_shape = tuple(int(n) for n in reference.shape[:-1])

    # One row chunking for every layer (the first student layer's), one width chunk.
    flat = [_flat_rows(x) for _, x in named]
    row_chunks = flat[0].chunks[0]
    flat = [x if x.chunks[0] == row_chunks else x.rechunk({0: row_chunks}) for x in flat]
    blocks = [x.to_delayed().ravel() for x in flat]  # per layer: one Delayed per row block
    masks = [None] * len(row_chunks) if mask is None else _flat_mask(mask, lead_shape,
                                                                     row_chunks)
    block = dask.delayed(alignment_block, pure=True)
    n_s = len(students)
    parts, start = [], 0
    for k, n in enumerate(row_chunks):
        block_mask = masks[k]
        # Zero-length chunks (boolean filtering, then compute_chunk_sizes()) hold no row.
        if n == 0 or (isinstance(block_mask, np.ndarray) and not block_mask.any()):
            start += n
            continue  # known on the client: no task at all
        layers = [b[k] for b in blocks]
        parts.append(block(layers[:n_s], layers[n_s:], block_mask, start, chunk_rows, folds,
                           lead_shape[1] if len(lead_shape) == 2 else 1))
        start += n
    return _run(parts, split_every, scheduler, f"the {lead_shape} rows")


# ---------------------------------------------------------------------------
# from_dumps


def default_task_rows(student_widths, teacher_widths, chunk_rows: int) -> int:
    """Rows per task such that a task reads ≥ ``TASK_VALUES_RATIO``× the values it emits.

    A multiple of ``chunk_rows``.
    """
    total_s, total_t = sum(student_widths), sum(teacher_widths)
    emitted = total_s * total_t + sum(d * d for d in student_widths) + sum(
        d * d for d in teacher_widths)
    rows = math.ceil(TASK_VALUES_RATIO * emitted / (total_s + total_t))
    return chunk_rows * max(1, math.ceil(rows / chunk_rows))


def _check_dump(dump, name: str):
    from .io import Dump

    if not isinstance(dump, Dump):
        raise TypeError(
            f"{name} must be a pkd.io.Dump (from pkd.io.load_dump), got {type(dump).__name__}"
        )
    if dump.format != "safetensors":
        raise ValueError(
            f"{name} {dump.path} is a .{dump.format} dump, whose layers can only be read whole: "
            "every task would load the whole file. Convert it once with "
            "pkd.io.save_dump('dump.safetensors', pkd.io.load_dump('dump.npz').layers, "
            "attention_mask=...) and pass the .safetensors file"
        )
    return str(Path(dump.path).resolve()), tuple(
        (layer.shape, str(layer.stored_dtype)) for layer in dump.layers)


def from_dumps(student, teacher, *, chunk_rows: int, scheduler=None, mask="auto",
               tokens="all", task_rows: int | None = None,
               split_every: int = DEFAULT_SPLIT_EVERY, folds=None) -> dict:
    """The ``to_dict()`` statistics of two dumps, read by the workers (``from_dumps_dask``).

    Each task opens both dumps by path and runs the chunk loop of
    ``AlignmentStats.from_dumps`` (:func:`pkd._streaming.stream_dumps`) on its
    ``task_rows`` rows; ``mask`` (``"auto"``: the dumps' own masks), ``tokens``
    and ``folds`` are those of ``from_dumps``. ``task_rows`` defaults to the
    smallest multiple of ``chunk_rows`` with which a task reads at least 8× the
    values it emits. The dumps must be ``.safetensors`` files readable under the
    same absolute path on every worker; a worker that cannot find them, or sees
    a different file, raises an error naming its host.
    """
    from ._streaming import check_dumps, resolve_mask
    from .alignment import AlignmentStats

    dask = _import_dask()
    chunk_rows = check_positive_int(chunk_rows, "chunk_rows")
    split_every = _check_split_every(split_every)
    AlignmentStats(folds=folds)  # checks folds before any work
    _check_scheduler(scheduler)
    check_dumps(student, teacher)
    student_path, student_expected = _check_dump(student, "student")
    teacher_path, teacher_expected = _check_dump(teacher, "teacher")
    if task_rows is None:
        task_rows = default_task_rows([layer.width for layer in student.layers],
                                      [layer.width for layer in teacher.layers], chunk_rows)
    elif isinstance(task_rows, numbers.Integral) and not isinstance(task_rows, bool):
        task_rows = check_positive_int(task_rows, "task_rows")
    else:
        raise TypeError(f"task_rows must be a positive int or None, got {task_rows!r}")
    flat_mask = resolve_mask(student, teacher, mask, tokens)
    task = dask.delayed(alignment_dump_rows, pure=True)
    n_rows = student.n_rows
    parts = []
    for start in range(0, n_rows, task_rows):
        stop = min(start + task_rows, n_rows)
        rows_mask = None if flat_mask is None else flat_mask[start:stop]
        if rows_mask is not None and not rows_mask.any():
            continue
        parts.append(task(student_path, teacher_path, student_expected, teacher_expected,
                          start, stop, rows_mask, chunk_rows, folds))
    return _run(parts, split_every, scheduler, f"the dumps {student.path} and {teacher.path}")
