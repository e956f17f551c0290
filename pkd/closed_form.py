"""The closed-form projection ``P`` of ``min_P Σ_i w_i ‖Pᵀ s_i − t_i‖²`` from Gram statistics.

Everything here works from ``G = Sᵀ W S`` and ``C = Sᵀ W T`` alone (no rows),
so that one pass over the hidden states serves every layer pair and every
fold; :class:`pkd.alignment.AlignmentStats` is the main caller.

The cut (``ridge = 0``)
-----------------------
Hidden states are rank-deficient (LayerNorm outputs lie in a hyperplane) and
often carry numerically dead dimensions (LayerNorm gains ≈ 0 give columns of
1e-30). An exact minimum-norm solve would spend weights of 1e7–1e31 on the
rounding of the stored values and report a loss no student can reach. So a
direction of ``S`` is kept only where the data's precision supports it:

1. **Relative to the data as stored.** A direction whose singular value is at
   most ``cutoff · σ₁`` is noise, as in ``numpy.linalg.lstsq(S, T,
   rcond=cutoff)``; so is a column whose norm is at most ``cutoff · σ₁`` (a
   dead column: its rows of ``P`` are 0). The default cutoff is a few units in
   the last place of the data's dtype: ``1e-6`` for float32 hidden states
   (about 8·eps32; hidden states computed in float32 carry absolute rounding
   at that level of the layer's scale), ``2e-15`` for float64 (the same 8·eps64).
2. **The Gram statistics' own resolution.** A combination of columns that
   cancels to within ``1e-6`` of the columns' own sizes (eigenvalue below
   ``1e-12·λ̃_max`` of the Jacobi-scaled ``G̃ = D G D``, ``D = diag(G)^(-1/2)``)
   cannot be told from the rounding of float64 sums (nor, for float32 data,
   from the rounding of the stored values): it is cut whatever the dtype.

Badly scaled but genuine columns (1e-3 next to 1e3) are kept as far as rule 1
allows: the eigendecomposition is done on the Jacobi-scaled ``G̃`` so that
their directions are resolved to full accuracy, and the cut of rule 1 is then
applied exactly, in the unscaled metric, by a small generalized
eigenproblem on the kept subspace (see ``docs/numerics.md``). The result is
the truncated-SVD (minimum-norm) solution on the kept directions: its loss is
reachable in the data's own dtype, and its norm is that of ``lstsq(rcond=
cutoff)``. When a Cholesky factor of ``G̃`` proves that neither rule can cut
anything (the common full-rank case), that factor is the basis, in less than half
the time (``docs/numerics.md``, "The shortcut when nothing can be cut").

With ``ridge = ρ > 0`` the projection is ``(G + ρI)⁻¹ C`` exactly (no cut).
"""

from __future__ import annotations

import numpy as np

from ._validation import check_float_array, check_nonnegative

__all__ = ["Solver", "default_cutoff", "solve_projection"]

DEFAULT_CUTOFFS = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 2e-15}
"""Default relative singular-value cutoff per hidden-state dtype (see the module docstring)."""

# Rule 2: eigenvalues of the Jacobi-scaled Gram below this fraction of the largest are not
# resolved by float64 sums of products (a cancellation to 1e-6 of the columns' sizes).
SCALED_RESOLUTION = 1e-12
# The Cholesky shortcut needs its bounds to clear both cuts by this factor (rounding).
CERTAINTY = 4.0


def default_cutoff(dtype) -> float:
    """The default ``cutoff`` for hidden states of ``dtype`` (float32 or float64)."""
    dtype = np.dtype(dtype)
    if dtype not in DEFAULT_CUTOFFS:
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    return DEFAULT_CUTOFFS[dtype]


def check_cutoff(cutoff) -> float:
    """A relative singular-value cutoff in [0, 1)."""
    cutoff = check_nonnegative(cutoff, "cutoff")
    if cutoff >= 1.0:
        raise ValueError(
            f"cutoff must be < 1 (a fraction of the largest singular value, like lstsq's "
            f"rcond), got {cutoff}"
        )
    return cutoff


