"""Streaming alignment statistics between every student and every teacher layer.

:class:`AlignmentStats` reads the hidden states once, in chunks of rows, and
keeps in float64 the statistics of DESIGN §1 for every (student layer ``s``,
teacher layer ``t``) pair::

    G_s = Sᵀ W S   (d_s × d_s)   a_s = Sᵀ w     H_t = Tᵀ W T   (d_t × d_t)   b_t = Tᵀ w
    C_st = Sᵀ W T  (d_s × d_t)   q_t = Σ_i w_i ‖t_i‖² = tr(H_t)               n_w = Σ_i w_i

with ``w`` the 0/1 row weights of a mask. From them alone, with no second
pass over the rows: the minimum-MSE matrix (:meth:`AlignmentStats.min_mse`,
:meth:`AlignmentStats.relative_min_mse`), linear CKA
(:meth:`AlignmentStats.cka`), closed-form projections
(:meth:`AlignmentStats.projection`) and the exact loss of any projection
(:meth:`AlignmentStats.pair_loss`).

Statistics are additive: :meth:`AlignmentStats.merge` (or ``+``, or
``sum([...])``) combines partial statistics of disjoint row sets, which is
what parallel and distributed runs need; :meth:`AlignmentStats.to_dict` /
:meth:`AlignmentStats.from_dict` move them around as plain arrays.

Numerics
--------
*Shifted accumulation.* Hidden states can have means far larger than their
spread (every value ≈ 100, standard deviation 1e-3); the centred forms
``Ĝ = G − a aᵀ/n_w`` of CKA would then cancel catastrophically. Each layer's
rows are therefore accumulated as ``x − c``, with ``c`` the column mean of
the first chunk (rounded to the input's dtype, so that for float32 input the
difference is exact in float64). With ``x' = x − c``, ``a' = Σ w x'`` etc.,
the uncentred statistics are recovered exactly (in real arithmetic) by::

    G = G' + a' cᵀ + c a'ᵀ + n_w c cᵀ     a = a' + n_w c
    C = C' + a_s c_tᵀ + c_s b'ᵀ            q = q' + 2 c_t·b' + n_w ‖c_t‖²

and the centred ones by ``Ĝ = G' − a' a'ᵀ/n_w`` (centring is shift
invariant), with no cancellation when ``c`` is near the mean. Merging
statistics with different shifts moves both to their combined mean first
(Chan et al.'s pairwise update), so it is exact too.

*Closed form.* DESIGN's projection has no intercept: ``P`` maps ``S`` to
``T`` linearly, so the closed form uses the uncentred ``G``, ``C``, ``q``.
Hidden states are often exactly rank-deficient (LayerNorm outputs lie in a
hyperplane), so for ``ridge = 0`` the projection is the minimum-norm
least-squares solution, computed from a symmetric eigendecomposition of the
Jacobi-scaled Gram matrix ``G̃ = D G D``, ``D = diag(G)^(-1/2)``.
Eigenvalues ``λ̃ ≤ cutoff · λ̃_max`` (default ``cutoff = 1e-12``, float32
precision squared: singular values of the scaled data below ~1e-6·σ₁) are
treated as zero: such directions are rounding noise of float32 data, and
keeping them reports a lower "best" loss with projection weights of 1e7
(DESIGN §1). The scaling makes the cut relative to each column's own size,
so badly scaled but exact columns (1e-3 next to 1e3) are kept, as
``numpy.linalg.lstsq`` keeps them. The solution is finally projected onto
the row space of ``S`` (the orthogonal complement of the cut directions
``D Ũ_cut``), which makes it the minimum-norm one. The smallest MSE is then
``(q − Σ_k ‖z_k‖²/λ̃_k) / (n_w d_t)`` with ``z = Ũ_keptᵀ D C``, clipped at 0;
one eigendecomposition per student layer serves every teacher layer.
With ``ridge = ρ > 0`` the projection is ``(G + ρ I)⁻¹ C`` exactly (no
cutoff, no scaling) and ``min_mse`` is the plain (unpenalised) MSE it reaches.

Precision limit: without an intercept, layers whose mean dwarfs their spread
make ``S`` itself ill-conditioned; the closed form then resolves only the
directions above the cutoff. CKA and :meth:`AlignmentStats.pair_loss` work
in the shifted coordinates and keep full accuracy.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from ._validation import (
    as_layers,
    check_bool,
    check_finite_rows,
    check_float_array,
    check_layer_index,
    check_mask,
    check_nonnegative,
    check_paired,
    check_positive_int,
    check_projection,
)

__all__ = ["AlignmentStats", "DEFAULT_CUTOFF"]

DEFAULT_CUTOFF = 1e-12
"""Relative eigenvalue cutoff of the ``ridge = 0`` closed form (float32 precision squared)."""

# min_mse recomputes pairs whose best residual is below this fraction of q_t (the
# subtraction q_t − explained would keep fewer than ~10 of float64's 16 digits).
_NEAR_EXACT_FIT = 1e-6

DEFAULT_CHUNK_ROWS = 1024  # measured: 1.08× its GEMMs vs 1.15× at 4096, 1/4 the buffer
_FORMAT_VERSION = 1


def _symmetric(upper: np.ndarray) -> np.ndarray:
    """The full symmetric matrix whose upper triangle (diagonal included) is ``upper``'s."""
    return np.triu(upper) + np.triu(upper, 1).T


def _check_widths(widths, name: str) -> tuple[int, ...]:
    if isinstance(widths, (str, bytes)) or not isinstance(widths, (Sequence, np.ndarray)):
        raise TypeError(f"{name} must be a sequence of layer widths (ints), got {widths!r}")
    if len(widths) == 0:
        raise ValueError(f"{name} is empty: give one width per layer")
    return tuple(check_positive_int(w, f"{name}[{k}]") for k, w in enumerate(widths))


def _check_cutoff(cutoff) -> float:
    cutoff = check_nonnegative(cutoff, "cutoff")
    if cutoff >= 1.0:
        raise ValueError(
            f"cutoff must be < 1 (a fraction of the largest eigenvalue), got {cutoff}"
        )
    return cutoff


