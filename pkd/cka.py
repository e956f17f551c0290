"""Centred kernel alignment (CKA) between layers: linear, debiased, RBF and minibatch.

CKA (Kornblith et al., ICML 2019) compares two representations of the same
``n`` examples, ``X`` (n × d_x) and ``Y`` (n × d_y), through their kernel
matrices ``K`` and ``L`` (n × n), centred by ``H = I − 11ᵀ/n``::

    CKA(K, L) = ⟨HKH, HLH⟩_F / (‖HKH‖_F ‖HLH‖_F)

- :func:`linear_cka`: ``K = X Xᵀ``; then ``⟨HKH, HLH⟩ = ‖X̄ᵀ Ȳ‖_F²`` with
  column-centred ``X̄, Ȳ``, computed in whichever space (features or
  examples) costs fewer flops.
- :func:`debiased_linear_cka`: each HSIC replaced by the unbiased estimator
  of Song et al. (2012) in the form of Kornblith et al.'s code (with row
  norms ``r_i = ‖x̄_i‖²``, ``s = Σ r_i``)::

      n(n−3)·HSIC_u = ‖X̄ᵀȲ‖² − n/(n−2)·r_x·r_y + s_x s_y / ((n−1)(n−2))

  It needs at least 4 rows, and is undefined when an estimate of a layer
  with itself is not positive (too few rows for the layer's spread).
- :func:`rbf_cka`, :func:`rbf_cka_matrix`: ``K_ij = exp(−‖x_i − x_j‖² / (2σ²))``
  with ``σ² = bandwidth² × median of the squared distances``, each layer its
  own σ. The median is taken over all n² entries of the squared-distance
  matrix, its zero diagonal included, as in the CKA authors' demo code: their
  published value (0.65483 at bandwidth 0.5) needs exactly that rule. On a
  reproducible subsample of at most ``max_rows`` rows (the kernels are
  n × n); the kernels are computed by :mod:`pkd._rbf_workspace` (its
  Numba passes in :mod:`pkd.kernels.rbf`).
- :class:`MinibatchCKA` (Nguyen et al., ICLR 2021): the debiased linear HSIC
  of every layer pair summed over minibatches and normalised once, for data
  that does not fit in memory.

The CKA authors' demo input and their published values:

>>> import numpy as np
>>> from pkd.cka import debiased_linear_cka, linear_cka, rbf_cka
>>> state = np.random.RandomState(1337)  # their np.random.seed(1337)
>>> X = state.randn(100, 10)
>>> Y = state.randn(100, 10) + X
>>> [round(f(X, Y), 5) for f in (linear_cka, debiased_linear_cka)]
[0.55761, 0.51346]
>>> round(rbf_cka(X, Y, bandwidth=0.5), 5)  # their σ; pkd's default is 0.2
0.65483

RBF memory: ``n(n−1)/2`` float64 per kept kernel (64 MiB at 4,096 rows) for
the side with fewer layers, plus an n × n Gram buffer and one more kernel,
which are kept per thread for the next call (:func:`release_buffers`).
The RBF Gram matrices are single-threaded BLAS calls on pkd's own threads: while
an RBF function runs, BLAS is limited to one thread for the whole process
(``threadpoolctl``, restored after), so another thread's BLAS calls meanwhile run
single-threaded.

Every layer is centred in float64 after subtracting its first row, so a
constant layer (or a dead column) centres to exactly 0: CKA is then
undefined and an error says so, instead of a number made of rounding.
Inputs are float32 or float64, 2-D (rows are examples) or, for the
all-pairs functions, 3-D ``(B, T, d)`` with a ``(B, T)`` 0/1 ``mask``.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from . import _validation as V
from ._rbf_workspace import RBFWorkspace, release, thread_workspace, twin
from ._threads import own_threads, single_threaded_blas

# Every estimator here needs 4 rows: the unbiased HSIC divides by n(n−3).
MIN_ROWS = 4
# Rows of the RBF kernels when ``max_rows`` is not given: 4096 rows take 64 MiB per kernel.
DEFAULT_MAX_ROWS = 4096
#: σ of the RBF kernels as a fraction of each layer's median distance when ``bandwidth`` is
#: not given: 0.2 found corresponding layers best of 0.2, 0.5 and 0.8 in the layer-matching
#: benchmark (analysis/results/layer_matching/layer_matching.md).
DEFAULT_BANDWIDTH = 0.2
# MinibatchCKA compares examples' Gram matrices when they are cheaper and fit in this.
_GRAM_PATH_MAX_BYTES = 256 << 20


# --- input --------------------------------------------------------------------------------


def _centred(values: np.ndarray) -> np.ndarray:
    """Columns centred in float64, after subtracting the first row (a constant column → 0)."""
    shifted = np.subtract(values, values[0], dtype=np.float64)
    shifted -= shifted.mean(axis=0)
    return shifted


def _check_pair(X, Y, *, names=("X", "Y")) -> tuple[np.ndarray, np.ndarray]:
    X = V.check_float_array(X, names[0], ndims=(2,))
    Y = V.check_float_array(Y, names[1], ndims=(2,))
    if X.shape[0] != Y.shape[0]:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same rows (one per example), got shapes "
            f"{X.shape} and {Y.shape}"
        )
    if X.shape[0] < MIN_ROWS:
        raise ValueError(
            f"{names[0]} and {names[1]} have {X.shape[0]} rows (shapes {X.shape}, {Y.shape}): "
            f"CKA needs at least {MIN_ROWS} examples"
        )
    return X, Y


def _constant_error(name: str, shape: tuple, what: str = "CKA") -> ValueError:
    return ValueError(
        f"{name} (shape {shape}) is constant over the rows used: {what} is undefined for a "
        "layer that does not vary; drop it or select other rows"
    )


def _flat_layers(layers, name: str) -> list[np.ndarray]:
    """Validated layers as ``(rows, d)`` arrays (3-D ``(B, T, d)`` flattened)."""
    out = []
    for k, layer in enumerate(V.as_layers(layers, name)):
        out.append(V.check_float_array(layer, f"{name}[{k}]", ndims=(2, 3)))
    return out


def _lead_shape(student: list, teacher: list, names=("student_layers", "teacher_layers")):
    """The leading shape shared by every layer (all but the width)."""
    lead = student[0].shape[:-1]
    for name, layers in zip(names, (student, teacher), strict=True):
        for k, layer in enumerate(layers):
            if layer.shape[:-1] != lead:
                raise ValueError(
                    f"{name}[{k}] has shape {layer.shape} but {names[0]}[0] has shape "
                    f"{student[0].shape}: every layer must have the same rows (all dimensions "
                    "but the last, the width)"
                )
    return lead


def _check_max_rows(max_rows, n_rows: int) -> int:
    """Rows to keep: ``min(n_rows, DEFAULT_MAX_ROWS)`` for None, else ``4 ≤ max_rows ≤ n_rows``."""
    if max_rows is None:
        return min(n_rows, DEFAULT_MAX_ROWS)
    if isinstance(max_rows, (bool, np.bool_)) or not isinstance(max_rows, numbers.Integral):
        raise TypeError(f"max_rows must be an int or None, got {max_rows!r}")
    if max_rows < MIN_ROWS:
        raise ValueError(f"max_rows must be >= {MIN_ROWS} (CKA needs that many examples), "
                         f"got {max_rows}")
    if max_rows > n_rows:
        raise ValueError(
            f"max_rows={max_rows} asks for a subsample larger than the {n_rows} rows available: "
            f"pass max_rows <= {n_rows}, or None to use min(rows, {DEFAULT_MAX_ROWS})"
        )
    return int(max_rows)


def _subsample(n_rows: int, keep: int, seed) -> np.ndarray | None:
    """Sorted indices of ``keep`` rows drawn without replacement, or None for all rows."""
    if keep == n_rows:
        return None
    return np.sort(V.as_generator(seed).choice(n_rows, size=keep, replace=False))


# --- linear CKA ---------------------------------------------------------------------------


def _dot_products(X: np.ndarray, Y: np.ndarray) -> tuple[float, float, float]:
    """``(‖XᵀY‖², ‖XᵀX‖², ‖YᵀY‖²)`` = ``(⟨K, L⟩, ⟨K, K⟩, ⟨L, L⟩)`` for ``K = XXᵀ, L = YYᵀ``.

    In feature space (d × d products) or example space (n × n), whichever costs fewer flops.
    """
    n, d_x = X.shape
    d_y = Y.shape[1]
    if n * n * (d_x + d_y + 3) < n * (d_x * d_x + d_y * d_y + d_x * d_y):
        K, L = X @ X.T, Y @ Y.T
        return float(np.vdot(K, L)), float(np.vdot(K, K)), float(np.vdot(L, L))
    cross, xx, yy = X.T @ Y, X.T @ X, Y.T @ Y
    return float(np.vdot(cross, cross)), float(np.vdot(xx, xx)), float(np.vdot(yy, yy))


def _debiased(dot: float, rows_x: np.ndarray, rows_y: np.ndarray, n: int) -> float:
    """``n(n−3)·HSIC_u`` from ``⟨K, L⟩`` and the row norms of centred X and Y."""
    return (dot - n / (n - 2.0) * float(rows_x @ rows_y)
            + float(rows_x.sum()) * float(rows_y.sum()) / ((n - 1.0) * (n - 2.0)))


def linear_cka(X, Y) -> float:
    """Linear CKA of two representations of the same examples.

    Parameters
    ----------
    X : array_like, shape (n, d_x), float32 or float64
    Y : array_like, shape (n, d_y), float32 or float64
        Rows are examples (the same ``n ≥ 4`` in both); finite.

    Returns
    -------
    float
        In [0, 1]; 1 for representations equal up to an orthogonal map and a scale.

    Raises
    ------
    ValueError
        Rows differ or are fewer than 4, NaN/Inf, or a constant input.
    """
    X, Y = _check_pair(X, Y)
    x, y = _centred(X), _centred(Y)
    xy, xx, yy = _dot_products(x, y)
    for name, value, shape in (("X", xx, X.shape), ("Y", yy, Y.shape)):
        if value == 0.0:
            raise _constant_error(name, shape, "linear CKA")
    return _ratio(xy, xx, yy, "linear CKA of X and Y")


def debiased_linear_cka(X, Y) -> float:
    """Linear CKA with every HSIC replaced by its unbiased estimator (Song et al. 2012).

    The plain estimate is biased upwards when rows are few compared with the
    widths (of two independent noise matrices of 100 rows and width 384 it
    reads about 0.8); this one is close to 0 there. It can be slightly
    negative.

    Parameters
    ----------
    X : array_like, shape (n, d_x), float32 or float64
    Y : array_like, shape (n, d_y), float32 or float64
        Rows are examples, ``n ≥ 4``; finite.

    Returns
    -------
    float

    Raises
    ------
    ValueError
        As :func:`linear_cka`, and when the unbiased estimate of a layer with
        itself is not positive (the estimator is undefined there).
    """
    X, Y = _check_pair(X, Y)
    x, y = _centred(X), _centred(Y)
    n = x.shape[0]
    xy, xx, yy = _dot_products(x, y)
    rows_x, rows_y = np.einsum("ij,ij->i", x, x), np.einsum("ij,ij->i", y, y)
    for name, value, shape in (("X", xx, X.shape), ("Y", yy, Y.shape)):
        if value == 0.0:
            raise _constant_error(name, shape, "debiased linear CKA")
    self_x, self_y = _debiased(xx, rows_x, rows_x, n), _debiased(yy, rows_y, rows_y, n)
    for name, value, shape in (("X", self_x, X.shape), ("Y", self_y, Y.shape)):
        if not value > 0.0:
            raise ValueError(
                f"debiased linear CKA is undefined here: the unbiased HSIC of {name} (shape "
                f"{shape}) with itself is {value:.3g}, not positive; use more rows"
            )
    return _ratio(_debiased(xy, rows_x, rows_y, n), self_x, self_y, "debiased linear CKA")


def _ratio(cross: float, self_x: float, self_y: float, what: str) -> float:
    value = cross / math.sqrt(self_x * self_y)
    if not math.isfinite(value):
        raise ValueError(f"{what} is not finite ({value}): the inputs' values are too large "
                         "for float64; rescale them")
    return value


# --- RBF CKA ------------------------------------------------------------------------------


def release_buffers() -> None:
    """Free the buffers the RBF functions keep for their next call in this thread.

    :func:`rbf_cka` and :func:`rbf_cka_matrix` keep the n × n Gram buffer and
    two packed kernels (``2n²`` float64 in all: 256 MiB at 4,096 rows) between
    calls with the same number of rows, so that repeated calls do not pay for
    fresh memory each time (the operating system zeroes every new page).
    """
    release()


def rbf_cka(X, Y, *, bandwidth: float = DEFAULT_BANDWIDTH, max_rows: int | None = None,
            seed=0) -> float:
    """RBF-kernel CKA, σ = ``bandwidth`` × the median distance between rows, per side.

    Parameters
    ----------
    X : array_like, shape (n, d_x), float32 or float64
    Y : array_like, shape (n, d_y), float32 or float64
        Rows are examples, ``n ≥ 4``; finite.
    bandwidth : float
        σ as a fraction of the median distance (> 0): default
        :data:`DEFAULT_BANDWIDTH` (0.2); Kornblith et al. use 0.5.
    max_rows : int, optional
        Rows to use: None uses ``min(n, 4096)``; an int must be in ``[4, n]``.
        When fewer than ``n``, a subsample drawn with ``seed``.
    seed : int, None or numpy.random.Generator
        The subsample's seed.

    Returns
    -------
    float
        In [0, 1].
    """
    X, Y = _check_pair(X, Y)
    return float(_rbf_matrix([X], [Y], None, V.check_positive(bandwidth, "bandwidth"),
                             max_rows, seed, ("X", "Y"))[0, 0])


def rbf_cka_matrix(student_layers, teacher_layers, *, bandwidth: float = DEFAULT_BANDWIDTH,
                   max_rows: int | None = None, seed=0, mask=None) -> np.ndarray:
    """RBF CKA of every (student, teacher) layer pair, each layer's kernel computed once.

    The rows selected by ``mask`` are subsampled once (the same rows for every
    layer) to at most ``max_rows``. The centred kernels of the side with fewer
    layers are kept (``n(n−1)/2`` float64 each: 64 MiB at 4,096 rows), those of
    the other side computed one at a time and compared with all of them.

    Parameters
    ----------
    student_layers, teacher_layers : sequence of array_like, or one stacked array
        Each layer ``(N, d)`` or ``(B, T, d)``, float32 or float64, finite; all
        with the same leading shape.
    bandwidth : float
        σ as a fraction of each layer's median distance between rows (> 0; default
        :data:`DEFAULT_BANDWIDTH`, 0.2).
    max_rows : int, optional
        None: ``min(selected rows, 4096)``; an int must be in ``[4, selected rows]``.
    seed : int, None or numpy.random.Generator
        The subsample's seed.
    mask : array_like, optional
        0/1 of the layers' leading shape: the rows that count (padding → 0).

    Returns
    -------
    ndarray, shape (n_s, n_t), float64
    """
    bandwidth = V.check_positive(bandwidth, "bandwidth")
    student = _flat_layers(student_layers, "student_layers")
    teacher = _flat_layers(teacher_layers, "teacher_layers")
    return _rbf_matrix(student, teacher, mask, bandwidth, max_rows, seed,
                       ("student_layers", "teacher_layers"))


def _rbf_matrix(student: list, teacher: list, mask, bandwidth: float, max_rows, seed,
                names: tuple[str, str], parallel: bool | None = None) -> np.ndarray:
    """:func:`rbf_cka_matrix` on validated layers; ``names`` name the two sides in errors.

    ``parallel`` forces one twin of every pass (``pkd bench`` times both); None: the rule.
    """
    lead = _lead_shape(student, teacher, names)
    selected = V.select_rows(lead, mask, mask_name="mask")
    n_available = math.prod(lead) if selected is None else selected.size
    if n_available < MIN_ROWS:
        raise ValueError(f"the layers have {n_available} selected rows (leading shape {lead}): "
                         f"CKA needs at least {MIN_ROWS}")
    n = _check_max_rows(max_rows, n_available)
    picked = _subsample(n_available, n, seed)
    if picked is not None:
        selected = picked if selected is None else selected[picked]

    def rows_of(layer):
        flat = layer.reshape(-1, layer.shape[-1])
        return _centred(flat if selected is None else flat[selected])

    # Keep the side with fewer layers; the other streams through.
    kept, streamed = (student, teacher) if len(student) <= len(teacher) else (teacher, student)
    kept_name, streamed_name = names if kept is student else names[::-1]
    # BLAS on one thread per call and our threads instead: its own idle workers would keep
    # spinning on the core the Numba passes need (docs/performance.md, "RBF CKA").
    with single_threaded_blas as blas_threads:
        workspace = thread_workspace(n, parallel)
        workspace.gram_threads = own_threads(blas_threads)
        return _rbf_values(workspace, kept, streamed, (kept_name, streamed_name), bandwidth,
                           rows_of, parallel, kept is student)


def _rbf_values(workspace: RBFWorkspace, kept: list, streamed: list, names: tuple[str, str],
                bandwidth: float, rows_of, parallel: bool | None,
                kept_is_student: bool) -> np.ndarray:
    """The (n_s, n_t) RBF CKA of :func:`_rbf_matrix` once the rows are chosen."""
    n = workspace.n
    kept_name, streamed_name = names
    n_kept = len(kept)
    stack, stack_diagonal = workspace.kept_stack(n_kept), np.empty((n_kept, n))
    stack_means, stack_grand_means = np.empty((n_kept, n)), np.empty(n_kept)
    for k, layer in enumerate(kept):
        stack_means[k], stack_grand_means[k] = workspace.kernel(
            rows_of(layer), bandwidth, _layer_name(kept_name, k), stack[k], stack_diagonal[k])
    # No kernel is centred in memory: the inner-product pass centres rows as it reads them,
    # and sums the kept kernels' own products on the way (the same bits in every pass).
    inner_products = twin("centred_inner_products", stack.size, parallel)
    products = np.empty(2 * n_kept + 1)
    cross = np.empty((len(streamed), n_kept))
    streamed_self = np.empty(len(streamed))
    packed, diagonal = workspace.packed, np.empty(n)
    for k, layer in enumerate(streamed):
        row_means, grand_mean = workspace.kernel(rows_of(layer), bandwidth,
                                                 _layer_name(streamed_name, k), packed,
                                                 diagonal)
        inner_products(stack, stack_means, stack_grand_means, stack_diagonal, packed, n,
                       row_means, grand_mean, diagonal, products)
        cross[k], streamed_self[k] = products[:n_kept], products[n_kept]
    kept_self = products[n_kept + 1:]
    value = cross / np.sqrt(np.outer(streamed_self, kept_self))
    if not np.isfinite(value).all():
        raise ValueError("RBF CKA is not finite for some pair: a layer's values are too large "
                         "for float64; rescale it")
    return value.T if kept_is_student else value


def _layer_name(side: str, k: int) -> str:
    """``X`` for a single-pair call's argument, ``student_layers[k]`` otherwise."""
    return side if side in ("X", "Y") else f"{side}[{k}]"


