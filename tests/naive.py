"""Slow, obviously-correct twins of pkd's Numba kernels (explicit Python loops).

Each kernel in ``pkd/kernels`` has a twin here that the tests compare against.
"""

import numpy as np
