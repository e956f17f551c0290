"""Atomic file writes: a file either appears whole or not at all.

Every file pkd writes (dumps, figures, JSON, CSV) goes through here. The data
is written to a hidden temporary file in the *same directory* as the target
(so the final rename never crosses a file system), flushed to disk, and then
moved over the target with :func:`os.replace`, which is atomic on POSIX and
Windows. If the writer raises, the temporary file is removed and the target is
left exactly as it was (absent, or its previous content).

The temporary name keeps the target's suffix (``.out.png.k3j2.tmp.png``) so
writers that pick a format from the extension (``matplotlib.savefig``) still
work when handed the temporary path.

A file written over a long time (a dump, batch by batch) can be written and
made durable as it grows: :class:`BackgroundWriter` writes each part in a
thread and :class:`BackgroundSync` flushes what was already written in
another, while the caller computes the next part, so the final flush finds
little left.
"""

from __future__ import annotations

import contextlib
import os
import queue
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


def _default_mode(target: Path) -> int:
    """Permission bits the final file should get (``mkstemp`` creates 0600)."""
    try:
        return target.stat().st_mode & 0o7777  # keep an overwritten file's mode
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # not every platform can open a directory; durability is best effort
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path; on success it is renamed over ``path``.

    Parameters
    ----------
    path : str or os.PathLike
        The file to create or replace. Its directory must exist.

    Yields
    ------
    pathlib.Path
        An (empty, already created) temporary file next to ``path`` with the
        same suffix. Write the whole content to it inside the ``with`` block.

    Raises
    ------
    IsADirectoryError
        ``path`` is an existing directory.
    FileNotFoundError
        The directory of ``path`` does not exist.
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"cannot write {target}: it is a directory, give a file name")
    parent = target.parent
    if not parent.is_dir():
        raise FileNotFoundError(
            f"cannot write {target}: directory {parent} does not exist (create it first)"
        )
    # Cut (in bytes: the limit is 255 bytes) so that a name near the limit still fits.
    stem = os.fsencode(target.name)[:200].decode(errors="ignore")
    suffix = os.fsencode(target.suffix)[:20].decode(errors="ignore")
    fd, tmp_name = tempfile.mkstemp(dir=parent, prefix=f".{stem}.", suffix=f".tmp{suffix}")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _fsync_path(tmp)
        os.chmod(tmp, _default_mode(target))
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_path(parent, directory=True)


def _failed(name: str, what: str, error: OSError) -> OSError:
    """``error`` (from a background thread) as an OSError naming the file and the step."""
    failed = OSError(error.errno, f"{name}: {what} failed: {error.strerror or error}")
    failed.__cause__ = error
    return failed


# What the sync thread waits for before flushing: a few syncs per 100 MB keep each one large.
SYNC_EVERY_BYTES = 8 << 20


class BackgroundSync:
    """Flush a file's written data to disk in a thread, every ``every`` bytes written.

    The owner writes (``pwrite``) and calls :meth:`wrote`; once ``every``
    bytes have accumulated, a thread calls ``fdatasync`` on the file
    (``fsync`` where there is none) while the owner goes on: disk writeback
    overlaps the owner's work (the GIL is released in the call), and the final
    ``fsync`` of :func:`atomic_path` only has the tail left. Durability is
    unchanged: that final ``fsync`` still runs before the rename. A failed
    background flush is raised by the next :meth:`wrote` or by :meth:`stop`
    (an error a sync reports may not be reported again to a later one).

    Parameters
    ----------
    fd : int
        An open file descriptor; keep it open until :meth:`stop` returns.
    name : str
        The file's name, for error messages.
    every : int, optional
        Bytes written between two flushes (default ``SYNC_EVERY_BYTES``).
    """

    def __init__(self, fd: int, name: str, every: int | None = None):
        self._fd, self._name = fd, name
        self._every = SYNC_EVERY_BYTES if every is None else every
        self._pending = 0
        self._wake = threading.Event()
        self._stopping = False
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="pkd-sync", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sync = getattr(os, "fdatasync", os.fsync)
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopping:
                return
            try:
                sync(self._fd)
            except OSError as error:
                self._error = error
                return

    def _raise(self) -> None:
        if self._error is not None:
            raise _failed(self._name, "flushing to disk", self._error)

    def wrote(self, nbytes: int) -> None:
        """Count ``nbytes`` just written; wake the thread every ``every`` bytes.

        Raises
        ------
        OSError
            A background flush failed.
        """
        self._raise()
        self._pending += nbytes
        if self._pending >= self._every:
            self._pending = 0
            self._wake.set()

    def stop(self, *, check: bool = True) -> None:
        """End the thread (a flush in progress finishes first).

        Raises
        ------
        OSError
            A background flush failed (unless ``check=False``).
        """
        self._stopping = True
        self._wake.set()
        self._thread.join()
        if check:
            self._raise()


