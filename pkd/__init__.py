"""pkd: Patient Knowledge Distillation on the CPU.

Fused Numba kernels for the projected MSE (and PKD's normalized variant) with
hand-written gradients, the reference implementation's ``ProgressiveDistillation``
configuration, and the analysis needed to choose a layer mapping. See README.md.
"""

from . import mapping
from .alignment import AlignmentStats, solve_projection
from .distillation import (
    HiddenLossResult,
    ProgressiveDistillation,
    SkippedPairWarning,
    xavier_uniform,
)
from .fit import FitResult, fit_projection
from .loss import projected_mse, projected_mse_grad
from .objective import PKDObjective, PKDResult, logit_loss_and_grad
from .spectrum import Spectrum, spectrum, xavier_mp_edges

__version__ = "0.1.0"

__all__ = [
    "AlignmentStats",
    "FitResult",
    "HiddenLossResult",
    "PKDObjective",
    "PKDResult",
    "fit_projection",
    "logit_loss_and_grad",
    "Spectrum",
    "mapping",
    "spectrum",
    "xavier_mp_edges",
    "ProgressiveDistillation",
    "SkippedPairWarning",
    "projected_mse",
    "projected_mse_grad",
    "solve_projection",
    "xavier_uniform",
]
