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
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls = 0
        self._limiter = None
        self._threads = 1

    def __enter__(self) -> int:
        with self._lock:
            if self._calls == 0:
                # scipy's BLAS (pkd._blas calls it) may not be loaded yet, and a limit set
                # before it loads would not cover it.
                import scipy.linalg.cython_blas  # noqa: F401
                from threadpoolctl import ThreadpoolController

                blas = ThreadpoolController().select(user_api="blas")
                self._threads = max(1, min((lib.num_threads or 1
                                            for lib in blas.lib_controllers), default=1))
                self._limiter = blas.limit(limits=1)
            self._calls += 1
            return self._threads

    def __exit__(self, *exc_info) -> None:
        with self._lock:
            self._calls -= 1
            if self._calls == 0:
                self._limiter.restore_original_limits()
                self._limiter = None


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
