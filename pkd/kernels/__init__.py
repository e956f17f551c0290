"""Private Numba kernels, one module per family.

Kernels trust their inputs: every check happens in :mod:`pkd._validation`
before a kernel is called (Numba has no bounds checks).
"""
