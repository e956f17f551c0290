"""The RBF kernels' reusable workspace: the passes behind :func:`pkd.cka.rbf_cka`.

For ``n`` rows of a centred layer, :class:`RBFWorkspace` computes the Gram
matrix in blocks (:func:`gram_lower`), the packed squared distances and their
exact median (a bracket from a fixed sample, the histogram search when it
misses), then the kernel values and their row sums (:func:`kernel_values`),
choosing the serial or prange twin of each Numba pass of
:mod:`pkd.kernels.rbf` by one rule (:func:`twin`). Its buffers are kept per
thread for the next call with the same ``n`` (:func:`thread_workspace`,
:func:`release`). :mod:`pkd.cka` turns the kernels into CKA values; why the
passes are shaped this way is in ``docs/performance.md``, "RBF CKA".
"""

from __future__ import annotations

import functools
import math
import threading

import numpy as np

from ._threads import on_threads

# Packed kernel entries (n(n−1)/2) from which the prange twins of the RBF passes are used,
# when Numba has more than one thread; below it the serial twins. Results are identical.
PARALLEL_MIN_ENTRIES = 1 << 17
# The median search partitions at most this many entries, narrowing its range until then.
_MEDIAN_CANDIDATES = 1 << 16
_MAX_NARROWING = 3
# The median's bracket: quantiles of this many sampled entries, ± this many binomial
# standard deviations (a bracket that misses costs a histogram search, never a wrong value).
_MEDIAN_SAMPLE = 1 << 16
_BRACKET_SIGMAS = 6.0
# Packed entries per NumPy call of the exp pass: the product's output is still in cache.
_EXP_CHUNK = 1 << 15
# Rows of the Gram matrix per BLAS call (x[lo:hi] x[:hi]ᵀ, see gram_lower): 1/16 more
# flops than the triangle at 4,096 rows, and blocks enough to share among threads.
_GRAM_BLOCK_ROWS = 256


@functools.cache
def rbf_kernels():
    """The RBF kernels, imported on first use (``import pkd.cka`` does not load Numba)."""
    from .kernels import rbf

    return rbf


def twin(name: str, n_entries: int, parallel: bool | None = None):
    """The kernel ``name``'s twin: ``parallel`` None applies the rule below.

    The prange twin runs when more than one thread is available (Numba's count,
    lowered to a threadpoolctl limit: :func:`pkd.kernels._jit.available_threads`)
    and the pass has at least ``PARALLEL_MIN_ENTRIES`` entries; the serial one otherwise.
    """
    rbf = rbf_kernels()
    if parallel is None:
        from .kernels._jit import available_threads

        parallel = n_entries >= PARALLEL_MIN_ENTRIES and available_threads() > 1
    return getattr(rbf, f"{name}_{'parallel' if parallel else 'serial'}")


# Each thread's workspace (``rbf``) of its last call, kept for the next one.
_local = threading.local()


def thread_workspace(n: int, parallel: bool | None) -> RBFWorkspace:
    """This thread's RBF buffers for ``n`` rows, kept from the last call when ``n`` matches."""
    workspace = getattr(_local, "rbf", None)
    if workspace is None or workspace.n != n:
        _local.rbf = None  # the old buffers go before the new ones are allocated
        workspace = _local.rbf = RBFWorkspace(n)
    workspace.parallel = parallel
    return workspace


def release() -> None:
    """Free this thread's RBF buffers (:func:`pkd.cka.release_buffers`)."""
    _local.rbf = None


