"""Shifted moments of one row set: the additive statistics behind :class:`pkd.AlignmentStats`.

For rows shifted by a fixed vector ``c`` per layer (``x' = x − c``), with 0/1
row weights ``w`` and ``r_i = ‖x'_i‖²`` the squared norm of a row within its
layer, :class:`Moments` keeps in float64

* second order: ``n = Σ w``, ``a' = Σ w x'`` (every layer, concatenated),
  ``G'_l = Σ w x'_l x'_lᵀ`` per layer (upper triangle valid), and
  ``C' = Σ w x'_S x'_Tᵀ`` for every student × teacher column;
* fourth order (debiased CKA): ``U_st = Σ w r^s r^t``, ``Q_l = Σ w (r^l)²``,
  ``V_s→T = Σ w r^s y'`` (every teacher column), ``V_t→S = Σ w r^t x'`` and
  ``V_l = Σ w r^l x'_l`` (a layer's own columns).

A shift change ``c → c − δ`` (rows ``x' + δ``) maps every statistic to the
same statistic of the new rows; :func:`shifted_product` is the second-order
formula, :meth:`Moments.quartic_at` the fourth-order one. Both are written
once and used for un-shifting (``δ = c``), centring (``δ = −a'/n``) and merging
(moving two row sets to their combined mean before adding).
"""

from __future__ import annotations

import numpy as np


def symmetric(upper: np.ndarray) -> np.ndarray:
    """The full symmetric matrix whose upper triangle (diagonal included) is ``upper``'s."""
    return np.triu(upper) + np.triu(upper, 1).T


def shifted_product(product, sum_x, sum_y, delta_x, delta_y, n: float) -> np.ndarray:
    """``Σ w (x' + δx)(y' + δy)ᵀ`` from ``Σ w x' y'ᵀ`` and the sums ``Σ w x'``, ``Σ w y'``.

    The one un-shift formula: ``δ = c`` gives the uncentred statistic,
    ``δ = −a'/n`` the centred one, ``δ = c_old − c_new`` a re-shift. Computed as
    ``product + a'_x δyᵀ + δx (a'_y + n δy)ᵀ`` with in-place rank-1 updates.
    """
    from scipy.linalg import blas

    out = np.array(product, dtype=np.float64, order="F")  # a copy; dger updates it in place
    tail = sum_y + n * delta_y  # zero when centring: that update is skipped
    out = blas.dger(1.0, np.asarray(sum_x, dtype=np.float64), delta_y, a=out, overwrite_a=True)
    if tail.any():
        out = blas.dger(1.0, delta_x, tail, a=out, overwrite_a=True)
    return out


class Layout:
    """Widths and column offsets of the student and teacher layers (concatenated features)."""

    def __init__(self, student_widths: tuple[int, ...], teacher_widths: tuple[int, ...]):
        self.widths = {"student": tuple(student_widths), "teacher": tuple(teacher_widths)}
        self.offsets = {
            side: np.concatenate([[0], np.cumsum(w)]).astype(np.int64)
            for side, w in self.widths.items()
        }
        self.total = {side: int(o[-1]) for side, o in self.offsets.items()}

    def block(self, side: str, index: int) -> slice:
        offsets = self.offsets[side]
        return slice(int(offsets[index]), int(offsets[index + 1]))

    def count(self, side: str) -> int:
        return len(self.widths[side])

    def reduce(self, side: str, values: np.ndarray) -> np.ndarray:
        """Sum ``values`` (..., Σd) over each layer's columns: (..., n_layers)."""
        return np.add.reduceat(values, self.offsets[side][:-1], axis=-1)


_SIDES = ("student", "teacher")
# Chunks whose cross product has at least this many multiply-adds (about a millisecond of
# GEMM on one core) are split into tasks for pkd's threads: below it, the tasks' calls cost
# more than they save. The cross product's blocks of student columns are a fixed number, so
# that the sums (and their bits) do not depend on the thread count.
TASK_MIN_WORK = 1 << 26
CROSS_BLOCKS = 4