class Solver:
    """The closed form for one student layer, shared by all teacher layers (and folds).

    ``P = basis @ ((basisᵀ C) * inverse[:, None])``; the reduction of the
    squared residual of teacher column ``j`` is ``Σ_k gain_k (basisᵀ C)_kj²``.
    For ``ridge = 0`` the basis is G-orthonormal (``basisᵀ G basis = I``), so
    ``inverse`` and ``gain`` are ones, and it spans the kept right singular
    directions of ``S`` (so ``P`` is the minimum-norm solution on them). Any
    rotation of a G-orthonormal basis is one too: it is rotated to be lower
    trapezoidal, ``basis = upper[:rank].T`` with ``upper`` a (d, d) upper-triangular
    matrix, so that ``basisᵀ C`` for every teacher column is one triangular
    product (``dtrmm``), half the flops of a GEMM (``upper`` is None for ``ridge > 0``).

    Parameters
    ----------
    gram : (d, d) float64 array
        ``G = Sᵀ W S``, symmetric positive semi-definite.
    ridge : float
        ρ ≥ 0.
    cutoff : float
        Relative singular-value cutoff for ``ridge = 0``.
    """

    def __init__(self, gram: np.ndarray, ridge: float, cutoff: float):
        from ._threads import single_threaded_blas

        # One BLAS thread for these d × d decompositions: LAPACK's threaded eigh was several
        # times slower than one thread whenever the cores were busy (docs/performance.md).
        with single_threaded_blas:
            self._decompose(gram, ridge, cutoff)

    def _decompose(self, gram: np.ndarray, ridge: float, cutoff: float) -> None:
        import scipy.linalg

        if ridge > 0:
            eigenvalues, vectors = np.linalg.eigh(gram)  # NumPy's releases the GIL
            eigenvalues = np.maximum(eigenvalues, 0.0)  # -tiny from rounding: G is PSD
            self.basis, self.upper = vectors, None
            self.inverse = 1.0 / (eigenvalues + ridge)
            # Unpenalised MSE of (G+ρI)⁻¹C: q − Σ_k z_k² (λ_k + 2ρ)/(λ_k + ρ)².
            self.gain = (eigenvalues + 2.0 * ridge) * self.inverse**2
            return
        top = _largest_eigenvalue(gram)  # σ₁², which both cuts compare with
        upper = _certain_full_rank_factor(gram, cutoff, top)
        if upper is not None:  # nothing can be cut: the Cholesky factor is the basis
            self.upper, self.basis = upper, upper.T
            self.inverse = self.gain = np.ones(gram.shape[0])
            return
        basis = self._truncated_basis(gram, cutoff, top, scipy.linalg)
        rank, d = basis.shape[1], basis.shape[0]
        self.inverse = self.gain = np.ones(rank)
        # Rotate to the lower-trapezoidal basis Rᵀ, from Bᵀ = Q R (Householder, column-wise
        # backward stable: each feature's products keep the accuracy of Bᵀ C's).
        self.upper = np.zeros((d, d), order="F")
        if rank:
            self.upper[:rank] = scipy.linalg.qr(basis.T, mode="r", check_finite=False)[0]
        self.basis = self.upper[:rank].T

    @staticmethod
    def _truncated_basis(gram: np.ndarray, cutoff: float, top: float, linalg) -> np.ndarray:
        d = gram.shape[0]
        empty = np.zeros((d, 0))
        if not top > 0:  # an all-zero layer explains nothing
            return empty
        diagonal = np.diag(gram)
        # Rule 1 for single columns: ‖S e_j‖ ≤ cutoff·σ₁ is a dead column.
        live = np.flatnonzero(diagonal > cutoff**2 * top)
        if live.size == 0:  # a large explicit cutoff can leave no column
            return empty
        scale = 1.0 / np.sqrt(diagonal[live])
        scaled = gram[np.ix_(live, live)] * scale[:, None] * scale[None, :]
        eigenvalues, vectors = np.linalg.eigh(scaled)  # NumPy's releases the GIL
        keep = eigenvalues > SCALED_RESOLUTION * eigenvalues[-1]  # rule 2
        # Unscaled coordinates: G-orthonormal directions, and an orthonormal basis of the
        # directions cut by rule 2, which the minimum-norm solution must be orthogonal to.
        basis = scale[:, None] * (vectors[:, keep] / np.sqrt(eigenvalues[keep]))
        out = np.zeros((d, int(keep.sum())))
        # ‖S v‖ ≥ √λ̃_min · min_j ‖S e_j‖ · ‖v‖: when that clears the cut and rule 2 cut
        # nothing, every direction is kept and the basis is already the answer.
        if keep.all() and eigenvalues[0] * diagonal[live].min() > cutoff**2 * top:
            out[live] = basis
            return out
        if not keep.all():
            null = np.linalg.qr(scale[:, None] * vectors[:, ~keep])[0]
            basis -= null @ (null.T @ basis)
        # Rule 1 exactly: on span(basis), S's singular values are 1/√μ with
        # (basisᵀ basis) y = μ (basisᵀ G basis) y. The Gram of the basis is computed in
        # scaled coordinates (G̃ has a unit diagonal), where it keeps its digits.
        in_scaled = basis / scale[:, None]
        gram_basis = in_scaled.T @ scaled @ in_scaled
        mu, y = linalg.eigh(basis.T @ basis, gram_basis, driver="gvd")
        kept = mu * (cutoff**2 * top) < 1.0
        out = np.zeros((d, int(kept.sum())))
        out[live] = basis @ y[:, kept]
        return out

    @property
    def rank(self) -> int:
        """Number of directions kept."""
        return self.basis.shape[1]

    def solve(self, cross: np.ndarray) -> np.ndarray:
        """``P`` (d_s, d_t) for ``C`` (d_s, d_t)."""
        z = self.basis.T @ cross
        return self.basis @ (z * self.inverse[:, None])


