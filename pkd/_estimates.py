"""The best-reachable loss and CKA from shifted moments: in-sample, held out, debiased.

Functions of :class:`pkd._moments.Moments` used by the queries of
:class:`pkd.alignment.AlignmentStats`; the algebra is written out in
``docs/numerics.md``.
"""

from __future__ import annotations

import numpy as np

from ._moments import Moments, shifted_product, symmetric
from .closed_form import Solver

# min_mse recomputes pairs whose best residual is below this fraction of q_t (the
# subtraction q_t − explained would keep fewer than ~10 of float64's 16 digits).
NEAR_EXACT_FIT = 1e-6
# Entries of C' from which its centring pass runs on Numba's threads (when it has more
# than one); the result is the same either way.
PARALLEL_MIN_ENTRIES = 1 << 17


def basis_times_cross(m: Moments, solver: Solver, s: int, scratch: np.ndarray | None = None,
                      columns: slice = slice(None)) -> np.ndarray:
    """``Bᵀ C_s·`` for the teacher ``columns`` (default all), (rank, n_columns), from the
    shifted ``C'_s·``.

    ``scratch``: a flat float64 buffer of at least ``d_s · n_columns`` values to work in
    (the result is a view of it), or None for new memory.
    """
    block = m.layout.block("student", s)
    cross = m.cross[block, columns]
    shape = cross.shape[::-1]
    cross_t = (np.empty(shape, order="F") if scratch is None
               else scratch[: shape[0] * shape[1]].reshape(shape, order="F"))
    np.copyto(cross_t, cross.T)
    product = cross_times_basis(cross_t, solver, m.sum["student"][block],
                                m.sum["teacher"][columns], float(m.n),
                                m.shift["student"][block], m.shift["teacher"][columns])
    return product.T


def cross_times_basis(cross_t: np.ndarray, solver: Solver, a: np.ndarray, b: np.ndarray,
                      n: float, c_s: np.ndarray, c_t: np.ndarray) -> np.ndarray:
    """``(Bᵀ C)ᵀ`` (Σd_t, rank) from ``C'ᵀ`` (Σd_t, d), Fortran, whose memory it reuses.

    ``C = C' + a' c_tᵀ + c_s (b' + n c_t)ᵀ`` with ``a'``, ``b'`` the shifted sums of
    the ``n`` rows: the rank-2 part is added after the product, where its terms are
    the basis's size (before it, the shift terms would round ``Bᵀ C'``).
    """
    from ._blas import gemm_tn

    product = times_basis(cross_t, solver)
    right = np.asfortranarray(np.vstack([c_t, b + n * c_t]))  # (2, Σd_t)
    left = solver.basis.T @ np.column_stack([a, c_s])  # (rank, 2)
    # In place (one pass over the product), and releasing the GIL like the product itself.
    return gemm_tn(right, left.T, product, 1.0)


def times_basis(product_t: np.ndarray, solver: Solver) -> np.ndarray:
    """``(Bᵀ X)ᵀ`` for ``Xᵀ`` (Σd_t, d), Fortran: (Σd_t, rank), in ``product_t``'s memory
    when the basis is triangular. Both products release the GIL (pkd's threads)."""
    from ._blas import trmm_right

    if solver.upper is None:
        out = np.empty((product_t.shape[0], solver.rank), order="F")
        return np.matmul(product_t, solver.basis, out=out)
    # B = Uᵀ[:, :rank] with U upper triangular: Xᵀ Uᵀ, whose columns past the rank are 0.
    return trmm_right(product_t, solver.upper, upper=True, transpose=True)[:, : solver.rank]


def residual_sum(m: Moments, s: int, t: int, P: np.ndarray) -> float:
    """``Σ_i w_i ‖Pᵀ s_i − t_i‖²`` in shifted coordinates (no cancellation of large means).

    With ``δ = c_t − Pᵀ c_s``: ``q' − 2 tr(Pᵀ C') + tr(Pᵀ G' P) + 2 δ·(b' − Pᵀ a') + n ‖δ‖²``.
    """
    layout = m.layout
    block_s, block_t = layout.block("student", s), layout.block("teacher", t)
    gram = symmetric(m.gram["student"][s])
    a, b = m.sum["student"][block_s], m.sum["teacher"][block_t]
    delta = m.shift["teacher"][block_t] - P.T @ m.shift["student"][block_s]
    return float(np.trace(m.gram["teacher"][t]) - 2.0 * np.vdot(P, m.cross[block_s, block_t])
                 + np.vdot(P, gram @ P) + 2.0 * (delta @ (b - P.T @ a))
                 + m.n * (delta @ delta))


