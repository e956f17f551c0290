"""Plain float64 NumPy versions of every formula in DESIGN.md §1, written for reading.

Nothing here is fast or clever: each function is the formula, line by line,
so that the tests have an independent witness for the kernels.
"""

import numpy as np

EPS = 1e-12