# --- minibatch CKA ------------------------------------------------------------------------


class MinibatchCKA:
    """Debiased linear CKA of every layer pair, accumulated over minibatches.

    Each :meth:`update` adds, for every pair, the unbiased HSIC estimate of
    the batch (Song et al. 2012) and the estimates of each layer with itself;
    :meth:`value` normalises the sums once (Nguyen et al., ICLR 2021). Memory
    does not grow with the number of batches. With a single batch the value
    is :func:`debiased_linear_cka`'s.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> acc = MinibatchCKA()
    >>> for _ in range(3):
    ...     x = rng.standard_normal((64, 8))
    ...     acc.update([x], [x @ rng.standard_normal((8, 8)), rng.standard_normal((64, 8))])
    >>> acc.value().shape
    (1, 2)
    """

    def __init__(self) -> None:
        self._cross: np.ndarray | None = None
        self._student_self: np.ndarray | None = None
        self._teacher_self: np.ndarray | None = None
        self._widths: tuple | None = None
        self.n_batches = 0
        self.n_rows = 0

    def __repr__(self) -> str:
        shape = None if self._cross is None else self._cross.shape
        return f"MinibatchCKA(pairs={shape}, batches={self.n_batches}, rows={self.n_rows})"

    def update(self, student_layers, teacher_layers, mask=None) -> None:
        """Add one minibatch.

        Parameters
        ----------
        student_layers, teacher_layers : sequence of array_like, or one stacked array
            Each layer ``(N, d)`` or ``(B, T, d)``, float32 or float64, finite; the
            same layers and widths in every batch.
        mask : array_like, optional
            0/1 of the layers' leading shape; at least 4 selected rows.
        """
        student = _flat_layers(student_layers, "student_layers")
        teacher = _flat_layers(teacher_layers, "teacher_layers")
        lead = _lead_shape(student, teacher)
        widths = (tuple(a.shape[-1] for a in student), tuple(a.shape[-1] for a in teacher))
        if self._widths is not None and widths != self._widths:
            raise ValueError(
                f"this batch has layer widths {widths[0]} (student) and {widths[1]} (teacher), "
                f"earlier batches {self._widths[0]} and {self._widths[1]}: every batch must "
                "hold the same layers"
            )
        selected = V.select_rows(lead, mask, mask_name="mask")
        n = math.prod(lead) if selected is None else selected.size
        if n < MIN_ROWS:
            raise ValueError(f"this batch has {n} selected rows (leading shape {lead}): the "
                             f"unbiased HSIC needs at least {MIN_ROWS}")

        def rows_of(layer):
            flat = layer.reshape(-1, layer.shape[-1])
            return _centred(flat if selected is None else flat[selected])

        xs, ys = [rows_of(a) for a in student], [rows_of(a) for a in teacher]
        cross, student_self, teacher_self = _batch_hsic(xs, ys)
        if self._cross is None:
            self._cross = np.zeros_like(cross)
            self._student_self = np.zeros_like(student_self)
            self._teacher_self = np.zeros_like(teacher_self)
            self._widths = widths
        self._cross += cross
        self._student_self += student_self
        self._teacher_self += teacher_self
        self.n_batches += 1
        self.n_rows += n

    def value(self) -> np.ndarray:
        """Debiased CKA of every pair from the batches so far.

        Returns
        -------
        ndarray, shape (n_s, n_t), float64
        """
        if self._cross is None:
            raise ValueError("MinibatchCKA has no batch yet: call update() first")
        for side, sums in (("student", self._student_self), ("teacher", self._teacher_self)):
            bad = np.flatnonzero(~(sums > 0))
            if bad.size:
                raise ValueError(
                    f"{side} layer {int(bad[0])}: its summed unbiased HSIC with itself is "
                    f"{sums[bad[0]]:.3g}, not positive (a constant layer, or too few rows per "
                    "batch): CKA is undefined for it"
                )
        return self._cross / np.sqrt(np.outer(self._student_self, self._teacher_self))


