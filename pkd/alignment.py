"""Streaming alignment statistics between every student and every teacher layer.

:class:`AlignmentStats` reads the hidden states once, in chunks of rows, and
keeps in float64 the Gram statistics of every (student layer, teacher layer)
pair (``G_s = SᵀWS``, ``H_t = TᵀWT``, ``C_st = SᵀWT``, the sums, ``n_w``; ``W``
the 0/1 weights of a mask) plus the per-row norm products of debiased CKA,
in shifted coordinates (:mod:`pkd._moments`). From them alone: the
best-reachable loss, in-sample or held out over folds, linear CKA (plain or
debiased), closed-form projections and the loss of any projection. Statistics
of disjoint row sets merge exactly (``+``). ``docs/numerics.md`` has the algebra.

The closed form (:mod:`pkd.closed_form`) keeps only what the data's precision
supports (singular values above ``cutoff·σ₁``, as ``lstsq(rcond=cutoff)``, with
``1e-6`` for float32 hidden states and ``2e-15`` for float64), so the
statistics remember each layer's dtype; a merge of mixed dtypes keeps the
coarser. A fit on rounding noise would report a loss no student can reach.

Folds (``folds=k``): example ``i`` (a row of 2-D input, a sequence of 3-D input, counted
across updates) goes to fold ``i mod k`` whatever the chunking; the totals are the merge
of the folds; held-out estimates fit on ``k − 1`` folds and score on the other.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import numpy as np

from . import _accumulate, _estimates, _moments
from ._validation import (
    check_bool,
    check_layer_index,
    check_nonnegative,
    check_positive_int,
    check_projection,
)
from .closed_form import Solver, check_cutoff, default_cutoff, solve_projection

__all__ = ["AlignmentStats", "FoldEstimate", "solve_projection"]

DEFAULT_CHUNK_ROWS = 1024  # the smaller buffer costs fewer page faults; docs/performance.md
_FORMAT_VERSION = 2
_SIDES = ("student", "teacher")


class FoldEstimate(NamedTuple):
    """A held-out estimate over ``k`` folds: ``mean`` and ``std`` (ddof=1), each (n_s, n_t)."""

    mean: np.ndarray
    std: np.ndarray


class AlignmentStats:
    """Float64 alignment statistics of every (student, teacher) layer pair, one pass.

    Parameters
    ----------
    student_widths, teacher_widths : sequence of int, optional
        Hidden widths ``d_s`` and ``d_t`` of the layers. Give both (statistics
        of zero rows, e.g. the start of a reduction) or neither (set by the
        first :meth:`update`).
    chunk_rows : int
        Rows per accumulation step; the float64 chunk buffer holds
        ``chunk_rows · (Σ d_s + Σ d_t)`` values, so memory does not grow with N.
    folds : int, optional
        ``k >= 2``: keep the statistics of ``k`` folds (module docstring), ``k``
        times the memory, for held-out estimates (``heldout=True``).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> student_hidden = [rng.standard_normal((200, 8)) for _ in range(3)]
    >>> teacher_hidden = [rng.standard_normal((200, 16)) for _ in range(6)]
    >>> stats = AlignmentStats.from_arrays(student_hidden, teacher_hidden, folds=5)
    >>> stats.relative_min_mse().shape    # (n_s, n_t): 1 − R² of the best projection
    (3, 6)
    >>> stats.relative_min_mse(heldout=True).mean.shape
    (3, 6)
    """

    def __init__(self, student_widths=None, teacher_widths=None, *,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS, folds: int | None = None):
        self._chunk_rows = check_positive_int(chunk_rows, "chunk_rows")
        self._n_folds = _accumulate.check_folds(folds)
        self._layout: _moments.Layout | None = None
        self._folds: list[_moments.Moments] = []
        self._dtypes: dict[str, list[np.dtype]] = {}
        self._examples = 0  # the next example index of update()'s default fold rule
        self._total_cache, self._residual_cache = None, {}
        self._buffers = None
        if (student_widths is None) != (teacher_widths is None):
            raise ValueError(
                "give both student_widths and teacher_widths, or neither (the first "
                "update() then sets them)"
            )
        if student_widths is not None:
            self._allocate(_accumulate.check_widths(student_widths, "student_widths"),
                           _accumulate.check_widths(teacher_widths, "teacher_widths"))

    def _allocate(self, student_widths, teacher_widths) -> None:
        self._layout = _moments.Layout(student_widths, teacher_widths)
        zero = {side: np.zeros(self._layout.total[side]) for side in _SIDES}
        self._folds = [_moments.Moments(self._layout, zero) for _ in range(self._n_folds)]
        self._dtypes = {side: [None] * self._layout.count(side) for side in _SIDES}

    # ------------------------------------------------------------------ properties

    @property
    def n_student(self) -> int:
        """Number of student layers (0 before the first update if no widths were given)."""
        return 0 if self._layout is None else self._layout.count("student")

    @property
    def n_teacher(self) -> int:
        """Number of teacher layers (0 before the first update if no widths were given)."""
        return 0 if self._layout is None else self._layout.count("teacher")

    @property
    def student_widths(self) -> tuple[int, ...]:
        """Hidden width ``d_s`` of every student layer."""
        return () if self._layout is None else self._layout.widths["student"]

    @property
    def teacher_widths(self) -> tuple[int, ...]:
        """Hidden width ``d_t`` of every teacher layer."""
        return () if self._layout is None else self._layout.widths["teacher"]

    @property
    def student_dtypes(self) -> tuple:
        """The coarsest dtype seen per student layer (None before any row): sets the cutoff."""
        return tuple(self._dtypes.get("student", ()))

    @property
    def n_rows(self) -> int:
        """``n_w``: the number of rows accumulated (rows a mask selects), all folds."""
        return sum(m.n for m in self._folds)

    @property
    def n_folds(self) -> int | None:
        """``k``, or None for statistics without folds."""
        return None if self._n_folds == 1 else self._n_folds

    @property
    def fold_rows(self) -> tuple[int, ...]:
        """Rows accumulated in each fold."""
        return tuple(m.n for m in self._folds)

    @property
    def chunk_rows(self) -> int:
        """Rows per accumulation step."""
        return self._chunk_rows

    def __repr__(self) -> str:
        return (f"AlignmentStats(n_student={self.n_student}, n_teacher={self.n_teacher}, "
                f"n_rows={self.n_rows}, student_widths={self.student_widths}, "
                f"teacher_widths={self.teacher_widths}, folds={self.n_folds})")

    # ------------------------------------------------------------------ accumulation

    def update(self, student_layers, teacher_layers, mask=None, *, check_finite: bool = True,
               examples=None) -> AlignmentStats:
        """Accumulate one chunk of rows (in steps of ``chunk_rows``); returns ``self``.

        Parameters
        ----------
        student_layers : list of ndarray or ndarray
            One array per student layer, each ``(N, d_s)`` or ``(B, T, d_s)``,
            float32 or float64; or one stacked ``(L, N, d)``/``(L, B, T, d)`` array.
        teacher_layers : list of ndarray or ndarray
            Likewise ``(N, d_t)`` or ``(B, T, d_t)``, same leading shape.
        mask : array_like, optional
            0/1 (or bool) of shape ``(N,)`` or ``(B, T)``: the rows that count.
            Rows it leaves out are never read. ``None``: every row counts.
        check_finite : bool
            Refuse NaN/Inf in the rows that count (checked before anything is
            accumulated, so a refused update leaves the statistics unchanged).
        examples : array_like of int, optional
            With folds: the example each row belongs to, ``(N,)`` or ``(B, T)``
            (fold = example mod k). Default: the row index (2-D) or the
            sequence index (3-D), counted on from the previous updates.

        Raises
        ------
        ValueError
            Row counts that differ between layers, widths or layer counts that
            differ from earlier updates, a mask of the wrong shape or that
            selects no row, non-finite values, bad ``examples``.
        """
        self._update(student_layers, teacher_layers, mask, check_finite, None, examples)
        return self

    def _update(self, student_layers, teacher_layers, mask, check_finite, progress,
                examples=None) -> None:
        check_finite = check_bool(check_finite, "check_finite")
        students, teachers, selected, lead_shape = _accumulate.prepare(
            self._layout, student_layers, teacher_layers, mask, check_finite, self._chunk_rows)
        ids = _accumulate.example_ids(lead_shape, examples, self._examples)
        if self._layout is None:
            self._allocate(tuple(x.shape[1] for x in students),
                           tuple(x.shape[1] for x in teachers))
        if self._buffers is None:
            self._buffers = _accumulate.ChunkBuffers(self._layout, self._chunk_rows)
        self._examples = max(self._examples, int(ids.max()) + 1)
        for side, layers in (("student", students), ("teacher", teachers)):
            known = self._dtypes[side]
            for k, x in enumerate(layers):
                known[k] = _accumulate.coarser(known[k], x.dtype)
        self._total_cache, self._residual_cache = None, {}
        fold_of_row = ids % self._n_folds
        n_total, chunk = students[0].shape[0], self._chunk_rows
        # A window of k chunks, split by fold: each fold gets ~chunk_rows rows per GEMM, so
        # folds cost no more passes over the cross statistics than no folds.
        n_rows = n_total if selected is None else int(np.count_nonzero(selected))
        with _accumulate.update_threads(self._layout, min(n_rows, chunk)) as threads:
            for start in range(0, n_total, chunk * self._n_folds):
                stop = min(start + chunk * self._n_folds, n_total)
                rows = np.arange(start, stop, dtype=np.int64)
                if selected is not None:
                    rows = rows[selected[start:stop]]
                if rows.size and self.n_rows == 0:
                    shift = self._buffers.first_shift(students, teachers, rows[:chunk])
                    for moments in self._folds:  # one shift for every fold: merges are sums
                        moments.shift = {side: shift[side].copy() for side in _SIDES}
                folds = fold_of_row[rows]
                for f, moments in enumerate(self._folds):
                    part = rows[folds == f] if self._n_folds > 1 else rows
                    for lo in range(0, part.size, chunk):
                        self._buffers.add_rows(moments, students, teachers, part[lo:lo + chunk],
                                               threads)
                if progress is not None:
                    progress.update(stop - start)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_arrays(cls, student_layers, teacher_layers, mask=None, *,
                    chunk_rows: int = DEFAULT_CHUNK_ROWS, progress: bool = False,
                    check_finite: bool = True, folds: int | None = None) -> AlignmentStats:
        """Statistics of whole arrays, accumulated ``chunk_rows`` rows at a time.

        Parameters are those of :meth:`update` and ``__init__``; ``progress=True``
        shows a tqdm bar over the rows. Arrays may be memory-mapped: only one
        chunk is copied at a time.
        """
        stats = cls(chunk_rows=chunk_rows, folds=folds)
        with _accumulate.row_bar(student_layers, check_bool(progress, "progress")) as bar:
            stats._update(student_layers, teacher_layers, mask, check_finite, bar)
        return stats

    @classmethod
    def from_chunks(cls, chunks: Iterable, *, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                    progress: bool = False, check_finite: bool = True,
                    folds: int | None = None) -> AlignmentStats:
        """Statistics of a stream of chunks, e.g. batches read from disk or a model.

        Each item of ``chunks`` is ``(student_layers, teacher_layers)`` or
        ``(student_layers, teacher_layers, mask)`` as :meth:`update` takes them;
        examples are counted across chunks for the fold rule. ``progress``
        counts chunks.
        """
        stats = cls(chunk_rows=chunk_rows, folds=folds)
        _accumulate.accumulate_chunks(stats, chunks, check_bool(check_finite, "check_finite"),
                                      check_bool(progress, "progress"))
        return stats

    @classmethod
    def from_dumps(cls, student, teacher, *, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                   mask="auto", tokens="all", folds: int | None = None,
                   progress: bool = False) -> AlignmentStats:
        """Statistics of two hidden-state dumps (:class:`pkd.io.Dump`), streamed once.

        The one streaming path over dumps (``pkd analyze``/``pkd fit`` and the
        Dask workers run the same chunk loop, :mod:`pkd._streaming`).

        Parameters
        ----------
        student, teacher : pkd.io.Dump
            Dumps of the same inputs (same leading shape).
        chunk_rows : int
            Rows read and accumulated at a time (one chunk of every layer in memory).
        mask : "auto", array_like or None
            ``"auto"``: the teacher dump's attention mask if it has one, else the
            student's; both present and different is an error. An array of the
            dumps' leading shape, or None (every row counts).
        tokens : {"all", "cls"} or int
            For 3-D dumps: every position, the first position the mask keeps in
            each sequence ("cls"; position 0 without a mask), or one position.
        folds : int, optional
            As in ``__init__``; for 3-D dumps whole sequences go to one fold.
        progress : bool
            A tqdm bar over the rows (on stderr).
        """
        from ._streaming import check_dumps, resolve_mask, stream_dumps

        check_dumps(student, teacher)
        flat_mask = resolve_mask(student, teacher, mask, tokens)
        stats = cls(chunk_rows=chunk_rows, folds=folds)
        stream_dumps(stats, student, teacher, flat_mask, 0, student.n_rows,
                     progress=check_bool(progress, "progress"))
        return stats

    @classmethod
    def from_dask(cls, student_layers, teacher_layers, mask=None, *,
                  chunk_rows: int = DEFAULT_CHUNK_ROWS, split_every: int = 4,
                  scheduler=None, folds: int | None = None) -> AlignmentStats:
        """Statistics of hidden states held in dask arrays, computed on a Dask scheduler.

        Each row block (whole sequences for 3-D input) gets its statistics in
        its own task; they are merged in a tree of fixed fan-in, in row order,
        so the result does not depend on the scheduler. See :mod:`pkd._dask`
        for the parameters (``scheduler``: None, a name, a Client or an
        address; ``mask``: numpy or dask 0/1). Needs the ``pkd[dask]`` extra.
        """
        from ._dask import from_dask

        data = from_dask(student_layers, teacher_layers, mask, chunk_rows=chunk_rows,
                         split_every=split_every, scheduler=scheduler, folds=folds)
        return cls.from_dict(data, chunk_rows=chunk_rows)

    @classmethod
    def from_dumps_dask(cls, student, teacher, *, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                        scheduler=None, mask="auto", tokens="all", task_rows: int | None = None,
                        split_every: int = 4, folds: int | None = None) -> AlignmentStats:
        """:meth:`from_dumps` with the dumps read by Dask workers (``pkd analyze --scheduler``).

        Only paths, row ranges and mask slices travel; each task runs the chunk
        loop of :meth:`from_dumps` on its ``task_rows`` rows. The dumps
        (``.safetensors``) must be readable under the same absolute path on every
        worker. ``mask`` and ``tokens`` as in :meth:`from_dumps` (the dumps' own
        masks by default). Needs ``pkd[dask]``.
        """
        from ._dask import from_dumps

        data = from_dumps(student, teacher, chunk_rows=chunk_rows, scheduler=scheduler,
                          mask=mask, tokens=tokens, task_rows=task_rows,
                          split_every=split_every, folds=folds)
        return cls.from_dict(data, chunk_rows=chunk_rows)

    # ------------------------------------------------------------------ combining

    def copy(self) -> AlignmentStats:
        """An independent copy (the scratch buffers are not copied)."""
        other = AlignmentStats(chunk_rows=self._chunk_rows, folds=self.n_folds)
        other._layout, other._examples = self._layout, self._examples
        other._folds = [m.copy() for m in self._folds]
        other._dtypes = {side: list(v) for side, v in self._dtypes.items()}
        return other

    def merge(self, other: AlignmentStats) -> AlignmentStats:
        """Statistics of the union of two disjoint row sets (fold by fold), as a new object.

        Raises TypeError for a non-AlignmentStats, ValueError for different
        layers or numbers of folds.
        """
        if not isinstance(other, AlignmentStats):
            raise TypeError(
                f"can only merge AlignmentStats with AlignmentStats, got {type(other).__name__}"
            )
        if self._n_folds != other._n_folds:
            raise ValueError(
                f"cannot merge statistics with folds={self.n_folds} and folds={other.n_folds}: "
                "accumulate both with the same folds"
            )
        if self._layout is not None and other._layout is not None:
            _accumulate.check_same_layers(self, other)
        if other._layout is None or other.n_rows == 0:
            return self.copy()
        if self._layout is None or self.n_rows == 0:
            merged = other.copy()
            merged._chunk_rows = self._chunk_rows
            return merged
        merged = AlignmentStats(chunk_rows=self._chunk_rows, folds=self.n_folds)
        merged._layout = self._layout
        merged._folds = _moments.merge_folds(self._folds, other._folds)
        merged._examples = max(self._examples, other._examples)
        merged._dtypes = {side: list(map(_accumulate.coarser, self._dtypes[side],
                                         other._dtypes[side])) for side in _SIDES}
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

    def _total(self) -> _moments.Moments:
        """The moments of all folds (their merge; all folds share one shift)."""
        if len(self._folds) == 1:
            return self._folds[0]
        if self._total_cache is None:
            total = self._folds[0].copy()
            for moments in self._folds[1:]:
                total.add(moments)
            self._total_cache = total
        return self._total_cache

    # ------------------------------------------------------------------ plain arrays

    def to_dict(self) -> dict[str, np.ndarray]:
        """The statistics as a dict of plain numpy arrays (``np.savez``-ready; format in
        :mod:`pkd._serial`); :meth:`from_dict` reads them back."""
        if self._layout is None:
            raise ValueError(
                "these statistics have no layers yet (no widths given, no update): "
                "nothing to export"
            )
        from ._serial import pack

        return pack(self._layout, self._folds, self._dtypes, _FORMAT_VERSION,
                    folds_k=self.n_folds or 0, examples=self._examples)

    @classmethod
    def from_dict(cls, data: Mapping, *, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> AlignmentStats:
        """Rebuild statistics from :meth:`to_dict`'s arrays (a dict or an ``np.load`` file);
        ValueError on a missing key, an unknown format or a wrong shape."""
        from ._serial import unpack

        layout, folds, dtypes, n_folds, examples = unpack(data, _FORMAT_VERSION,
                                                          _accumulate.check_widths)
        stats = cls(chunk_rows=chunk_rows, folds=n_folds or None)
        stats._layout, stats._folds, stats._examples = layout, folds, examples
        stats._dtypes = dtypes
        return stats

    # ------------------------------------------------------------------ statistics

    def _require_rows(self) -> None:
        if self.n_rows == 0:
            raise ValueError(
                "these statistics hold no rows yet: call update() (or build them with "
                "AlignmentStats.from_arrays / from_chunks / from_dumps) first"
            )

    def _student_index(self, s) -> int:
        self._require_rows()
        return check_layer_index(s, self.n_student, "s", "student")

    def _teacher_index(self, t) -> int:
        self._require_rows()
        return check_layer_index(t, self.n_teacher, "t", "teacher")

    def _cutoffs(self, cutoff) -> list[float]:
        """The cutoff per student layer: given, or the default of the layer's dtype."""
        if cutoff is not None:
            return [check_cutoff(cutoff)] * self.n_student
        return [default_cutoff(d or np.float32) for d in self._dtypes["student"]]

    def student_gram(self, s: int, *, centered: bool = False) -> np.ndarray:
        """``G_s = Sᵀ W S`` (or ``Ĝ_s = G_s − a_s a_sᵀ/n_w``), shape (d_s, d_s), float64."""
        return self._total().gram_of("student", self._student_index(s), centered)

    def teacher_gram(self, t: int, *, centered: bool = False) -> np.ndarray:
        """``H_t = Tᵀ W T`` (or ``Ĥ_t = H_t − b_t b_tᵀ/n_w``), shape (d_t, d_t), float64."""
        return self._total().gram_of("teacher", self._teacher_index(t), centered)

    def cross_gram(self, s: int, t: int, *, centered: bool = False) -> np.ndarray:
        """``C_st = Sᵀ W T`` (or ``Ĉ_st = C_st − a_s b_tᵀ/n_w``), shape (d_s, d_t), float64."""
        s, t = self._student_index(s), self._teacher_index(t)
        return self._total().cross_rows(s, centered)[:, self._layout.block("teacher", t)]

    def student_sum(self, s: int) -> np.ndarray:
        """``a_s = Sᵀ w``, shape (d_s,), float64."""
        return self._total().sum_of("student", self._student_index(s))

    def teacher_sum(self, t: int) -> np.ndarray:
        """``b_t = Tᵀ w``, shape (d_t,), float64."""
        return self._total().sum_of("teacher", self._teacher_index(t))

    def teacher_sq_norm(self, t: int) -> float:
        """``q_t = Σ_i w_i ‖t_i‖²``."""
        return float(self._total().teacher_sq_norms()[self._teacher_index(t)])

    def teacher_variance(self) -> np.ndarray:
        """``var_t = (q_t − ‖b_t‖²/n_w) / (n_w d_t)``, the mean per-dimension variance: (n_t,)."""
        self._require_rows()
        return _estimates.teacher_variance(self._total())

    def _residuals(self, ridge, cutoff, heldout: bool):
        """Residual sums ``(n_s, n_t)`` (in-sample) or ``(k, n_s, n_t)`` with the test rows."""
        ridge = check_nonnegative(ridge, "ridge")
        cutoffs = self._cutoffs(cutoff)
        self._require_rows()
        if heldout:
            _accumulate.check_heldout(self._n_folds, self.fold_rows, self._examples)
        key = (ridge, tuple(cutoffs), heldout)  # min_mse and relative_min_mse share the work
        if key not in self._residual_cache:
            self._residual_cache[key] = _estimates.residuals(
                self._total(), self._folds if heldout else None, ridge, cutoffs)
        return self._residual_cache[key].copy()

    def min_mse(self, ridge: float = 0.0, *, cutoff: float | None = None,
                heldout: bool = False):
        """The smallest MSE a linear projection reaches, for every layer pair.

        ``min_mse[s, t] = Σ_i w_i ‖P*ᵀ s_i − t_i‖² / (n_w d_t)`` with ``P*`` the
        closed form of :meth:`projection` (``docs/numerics.md``).

        Parameters
        ----------
        ridge : float
            ``ρ ≥ 0``: with ``ρ > 0`` the (unpenalised) MSE of ``(G_s + ρ I)⁻¹ C_st``.
        cutoff : float, optional
            Relative singular-value cutoff for ``ridge = 0``; default by the
            student layer's dtype (:func:`pkd.closed_form.default_cutoff`).
        heldout : bool
            Fit on ``k − 1`` folds, score on the remaining one (needs ``folds``).

        Returns
        -------
        ndarray (n_s, n_t) float64, or FoldEstimate of two such arrays if ``heldout``
        """
        residuals = self._residuals(ridge, cutoff, check_bool(heldout, "heldout"))
        widths = np.asarray(self.teacher_widths, dtype=np.float64)
        if not heldout:
            return np.maximum(residuals, 0.0) / (self.n_rows * widths)
        rows = np.asarray(self.fold_rows, dtype=np.float64)[:, None, None]
        mse = np.maximum(residuals, 0.0) / (rows * widths)
        return FoldEstimate(mse.mean(axis=0), mse.std(axis=0, ddof=1))

    def relative_min_mse(self, ridge: float = 0.0, *, cutoff: float | None = None,
                         heldout: bool = False, constant: str = "nan"):
        """``min_mse / var_t``: the fraction of each teacher layer's variance no
        projection explains (``1 − R²``), comparable across teacher layers.

        ``var_t`` is centred but a projection has no intercept, so a teacher mean
        that no ``Pᵀ s`` reaches counts as unexplained (the value can exceed 1).
        Held out, each fold is normalised by its own teacher variance. In-sample
        values with few rows (≤ the student width) are ~0 whatever the data:
        use ``heldout=True`` there.

        Parameters
        ----------
        ridge, cutoff, heldout
            As in :meth:`min_mse`.
        constant : {"nan", "raise"}
            A constant teacher layer (variance 0) has no relative loss: NaN
            there (which :func:`pkd.mapping.optimal` refuses), or a ValueError.

        Returns
        -------
        ndarray (n_s, n_t) float64, or FoldEstimate if ``heldout``
        """
        constant = _accumulate.check_constant(constant)
        residuals = self._residuals(ridge, cutoff, check_bool(heldout, "heldout"))
        if not heldout:
            return _estimates.relative(self._total(), residuals, constant, "relative_min_mse")
        values = np.stack([_estimates.relative(m, residuals[f], constant,
                                               f"fold {f} of {self._n_folds}")
                           for f, m in enumerate(self._folds)])
        return FoldEstimate(values.mean(axis=0), values.std(axis=0, ddof=1))

    def cka(self, debiased: bool = False, *, constant: str = "nan") -> np.ndarray:
        """Linear CKA of every pair: ``‖Ĉ_st‖_F² / (‖Ĝ_s‖_F ‖Ĥ_t‖_F)``, (n_s, n_t).

        ``debiased=True``: the unbiased HSIC estimator (Song et al. 2012, as in
        Kornblith et al. 2019) in place of each squared norm, from the same
        statistics (``docs/numerics.md``); needs at least 4 rows. Computed in
        shifted coordinates, so layers whose mean dwarfs their spread keep
        their digits. A constant layer (or a debiased norm estimate ≤ 0) gives
        NaN in its row/column, or a ValueError with ``constant="raise"``.
        """
        constant = _accumulate.check_constant(constant)
        self._require_rows()
        if check_bool(debiased, "debiased") and self.n_rows < 4:
            raise ValueError(
                f"debiased CKA needs at least 4 rows (its estimator divides by n − 3), these "
                f"statistics hold {self.n_rows}"
            )
        return _estimates.linear_cka(self._total(), debiased, constant)

    def projection(self, s: int, t: int, ridge: float = 0.0, *,
                   cutoff: float | None = None) -> np.ndarray:
        """Closed-form projection ``P*`` (d_s, d_t) for the pair ``(s, t)``, float64.

        ``ridge = 0``: the minimum-norm least-squares solution on the directions
        above ``cutoff · σ₁`` (:mod:`pkd.closed_form`); ``ridge = ρ > 0``:
        ``(G_s + ρ I)⁻¹ C_st``. Negative indices do not wrap.
        """
        ridge = check_nonnegative(ridge, "ridge")
        s, t = self._student_index(s), self._teacher_index(t)
        m = self._total()
        solver = Solver(m.gram_of("student", s, False), ridge, self._cutoffs(cutoff)[s])
        return solver.solve(m.cross_rows(s, False)[:, self._layout.block("teacher", t)])

    def pair_loss(self, s: int, t: int, projection) -> float:
        """Exact MSE ``Σ_i w_i ‖Pᵀ s_i − t_i‖² / (n_w d_t)`` of a given (d_s, d_t) projection.

        Computed from the statistics in shifted coordinates (no pass over the
        rows, no cancellation of large means); clipped at 0.
        """
        s, t = self._student_index(s), self._teacher_index(t)
        d_s, d_t = self.student_widths[s], self.teacher_widths[t]
        P = check_projection(projection, d_s, d_t, "projection", pair=(s, t))
        total = _estimates.residual_sum(self._total(), s, t, P.astype(np.float64, copy=False))
        return max(float(total), 0.0) / (self.n_rows * d_t)
