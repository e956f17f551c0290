"""pkd.cka against the CKA authors' published values, plain NumPy, loop twins and bad input."""

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

import naive
from pkd import _rbf_workspace, cka
from pkd.kernels import rbf

# --- independent witnesses: full n × n matrices, the centring matrix H, np.median -----------


def _centring(n):
    return np.eye(n) - np.ones((n, n)) / n


def reference_cka(K, L):
    """CKA from full kernel matrices: ⟨HKH, HLH⟩ / (‖HKH‖ ‖HLH‖)."""
    H = _centring(K.shape[0])
    Kc, Lc = H @ K @ H, H @ L @ H
    return float((Kc * Lc).sum() / np.sqrt((Kc * Kc).sum() * (Lc * Lc).sum()))


def reference_unbiased_hsic(K, L):
    """Song et al.'s unbiased HSIC estimator, written out from its definition."""
    n = K.shape[0]
    Kt, Lt = K - np.diag(np.diag(K)), L - np.diag(np.diag(L))
    one = np.ones(n)
    return float((np.trace(Kt @ Lt) + (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
                  - 2.0 / (n - 2) * (one @ Kt @ Lt @ one)) / (n * (n - 3)))


def reference_rbf_kernel(X, bandwidth):
    """exp(−D / (2 bandwidth² median(D))), the median over all n² entries of D."""
    X = np.asarray(X, dtype=np.float64)
    D = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    return np.exp(-D / (2 * bandwidth**2 * np.median(D)))


def linear_kernel(X):
    X = np.asarray(X, dtype=np.float64)
    return X @ X.T


def demo_data():
    """The CKA authors' demo input."""
    state = np.random.RandomState(1337)  # np.random.seed(1337) then two randn calls
    X = state.randn(100, 10)
    Y = state.randn(100, 10) + X
    return X, Y


# --- published values --------------------------------------------------------------------


def test_reproduces_the_published_demo_values_to_5_decimals():
    X, Y = demo_data()
    assert abs(cka.linear_cka(X, Y) - 0.55761) < 5e-6
    assert abs(cka.debiased_linear_cka(X, Y) - 0.51346) < 5e-6
    assert abs(cka.rbf_cka(X, Y, bandwidth=0.5) - 0.65483) < 5e-6


def test_default_bandwidth_is_the_benchmark_winner():
    # 0.2 × the median distance matched layers best in analysis/layer_matching.py.
    assert cka.DEFAULT_BANDWIDTH == 0.2
    X, Y = demo_data()
    expected = reference_cka(reference_rbf_kernel(X, 0.2), reference_rbf_kernel(Y, 0.2))
    assert cka.rbf_cka(X, Y) == pytest.approx(expected, rel=1e-10)
    assert abs(cka.rbf_cka(X, Y) - 0.65483) > 1e-3  # not the demo's σ = 0.5
    np.testing.assert_allclose(cka.rbf_cka_matrix([X], [Y]), [[expected]], rtol=1e-10)


@pytest.mark.parametrize("n,d_x,d_y", [(100, 10, 10), (30, 50, 70), (200, 5, 3)])
def test_linear_and_debiased_match_the_full_matrix_definitions(n, d_x, d_y):
    rng = np.random.default_rng(n)
    X = rng.standard_normal((n, d_x))
    Y = X[:, :min(d_x, d_y)] @ rng.standard_normal((min(d_x, d_y), d_y)) \
        + rng.standard_normal((n, d_y))
    K, L = linear_kernel(X), linear_kernel(Y)
    np.testing.assert_allclose(cka.linear_cka(X, Y), reference_cka(K, L), rtol=1e-10)
    expected = reference_unbiased_hsic(K, L) / np.sqrt(reference_unbiased_hsic(K, K)
                                                        * reference_unbiased_hsic(L, L))
    np.testing.assert_allclose(cka.debiased_linear_cka(X, Y), expected, rtol=1e-9)


@pytest.mark.parametrize("bandwidth", [0.5, 1.0, 2.3])
@pytest.mark.parametrize("n", [5, 64, 131])
def test_rbf_matches_the_full_matrix_definition(n, bandwidth):
    rng = np.random.default_rng(n)
    X = rng.standard_normal((n, 12), dtype=np.float32)
    Y = np.tanh(X @ rng.standard_normal((12, 20), dtype=np.float32))
    expected = reference_cka(reference_rbf_kernel(X, bandwidth), reference_rbf_kernel(Y, bandwidth))
    np.testing.assert_allclose(cka.rbf_cka(X, Y, bandwidth=bandwidth), expected, rtol=1e-10)


# --- invariances -------------------------------------------------------------------------


MEASURES = {"linear": cka.linear_cka, "debiased": cka.debiased_linear_cka, "rbf": cka.rbf_cka}


@pytest.mark.parametrize("name", MEASURES)
def test_a_matrix_with_itself_is_1(name):
    X, _ = demo_data()
    assert MEASURES[name](X, X) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("name", MEASURES)
def test_invariant_to_orthogonal_maps_and_isotropic_scaling_not_to_general_maps(name):
    measure = MEASURES[name]
    X, Y = demo_data()
    transform = np.random.RandomState(7).randn(10, 10)
    _, orthogonal = np.linalg.eigh(transform.T @ transform)
    base = measure(X, Y)
    assert measure(X @ orthogonal, Y) == pytest.approx(base, abs=1e-10)
    assert measure(X * 1.337, Y) == pytest.approx(base, abs=1e-10)
    assert measure(X, Y @ orthogonal * 0.01) == pytest.approx(base, abs=1e-10)
    assert abs(measure(X @ transform, Y) - base) > 1e-3


def test_debiased_removes_the_few_rows_bias_that_linear_cka_has_on_noise():
    """Independent noise, 100 rows, widths 384 and 768: linear CKA ~0.84, debiased ~0."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((100, 384), dtype=np.float32)
    Y = rng.standard_normal((100, 768), dtype=np.float32)
    assert cka.linear_cka(X, Y) > 0.8
    assert abs(cka.debiased_linear_cka(X, Y)) < 0.05


# --- the kernels against their loop twins ------------------------------------------------


def _gram_and_norms(n, seed=0):
    X = np.random.default_rng(seed).standard_normal((n, 6))
    X[3] = X[1]  # two identical rows: a distance that rounding may make negative
    gram = X @ X.T
    return gram, np.diagonal(gram).copy()


@pytest.mark.parametrize("twin", ["serial", "parallel"])
@pytest.mark.parametrize("n", [4, 150, 151])  # odd n: a middle row alone in its pair
@pytest.mark.parametrize("capacity", [10**6, 3])  # 3: groups overflow their buffer rows
def test_squared_distances_kernel_and_its_bracket_match_their_twins(twin, n, capacity):
    gram, norms = _gram_and_norms(n)
    out = np.full(n * (n - 1) // 2, np.nan)
    counts = np.full((rbf.N_GROUPS, 2), -1, dtype=np.int64)
    window = np.full((rbf.N_GROUPS, min(capacity, out.size) + 1), np.nan)
    distances = naive.squared_distances(gram, norms)
    lo, hi = np.quantile(distances, [0.3, 0.6])  # entries below, inside and above
    getattr(rbf, f"squared_distances_{twin}")(gram, norms, lo, hi, out, counts, window)
    np.testing.assert_array_equal(out, distances)
    assert out[naive._packed_index(3, 1)] == 0.0
    below, inside = naive.bracket_entries(out, n, lo, hi, rbf.N_GROUPS)
    np.testing.assert_array_equal(counts[:, 0], below)
    np.testing.assert_array_equal(counts[:, 1], [len(entries) for entries in inside])
    assert counts[:, 0].sum() > 0 and counts[:, 1].sum() > 0
    assert counts.sum() < out.size or n == 4
    kept = window.shape[1] - 1
    for g, entries in enumerate(inside):
        np.testing.assert_array_equal(window[g, :min(len(entries), kept)], entries[:kept])
    if capacity == 3 and n > 4:
        assert counts[:, 1].max() > kept  # the overflow the caller must detect


@pytest.mark.parametrize("twin", ["serial", "parallel"])
def test_gather_window_kernel_matches_its_twin(twin):
    n = 151
    rng = np.random.default_rng(8)
    packed = np.round(rng.random(n * (n - 1) // 2) * 50) / 7  # ties, values on the edges
    for lo, hi in ((1.0, 5.0), (3.0, 3.0 + 1e-12), (0.0, np.inf)):
        _, inside = naive.bracket_entries(packed, n, lo, hi, rbf.N_GROUPS)
        sizes = np.array([len(entries) + 1 for entries in inside])
        offsets = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        out = np.full(sizes.sum(), np.nan)
        getattr(rbf, f"gather_window_{twin}")(packed, n, lo, hi, offsets, out)
        for g, entries in enumerate(inside):
            np.testing.assert_array_equal(out[offsets[g]:offsets[g] + len(entries)], entries)
        assert sum(map(len, inside)) > 0


@pytest.mark.parametrize("twin", ["serial", "parallel"])
def test_histogram_and_gather_kernels_match_their_twins(twin):
    n = 151
    rng = np.random.default_rng(8)
    packed = np.round(rng.random(n * (n - 1) // 2) * 50) / 7  # ties, values on bin edges
    lo, hi = 1.0, 5.0
    counts = np.full((rbf.N_GROUPS, rbf.N_BINS + 2), -1, dtype=np.int64)
    getattr(rbf, f"histogram_{twin}")(packed, n, lo, hi, counts)
    np.testing.assert_array_equal(counts, naive.histogram(packed, n, lo, hi, rbf.N_GROUPS,
                                                          rbf.N_BINS))
    for first, last in ((1, 2000), (1500, rbf.N_BINS), (1, 1)):  # slots of bins only
        group_counts = counts[:, first:last + 1].sum(axis=1)
        out = np.full(group_counts.sum(), np.nan)
        offsets = np.concatenate(([0], np.cumsum(group_counts)[:-1]))
        getattr(rbf, f"gather_{twin}")(packed, n, lo, hi, first, last, offsets, out)
        expected = naive.gather(packed, n, lo, hi, first, last, rbf.N_GROUPS, rbf.N_BINS)
        assert expected.size > 0
        np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("n", [5, 64, 150])
def test_block_row_sums_kernel_matches_its_twin(n):
    gram, norms = _gram_and_norms(n, seed=n)
    packed = np.exp(-naive.squared_distances(gram, norms) / 3.5)
    n_blocks = -(-n // rbf.BLOCK_ROWS)
    row_sums, partials = np.full(n, np.nan), np.full((n_blocks, n), np.nan)
    for block in range(n_blocks):
        rbf.block_row_sums(packed, n, block, row_sums, partials)
        lower, columns = naive.block_row_sums(packed, n, block, rbf.BLOCK_ROWS)
        np.testing.assert_allclose([row_sums[i] for i in lower], list(lower.values()),
                                   rtol=1e-14)
        np.testing.assert_allclose(partials[block], columns, rtol=1e-14)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n", [5, 64, 150])
def test_kernel_values_match_their_twin_and_not_the_threads(threads, n, monkeypatch):
    monkeypatch.setattr(_rbf_workspace, "_EXP_CHUNK", 1000)  # several NumPy calls per block
    gram, norms = _gram_and_norms(n, seed=n)
    distances = naive.squared_distances(gram, norms)
    packed, row_sums = distances.copy(), np.full(n, np.nan)
    partials = np.full((-(-n // rbf.BLOCK_ROWS), n), np.nan)
    _rbf_workspace.kernel_values(packed, n, -3.5, row_sums, partials, threads)
    kernel, expected_sums = naive.rbf_row_sums(distances, n, 3.5)
    # exp(D · (1/3.5)) against exp(−D/3.5): the argument may differ in its last bit,
    # which moves the value by up to |D/3.5| ulps (arguments up to about 15 here).
    np.testing.assert_allclose(packed, kernel, rtol=4e-15)
    np.testing.assert_allclose(row_sums, expected_sums, rtol=1e-13)
    single, single_sums = distances.copy(), np.empty(n)
    _rbf_workspace.kernel_values(single, n, -3.5, single_sums, partials, 1)
    # Said in full when it fails: its rare failures were row sums that depended on where the
    # arrays lay in memory (test_row_sums_do_not_depend_on_where_the_arrays_lie).
    differ = {name: np.flatnonzero(a != b)[:5].tolist() for name, a, b in
              (("packed", packed, single), ("row_sums", row_sums, single_sums))}
    assert packed.tobytes() == single.tobytes() and row_sums.tobytes() == single_sums.tobytes(), (
        f"entries that differ: {differ}; addresses mod 64: {packed.ctypes.data % 64}, "
        f"{single.ctypes.data % 64}")


def test_row_sums_do_not_depend_on_where_the_arrays_lie():
    """Same bits wherever the arrays sit around each other (docs/numerics.md, §6).

    ``packed[start + j]`` may wrap (Numba allows negative indices), so LLVM's run-time
    overlap check reaches len(packed) past its end: arrays placed there once sent some
    rows down the scalar loop, which sums in another order.
    """
    n = 150
    gram, norms = _gram_and_norms(n, seed=n)
    values = np.exp(naive.squared_distances(gram, norms) * (1 / -3.5))
    size, n_blocks = values.size, -(-n // rbf.BLOCK_ROWS)

    def block_sums(packed, row_sums, partials):
        packed[:] = values
        for block in range(n_blocks):
            rbf.block_row_sums(packed, n, block, row_sums, partials)
        return row_sums.tobytes() + partials.tobytes()

    def centred(packed, out):
        packed[:] = values
        means = np.linspace(0.0, 0.5, n)
        squares = [rbf._centre_row(packed, i * (i - 1) // 2, i, 0.25, means, out[:i])
                   for i in range(1, n)]
        return np.array(squares).tobytes()

    expected = (block_sums(values.copy(), np.empty(n), np.empty((n_blocks, n))),
                centred(values.copy(), np.empty(n)))
    memory = np.empty(2 * size + n_blocks * n + 400)
    for gap in range(0, 400, 3):  # the other array after the packed one, past its end
        packed = memory[:size]
        partials = memory[size + gap: size + gap + n_blocks * n].reshape(n_blocks, n)
        assert block_sums(packed, np.empty(n), partials) == expected[0], gap
        assert centred(packed, memory[size + gap: size + gap + n]) == expected[1], gap
        before = memory[n + 400: n + 400 + size]  # the row sums before the packed array
        assert block_sums(before, memory[gap: gap + n], np.empty((n_blocks, n))) == expected[0]


@pytest.mark.parametrize("n", [5, 256, 700])  # one block, exactly one, a partial last one
def test_gram_blocks_give_the_lower_triangle_whatever_the_threads(n):
    from threadpoolctl import threadpool_limits

    x = cka._centred(np.random.default_rng(n).standard_normal((n, 40)).astype(np.float32))
    rows, columns = np.tril_indices(n)
    results = []
    with threadpool_limits(1, user_api="blas"):
        for threads in (1, 2, 3):
            gram = np.full((n, n), np.nan)
            _rbf_workspace.gram_lower(x, gram, threads)
            results.append(gram[rows, columns].tobytes())
    np.testing.assert_allclose(gram[rows, columns], (x @ x.T)[rows, columns], rtol=1e-12,
                               atol=1e-12 * np.abs(x).max() ** 2 * x.shape[1])
    assert len(set(results)) == 1


def _blas_threads(libraries=None):
    """Thread limit of each BLAS library loaded (or of ``libraries``), by file."""
    from threadpoolctl import threadpool_info

    limits = {info["filepath"]: info["num_threads"] for info in threadpool_info()
              if info["user_api"] == "blas"}
    return limits if libraries is None else {name: limits[name] for name in libraries}


def test_gram_limit_on_blas_threads_is_restored():
    before = _blas_threads()
    cka.rbf_cka(*np.random.default_rng(0).standard_normal((2, 300, 8)))
    assert _blas_threads(before) == before


def test_concurrent_rbf_calls_give_the_same_bits_and_restore_the_blas_limit():
    """Calls from several threads share one limit: the last one out restores it."""
    import threading

    rng = np.random.default_rng(5)
    pairs = [(rng.standard_normal((700, 30)), rng.standard_normal((700, 50))) for _ in range(4)]
    before = _blas_threads()
    alone = [cka.rbf_cka(X, Y).hex() for X, Y in pairs]
    results = {}

    def call(k):
        for _ in range(3):
            results.setdefault(k, set()).add(cka.rbf_cka(*pairs[k]).hex())

    threads = [threading.Thread(target=call, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[k] for k in range(4)] == [{value} for value in alone]
    assert _blas_threads(before) == before


@pytest.mark.parametrize("parallel", [False, True])
def test_kernel_underflow_is_not_an_error_even_when_numpy_raises(parallel):
    """Far rows' kernel values underflow to 0 by design, whatever np.seterr says."""
    rng = np.random.default_rng(4)
    X = rng.standard_normal((600, 5))
    X[:3] *= 100.0  # exp(−D/2σ²) below the smallest float64 for their pairs
    expected = cka._rbf_matrix([X], [X[:, :3]], None, 0.05, None, 0, ("X", "Y"), parallel)
    with np.errstate(all="raise"):
        value = cka._rbf_matrix([X], [X[:, :3]], None, 0.05, None, 0, ("X", "Y"), parallel)
    assert value.tobytes() == expected.tobytes()
    with np.errstate(all="raise"), pytest.raises(FloatingPointError):
        np.exp(np.array([-800.0]))  # the inputs do underflow


@pytest.mark.parametrize("twin", ["serial", "parallel"])
@pytest.mark.parametrize("n", [5, 200])  # 200: more rows than groups
def test_centred_inner_products_kernel_matches_its_twin(twin, n):
    m = n * (n - 1) // 2
    rng = np.random.default_rng(2)
    stack, means, grand_means = rng.random((3, m)), rng.random((3, n)), rng.random(3)
    stack_diagonal = rng.standard_normal((3, n))
    packed, row_means, grand_mean = rng.random(m), rng.random(n), 0.41
    centred, diagonal = naive.centre_packed(packed, n, row_means, grand_mean, np.ones(n))
    centred_stack = np.array([naive.centre_packed(stack[k], n, means[k], grand_means[k],
                                                  np.ones(n))[0] for k in range(3)])
    kernel = getattr(rbf, f"centred_inner_products_{twin}")
    out = np.full(7, np.nan)
    kernel(stack, means, grand_means, stack_diagonal, packed, n, row_means, grand_mean,
           diagonal, out)
    expected = naive.packed_inner_products(np.vstack([centred_stack, centred]),
                                           np.vstack([stack_diagonal, diagonal]), centred,
                                           diagonal)
    np.testing.assert_allclose(out[:4], expected, rtol=1e-12)
    np.testing.assert_allclose(out[4:], [naive.packed_inner_products(
        centred_stack[k:k + 1], stack_diagonal[k:k + 1], centred_stack[k], stack_diagonal[k])[0]
        for k in range(3)], rtol=1e-12)
    alone = np.full(1, np.nan)  # no stack: the same self product, bit for bit
    kernel(stack[:0], means[:0], grand_means[:0], stack_diagonal[:0], packed, n, row_means,
           grand_mean, diagonal, alone)
    assert alone[0] == out[3]
    swapped = np.full(3, np.nan)  # the roles swapped: the same products, bit for bit
    kernel(packed[None], row_means[None], np.array([grand_mean]), diagonal[None], stack[1], n,
           means[1], grand_means[1], stack_diagonal[1], swapped)
    assert (swapped[0], swapped[1], swapped[2]) == (out[1], out[5], out[3])


def test_packed_storage_holds_the_full_symmetric_matrix():
    """The passes chained give the full kernel, its centring and the Frobenius products."""
    rng = np.random.default_rng(3)
    X, Y = rng.standard_normal((40, 5)), rng.standard_normal((40, 3))
    H = _centring(40)
    ws = _rbf_workspace.RBFWorkspace(40)
    rows, cols = np.tril_indices(40, -1)
    packed, diagonals, means = {}, {}, {}
    for name, A, bandwidth in (("X", X, 0.8), ("Y", Y, 0.3)):
        K = reference_rbf_kernel(A, bandwidth)
        packed[name], diagonals[name] = np.empty(ws.n_entries), np.empty(40)
        means[name] = ws.kernel(cka._centred(A), bandwidth, name, packed[name], diagonals[name])
        np.testing.assert_allclose(packed[name], K[rows, cols], rtol=1e-13)
        np.testing.assert_allclose(means[name][0], K.mean(axis=1), rtol=1e-13)
        np.testing.assert_allclose(means[name][1], K.mean(), rtol=1e-13)
        np.testing.assert_allclose(diagonals[name], np.diagonal(H @ K @ H), atol=1e-14)
    out = np.empty(3)
    rbf.centred_inner_products_serial(
        packed["X"][None], means["X"][0][None], np.array([means["X"][1]]), diagonals["X"][None],
        packed["Y"], 40, means["Y"][0], means["Y"][1], diagonals["Y"], out)
    Kc = H @ reference_rbf_kernel(X, 0.8) @ H
    Lc = H @ reference_rbf_kernel(Y, 0.3) @ H
    np.testing.assert_allclose(out, [(Kc * Lc).sum(), (Lc * Lc).sum(), (Kc * Kc).sum()],
                               rtol=1e-12)


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("kind", ["normal", "repeated rows", "outlier", "integers", "zeros"])
@pytest.mark.parametrize("n", [4, 5, 120, 301])
def test_median_of_the_distances_is_numpys_over_the_full_matrix(n, kind, parallel, monkeypatch):
    """The histogram search: narrowing (few candidates allowed), widening, ties, all zeros."""
    monkeypatch.setattr(_rbf_workspace, "_MEDIAN_CANDIDATES", 7)
    rng = np.random.default_rng(n)
    X = rng.standard_normal((n, 5))
    if kind == "repeated rows":
        X[: n // 2 + 1] = X[0]
    elif kind == "outlier":
        X[-1] *= 1e6  # most distances far below twice the mean
    elif kind == "integers":
        X = np.round(X)  # many exactly equal distances
    elif kind == "zeros":
        X[:] = 0.0
    ws = _rbf_workspace.RBFWorkspace(n, parallel)
    full = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    rows, cols = np.tril_indices(n, -1)
    packed = full[rows, cols].copy()
    hi = 2.0 * packed.mean() or 1.0  # the first range, as distances_and_median starts it
    assert ws._median_by_histogram(packed, hi) == np.median(full)


def _full_from_packed(packed, n):
    """The symmetric n × n matrix (zero diagonal) of a packed strict lower triangle."""
    full = np.zeros((n, n))
    full[np.tril_indices(n, -1)] = packed
    return full + full.T


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("sigmas", [6.0, 0.0])  # 0: a bracket that often misses the median
@pytest.mark.parametrize("kind", ["normal", "repeated rows", "outlier", "integers", "zeros"])
@pytest.mark.parametrize("n", [5, 120, 301])
def test_median_from_a_sampled_bracket_is_numpys(n, kind, sigmas, parallel, monkeypatch):
    """The bracket drawn from a sample; a miss, a full buffer or ties fall back, never err."""
    monkeypatch.setattr(_rbf_workspace, "_MEDIAN_SAMPLE", 64)  # the sampled path from 12 rows on
    monkeypatch.setattr(_rbf_workspace, "_BRACKET_SIGMAS", sigmas)
    fallbacks = []
    search = _rbf_workspace.RBFWorkspace._order_statistics
    monkeypatch.setattr(_rbf_workspace.RBFWorkspace, "_order_statistics",
                        lambda self, *args: fallbacks.append(1) or search(self, *args))
    rng = np.random.default_rng(n)
    X = rng.standard_normal((n, 5))
    if kind == "repeated rows":
        X[: n // 2 + 1] = X[0]
    elif kind == "outlier":
        X[-1] *= 1e6
    elif kind == "integers":
        X = np.round(X)
    elif kind == "zeros":
        X[:] = 0.0
    gram = X @ X.T
    full = _full_from_packed(naive.squared_distances(gram, np.diagonal(gram)), n)
    ws = _rbf_workspace.RBFWorkspace(n, parallel)
    packed = np.empty(ws.n_entries)
    for _ in range(2):  # the second call reuses the sample and the buffer
        assert ws.distances_and_median(gram, np.diagonal(gram).copy(), packed) == np.median(full)
    np.testing.assert_array_equal(packed, naive.squared_distances(gram, np.diagonal(gram)))
    if (n, kind, sigmas) == (301, "normal", 6.0):
        assert not fallbacks  # the fast path is the one taken
    if (n, kind, sigmas) == (301, "normal", 0.0):
        assert fallbacks


def test_median_bracket_buffer_overflow_takes_the_gather_pass(monkeypatch):
    n = 301
    X = np.random.default_rng(0).standard_normal((n, 5))
    gram = X @ X.T
    full = _full_from_packed(naive.squared_distances(gram, np.diagonal(gram)), n)
    monkeypatch.setattr(_rbf_workspace, "_MEDIAN_SAMPLE", 64)
    ws = _rbf_workspace.RBFWorkspace(n)
    monkeypatch.setattr(ws, "_window", lambda lo, hi: np.empty((rbf.N_GROUPS, 2)))
    gathered = []
    gather = rbf.gather_window_serial
    monkeypatch.setattr(rbf, "gather_window_serial",
                        lambda *args: gathered.append(1) or gather(*args))
    ws.parallel = False
    assert ws.distances_and_median(gram, np.diagonal(gram).copy(),
                                   np.empty(ws.n_entries)) == np.median(full)
    assert gathered


# --- all pairs, subsample, mask ----------------------------------------------------------


def _layers(n=90, widths=(7, 9, 11), seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, 6))
    return [np.tanh(base @ rng.standard_normal((6, w)) + 0.3 * rng.standard_normal((n, w)))
            .astype(dtype) for w in widths]


@pytest.mark.parametrize("n_s,n_t", [(2, 3), (3, 2)])  # either side kept in memory
def test_rbf_matrix_equals_every_pair_alone(n_s, n_t):
    layers = _layers(widths=(5, 7, 9, 11, 13))
    student, teacher = layers[:n_s], layers[n_s:n_s + n_t]
    matrix = cka.rbf_cka_matrix(student, teacher)
    assert matrix.shape == (n_s, n_t)
    for s in range(n_s):
        for t in range(n_t):
            assert matrix[s, t] == cka.rbf_cka(student[s], teacher[t])
            np.testing.assert_allclose(
                matrix[s, t], reference_cka(reference_rbf_kernel(student[s], 0.2),
                                            reference_rbf_kernel(teacher[t], 0.2)), rtol=1e-10)


def test_rbf_matrix_mask_selects_rows_before_anything():
    student, teacher = _layers(n=60, widths=(4, 6))[:1], _layers(n=60, widths=(5,), seed=1)
    batched = [a.reshape(6, 10, -1) for a in student], [a.reshape(6, 10, -1) for a in teacher]
    mask = np.random.default_rng(0).random((6, 10)) < 0.7
    mask[:, -2:] = False  # right padding
    garbage = [a.copy() for a in batched[0]]
    garbage[0][~mask] = 1e6  # padding may hold anything
    got = cka.rbf_cka_matrix(garbage, batched[1], mask=mask)
    rows = mask.ravel()
    expected = cka.rbf_cka(student[0][rows], teacher[0][rows])
    assert got[0, 0] == expected


def test_rbf_subsample_is_reproducible_and_the_same_rows_for_every_layer():
    student, teacher = _layers(n=300, widths=(6,)), _layers(n=300, widths=(8, 9), seed=4)
    first = cka.rbf_cka_matrix(student, teacher, max_rows=50, seed=3)
    np.testing.assert_array_equal(first, cka.rbf_cka_matrix(student, teacher, max_rows=50,
                                                             seed=3))
    assert not np.array_equal(first, cka.rbf_cka_matrix(student, teacher, max_rows=50, seed=4))
    rows = np.sort(np.random.default_rng(3).choice(300, 50, replace=False))
    for t in range(2):
        assert first[0, t] == cka.rbf_cka(student[0][rows], teacher[t][rows])
    # The single-pair function draws the same rows.
    assert cka.rbf_cka(student[0], teacher[1], max_rows=50, seed=3) == first[0, 1]


def test_rbf_default_uses_at_most_4096_rows():
    assert cka._check_max_rows(None, 5000) == cka.DEFAULT_MAX_ROWS == 4096
    assert cka._check_max_rows(None, 100) == 100


def test_buffers_kept_between_calls_change_nothing_and_can_be_released():
    student, teacher = _layers(n=80, widths=(5, 6)), _layers(n=80, widths=(7,), seed=9)
    first = cka.rbf_cka_matrix(student, teacher)
    kept = _rbf_workspace._local.rbf
    assert kept is not None and kept.n == 80
    cka.rbf_cka(student[0][:50], teacher[0][:50])  # other rows: new buffers
    assert _rbf_workspace._local.rbf is not kept and _rbf_workspace._local.rbf.n == 50
    np.testing.assert_array_equal(cka.rbf_cka_matrix(student, teacher), first)
    cka.release_buffers()
    assert _rbf_workspace._local.rbf is None
    np.testing.assert_array_equal(cka.rbf_cka_matrix(student, teacher), first)


def test_alignment_stats_streaming_cka_agrees_with_the_direct_estimates():
    """AlignmentStats' CKA from streaming statistics: an independent computation."""
    import inspect

    import pkd

    student, teacher = _layers(n=150, widths=(5, 12)), _layers(n=150, widths=(7, 3), seed=6)
    stats = pkd.AlignmentStats.from_arrays(student, teacher, chunk_rows=64)
    expected = [[cka.linear_cka(s, t) for t in teacher] for s in student]
    np.testing.assert_allclose(stats.cka(), expected, rtol=1e-9)
    if "debiased" not in inspect.signature(stats.cka).parameters:
        pytest.skip("this AlignmentStats.cka has no debiased= (branch trust-core)")
    expected = [[cka.debiased_linear_cka(s, t) for t in teacher] for s in student]
    np.testing.assert_allclose(stats.cka(debiased=True), expected, rtol=1e-9)


# --- minibatch CKA -----------------------------------------------------------------------


def test_minibatch_one_batch_is_debiased_linear_cka():
    student, teacher = _layers(widths=(5, 8)), _layers(widths=(6, 9, 4), seed=2)
    acc = cka.MinibatchCKA()
    acc.update(student, teacher)
    expected = [[cka.debiased_linear_cka(s, t) for t in teacher] for s in student]
    np.testing.assert_allclose(acc.value(), expected, rtol=1e-10)
    assert acc.n_batches == 1 and acc.n_rows == 90


@pytest.mark.parametrize("gram_path", [True, False])
def test_minibatch_sums_per_batch_unbiased_hsic_then_normalises(gram_path, monkeypatch):
    if not gram_path:
        monkeypatch.setattr(cka, "_GRAM_PATH_MAX_BYTES", 0)
    student, teacher = _layers(n=120, widths=(5, 30)), _layers(n=120, widths=(40,), seed=5)
    sizes = (50, 30, 40)
    acc = cka.MinibatchCKA()
    cross, self_s, self_t = np.zeros((2, 1)), np.zeros(2), np.zeros(1)
    start = 0
    for size in sizes:
        rows = slice(start, start + size)
        start += size
        acc.update([a[rows] for a in student], [a[rows] for a in teacher])
        ks = [linear_kernel(a[rows]) for a in student]
        ls = [linear_kernel(a[rows]) for a in teacher]
        for s, K in enumerate(ks):
            self_s[s] += reference_unbiased_hsic(K, K)
            for t, L in enumerate(ls):
                cross[s, t] += reference_unbiased_hsic(K, L)
        for t, L in enumerate(ls):
            self_t[t] += reference_unbiased_hsic(L, L)
    np.testing.assert_allclose(acc.value(), cross / np.sqrt(np.outer(self_s, self_t)),
                               rtol=1e-9)


def test_minibatch_mask_drops_padding():
    student, teacher = _layers(n=40, widths=(5,)), _layers(n=40, widths=(6,), seed=1)
    mask = np.ones(40, dtype=bool)
    mask[30:] = False
    padded = [a.copy() for a in student]
    padded[0][30:] = 7.0
    acc = cka.MinibatchCKA()
    acc.update(padded, teacher, mask=mask)
    expected = cka.debiased_linear_cka(student[0][:30], teacher[0][:30])
    np.testing.assert_allclose(acc.value()[0, 0], expected, rtol=1e-12)


def test_minibatch_errors():
    acc = cka.MinibatchCKA()
    with pytest.raises(ValueError, match="no batch yet"):
        acc.value()
    student, teacher = _layers(n=20, widths=(5,)), _layers(n=20, widths=(6,), seed=1)
    acc.update(student, teacher)
    with pytest.raises(ValueError, match=r"widths \(3,\) \(student\).*earlier batches \(5,\)"):
        acc.update([np.ones((20, 3))], teacher)
    with pytest.raises(ValueError, match="3 selected rows"):
        acc.update([a[:3] for a in student], [a[:3] for a in teacher])
    constant = cka.MinibatchCKA()
    constant.update([np.ones((20, 5), np.float32)], teacher)
    with pytest.raises(ValueError, match="student layer 0.*not positive"):
        constant.value()


# --- bad input: clear errors, never a silent NaN -----------------------------------------


@pytest.mark.parametrize("name", MEASURES)
def test_constant_layer_is_an_error_naming_it(name):
    X, Y = demo_data()
    constant = np.full_like(X, 0.1)  # centring by the mean alone would leave rounding
    with pytest.raises(ValueError, match=r"Y \(shape \(100, 10\)\).*(constant|median)"):
        MEASURES[name](X, constant)


def test_constant_layer_in_the_matrix_names_the_layer():
    student, teacher = _layers(widths=(5,)), _layers(widths=(6, 7), seed=1)
    teacher[1] = np.full_like(teacher[1], 3.0)
    with pytest.raises(ValueError, match=r"teacher_layers\[1\].*median squared distance"):
        cka.rbf_cka_matrix(student, teacher)


def test_mostly_identical_rows_have_no_bandwidth():
    X, Y = demo_data()
    X = X.copy()
    X[:80] = X[0]  # padding rows left in: most pairs at distance 0
    with pytest.raises(ValueError, match="median squared distance between rows is 0"):
        cka.rbf_cka(X, Y)


@pytest.mark.parametrize("bandwidth", [0.0, -1.0, float("nan"), float("inf")])
def test_bandwidth_must_be_positive(bandwidth):
    X, Y = demo_data()
    with pytest.raises(ValueError, match="bandwidth must be finite and > 0"):
        cka.rbf_cka(X, Y, bandwidth=bandwidth)
    with pytest.raises(ValueError, match="bandwidth"):
        cka.rbf_cka_matrix([X], [Y], bandwidth=bandwidth)


def test_max_rows_rules():
    X, Y = demo_data()
    with pytest.raises(ValueError, match="max_rows=101 asks for a subsample larger than the 100"):
        cka.rbf_cka(X, Y, max_rows=101)
    with pytest.raises(ValueError, match="max_rows must be >= 4"):
        cka.rbf_cka(X, Y, max_rows=3)
    with pytest.raises(TypeError, match="max_rows must be an int"):
        cka.rbf_cka(X, Y, max_rows=50.0)
    assert cka.rbf_cka(X, Y, max_rows=100) == cka.rbf_cka(X, Y)


@pytest.mark.parametrize("name", MEASURES)
def test_shape_dtype_and_finiteness_errors(name):
    measure = MEASURES[name]
    X, Y = demo_data()
    with pytest.raises(ValueError, match=r"same rows.*\(100, 10\) and \(99, 10\)"):
        measure(X, Y[:99])
    with pytest.raises(ValueError, match="at least 4 examples"):
        measure(X[:3], Y[:3])
    bad = Y.copy()
    bad[5, 2] = np.nan
    with pytest.raises(ValueError, match=r"Y contains 1 NaN/Inf.*\(5, 2\)"):
        measure(X, bad)
    with pytest.raises(TypeError, match="X must be float32 or float64"):
        measure(X.astype(int), Y)
    with pytest.raises(ValueError, match="X must be 2-D"):
        measure(X[None], Y)


def test_layers_with_different_rows_are_refused():
    student, teacher = _layers(n=50, widths=(5,)), _layers(n=40, widths=(6,))
    with pytest.raises(ValueError, match=r"teacher_layers\[0\] has shape \(40, 6\)"):
        cka.rbf_cka_matrix(student, teacher)
    with pytest.raises(ValueError, match=r"teacher_layers\[0\] has shape \(40, 6\)"):
        cka.MinibatchCKA().update(student, teacher)


def test_debiased_undefined_with_too_few_rows_for_the_spread():
    # Four rows, one spike: the unbiased estimate of HSIC(X, X) is exactly 0.
    X = np.array([[0.0], [0.0], [0.0], [1.0]])
    Y = np.random.default_rng(0).standard_normal((4, 2))
    with pytest.raises(ValueError, match=r"HSIC of X \(shape \(4, 1\)\).*not positive.*more rows"):
        cka.debiased_linear_cka(X, Y)
    assert np.isfinite(cka.linear_cka(X, Y))  # the biased estimate is defined


# --- real-like data ----------------------------------------------------------------------


def _layernorm_features(n, width, dead, rng, bias=True):
    """Float32 LayerNorm outputs whose gains are ~0 on ``dead`` columns (values ~1e-32)."""
    pre = rng.standard_normal((n, 4), dtype=np.float32) @ rng.standard_normal(
        (4, width), dtype=np.float32) + 0.1 * rng.standard_normal((n, width), dtype=np.float32)
    normed = (pre - pre.mean(1, keepdims=True)) / np.sqrt(pre.var(1, keepdims=True) + 1e-5)
    gain = rng.uniform(0.5, 1.5, width).astype(np.float32)
    gain[dead] = 1e-32
    shift = rng.uniform(-0.1, 0.1, width).astype(np.float32) if bias else 0
    out = (normed * gain + shift).astype(np.float32)
    if bias:
        out[:, dead] = (normed[:, dead] * gain[dead]).astype(np.float32)  # ~1e-32, no shift
    return out


def test_layernorm_features_with_dead_dimensions_give_the_same_cka_as_without_them():
    rng = np.random.default_rng(11)
    dead = [0, 5, 17]
    X = _layernorm_features(300, 24, dead, rng)
    Y = _layernorm_features(300, 32, [3], rng)
    assert np.abs(X[:, dead]).max() < 1e-30 and X.dtype == np.float32
    alive_x = np.delete(X, dead, axis=1).astype(np.float64)
    alive_y = np.delete(Y, [3], axis=1).astype(np.float64)
    for name, measure in MEASURES.items():
        got = measure(X, Y)
        assert np.isfinite(got), name
        np.testing.assert_allclose(got, measure(alive_x, alive_y), rtol=1e-9, err_msg=name)
    np.testing.assert_allclose(cka.linear_cka(X, Y),
                               reference_cka(linear_kernel(alive_x), linear_kernel(alive_y)),
                               rtol=1e-9)
    acc = cka.MinibatchCKA()
    for rows in (slice(0, 150), slice(150, 300)):
        acc.update([X[rows]], [Y[rows]])
    assert np.isfinite(acc.value()).all()


def test_large_offset_float32_layer_is_centred_accurately():
    """A layer whose mean dwarfs its spread (massive activations) keeps its CKA."""
    rng = np.random.default_rng(5)
    X = rng.standard_normal((200, 16)).astype(np.float32)
    Y = (X @ rng.standard_normal((16, 16))).astype(np.float32)
    shifted = (Y + np.float32(3e3)).astype(np.float32)
    expected = reference_cka(linear_kernel(X - X.mean(0)),
                             linear_kernel(shifted - shifted.astype(np.float64).mean(0)))
    np.testing.assert_allclose(cka.linear_cka(X, shifted), expected, rtol=1e-9)
    np.testing.assert_allclose(cka.rbf_cka(X, shifted), cka.rbf_cka(X, shifted - shifted[0]),
                               rtol=1e-9)


FRESH_COMPILE = r"""
import numpy as np
from pkd.kernels import rbf
n = 300
m = n * (n - 1) // 2
rng = np.random.default_rng(0)
gram = rng.standard_normal((n, 5)); gram = gram @ gram.T
norms = np.diagonal(gram).copy()
packed = np.empty(m)
rbf.squared_distances_parallel(gram, norms, 0.0, 20.0, packed,
                               np.empty((rbf.N_GROUPS, 2), dtype=np.int64),
                               np.empty((rbf.N_GROUPS, 100)))
rbf.gather_window_parallel(packed, n, 0.0, 1.0, np.zeros(rbf.N_GROUPS, dtype=np.int64),
                           np.empty(packed.size + 1))
counts = np.empty((rbf.N_GROUPS, rbf.N_BINS + 2), dtype=np.int64)
rbf.histogram_parallel(packed, n, 0.0, 20.0, counts)
sizes = counts[:, 1:3].sum(axis=1)
rbf.gather_parallel(packed, n, 0.0, 20.0, 1, 2, np.concatenate(([0], np.cumsum(sizes)[:-1])),
                    np.empty(sizes.sum()))
rbf.centred_inner_products_parallel(packed[None], np.ones((1, n)), np.ones(1), np.ones((1, n)),
                                    packed, n, np.ones(n), 1.0, np.ones(n), np.empty(3))
print("compiled")
"""


@pytest.mark.parametrize("name", ["squared_distances", "gather_window", "histogram", "gather",
                                  "centred_inner_products"])
def test_twins_have_cache_files_of_their_own(name):
    """Numba names cache files after the function: twins of one function would share them."""
    serial, parallel = getattr(rbf, f"{name}_serial"), getattr(rbf, f"{name}_parallel")
    assert serial.targetoptions.get("parallel") is not True
    assert parallel.targetoptions["parallel"] is True
    assert serial.py_func.__qualname__ != parallel.py_func.__qualname__
    assert serial.py_func.__code__ is parallel.py_func.__code__  # the same source


def test_parallel_twins_compile_first_in_a_fresh_cache(tmp_path):
    """Compiled before their serial twins (as a large first call does), with no cache.

    The prange index may be typed unsigned; an index computed from it and a
    signed value would then be a float, which no array accepts.
    """
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", FRESH_COMPILE], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "compiled"


# --- independent of the thread count ------------------------------------------------------


SCRIPT = r"""
import hashlib, sys
import numpy as np
from pkd import _rbf_workspace, cka

_rbf_workspace.PARALLEL_MIN_ENTRIES = 0 if sys.argv[1] == "parallel" else 1 << 62
rng = np.random.default_rng(0)
student = [rng.standard_normal((700, w), dtype=np.float32) for w in (20, 30)]
teacher = [np.tanh(student[0] @ rng.standard_normal((20, 40), dtype=np.float32))
           for _ in range(3)]
digest = hashlib.sha256()
digest.update(cka.rbf_cka_matrix(student, teacher, max_rows=650, seed=1).tobytes())
digest.update(np.float64(cka.rbf_cka(student[1], teacher[2])).tobytes())
# Rounding may hide a bit of the Gram matrix in the sums: its own digest too, at a size where
# one multi-threaded BLAS call per block gives other bits than single-threaded ones.
wide = rng.standard_normal((950, 40), dtype=np.float32)
digest.update(np.float64(cka.rbf_cka(wide, wide[:, :30])).tobytes())
digest.update(np.tril(_rbf_workspace._local.rbf.gram).tobytes())
print(digest.hexdigest())
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores to run 2 threads")
def test_rbf_bit_identical_with_one_and_two_threads_and_both_twins(tmp_path):
    results = {}
    # Numba threads, twin, BLAS threads (and so the Gram matrix's Python threads).
    for threads, twin, blas in [(1, "serial", 2), (1, "parallel", 2), (2, "serial", 2),
                                (2, "parallel", 2), (2, "parallel", 1), (1, "serial", 1)]:
        env = dict(os.environ, NUMBA_NUM_THREADS=str(threads),
                   OPENBLAS_NUM_THREADS=str(blas))
        if (threads, twin, blas) == (2, "parallel", 2):
            # An empty cache makes the parallel twins the first to compile in the process,
            # which once failed to type (an unsigned prange index mixed with int64).
            env["NUMBA_CACHE_DIR"] = str(tmp_path / "numba-cache")
        out = subprocess.run([sys.executable, "-c", SCRIPT, twin], capture_output=True,
                             text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr
        results[(threads, twin, blas)] = out.stdout.strip()
    assert len(results[(1, "serial", 2)]) == len(hashlib.sha256().hexdigest())
    assert len(set(results.values())) == 1, results