class Moments:
    """The shifted moments of one row set (see the module docstring)."""

    def __init__(self, layout: Layout, shift: dict[str, np.ndarray]):
        self.layout = layout
        self.n = 0
        self.shift = {side: shift[side].copy() for side in _SIDES}
        self.sum = {side: np.zeros(layout.total[side]) for side in _SIDES}
        # Fortran order so that scipy's dsyrk/dgemm accumulate in place (beta = 1).
        self.gram = {side: [np.zeros((d, d), order="F") for d in layout.widths[side]]
                     for side in _SIDES}
        # C' in C order: its transpose is the Fortran array dgemm updates.
        self.cross = np.zeros((layout.total["student"], layout.total["teacher"]))
        n_s, n_t = layout.count("student"), layout.count("teacher")
        self.quartic_cross = np.zeros((n_s, n_t))
        self.quartic = {side: np.zeros(layout.count(side)) for side in _SIDES}
        self.cubic_cross = {"student": np.zeros((n_s, layout.total["teacher"])),
                            "teacher": np.zeros((n_t, layout.total["student"]))}
        self.cubic = {side: np.zeros(layout.total[side]) for side in _SIDES}

    # ------------------------------------------------------------------ accumulation

    def add_chunk(self, xs: np.ndarray, xt: np.ndarray, sums: tuple[np.ndarray, np.ndarray],
                  squares: tuple[np.ndarray, np.ndarray], threads: int = 1) -> None:
        """Add ``m`` shifted rows: ``xs`` (m, Σd_s) and ``xt`` (m, Σd_t), Fortran order.

        ``sums``: the chunk's column sums (Σd_s,) and (Σd_t,); ``squares``: each
        layer's squared row norms ``‖x'_i‖²``, (m, n_s) and (m, n_t) Fortran (both
        computed by the fill kernel).

        A chunk whose cross product has fewer than ``TASK_MIN_WORK`` multiply-adds
        takes one BLAS call per product; a larger one is split into tasks on
        ``threads`` threads (:meth:`_add_products_as_tasks`). The split depends on the
        chunk's size only, so the bits do not depend on ``threads``.
        """
        from scipy.linalg import blas

        # The first chunk writes G' and C' without reading them: their zeros are untouched
        # pages, and a read then a write would fault each page twice (docs/performance.md).
        beta = 1.0 if self.n else 0.0
        if xs.shape[0] * xs.shape[1] * xt.shape[1] >= TASK_MIN_WORK:
            self._add_products_as_tasks(xs, xt, squares, beta, threads)
        else:
            # Whole-array calls: a task's call through ctypes costs more than a small product.
            layout = self.layout
            for side, x, norms in (("student", xs, squares[0]), ("teacher", xt, squares[1])):
                grams = self.gram[side]
                for k in range(len(grams)):
                    block = x[:, layout.block(side, k)]  # Fortran-contiguous (m, d)
                    grams[k] = blas.dsyrk(1.0, block, beta=beta, c=grams[k], trans=1,
                                          overwrite_c=True)
                    self.cubic[side][layout.block(side, k)] += blas.dgemv(
                        1.0, block, norms[:, k], trans=1)
            self.cross = blas.dgemm(1.0, xt, xs, beta=beta, c=self.cross.T, trans_a=True,
                                    overwrite_c=True).T
            self.cubic_cross["student"] += blas.dgemm(1.0, squares[0], xt, trans_a=True)
            self.cubic_cross["teacher"] += blas.dgemm(1.0, squares[1], xs, trans_a=True)
        for side, norms in zip(_SIDES, squares, strict=True):
            self.quartic[side] += np.einsum("ij,ij->j", norms, norms)
        self.quartic_cross += blas.dgemm(1.0, squares[0], squares[1], trans_a=True)
        self.sum["student"] += sums[0]
        self.sum["teacher"] += sums[1]
        self.n += xs.shape[0]

    def _add_products_as_tasks(self, xs: np.ndarray, xt: np.ndarray,
                               squares: tuple[np.ndarray, np.ndarray], beta: float,
                               threads: int) -> None:
        """The second- and third-order products of :meth:`add_chunk` as tasks.

        The cross product in ``CROSS_BLOCKS`` blocks of student columns, and each
        layer's Gram matrix with its third-order sums, on ``threads`` threads
        (:func:`pkd._threads.on_threads`; with several, the caller holds BLAS to one).
        Every task writes its own block, in place, through :mod:`pkd._blas`.
        """
        from ._blas import gemm_tn, syrk_t
        from ._threads import on_threads

        layout = self.layout
        cross_t = self.cross.T  # C'ᵀ (Σd_t, Σd_s), Fortran: C'ᵀ += X_Tᵀ X_S in place
        x = {"student": xs, "teacher": xt}
        norms = {"student": squares[0], "teacher": squares[1]}

        def task(item: tuple[str, int | slice]) -> None:
            side, where = item
            if side == "cross":
                gemm_tn(xt, xs[:, where], cross_t[:, where], beta)
                return
            other = "teacher" if side == "student" else "student"
            columns = layout.block(side, where)
            block = x[side][:, columns]  # Fortran-contiguous (m, d)
            syrk_t(block, self.gram[side][where], beta)
            # V_l += X_lᵀ r^l and V_{other→side}ᵀ += X_lᵀ r^other, in place.
            own = self.cubic[side][columns].reshape((-1, 1), order="F")
            gemm_tn(block, norms[side][:, where:where + 1], own, 1.0)
            gemm_tn(block, norms[other], self.cubic_cross[other].T[columns], 1.0)

        # Largest first, so that the threads finish together.
        blocks = [("cross", slice(int(c[0]), int(c[-1]) + 1)) for c in
                  np.array_split(np.arange(layout.total["student"]), CROSS_BLOCKS) if c.size]
        layers = [(side, k) for side in ("teacher", "student") for k in range(layout.count(side))]
        on_threads(blocks + layers, task, threads)

    # ------------------------------------------------------------------ shifts

    def quartic_at(self, delta: dict[str, np.ndarray]):
        """``(U, Q_student, Q_teacher)`` of the rows ``x' + δ`` (the fourth-order shift formula).

        With ``p^l = x'_l·δ_l``, ``α_l = Σ w p^l = a'_l·δ_l``, ``e_l = ‖δ_l‖²`` and
        ``R_l = tr G'_l``: ``r̃ = r + 2p + e`` and the sums of its products expand
        into statistics of the current rows (see ``docs/numerics.md``).
        """
        layout, n = self.layout, float(self.n)
        per_layer = {}
        for side in _SIDES:
            d = delta[side]
            alpha = layout.reduce(side, self.sum[side] * d)
            energy = layout.reduce(side, d * d)
            trace = np.array([np.trace(g) for g in self.gram[side]])
            quad = np.array([d[layout.block(side, k)] @ symmetric(g) @ d[layout.block(side, k)]
                             for k, g in enumerate(self.gram[side])])
            own = layout.reduce(side, self.cubic[side] * d)
            per_layer[side] = (alpha, energy, trace, quad, own)
        quartic = {}
        for side in _SIDES:
            alpha, energy, trace, quad, own = per_layer[side]
            quartic[side] = (self.quartic[side] + 4.0 * own + 2.0 * energy * trace
                             + 4.0 * quad + 4.0 * energy * alpha + n * energy**2)
        a_s, e_s, r_s = per_layer["student"][:3]
        a_t, e_t, r_t = per_layer["teacher"][:3]
        d_s, d_t = delta["student"], delta["teacher"]
        s_on_t = layout.reduce("teacher", self.cubic_cross["student"] * d_t)  # Σ r^s p^t
        t_on_s = layout.reduce("student", self.cubic_cross["teacher"] * d_s).T  # Σ p^s r^t
        # δ_sᵀ C'_st δ_t: one pass over C' (a GEMV per student layer).
        both = np.stack([layout.reduce("teacher", (d_s[layout.block("student", k)]
                                                    @ self.cross[layout.block("student", k)])
                                       * d_t) for k in range(layout.count("student"))])
        u = (self.quartic_cross + 2.0 * s_on_t + 2.0 * t_on_s + 4.0 * both
             + np.outer(r_s + 2.0 * a_s, e_t) + np.outer(e_s, r_t + 2.0 * a_t)
             + n * np.outer(e_s, e_t))
        return u, quartic["student"], quartic["teacher"]

    def reshift(self, shift: dict[str, np.ndarray]) -> None:
        """Re-express the moments (in place) for rows shifted by the new vectors."""
        layout, n = self.layout, float(self.n)
        delta = {side: self.shift[side] - shift[side] for side in _SIDES}  # x − new = x' + δ
        u, q_s, q_t = self.quartic_at(delta)
        # Third order first: it reads the old second-order statistics.
        trace = {side: np.array([np.trace(g) for g in self.gram[side]]) for side in _SIDES}
        alpha = {side: layout.reduce(side, self.sum[side] * delta[side]) for side in _SIDES}
        energy = {side: layout.reduce(side, delta[side] ** 2) for side in _SIDES}
        for side, other, cross in (("student", "teacher", self.cross),
                                   ("teacher", "student", self.cross.T)):
            d, d_other = delta[side], delta[other]
            # Σ r̃^l (x'_m + δ_m) for every layer l of `side` and column of `other`.
            projected = np.stack([d[layout.block(side, k)] @ cross[layout.block(side, k)]
                                  for k in range(layout.count(side))])
            self.cubic_cross[side] += (np.outer(trace[side] + 2 * alpha[side] + n * energy[side],
                                                d_other)
                                       + 2.0 * projected + np.outer(energy[side],
                                                                    self.sum[other]))
            for k, g in enumerate(self.gram[side]):
                block = layout.block(side, k)
                self.cubic[side][block] += (
                    (trace[side][k] + 2 * alpha[side][k] + n * energy[side][k]) * d[block]
                    + 2.0 * symmetric(g) @ d[block] + energy[side][k] * self.sum[side][block])
        # C order, whatever NumPy made of the mixed layouts: add_chunk writes its transpose.
        self.quartic_cross = np.ascontiguousarray(u)
        self.quartic["student"], self.quartic["teacher"] = q_s, q_t
        for side in _SIDES:
            for k, g in enumerate(self.gram[side]):
                block = layout.block(side, k)
                a, d = self.sum[side][block], delta[side][block]
                self.gram[side][k] = np.asfortranarray(shifted_product(symmetric(g), a, a, d, d, n))
        # Through C'ᵀ (Fortran), so that C' stays in C order: add_chunk writes its transpose.
        self.cross = shifted_product(self.cross.T, self.sum["teacher"], self.sum["student"],
                                     delta["teacher"], delta["student"], n).T
        for side in _SIDES:
            self.sum[side] += n * delta[side]
            self.shift[side] = shift[side].copy()

    # ------------------------------------------------------------------ combining

    def copy(self) -> Moments:
        other = Moments.__new__(Moments)
        other.layout, other.n = self.layout, self.n
        for name in ("shift", "sum", "quartic", "cubic", "cubic_cross"):
            setattr(other, name, {k: v.copy() for k, v in getattr(self, name).items()})
        other.gram = {side: [g.copy(order="F") for g in self.gram[side]] for side in _SIDES}
        other.cross = self.cross.copy()
        other.quartic_cross = self.quartic_cross.copy()
        return other

    def same_shift(self, other: Moments) -> bool:
        return all(np.array_equal(self.shift[s], other.shift[s]) for s in _SIDES)

    def add(self, other: Moments, sign: float = 1.0) -> None:
        """Add (``sign = -1``: subtract) moments with the same shift, in place."""
        if sign not in (1.0, -1.0):
            raise ValueError(f"sign must be 1 or -1, got {sign}")
        # In place, without a temporary: C' alone is Σd_s·Σd_t values.
        combine = np.add if sign > 0 else np.subtract
        self.n += int(sign) * other.n
        for name in ("sum", "quartic", "cubic", "cubic_cross"):
            mine, theirs = getattr(self, name), getattr(other, name)
            for key in mine:
                combine(mine[key], theirs[key], out=mine[key])
        for side in _SIDES:
            for mine, theirs in zip(self.gram[side], other.gram[side], strict=True):
                combine(mine, theirs, out=mine)
        combine(self.cross, other.cross, out=self.cross)
        combine(self.quartic_cross, other.quartic_cross, out=self.quartic_cross)

    def mean(self) -> dict[str, np.ndarray]:
        """The column means of the rows (unshifted), every layer concatenated."""
        return {side: self.shift[side] + self.sum[side] / self.n for side in _SIDES}

    # ------------------------------------------------------------------ getters

    def gram_of(self, side: str, index: int, centered: bool) -> np.ndarray:
        """``G_l`` (``centered``: ``Ĝ_l``) of one layer, full symmetric, float64."""
        block = self.layout.block(side, index)
        a, n = self.sum[side][block], float(self.n)
        delta = -a / n if centered else self.shift[side][block]
        return shifted_product(symmetric(self.gram[side][index]), a, a, delta, delta, n)

    def cross_rows(self, s: int, centered: bool) -> np.ndarray:
        """``C_s·`` (``centered``: ``Ĉ_s·``): student layer ``s`` × every teacher column."""
        block = self.layout.block("student", s)
        n = float(self.n)
        a, b = self.sum["student"][block], self.sum["teacher"]
        if centered:
            return shifted_product(self.cross[block], a, b, -a / n, -b / n, n)
        return shifted_product(self.cross[block], a, b, self.shift["student"][block],
                               self.shift["teacher"], n)

    def sum_of(self, side: str, index: int) -> np.ndarray:
        """The unshifted sum ``Σ w x`` of one layer."""
        block = self.layout.block(side, index)
        return self.sum[side][block] + self.n * self.shift[side][block]

    def teacher_traces(self) -> np.ndarray:
        """``tr H'_t`` for every teacher layer (shifted): (n_t,)."""
        return np.array([np.trace(g) for g in self.gram["teacher"]])

    def teacher_sq_norms(self) -> np.ndarray:
        """``q_t = Σ w ‖t‖² = tr(H'_t) + 2 c_t·b'_t + n ‖c_t‖²`` for every teacher layer."""
        c, b, n = self.shift["teacher"], self.sum["teacher"], float(self.n)
        return self.teacher_traces() + self.layout.reduce("teacher", 2.0 * c * b + n * c * c)

    def centred_traces(self, side: str) -> np.ndarray:
        """``tr Ĝ_l = tr G'_l − ‖a'_l‖²/n`` (shift invariant, so no cancellation): (n_l,)."""
        traces = np.array([np.trace(g) for g in self.gram[side]])
        return traces - self.layout.reduce(side, self.sum[side] ** 2) / self.n


def merge_folds(first: list[Moments], second: list[Moments]) -> list[Moments]:
    """Fold-wise sums of two lists of moments (each list sharing one shift), as new moments.

    Different shifts are first moved to the combined mean (no cancellation,
    whatever the two shifts: Chan et al.'s pairwise update).
    """
    merged, addend = [m.copy() for m in first], second
    if not first[0].same_shift(second[0]):
        n_a, n_b = float(sum(m.n for m in first)), float(sum(m.n for m in second))
        mean = {}
        for side in _SIDES:
            sums = [sum(m.sum[side] for m in ms) + n * ms[0].shift[side]
                    for ms, n in ((first, n_a), (second, n_b))]
            mean[side] = (sums[0] + sums[1]) / (n_a + n_b)
        addend = [m.copy() for m in second]
        for moments in merged + addend:
            moments.reshift(mean)
    for mine, theirs in zip(merged, addend, strict=True):
        mine.add(theirs)
    return merged