def _certain_full_rank_factor(gram: np.ndarray, cutoff: float,
                              top: float) -> np.ndarray | None:
    """Upper-triangular ``U`` (d, d), Fortran, with ``Uᵀ U = G⁻¹``, when neither rule can cut
    a direction of ``G``; None when that is not certain (then the eigendecomposition decides).
    ``top`` is :func:`_largest_eigenvalue` of ``G``.

    With ``G̃ = D G D = Ũ Ũᵀ`` (``D = diag(G)^(-1/2)``; Cholesky in reversed order, so
    that ``Ũ`` is upper triangular), ``U = Ũ⁻¹ D``. ``1/‖Ũ⁻¹‖_F² ≤ λ̃_min`` and
    ``λ̃_max ≤ d`` bound the eigenvalues the two rules test, with a margin of
    ``CERTAINTY`` for rounding. A fraction of the eigendecomposition's and QR's flops.
    """
    from scipy.linalg import lapack

    diagonal = np.diag(gram)
    if not diagonal.min() > 0:
        return None
    scale = 1.0 / np.sqrt(diagonal)
    scaled = gram * scale[:, None] * scale[None, :]
    try:
        lower = np.linalg.cholesky(scaled[::-1, ::-1])  # NumPy's releases the GIL
    except np.linalg.LinAlgError:
        return None
    inverse, info = lapack.dtrtri(lower, lower=1)
    if info != 0:
        return None
    smallest = 1.0 / float(np.sum(np.tril(inverse) ** 2))  # a lower bound of λ̃_min
    d = gram.shape[0]
    if not (smallest > CERTAINTY * SCALED_RESOLUTION * d  # rule 2
            and smallest * diagonal.min() > CERTAINTY * cutoff**2 * top):
        return None  # rule 1 ^
    return np.asfortranarray(np.triu(inverse[::-1, ::-1]) * scale[None, :])


def _largest_eigenvalue(gram: np.ndarray, steps: int = 40) -> float:
    """``λ_max(G) = σ₁²`` by power iteration: the cut needs it to ~1%, not to the last digit.

    Starts from the column of the largest diagonal entry; the Rayleigh quotient
    never exceeds ``λ_max`` and is at least that diagonal entry.
    """
    diagonal = np.diag(gram)
    if not diagonal.max() > 0:
        return 0.0
    x = gram[:, int(np.argmax(diagonal))].copy()
    for _ in range(steps):
        norm = np.linalg.norm(x)
        if not norm > 0:
            break
        x = gram @ (x / norm)
    x /= np.linalg.norm(x)
    return max(float(x @ gram @ x), float(diagonal.max()))


