"""pkd.torch against torch's own formulas and autograd, gradcheck, ProgressiveDistillation."""

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

import pkd  # noqa: E402
import pkd.engine  # noqa: E402
import pkd.torch as pt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = [torch.float32, torch.float64]
RTOL = {torch.float32: 1e-5, torch.float64: 1e-11}


# -- torch's own formula: the independent witness -------------------------------------------


def torch_formula(S, T, P=None, mask=None, normalize=False):
    """ℓ written with torch ops (autograd differentiates it): masked mean over rows."""
    Y = S if P is None else S @ P
    if normalize:
        U = torch.nn.functional.normalize(Y, dim=-1, eps=1e-12)
        V = torch.nn.functional.normalize(T, dim=-1, eps=1e-12)
        per_row = ((U - V) ** 2).sum(-1)
    else:
        per_row = ((Y - T) ** 2).mean(-1)
    if mask is None:
        return per_row.mean()
    w = torch.as_tensor(mask).to(per_row.dtype)
    return (per_row * w).sum() / w.sum()


def problem(dtype, *, three_d=False, projected=True, n=24, d_s=5, d_t=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lead = (4, n // 4) if three_d else (n,)
    width_s = d_s if projected else d_t
    S = torch.randn(*lead, width_s, generator=g, dtype=dtype)
    T = torch.randn(*lead, d_t, generator=g, dtype=dtype)
    P = torch.randn(d_s, d_t, generator=g, dtype=dtype) / d_s**0.5 if projected else None
    mask = torch.rand(*lead, generator=g) < 0.6
    mask.view(-1)[0] = True
    return S, T, P, mask


def assert_close(actual, expected, dtype):
    rtol = RTOL[dtype]
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


def leaf(x):
    return None if x is None else x.clone().requires_grad_(True)


# -- import hygiene ---------------------------------------------------------------------


def test_import_pkd_does_not_import_torch():
    code = ("import sys, pkd; bad = [m for m in ('torch', 'pkd.torch') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_module_named_torch_does_not_shadow_real_torch():
    assert pt.torch is sys.modules["torch"]
    assert hasattr(pt.torch, "autograd") and hasattr(pt.nn, "Module")
    assert os.path.join("pkd", "torch") not in torch.__file__
    assert pt.__name__ == "pkd.torch" and pkd.torch is pt


# -- projected_mse: forward and backward against torch ----------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("projected", [True, False])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("three_d", [False, True])
def test_matches_torch_formula_and_autograd(dtype, normalize, projected, masked, three_d):
    S, T, P, mask = problem(dtype, three_d=three_d, projected=projected)
    mask = mask if masked else None
    s, p = leaf(S), leaf(P)
    loss = pt.projected_mse(s, T, p, mask=mask, normalize=normalize)
    assert loss.shape == () and loss.dtype == dtype
    loss.backward()

    s_ref, p_ref = leaf(S), leaf(P)
    expected = torch_formula(s_ref, T, p_ref, mask, normalize)
    expected.backward()
    assert_close(loss.detach(), expected.detach(), dtype)
    assert s.grad.shape == S.shape and s.grad.dtype == dtype
    assert_close(s.grad, s_ref.grad, dtype)
    if projected:
        assert_close(p.grad, p_ref.grad, dtype)
    if masked:  # padding gets exactly zero gradient
        assert not s.grad[~mask].any()


def test_mask_accepts_numpy_int_and_cls_tokens():
    S, T, P, mask = problem(torch.float64, three_d=True)
    as_bool = pt.projected_mse(S, T, P, mask=mask)
    assert pt.projected_mse(S, T, P, mask=mask.numpy().astype(np.int64)).item() == as_bool.item()
    assert pt.projected_mse(S, T, P, mask=mask.long()).item() == as_bool.item()
    cls = pt.projected_mse(S, T, P, tokens="cls")
    expected = torch_formula(S[:, :1], T[:, :1], P)
    assert cls.item() == pytest.approx(expected.item(), rel=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 9),
    d_s=st.integers(1, 6),
    d_t=st.integers(1, 6),
    normalize=st.booleans(),
    seed=st.integers(0, 2**16),
    keep=st.floats(0.1, 1.0),
)
def test_property_random_shapes_and_masks(n, d_s, d_t, normalize, seed, keep):
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(n, d_s, generator=g, dtype=torch.float64, requires_grad=True)
    T = torch.randn(n, d_t, generator=g, dtype=torch.float64)
    P = torch.randn(d_s, d_t, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(n, generator=g) < keep
    mask[seed % n] = True
    loss = pt.projected_mse(S, T, P, mask=mask, normalize=normalize)
    expected = torch_formula(S, T, P, mask, normalize)
    got = torch.autograd.grad(loss, (S, P))
    want = torch.autograd.grad(expected, (S, P))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10, abs=1e-14)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12 * (1 + float(b.abs().max())))


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("projected", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_float64(normalize, projected, masked):
    S, T, P, mask = problem(torch.float64, three_d=True, projected=projected, n=8, d_s=3,
                            d_t=4)
    mask = mask if masked else None
    inputs = (leaf(S),) if P is None else (leaf(S), leaf(P))

    def f(*args):
        return pt.projected_mse(args[0], T, args[1] if len(args) > 1 else None, mask=mask,
                                normalize=normalize)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradient_scales_with_grad_output_and_survives_retain_graph():
    S, T, P, mask = problem(torch.float64)
    s, p = leaf(S), leaf(P)
    loss = pt.projected_mse(s, T, p, mask=mask)
    (3.0 * loss).backward(retain_graph=True)
    first_s, first_p = s.grad.clone(), p.grad.clone()
    s_ref, p_ref = leaf(S), leaf(P)
    (3.0 * torch_formula(s_ref, T, p_ref, mask)).backward()
    assert_close(first_s, s_ref.grad, torch.float64)
    assert_close(first_p, p_ref.grad, torch.float64)
    (3.0 * loss).backward()  # the saved gradients were not scaled in place
    assert_close(s.grad, 2 * first_s, torch.float64)
    assert_close(p.grad, 2 * first_p, torch.float64)


def test_double_backward_is_refused():
    S, T, P, _ = problem(torch.float64)
    s = leaf(S)
    loss = pt.projected_mse(s, T, P)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(loss, s, create_graph=True)
    weight = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(weight * pt.projected_mse(s, T, P), s, create_graph=True)
    (grad,) = torch.autograd.grad(loss, s)  # first order still works
    assert grad.shape == s.shape


def test_non_contiguous_inputs_give_the_same_result():
    S, T, P, mask = problem(torch.float64)
    s_t = leaf(S.T.contiguous())  # (d_s, N): its transpose is a non-contiguous (N, d_s) view
    t_nc = T.T.contiguous().T
    p_t = leaf(P.T.contiguous())
    assert not s_t.T.is_contiguous() and not t_nc.is_contiguous()
    loss = pt.projected_mse(s_t.T, t_nc, p_t.T, mask=mask)
    loss.backward()
    s_ref, p_ref = leaf(S), leaf(P)
    torch_formula(s_ref, T, p_ref, mask).backward()
    assert loss.item() == pytest.approx(pt.projected_mse(S, T, P, mask=mask).item(), rel=1e-14)
    assert_close(s_t.grad.T, s_ref.grad, torch.float64)
    assert_close(p_t.grad.T, p_ref.grad, torch.float64)


# -- memory: no copies, and only the gradients that are needed --------------------------


@pytest.fixture
def kernel_calls(monkeypatch):
    """Record the arguments pkd.torch hands to pkd.engine.pair_loss_and_grad."""
    calls = []
    real = pkd.engine.pair_loss_and_grad

    def spy(student, teacher, projection, rows, **kwargs):
        calls.append(dict(student=student, teacher=teacher, projection=projection, **kwargs))
        return real(student, teacher, projection, rows, **kwargs)

    monkeypatch.setattr(pkd.engine, "pair_loss_and_grad", spy)
    return calls


def test_kernels_work_in_torch_memory(kernel_calls):
    S, T, P, mask = problem(torch.float32, three_d=True)
    s, p = leaf(S), leaf(P)
    loss = pt.projected_mse(s, T, p, mask=mask)
    (call,) = kernel_calls
    assert np.shares_memory(call["student"], s.detach().numpy())
    assert np.shares_memory(call["teacher"], T.numpy())
    assert np.shares_memory(call["projection"], p.detach().numpy())
    # The gradients were written straight into the tensors saved for backward.
    saved_s, saved_p = loss.grad_fn.saved_tensors
    assert np.shares_memory(call["grad_student"], saved_s.numpy())
    assert np.shares_memory(call["grad_projection"], saved_p.numpy())


def test_no_gradient_work_when_nothing_needs_it(kernel_calls):
    S, T, P, _ = problem(torch.float64)
    pt.projected_mse(S, T, P)  # nothing requires grad
    with torch.no_grad():
        pt.projected_mse(leaf(S), T, leaf(P))
    with torch.inference_mode():
        pt.projected_mse(leaf(S), T, leaf(P))
    assert len(kernel_calls) == 3
    for call in kernel_calls:
        assert call["grad_student"] is None and call["grad_projection"] is None


def test_only_the_needed_gradient_is_computed(kernel_calls):
    S, T, P, _ = problem(torch.float64)
    p = leaf(P)
    pt.projected_mse(S, T, p).backward()
    s = leaf(S)
    pt.projected_mse(s, T, P).backward()
    first, second = kernel_calls
    assert first["grad_student"] is None and first["grad_projection"] is not None
    assert second["grad_student"] is not None and second["grad_projection"] is None
    assert p.grad is not None and s.grad is not None


def test_teacher_requiring_grad_is_fine_under_no_grad():
    S, T, P, _ = problem(torch.float64)
    with torch.no_grad():
        value = pt.projected_mse(S, leaf(T), P)
    assert value.item() == pytest.approx(torch_formula(S, T, P).item(), rel=1e-12)


# -- bad input ------------------------------------------------------------------------


def test_refuses_other_devices():
    S, T, P, _ = problem(torch.float32)
    with pytest.raises(TypeError, match="student is on device meta.*CPU"):
        pt.projected_mse(S.to("meta"), T, P)
    with pytest.raises(TypeError, match="projection is on device meta"):
        pt.projected_mse(S, T, P.to("meta"))
    _, _, _, mask = problem(torch.float32)
    with pytest.raises(TypeError, match="mask is on device meta"):
        pt.projected_mse(S, T, P, mask=mask.to("meta"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int32])
def test_refuses_other_dtypes(dtype):
    S, T, P, _ = problem(torch.float32)
    with pytest.raises(TypeError, match=f"student must be float32 or float64, got {dtype}"):
        pt.projected_mse(S.to(dtype), T.to(dtype), None if P is None else P.to(dtype))


def test_refuses_mixed_dtypes():
    S, T, P, _ = problem(torch.float32)
    with pytest.raises(TypeError, match="mixed dtypes.*teacher torch.float64"):
        pt.projected_mse(S, T.double(), P)
    with pytest.raises(TypeError, match="mixed dtypes.*projection torch.float64"):
        pt.projected_mse(S, T, P.double())


def test_flags_must_be_true_or_false():
    S, T, P, _ = problem(torch.float64)
    module = pt.PKDHiddenLoss(pkd.ProgressiveDistillation([(0, 0)]).with_projection(
        S.shape[-1], T.shape[-1], seed=0, dtype=np.float64))
    with pytest.raises(TypeError, match="normalize must be True or False, got 'yes'"):
        pt.projected_mse(S, T, P, normalize="yes")
    with pytest.raises(TypeError, match="check_finite must be True or False, got 'no'"):
        pt.projected_mse(S, T, P, check_finite="no")
    with pytest.raises(TypeError, match="check_finite must be True or False, got 0"):
        module([S], [T], check_finite=0)


def test_refuses_teacher_or_mask_requiring_grad():
    S, T, P, mask = problem(torch.float64)
    with pytest.raises(ValueError, match=r"teacher requires grad.*teacher\.detach\(\)"):
        pt.projected_mse(S, leaf(T), P)
    with pytest.raises(ValueError, match="mask requires grad"):
        pt.projected_mse(S, T, P, mask=mask.double().requires_grad_(True))


def test_refuses_numpy_sparse_and_wrong_shapes():
    S, T, P, mask = problem(torch.float64)
    with pytest.raises(TypeError, match="student must be a torch.Tensor.*pkd.projected_mse"):
        pt.projected_mse(S.numpy(), T, P)
    with pytest.raises(TypeError, match="layout"):
        pt.projected_mse(S.to_sparse(), T, P)
    with pytest.raises(ValueError, match="disagree on rows"):
        pt.projected_mse(S[:-1], T, P)
    with pytest.raises(ValueError, match=r"projection has shape \(7, 5\).*must be \(5, 7\)"):
        pt.projected_mse(S, T, P.T)
    with pytest.raises(ValueError, match=r"width 5 differs from teacher width 7.*\(5, 7\)"):
        pt.projected_mse(S, T)
    with pytest.raises(ValueError, match="must be 2-D or 3-D"):
        pt.projected_mse(S[0], T[0], P)
    with pytest.raises(ValueError, match="mask has shape"):
        pt.projected_mse(S, T, P, mask=mask[:-1])
    with pytest.raises(ValueError, match="select no row"):
        pt.projected_mse(S, T, P, mask=torch.zeros_like(mask))


def test_non_finite_is_refused_unless_masked_out():
    S, T, P, mask = problem(torch.float64)
    bad = S.clone()
    row = int(torch.nonzero(~mask)[0])
    bad[row, 0] = float("nan")
    assert torch.isfinite(pt.projected_mse(bad, T, P, mask=mask))  # padding is never read
    with pytest.raises(ValueError, match="student contains 1 NaN/Inf"):
        pt.projected_mse(bad, T, P)
    assert torch.isnan(pt.projected_mse(bad, T, P, check_finite=False))


# -- PKDHiddenLoss vs ProgressiveDistillation --------------------------------------------


def hidden_states(dtype, widths, *, three_d=True, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    lead = (3, 4) if three_d else (12,)
    return [torch.randn(*lead, d, generator=g, dtype=dtype).requires_grad_(requires_grad)
            for d in widths]


CONFIGS = {
    "shared": lambda: pkd.ProgressiveDistillation([(0, 1), (1, 3), (2, 4)]).with_projection(
        4, 6, seed=0, dtype=np.float64),
    "per_pair": lambda: pkd.ProgressiveDistillation(
        [(0, 1), (1, 3), (2, 4)], hidden_weight=2.5, layer_weights=[1.0, 0.0, 3.0],
    ).with_projection(4, 6, seed=1, dtype=np.float64, shared=False),
    "normalized_always": lambda: pkd.ProgressiveDistillation(
        [(0, 0), (1, 2), (1, 4)], normalize=True, project="always",
    ).with_projection(4, 6, seed=2, dtype=np.float64),
    "no_projection_cls": lambda: pkd.ProgressiveDistillation(
        [(0, 0), (2, 2)], hidden_weight=0.5, tokens="cls"),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("masked", [False, True])
def test_hidden_loss_matches_progressive_distillation(dtype, name, masked):
    config = CONFIGS[name]()
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    if config.projection is not None:  # the config's projection in the test dtype
        config.projection = (config.projection.astype(np_dtype) if config.shared_projection
                             else {k: v.astype(np_dtype) for k, v in config.projection.items()})
    same_width = name == "no_projection_cls"
    student = hidden_states(dtype, [6 if same_width else 4] * 3, requires_grad=True)
    teacher = hidden_states(dtype, [6] * 5, seed=1)
    mask = (torch.rand(3, 4, generator=torch.Generator().manual_seed(2)) < 0.6) if masked else None
    if mask is not None:
        mask[:, 0] = True

    criterion = pt.PKDHiddenLoss(config)
    loss = criterion(student, teacher, mask)
    loss.backward()
    expected = config.loss_and_grad([s.detach().numpy() for s in student],
                                    [t.numpy() for t in teacher],
                                    attention_mask=None if mask is None else mask.numpy())
    rtol = RTOL[dtype] * 10
    assert loss.dtype == dtype
    assert loss.item() == pytest.approx(expected.loss, rel=rtol)
    for s, g in zip(student, expected.grad_student, strict=True):
        if g is None:
            assert s.grad is None
        else:
            assert_close(s.grad, torch.from_numpy(g), dtype)
    if config.projection is None:
        assert list(criterion.parameters()) == []
    elif config.shared_projection:
        assert_close(criterion.projection.grad, torch.from_numpy(expected.grad_projection), dtype)
    else:
        for pair, g in expected.grad_projection.items():
            assert_close(criterion.projection_for(pair).grad, torch.from_numpy(g), dtype)


def test_hidden_loss_against_torch_formula_per_pair():
    """An independent witness: λ Σ ω_k ℓ_k / Σ ω_k written with torch ops."""
    config = CONFIGS["per_pair"]()
    criterion = pt.PKDHiddenLoss(config)
    student = hidden_states(torch.float64, [4] * 3, requires_grad=True)
    teacher = hidden_states(torch.float64, [6] * 5, seed=1)
    loss = criterion(student, teacher)
    omega = config.layer_weights
    expected = sum(
        config.hidden_weight * omega[k] / omega.sum()
        * torch_formula(student[s], teacher[t], criterion.projection_for((s, t)))
        for k, (s, t) in enumerate(config.layer_mapping)
    )
    got = torch.autograd.grad(loss, [*student, *criterion.parameters()], allow_unused=True)
    want = torch.autograd.grad(expected, [*student, *criterion.parameters()], allow_unused=True)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    for a, b in zip(got, want, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close(a, b, torch.float64)


def test_hidden_loss_gradcheck_shared_projection():
    config = pkd.ProgressiveDistillation([(0, 1), (1, 1)]).with_projection(
        3, 4, seed=0, dtype=np.float64)
    criterion = pt.PKDHiddenLoss(config)
    teacher = hidden_states(torch.float64, [4, 4], three_d=False, seed=1)
    student = hidden_states(torch.float64, [3, 3], three_d=False, requires_grad=True)
    mask = torch.arange(12) % 3 != 0

    def f(s0, s1, p):  # gradcheck perturbs p: swap it in for the parameter
        return torch.func.functional_call(criterion, {"projection": p},
                                          ([s0, s1], teacher, mask))

    projection = criterion.projection.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (*student, projection), eps=1e-6, atol=1e-8)


def test_hidden_loss_module_structure():
    config = CONFIGS["per_pair"]()
    criterion = pt.PKDHiddenLoss(config)
    assert isinstance(criterion.projections, torch.nn.ParameterDict)
    assert sorted(dict(criterion.named_parameters())) == [
        "projections.0_1", "projections.1_3", "projections.2_4"]
    p = criterion.projection_for((1, 3))
    np.testing.assert_array_equal(p.detach().numpy(), config.projection[(1, 3)])
    assert not np.shares_memory(p.detach().numpy(), config.projection[(1, 3)])  # a copy
    with pytest.raises(ValueError, match=r"layer pair \(5, 5\) is not in the mapping"):
        criterion.projection_for((5, 5))
    back = criterion.to_config()
    assert back.layer_mapping == config.layer_mapping
    assert back.hidden_weight == 2.5 and back.layer_weights.tolist() == [1.0, 0.0, 3.0]
    np.testing.assert_array_equal(back.projection[(2, 4)], config.projection[(2, 4)])
    assert "layer_weights" in repr(criterion)

    shared = pt.PKDHiddenLoss(CONFIGS["shared"]())
    assert [n for n, _ in shared.named_parameters()] == ["projection"]
    assert shared.projection_for((1, 3)) is shared.projection
    assert "projection" in shared.state_dict()
    assert pt.PKDHiddenLoss(CONFIGS["no_projection_cls"]()).projection is None


def test_hidden_loss_accepts_stacked_tensors_and_casts_with_module():
    config = CONFIGS["shared"]()  # float64 projection
    criterion = pt.PKDHiddenLoss(config).float()
    student = torch.randn(3, 12, 4, requires_grad=True)
    teacher = torch.randn(5, 12, 6)
    loss = criterion(student, teacher)
    loss.backward()
    assert loss.dtype == torch.float32 and student.grad.shape == student.shape
    expected = config.loss_and_grad(student.detach().double().numpy(), teacher.double().numpy())
    assert loss.item() == pytest.approx(expected.loss, rel=1e-5)


def test_hidden_loss_errors_name_the_pair():
    criterion = pt.PKDHiddenLoss(CONFIGS["shared"]())
    student = hidden_states(torch.float64, [4] * 3, requires_grad=True)
    teacher = hidden_states(torch.float64, [6] * 5, seed=1)
    with pytest.raises(ValueError, match=r"layer pair \(2, 4\) asks for layer 4 of teacher_hidden"):
        criterion(student, teacher[:4])
    with pytest.raises(ValueError, match=r"layer pair \(1, 3\) asks for layer 1 of student"):
        criterion(student[:1], teacher)
    with pytest.raises(ValueError, match="student_hidden is an empty sequence"):
        criterion([], teacher)
    with pytest.raises(TypeError, match="student_hidden must be a list/tuple"):
        criterion({0: student[0]}, teacher)
    with pytest.raises(TypeError, match=r"mixed dtypes for layer pair \(0, 1\)"):
        criterion([s.float() for s in student], [t.float() for t in teacher])  # P is float64
    with pytest.raises(ValueError,
                       match=r"teacher_hidden\[1\] for layer pair \(0, 1\) requires grad"):
        criterion(student, [t.clone().requires_grad_(True) for t in teacher])
    with pytest.raises(TypeError, match=r"student_hidden\[1\] for layer pair \(1, 3\) must be "
                                        r"a torch.Tensor"):
        criterion([student[0], student[1].detach().numpy(), student[2]], teacher)
    with pytest.raises(ValueError, match=r"student_hidden\[0\] and teacher_hidden\[1\] for "
                                         r"layer pair \(0, 1\) disagree on rows"):
        criterion([s[:2] for s in student], teacher)
    with pytest.raises(ValueError, match=r"projection for layer pair \(0, 1\) has shape"):
        criterion(hidden_states(torch.float64, [5] * 3), teacher)
    with pytest.raises(TypeError, match="config must be a pkd.ProgressiveDistillation"):
        pt.PKDHiddenLoss({"layer_mapping": [(0, 1)]})


@pytest.fixture
def module_kernel_calls(monkeypatch):
    """Record what PKDHiddenLoss (through pkd.engine.hidden_loss) hands the kernels."""
    calls = []
    real = pkd.engine.pair_loss_and_grad

    def spy(student, teacher, projection, rows, **kwargs):
        calls.append(dict(student=student, projection=projection, **kwargs))
        return real(student, teacher, projection, rows, **kwargs)

    monkeypatch.setattr(pkd.engine, "pair_loss_and_grad", spy)
    return calls


def test_hidden_loss_is_one_autograd_node(module_kernel_calls):
    config = CONFIGS["shared"]()
    criterion = pt.PKDHiddenLoss(config)
    stacked = torch.randn(3, 12, 4, dtype=torch.float64, requires_grad=True)
    student = list(stacked.unbind(0))  # views: gradients reach the stacked tensor
    teacher = hidden_states(torch.float64, [6] * 5, three_d=False, seed=1)
    loss = criterion(student, teacher)
    assert type(loss.grad_fn).__name__ == "_HiddenLossBackward"
    # One edge per mapped student layer and one for the shared projection.
    assert len(loss.grad_fn.next_functions) == 3 + 1
    assert len(module_kernel_calls) == 3  # one kernel call per pair, in that one node
    # The shared projection's gradient is summed over the pairs in pkd's buffer.
    assert all(np.shares_memory(call["grad_projection"], module_kernel_calls[0]["grad_projection"])
               for call in module_kernel_calls)
    assert [call["accumulate_projection"] for call in module_kernel_calls] == [False, True, True]
    (2.0 * loss).backward()  # the incoming gradient scales every gradient
    expected = config.loss_and_grad(stacked.detach().numpy(), [t.numpy() for t in teacher])
    assert_close(stacked.grad, 2.0 * torch.from_numpy(np.stack(expected.grad_student)),
                 torch.float64)
    assert_close(criterion.projection.grad, 2.0 * torch.from_numpy(expected.grad_projection),
                 torch.float64)


def test_hidden_loss_computes_only_the_needed_gradients(module_kernel_calls):
    criterion = pt.PKDHiddenLoss(CONFIGS["shared"]())
    student = hidden_states(torch.float64, [4] * 3)  # frozen student: P's gradient only
    teacher = hidden_states(torch.float64, [6] * 5, seed=1)
    criterion(student, teacher).backward()
    assert criterion.projection.grad is not None
    assert all(call["grad_student"] is None and call["grad_projection"] is not None
               for call in module_kernel_calls)
    module_kernel_calls.clear()
    criterion.projection.requires_grad_(False)  # frozen projection: the student's only
    student = hidden_states(torch.float64, [4] * 3, requires_grad=True)
    criterion(student, teacher).backward()
    assert all(call["grad_student"] is not None and call["grad_projection"] is None
               for call in module_kernel_calls)
    assert all(s.grad is not None for s in student)
    module_kernel_calls.clear()
    criterion.projection.requires_grad_(True)
    with torch.no_grad():
        value = criterion(student, teacher)
    assert value.grad_fn is None
    assert all(call["grad_student"] is None and call["grad_projection"] is None
               for call in module_kernel_calls)


def test_hidden_loss_projection_no_pair_uses_gets_no_gradient():
    # "auto" with equal widths on pair (0, 0): its per-pair projection is not applied.
    config = pkd.ProgressiveDistillation([(0, 0), (1, 1)]).with_projection(
        6, 6, seed=0, dtype=np.float64, shared=False)
    criterion = pt.PKDHiddenLoss(config)
    student = [torch.randn(5, 6, dtype=torch.float64, requires_grad=True),
               torch.randn(5, 6, dtype=torch.float64, requires_grad=True)]
    teacher = [torch.randn(5, 6, dtype=torch.float64) for _ in range(2)]
    criterion.project = "always"
    criterion(student, teacher).backward()
    assert all(p.grad is not None for p in criterion.parameters())
    criterion.zero_grad(set_to_none=True)
    criterion.project = "auto"  # a changed setting takes effect on the next call
    loss = criterion(student, teacher)
    loss.backward()
    assert all(p.grad is None for p in criterion.parameters())
    want = sum(torch_formula(s, t) for s, t in zip(student, teacher, strict=True)) / 2
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)


def test_hidden_loss_settings_changed_after_construction_take_effect():
    criterion = pt.PKDHiddenLoss(CONFIGS["shared"]())
    student = hidden_states(torch.float64, [4] * 3)
    teacher = hidden_states(torch.float64, [6] * 5, seed=1)
    base = criterion(student, teacher).item()
    criterion.hidden_weight = 3.0
    assert criterion(student, teacher).item() == pytest.approx(3.0 * base, rel=1e-14)
    criterion.layer_weights = [1.0, 0.0, 0.0]
    only_first = torch_formula(student[0], teacher[1], criterion.projection)
    assert criterion(student, teacher).item() == pytest.approx(3.0 * only_first.item(),
                                                               rel=1e-12)


def test_hidden_loss_non_contiguous_layers():
    criterion = pt.PKDHiddenLoss(CONFIGS["shared"]())
    student = [torch.randn(4, 12, dtype=torch.float64).T.requires_grad_(True) for _ in range(3)]
    teacher = hidden_states(torch.float64, [6] * 5, three_d=False, seed=1)
    assert not student[0].is_contiguous()
    criterion(student, teacher).backward()
    contiguous = [s.detach().contiguous().requires_grad_(True) for s in student]
    criterion.zero_grad(set_to_none=True)
    criterion(contiguous, teacher).backward()
    for a, b in zip(student, contiguous, strict=True):
        assert_close(a.grad, b.grad, torch.float64)


@pytest.mark.parametrize("first", DTYPES)
def test_hidden_loss_pairs_of_different_dtypes_compute_in_float64(first):
    # No projection, so each pair has one dtype, but the pairs differ: the loss is
    # computed (and returned) in float64 whichever pair comes last.
    second = torch.float64 if first == torch.float32 else torch.float32
    criterion = pt.PKDHiddenLoss(pkd.ProgressiveDistillation([(0, 0), (1, 1)]))
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((6, 4)) for _ in range(4)]
    student = [leaf(torch.tensor(arrays[0], dtype=first)),
               leaf(torch.tensor(arrays[1], dtype=second))]
    teacher = [torch.tensor(arrays[2], dtype=first), torch.tensor(arrays[3], dtype=second)]
    loss = criterion(student, teacher)
    assert loss.dtype == torch.float64
    loss.backward()
    want = criterion.to_config().loss_and_grad([s.detach().numpy() for s in student],
                                               [t.numpy() for t in teacher])
    assert loss.item() == want.loss
    for s, g in zip(student, want.grad_student, strict=True):
        assert s.grad.dtype == s.dtype  # autograd casts back to each layer's dtype
        np.testing.assert_allclose(s.grad.numpy(), g, rtol=1e-6)


def test_hidden_loss_width_mismatch_without_projection():
    criterion = pt.PKDHiddenLoss(pkd.ProgressiveDistillation([(0, 1)]))
    with pytest.raises(ValueError, match=r"layer pair \(0, 1\): student width 4 differs.*"
                                         r"with_projection\(4, 6\)"):
        criterion(hidden_states(torch.float64, [4]), hidden_states(torch.float64, [6, 6]))


# -- the example --------------------------------------------------------------------------


def test_training_loop_example_runs_and_loss_goes_down():
    script = os.path.join(ROOT, "examples", "torch_training_loop.py")
    result = subprocess.run([sys.executable, script], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    initial, final = (float(x) for x in
                      result.stdout.strip().splitlines()[-1].split(":")[1].split("->"))
    assert final < 0.5 * initial


def test_gradients_a_retained_graph_holds_are_never_handed_out_again():
    # pkd's kept gradient blocks are reused only once nothing references them: the
    # gradients a retained graph saved keep their block while other calls run.
    pkd.workspace.clear_workspace()
    gen = torch.Generator().manual_seed(0)
    T = torch.randn(8, 6, dtype=torch.float64, generator=gen)
    P = torch.randn(4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    S = torch.randn(8, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    loss = pt.projected_mse(S, T, P)
    loss.backward(retain_graph=True)
    first_s, first_p = S.grad.clone(), P.grad.clone()
    for _ in range(4):
        other = torch.randn(8, 4, dtype=torch.float64, generator=gen, requires_grad=True)
        pt.projected_mse(other, 3 * T, P.detach().requires_grad_()).backward()
    loss.backward()  # the saved gradients again, added to the first
    assert_close(S.grad, 2 * first_s, torch.float64)
    assert_close(P.grad, 2 * first_p, torch.float64)


def test_bridge_goes_through_the_engine_interface_only():
    # pkd.torch once reached into ProgressiveDistillation's private methods; it now calls
    # pkd.engine's documented functions, so the configuration class may change freely.
    import inspect
    import re

    source = inspect.getsource(pt)
    assert re.findall(r"\b(?:config|plan\.config|ProgressiveDistillation)\._\w+", source) == []
    assert "engine.hidden_loss(" in source and "engine.projection_applies(" in source
