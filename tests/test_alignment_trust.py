"""AlignmentStats on what users have: a reachable best loss, held-out folds, debiased CKA.

Witnesses: numpy.linalg.lstsq(rcond=1e-6) (the closed form's cut), an explicit
two-pass numpy fit on the training rows scored on the held-out rows, the
O(N²) unbiased HSIC of tests/reference.py, and the CKA authors' published
demo values.
"""

from __future__ import annotations

import numpy as np
import pytest

import reference
from pkd.alignment import AlignmentStats, FoldEstimate
from pkd.closed_form import default_cutoff, solve_projection
from pkd.io import load_dump, save_dump


def relative(a, b):
    return abs(float(a) - float(b)) / abs(float(b))


# ------------------------------------------------------------------ real-like hidden states


@pytest.fixture(scope="module")
def layernorm_states():
    """Mean-pooled float32 LayerNorm outputs of a small trained network, some gains at 1e-30.

    Returns ``(student, teacher)``: the student is the network with three gains
    (and biases) set to 1e-30 (dead columns, as trained transformers have), the
    teacher the same layer before, so an exact fit would use weights of 1e30.
    """
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    vocab, width, n_seq, seq_len = 40, 24, 1200, 8
    embedding = torch.nn.Embedding(vocab, width)
    linear = torch.nn.Linear(width, width)
    norm = torch.nn.LayerNorm(width)
    head = torch.nn.Linear(width, 5)
    params = [*embedding.parameters(), *linear.parameters(), *norm.parameters(),
              *head.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    tokens = torch.randint(0, vocab, (n_seq, seq_len),
                           generator=torch.Generator().manual_seed(0))
    labels = tokens.sum(1) % 5

    def hidden():
        h = embedding(tokens)
        return norm(h + torch.nn.functional.gelu(linear(h)))

    for _ in range(40):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(head(hidden().mean(1)), labels).backward()
        optimizer.step()
    with torch.no_grad():
        teacher = hidden().mean(1).numpy().astype(np.float32)
        norm.weight[[3, 7, 11]] = 1e-30
        norm.bias[[3, 7, 11]] = 0.0
        student = hidden().mean(1).numpy().astype(np.float32)
    return student, teacher


def check_reachable(stats, S, T):
    """The invariant of #24 on one pair, against lstsq(rcond=1e-6) on the same rows."""
    S64, T64 = S.astype(np.float64), T.astype(np.float64)
    P_ref = np.linalg.lstsq(S64, T64, rcond=1e-6)[0]
    mse_ref = np.mean((S64 @ P_ref - T64) ** 2)
    mse = stats.min_mse()[0, 0]
    P = stats.projection(0, 0)
    # Evaluated as a student would: P and S in float32, float32 arithmetic.
    residual = (S @ P.astype(np.float32) - T).astype(np.float64)
    assert relative(np.mean(residual**2), mse) < 1e-3
    assert relative(mse, mse_ref) < 1e-3
    assert np.linalg.norm(P) < 10 * np.linalg.norm(P_ref)
    return mse, P


def test_dead_layernorm_columns_are_cut_as_lstsq_rcond_1e_6(layernorm_states):
    S, T = layernorm_states
    assert np.abs(S[:, [3, 7, 11]]).max() < 1e-29  # the dead columns are there
    stats = AlignmentStats.from_arrays([S], [T], chunk_rows=256)
    assert stats.student_dtypes == (np.dtype(np.float32),)
    check_reachable(stats, S, T)
    # The test has teeth: without the cut, the fit uses the dead columns with 1e30 weights.
    assert np.abs(stats.projection(0, 0, cutoff=0.0)).max() > 1e20
    assert stats.min_mse(cutoff=0.0)[0, 0] < 1e-3 * stats.min_mse()[0, 0]


def test_an_exact_linear_dependency_between_columns(layernorm_states):
    S, T = layernorm_states
    S = np.column_stack([S, S[:, 0] + 2.0 * S[:, 1] - S[:, 5]]).astype(np.float32)
    stats = AlignmentStats.from_arrays([S], [T], chunk_rows=300)
    check_reachable(stats, S, T)


def test_float32_layernorm_hyperplane_on_badly_scaled_columns():
    """Genuine columns at 1e-3 of the others are kept as far as float32 supports them."""
    rng = np.random.default_rng(1)
    raw = rng.standard_normal((3000, 16)) @ rng.standard_normal((16, 16))
    ln = (raw - raw.mean(1, keepdims=True)) / raw.std(1, keepdims=True)
    S = (ln * np.r_[np.full(12, 1.0), np.full(4, 1e-3)]).astype(np.float32)
    T = (ln[:, :10] @ rng.standard_normal((10, 6)) + 0.1 * rng.standard_normal((3000, 6))
         ).astype(np.float32)
    stats = AlignmentStats.from_arrays([S], [T])
    check_reachable(stats, S, T)


def test_the_default_cutoff_follows_the_data_dtype():
    assert default_cutoff(np.float32) == 1e-6 and default_cutoff(np.float64) == 2e-15
    rng = np.random.default_rng(2)
    X = rng.standard_normal((400, 5))
    S = X * np.array([1.0, 1.0, 1.0, 1.0, 1e-8])  # a genuine column at 1e-8 of the rest
    T = X @ rng.standard_normal((5, 3))
    as64 = AlignmentStats.from_arrays([S], [T])
    as32 = AlignmentStats.from_arrays([S.astype(np.float32)], [T.astype(np.float32)])
    assert as64.student_dtypes == (np.dtype(np.float64),)
    assert as64.min_mse()[0, 0] < 1e-12  # float64 data resolves the small column
    assert as32.min_mse()[0, 0] > 1e-3  # float32 data cannot: it is cut
    merged = as64 + as32
    assert merged.student_dtypes == (np.dtype(np.float32),)  # mixed: the coarser
    assert merged.min_mse()[0, 0] > 1e-3
    assert merged.min_mse(cutoff=1e-12)[0, 0] < 1e-12  # an explicit cutoff wins
    G, C = S.T @ S, S.T @ T
    assert np.abs(solve_projection(G, C, dtype=np.float64)[4]).max() > 1e6
    assert np.abs(solve_projection(G, C)[4]).max() == 0.0  # float32 rule unless told
    # Five copies of one column: each has norm σ₁/√5 ≤ 0.9·σ₁, so all are dead columns.
    copies = np.repeat(X[:, :1], 5, axis=1)
    assert np.abs(solve_projection(copies.T @ copies, copies.T @ T, cutoff=0.9)).max() == 0.0
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        solve_projection(G, C, dtype=np.int32)
    with pytest.raises(ValueError, match="cutoff must be < 1"):
        as32.min_mse(cutoff=1.5)


# ------------------------------------------------------------------ held-out folds


def two_pass_heldout(S, T, mask, fold_of_row, k):
    """Fit with lstsq on the training rows, score on the held-out rows; mean/std of MSE and 1−R²."""
    mse, rel = [], []
    for f in range(k):
        train, test = mask & (fold_of_row != f), mask & (fold_of_row == f)
        P = np.linalg.lstsq(S[train], T[train], rcond=1e-6)[0]
        value = np.mean((S[test] @ P - T[test]) ** 2)
        mse.append(value)
        rel.append(value / np.mean(T[test].var(axis=0)))
    return (np.mean(mse), np.std(mse, ddof=1)), (np.mean(rel), np.std(rel, ddof=1))


@pytest.mark.parametrize("chunk_rows", [7, 64, 5000])
def test_heldout_equals_an_explicit_two_pass_fit_on_rows(chunk_rows):
    rng = np.random.default_rng(3)
    n, k = 600, 5
    latent = rng.standard_normal((n, 3))
    S = [latent @ rng.standard_normal((3, d)) + 0.7 * rng.standard_normal((n, d)) + 4.0
         for d in (6, 9)]
    T = [latent @ rng.standard_normal((3, d)) + 0.5 * rng.standard_normal((n, d)) - 2.0
         for d in (5, 4)]
    mask = rng.random(n) < 0.8
    stats = AlignmentStats.from_arrays(S, T, mask, chunk_rows=chunk_rows, folds=k)
    assert stats.n_folds == k and sum(stats.fold_rows) == mask.sum()
    mse, rel = stats.min_mse(heldout=True), stats.relative_min_mse(heldout=True)
    assert isinstance(mse, FoldEstimate) and mse.mean.shape == (2, 2)
    for s in range(2):
        for t in range(2):
            (m, sd), (r, rsd) = two_pass_heldout(S[s], T[t], mask, np.arange(n) % k, k)
            assert relative(mse.mean[s, t], m) < 1e-9 and relative(mse.std[s, t], sd) < 1e-7
            assert relative(rel.mean[s, t], r) < 1e-9 and relative(rel.std[s, t], rsd) < 1e-7
    # In-sample statistics are the merge of the folds.
    plain = AlignmentStats.from_arrays(S, T, mask, chunk_rows=chunk_rows)
    np.testing.assert_allclose(stats.min_mse(), plain.min_mse(), rtol=1e-10)
    np.testing.assert_allclose(stats.cka(debiased=True), plain.cka(debiased=True), rtol=1e-10)


def test_heldout_folds_keep_whole_sequences_and_survive_merge_and_dicts():
    rng = np.random.default_rng(4)
    B, L, k = 30, 7, 3
    S = rng.standard_normal((B, L, 5)).astype(np.float32)
    T = (S @ rng.standard_normal((5, 4)) + 0.3 * rng.standard_normal((B, L, 4))).astype(
        np.float32)
    mask = rng.random((B, L)) < 0.7
    whole = AlignmentStats.from_arrays([S], [T], mask, folds=k, chunk_rows=5)
    # Streamed in two updates that split the batch: the example count carries on.
    parts = AlignmentStats(folds=k, chunk_rows=11)
    parts.update([S[:13]], [T[:13]], mask[:13]).update([S[13:]], [T[13:]], mask[13:])
    restored = AlignmentStats.from_dict(parts.to_dict())
    sequence_fold = np.repeat(np.arange(B) % k, L)
    flat_s, flat_t = S.reshape(-1, 5).astype(np.float64), T.reshape(-1, 4).astype(np.float64)
    (m, sd), _ = two_pass_heldout(flat_s, flat_t, mask.reshape(-1), sequence_fold, k)
    for stats in (whole, parts, restored):
        estimate = stats.min_mse(heldout=True)
        assert relative(estimate.mean[0, 0], m) < 1e-9 and relative(estimate.std[0, 0], sd) < 1e-6
    # Merging statistics of two halves (examples numbered explicitly) is the same.
    first = AlignmentStats(folds=k).update([S[:13]], [T[:13]], mask[:13])
    second = AlignmentStats(folds=k).update([S[13:]], [T[13:]], mask[13:],
                                            examples=np.repeat(np.arange(13, B), L).reshape(
                                                B - 13, L))
    merged = first + second
    assert relative(merged.min_mse(heldout=True).mean[0, 0], m) < 1e-9


def test_pure_noise_in_sample_is_zero_held_out_is_not():
    """#24: 100 rows of noise at widths 384 → 768 look perfectly aligned in-sample."""
    rng = np.random.default_rng(5)
    S = rng.standard_normal((100, 384)).astype(np.float32)
    T = rng.standard_normal((100, 768)).astype(np.float32)
    stats = AlignmentStats.from_arrays([S], [T], folds=5)
    assert stats.relative_min_mse()[0, 0] < 1e-6
    assert stats.relative_min_mse(heldout=True).mean[0, 0] >= 0.95


# ------------------------------------------------------------------ debiased CKA


def test_cka_reproduces_the_authors_demo_values():
    # The demo's legacy global-state generator, exactly as published.
    legacy = np.random.RandomState(1337)
    X = legacy.randn(100, 10)
    Y = legacy.randn(100, 10) + X
    stats = AlignmentStats.from_arrays([X], [Y], chunk_rows=13, folds=3)
    assert round(stats.cka()[0, 0], 5) == 0.55761
    assert round(stats.cka(debiased=True)[0, 0], 5) == 0.51346


@pytest.mark.parametrize("mean", [0.0, 300.0])
def test_debiased_cka_matches_the_quadratic_reference_with_masks(mean):
    rng = np.random.default_rng(6)
    B, L = 20, 9
    S = [mean + rng.standard_normal((B, L, d)) for d in (4, 7)]
    T = [mean + 0.5 * S[0][..., :3] @ rng.standard_normal((3, d))
         + rng.standard_normal((B, L, d)) for d in (5, 2, 6)]
    mask = rng.random((B, L)) < 0.6
    parts = [AlignmentStats.from_arrays([x[a:b] for x in S], [y[a:b] for y in T], mask[a:b],
                                        chunk_rows=c) for a, b, c in ((0, 7, 5), (7, 20, 16))]
    for stats in (AlignmentStats.from_arrays(S, T, mask, chunk_rows=23), parts[1] + parts[0]):
        got = stats.cka(debiased=True)
        keep = mask.reshape(-1)
        for s, x in enumerate(S):
            for t, y in enumerate(T):
                # The estimator is invariant to a shift of the rows; centring first spares
                # the O(N²) reference the cancellation of kernels of rows near 300.
                x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
                x2, y2 = x2 - x2[keep].mean(0), y2 - y2[keep].mean(0)
                want = reference.reference_debiased_cka(x2, y2, keep)
                assert abs(got[s, t] - want) < 1e-10
    if mean == 0:  # and uncentred rows give the same value (the invariance itself)
        x2, y2 = S[1].reshape(-1, 7) + 3.0, T[2].reshape(-1, 6) - 1.0
        assert abs(got[1, 2] - reference.reference_debiased_cka(x2, y2, keep)) < 1e-10


# ------------------------------------------------------------------ from_dumps


def test_from_dumps_uses_the_dumps_masks_tokens_and_folds(tmp_path):
    rng = np.random.default_rng(7)
    B, L = 12, 6
    S = [rng.standard_normal((B, L, 4)).astype(np.float32) for _ in range(2)]
    T = [rng.standard_normal((B, L, 3)).astype(np.float32) for _ in range(3)]
    mask = rng.random((B, L)) < 0.7
    mask[:, 0] = True
    save_dump(tmp_path / "s.safetensors", S, attention_mask=mask)
    save_dump(tmp_path / "t.safetensors", T)  # only one dump carries the mask
    save_dump(tmp_path / "t2.npz", T, attention_mask=~mask)
    with load_dump(tmp_path / "s.safetensors") as student, \
            load_dump(tmp_path / "t.safetensors") as teacher:
        got = AlignmentStats.from_dumps(student, teacher, chunk_rows=5, folds=3)
        want = AlignmentStats.from_arrays(S, T, mask, folds=3)
        assert got.n_rows == mask.sum()
        np.testing.assert_allclose(got.min_mse(heldout=True).mean,
                                   want.min_mse(heldout=True).mean, rtol=1e-9)
        cls = AlignmentStats.from_dumps(student, teacher, tokens="cls", mask=None)
        assert cls.n_rows == B
        np.testing.assert_allclose(cls.cka(), AlignmentStats.from_arrays(
            [x[:, 0] for x in S], [y[:, 0] for y in T]).cka(), rtol=1e-12)
        with load_dump(tmp_path / "t2.npz") as other:
            with pytest.raises(ValueError, match="attention masks differ"):
                AlignmentStats.from_dumps(student, other)
            explicit = AlignmentStats.from_dumps(student, other, mask=mask)
            assert explicit.n_rows == mask.sum()
        with pytest.raises(TypeError, match="student must be a pkd.io.Dump"):
            AlignmentStats.from_dumps(S, teacher)


# ------------------------------------------------------------------ bad input


def test_bad_folds_and_heldout_requests_are_refused():
    rng = np.random.default_rng(8)
    S, T = [rng.standard_normal((10, 3))], [rng.standard_normal((10, 2))]
    for folds, error in ((1, ValueError), (0, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="folds"):
            AlignmentStats.from_arrays(S, T, folds=folds)
    with pytest.raises(ValueError, match="heldout=True needs statistics accumulated with folds"):
        AlignmentStats.from_arrays(S, T).min_mse(heldout=True)
    few = AlignmentStats.from_arrays([x[:3] for x in S], [y[:3] for y in T], folds=4)
    with pytest.raises(ValueError, match=r"fold\(s\) \[3\] of folds=4 hold no rows.*fewer"):
        few.relative_min_mse(heldout=True)
    with pytest.raises(ValueError, match="at least 4 rows"):
        few.cka(debiased=True)
    with pytest.raises(ValueError, match="examples must be an int array"):
        AlignmentStats(folds=2).update(S, T, examples=np.zeros(9, dtype=int))
    with pytest.raises(ValueError, match="cannot merge statistics with folds=2 and folds=3"):
        AlignmentStats.from_arrays(S, T, folds=2) + AlignmentStats.from_arrays(S, T, folds=3)


def test_constant_layers_give_nan_or_a_clear_error():
    rng = np.random.default_rng(9)
    S = [rng.standard_normal((40, 3))]
    T = [np.full((40, 2), 4.0), rng.standard_normal((40, 2))]
    stats = AlignmentStats.from_arrays(S, T, folds=2)
    assert np.isnan(stats.relative_min_mse()[0, 0]) and np.isnan(stats.cka(debiased=True)[0, 0])
    with pytest.raises(ValueError, match=r"teacher layer\(s\) \[0\] are constant"):
        stats.relative_min_mse(constant="raise")
    with pytest.raises(ValueError, match=r"fold 0 of 2: teacher layer\(s\) \[0\] are constant"):
        stats.relative_min_mse(heldout=True, constant="raise")
    with pytest.raises(ValueError, match=r"\(student 0, teacher 0\) is undefined"):
        stats.cka(constant="raise")
    with pytest.raises(ValueError, match="constant must be"):
        stats.cka(constant="drop")


def test_heldout_with_ridge_equals_a_two_pass_ridge_fit():
    rng = np.random.default_rng(10)
    n, k, ridge = 300, 3, 5.0
    S = rng.standard_normal((n, 6)) + 1.0
    T = S @ rng.standard_normal((6, 4)) + rng.standard_normal((n, 4))
    stats = AlignmentStats.from_arrays([S], [T], folds=k, chunk_rows=50)
    fold = np.arange(n) % k
    losses = []
    for f in range(k):
        train, test = fold != f, fold == f
        P = np.linalg.solve(S[train].T @ S[train] + ridge * np.eye(6), S[train].T @ T[train])
        losses.append(np.mean((S[test] @ P - T[test]) ** 2))
    estimate = stats.min_mse(ridge, heldout=True)
    assert relative(estimate.mean[0, 0], np.mean(losses)) < 1e-10
    assert relative(estimate.std[0, 0], np.std(losses, ddof=1)) < 1e-8


def test_heldout_on_few_real_like_rows_equals_a_two_pass_fit(layernorm_states, monkeypatch):
    """Test folds with fewer rows than the live directions of the student (dead columns,
    a LayerNorm hyperplane): ``Bᵀ G_test B`` is singular and takes the pivoted factor."""
    from pkd import _estimates

    S, T = (x[:60] for x in layernorm_states)
    factored = []

    def spy(w):
        factored.append((np.linalg.matrix_rank(w), w.shape[0]))
        return factor(w)

    factor = _estimates.gram_factor
    monkeypatch.setattr(_estimates, "gram_factor", spy)
    stats = AlignmentStats.from_arrays([S], [T], folds=5)
    mse, rel = stats.min_mse(heldout=True), stats.relative_min_mse(heldout=True)
    assert len(factored) == 5 and all(rank < size for rank, size in factored), factored
    (m, sd), (r, rsd) = two_pass_heldout(S.astype(np.float64), T.astype(np.float64),
                                         np.ones(60, bool), np.arange(60) % 5, 5)
    assert relative(mse.mean[0, 0], m) < 1e-8 and relative(mse.std[0, 0], sd) < 1e-6
    assert relative(rel.mean[0, 0], r) < 1e-8 and relative(rel.std[0, 0], rsd) < 1e-6
