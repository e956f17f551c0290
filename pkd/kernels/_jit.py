"""The one decorator every kernel goes through.

``kernel`` compiles a function lazily (so ``import pkd`` stays fast) with the
house settings: on-disk cache, no ``fastmath`` (NaN/Inf semantics are kept),
``nogil`` so callers may run kernels from threads. ``float32`` and ``float64``
specialisations are built on first use and cached. Kernels keep the input's
dtype: scalars that meet array elements are passed in already cast by the
Python layer, and accumulators are explicitly float64.

``twins`` builds a serial and a ``parallel=True`` version of the same source;
the Python layer picks one at run time (see each kernel module for the
measured threshold).
"""

from __future__ import annotations

from collections.abc import Callable

import numba

_OPTIONS = {"cache": True, "nogil": True, "error_model": "numpy"}


def kernel(function: Callable) -> Callable:
    """Compile ``function`` serially with the house options."""
    return numba.njit(**_OPTIONS)(function)


def twins(function: Callable) -> tuple[Callable, Callable]:
    """Return ``(serial, parallel)`` compilations of ``function``.

    In the serial twin ``numba.prange`` behaves as ``range``.
    """
    serial = numba.njit(**_OPTIONS)(function)
    parallel = numba.njit(parallel=True, **_OPTIONS)(function)
    return serial, parallel
