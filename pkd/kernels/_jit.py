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

``reassociate=True`` turns on LLVM's ``reassoc`` flag, and only that one: it
lets the float64 sums of a row (Σ r², norms, dot products) be split into SIMD
lanes. Without it LLVM must add one element at a time, and the fused pass of
the MSE ran 4–6× slower than a memory copy (0.8 ns/element against 0.13–0.2 ns
with the flag, measured on the 2-core Zen 3 VM). ``reassoc`` keeps
NaN/Inf semantics (that would be ``nnan``/``ninf``, never used here) and the
lane order is fixed in the compiled code, so results are identical from call
to call and independent of the thread count; only machines with another SIMD
width may differ in the last bits of a sum.
"""

from __future__ import annotations

from collections.abc import Callable

import numba

_OPTIONS = {"cache": True, "nogil": True, "error_model": "numpy"}


def _options(reassociate: bool) -> dict:
    return _OPTIONS | ({"fastmath": {"reassoc"}} if reassociate else {})


def kernel(function: Callable | None = None, *, reassociate: bool = False):
    """Compile ``function`` serially with the house options (usable bare or with options)."""
    if function is None:
        return lambda f: numba.njit(**_options(reassociate))(f)
    return numba.njit(**_options(reassociate))(function)


def twins(function: Callable, *, reassociate: bool = False) -> tuple[Callable, Callable]:
    """Return ``(serial, parallel)`` compilations of ``function``.

    In the serial twin ``numba.prange`` behaves as ``range``.
    """
    serial = numba.njit(**_options(reassociate))(function)
    parallel = numba.njit(parallel=True, **_options(reassociate))(function)
    return serial, parallel
