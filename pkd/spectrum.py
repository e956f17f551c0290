"""Spectra of projection matrices (docs/math.md, "Projection spectra").

For a projection ``P`` (d_s × d_t) with singular values σ₁ ≥ ... ≥ σ_min:

- effective rank ``exp(H(p))``, ``p = σ / Σσ``, ``H`` the Shannon entropy
  (natural log; zero σ contribute 0);
- stable rank ``‖P‖_F² / σ₁²``;
- condition ``σ₁ / σ_min`` (``inf`` if σ_min = 0);
- the Marchenko–Pastur bulk edges of a Xavier-uniform init of the same shape,
  ``s·(√M − √m)`` and ``s·(√M + √m)`` with ``s² = 2 / (d_s + d_t)``,
  ``m = min(d_s, d_t)``, ``M = max(d_s, d_t)``: singular values outside the
  bulk are structure that training put there (or removed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ._validation import check_float_array, check_positive_int


@dataclass(frozen=True, eq=False)
class Spectrum:
    """Singular-value summary of one projection matrix.

    Attributes
    ----------
    shape : (int, int)
        ``(d_s, d_t)`` of the matrix.
    singular_values : ndarray, shape (min(d_s, d_t),)
        float64, descending, read-only.
    effective_rank : float
        ``exp(H(σ/Σσ))``, between 1 and min(d_s, d_t) (0 for the zero matrix).
    stable_rank : float
        ``‖P‖_F² / σ₁²``, between 1 and min(d_s, d_t) (0 for the zero matrix).
    condition : float
        ``σ₁ / σ_min``; ``inf`` when σ_min = 0.
    mp_edges : (float, float)
        Marchenko–Pastur bulk edges of a Xavier-uniform init of this shape.
    """

    shape: tuple[int, int]
    singular_values: np.ndarray
    effective_rank: float
    stable_rank: float
    condition: float
    mp_edges: tuple[float, float]

    @property
    def n_above_bulk(self) -> int:
        """Number of singular values above the upper Xavier Marchenko–Pastur edge."""
        return int(np.count_nonzero(self.singular_values > self.mp_edges[1]))

    def summary(self) -> str:
        """One line: shape, extreme σ, the three ranks/conditions and the MP bulk."""
        sv = self.singular_values
        lo, hi = self.mp_edges
        return (
            f"{self.shape[0]}x{self.shape[1]}: sigma in [{sv[-1]:.4g}, {sv[0]:.4g}], "
            f"effective rank {self.effective_rank:.4g}, stable rank {self.stable_rank:.4g}, "
            f"condition {self.condition:.4g}; Xavier MP bulk [{lo:.4g}, {hi:.4g}], "
            f"{self.n_above_bulk} of {sv.size} sigma above it"
        )

    def __repr__(self) -> str:
        return f"Spectrum({self.summary()})"


def xavier_mp_edges(d_s: int, d_t: int) -> tuple[float, float]:
    """Marchenko–Pastur bulk edges of the singular values of a Xavier-uniform init.

    Entries ``U(−a, a)`` with ``a = sqrt(6/(d_s + d_t))`` have variance
    ``s² = 2/(d_s + d_t)``; for large matrices the singular values fill
    ``[s·(√M − √m), s·(√M + √m)]``, ``m = min(d_s, d_t)``, ``M = max(d_s, d_t)``
    (symmetric in ``d_s`` and ``d_t``).

    Parameters
    ----------
    d_s, d_t : int
        Shape of the projection.

    Returns
    -------
    (float, float)
        Lower and upper edge.
    """
    d_s = check_positive_int(d_s, "d_s")
    d_t = check_positive_int(d_t, "d_t")
    m, big = min(d_s, d_t), max(d_s, d_t)
    s = math.sqrt(2.0 / (d_s + d_t))
    return (s * (math.sqrt(big) - math.sqrt(m)), s * (math.sqrt(big) + math.sqrt(m)))


def spectrum(P) -> Spectrum:
    """Singular values, effective rank, stable rank, condition and Xavier MP edges of ``P``.

    Parameters
    ----------
    P : array_like, shape (d_s, d_t)
        float32 or float64, finite, non-empty. Computed in float64.

    Returns
    -------
    Spectrum
    """
    import scipy.linalg  # on use: `import pkd` imports neither scipy nor numba

    P = check_float_array(P, "P", ndims=(2,), advice="a projection with NaN/Inf has no spectrum")
    P64 = P.astype(np.float64)
    sv = scipy.linalg.svdvals(P64, check_finite=False)  # descending
    sv.setflags(write=False)
    sigma_max, sigma_min = float(sv[0]), float(sv[-1])

    total = float(sv.sum())
    if total > 0:
        p = sv[sv > 0] / total
        effective_rank = math.exp(float(-(p * np.log(p)).sum()))
        stable_rank = float(np.sum((sv / sigma_max) ** 2))  # no overflow or underflow
    else:
        # The zero matrix: rank 0, and both ratios are 0/0; report its rank.
        effective_rank = stable_rank = 0.0
    condition = math.inf if sigma_min == 0 else sigma_max / sigma_min
    return Spectrum(
        shape=(int(P.shape[0]), int(P.shape[1])),
        singular_values=sv,
        effective_rank=effective_rank,
        stable_rank=stable_rank,
        condition=condition,
        mp_edges=xavier_mp_edges(*P.shape),
    )