def min_residuals(m: Moments, s: int, solver: Solver, scratch: np.ndarray | None = None,
                  teachers: range | None = None) -> np.ndarray:
    """Smallest ``Σ w ‖Pᵀ s − t‖²`` of student layer ``s`` for each teacher layer of
    ``teachers`` (default all, a range): (len(teachers),).

    ``scratch`` as in :func:`basis_times_cross`.
    """
    layout = m.layout
    teachers = range(layout.count("teacher")) if teachers is None else teachers
    q = m.teacher_sq_norms()[teachers.start:teachers.stop]
    if solver.rank == 0:  # an all-zero layer explains nothing
        return q.copy()
    offsets = layout.offsets["teacher"][teachers.start:teachers.stop + 1]
    z = basis_times_cross(m, solver, s, scratch, slice(int(offsets[0]), int(offsets[-1])))
    explained = (np.einsum("ij,ij->j", z, z) if np.all(solver.gain == 1.0)
                 else np.einsum("ij,ij->j", z, z * solver.gain[:, None]))  # (n_columns,)
    residual = q - np.add.reduceat(explained, offsets[:-1] - offsets[0])
    # q − explained cancels when the fit is nearly exact: those pairs are recomputed from
    # P* in the shifted coordinates of residual_sum.
    for k in np.flatnonzero(residual < NEAR_EXACT_FIT * q):
        block = slice(int(offsets[k] - offsets[0]), int(offsets[k + 1] - offsets[0]))
        P = solver.basis @ (z[:, block] * solver.inverse[:, None])
        residual[k] = residual_sum(m, s, teachers.start + int(k), P)
    return residual


def difference_gram(total_gram: np.ndarray, total: Moments, part: Moments,
                    s: int) -> np.ndarray:
    """Uncentred ``G_s`` of the rows of ``total`` not in ``part`` (same shift).

    ``total_gram`` is ``symmetric(total.gram["student"][s])``, shared by every fold.
    """
    block = total.layout.block("student", s)
    a = total.sum["student"][block] - part.sum["student"][block]
    c = total.shift["student"][block]
    gram = total_gram - symmetric(part.gram["student"][s])
    return shifted_product(gram, a, a, c, c, float(total.n - part.n))


def heldout_residuals(total: Moments, test: Moments, s: int, solver: Solver,
                      test_traces: np.ndarray, scratch: tuple[np.ndarray, np.ndarray]
                      ) -> np.ndarray:
    """``Σ_test w ‖Pᵀ s − t‖²`` for every teacher layer, ``P`` fitted on ``total − test``: (n_t,).

    ``P = B Z`` with ``Z = diag(inverse) Bᵀ C_train``; the residual on the test rows
    is :func:`residual_sum`'s formula for every teacher column at once, with
    ``tr(Pᵀ G'_test P) = ‖R Z‖²`` for ``Bᵀ G'_test B = Rᵀ R`` (:func:`gram_factor`).
    Three products over all teacher columns, all triangular for ``ridge = 0`` (the
    basis is lower trapezoidal, :class:`Solver`): ``Z``, ``Y = Bᵀ C'_test`` and ``R Z``.
    ``test_traces`` is ``test.teacher_traces()``; ``scratch`` two flat float64 buffers
    of at least ``d_s · Σd_t`` values (``Zᵀ``, ``Yᵀ``), reused by the calls of a thread.
    """
    from ._blas import trmm_right

    layout = test.layout
    if solver.rank == 0:
        return test.teacher_sq_norms()
    block = layout.block("student", s)
    c_s, c_t = test.shift["student"][block], test.shift["teacher"]
    shape = (layout.total["teacher"], block.stop - block.start)
    z, y = (buffer[: shape[0] * shape[1]].reshape(shape, order="F") for buffer in scratch)
    np.subtract(total.cross[block].T, test.cross[block].T, out=z)  # C'_trainᵀ
    z = cross_times_basis(z, solver, total.sum["student"][block] - test.sum["student"][block],
                          total.sum["teacher"] - test.sum["teacher"], float(total.n - test.n),
                          c_s, c_t)  # Zᵀ (before the ridge's scaling)
    np.copyto(y, test.cross[block].T)
    y = times_basis(y, solver)  # Yᵀ
    if not np.all(solver.inverse == 1.0):
        z *= solver.inverse
    per_column = -2.0 * np.einsum("jk,jk->j", z, y)  # −2 tr(Pᵀ C'_test)
    sums = np.column_stack([c_s, test.sum["student"][block]])
    fitted = z @ (solver.basis.T @ sums)  # Pᵀ c_s and Pᵀ a'_test
    delta = c_t - fitted[:, 0]
    per_column += 2.0 * delta * (test.sum["teacher"] - fitted[:, 1]) + test.n * delta**2
    # tr(Pᵀ G'_test P) = ‖R Z‖², one more triangular product, in Z's memory (Z is done).
    factor = gram_factor(basis_gram(symmetric(test.gram["student"][s]), solver))
    z = trmm_right(z, factor, upper=True, transpose=True)  # Zᵀ Rᵀ
    per_column += np.einsum("jk,jk->j", z, z)
    return test_traces + layout.reduce("teacher", per_column)