def check_gram(gram: np.ndarray, tolerance: float) -> None:
    """A Gram matrix ``Sᵀ W S`` is symmetric with a non-negative diagonal.

    The solver reads one triangle only, so a non-symmetric ``gram`` would be
    used silently; summed Gram matrices are symmetric up to rounding.
    """
    scale = float(np.abs(gram).max())
    asymmetry = float(np.abs(gram - gram.T).max())
    if asymmetry > tolerance * scale:
        raise ValueError(
            f"gram (shape {gram.shape}) is not symmetric (max |G − Gᵀ| = {asymmetry:.3g}, "
            f"max |G| = {scale:.3g}): pass a Gram matrix Sᵀ W S, or a sum of them"
        )
    if np.diag(gram).min() < 0:
        raise ValueError(
            f"gram (shape {gram.shape}) has a negative diagonal entry "
            f"({np.diag(gram).min():.3g}): a Gram matrix Sᵀ W S is positive semi-definite"
        )


def solve_projection(gram, cross, ridge: float = 0.0, *, cutoff: float | None = None,
                     dtype=None) -> np.ndarray:
    """The closed form ``P`` of ``(G + ρI) P = C`` from Gram statistics.

    ``ridge = 0``: the minimum-norm least-squares solution on the directions
    the data's precision supports (the module docstring: singular values above
    ``cutoff · σ₁``, as ``numpy.linalg.lstsq(S, T, rcond=cutoff)``);
    ``ridge > 0``: exactly ``(G + ρI)⁻¹ C``. A shared projection over several
    pairs solves the summed equations: pass ``Σ_k G_k`` and ``Σ_k C_k``.

    Parameters
    ----------
    gram : (d_s, d_s) array of float32/float64
        G = Sᵀ W S (symmetric positive semi-definite). Accumulate it in
        float64 (as :class:`~pkd.alignment.AlignmentStats` does) for
        rank-deficient data: the rounding of a float32 G (~1e-7·λ_max) would
        be taken for signal.
    cross : (d_s, d_t) array of float32/float64
        C = Sᵀ W T.
    ridge : float
        ρ >= 0.
    cutoff : float, optional
        Relative singular-value cutoff for ``ridge = 0``, in [0, 1). Default:
        :func:`default_cutoff` of ``dtype``.
    dtype : float32 or float64, optional
        The dtype of the hidden states the statistics come from. Default: the
        dtype of ``gram`` if it is float32, else float32 too (the coarser
        rule, safe for float32 students) unless given.

    Returns
    -------
    (d_s, d_t) float64 array

    Raises
    ------
    TypeError
        ``gram`` or ``cross`` is not a float array; ``dtype`` is not float32/float64.
    ValueError
        Empty, mismatched or non-finite arrays; a ``gram`` that is not
        symmetric (beyond the rounding of its dtype) or has a negative
        diagonal; a ``cutoff`` outside [0, 1).
    """
    ridge = check_nonnegative(ridge, "ridge")
    gram = check_float_array(gram, "gram", ndims=(2,))
    cross = check_float_array(cross, "cross", ndims=(2,)).astype(np.float64, copy=False)
    cutoff = default_cutoff(np.float32 if dtype is None else dtype) if cutoff is None \
        else check_cutoff(cutoff)
    if gram.shape[0] != gram.shape[1] or cross.shape[0] != gram.shape[0]:
        raise ValueError(
            f"gram must be (d_s, d_s) and cross (d_s, d_t); got {gram.shape} and {cross.shape}"
        )
    tolerance = 1e4 * np.finfo(gram.dtype).eps  # rounding of a GEMM in the input's precision
    gram = gram.astype(np.float64, copy=False)
    check_gram(gram, tolerance)
    return Solver(gram, ridge, cutoff).solve(cross)