class _Solver:
    """The closed form for one student layer, shared by all teacher layers.

    ``P = basis @ ((basisᵀ C) * inverse[:, None])`` and the MSE reduction of
    teacher column j is ``Σ_k gain_k (basisᵀ C)_kj²``. ``null`` (or ``None``) spans the cut
    directions, projected out of ``P`` to make it the minimum-norm solution.
    """

    def __init__(self, gram: np.ndarray, ridge: float, cutoff: float):
        import scipy.linalg

        if ridge > 0:
            eigenvalues, vectors = scipy.linalg.eigh(gram, driver="evd")
            eigenvalues = np.maximum(eigenvalues, 0.0)  # -tiny from rounding: G is PSD
            self.basis = vectors
            self.inverse = 1.0 / (eigenvalues + ridge)
            # Unpenalised MSE of (G+ρI)⁻¹C: q − Σ_k z_k² (λ_k + 2ρ)/(λ_k + ρ)².
            self.gain = (eigenvalues + 2.0 * ridge) * self.inverse**2
            self.null = None
            return
        diagonal = np.diag(gram)
        scale = np.ones_like(diagonal)
        nonzero = diagonal > 0
        scale[nonzero] = 1.0 / np.sqrt(diagonal[nonzero])
        eigenvalues, vectors = scipy.linalg.eigh(gram * scale[:, None] * scale[None, :],
                                              driver="evd")
        # An all-zero layer (λ̃_max = 0) keeps nothing: it explains nothing.
        keep = eigenvalues > cutoff * max(eigenvalues[-1], 0.0)
        self.basis = scale[:, None] * vectors[:, keep]
        self.inverse = 1.0 / eigenvalues[keep]
        self.gain = self.inverse
        null = scale[:, None] * vectors[:, ~keep]
        self.null = np.linalg.qr(null)[0] if null.shape[1] else None

    def solve(self, cross: np.ndarray) -> np.ndarray:
        z = self.basis.T @ cross
        projection = self.basis @ (z * self.inverse[:, None])
        if self.null is not None:
            projection -= self.null @ (self.null.T @ projection)
        return projection


def solve_projection(gram, cross, ridge: float = 0.0, *,
                     cutoff: float = DEFAULT_CUTOFF) -> np.ndarray:
    """The closed form ``P`` of ``(G + ρI) P = C`` from Gram statistics.

    ``ridge = 0``: the minimum-norm least-squares solution, with the relative
    eigenvalue ``cutoff`` applied to the Jacobi-scaled G (see the module
    docstring); ``ridge > 0``: exactly ``(G + ρI)⁻¹ C``. A shared projection
    over several pairs solves the summed equations: pass ``Σ_k G_k`` and
    ``Σ_k C_k``.

    Parameters
    ----------
    gram : (d_s, d_s) array of float32/float64
        G = Sᵀ W S (symmetric positive semi-definite). Accumulate it in
        float64 (as :class:`AlignmentStats` does) for rank-deficient data: the
        rounding of a float32 G (~1e-7·λ_max) lies above the cutoff and would
        be taken for signal.
    cross : (d_s, d_t) array of float32/float64
        C = Sᵀ W T.
    ridge : float
        ρ >= 0.
    cutoff : float
        Relative eigenvalue cutoff for ``ridge = 0``.

    Returns
    -------
    (d_s, d_t) float64 array

    Raises
    ------
    TypeError
        ``gram`` or ``cross`` is not a float array.
    ValueError
        Empty, mismatched or non-finite arrays; a ``gram`` that is not
        symmetric (beyond the rounding of its dtype) or has a negative diagonal.
    """
    ridge = check_nonnegative(ridge, "ridge")
    cutoff = _check_cutoff(cutoff)
    gram = check_float_array(gram, "gram", ndims=(2,))
    cross = check_float_array(cross, "cross", ndims=(2,)).astype(np.float64, copy=False)
    if gram.shape[0] != gram.shape[1] or cross.shape[0] != gram.shape[0]:
        raise ValueError(
            f"gram must be (d_s, d_s) and cross (d_s, d_t); got {gram.shape} and {cross.shape}"
        )
    tolerance = 1e4 * np.finfo(gram.dtype).eps  # rounding of a GEMM in the input's precision
    gram = gram.astype(np.float64, copy=False)
    _check_gram(gram, tolerance)
    return _Solver(gram, ridge, cutoff).solve(cross)


def _check_gram(gram: np.ndarray, tolerance: float) -> None:
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