def write_at(fd: int, offset: int, data) -> None:
    """Write all of ``data`` (a C-contiguous buffer) at ``offset`` of the file ``fd``."""
    view = memoryview(data).cast("B")
    while view:
        if hasattr(os, "pwrite"):
            n = os.pwrite(fd, view, offset)
        else:  # pragma: no cover - Windows; only one thread writes the file
            os.lseek(fd, offset, os.SEEK_SET)
            n = os.write(fd, view)
        view, offset = view[n:], offset + n


class BackgroundWriter:
    """Write parts of a file in a thread (``pkd-write``), flushing them in another.

    :meth:`write` queues buffers for their offsets and returns; the thread
    writes them (the GIL is released in ``pwrite``, so the copy into the page
    cache overlaps the caller's work) and counts it for a
    :class:`BackgroundSync`. :meth:`write_now` writes in the caller's thread
    instead (a buffer the caller will reuse, with no copy held). A failed
    write or flush is raised by the next :meth:`write`, :meth:`write_now`,
    :meth:`wait` or :meth:`stop`; once one failed, the queued parts are
    dropped.

    Parameters
    ----------
    fd : int
        An open file descriptor; keep it open until :meth:`stop` returns.
    name : str
        The file's name, for error messages.
    every : int, optional
        Bytes written between two flushes (default ``SYNC_EVERY_BYTES``).
    """

    def __init__(self, fd: int, name: str, every: int | None = None):
        self._fd, self._name = fd, name
        self._sync = BackgroundSync(fd, name, every)
        self._queue: queue.Queue = queue.Queue()
        self._error: OSError | None = None
        self._cancelled = False
        self._thread = threading.Thread(target=self._run, name="pkd-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._write_all(item)
            finally:
                item = None  # released before wait() returns: the caller's memory stays bounded
                self._queue.task_done()

    def _write_all(self, parts: list) -> None:
        for offset, data in parts:  # a batch's parts in one item: one wake-up of the thread
            if self._error is not None or self._cancelled:
                return
            self._write(offset, data)

    def _write(self, offset: int, data) -> None:
        try:
            write_at(self._fd, offset, data)
        except OSError as error:
            self._error = _failed(self._name, "writing", error)
            return
        try:
            self._sync.wrote(memoryview(data).nbytes)
        except OSError as error:  # a failed flush, already named
            self._error = error

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, parts) -> None:
        """Queue ``(offset, data)`` pairs to be written in order, and return.

        Each ``data`` is C-contiguous and must stay unmodified until :meth:`wait`.

        Raises
        ------
        OSError
            An earlier write or flush failed.
        """
        self._raise()
        self._queue.put(list(parts))

    def write_now(self, offset: int, data) -> None:
        """Write ``data`` at ``offset`` in the calling thread (nothing may be queued).

        Raises
        ------
        OSError
            This write, or an earlier write or flush, failed.
        """
        self._raise()
        self._write(offset, data)
        self._raise()

    def wait(self) -> None:
        """Return once every queued part is written (then the caller may reuse them).

        Raises
        ------
        OSError
            A write or flush failed.
        """
        self._queue.join()
        self._raise()

    def stop(self, *, check: bool = True) -> None:
        """Write what is queued (``check=False``: drop it), then end both threads.

        Raises
        ------
        OSError
            A write or flush failed (unless ``check=False``).
        """
        self._cancelled = not check
        self._queue.put(None)
        self._thread.join()
        try:
            self._sync.stop(check=check)
        finally:
            if check:
                self._raise()


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], Any]) -> Path:
    """Call ``writer(tmp_path)`` and atomically move the result to ``path``.

    Parameters
    ----------
    path : str or os.PathLike
        The file to create or replace.
    writer : callable
        Called once with a temporary :class:`pathlib.Path` (same directory and
        suffix as ``path``); it must write the complete file there, e.g.
        ``lambda p: fig.savefig(p, dpi=150)``. If it raises, nothing is left
        behind and the exception propagates.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """``open()`` for writing, atomically: the file appears only if the block succeeds.

    Parameters
    ----------
    path : str or os.PathLike
        The file to create or replace.
    mode : {"w", "wb", "wt"}
        Text or binary write mode.
    **open_kwargs
        Passed to :func:`open` (``encoding``, ``newline``, ...).

    Examples
    --------
    >>> with atomic_open("report.json", encoding="utf-8") as f:  # doctest: +SKIP
    ...     json.dump(result, f)
    """
    if mode not in ("w", "wb", "wt"):
        raise ValueError(f'mode must be "w", "wt" or "wb", got {mode!r}')
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as f:
        yield f


def text_writer(text: str) -> Callable[[Path], Any]:
    """A writer (for :func:`atomic_write` / :func:`write_together`) of ``text`` in UTF-8."""
    return lambda tmp: Path(tmp).write_text(text, encoding="utf-8")


def figure_writer(fig, dpi: float = 120) -> Callable[[Path], Any]:
    """A writer of a matplotlib figure; the format follows the target's suffix."""
    return lambda tmp: fig.savefig(tmp, dpi=dpi)


