"""The one decorator every kernel goes through.

``kernel`` compiles a function lazily (so ``import pkd`` stays fast) with the
house settings: on-disk cache, no ``fastmath`` (NaN/Inf semantics are kept),
``nogil`` so callers may run kernels from threads. ``float32`` and ``float64``
specialisations are built on first use and cached. Kernels keep the input's
dtype: scalars that meet array elements are passed in already cast by the
Python layer, and accumulators are explicitly float64.

``twins`` builds a serial and a ``parallel=True`` version of the same source,
and :func:`available_threads` says how many threads the parallel one may use;
the caller picks one by a rule of thread count and size (the logit pass of
:mod:`pkd.objective`, the centred cross squares of :mod:`pkd.kernels.gram` and
the RBF passes of :mod:`pkd.kernels.rbf`; the rules are in docs/performance.md,
"Parallel kernels").

``reassociate=True`` turns on LLVM's ``reassoc`` flag: it lets the float64
sums of a row (Σ r², norms, dot products) be split into SIMD lanes; without it
LLVM must add one element at a time, and the fused pass runs several times
slower than a memory copy (docs/performance.md, "Kernels").

``fuse_multiply_add=True`` adds the ``contract`` flag: ``acc + a·b`` may become
one FMA, rounded once instead of twice. The product of two float32 values is
exact in float64, so float32 sums of squares and dot products are bit for
bit what they were without it; float64 ones gain accuracy. It is for kernels
whose fused expressions are sums of products only: in ``a·b − c·d`` an FMA
rounds one product and not the other, and identical rows no longer give
exactly 0 (the normalized pass's residual ``y/‖y‖ − t/‖t‖``).

Neither flag drops NaN/Inf semantics (that would be ``nnan``/``ninf``, never
used here), and the lane order is fixed in the compiled code, so results are
identical from call to call and independent of the thread count; only
machines with another SIMD width, or without FMA, may differ in the last bits.

Numba's on-disk cache is keyed by each kernel's own source file, name, line and
bytecode, not by these options: after changing them here, delete
``pkd/kernels/__pycache__``.
"""

from __future__ import annotations

import ctypes
import os
import types
from collections.abc import Callable

import numba

_OPTIONS = {"cache": True, "nogil": True, "error_model": "numpy"}


def _options(reassociate: bool, fuse_multiply_add: bool) -> dict:
    flags = {"reassoc"} if reassociate else set()
    flags |= {"contract"} if fuse_multiply_add else set()
    return _OPTIONS | ({"fastmath": flags} if flags else {})


def kernel(function: Callable | None = None, *, reassociate: bool = False,
           fuse_multiply_add: bool = False):
    """Compile ``function`` serially with the house options (usable bare or with options)."""
    options = _options(reassociate, fuse_multiply_add)
    if function is None:
        return lambda f: numba.njit(**options)(f)
    return numba.njit(**options)(function)


def twins(function: Callable, *, reassociate: bool = False,
          fuse_multiply_add: bool = False) -> tuple[Callable, Callable]:
    """Return ``(serial, parallel)`` compilations of ``function``.

    In the serial twin ``numba.prange`` behaves as ``range``. The parallel twin
    compiles a copy of ``function`` named ``<name>_parallel``: Numba's on-disk
    cache is keyed by the function's name, line and bytecode, not by
    ``parallel=True``, so two twins of one function would share one cache entry
    and both run whichever was compiled first.
    """
    options = _options(reassociate, fuse_multiply_add)
    serial = numba.njit(**options)(function)
    copy = types.FunctionType(function.__code__, function.__globals__,
                              f"{function.__name__}_parallel", function.__defaults__,
                              function.__closure__)
    copy.__qualname__ = f"{function.__qualname__}_parallel"
    copy.__module__ = function.__module__
    copy.__doc__ = function.__doc__
    parallel = numba.njit(parallel=True, **options)(copy)
    return serial, parallel


_OPENMP_RUNTIMES = ("libgomp.so.1", "libiomp5.so", "libomp.so", "libomp.dylib")
_omp_max_threads = None


def available_threads() -> int:
    """How many threads a parallel twin may use now.

    ``numba.get_num_threads()`` (``NUMBA_NUM_THREADS``, ``numba.set_num_threads``),
    lowered to the OpenMP runtime's ``omp_get_max_threads()`` when one is loaded:
    Numba's OpenMP layer does not read that limit, which is the one
    ``threadpoolctl.threadpool_limits`` sets.
    """
    threads = numba.get_num_threads()
    if threads > 1:
        limit = _openmp_limit()
        if limit is not None:
            threads = max(1, min(threads, limit))
    return threads


def _openmp_limit() -> int | None:
    global _omp_max_threads
    if _omp_max_threads is None:
        for name in _OPENMP_RUNTIMES:  # only a runtime already loaded: never load one
            try:
                library = ctypes.CDLL(name, mode=getattr(os, "RTLD_NOLOAD", 0) | ctypes.RTLD_LOCAL)
            except OSError:
                continue
            _omp_max_threads = library.omp_get_max_threads
            _omp_max_threads.restype = ctypes.c_int
            break
        else:
            return None
    return int(_omp_max_threads())
