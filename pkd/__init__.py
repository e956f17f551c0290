"""pkd: Patient Knowledge Distillation on the CPU.

Fused Numba kernels for the projected MSE (and PKD's normalized variant) with
hand-written gradients, the seed's ``ProgressiveDistillation`` configuration,
and the analysis needed to choose a layer mapping. See README.md.
"""

from . import mapping
from .distillation import (
    HiddenLossResult,
    ProgressiveDistillation,
    SkippedPairWarning,
    xavier_uniform,
)
from .loss import projected_mse, projected_mse_grad
from .spectrum import Spectrum, spectrum, xavier_mp_edges

__version__ = "0.1.0"

__all__ = [
    "HiddenLossResult",
    "Spectrum",
    "mapping",
    "spectrum",
    "xavier_mp_edges",
    "ProgressiveDistillation",
    "SkippedPairWarning",
    "projected_mse",
    "projected_mse_grad",
    "xavier_uniform",
]
