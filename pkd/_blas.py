"""Products from scipy's BLAS that release the GIL, for pkd's own threads.

``scipy.linalg.blas`` holds the GIL for the whole of each call, so two Python
threads calling it run one after the other; ``scipy.linalg.cython_blas``
exports the same routines as C function pointers, and ctypes releases the GIL
while it calls one. NumPy's ``@`` releases it too, but has no triangular
product and no ``C += AᵀB`` in place.

Every array is column-major (Fortran) with unit element stride; its leading
dimension is its column stride, so column slices of a Fortran array are
accepted as they are (no copy).
"""

from __future__ import annotations

import ctypes
from functools import cache

import numpy as np

# Each routine's arguments, in the reference BLAS's order: c a character, i a pointer to an
# (LP64) int, r a pointer to a double. Pointers are passed as addresses (``c_void_p``):
# ctypes converts an int faster than ``data_as`` builds a typed pointer.
_SIGNATURES = {"dtrmm": "cccciirriri", "dgemm": "cciiirririrri", "dsyrk": "cciirrirri"}
_ARGTYPES = {"c": ctypes.c_char_p, "i": ctypes.c_void_p, "r": ctypes.c_void_p}
_C_TYPES = {"c": "char *", "i": "int *", "r": "double *"}


@cache
def _routine(name: str):
    """``name`` of scipy's BLAS as a ctypes function (GIL released during the call)."""
    from scipy.linalg import cython_blas

    capsule = cython_blas.__pyx_capi__[name]
    # Prototypes of our own: setting restype on ctypes.pythonapi's shared functions would
    # change them for every other user in the process.
    capsule_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(
        ("PyCapsule_GetName", ctypes.pythonapi))
    pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
        ("PyCapsule_GetPointer", ctypes.pythonapi))
    signature = capsule_name(capsule)
    _check_signature(name, signature.decode())
    prototype = ctypes.CFUNCTYPE(None, *(_ARGTYPES[k] for k in _SIGNATURES[name]))
    return prototype(pointer(capsule, signature))


def _check_signature(name: str, signature: str) -> None:
    """Refuse a routine whose C signature (the capsule's name) is not the one pkd declares.

    A scipy built against an ILP64 BLAS would take 64-bit integers: called with
    ``int`` it would read garbage dimensions.
    """
    expected = [_C_TYPES[k] for k in _SIGNATURES[name]]
    found = [("double *" if argument.strip().endswith("_d *") else argument.strip())
             for argument in signature.removeprefix("void (").removesuffix(")").split(",")]
    if found != expected:
        raise RuntimeError(
            f"scipy.linalg.cython_blas.{name} has the C signature {signature!r}, not the "
            f"LP64 one pkd calls ({', '.join(expected)}); pkd needs a scipy built with a "
            "32-bit-integer BLAS (the PyPI wheels are)")


def _leading_dimension(array: np.ndarray, name: str, caller: str) -> int:
    """The column stride of a column-major float64 matrix, in elements (a dimension of
    length 1 may have any stride: NumPy does not fix it)."""
    if array.dtype == np.float64 and array.ndim == 2:
        (rows, columns), (row_stride, column_stride) = array.shape, array.strides
        leading = column_stride // 8 if columns > 1 else max(rows, 1)
        if array.size == 0:
            return max(rows, 1)
        if ((rows <= 1 or row_stride == 8) and leading >= max(rows, 1)
                and (columns <= 1 or column_stride % 8 == 0)):
            return leading
    raise ValueError(f"{caller}: {name} must be a 2-D float64 array in column-major order "
                     f"(Fortran, or its column slice), got {array.dtype} {array.shape} "
                     f"with strides {array.strides}")


def _int(value: int):
    return ctypes.byref(ctypes.c_int(value))


def _real(value: float):
    return ctypes.byref(ctypes.c_double(value))


def _data(array: np.ndarray) -> int:
    return array.ctypes.data


def trmm_right(b: np.ndarray, a: np.ndarray, *, upper: bool, transpose: bool) -> np.ndarray:
    """``b ← b · op(a)`` in place, ``op(a)`` = ``aᵀ`` if ``transpose`` else ``a``; returns ``b``.

    Parameters
    ----------
    b : (m, n) float64 array, column-major
        Overwritten by the product.
    a : (n, n) float64 array, column-major
        Triangular: only its upper (``upper``) or lower triangle is read.
    upper, transpose : bool
    """
    ldb, lda = (_leading_dimension(x, name, "trmm_right") for x, name in ((b, "b"), (a, "a")))
    m, n = b.shape
    if a.shape != (n, n):
        raise ValueError(f"trmm_right: a must be ({n}, {n}) for b of shape {b.shape}, "
                         f"got {a.shape}")
    if m and n:
        _routine("dtrmm")(b"R", b"U" if upper else b"L", b"T" if transpose else b"N", b"N",
                          _int(m), _int(n), _real(1.0), _data(a), _int(lda), _data(b), _int(ldb))
    return b


def gemm_tn(a: np.ndarray, b: np.ndarray, c: np.ndarray, beta: float) -> np.ndarray:
    """``c ← beta · c + aᵀ b`` in place (``dgemm``); returns ``c``.

    Parameters
    ----------
    a : (k, m) float64 array, column-major
    b : (k, n) float64 array, column-major
    c : (m, n) float64 array, column-major
        Read only when ``beta`` is not 0.
    beta : float
    """
    lda, ldb, ldc = (_leading_dimension(x, name, "gemm_tn")
                     for x, name in ((a, "a"), (b, "b"), (c, "c")))
    (k, m), n = a.shape, b.shape[1]
    if b.shape[0] != k or c.shape != (m, n):
        raise ValueError(f"gemm_tn: shapes a {a.shape}, b {b.shape}, c {c.shape} do not give "
                         "c = aᵀ b")
    if m and n:
        _routine("dgemm")(b"T", b"N", _int(m), _int(n), _int(k), _real(1.0), _data(a),
                          _int(lda), _data(b), _int(ldb), _real(beta), _data(c), _int(ldc))
    return c


def syrk_t(a: np.ndarray, c: np.ndarray, beta: float) -> np.ndarray:
    """``c ← beta · c + aᵀ a`` in place, upper triangle only (``dsyrk``); returns ``c``.

    Parameters
    ----------
    a : (k, n) float64 array, column-major
    c : (n, n) float64 array, column-major
        Its strict lower triangle is neither read nor written.
    beta : float
    """
    lda, ldc = (_leading_dimension(x, name, "syrk_t") for x, name in ((a, "a"), (c, "c")))
    k, n = a.shape
    if c.shape != (n, n):
        raise ValueError(f"syrk_t: c must be ({n}, {n}) for a of shape {a.shape}, got "
                         f"{c.shape}")
    if n:
        _routine("dsyrk")(b"U", b"T", _int(n), _int(k), _real(1.0), _data(a), _int(lda),
                          _real(beta), _data(c), _int(ldc))
    return c
