"""fit_projection: closed form against scipy.linalg.lstsq, gradient methods against the
closed form, and bad input."""

import numpy as np
import pytest
import scipy.linalg

import pkd
from pkd import fit_projection


def _problem(n=400, d_s=6, d_t=9, n_layers=3, seed=0, noise=0.1, three_d=False):
    rng = np.random.default_rng(seed)
    lead = (n // 8, 8) if three_d else (n,)
    student = [rng.standard_normal((*lead, d_s)) for _ in range(n_layers)]
    W = rng.standard_normal((d_s, d_t))
    teacher = [s @ W + noise * rng.standard_normal((*lead, d_t)) for s in student]
    return student, teacher, [(k, k) for k in range(n_layers)]


def _stack(layers, indices, rows=None):
    flat = [layers[i].reshape(-1, layers[i].shape[-1]) for i in indices]
    if rows is not None:
        flat = [f[rows] for f in flat]
    return np.vstack(flat)


@pytest.mark.parametrize("three_d", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_shared_closed_form_matches_lstsq_on_stacked_data(three_d, masked):
    student, teacher, mapping = _problem(three_d=three_d)
    lead = student[0].shape[:-1]
    mask = (np.random.default_rng(1).random(lead) < 0.7) if masked else None
    result = fit_projection(student, teacher, mapping, attention_mask=mask)
    rows = None if mask is None else np.flatnonzero(mask.reshape(-1))
    X = _stack(student, [0, 1, 2], rows)
    Y = _stack(teacher, [0, 1, 2], rows)
    expected = scipy.linalg.lstsq(X, Y)[0]
    np.testing.assert_allclose(result.projection, expected, rtol=1e-9, atol=1e-12)
    assert result.history.shape == (1, 3)
    np.testing.assert_allclose(result.history[0], result.layer_losses)
    for k, (s, t) in enumerate(mapping):
        Xs = _stack(student, [s], rows)
        Yt = _stack(teacher, [t], rows)
        direct = np.mean((Xs @ expected - Yt) ** 2)
        assert result.layer_losses[k] == pytest.approx(direct, rel=1e-10)


def test_per_pair_closed_form_matches_lstsq_per_pair():
    student, teacher, mapping = _problem(seed=3)
    result = fit_projection(student, teacher, mapping, shared=False)
    assert result.projection is None and set(result.projections) == set(mapping)
    for pair in mapping:
        expected = scipy.linalg.lstsq(student[pair[0]], teacher[pair[1]])[0]
        np.testing.assert_allclose(result.projection_for(pair), expected, rtol=1e-9,
                                   atol=1e-12)


def test_ridge_closed_form():
    student, teacher, mapping = _problem(seed=4)
    rho = 7.5
    result = fit_projection(student, teacher, mapping, ridge=rho)
    X, Y = _stack(student, [0, 1, 2]), _stack(teacher, [0, 1, 2])
    expected = np.linalg.solve(X.T @ X + rho * np.eye(X.shape[1]), X.T @ Y)
    np.testing.assert_allclose(result.projection, expected, rtol=1e-9)


def test_rank_deficient_closed_form_is_minimum_norm():
    rng = np.random.default_rng(5)
    base = rng.standard_normal((300, 4))
    S = np.hstack([base, base[:, :2]])  # duplicated columns: rank 4 of 6
    T = base @ rng.standard_normal((4, 5))
    result = fit_projection([S], [T], [(0, 0)])
    expected = np.linalg.lstsq(S, T, rcond=None)[0]
    np.testing.assert_allclose(result.projection, expected, rtol=1e-7, atol=1e-9)
    assert result.layer_losses[0] < 1e-20


@pytest.mark.parametrize("method", ["adam", "sgd"])
@pytest.mark.parametrize("shared", [True, False])
def test_gradient_methods_reach_the_closed_form(method, shared):
    student, teacher, mapping = _problem(seed=6)
    floor = fit_projection(student, teacher, mapping, shared=shared).layer_losses
    lr = 0.05 if method == "adam" else None
    result = fit_projection(student, teacher, mapping, method=method, shared=shared,
                            steps=400, lr=lr, seed=0)
    assert result.history.shape == (400, 3)
    np.testing.assert_array_less(result.layer_losses, floor * 1.01)
    assert result.history[0].mean() > 10 * result.history[-1].mean()


@pytest.mark.parametrize("method", ["adam", "sgd"])
@pytest.mark.parametrize("shared", [True, False])
def test_gradient_methods_reach_the_ridge_closed_form(method, shared):
    # A strong ridge (ρ near the Gram's scale): a penalty counted once per pair for a
    # shared P, i.e. (ΣG + KρI) P = ΣC, would land 0.4 away from the closed form.
    student, teacher, mapping = _problem(n=200, d_s=4, d_t=5, seed=13)
    rho = 500.0
    closed = fit_projection(student, teacher, mapping, shared=shared, ridge=rho)
    lr = 0.01 if method == "adam" else None
    steps = 3000 if method == "adam" else 300
    result = fit_projection(student, teacher, mapping, method=method, shared=shared,
                            ridge=rho, steps=steps, lr=lr, seed=0)
    atol = 1e-3 if method == "adam" else 1e-10  # Adam hovers within ~lr of the optimum
    for pair in mapping:
        np.testing.assert_allclose(result.projection_for(pair), closed.projection_for(pair),
                                   atol=atol)


@pytest.mark.parametrize("shared", [True, False])
def test_minibatch_ridge_is_the_full_batch_objective(shared):
    # Every row of a layer is the same, so every minibatch has the full batch's loss and
    # SGD is deterministic: it must reach the closed form, with the penalty scaled by all
    # the rows (n_w), not by the batch's.
    rng = np.random.default_rng(14)
    n, d_s, d_t = 40, 3, 4
    student = [np.tile(rng.standard_normal(d_s), (n, 1)) for _ in range(3)]
    teacher = [np.tile(rng.standard_normal(d_t), (n, 1)) for _ in range(3)]
    mapping = [(0, 0), (1, 1), (2, 2)]
    rho = 20.0
    closed = fit_projection(student, teacher, mapping, shared=shared, ridge=rho)
    result = fit_projection(student, teacher, mapping, method="sgd", shared=shared, ridge=rho,
                            steps=500, batch_size=8, seed=0)
    for pair in mapping:
        np.testing.assert_allclose(result.projection_for(pair), closed.projection_for(pair),
                                   atol=1e-8)


def test_minibatch_adam_reaches_the_closed_form():
    student, teacher, mapping = _problem(n=2000, seed=7)
    floor = fit_projection(student, teacher, mapping).layer_losses
    result = fit_projection(student, teacher, mapping, method="adam", steps=600, lr=0.02,
                            batch_size=256, seed=1)
    np.testing.assert_array_less(result.layer_losses, floor * 1.01)


def test_seeded_and_reproducible():
    student, teacher, mapping = _problem(seed=8)
    a = fit_projection(student, teacher, mapping, method="adam", steps=20, seed=3,
                       batch_size=50)
    b = fit_projection(student, teacher, mapping, method="adam", steps=20, seed=3,
                       batch_size=50)
    c = fit_projection(student, teacher, mapping, method="adam", steps=20, seed=4,
                       batch_size=50)
    np.testing.assert_array_equal(a.projection, b.projection)
    np.testing.assert_array_equal(a.history, b.history)
    assert not np.array_equal(a.projection, c.projection)
    np.testing.assert_array_equal(a.initial, pkd.xavier_uniform(6, 9, seed=3,
                                                                 dtype=np.float64))


@pytest.mark.parametrize("shared", [True, False])
def test_gram_steps_equal_kernel_steps(shared):
    # Full batch through the Gram algebra vs a "minibatch" holding every row (fused kernels).
    student, teacher, mapping = _problem(n=64, seed=9)
    gram = fit_projection(student, teacher, mapping, method="sgd", lr=0.01, steps=5, seed=0,
                          shared=shared, ridge=0.5)
    kernel = fit_projection(student, teacher, mapping, method="sgd", lr=0.01, steps=5, seed=0,
                            shared=shared, ridge=0.5, batch_size=64)
    np.testing.assert_allclose(gram.history, kernel.history, rtol=1e-10)
    for pair in mapping:
        np.testing.assert_allclose(gram.projection_for(pair), kernel.projection_for(pair),
                                   rtol=1e-10)


def test_normalized_fit_decreases_and_callback_sees_every_step():
    student, teacher, mapping = _problem(seed=10)
    seen = []
    result = fit_projection(student, teacher, mapping, method="adam", normalize=True,
                            steps=50, lr=0.02, seed=0,
                            callback=lambda step, losses: seen.append((step, losses)))
    assert [s for s, _ in seen] == list(range(50))
    np.testing.assert_array_equal(seen[10][1], result.history[10])
    assert result.history[-1].mean() < 0.5 * result.history[0].mean()
    cfg = result.config(normalize=True)
    loss = cfg.loss_and_grad(student, teacher).layer_losses
    np.testing.assert_allclose(loss, result.layer_losses, rtol=1e-10)


def test_progress_bar_runs(capsys):
    student, teacher, mapping = _problem(seed=11)
    fit_projection(student, teacher, mapping, method="sgd", steps=3, progress=True)
    assert "fit (sgd)" in capsys.readouterr().err  # tqdm writes to stderr
    fit_projection(student, teacher, mapping, method="sgd", steps=3)
    assert capsys.readouterr().err == ""


def test_float32_input_gives_float32_projection():
    student, teacher, mapping = _problem(seed=12)
    student = [s.astype(np.float32) for s in student]
    teacher = [t.astype(np.float32) for t in teacher]
    assert fit_projection(student, teacher, mapping).projection.dtype == np.float32
    result = fit_projection(student, teacher, mapping, method="adam", steps=3)
    assert result.projection.dtype == np.float32


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": "lbfgs"}, ValueError, "method must be one of"),
        ({"ridge": -1.0}, ValueError, "ridge"),
        ({"method": "adam", "steps": 0}, ValueError, "steps must be > 0"),
        ({"method": "adam", "lr": -0.1}, ValueError, "lr must be finite and > 0"),
        ({"method": "adam", "batch_size": 0}, ValueError, "batch_size"),
        ({"normalize": True}, ValueError, "closed form exists for the MSE only"),
        ({"method": "sgd", "normalize": True}, ValueError, "explicit lr"),
        ({"dtype": np.int32}, TypeError, "dtype"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    student, teacher, mapping = _problem(n=40)
    with pytest.raises(error, match=match):
        fit_projection(student, teacher, mapping, **kwargs)


@pytest.mark.parametrize("kwargs", [{}, {"method": "sgd", "steps": 5},
                                    {"method": "adam", "steps": 5, "batch_size": 7}])
def test_non_finite_padding_is_ignored(kwargs):
    student, teacher, mapping = _problem(n=96, three_d=True, seed=15)
    mask = np.ones(student[0].shape[:-1], dtype=bool)
    mask[:, 6:] = False
    clean = fit_projection(student, teacher, mapping, attention_mask=mask, seed=0, **kwargs)
    student = [s.copy() for s in student]
    teacher = [t.copy() for t in teacher]
    student[1][~mask] = np.nan
    teacher[2][~mask] = np.inf
    dirty = fit_projection(student, teacher, mapping, attention_mask=mask, seed=0, **kwargs)
    np.testing.assert_array_equal(dirty.projection, clean.projection)
    np.testing.assert_array_equal(dirty.layer_losses, clean.layer_losses)


def test_non_finite_fitted_rows_are_refused():
    student, teacher, mapping = _problem(n=96, three_d=True, seed=16)
    mask = np.ones(student[0].shape[:-1], dtype=bool)
    mask[:, 6:] = False
    teacher = [t.copy() for t in teacher]
    teacher[1][:, 6:] = np.nan  # padding: fine
    teacher[1][3, 2, 4] = np.nan  # a fitted row
    for kwargs in ({}, {"method": "adam", "batch_size": 7}):
        with pytest.raises(ValueError, match=r"teacher_hidden\[1\] contains NaN/Inf in the rows "
                           r"that count, first at flattened row 26, column 4") as info:
            fit_projection(student, teacher, mapping, attention_mask=mask, **kwargs)
        assert "check_finite" not in str(info.value)  # fit_projection has no such option
        assert "attention_mask" in str(info.value)


def test_sgd_default_lr_refuses_all_zero_student_states():
    student, teacher = [np.zeros((10, 3))], [np.ones((10, 5))]
    with pytest.raises(ValueError, match=r"student hidden states \(student_hidden\[0\]\) "
                       "are all zero .* explicit lr"):
        fit_projection(student, teacher, [(0, 0)], method="sgd", steps=3)
    # An explicit lr: the gradient is 0, the start is returned, finite.
    result = fit_projection(student, teacher, [(0, 0)], method="sgd", steps=3, lr=0.1, seed=0)
    np.testing.assert_array_equal(result.projection, result.initial)
    # ridge > 0 gives curvature: one step of lr = 1/L lands on the minimiser, 0.
    result = fit_projection(student, teacher, [(0, 0)], method="sgd", steps=1, ridge=1.0)
    np.testing.assert_allclose(result.projection, 0.0, atol=1e-15)


def test_bad_mappings_and_layers():
    student, teacher, _ = _problem(n=40)
    with pytest.raises(ValueError, match="distinct pairs"):
        fit_projection(student, teacher, [(0, 0), (0, 0)], shared=False)
    with pytest.raises(ValueError, match=r"\(0, 5\) asks for layer 5 of teacher_hidden"):
        fit_projection(student, teacher, [(0, 5)])
    wide = [*student[:2], np.ones((40, 7))]
    with pytest.raises(ValueError, match="equal widths"):
        fit_projection(wide, teacher, [(0, 0), (2, 2)])
    with pytest.raises(ValueError, match="same rows"):
        fit_projection([student[0], np.ones((30, 6))], [teacher[0], np.ones((30, 9))],
                       [(0, 0), (1, 1)])


def test_chunk_rows_default_is_the_one_streaming_default():
    import inspect

    from pkd.alignment import DEFAULT_CHUNK_ROWS
    default = inspect.signature(fit_projection).parameters["chunk_rows"].default
    assert default == DEFAULT_CHUNK_ROWS
    for method in (pkd.AlignmentStats.from_arrays, pkd.AlignmentStats.from_dumps):
        assert inspect.signature(method).parameters["chunk_rows"].default == default
