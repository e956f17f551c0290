"""`import pkd` stays light: the heavy dependencies are imported where they are used."""

import subprocess
import sys


def test_import_pkd_imports_neither_numba_nor_scipy():
    # numba and scipy.linalg were 0.5 s of a 1.1 s import on the reference machine;
    # the kernels and the closed forms import them on first use.
    code = ("import sys, pkd; print(sorted({m.split('.')[0] for m in sys.modules} "
            "& {'numba', 'llvmlite', 'scipy', 'matplotlib', 'torch', 'dask'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_kernels_load_on_first_call():
    code = ("import sys, numpy as np, pkd; assert 'numba' not in sys.modules; "
            "pkd.projected_mse(np.ones((3, 2)), np.zeros((3, 2))); "
            "assert 'numba' in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "ok"