def check_output_dir(path: str | os.PathLike, name: str = "out") -> Path:
    """Check that ``path`` is, or can be created as, a writable directory; create nothing.

    The directory appears only when the outputs are written
    (:func:`write_together`), so a command that fails leaves nothing behind.

    Raises
    ------
    ValueError
        ``path`` is a file, lies under a file, or is not writable; the message
        names ``name`` (the argument it came from).
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{name} {str(out)!r} exists and is not a directory: give a directory")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"cannot create the output directory {str(out)!r} ({name}): "
                         f"{str(parent)!r} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"the output directory {str(out)!r} ({name}) is not writable "
                         f"({str(parent)!r} is read-only)")
    return out


def write_together(files: dict) -> None:
    """Write several files so that either all of them appear, or none does.

    Every writer first writes a temporary file next to its target; only once
    all have succeeded are they renamed into place. If one fails, the
    temporary files are removed, and so are the directories created for them.
    (A rename that fails after all writes succeeded can still leave the files
    renamed before it.)

    Parameters
    ----------
    files : dict
        ``{path: writer}``; ``writer(tmp_path)`` writes the whole file, as for
        :func:`atomic_write`. Missing directories are created.

    Raises
    ------
    OSError
        A directory cannot be created. Whatever a writer raises propagates.
    """
    created: list[Path] = []
    try:
        for directory in sorted({Path(p).parent for p in files}):
            missing = [d for d in (directory, *directory.parents) if not d.exists()]
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise OSError(f"cannot create output directory {directory}: {error}") from None
            created += missing
        with contextlib.ExitStack() as stack:  # on exit: all renamed, or all removed
            temps = {path: stack.enter_context(atomic_path(path)) for path in files}
            for path, writer in files.items():
                writer(temps[path])
    except BaseException:
        for directory in sorted(created, key=lambda d: len(d.parts), reverse=True):
            with contextlib.suppress(OSError):  # deepest first; a non-empty one stays
                directory.rmdir()
        raise
