"""The full PKD objective against its witnesses: the float64 reference, the loop twin of the
kernel, central finite differences, and torch autograd (CE + τ²·KL + projected MSE)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import naive
import pkd
import reference
from pkd.kernels import softmax as softmax_kernels
from pkd.objective import PKDObjective, PKDResult, logit_loss_and_grad

DTYPES = [np.float32, np.float64]
RTOL = {np.float32: 2e-5, np.float64: 1e-10}


def _logits(dtype, B=6, C=5, scale=3.0, seed=0):
    rng = np.random.default_rng(seed)
    z_s = (scale * rng.standard_normal((B, C))).astype(dtype)
    z_t = (scale * rng.standard_normal((B, C))).astype(dtype)
    labels = rng.integers(0, C, B)
    return z_s, z_t, labels


def _assert_logit_part(z_s, z_t, labels, alpha, tau, ce, kd, grad, rtol):
    assert ce == pytest.approx(reference.reference_cross_entropy(z_s, labels), rel=rtol)
    assert kd == pytest.approx(reference.reference_kd_kl(z_s, z_t, tau), rel=rtol, abs=1e-12)
    ref_grad = reference.reference_logit_grad(z_s, z_t, labels, alpha, tau)
    assert grad.dtype == z_s.dtype and grad.shape == z_s.shape
    np.testing.assert_allclose(grad, ref_grad, rtol=rtol, atol=rtol * np.abs(ref_grad).max())


# -- the logit part against the reference, the loop twin and finite differences --------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("alpha", "tau"), [(0.7, 10.0), (0.3, 1.0), (0.5, 0.25)])
def test_logit_part_matches_reference(dtype, alpha, tau):
    z_s, z_t, labels = _logits(dtype)
    ce, kd, grad = logit_loss_and_grad(z_s, z_t, labels, alpha=alpha, temperature=tau)
    _assert_logit_part(z_s, z_t, labels, alpha, tau, ce, kd, grad, RTOL[dtype])


def test_reference_log_softmax_matches_scipy():
    special = pytest.importorskip("scipy.special")
    z = np.random.default_rng(1).standard_normal((4, 7)) * 50
    np.testing.assert_allclose(reference.reference_log_softmax(z), special.log_softmax(z, 1),
                               rtol=1e-13, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_matches_loop_twin(dtype):
    z_s, z_t, labels = _logits(dtype, B=7, C=9, scale=5.0, seed=3)
    tau, ce_coef, kd_coef = 3.0, 0.04, 0.25
    grad = np.empty_like(z_s)
    ce_rows, kl_rows = np.empty(7), np.empty(7)
    softmax_kernels.logit_loss_grad_serial(z_s, z_t, labels, 1.0 / tau, ce_coef, kd_coef, grad,
                                           ce_rows, kl_rows, np.empty((1, 3, 9)))
    twin_grad, twin_ce, twin_kl = naive.logit_loss_grad(z_s, z_t, labels, tau, ce_coef,
                                                        kd_coef)
    np.testing.assert_allclose(ce_rows, twin_ce, rtol=1e-12)
    np.testing.assert_allclose(kl_rows, twin_kl, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(grad, twin_grad, rtol=RTOL[dtype], atol=RTOL[dtype] * 0.1)


@pytest.mark.parametrize("n_chunks", [2, 3, 7])
def test_parallel_twin_and_chunking_give_identical_bits(n_chunks):
    z_s, z_t, labels = _logits(np.float64, B=7, C=4, seed=5)
    outputs = []
    for run, chunks in [(softmax_kernels.logit_loss_grad_serial, 1),
                        (softmax_kernels.logit_loss_grad_parallel, n_chunks)]:
        grad, ce_rows, kl_rows = np.empty_like(z_s), np.empty(7), np.empty(7)
        run(z_s, z_t, labels, 0.5, 0.1, 0.2, grad, ce_rows, kl_rows, np.empty((chunks, 3, 4)))
        outputs.append((grad, ce_rows, kl_rows))
    for serial, parallel in zip(*outputs, strict=True):
        np.testing.assert_array_equal(serial, parallel)


def test_parallel_path_gives_identical_results(monkeypatch):
    import pkd.objective as objective_module

    z_s, z_t, labels = _logits(np.float32, B=9, C=6, seed=11)
    serial = logit_loss_and_grad(z_s, z_t, labels, alpha=0.7, temperature=10.0)
    monkeypatch.setattr(objective_module, "PARALLEL_MIN_ELEMENTS", 0)
    parallel = logit_loss_and_grad(z_s, z_t, labels, alpha=0.7, temperature=10.0)
    assert serial[:2] == parallel[:2]
    np.testing.assert_array_equal(serial[2], parallel[2])


def test_parallel_rule_respects_numba_and_threadpoolctl_limits(monkeypatch):
    import numba

    import pkd.objective as objective_module

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs NUMBA_NUM_THREADS >= 2")
    z_s, z_t, labels = _logits(np.float32, B=9, C=6, seed=12)
    used = []
    def spying(name):
        real = getattr(softmax_kernels, name)

        def spy(*args):
            used.append((name.rsplit("_", 1)[1], args[-1].shape[0]))  # twin, chunks
            return real(*args)
        return spy

    for name in ("logit_loss_grad_serial", "logit_loss_grad_parallel"):
        monkeypatch.setattr(softmax_kernels, name, spying(name))
    monkeypatch.setattr(objective_module, "PARALLEL_MIN_ELEMENTS", 0)
    threadpoolctl = pytest.importorskip("threadpoolctl")
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(2)
        # The OpenMP limit is process state (torch.set_num_threads lowers it too): 2 here.
        with threadpoolctl.threadpool_limits(limits=2, user_api="openmp"):
            logit_loss_and_grad(z_s, z_t, labels, alpha=0.5, temperature=2.0)
        numba.set_num_threads(1)
        logit_loss_and_grad(z_s, z_t, labels, alpha=0.5, temperature=2.0)
        numba.set_num_threads(2)
        with threadpoolctl.threadpool_limits(limits=1):
            logit_loss_and_grad(z_s, z_t, labels, alpha=0.5, temperature=2.0)
    finally:
        numba.set_num_threads(before)
    assert used == [("parallel", 2), ("serial", 1), ("serial", 1)]
    monkeypatch.setattr(objective_module, "PARALLEL_MIN_ELEMENTS", z_s.size + 1)
    used.clear()
    logit_loss_and_grad(z_s, z_t, labels, alpha=0.5, temperature=2.0)
    assert used == [("serial", 1)]  # below the size threshold


_finite_difference = reference.finite_difference


@pytest.mark.parametrize(("alpha", "tau"), [(0.7, 10.0), (0.0, 2.0), (1.0, 0.5), (0.4, 1.0)])
def test_grad_logits_matches_finite_differences(alpha, tau):
    z_s, z_t, labels = _logits(np.float64, B=4, C=3, seed=2)
    objective = PKDObjective(alpha=alpha, temperature=tau)
    result = objective.loss_and_grad(z_s, z_t, labels)

    def f():
        return objective.loss_and_grad(z_s, z_t, labels).loss

    np.testing.assert_allclose(result.grad_logits, _finite_difference(f, z_s),
                               rtol=1e-6, atol=1e-9)


# -- the full objective against torch autograd --------------------------------------------


def _hidden_problem(dtype, shared, seed=0, B=4, T=5, d_s=6, d_t=10):
    rng = np.random.default_rng(seed)
    student = [rng.standard_normal((B, T, d_s)).astype(dtype) for _ in range(2)]
    teacher = [rng.standard_normal((B, T, d_t)).astype(dtype) for _ in range(4)]
    mask = rng.random((B, T)) < 0.6
    mask[:, 0] = True
    config = pkd.ProgressiveDistillation([(0, 1), (1, 3)], hidden_weight=2.5,
                                         layer_weights=[1.0, 3.0])
    config = config.with_projection(d_s, d_t, seed=0, shared=shared, dtype=dtype)
    return config, student, teacher, mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shared", [True, False])
def test_matches_torch_autograd(dtype, masked, shared):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    alpha, tau = 0.7, 4.0
    config, student, teacher, mask = _hidden_problem(dtype, shared)
    z_s, z_t, labels = _logits(dtype, B=4, C=5, seed=1)
    mask_arg = mask if masked else None
    result = PKDObjective(alpha=alpha, temperature=tau, hidden=config).loss_and_grad(
        z_s, z_t, labels, student, teacher, attention_mask=mask_arg)

    zs = torch.tensor(z_s, requires_grad=True)
    zt = torch.tensor(z_t)
    y = torch.tensor(labels)
    hs = [torch.tensor(S, requires_grad=True) for S in student]
    ht = [torch.tensor(T) for T in teacher]
    if shared:
        shared_p = torch.tensor(config.projection, requires_grad=True)
        projections = {pair: shared_p for pair in config.layer_mapping}
    else:
        projections = {pair: torch.tensor(P, requires_grad=True)
                       for pair, P in config.projection.items()}
    w = torch.tensor(mask if masked else np.ones(mask.shape), dtype=zs.dtype)
    ce = F.cross_entropy(zs, y)
    kd = F.kl_div(F.log_softmax(zs / tau, dim=1), F.log_softmax(zt / tau, dim=1),
                  log_target=True, reduction="batchmean")
    omega = [1.0, 3.0]
    hidden = 0.0
    for k, (s, t) in enumerate(config.layer_mapping):
        per_row = ((hs[s] @ projections[(s, t)] - ht[t]) ** 2).mean(-1)
        hidden = hidden + omega[k] * (per_row * w).sum() / w.sum()
    hidden = 2.5 * hidden / sum(omega)
    total = (1 - alpha) * ce + alpha * tau**2 * kd + hidden
    total.backward()

    rtol = 1e-4 if dtype == np.float32 else 1e-10

    def close(ours, theirs):
        theirs = theirs.detach().numpy()
        assert ours.dtype == dtype and ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=rtol * np.abs(theirs).max())

    assert result.loss == pytest.approx(total.item(), rel=rtol)
    assert result.parts["ce"] == pytest.approx(ce.item(), rel=rtol)
    assert result.parts["kd"] == pytest.approx(kd.item(), rel=rtol)
    assert result.parts["hidden"] == pytest.approx(hidden.item(), rel=rtol)
    close(result.grad_logits, zs.grad)
    for ours, theirs in zip(result.grad_student, hs, strict=True):
        close(ours, theirs.grad)
    if shared:
        close(result.grad_projection, shared_p.grad)
    else:
        assert set(result.grad_projection) == set(config.layer_mapping)
        for pair, p in projections.items():
            close(result.grad_projection[pair], p.grad)


def test_two_d_hidden_states_match_reference():
    """(B, d) hidden states (one row per example) against reference.hidden_loss."""
    rng = np.random.default_rng(4)
    student = [rng.standard_normal((6, 3)) for _ in range(2)]
    teacher = [rng.standard_normal((6, 5)) for _ in range(3)]
    config = pkd.ProgressiveDistillation([(0, 0), (1, 2)]).with_projection(3, 5, seed=1,
                                                                            dtype=np.float64)
    z_s, z_t, labels = _logits(np.float64, B=6, C=4, seed=4)
    result = PKDObjective(0.5, 2.0, config).loss_and_grad(z_s, z_t, labels, student, teacher)
    ref_loss, ref_layers, ref_grads, ref_p = reference.hidden_loss(
        student, teacher, config.layer_mapping, config.projection)
    assert result.parts["hidden"] == pytest.approx(ref_loss, rel=1e-12)
    np.testing.assert_allclose(result.layer_losses, ref_layers, rtol=1e-12)
    for ours, ref in zip(result.grad_student, ref_grads, strict=True):
        np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(result.grad_projection, ref_p, rtol=1e-10, atol=1e-14)


# -- how the parts combine ------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.35, 0.7, 1.0])
def test_loss_is_the_documented_sum_of_parts(alpha):
    config, student, teacher, mask = _hidden_problem(np.float32, shared=True)
    z_s, z_t, labels = _logits(np.float32, B=4, C=5, seed=1)
    tau = 3.0
    result = PKDObjective(alpha, tau, config).loss_and_grad(z_s, z_t, labels, student, teacher,
                                                            attention_mask=mask)
    parts = result.parts
    assert parts["hidden"] > 0 and parts["kd"] > 0 and parts["ce"] > 0
    assert result.loss == (1 - alpha) * parts["ce"] + alpha * tau**2 * parts["kd"] \
        + parts["hidden"]
    assert result.loss == sum(result.weighted_parts.values())
    assert result.weighted_parts["kd"] == alpha * tau**2 * parts["kd"]
    hidden = config.loss_and_grad(student, teacher, attention_mask=mask)
    assert parts["hidden"] == hidden.loss
    np.testing.assert_array_equal(result.layer_losses, hidden.layer_losses)
    np.testing.assert_array_equal(result.grad_projection, hidden.grad_projection)
    ce, kd, grad = logit_loss_and_grad(z_s, z_t, labels, alpha=alpha, temperature=tau)
    assert (ce, kd) == (parts["ce"], parts["kd"])
    np.testing.assert_array_equal(grad, result.grad_logits)


def test_alpha_zero_is_pure_cross_entropy():
    z_s, z_t, labels = _logits(np.float64, seed=7)
    result = PKDObjective(alpha=0.0, temperature=5.0).loss_and_grad(z_s, z_t, labels)
    assert result.loss == result.parts["ce"]
    assert result.loss == pytest.approx(reference.reference_cross_entropy(z_s, labels),
                                        rel=1e-12)
    B, C = z_s.shape
    p = np.exp(reference.reference_log_softmax(z_s))
    np.testing.assert_allclose(result.grad_logits, (p - np.eye(C)[labels]) / B, rtol=1e-12,
                               atol=1e-15)
    other_teacher = PKDObjective(alpha=0.0, temperature=5.0).loss_and_grad(z_s, -z_t, labels)
    np.testing.assert_array_equal(other_teacher.grad_logits, result.grad_logits)


def test_alpha_one_is_pure_distillation():
    z_s, z_t, labels = _logits(np.float64, seed=8)
    tau = 4.0
    result = PKDObjective(alpha=1.0, temperature=tau).loss_and_grad(z_s, z_t, labels)
    assert result.loss == tau**2 * result.parts["kd"]
    assert result.loss == pytest.approx(tau**2 * reference.reference_kd_kl(z_s, z_t, tau),
                                        rel=1e-12)
    p_s = np.exp(reference.reference_log_softmax(z_s / tau))
    p_t = np.exp(reference.reference_log_softmax(z_t / tau))
    np.testing.assert_allclose(result.grad_logits, tau * (p_s - p_t) / len(z_s), rtol=1e-12,
                               atol=1e-15)
    other_labels = PKDObjective(alpha=1.0, temperature=tau).loss_and_grad(
        z_s, z_t, (labels + 1) % z_s.shape[1])
    np.testing.assert_array_equal(other_labels.grad_logits, result.grad_logits)


def test_student_equal_to_teacher_has_zero_kd():
    z_s, _, labels = _logits(np.float64, seed=9)
    ce, kd, grad = logit_loss_and_grad(z_s, z_s.copy(), labels, alpha=1.0, temperature=2.0)
    assert abs(kd) < 1e-15
    assert np.abs(grad).max() < 1e-16


def test_without_hidden_part():
    z_s, z_t, labels = _logits(np.float32)
    for objective in (PKDObjective(), PKDObjective(hidden=pkd.ProgressiveDistillation())):
        result = objective.loss_and_grad(z_s, z_t, labels)
        assert isinstance(result, PKDResult)
        assert result.parts["hidden"] == 0.0 and result.weighted_parts["hidden"] == 0.0
        assert result.grad_student is None and result.grad_projection is None
        assert result.layer_losses is None and result.hidden_result is None
        assert result.loss == pytest.approx(
            0.3 * reference.reference_cross_entropy(z_s, labels)
            + 0.7 * 100 * reference.reference_kd_kl(z_s, z_t, 10.0), rel=2e-5)


def test_defaults_and_repr():
    objective = PKDObjective()
    assert (objective.alpha, objective.temperature, objective.hidden) == (0.7, 10.0, None)
    assert "alpha=0.7" in repr(objective) and "temperature=10.0" in repr(objective)


def test_mixed_dtypes_promote_to_float64():
    z_s, z_t, labels = _logits(np.float32)
    _, _, grad = logit_loss_and_grad(z_s, z_t.astype(np.float64), labels, alpha=0.5,
                                     temperature=2.0)
    assert grad.dtype == np.float64


def test_inputs_are_not_modified_and_lists_are_accepted():
    z_s, z_t, labels = _logits(np.float64)
    copies = z_s.copy(), z_t.copy(), labels.copy()
    from_arrays = logit_loss_and_grad(z_s, z_t, labels, alpha=0.5, temperature=2.0)
    from_lists = logit_loss_and_grad(z_s.tolist(), z_t.tolist(), labels.tolist(), alpha=0.5,
                                     temperature=2.0)
    for original, copy in zip((z_s, z_t, labels), copies, strict=True):
        np.testing.assert_array_equal(original, copy)
    assert from_arrays[:2] == from_lists[:2]
    np.testing.assert_array_equal(from_arrays[2], from_lists[2])


def test_non_contiguous_logits():
    z_s, z_t, labels = _logits(np.float64, B=5, C=8)
    wide_s, wide_t = np.asfortranarray(z_s), z_t[:, ::-1][:, ::-1]
    ce, kd, grad = logit_loss_and_grad(wide_s, wide_t, labels, alpha=0.6, temperature=3.0)
    _assert_logit_part(z_s, z_t, labels, 0.6, 3.0, ce, kd, grad, 1e-12)


# -- stability ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tau", [1.0, 10.0, 0.01])
def test_extreme_logits_give_finite_results(dtype, tau):
    rng = np.random.default_rng(10)
    z_s = rng.choice([-1e4, 1e4, 0.0, 5e3], size=(6, 4)).astype(dtype)
    z_t = rng.choice([-1e4, 1e4, -3e3], size=(6, 4)).astype(dtype)
    labels = rng.integers(0, 4, 6)
    ce, kd, grad = logit_loss_and_grad(z_s, z_t, labels, alpha=0.5, temperature=tau)
    assert np.isfinite(ce) and np.isfinite(kd) and np.isfinite(grad).all()
    assert ce > 1e3  # some labels sit 1e4 below the row's maximum
    _assert_logit_part(z_s, z_t, labels, 0.5, tau, ce, kd, grad, 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("margin", [5.0, 30.0, 60.0])
def test_confident_student_keeps_relative_precision(dtype, margin):
    """Two classes, label ahead by d: CE = log1p(e^−d), ∂CE/∂z_y = −σ(−d) = −∂CE/∂z_other.

    Both are ~e^−d; computed as 1 − p_y they would lose every digit for d ≳ 37.
    """
    z_s = np.array([[margin, 0.0], [0.0, margin]], dtype=dtype)
    labels = np.array([0, 1])
    ce, _, grad = logit_loss_and_grad(z_s, z_s, labels, alpha=0.0, temperature=1.0)
    tail = np.exp(-margin) / (1 + np.exp(-margin))
    assert ce == pytest.approx(np.log1p(np.exp(-margin)), rel=1e-12, abs=0)
    expected = np.array([[-tail, tail], [tail, -tail]]) / 2
    np.testing.assert_allclose(grad, expected, rtol=RTOL[dtype])


def test_teacher_zero_probabilities_contribute_nothing():
    """p_t = 0 (−inf teacher logit, or underflow) adds 0·log 0 = 0, even where p_s = 0."""
    z_s = np.array([[0.0, 1.0, -np.inf], [2.0, -1e4, 0.5]])
    z_t = np.array([[1.0, -np.inf, -np.inf], [0.0, -1e4, 1.0]])
    labels = np.array([1, 0])
    ce, kd, grad = logit_loss_and_grad(z_s, z_t, labels, alpha=0.5, temperature=1.0)
    expected_kd = np.mean([0.0 - np.log(1 / (1 + np.e)),
                           reference.reference_kd_kl(z_s[1:], z_t[1:], 1.0)])
    assert kd == pytest.approx(expected_kd, rel=1e-12)
    _assert_logit_part(z_s, z_t, labels, 0.5, 1.0, ce, kd, grad, 1e-12)
    assert grad[0, 2] == 0.0


def test_infinite_cross_entropy_is_reported():
    z_s = np.array([[0.0, -np.inf], [0.0, 1.0]])
    with pytest.raises(ValueError, match=r"cross-entropy is infinite.*student_logits\[0, 1\]"):
        logit_loss_and_grad(z_s, np.zeros((2, 2)), [1, 0], alpha=0.5, temperature=1.0)


def test_infinite_kd_is_reported():
    z_s = np.array([[0.0, 1.0], [0.0, -np.inf]])
    with pytest.raises(ValueError, match="KD term is infinite for example 1"):
        logit_loss_and_grad(z_s, np.zeros((2, 2)), [0, 0], alpha=0.5, temperature=1.0)


def test_an_infinite_term_of_weight_zero_does_not_count():
    """alpha=0 is plain CE: a class the student rules out (-inf) only breaks the unused KL."""
    z_s = np.array([[2.0, 0.5, -np.inf], [0.1, 1.0, -np.inf]])
    z_t, labels = np.zeros((2, 3)), np.array([0, 1])
    ce, kd, grad = logit_loss_and_grad(z_s, z_t, labels, alpha=0.0, temperature=2.0)
    p = np.exp(z_s - z_s.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert kd == np.inf and ce == pytest.approx(-np.mean(np.log(p[[0, 1], labels])), rel=1e-12)
    np.testing.assert_allclose(grad, (p - np.eye(3)[labels]) / 2, rtol=1e-12, atol=1e-15)
    result = PKDObjective(alpha=0.0, temperature=2.0).loss_and_grad(z_s, z_t, labels)
    assert result.weighted_parts["kd"] == 0.0 and result.loss == pytest.approx(ce, rel=1e-15)
    # alpha=1 is pure distillation: a label the student rules out only breaks the unused CE.
    ce, kd, grad = logit_loss_and_grad(z_s, z_s, [2, 2], alpha=1.0, temperature=2.0)
    assert ce == np.inf and kd == 0.0 and not grad.any()
    result = PKDObjective(alpha=1.0, temperature=2.0).loss_and_grad(z_s, z_s, [2, 2])
    assert result.weighted_parts["ce"] == 0.0 and result.loss == 0.0
    with pytest.raises(ValueError, match="KD term is infinite"):
        logit_loss_and_grad(z_s, z_t, labels, alpha=0.01, temperature=2.0)


def test_out_hidden_gradients_must_not_alias_the_logits():
    """The hidden part writes first: a hidden buffer over the logits would corrupt CE and KD."""
    rng = np.random.default_rng(7)
    z_s, z_t, labels = _logits(np.float64, B=4, C=3, seed=1)
    S, T = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    objective = PKDObjective(0.5, 2.0, pkd.ProgressiveDistillation([(0, 0)]))
    out = objective.loss_and_grad(z_s, z_t, labels, [S], [T])
    for logits, name in ((z_s, "student_logits"), (z_t, "teacher_logits")):
        out.hidden_result.grad_student[0] = logits
        kept = logits.copy()
        with pytest.raises(ValueError, match=rf"out.grad_student\[0\] shares memory with {name}"):
            objective.loss_and_grad(z_s, z_t, labels, [S], [T], out=out)
        np.testing.assert_array_equal(logits, kept)


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 12),
    C=st.integers(2, 10),
    alpha=st.floats(0.0, 1.0),
    tau=st.floats(0.05, 50.0),
    scale=st.sampled_from([0.1, 3.0, 30.0]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference(B, C, alpha, tau, scale, dtype, seed):
    z_s, z_t, labels = _logits(dtype, B=B, C=C, scale=scale, seed=seed)
    ce, kd, grad = logit_loss_and_grad(z_s, z_t, labels, alpha=alpha, temperature=tau)
    assert kd >= -1e-12
    rtol = 1e-5 if dtype == np.float32 else 1e-9
    assert ce == pytest.approx(reference.reference_cross_entropy(z_s, labels), rel=rtol,
                               abs=1e-12)
    assert kd == pytest.approx(reference.reference_kd_kl(z_s, z_t, tau), rel=rtol, abs=1e-12)
    ref_grad = reference.reference_logit_grad(z_s, z_t, labels, alpha, tau)
    # The reference's p − onehot cancels when p_y ≈ 1: allow its float64 rounding floor.
    floor = 8 * np.finfo(np.float64).eps * ((1 - alpha) + alpha * tau) / B
    atol = rtol * np.abs(ref_grad).max() + floor
    np.testing.assert_allclose(grad, ref_grad, rtol=rtol, atol=atol)
    # Each row of the gradient sums to 0 (softmax − onehot and p_s − p_t both do).
    np.testing.assert_allclose(grad.astype(np.float64).sum(axis=1), 0.0, atol=C * atol)


# -- bad input: one test each ---------------------------------------------------------------


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), float("inf")])
def test_alpha_out_of_range(alpha):
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        PKDObjective(alpha=alpha)
    with pytest.raises(ValueError, match="alpha"):
        logit_loss_and_grad(*_logits(np.float64), alpha=alpha, temperature=1.0)


@pytest.mark.parametrize("alpha", ["0.5", True, None])
def test_alpha_wrong_type(alpha):
    with pytest.raises(TypeError, match="alpha"):
        PKDObjective(alpha=alpha)


@pytest.mark.parametrize("tau", [0.0, -1.0, float("inf"), float("nan")])
def test_temperature_not_positive_finite(tau):
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        PKDObjective(temperature=tau)
    with pytest.raises(ValueError, match="temperature"):
        logit_loss_and_grad(*_logits(np.float64), alpha=0.5, temperature=tau)


def test_temperature_wrong_type():
    with pytest.raises(TypeError, match="temperature"):
        PKDObjective(temperature="10")


@pytest.mark.parametrize("hidden", ["pkd", {"layer_mapping": [(0, 1)]}, 1.0])
def test_hidden_wrong_type(hidden):
    with pytest.raises(TypeError, match="hidden must be a pkd.ProgressiveDistillation"):
        PKDObjective(hidden=hidden)


def _call(z_s=None, z_t=None, labels=None):
    default_s, default_t, default_labels = _logits(np.float64, B=4, C=3)
    return logit_loss_and_grad(default_s if z_s is None else z_s,
                               default_t if z_t is None else z_t,
                               default_labels if labels is None else labels,
                               alpha=0.5, temperature=2.0)


@pytest.mark.parametrize("shape", [(12,), (2, 2, 3)])
def test_logits_wrong_rank(shape):
    with pytest.raises(ValueError, match=r"student_logits must be 2-D"):
        _call(z_s=np.zeros(shape))


def test_logits_integer_dtype():
    with pytest.raises(TypeError, match="teacher_logits must be float32 or float64"):
        _call(z_t=np.zeros((4, 3), dtype=np.int64))


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_logits_nan_or_plus_inf(value):
    z_s = np.zeros((4, 3))
    z_s[2, 1] = value
    with pytest.raises(ValueError, match=r"student_logits contains 1 NaN/\+inf.*\(2, 1\)"):
        _call(z_s=z_s)


def test_logits_row_without_finite_entry():
    z_t = np.zeros((4, 3))
    z_t[3] = -np.inf
    with pytest.raises(ValueError, match="teacher_logits row 3 has no finite logit"):
        _call(z_t=z_t)


def test_logits_single_class():
    with pytest.raises(ValueError, match="at least 2 classes"):
        _call(z_s=np.zeros((4, 1)), z_t=np.zeros((4, 1)), labels=np.zeros(4, dtype=int))


def test_logits_shapes_differ():
    with pytest.raises(ValueError, match=r"\(4, 3\) but teacher_logits has shape \(4, 5\)"):
        _call(z_t=np.zeros((4, 5)))


def test_logits_torch_tensor():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="torch tensor"):
        _call(z_s=torch.zeros(4, 3))


def test_labels_float():
    with pytest.raises(TypeError, match="float labels are refused"):
        _call(labels=np.array([0.0, 1.0, 2.0, 0.0]))


def test_labels_bool():
    with pytest.raises(TypeError, match="got dtype bool"):
        _call(labels=np.array([True, False, True, False]))


def test_labels_not_numbers():
    with pytest.raises(TypeError, match="labels must be"):
        _call(labels="0120")
    with pytest.raises(TypeError, match="labels must hold int class indices"):
        _call(labels=np.array(["a", "b", "c", "d"]))


def test_labels_one_hot():
    with pytest.raises(ValueError, match=r"one-hot labels\? pass labels.argmax"):
        _call(labels=np.eye(3, dtype=int)[[0, 1, 2, 0]])


def test_labels_wrong_length():
    with pytest.raises(ValueError, match="labels has 3 entries but the logits have 4 examples"):
        _call(labels=[0, 1, 2])


@pytest.mark.parametrize("bad", [-1, 3])
def test_labels_out_of_range(bad):
    with pytest.raises(ValueError, match=rf"labels\[2\] = {bad} is out of range.*0\.\.2"):
        _call(labels=[0, 1, bad, 0])


def _objective_problem():
    config, student, teacher, mask = _hidden_problem(np.float64, shared=True)
    z_s, z_t, labels = _logits(np.float64, B=4, C=5)
    return PKDObjective(hidden=config), z_s, z_t, labels, student, teacher


def test_hidden_batch_differs_from_logits_3d():
    objective, z_s, z_t, labels, student, teacher = _objective_problem()
    student[1] = student[1][:3]
    with pytest.raises(ValueError, match=r"student_hidden\[1\] \(layer pair \(1, 3\)\) has "
                                         r"shape \(3, 5, 6\).*B=4"):
        objective.loss_and_grad(z_s, z_t, labels, student, teacher)


def test_hidden_rows_differ_from_logits_2d():
    objective, z_s, z_t, labels, student, teacher = _objective_problem()
    student = [S.reshape(-1, S.shape[-1]) for S in student]
    teacher = [T.reshape(-1, T.shape[-1]) for T in teacher]
    with pytest.raises(ValueError, match=r"student_hidden\[0\].*\(20, 6\).*one row per example"):
        objective.loss_and_grad(z_s, z_t, labels, student, teacher)


def test_teacher_hidden_batch_differs():
    objective, z_s, z_t, labels, student, teacher = _objective_problem()
    teacher[3] = np.concatenate([teacher[3], teacher[3]])
    with pytest.raises(ValueError, match=r"teacher_hidden\[3\] \(layer pair \(1, 3\)\)"):
        objective.loss_and_grad(z_s, z_t, labels, student, teacher)


def test_only_one_side_of_hidden_states():
    objective, z_s, z_t, labels, student, teacher = _objective_problem()
    with pytest.raises(ValueError, match="teacher_hidden is None"):
        objective.loss_and_grad(z_s, z_t, labels, student)
    with pytest.raises(ValueError, match="student_hidden is None"):
        objective.loss_and_grad(z_s, z_t, labels, None, teacher)


def test_hidden_states_without_hidden_part():
    _, z_s, z_t, labels, student, teacher = _objective_problem()
    with pytest.raises(ValueError, match=r"no hidden-state part \(hidden=None\)"):
        PKDObjective().loss_and_grad(z_s, z_t, labels, student, teacher)


def test_hidden_part_errors_pass_through():
    objective, z_s, z_t, labels, student, teacher = _objective_problem()
    with pytest.raises(ValueError, match="asks for layer 3 of teacher_hidden"):
        objective.loss_and_grad(z_s, z_t, labels, student, teacher[:3])
    with pytest.raises(ValueError, match="attention_mask has shape"):
        objective.loss_and_grad(z_s, z_t, labels, student, teacher,
                                attention_mask=np.ones((4, 4)))


# -- out=: a training loop's gradients reused -----------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared", [True, False])
def test_out_reuses_every_gradient(dtype, shared):
    config, student, teacher, mask = _hidden_problem(dtype, shared=shared)
    z_s, z_t, labels = _logits(dtype, B=4, C=5, seed=1)
    objective = PKDObjective(0.6, 2.0, config)
    first = objective.loss_and_grad(z_s, z_t, labels, student, teacher, attention_mask=mask)
    for array in (first.grad_logits, *first.grad_student):
        array.fill(7.0)  # stale values: every element must be overwritten
    logits_buffer, student_buffers = first.grad_logits, list(first.grad_student)
    z_s2, z_t2, labels2 = _logits(dtype, B=4, C=5, seed=2)
    _, student2, teacher2, mask2 = _hidden_problem(dtype, shared=shared, seed=3)
    fresh = objective.loss_and_grad(z_s2, z_t2, labels2, student2, teacher2,
                                    attention_mask=mask2)
    result = objective.loss_and_grad(z_s2, z_t2, labels2, student2, teacher2,
                                     attention_mask=mask2, out=first)
    assert result is first and result.loss == fresh.loss and result.parts == fresh.parts
    assert result.grad_logits is logits_buffer
    np.testing.assert_array_equal(result.grad_logits, fresh.grad_logits)
    _assert_logit_part(z_s2, z_t2, labels2, 0.6, 2.0, fresh.parts["ce"], fresh.parts["kd"],
                       result.grad_logits, RTOL[dtype])
    for got, buffer, want in zip(result.grad_student, student_buffers, fresh.grad_student,
                                 strict=True):
        assert got is buffer
        np.testing.assert_array_equal(got, want)
    assert result.hidden_result.grad_student is result.grad_student


def test_bad_out():
    z_s, z_t, labels = _logits(np.float32)
    objective = PKDObjective()
    good = objective.loss_and_grad(z_s, z_t, labels)
    with pytest.raises(TypeError, match="out must be a PKDResult"):
        objective.loss_and_grad(z_s, z_t, labels, out=good.grad_logits)
    good.grad_logits = np.empty((3, 5), dtype=np.float32)
    with pytest.raises(ValueError, match=r"out.grad_logits must be .* shape \(6, 5\) and "
                                         r"dtype float32; got shape \(3, 5\)"):
        objective.loss_and_grad(z_s, z_t, labels, out=good)
    good.grad_logits = z_s
    with pytest.raises(ValueError, match="out.grad_logits shares memory with student_logits"):
        objective.loss_and_grad(z_s, z_t, labels, out=good)


@pytest.mark.parametrize("shared", [True, False])
def test_out_grad_logits_must_not_alias_the_hidden_part(shared):
    """The hidden part writes first, so an aliased grad_logits would overwrite it (or an input)."""
    config, student, teacher, mask = _hidden_problem(np.float32, shared=shared)
    z_s, z_t, labels = _logits(np.float32, B=4, C=5, seed=1)
    objective = PKDObjective(0.6, 2.0, config)
    out = objective.loss_and_grad(z_s, z_t, labels, student, teacher, attention_mask=mask)
    grad_projection = (out.grad_projection if shared else out.grad_projection[(1, 3)])
    projection_name = "out.grad_projection" if shared else r"out.grad_projection\[\(1, 3\)\]"
    targets = [(out.grad_student[1], r"out.grad_student\[1\]"),
               (grad_projection, projection_name),
               (student[0], r"student_hidden\[0\]"), (teacher[3], r"teacher_hidden\[3\]")]
    logits_buffer = out.grad_logits
    for target, name in targets:
        out.grad_logits = target.reshape(-1)[:20].reshape(4, 5)
        before = [g.copy() for g in out.grad_student]
        with pytest.raises(ValueError, match=f"out.grad_logits shares memory with {name}"):
            objective.loss_and_grad(z_s, z_t, labels, student, teacher, attention_mask=mask,
                                    out=out)
        for got, want in zip(out.grad_student, before, strict=True):
            np.testing.assert_array_equal(got, want)  # refused before any write
    out.grad_logits = logits_buffer
    objective.loss_and_grad(z_s, z_t, labels, student, teacher, attention_mask=mask, out=out)