def _batch_hsic(xs: list, ys: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unbiased HSIC of every pair and of every layer with itself, for one batch.

    xs, ys : lists of column-centred float64 ``(n, d)`` arrays.
    Returns ``(cross (n_s, n_t), student (n_s,), teacher (n_t,))``.
    """
    n = xs[0].shape[0]
    widths = [a.shape[1] for a in xs + ys]
    gram_flops = n * n * (sum(widths) + len(xs) * len(ys))
    feature_flops = n * (sum(a.shape[1] for a in xs) * sum(a.shape[1] for a in ys)
                         + sum(w * w for w in widths))
    gram_bytes = n * n * len(widths) * 8
    if gram_flops < feature_flops and gram_bytes <= _GRAM_PATH_MAX_BYTES:
        ks = np.stack([(x @ x.T).ravel() for x in xs])
        ls = np.stack([(y @ y.T).ravel() for y in ys])
        dots = ks @ ls.T
        self_x = np.einsum("ij,ij->i", ks, ks)
        self_y = np.einsum("ij,ij->i", ls, ls)
    else:
        all_y = np.hstack(ys)
        edges = np.cumsum([0] + [y.shape[1] for y in ys])
        dots = np.empty((len(xs), len(ys)))
        for s, x in enumerate(xs):
            products = x.T @ all_y  # (d_s, Σ d_t): every teacher layer at once
            dots[s] = np.add.reduceat(np.einsum("ij,ij->j", products, products), edges[:-1])
        self_x = np.array([np.vdot(g, g) for g in (x.T @ x for x in xs)])
        self_y = np.array([np.vdot(g, g) for g in (y.T @ y for y in ys)])
    rows_x = np.stack([np.einsum("ij,ij->i", x, x) for x in xs])  # (n_s, n)
    rows_y = np.stack([np.einsum("ij,ij->i", y, y) for y in ys])
    sums_x, sums_y = rows_x.sum(axis=1), rows_y.sum(axis=1)
    scale = 1.0 / (n * (n - 3.0))

    def unbiased(dot, rx_ry, sx_sy):
        return (dot - n / (n - 2.0) * rx_ry + sx_sy / ((n - 1.0) * (n - 2.0))) * scale

    cross = unbiased(dots, rows_x @ rows_y.T, np.outer(sums_x, sums_y))
    student_self = unbiased(self_x, np.einsum("ij,ij->i", rows_x, rows_x), sums_x * sums_x)
    teacher_self = unbiased(self_y, np.einsum("ij,ij->i", rows_y, rows_y), sums_y * sums_y)
    return cross, student_self, teacher_self
