"""Threads of pkd's own, and BLAS held to one thread while they (or small solves) run.

OpenBLAS's idle workers keep spinning on a core for about 0.1 s after each
threaded call, so work that follows a BLAS call on the same cores runs slower;
and a threaded call does not always give the bits of a single-threaded one of
the same shapes. Where that matters (RBF CKA's Gram blocks, the closed form's
d × d decompositions, the alignment statistics' large updates and their
queries' tasks), pkd makes single-threaded BLAS calls, on its own threads when
there are several (docs/performance.md, "RBF CKA" and "Alignment statistics").
Those calls must release the GIL: NumPy's do, ``scipy.linalg.blas``'s do not
(so :mod:`pkd._blas` reaches scipy's ``dtrmm``, ``dgemm`` and ``dsyrk``
through ctypes).
"""

from __future__ import annotations

import threading


class SingleThreadedBlas:
    """BLAS limited to one thread, process-wide, while any user is inside (``threadpoolctl``).

    The first call in sets the limit and the last one out restores it, so that
    concurrent calls neither take another's limit for the original nor restore it early.
    ``with`` gives the thread count BLAS had before the first call set the limit.

    The BLAS libraries are found once, after scipy's is loaded (a limit set before a
    library loads does not cover it): the libraries pkd calls, NumPy's and scipy's, are
    then all known, and a ``with`` costs microseconds instead of a scan of the process.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls = 0
        self._originals = []  # (library, its thread count) of those the first call limited
        self._threads = 1
        self._libraries = None

    def __enter__(self) -> int:
        with self._lock:
            if self._calls == 0:
                if self._libraries is None:
                    import scipy.linalg.cython_blas  # noqa: F401  (loads scipy's BLAS)
                    from threadpoolctl import ThreadpoolController

                    self._libraries = ThreadpoolController().select(
                        user_api="blas").lib_controllers
                counts = [(lib, lib.num_threads) for lib in self._libraries]
                self._threads = max(1, min((n or 1 for _, n in counts), default=1))
                # Each library directly: threadpoolctl's limit() would also gather the
                # info of every library, tens of microseconds on every update.
                self._originals = [(lib, n) for lib, n in counts if n and n != 1]
                for lib, _ in self._originals:
                    lib.set_num_threads(1)
            self._calls += 1
            return self._threads

    def __exit__(self, *exc_info) -> None:
        with self._lock:
            self._calls -= 1
            if self._calls == 0:
                for lib, n in self._originals:
                    lib.set_num_threads(n)
                self._originals = []


single_threaded_blas = SingleThreadedBlas()


def own_threads(blas_threads: int) -> int:
    """How many of pkd's threads to run: BLAS's former count in the main thread, else 1.

    A threadpoolctl limit set from another thread does not hold for OpenBLAS (it
    reads back as unset), so there each of pkd's threads would run BLAS on all of
    its threads: one thread, with BLAS as it is, oversubscribes nothing.
    """
    return blas_threads if in_main_thread() else 1


def in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def on_threads(items, task, threads: int) -> None:
    """Call ``task(item)`` for every item, on ``threads`` threads (the caller's among them).

    Each thread takes the next item as it finishes one (``next()`` on a shared
    iterator is atomic), so a thread that shares its core does fewer; the first
    error is re-raised in the calling thread once all have stopped.
    """
    items, errors = iter(items), []

    def work() -> None:
        try:
            for item in items:
                task(item)
        except BaseException as error:
            errors.append(error)

    workers = [threading.Thread(target=work) for _ in range(threads - 1)]
    for worker in workers:
        worker.start()
    work()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]