def basis_gram(gram: np.ndarray, solver: Solver) -> np.ndarray:
    """``Bᵀ G B``, (rank, rank), for ``G`` (d, d) symmetric: two triangular products for
    the triangular basis (``U G Uᵀ`` with ``B = Uᵀ[:, :rank]``)."""
    from ._blas import trmm_right

    if solver.upper is None:
        return solver.basis.T @ (gram @ solver.basis)
    half = trmm_right(np.array(gram, order="F"), solver.upper, upper=True, transpose=True)
    half = trmm_right(np.asfortranarray(half.T), solver.upper, upper=True, transpose=True)
    return half[: solver.rank, : solver.rank]  # (G Uᵀ)ᵀ Uᵀ = U G Uᵀ


def gram_factor(w: np.ndarray) -> np.ndarray:
    """Upper-triangular ``R`` (r, r), Fortran, with ``w = Rᵀ R`` for ``w`` symmetric PSD.

    Cholesky when ``w`` is positive definite. Otherwise (a test fold with fewer
    rows than the basis has directions) pivoted Cholesky, ``w = Aᵀ A`` with
    ``A = Lᵀ Πᵀ``, and ``R`` from ``A = Q R``: still triangular, whatever the rank.
    """
    import scipy.linalg
    from scipy.linalg import lapack

    try:
        return np.linalg.cholesky(w).T  # Fortran: the transpose of NumPy's C-ordered L
    except np.linalg.LinAlgError:
        pass
    lower, pivots, rank, _ = lapack.dpstrf(w, lower=1)
    lower = np.tril(lower)
    lower[:, rank:] = 0.0  # the trailing block is not factored
    a = np.empty_like(lower)
    a[:, pivots - 1] = lower.T
    return np.asfortranarray(scipy.linalg.qr(a, mode="r", check_finite=False)[0])


def teacher_variance(m: Moments) -> np.ndarray:
    """``(q_t − ‖b_t‖²/n) / (n d_t)`` from the shifted sums (shift invariant): (n_t,)."""
    widths = np.asarray(m.layout.widths["teacher"], dtype=np.float64)
    return np.maximum(m.centred_traces("teacher"), 0.0) / (m.n * widths)


def centred_norms(m: Moments, side: str) -> np.ndarray:
    """``‖Ĝ_l‖_F`` for every layer of ``side``."""
    from .kernels.gram import centred_gram_square_norm

    sums = [m.sum[side][m.layout.block(side, k)] for k in range(m.layout.count(side))]
    return np.sqrt([max(centred_gram_square_norm(g, a, float(m.n)), 0.0)
                    for g, a in zip(m.gram[side], sums, strict=True)])


def cross_squares(m: Moments) -> np.ndarray:
    """``‖Ĉ_st‖_F²`` for every pair: (n_s, n_t), one pass over ``C'``."""
    from .kernels import gram
    from .kernels._jit import available_threads

    layout = m.layout
    rows = np.empty((layout.total["student"], layout.count("teacher")))
    centre = -m.sum["teacher"] / float(m.n)
    parallel = m.cross.size >= PARALLEL_MIN_ENTRIES and available_threads() > 1
    kernel = (gram.centred_cross_row_squares_parallel if parallel
              else gram.centred_cross_row_squares_serial)
    kernel(m.cross, m.sum["student"], centre, layout.offsets["teacher"], rows)
    return layout.reduce("student", rows.T).T