class AlignmentStats:
    """Float64 alignment statistics of every (student, teacher) layer pair, one pass.

    Parameters
    ----------
    student_widths, teacher_widths : sequence of int, optional
        Hidden widths ``d_s`` of the student layers and ``d_t`` of the teacher
        layers. Give both (statistics of zero rows, e.g. the start of a
        reduction) or neither (set by the first :meth:`update`).
    chunk_rows : int
        Rows per accumulation step. The float64 chunk buffer holds
        ``chunk_rows · (Σ d_s + Σ d_t)`` values; with the statistics
        themselves (``Σd_s·Σd_t + Σd_s² + Σd_t²`` values) this is the whole
        memory: it does not grow with the number of rows.

    Notes
    -----
    Layer lists are 0-based, in the order given to :meth:`update`. Sums and
    Gram matrices are kept for shifted rows ``x − c`` (see the module
    docstring); the accessors (:meth:`student_gram`, :meth:`cross_gram`, ...)
    return the statistics of DESIGN §1, uncentred or centred.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> student_hidden = [rng.standard_normal((200, 8)) for _ in range(3)]
    >>> teacher_hidden = [rng.standard_normal((200, 16)) for _ in range(6)]
    >>> stats = AlignmentStats.from_arrays(student_hidden, teacher_hidden)
    >>> stats.relative_min_mse().shape    # (n_s, n_t): 1 − R² of the best projection
    (3, 6)
    >>> stats.projection(2, 5).shape      # closed form for student 2 → teacher 5
    (8, 16)
    """

    def __init__(self, student_widths=None, teacher_widths=None, *,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS):
        self._chunk_rows = check_positive_int(chunk_rows, "chunk_rows")
        self._student_widths: tuple[int, ...] | None = None
        self._teacher_widths: tuple[int, ...] | None = None
        self._n_rows = 0
        self._scratch: tuple[np.ndarray, np.ndarray] | None = None
        if (student_widths is None) != (teacher_widths is None):
            raise ValueError(
                "give both student_widths and teacher_widths, or neither (the first "
                "update() then sets them)"
            )
        if student_widths is not None:
            self._allocate(
                _check_widths(student_widths, "student_widths"),
                _check_widths(teacher_widths, "teacher_widths"),
            )

    def _allocate(self, student_widths: tuple[int, ...], teacher_widths: tuple[int, ...]):
        self._student_widths = student_widths
        self._teacher_widths = teacher_widths
        self._student_offsets = np.concatenate([[0], np.cumsum(student_widths)]).astype(np.int64)
        self._teacher_offsets = np.concatenate([[0], np.cumsum(teacher_widths)]).astype(np.int64)
        total_s, total_t = int(self._student_offsets[-1]), int(self._teacher_offsets[-1])
        self._student_shift = np.zeros(total_s)
        self._teacher_shift = np.zeros(total_t)
        self._student_sum = np.zeros(total_s)
        self._teacher_sum = np.zeros(total_t)
        # Fortran order so that scipy's dsyrk/dgemm accumulate in place (beta = 1);
        # the per-layer Gram matrices hold valid data in their upper triangle only.
        self._student_gram = [np.zeros((d, d), order="F") for d in student_widths]
        self._teacher_gram = [np.zeros((d, d), order="F") for d in teacher_widths]
        # C' in C order: its transpose is the Fortran array dgemm updates, and each
        # student's block of rows is contiguous for the min-MSE GEMMs.
        self._cross = np.zeros((total_s, total_t))

    # ------------------------------------------------------------------ properties

    @property
    def n_student(self) -> int:
        """Number of student layers (0 before the first update if no widths were given)."""
        return 0 if self._student_widths is None else len(self._student_widths)

    @property
    def n_teacher(self) -> int:
        """Number of teacher layers (0 before the first update if no widths were given)."""
        return 0 if self._teacher_widths is None else len(self._teacher_widths)

    @property
    def student_widths(self) -> tuple[int, ...]:
        """Hidden width ``d_s`` of every student layer."""
        return () if self._student_widths is None else self._student_widths

    @property
    def teacher_widths(self) -> tuple[int, ...]:
        """Hidden width ``d_t`` of every teacher layer."""
        return () if self._teacher_widths is None else self._teacher_widths

    @property
    def n_rows(self) -> int:
        """``n_w``: the number of rows accumulated (rows a mask selects)."""
        return self._n_rows

    @property
    def chunk_rows(self) -> int:
        """Rows per accumulation step."""
        return self._chunk_rows

    def __repr__(self) -> str:
        return (
            f"AlignmentStats(n_student={self.n_student}, n_teacher={self.n_teacher}, "
            f"n_rows={self.n_rows}, student_widths={self.student_widths}, "
            f"teacher_widths={self.teacher_widths})"
        )

    # ------------------------------------------------------------------ accumulation

    def update(self, student_layers, teacher_layers, mask=None, *,
               check_finite: bool = True) -> AlignmentStats:
        """Accumulate one chunk of rows (in steps of ``chunk_rows``); returns ``self``.

        Parameters
        ----------
        student_layers : list of ndarray or ndarray
            One array per student layer, each ``(N, d_s)`` or ``(B, T, d_s)``,
            float32 or float64; or one stacked ``(L, N, d)``/``(L, B, T, d)`` array.
        teacher_layers : list of ndarray or ndarray
            Likewise ``(N, d_t)`` or ``(B, T, d_t)``, same leading shape.
        mask : array_like, optional
            0/1 (or bool) of shape ``(N,)`` or ``(B, T)``: the rows that count
            (attention mask, token selection). Rows it leaves out are never
            read. ``None``: every row counts.
        check_finite : bool
            Refuse NaN/Inf in the rows that count (checked before anything is
            accumulated, so a refused update leaves the statistics unchanged).

        Raises
        ------
        ValueError
            Row counts that differ between layers, widths or layer counts that
            differ from earlier updates, a mask of the wrong shape or that
            selects no row, non-finite values.
        """
        self._update(student_layers, teacher_layers, mask, check_finite, progress=None)
        return self

    def _update(self, student_layers, teacher_layers, mask, check_finite, progress) -> None:
        check_finite = check_bool(check_finite, "check_finite")
        students, teachers, selected = self._prepare(
            student_layers, teacher_layers, mask, check_finite
        )
        if self._student_widths is None:
            self._allocate(
                tuple(x.shape[1] for x in students), tuple(x.shape[1] for x in teachers)
            )
        n_total = students[0].shape[0]
        for start in range(0, n_total, self._chunk_rows):
            stop = min(start + self._chunk_rows, n_total)
            if selected is None:
                rows = np.arange(start, stop, dtype=np.int64)
            else:
                rows = (start + np.flatnonzero(selected[start:stop])).astype(np.int64)
            if rows.size:
                self._add_rows(students, teachers, rows)
            if progress is not None:
                progress.update(stop - start)

    def _prepare(self, student_layers, teacher_layers, mask, check_finite):
        """Validate one update; returns 2-D views and the flat bool mask (or None)."""
        students = as_layers(student_layers, "student_layers")
        teachers = as_layers(teacher_layers, "teacher_layers")
        arrays = {}
        for side, layers in (("student_layers", students), ("teacher_layers", teachers)):
            for k, layer in enumerate(layers):
                name = f"{side}[{k}]"
                arrays[name] = check_float_array(layer, name, check_finite=False)
        reference_name = "student_layers[0]"
        reference = arrays[reference_name]
        for name, array in arrays.items():
            if name != reference_name:
                check_paired(reference, array, None, names=(reference_name, name))
        if self._student_widths is not None:
            for side, layers, widths in (
                ("student", students, self._student_widths),
                ("teacher", teachers, self._teacher_widths),
            ):
                if len(layers) != len(widths):
                    raise ValueError(
                        f"{side}_layers has {len(layers)} layer(s), but these statistics "
                        f"hold {len(widths)} {side} layer(s) of widths {widths}: every "
                        "update must give the same layers"
                    )
                for k in range(len(layers)):
                    width = arrays[f"{side}_layers[{k}]"].shape[-1]
                    if width != widths[k]:
                        raise ValueError(
                            f"{side}_layers[{k}] has width {width}, but these statistics "
                            f"were built for {side} widths {widths} (layer {k}: "
                            f"{widths[k]}): every update must give the same layers"
                        )
        lead_shape = reference.shape[:-1]
        selected = None
        if mask is not None:
            selected = check_mask(mask, lead_shape, "mask").reshape(-1)
            if not selected.any():
                raise ValueError(
                    f"mask selects no row of the {selected.size} rows (leading shape "
                    f"{lead_shape}): there is nothing to accumulate; skip this chunk"
                )
        # Non-contiguous 3-D input is copied once here; contiguous input is a view.
        flat = {name: a.reshape(-1, a.shape[-1]) for name, a in arrays.items()}
        if check_finite:
            for name, values in flat.items():
                check_finite_rows(values, name, selected, block_rows=self._chunk_rows)
        n_s = len(students)
        views = list(flat.values())
        return views[:n_s], views[n_s:], selected

    def _scratch_buffers(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        """Fortran-ordered (m, Σd_s) and (m, Σd_t) float64 views of reusable buffers."""
        total_s, total_t = int(self._student_offsets[-1]), int(self._teacher_offsets[-1])
        if self._scratch is None or self._scratch[0].size < m * total_s:
            rows = min(self._chunk_rows, max(m, 1))
            self._scratch = (np.empty(rows * total_s), np.empty(rows * total_t))
        flat_s, flat_t = self._scratch
        return (
            flat_s[: m * total_s].reshape((m, total_s), order="F"),
            flat_t[: m * total_t].reshape((m, total_t), order="F"),
        )

    def _fill(self, layers, offsets, shift, sums, rows, buffer) -> None:
        from .kernels.gram import fill_shifted_transposed

        transposed = buffer.T  # (Σd, m), C-contiguous: row j is feature j
        for k, values in enumerate(layers):
            lo, hi = offsets[k], offsets[k + 1]
            fill_shifted_transposed(values, rows, shift[lo:hi], transposed[lo:hi], sums[lo:hi])

    def _set_shift(self, layers, offsets, shift, rows, buffer) -> None:
        """Shift = column means of the first chunk, rounded to each layer's dtype."""
        sums = np.zeros_like(shift)
        self._fill(layers, offsets, np.zeros_like(shift), sums, rows, buffer)
        for k, values in enumerate(layers):
            lo, hi = offsets[k], offsets[k + 1]
            shift[lo:hi] = (sums[lo:hi] / rows.size).astype(values.dtype)

    def _add_rows(self, students, teachers, rows) -> None:
        from scipy.linalg import blas

        xs, xt = self._scratch_buffers(rows.size)
        if self._n_rows == 0:
            self._set_shift(students, self._student_offsets, self._student_shift, rows, xs)
            self._set_shift(teachers, self._teacher_offsets, self._teacher_shift, rows, xt)
        self._fill(students, self._student_offsets, self._student_shift, self._student_sum,
                   rows, xs)
        self._fill(teachers, self._teacher_offsets, self._teacher_shift, self._teacher_sum,
                   rows, xt)
        for grams, offsets, x in (
            (self._student_gram, self._student_offsets, xs),
            (self._teacher_gram, self._teacher_offsets, xt),
        ):
            for k in range(len(grams)):
                block = x[:, offsets[k]:offsets[k + 1]]  # Fortran-contiguous (m, d)
                grams[k] = blas.dsyrk(1.0, block, beta=1.0, c=grams[k], trans=1,
                                      overwrite_c=True)
        # All n_s·n_t cross products in one GEMM: C'ᵀ += X_Tᵀ X_S.
        self._cross = blas.dgemm(1.0, xt, xs, beta=1.0, c=self._cross.T, trans_a=True,
                                 overwrite_c=True).T
        self._n_rows += int(rows.size)

    @classmethod
    def from_arrays(cls, student_layers, teacher_layers, mask=None, *,
                    chunk_rows: int = DEFAULT_CHUNK_ROWS, progress: bool = False,
                    check_finite: bool = True) -> AlignmentStats:
        """Statistics of whole arrays, accumulated ``chunk_rows`` rows at a time.

        Parameters are those of :meth:`update`; ``progress=True`` shows a tqdm
        bar over the rows. Arrays may be memory-mapped (e.g. ``np.load(...,
        mmap_mode="r")``): only one chunk is copied at a time.
        """
        stats = cls(chunk_rows=chunk_rows)
        bar = None
        if check_bool(progress, "progress"):
            from tqdm.auto import tqdm

            first = as_layers(student_layers, "student_layers")[0]
            total = int(np.prod(np.shape(first)[:-1]))
            bar = tqdm(total=total, unit="row", desc="alignment statistics")
        try:
            stats._update(student_layers, teacher_layers, mask, check_finite, progress=bar)
        finally:
            if bar is not None:
                bar.close()
        return stats

    @classmethod
    def from_chunks(cls, chunks: Iterable, *, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                    progress: bool = False, check_finite: bool = True) -> AlignmentStats:
        """Statistics of a stream of chunks, e.g. batches read from disk or a model.

        Parameters
        ----------
        chunks : iterable
            Each item is ``(student_layers, teacher_layers)`` or
            ``(student_layers, teacher_layers, mask)``, as :meth:`update` takes them
            (``mask`` may be ``None``).
        chunk_rows, progress, check_finite
            As in :meth:`from_arrays`; ``progress`` counts chunks.
        """
        stats = cls(chunk_rows=chunk_rows)
        iterator = iter(chunks)
        check_bool(check_finite, "check_finite")  # before the first chunk is read
        if check_bool(progress, "progress"):
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, unit="chunk", desc="alignment statistics")
        count = 0
        for k, chunk in enumerate(iterator):
            if not isinstance(chunk, (tuple, list)) or len(chunk) not in (2, 3):
                raise TypeError(
                    f"chunks[{k}] must be a tuple (student_layers, teacher_layers) or "
                    f"(student_layers, teacher_layers, mask), got {type(chunk).__name__}"
                    + (f" of length {len(chunk)}" if isinstance(chunk, (tuple, list)) else "")
                )
            mask = chunk[2] if len(chunk) == 3 else None
            try:
                stats.update(chunk[0], chunk[1], mask, check_finite=check_finite)
            except (ValueError, TypeError) as error:
                raise type(error)(f"chunks[{k}]: {error}") from error
            count += 1
        if count == 0:
            raise ValueError("chunks is empty: there is nothing to accumulate")
        return stats

    @classmethod
    def from_dask(cls, student_layers, teacher_layers, mask=None, *,
                  chunk_rows: int = DEFAULT_CHUNK_ROWS, split_every: int = 4,
                  scheduler=None) -> AlignmentStats:
        """Statistics of hidden states held in dask arrays, computed on a Dask scheduler.

        Each row block gets its statistics (:meth:`from_arrays`, pkd's kernels)
        in its own task; the blocks' statistics are merged in a tree of fixed
        fan-in, in row order, so the result does not depend on the scheduler
        or the number of workers. It equals :meth:`from_arrays` on the same
        rows up to rounding (~1e-15 relative). Needs the ``pkd[dask]`` extra.

        Parameters
        ----------
        student_layers, teacher_layers : list of dask.array.Array, or one stacked dask array
            As in :meth:`update`, as dask arrays: each ``(N, d)`` or ``(B, T, d)``
            (or stacked ``(L, N, d)`` / ``(L, B, T, d)``), float32 or float64,
            with known chunk sizes. Blocks are row blocks of the first student
            layer (for 3-D input: its batch chunks, whole sequences); layers
            chunked differently are rechunked to them, and the width is
            rechunked to one chunk. Each block emits the full statistics
            (``Σd_s·Σd_t + Σd_s² + Σd_t²`` float64 values), so make row chunks
            large next to that: tens of thousands of rows for BERT-size models.
        mask : array_like or dask.array.Array, optional
            0/1 of shape ``(N,)`` / ``(B, T)``. A numpy mask is checked here and
            blocks it leaves empty get no task; a dask mask is checked in the
            tasks. ``None``: every row counts.
        chunk_rows : int
            Rows per accumulation step inside a task (see ``__init__``).
        split_every : int
            Fan-in (>= 2) of the merge tree; a merge task holds this many
            statistics plus two working copies.
        scheduler : None, str, or distributed.Client
            ``None``: dask's default (the active ``distributed.Client`` if any,
            else threads); a scheduler name (``"threads"``, ``"processes"``,
            ``"synchronous"``); a ``distributed.Client``; or a scheduler address
            (``"tcp://host:8786"``: a Client is connected, and closed at the end).

        Raises
        ------
        TypeError, ValueError
            As :meth:`update`, before any work for what the client can see
            (layer types, dtypes, shapes, a numpy mask); errors raised in a
            task (non-finite values, a dask mask that is not 0/1) keep their
            type and name the rows of the block. A mask that selects no row.
        ImportError
            dask is not installed.
        """
        from ._dask import from_dask

        data = from_dask(student_layers, teacher_layers, mask, chunk_rows=chunk_rows,
                         split_every=split_every, scheduler=scheduler)
        return cls.from_dict(data, chunk_rows=chunk_rows)

    @classmethod
    def from_dumps_dask(cls, student, teacher, *, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                        scheduler=None, mask=None, task_rows: int | None = None,
                        split_every: int = 4) -> AlignmentStats:
        """Statistics of two dumps, read and reduced by Dask workers (``pkd analyze --scheduler``).

        Only file paths, row ranges and mask slices are sent: each task opens
        both dumps by path, streams its ``task_rows`` rows ``chunk_rows`` at a
        time (memory per task: one chunk of every layer plus the statistics)
        and returns their statistics; they are merged as in :meth:`from_dask`.
        **The dumps must be readable under the same absolute path on every
        worker** (a shared filesystem); a worker that cannot find them, or sees
        a different file, raises an error naming its host. Needs ``pkd[dask]``.

        Parameters
        ----------
        student, teacher : pkd.io.Dump
            Opened with :func:`pkd.io.load_dump`; ``.safetensors`` only (a
            ``.npz`` layer can only be read whole, by every task).
        chunk_rows : int
            Rows read and accumulated at a time inside a task.
        scheduler : None, str, or distributed.Client
            As in :meth:`from_dask`; ``pkd analyze --scheduler ADDRESS`` passes
            the address.
        mask : array_like, optional
            0/1 of the dumps' leading shape ``(B, T)`` / ``(N,)`` (e.g.
            ``student.attention_mask``). ``None``: every row counts (the dumps'
            own masks are not applied).
        task_rows : int, optional
            Rows per task. Default: the smallest multiple of ``chunk_rows``
            with which a task reads at least 8× the values it emits.
        split_every : int
            As in :meth:`from_dask`.

        Raises
        ------
        TypeError, ValueError
            Before any work: arguments that are not dumps, a ``.npz`` dump,
            dumps of different leading shapes, a bad mask. From the tasks
            (same type, naming the rows): NaN/Inf in the rows that count, a
            dump missing on a worker (``FileNotFoundError``) or different from
            the client's. A mask that selects no row; an address where no
            scheduler answers.
        """
        from ._dask import from_dumps

        data = from_dumps(student, teacher, chunk_rows=chunk_rows, scheduler=scheduler,
                          mask=mask, task_rows=task_rows, split_every=split_every)
        return cls.from_dict(data, chunk_rows=chunk_rows)

    # ------------------------------------------------------------------ combining

    def copy(self) -> AlignmentStats:
        """An independent copy (the scratch buffers are not copied)."""
        other = AlignmentStats(chunk_rows=self._chunk_rows)
        if self._student_widths is None:
            return other
        other._allocate(self._student_widths, self._teacher_widths)
        other._n_rows = self._n_rows
        for name in ("_student_shift", "_teacher_shift", "_student_sum", "_teacher_sum"):
            getattr(other, name)[...] = getattr(self, name)
        other._student_gram = [g.copy(order="F") for g in self._student_gram]
        other._teacher_gram = [h.copy(order="F") for h in self._teacher_gram]
        other._cross = self._cross.copy()
        return other

    def _reshift(self, student_shift: np.ndarray, teacher_shift: np.ndarray) -> None:
        """Re-express the statistics (in place) for rows shifted by the new vectors."""
        n = float(self._n_rows)
        delta_s = self._student_shift - student_shift  # x − new = (x − old) + delta
        delta_t = self._teacher_shift - teacher_shift
        for grams, offsets, sums, delta in (
            (self._student_gram, self._student_offsets, self._student_sum, delta_s),
            (self._teacher_gram, self._teacher_offsets, self._teacher_sum, delta_t),
        ):
            for k in range(len(grams)):
                lo, hi = offsets[k], offsets[k + 1]
                a, c = sums[lo:hi], delta[lo:hi]
                update = np.outer(a, c)
                update += update.T
                update += n * np.outer(c, c)
                grams[k] = np.asfortranarray(_symmetric(grams[k]) + update)
        self._cross += np.outer(self._student_sum + n * delta_s, delta_t)
        self._cross += np.outer(delta_s, self._teacher_sum)
        self._student_sum += n * delta_s
        self._teacher_sum += n * delta_t
        self._student_shift = student_shift.copy()
        self._teacher_shift = teacher_shift.copy()

    def merge(self, other: AlignmentStats) -> AlignmentStats:
        """Statistics of the union of two disjoint row sets, as a new object.

        Raises
        ------
        TypeError
            ``other`` is not an :class:`AlignmentStats`.
        ValueError
            The two hold different layer counts or widths.
        """
        if not isinstance(other, AlignmentStats):
            raise TypeError(
                f"can only merge AlignmentStats with AlignmentStats, got {type(other).__name__}"
            )
        if other._student_widths is None or (
            other._n_rows == 0 and self._student_widths is not None
        ):
            if other._student_widths is not None:
                self._check_compatible(other)
            return self.copy()
        if self._student_widths is None or self._n_rows == 0:
            if self._student_widths is not None:
                self._check_compatible(other)
            merged = other.copy()
            merged._chunk_rows = self._chunk_rows
            return merged
        self._check_compatible(other)
        merged, addend = self.copy(), other
        same_shift = np.array_equal(self._student_shift, other._student_shift) and (
            np.array_equal(self._teacher_shift, other._teacher_shift)
        )
        if not same_shift:
            # Move both to the combined mean (no cancellation, whatever the two shifts).
            n_a, n_b = float(self._n_rows), float(other._n_rows)
            n = n_a + n_b
            mean_s = (n_a * self._student_shift + self._student_sum
                      + n_b * other._student_shift + other._student_sum) / n
            mean_t = (n_a * self._teacher_shift + self._teacher_sum
                      + n_b * other._teacher_shift + other._teacher_sum) / n
            merged._reshift(mean_s, mean_t)
            addend = other.copy()
            addend._reshift(mean_s, mean_t)
        merged._n_rows += addend._n_rows
        merged._student_sum += addend._student_sum
        merged._teacher_sum += addend._teacher_sum
        for k in range(len(merged._student_gram)):
            merged._student_gram[k] += addend._student_gram[k]
        for k in range(len(merged._teacher_gram)):
            merged._teacher_gram[k] += addend._teacher_gram[k]
        merged._cross += addend._cross
        return merged

    def __add__(self, other):
        if not isinstance(other, AlignmentStats):
            return NotImplemented
        return self.merge(other)

    def __radd__(self, other):
        # sum([stats, ...]) starts from the int 0.
        if isinstance(other, numbers.Number) and other == 0:
            return self.copy()
        return NotImplemented

    def _check_compatible(self, other: AlignmentStats) -> None:
        if (self._student_widths, self._teacher_widths) != (
            other._student_widths, other._teacher_widths
        ):
            raise ValueError(
                "cannot merge statistics of different layers: "
                f"{self.n_student} student layers of widths {self.student_widths} and "
                f"{self.n_teacher} teacher layers of widths {self.teacher_widths}, vs "
                f"{other.n_student} student layers of widths {other.student_widths} and "
                f"{other.n_teacher} teacher layers of widths {other.teacher_widths}"
            )

    # ------------------------------------------------------------------ plain arrays

    def to_dict(self) -> dict[str, np.ndarray]:
        """The statistics as a dict of plain numpy arrays (``np.savez``-ready).

        Keys: ``format_version`` (0-d int64, currently 1), ``student_widths``,
        ``teacher_widths`` (1-D int64), ``n_rows`` (0-d int64), ``student_shift``
        (Σd_s,), ``teacher_shift`` (Σd_t,), ``student_sum`` (Σd_s,),
        ``teacher_sum`` (Σd_t,), ``cross_gram`` (Σd_s × Σd_t), ``student_gram_{s}``
        (d_s × d_s) and ``teacher_gram_{t}`` (d_t × d_t). Layers are
        concatenated along features in layer order. Sums and Gram matrices are
        of the *shifted* rows ``x − shift`` (so ``student_sum`` is ``a'``, not
        ``a_s``); :meth:`from_dict` reads them back.
        """
        if self._student_widths is None:
            raise ValueError(
                "these statistics have no layers yet (no widths given, no update): "
                "nothing to export"
            )
        data = {
            "format_version": np.asarray(_FORMAT_VERSION, dtype=np.int64),
            "student_widths": np.asarray(self._student_widths, dtype=np.int64),
            "teacher_widths": np.asarray(self._teacher_widths, dtype=np.int64),
            "n_rows": np.asarray(self._n_rows, dtype=np.int64),
            "student_shift": self._student_shift.copy(),
            "teacher_shift": self._teacher_shift.copy(),
            "student_sum": self._student_sum.copy(),
            "teacher_sum": self._teacher_sum.copy(),
            "cross_gram": self._cross.copy(),
        }
        for s, gram in enumerate(self._student_gram):
            data[f"student_gram_{s}"] = _symmetric(gram)
        for t, gram in enumerate(self._teacher_gram):
            data[f"teacher_gram_{t}"] = _symmetric(gram)
        return data

    @classmethod
    def from_dict(cls, data: Mapping, *, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> AlignmentStats:
        """Rebuild statistics from :meth:`to_dict`'s arrays (a dict or an ``np.load`` file).

        Raises
        ------
        ValueError
            A missing key, an unknown format version, or an array of the wrong shape.
        """

        def get(key):
            try:
                return np.asarray(data[key])
            except KeyError:
                raise ValueError(
                    f"data has no key {key!r}: pass the dict AlignmentStats.to_dict() "
                    "returned (or np.load of the file np.savez wrote from it)"
                ) from None

        version = get("format_version")
        if version.shape != () or int(version) != _FORMAT_VERSION:
            raise ValueError(
                f"data['format_version'] is {version.tolist()!r}; this version of pkd reads "
                f"format {_FORMAT_VERSION}"
            )
        widths = []
        for key in ("student_widths", "teacher_widths"):
            value = get(key)
            if value.ndim != 1 or value.dtype.kind not in "iu":
                raise ValueError(f"data[{key!r}] must be a 1-D int array, got {value!r}")
            widths.append(_check_widths(value.tolist(), f"data[{key!r}]"))
        n_rows = get("n_rows")
        if n_rows.shape != () or n_rows.dtype.kind not in "iu" or int(n_rows) < 0:
            raise ValueError(f"data['n_rows'] must be a 0-d int >= 0, got {n_rows!r}")
        stats = cls(widths[0], widths[1], chunk_rows=chunk_rows)
        stats._n_rows = int(n_rows)
        total_s, total_t = int(stats._student_offsets[-1]), int(stats._teacher_offsets[-1])
        expected = {
            "student_shift": (total_s,), "teacher_shift": (total_t,),
            "student_sum": (total_s,), "teacher_sum": (total_t,),
            "cross_gram": (total_s, total_t),
        }
        expected.update({f"student_gram_{s}": (d, d) for s, d in enumerate(widths[0])})
        expected.update({f"teacher_gram_{t}": (d, d) for t, d in enumerate(widths[1])})
        for key, shape in expected.items():
            value = get(key)
            if value.dtype.kind != "f" or value.shape != shape:
                raise ValueError(
                    f"data[{key!r}] must be a float array of shape {shape} (from the "
                    f"widths), got dtype {value.dtype} and shape {value.shape}"
                )
            if not np.isfinite(value).all():
                raise ValueError(f"data[{key!r}] contains NaN/Inf")
            value = value.astype(np.float64)
            if key.startswith(("student_gram_", "teacher_gram_")):
                side, index = key.rsplit("_", 1)
                getattr(stats, f"_{side}")[int(index)] = np.asfortranarray(value)
            elif key == "cross_gram":
                stats._cross = np.ascontiguousarray(value)
            else:
                getattr(stats, f"_{key}")[...] = value
        return stats

    # ------------------------------------------------------------------ statistics

    def _require_rows(self) -> None:
        if self._n_rows == 0:
            raise ValueError(
                "these statistics hold no rows yet: call update() (or build them with "
                "AlignmentStats.from_arrays / from_chunks) first"
            )

    def _student_index(self, s) -> int:
        self._require_rows()
        return check_layer_index(s, self.n_student, "s", "student")

    def _teacher_index(self, t) -> int:
        self._require_rows()
        return check_layer_index(t, self.n_teacher, "t", "teacher")

    def _block(self, side: str, index: int):
        offsets = self._student_offsets if side == "student" else self._teacher_offsets
        return slice(int(offsets[index]), int(offsets[index + 1]))

    def _gram(self, side: str, index: int, centered: bool) -> np.ndarray:
        grams = self._student_gram if side == "student" else self._teacher_gram
        shift = self._student_shift if side == "student" else self._teacher_shift
        sums = self._student_sum if side == "student" else self._teacher_sum
        block = self._block(side, index)
        gram = _symmetric(grams[index])
        a, c, n = sums[block], shift[block], float(self._n_rows)
        if centered:
            return gram - np.outer(a, a) / n
        update = np.outer(a, c)
        update += update.T
        update += n * np.outer(c, c)
        return gram + update

    def _cross_rows(self, s: int, centered: bool = False) -> np.ndarray:
        """C_s· (or Ĉ_s·) for student layer ``s`` and every teacher column: (d_s, Σd_t)."""
        block = self._block("student", s)
        n = float(self._n_rows)
        a = self._student_sum[block]
        if centered:
            return self._cross[block] - np.outer(a / n, self._teacher_sum)
        c = self._student_shift[block]
        cross = self._cross[block] + np.outer(a + n * c, self._teacher_shift)
        cross += np.outer(c, self._teacher_sum)
        return cross

    def _basis_times_cross(self, basis: np.ndarray, s: int) -> np.ndarray:
        """``basisᵀ C_s·`` for every teacher column, (k, Σd_t), without forming C_s·.

        ``C_s· = C'_s· + u c_tᵀ + c_s b'ᵀ`` (``u = a'_s + n_w c_s``): one GEMM on the
        contiguous rows of C' and a rank-2 GEMM update, all in scipy's BLAS (as for
        eigh: alternating numpy's and scipy's OpenBLAS thread pools leaves one
        spinning while the other works, measured 2× slower).
        """
        from scipy.linalg import blas

        block = self._block("student", s)
        c = self._student_shift[block]
        u = self._student_sum[block] + float(self._n_rows) * c
        z = blas.dgemm(1.0, basis, self._cross[block].T, trans_a=True, trans_b=True)
        left = blas.dgemm(1.0, basis, np.column_stack([u, c]), trans_a=True)
        right = np.asfortranarray(np.vstack([self._teacher_shift, self._teacher_sum]))
        return blas.dgemm(1.0, left, right, beta=1.0, c=z, overwrite_c=True)

    def _teacher_sq_norms(self) -> np.ndarray:
        """q_t for every teacher layer: tr(H'_t) + 2 c_t·b'_t + n_w ‖c_t‖²."""
        n = float(self._n_rows)
        out = np.empty(self.n_teacher)
        for t, gram in enumerate(self._teacher_gram):
            block = self._block("teacher", t)
            c, b = self._teacher_shift[block], self._teacher_sum[block]
            out[t] = np.trace(gram) + 2.0 * (c @ b) + n * (c @ c)
        return out

    def student_gram(self, s: int, *, centered: bool = False) -> np.ndarray:
        """``G_s = Sᵀ W S`` (or ``Ĝ_s = G_s − a_s a_sᵀ/n_w``), shape (d_s, d_s), float64."""
        return self._gram("student", self._student_index(s), centered)

    def teacher_gram(self, t: int, *, centered: bool = False) -> np.ndarray:
        """``H_t = Tᵀ W T`` (or ``Ĥ_t = H_t − b_t b_tᵀ/n_w``), shape (d_t, d_t), float64."""
        return self._gram("teacher", self._teacher_index(t), centered)

    def cross_gram(self, s: int, t: int, *, centered: bool = False) -> np.ndarray:
        """``C_st = Sᵀ W T`` (or ``Ĉ_st = C_st − a_s b_tᵀ/n_w``), shape (d_s, d_t), float64."""
        s, t = self._student_index(s), self._teacher_index(t)
        return self._cross_rows(s, centered)[:, self._block("teacher", t)]

    def student_sum(self, s: int) -> np.ndarray:
        """``a_s = Sᵀ w``, shape (d_s,), float64."""
        block = self._block("student", self._student_index(s))
        return self._student_sum[block] + self._n_rows * self._student_shift[block]

    def teacher_sum(self, t: int) -> np.ndarray:
        """``b_t = Tᵀ w``, shape (d_t,), float64."""
        block = self._block("teacher", self._teacher_index(t))
        return self._teacher_sum[block] + self._n_rows * self._teacher_shift[block]

    def teacher_sq_norm(self, t: int) -> float:
        """``q_t = Σ_i w_i ‖t_i‖²``."""
        return float(self._teacher_sq_norms()[self._teacher_index(t)])

    def teacher_variance(self) -> np.ndarray:
        """``var_t = (q_t − ‖b_t‖²/n_w) / (n_w d_t)``, the mean per-dimension variance.

        Returns
        -------
        ndarray, shape (n_t,), float64
        """
        self._require_rows()
        n = float(self._n_rows)
        out = np.empty(self.n_teacher)
        for t, gram in enumerate(self._teacher_gram):
            b = self._teacher_sum[self._block("teacher", t)]
            # Shift invariant, so computed from the shifted sums: no cancellation.
            out[t] = max(np.trace(gram) - (b @ b) / n, 0.0) / (n * self._teacher_widths[t])
        return out

    def min_mse(self, ridge: float = 0.0, *, cutoff: float = DEFAULT_CUTOFF) -> np.ndarray:
        """The smallest MSE any linear projection reaches, for every layer pair.

        ``min_mse[s, t] = (q_t − 2 tr(P*ᵀ C_st) + tr(P*ᵀ G_s P*)) / (n_w d_t)``
        with ``P*`` the closed form of :meth:`projection` (DESIGN §1).

        Parameters
        ----------
        ridge : float
            ``ρ ≥ 0``. With ``ρ > 0`` the value is the (unpenalised) MSE of the
            ridge projection ``(G_s + ρ I)⁻¹ C_st``.
        cutoff : float
            Relative eigenvalue cutoff for ``ridge = 0`` (module docstring).

        Returns
        -------
        ndarray, shape (n_s, n_t), float64
        """
        from scipy.linalg import blas

        ridge = check_nonnegative(ridge, "ridge")
        cutoff = _check_cutoff(cutoff)
        self._require_rows()
        q = self._teacher_sq_norms()
        scale = float(self._n_rows) * np.asarray(self._teacher_widths, dtype=np.float64)
        out = np.empty((self.n_student, self.n_teacher))
        for s in range(self.n_student):
            solver = _Solver(self._gram("student", s, False), ridge, cutoff)
            if solver.basis.shape[1] == 0:  # an all-zero layer explains nothing
                residual = q.copy()
            else:
                z = self._basis_times_cross(solver.basis, s)
                explained = blas.dgemv(1.0, z * z, solver.gain, trans=1)  # (Σd_t,)
                residual = q - np.add.reduceat(explained, self._teacher_offsets[:-1])
            # q − explained cancels when the fit is nearly exact (a teacher mean that S
            # reaches, little noise): it keeps ~16 − log10(q/residual) digits. Those pairs
            # are recomputed from P* in the shifted coordinates of pair_loss.
            near_exact = np.flatnonzero(residual < _NEAR_EXACT_FIT * q)
            cross = self._cross_rows(s) if near_exact.size else None
            for t in near_exact:
                projection = solver.solve(cross[:, self._block("teacher", t)])
                residual[t] = self._residual_sum(s, t, projection)
            out[s] = np.maximum(residual, 0.0) / scale
        return out

    def relative_min_mse(self, ridge: float = 0.0, *,
                         cutoff: float = DEFAULT_CUTOFF) -> np.ndarray:
        """``min_mse / var_t``: the fraction of each teacher layer's variance no
        projection explains (``1 − R²``), comparable across teacher layers.

        Raw ``min_mse`` favours small-variance teacher layers (DESIGN §1); use
        this (or :meth:`cka`) to choose a layer mapping. A constant teacher
        layer (``var_t = 0``) gives NaN. ``var_t`` is centred but a projection
        has no intercept, so a teacher mean that no ``Pᵀ s`` reaches counts as
        unexplained: the value can exceed 1 (R² < 0, as in ``r2_score``).

        Parameters
        ----------
        ridge, cutoff
            As in :meth:`min_mse`.

        Returns
        -------
        ndarray, shape (n_s, n_t), float64
        """
        mse = self.min_mse(ridge, cutoff=cutoff)
        variance = self.teacher_variance()
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(variance > 0, mse / variance, np.nan)

    def cka(self) -> np.ndarray:
        """Linear CKA of every pair: ``‖Ĉ_st‖_F² / (‖Ĝ_s‖_F ‖Ĥ_t‖_F)``.

        Computed from the shifted statistics, so it stays accurate for layers
        whose mean dwarfs their spread. A layer that is constant over the
        selected rows has no centred Gram matrix: its row/column is NaN.

        Returns
        -------
        ndarray, shape (n_s, n_t), float64, values in [0, 1]
        """
        self._require_rows()
        student_norms = np.array(
            [np.linalg.norm(self._gram("student", s, True)) for s in range(self.n_student)]
        )
        teacher_norms = np.array(
            [np.linalg.norm(self._gram("teacher", t, True)) for t in range(self.n_teacher)]
        )
        out = np.empty((self.n_student, self.n_teacher))
        for s in range(self.n_student):
            cross = self._cross_rows(s, centered=True)
            squares = np.einsum("ij,ij->j", cross, cross)
            out[s] = np.add.reduceat(squares, self._teacher_offsets[:-1])
        denominator = student_norms[:, None] * teacher_norms[None, :]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(denominator > 0, out / denominator, np.nan)

    def projection(self, s: int, t: int, ridge: float = 0.0, *,
                   cutoff: float = DEFAULT_CUTOFF) -> np.ndarray:
        """Closed-form projection for the pair ``(s, t)``.

        ``ridge = 0``: the minimum-norm least-squares solution of
        ``G_s P = C_st`` with the relative eigenvalue ``cutoff`` (module
        docstring); ``ridge = ρ > 0``: ``(G_s + ρ I)⁻¹ C_st``.

        Parameters
        ----------
        s, t : int
            The student and teacher layer (negative indices do not wrap).
        ridge : float
            ρ >= 0.
        cutoff : float
            Relative eigenvalue cutoff for ``ridge = 0``.

        Returns
        -------
        ndarray, shape (d_s, d_t), float64
        """
        ridge = check_nonnegative(ridge, "ridge")
        cutoff = _check_cutoff(cutoff)
        s, t = self._student_index(s), self._teacher_index(t)
        solver = _Solver(self._gram("student", s, False), ridge, cutoff)
        return solver.solve(self._cross_rows(s)[:, self._block("teacher", t)])

    def pair_loss(self, s: int, t: int, projection) -> float:
        """Exact MSE ``Σ_i w_i ‖Pᵀ s_i − t_i‖² / (n_w d_t)`` of a given projection.

        Computed from the statistics (no pass over the rows), in the shifted
        coordinates: with ``r'_i = t'_i − Pᵀ s'_i`` and ``δ = c_t − Pᵀ c_s``,
        ``Σ w ‖r‖² = q' − 2 tr(Pᵀ C') + tr(Pᵀ G' P) + 2 δ·(b' − Pᵀ a') + n_w ‖δ‖²``.
        Rounding can make an exact fit a tiny negative number; it is clipped at 0.

        Parameters
        ----------
        s, t : int
            The layer pair.
        projection : ndarray, shape (d_s, d_t)
            Any projection, e.g. a Xavier init or a trained one.

        Returns
        -------
        float
            The MSE, >= 0.
        """
        s, t = self._student_index(s), self._teacher_index(t)
        d_s, d_t = self._student_widths[s], self._teacher_widths[t]
        P = check_projection(projection, d_s, d_t, "projection", pair=(s, t))
        total = self._residual_sum(s, t, P.astype(np.float64, copy=False))
        return max(float(total), 0.0) / (self._n_rows * d_t)

    def _residual_sum(self, s: int, t: int, P: np.ndarray) -> float:
        """``Σ_i w_i ‖Pᵀ s_i − t_i‖²`` in shifted coordinates (see :meth:`pair_loss`)."""
        block_s, block_t = self._block("student", s), self._block("teacher", t)
        gram = _symmetric(self._student_gram[s])
        cross = self._cross[block_s, block_t]
        a, b = self._student_sum[block_s], self._teacher_sum[block_t]
        delta = self._teacher_shift[block_t] - P.T @ self._student_shift[block_s]
        total = (
            np.trace(self._teacher_gram[t])
            - 2.0 * np.vdot(P, cross)
            + np.vdot(P, gram @ P)
            + 2.0 * (delta @ (b - P.T @ a))
            + self._n_rows * (delta @ delta)
        )
        return float(total)
