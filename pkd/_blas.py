"""A triangular product from scipy's BLAS that releases the GIL, for pkd's own threads.

``scipy.linalg.blas`` holds the GIL for the whole of each call, so two Python
threads calling it run one after the other; ``scipy.linalg.cython_blas``
exports the same routines as C function pointers, and ctypes releases the GIL
while it calls one. NumPy's ``@`` releases it too, but has no triangular product.
"""

from __future__ import annotations

import ctypes
from functools import cache

import numpy as np


@cache
def _dtrmm():
    """``dtrmm`` of scipy's BLAS as a ctypes function (GIL released during the call)."""
    from scipy.linalg import cython_blas

    capsule = cython_blas.__pyx_capi__["dtrmm"]
    # Prototypes of our own: setting restype on ctypes.pythonapi's shared functions would
    # change them for every other user in the process.
    name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(
        ("PyCapsule_GetName", ctypes.pythonapi))
    pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
        ("PyCapsule_GetPointer", ctypes.pythonapi))
    integer, real = ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_double)
    char = ctypes.c_char_p
    prototype = ctypes.CFUNCTYPE(None, char, char, char, char, integer, integer, real, real,
                                 integer, real, integer)
    return prototype(pointer(capsule, name(capsule)))


def trmm_right(b: np.ndarray, a: np.ndarray, *, upper: bool, transpose: bool) -> np.ndarray:
    """``b ← b · op(a)`` in place, ``op(a)`` = ``aᵀ`` if ``transpose`` else ``a``; returns ``b``.

    Parameters
    ----------
    b : (m, n) float64 array, Fortran-contiguous
        Overwritten by the product.
    a : (n, n) float64 array, Fortran-contiguous
        Triangular: only its upper (``upper``) or lower triangle is read.
    upper, transpose : bool
    """
    for name, array in (("b", b), ("a", a)):
        if array.dtype != np.float64 or array.ndim != 2 or not array.flags.f_contiguous:
            raise ValueError(f"trmm_right: {name} must be a Fortran-contiguous 2-D float64 "
                             f"array, got {array.dtype} {array.shape}")
    m, n = b.shape
    if a.shape != (n, n):
        raise ValueError(f"trmm_right: a must be ({n}, {n}) for b of shape {b.shape}, "
                         f"got {a.shape}")
    if m == 0 or n == 0:
        return b

    def integer(value: int):
        return ctypes.byref(ctypes.c_int(value))

    real = ctypes.POINTER(ctypes.c_double)
    _dtrmm()(b"R", b"U" if upper else b"L", b"T" if transpose else b"N", b"N", integer(m),
             integer(n), ctypes.byref(ctypes.c_double(1.0)), a.ctypes.data_as(real),
             integer(n), b.ctypes.data_as(real), integer(m))
    return b