def linear_cka(m: Moments, debiased: bool, constant: str = "nan") -> np.ndarray:
    """Linear CKA of every pair, (n_s, n_t); NaN where a layer has no (estimated) variance.

    Debiased: the unbiased HSIC estimator (Song et al. 2012) in its feature-space
    form (Kornblith et al. 2019),
    ``‖Ĉ‖² − n/(n−2) Σ_i r̂^s_i r̂^t_i + tr Ĝ tr Ĥ / ((n−1)(n−2))`` with ``r̂_i`` the
    squared norm of a centred row: the fourth-order moments at the mean shift.
    """
    products = cross_squares(m)
    norm_s, norm_t = centred_norms(m, "student") ** 2, centred_norms(m, "teacher") ** 2
    if debiased:
        n = float(m.n)
        centre = {side: -m.sum[side] / n for side in ("student", "teacher")}
        u, q_s, q_t = m.quartic_at(centre)
        tr_s, tr_t = m.centred_traces("student"), m.centred_traces("teacher")
        ratio, scale = n / (n - 2.0), 1.0 / ((n - 1.0) * (n - 2.0))
        products = products - ratio * u + scale * np.outer(tr_s, tr_t)
        norm_s = norm_s - ratio * q_s + scale * tr_s**2
        norm_t = norm_t - ratio * q_t + scale * tr_t**2
    denominator = np.sqrt(np.maximum(norm_s, 0.0))[:, None] * np.sqrt(np.maximum(norm_t, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.where(denominator > 0, products / denominator, np.nan)
    if constant == "raise" and np.isnan(values).any():
        s, t = np.argwhere(np.isnan(values))[0]
        raise ValueError(
            f"cka: the pair (student {s}, teacher {t}) is undefined: a layer is constant "
            "over the rows used (or, debiased, too few rows to estimate its variance); "
            "drop it, or pass constant='nan'"
        )
    return values


def residuals(total: Moments, folds, ridge: float, cutoffs) -> np.ndarray:
    """Best residual sums of every pair: (n_s, n_t) in-sample (``folds`` None), else
    (k, n_s, n_t) on each held-out fold with ``P`` fitted on the other folds.

    One task per student layer (and fold), on pkd's threads with single-threaded BLAS:
    each task's decompositions are serial, and its products are as fast on one thread
    (docs/performance.md, "Alignment statistics"); every value is computed by one
    thread, so the bits do not depend on the thread count.
    """
    import threading

    from ._threads import on_threads, own_threads, single_threaded_blas

    n_s, n_t = total.layout.count("student"), total.layout.count("teacher")
    size = max(total.layout.widths["student"]) * total.layout.total["teacher"]
    local = threading.local()

    def scratch() -> tuple[np.ndarray, np.ndarray]:
        """Two buffers of the calling thread, reused by its next tasks (fewer page faults)."""
        if not hasattr(local, "buffers"):
            local.buffers = (np.empty(size), np.empty(size) if folds else np.empty(0))
        return local.buffers

    if folds is None:
        out, solvers = np.empty((n_s, n_t)), [None] * n_s

        def solve(s: int) -> None:
            solvers[s] = Solver(total.gram_of("student", s, False), ridge, cutoffs[s])

        def in_sample(item: tuple[int, range]) -> None:
            s, teachers = item
            out[s, teachers.start:teachers.stop] = min_residuals(total, s, solvers[s],
                                                                 scratch()[0], teachers)

        with single_threaded_blas as blas_threads:
            threads = own_threads(blas_threads)
            on_threads(range(n_s), solve, threads)
            # The products in halves of the teacher layers: more tasks than threads, so
            # that the threads finish together.
            halves = [range(t[0], t[-1] + 1) for t in np.array_split(np.arange(n_t), 2)
                      if t.size]
            on_threads([(s, half) for s in range(n_s) for half in halves], in_sample, threads)
        return out
    out = np.empty((len(folds), n_s, n_t))
    traces = [test.teacher_traces() for test in folds]
    grams = [symmetric(total.gram["student"][s]) for s in range(n_s)]

    def held_out(item: tuple[int, int]) -> None:
        s, f = item
        solver = Solver(difference_gram(grams[s], total, folds[f], s), ridge, cutoffs[s])
        out[f, s] = heldout_residuals(total, folds[f], s, solver, traces[f], scratch())

    with single_threaded_blas as blas_threads:
        on_threads([(s, f) for s in range(n_s) for f in range(len(folds))], held_out,
                   own_threads(blas_threads))
    return out


def relative(m: Moments, residual: np.ndarray, constant: str, what: str) -> np.ndarray:
    """``residual / (n d_t var_t)`` (1 − R²) with the teacher variance of ``m``; NaN (or a
    ValueError, ``constant="raise"``) for a constant teacher layer."""
    variance = teacher_variance(m)
    if constant == "raise" and not np.all(variance > 0):
        layers = np.flatnonzero(~(variance > 0)).tolist()
        raise ValueError(
            f"{what}: teacher layer(s) {layers} are constant over the rows used (variance "
            "0), so the measure is undefined for them; drop those layers, or pass "
            "constant='nan' to get NaN there"
        )
    widths = np.asarray(m.layout.widths["teacher"], dtype=np.float64)
    mse = np.maximum(residual, 0.0) / (m.n * widths)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(variance > 0, mse / variance, np.nan)