class RBFWorkspace:
    """Buffers of the RBF passes for ``n`` rows, reused across layers and calls."""

    def __init__(self, n: int, parallel: bool | None = None):
        rbf = rbf_kernels()
        self.n = n
        self.parallel = parallel  # None: the rule of twin
        self.n_entries = n * (n - 1) // 2
        self.gram = np.empty((n, n))  # its lower triangle: the rows' Gram matrix
        self.gram_threads = 1  # threads of the Gram matrix's BLAS calls, set per call
        self.packed = np.empty(self.n_entries)  # the streamed layer's kernel
        self.kept = np.empty((1, self.n_entries))  # the kept layer's kernel, when only one
        self.row_sums = np.empty(n)
        self.column_partials = np.empty((-(-n // rbf.BLOCK_ROWS), n))
        self.counts = np.empty((rbf.N_GROUPS, rbf.N_BINS + 2), dtype=np.int64)
        self.window_counts = np.empty((rbf.N_GROUPS, 2), dtype=np.int64)
        self._sample = None  # the median's sample of packed entries: (rows, columns)
        self._sample_values = None
        self._window_buffer = None
        self.ones = np.ones(n)

    def kept_stack(self, count: int) -> np.ndarray:
        """``(count, n(n−1)/2)`` buffer for the kept side's kernels (new unless count is 1)."""
        return self.kept if count == 1 else np.empty((count, self.n_entries))

    def kernel(self, x: np.ndarray, bandwidth: float, name: str, packed: np.ndarray,
               diagonal: np.ndarray) -> tuple[np.ndarray, float]:
        """Write the RBF kernel of centred rows ``x`` (n, d), not centred, into ``packed``.

        packed : (n(n−1)/2,) float64, the strict lower triangle, row by row.
        diagonal : (n,) float64, receives the centred kernel's diagonal ``1 − 2μ_i + μ̄``.
        Returns ``(μ, μ̄)``: the row means (n,) and the grand mean of the full kernel.
        """
        n, m = self.n, self.n_entries
        gram = self.gram
        gram_lower(x, gram, self.gram_threads)
        norms = np.diagonal(gram).copy()
        if not np.isfinite(norms).all():
            raise ValueError(f"{name}: squared row norms overflow float64; rescale the layer")
        median = self.distances_and_median(gram, norms, packed)
        if median == 0.0:
            raise ValueError(
                f"{name} (shape {x.shape}): the median squared distance between rows is 0 (a "
                "constant layer, or most rows identical), so the bandwidth rule gives σ = 0 and "
                "RBF CKA is undefined; drop repeated rows (padding?) or the layer"
            )
        kernel_values(packed, n, -2.0 * bandwidth * bandwidth * median, self.row_sums,
                       self.column_partials, self._threads(m))
        row_means = self.row_sums / n
        grand_mean = math.fsum(self.row_sums) / (n * n)
        # 1 + (μ̄ − μ_i) − μ_i: the diagonal as rbf._centre_row centres the rest.
        np.subtract(self.ones + (grand_mean - row_means), row_means, out=diagonal)
        return row_means, grand_mean

    def distances_and_median(self, gram: np.ndarray, norms: np.ndarray,
                             packed: np.ndarray) -> float:
        """Write the packed squared distances; return the median of all n² of them.

        gram : (n, n) float64, C-contiguous, the rows' Gram matrix (its lower triangle).
        norms : (n,) float64, its diagonal, finite.
        packed : (n(n−1)/2,) float64, receives the distances.
        """
        n, m = self.n, self.n_entries
        positions = self._median_positions()
        lo, hi = self._bracket(gram, norms, positions)
        window = self._window(lo, hi)
        twin("squared_distances", m, self.parallel)(gram, norms, lo, hi, packed,
                                                    self.window_counts, window)
        values = self._order_statistics_in_bracket(packed, positions, lo, hi, window)
        if values is None:  # the bracket missed the median, or holds too many ties
            # The rows are centred, so the distances sum to n·Σ‖x_i‖² and their mean is known.
            first_hi = 2.0 * n * math.fsum(norms) / m
            return self._median_by_histogram(packed, first_hi if first_hi > 0 else 1.0)
        return self._median_of(values)

    def _threads(self, n_entries: int) -> int:
        """Threads of the NumPy passes: those of the prange twins when they run, else 1."""
        from .kernels._jit import available_threads

        if self.parallel is None:
            return available_threads() if n_entries >= PARALLEL_MIN_ENTRIES else 1
        return available_threads() if self.parallel else 1

    def _median_positions(self) -> list[int]:
        """Positions in the sorted packed entries of the n² entries' median (one or two)."""
        n = self.n
        total = n * n
        ranks = (total // 2 - 1, total // 2) if total % 2 == 0 else (total // 2,)
        # Sorted, the n² entries are n zeros then every packed value twice (n ≥ 3: ranks ≥ n).
        self._ranks = ranks
        return sorted({(r - n) // 2 for r in ranks})

    def _median_of(self, values: dict) -> float:
        """The median of the n² entries from the order statistics of the packed ones."""
        return float(np.mean([values[(r - self.n) // 2] for r in self._ranks]))

    def _bracket(self, gram: np.ndarray, norms: np.ndarray,
                 positions: list[int]) -> tuple[float, float]:
        """``[lo, hi)`` holding the entries at ``positions`` with high probability.

        Quantiles of ``_MEDIAN_SAMPLE`` entries drawn uniformly (a fixed draw per n),
        widened by ``_BRACKET_SIGMAS`` binomial standard deviations; the counts of the
        distance pass then say whether it holds them (if not, the histogram search runs).
        """
        m = self.n_entries
        if m <= _MEDIAN_SAMPLE:
            return 0.0, math.inf
        if self._sample is None:
            entries = np.random.default_rng(0).integers(0, m, _MEDIAN_SAMPLE)
            rows = ((1.0 + np.sqrt(1.0 + 8.0 * entries)) / 2.0).astype(np.int64)
            rows -= rows * (rows - 1) // 2 > entries  # the square root's rounding, either way
            rows += (rows + 1) * rows // 2 <= entries
            self._sample = rows, entries - rows * (rows - 1) // 2
        rows, columns = self._sample
        sample = np.maximum(norms[rows] + norms[columns] - 2.0 * gram[rows, columns], 0.0)
        sample.sort()
        self._sample_values = sample
        s = sample.size
        spread = _BRACKET_SIGMAS * math.sqrt(s * 0.25) + 1.0
        first = math.floor(positions[0] / m * s - spread)
        last = math.ceil((positions[-1] + 1) / m * s + spread)
        lo = float(sample[first]) if first >= 0 else 0.0
        hi = float(np.nextafter(sample[last], np.inf)) if last < s else math.inf
        return lo, hi

    def _window(self, lo: float, hi: float) -> np.ndarray:
        """The distance pass's buffer of the entries in ``[lo, hi)``: (N_GROUPS, capacity + 1).

        Each group's capacity is twice its expected count from the sample, plus a margin.
        """
        rbf = rbf_kernels()
        if self._sample is None:  # every entry is in the bracket: the gather pass copies them
            return np.empty((rbf.N_GROUPS, 1))
        sample = self._sample_values
        expected = np.count_nonzero((sample >= lo) & (sample < hi)) / sample.size
        per_group = self.n_entries / rbf.N_GROUPS
        capacity = int(2.0 * expected * per_group) + 1024
        if self._window_buffer is None or self._window_buffer.shape[1] < capacity + 1:
            self._window_buffer = np.empty((rbf.N_GROUPS, capacity + 1))
        return self._window_buffer

    def _order_statistics_in_bracket(self, packed: np.ndarray, positions: list[int],
                                     lo: float, hi: float, window: np.ndarray) -> dict | None:
        """``{p: the p-th smallest entry}`` from the entries in ``[lo, hi)``, or None.

        ``self.window_counts`` holds the distance pass's counts below ``lo`` and inside,
        ``window`` the entries inside (unless a group had more than its capacity).
        None when the positions are outside the bracket or it holds too many entries.
        """
        below = int(self.window_counts[:, 0].sum())
        inside = self.window_counts[:, 1]
        n_inside = int(inside.sum())
        if not below <= positions[0] <= positions[-1] < below + n_inside:
            return None
        if n_inside > max(_MEDIAN_CANDIDATES, self.n_entries // 16):
            return None
        if inside.max() < window.shape[1]:  # every group's entries fit: no second pass
            out = np.concatenate([window[g, :c] for g, c in enumerate(inside)])
        else:
            sizes = inside + 1  # every group's region ends with a scratch slot
            offsets = np.concatenate(([0], np.cumsum(sizes)[:-1]))
            out = np.empty(int(sizes.sum()))
            twin("gather_window", self.n_entries, self.parallel)(packed, self.n, lo, hi,
                                                                 offsets, out)
            out = np.delete(out, offsets + inside)
        out.partition([p - below for p in positions])
        return {p: float(out[p - below]) for p in positions}

    def _median_by_histogram(self, packed: np.ndarray, hi: float) -> float:
        """Median of the n² squared distances (diagonal zeros and both triangles included)
        by the histogram search, starting from ``[0, hi)``: the bracket's fallback."""
        twin("histogram", self.n_entries, self.parallel)(packed, self.n, 0.0, hi, self.counts)
        positions = self._median_positions()
        return self._median_of(self._order_statistics(packed, positions, hi))

    def _order_statistics(self, packed: np.ndarray, positions: list[int], hi: float) -> dict:
        """``{p: the p-th smallest entry of packed}`` for adjacent ``positions``.

        From the histogram over ``[0, hi)`` in ``self.counts``: keep the bins
        that hold the positions, narrow the range to them and count again
        until few entries are left (or the range cannot shrink), then
        partition those. Each round's counts come from a full pass, so the
        ranks are exact whatever the rounding at the bins' edges. The first
        range is ``[0, 2·mean)``: the entries are ≥ 0, so fewer than half of
        them reach twice their mean; a position outside the range widens it.
        """
        rbf = rbf_kernels()
        n, m, counts = self.n, packed.shape[0], self.counts
        histogram = twin("histogram", m, self.parallel)
        gather = twin("gather", m, self.parallel)
        lo, counted, narrowed = 0.0, True, 0
        while True:
            if not counted:
                if not hi > lo:
                    lo, hi = 0.0, float(np.nextafter(packed.max(), np.inf))
                    if not packed.max() > 0.0:  # every entry is 0
                        return dict.fromkeys(positions, 0.0)
                histogram(packed, n, lo, hi, counts)
            counted = False
            cumulative = np.cumsum(counts.sum(axis=0))  # entries in slots 0..s
            first, last = (int(np.searchsorted(cumulative, p, side="right"))
                           for p in (positions[0], positions[-1]))
            if first == 0:  # below lo
                lo = 0.0
                continue
            if last == rbf.N_BINS + 1:  # at or above hi
                hi = float(np.nextafter(packed.max(), np.inf))
                continue
            below_first = int(cumulative[first - 1])
            kept = int(cumulative[last]) - below_first
            width = (hi - lo) / rbf.N_BINS
            # After a few rounds the bin holds ties (or nearly): partition them, however many.
            if kept <= _MEDIAN_CANDIDATES or narrowed == _MAX_NARROWING or width == 0.0:
                group_counts = counts[:, first:last + 1].sum(axis=1)
                offsets = np.concatenate(([0], np.cumsum(group_counts)[:-1]))
                out = np.empty(kept)
                gather(packed, n, lo, hi, first, last, offsets, out)
                out.partition([p - below_first for p in positions])
                return {p: float(out[p - below_first]) for p in positions}
            lo, hi = lo + (first - 1) * width, lo + last * width
            narrowed += 1


def gram_lower(x: np.ndarray, gram: np.ndarray, threads: int) -> None:
    """The lower triangle of ``x xᵀ`` into ``gram``, one BLAS call per block of rows.

    Block ``[lo, hi)`` of ``_GRAM_BLOCK_ROWS`` rows gets ``x[lo:hi] x[:hi]ᵀ`` from one
    ``matmul`` into its place; ``threads`` Python threads take the next block, largest
    first, as they finish. Every entry comes from the same call whatever the threads,
    so with BLAS on one thread (the caller limits it) the values do not depend on them.

    x : (n, d) float64, C-contiguous.
    gram : (n, n) float64, C-contiguous; above the diagonal blocks it is left as it was.
    """
    n = x.shape[0]

    def block(lo: int) -> None:
        hi = min(n, lo + _GRAM_BLOCK_ROWS)
        np.matmul(x[lo:hi], x[:hi].T, out=gram[lo:hi, :hi])

    on_threads(range((n - 1) // _GRAM_BLOCK_ROWS * _GRAM_BLOCK_ROWS, -1, -_GRAM_BLOCK_ROWS),
                block, threads)


def kernel_values(packed: np.ndarray, n: int, divisor: float, row_sums: np.ndarray,
                   column_partials: np.ndarray, threads: int) -> None:
    """``packed ← exp(packed · (1 / divisor))`` (``divisor = −2σ²``), the full kernel's row sums.

    Block by block of ``BLOCK_ROWS`` rows, while the block is in cache: NumPy's ``exp``
    (on SIMD lanes; Numba's calls the scalar libm one per entry), then
    :func:`pkd.kernels.rbf.block_row_sums`. ``threads`` threads take the next pair of
    blocks ``h``, ``n_blocks − 1 − h`` (equal work) as they finish one, so a thread
    that shares its core goes on with fewer; the upper parts of the rows are added
    from the blocks' column sums in block order afterwards, so every value is the
    same whatever the threads.

    row_sums : (n,) float64, receives ``Σ_j K_ij`` with the unit diagonal.
    column_partials : (n_blocks, n) float64, scratch.
    """
    rbf = rbf_kernels()
    n_blocks = column_partials.shape[0]
    # A product by the reciprocal: a third of a division's time, the argument within an ulp.
    scale = 1.0 / divisor

    def pair(h: int) -> None:
        # Far entries underflow to 0 by design, whatever the caller's np.seterr says.
        with np.errstate(under="ignore"):
            for block in dict.fromkeys((h, n_blocks - 1 - h)):
                first = block * rbf.BLOCK_ROWS
                stop = min(n, first + rbf.BLOCK_ROWS)
                lo, hi = first * (first - 1) // 2, stop * (stop - 1) // 2
                for start in range(lo, hi, _EXP_CHUNK):
                    chunk = packed[start:min(hi, start + _EXP_CHUNK)]
                    np.multiply(chunk, scale, out=chunk)
                    np.exp(chunk, out=chunk)
                rbf.block_row_sums(packed, n, block, row_sums, column_partials)

    on_threads(range((n_blocks + 1) // 2), pair, threads)
    row_sums += 1.0
    for partial in column_partials:  # in block order
        row_sums += partial
