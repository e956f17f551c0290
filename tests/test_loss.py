"""projected_mse / projected_mse_grad against three witnesses: reference, finite differences,
torch autograd."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pkd
import reference

DTYPES = [np.float32, np.float64]
RTOL = {np.float32: 2e-5, np.float64: 1e-10}


def _problem(dtype, n=40, d_s=6, d_t=9, seed=0, projected=True, three_d=False):
    rng = np.random.default_rng(seed)
    lead = (4, n // 4) if three_d else (n,)
    width_s = d_s if projected else d_t
    S = rng.standard_normal((*lead, width_s)).astype(dtype)
    T = rng.standard_normal((*lead, d_t)).astype(dtype)
    P = (rng.standard_normal((d_s, d_t)) / np.sqrt(d_s)).astype(dtype) if projected else None
    mask = rng.random(lead) < 0.7
    mask.flat[0] = True
    return S, T, P, mask


def _reference(S, T, P, mask, normalize):
    fn = reference.normalized_loss if normalize else reference.projected_mse
    w = None if mask is None else mask.reshape(-1).astype(float)
    loss, dS, dP = fn(S.reshape(-1, S.shape[-1]), T.reshape(-1, T.shape[-1]), P, w)
    return loss, dS.reshape(S.shape), dP


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("projected", [True, False])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("three_d", [False, True])
def test_matches_reference(dtype, normalize, projected, masked, three_d):
    S, T, P, mask = _problem(dtype, projected=projected, three_d=three_d)
    mask = mask if masked else None
    loss, dS, dP = pkd.projected_mse_grad(S, T, P, mask=mask, normalize=normalize)
    ref_loss, ref_dS, ref_dP = _reference(S, T, P, mask, normalize)
    assert loss == pytest.approx(ref_loss, rel=RTOL[dtype])
    assert dS.dtype == dtype and dS.shape == S.shape
    scale = np.abs(ref_dS).max()
    np.testing.assert_allclose(dS, ref_dS, rtol=RTOL[dtype], atol=RTOL[dtype] * scale)
    if projected:
        assert dP.dtype == dtype
        np.testing.assert_allclose(dP, ref_dP, rtol=RTOL[dtype],
                                   atol=RTOL[dtype] * np.abs(ref_dP).max())
    else:
        assert dP is None
    assert pkd.projected_mse(S, T, P, mask=mask, normalize=normalize) == pytest.approx(
        loss, rel=1e-12)


_finite_difference = reference.finite_difference


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_gradients_match_finite_differences(normalize, masked):
    S, T, P, mask = _problem(np.float64, n=12, d_s=3, d_t=5, three_d=True)
    mask = mask if masked else None
    _, dS, dP = pkd.projected_mse_grad(S, T, P, mask=mask, normalize=normalize)

    def f():
        return pkd.projected_mse(S, T, P, mask=mask, normalize=normalize)

    np.testing.assert_allclose(dS, _finite_difference(f, S), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(dP, _finite_difference(f, P), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_torch_autograd(dtype, normalize, masked):
    torch = pytest.importorskip("torch")
    S, T, P, mask = _problem(dtype, three_d=True)
    mask = mask if masked else np.ones(mask.shape, dtype=bool)
    loss, dS, dP = pkd.projected_mse_grad(S, T, P, mask=mask if masked else None,
                                          normalize=normalize)
    s = torch.tensor(S, requires_grad=True)
    p = torch.tensor(P, requires_grad=True)
    t = torch.tensor(T)
    w = torch.tensor(mask, dtype=s.dtype)
    y = s @ p
    if normalize:
        u = torch.nn.functional.normalize(y, dim=-1, eps=1e-12)
        v = torch.nn.functional.normalize(t, dim=-1, eps=1e-12)
        per_row = ((u - v) ** 2).sum(-1)
        expected = (per_row * w).sum() / w.sum()
    else:
        per_row = ((y - t) ** 2).mean(-1)
        expected = (per_row * w).sum() / w.sum()
    expected.backward()
    rtol = 1e-4 if dtype == np.float32 else 1e-10
    assert loss == pytest.approx(expected.item(), rel=rtol)
    np.testing.assert_allclose(dS, s.grad.numpy(), rtol=rtol, atol=rtol * float(s.grad.abs().max()))
    np.testing.assert_allclose(dP, p.grad.numpy(), rtol=rtol, atol=rtol * float(p.grad.abs().max()))


def test_normalized_zero_rows_are_finite_and_follow_design():
    S = np.zeros((3, 4))
    S[1] = [1.0, 2.0, 0.0, 0.0]
    T = np.ones((3, 4))
    T[2] = 0.0
    loss, dS, _ = pkd.projected_mse_grad(S, T, None, normalize=True)
    ref_loss, ref_dS, _ = reference.normalized_loss(S, T)
    assert np.isfinite(loss) and np.isfinite(dS).all()
    assert loss == pytest.approx(ref_loss, rel=1e-14)
    np.testing.assert_allclose(dS, ref_dS, rtol=1e-14)
    # ‖y‖ ≤ ε: G = (2/n_w)(u − v)/ε with u = 0, v = t/‖t‖
    np.testing.assert_allclose(dS[0], (2 / 3) * (0 - T[0] / 2.0) / 1e-12)


@pytest.mark.parametrize("projected", [True, False])
def test_normalized_loss_of_huge_float64_rows_is_scale_free(projected):
    """‖y‖² overflows float64 above ~1e154, but u = y/‖y‖ and the loss do not depend on scale."""
    S, T, P, mask = _problem(np.float64, projected=projected)
    scale = np.full((S.shape[0], 1), 1e160)
    scale[1] = 1.0  # one row not rescaled: both paths in one call
    big_s, big_t = S * scale, T.copy()
    big_t[2] *= 1e200
    loss, dS, dP = pkd.projected_mse_grad(big_s, big_t, P, mask=mask, normalize=True)
    ref_loss, ref_dS, ref_dP = _reference(S, T, P, mask, True)
    assert loss == pytest.approx(ref_loss, rel=1e-13)
    np.testing.assert_allclose(dS * scale, ref_dS, rtol=1e-12, atol=1e-12 * np.abs(ref_dS).max())
    if projected:  # Sᵀ G: row i of S × scale_i, of G / scale_i
        np.testing.assert_allclose(dP, ref_dP, rtol=1e-12, atol=1e-12 * np.abs(ref_dP).max())
    # A layer mapped twice accumulates its gradient through the same path.
    config = pkd.ProgressiveDistillation([(0, 0), (0, 1)], normalize=True)
    if projected:
        config = config.with_projection(S.shape[1], T.shape[1], seed=0, dtype=np.float64)
    twice = config.loss_and_grad([big_s], [big_t, big_t], attention_mask=mask)
    once = config.loss_and_grad([S], [T, T], attention_mask=mask)
    assert twice.loss == pytest.approx(once.loss, rel=1e-13)
    np.testing.assert_allclose(twice.grad_student[0] * scale, once.grad_student[0], rtol=1e-12,
                               atol=1e-12 * np.abs(once.grad_student[0]).max())


def test_identical_inputs_give_zero_and_zero_gradient():
    S, T, P, _ = _problem(np.float64, projected=False)
    loss, dS, _ = pkd.projected_mse_grad(T, T)
    assert loss == 0.0 and not dS.any()
    assert pkd.projected_mse(T, T, normalize=True) == 0.0


def test_masked_rows_are_never_read():
    S, T, P, mask = _problem(np.float64)
    S2, T2 = S.copy(), T.copy()
    S2[~mask] = np.nan
    T2[~mask] = 1e300
    loss, dS, dP = pkd.projected_mse_grad(S2, T2, P, mask=mask)
    ref = pkd.projected_mse_grad(S, T, P, mask=mask)
    assert loss == ref[0]
    np.testing.assert_array_equal(dS[mask], ref[1][mask])
    assert not dS[~mask].any()
    np.testing.assert_array_equal(dP, ref[2])


def test_non_contiguous_inputs():
    S, T, P, _ = _problem(np.float64, n=20, d_s=9, d_t=9)
    S_view = np.asfortranarray(S)[::1]
    T_strided = np.repeat(T, 2, axis=0)[::2]
    P_t = np.ascontiguousarray(P.T).T
    got = pkd.projected_mse_grad(S_view, T_strided, P_t)
    want = pkd.projected_mse_grad(S, T, P)
    assert got[0] == pytest.approx(want[0], rel=1e-14)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-13)
    np.testing.assert_allclose(got[2], want[2], rtol=1e-13)


def test_dtype_promotion_rule():
    S, T, P, _ = _problem(np.float32)
    _, dS, dP = pkd.projected_mse_grad(S, T.astype(np.float64), P)
    assert dS.dtype == np.float64 and dP.dtype == np.float64
    _, dS, dP = pkd.projected_mse_grad(S, T, P)
    assert dS.dtype == np.float32 and dP.dtype == np.float32


def test_float32_loss_of_200k_rows_is_accurate():
    rng = np.random.default_rng(7)
    S = rng.standard_normal((200_000, 8)).astype(np.float32)
    T = rng.standard_normal((200_000, 8)).astype(np.float32)
    got = pkd.projected_mse(S, T)
    want = reference.projected_mse(S, T)[0]
    assert abs(got - want) / want < 1e-6


def test_calls_are_bit_identical():
    S, T, P, mask = _problem(np.float32, n=400, d_s=16, d_t=32)
    first = pkd.projected_mse_grad(S, T, P, mask=mask, normalize=True)
    second = pkd.projected_mse_grad(S, T, P, mask=mask, normalize=True)
    assert first[0] == second[0]
    np.testing.assert_array_equal(first[1], second[1])
    np.testing.assert_array_equal(first[2], second[2])


@pytest.fixture
def row_blocks(monkeypatch):
    """Force the row-blocked projected pass, 64 rows a block (see pkd.engine.block_rows)."""
    monkeypatch.setattr(pkd.engine, "BLOCK_MAX_STUDENT_BYTES", 1 << 30)
    monkeypatch.setattr(pkd.engine, "BLOCK_MIN_Y_BYTES", 0)
    monkeypatch.setattr(pkd.engine, "BLOCK_BYTES", 1)


def test_block_rows_regime():
    # float32, d_s = 128, 16 MiB of Y: blocks of 2 MiB of G (rows a multiple of 64); wider,
    # float64 or smaller: one block
    assert pkd.engine.block_rows(16384, 128, 256, 4) == 2048
    assert pkd.engine.block_rows(16384, 128, 768, 4) == 640
    assert pkd.engine.block_rows(16384, 312, 768, 4) == 16384
    assert pkd.engine.block_rows(16384, 128, 256, 8) == 16384
    assert pkd.engine.block_rows(4096, 128, 256, 4) == 4096


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_row_blocked_pass_matches_reference(row_blocks, dtype, normalize, masked):
    # 300 rows: four full blocks of 64 and a ragged one
    S, T, P, mask = _problem(dtype, n=300, d_s=5, d_t=7)
    mask = mask if masked else None
    assert pkd.engine.block_rows(300, 5, 7, np.dtype(dtype).itemsize) == 64
    loss, dS, dP = pkd.projected_mse_grad(S, T, P, mask=mask, normalize=normalize)
    ref_loss, ref_dS, ref_dP = _reference(S, T, P, mask, normalize)
    assert loss == pytest.approx(ref_loss, rel=RTOL[dtype])
    np.testing.assert_allclose(dS, ref_dS, rtol=RTOL[dtype],
                               atol=RTOL[dtype] * np.abs(ref_dS).max())
    np.testing.assert_allclose(dP, ref_dP, rtol=RTOL[dtype],
                               atol=RTOL[dtype] * np.abs(ref_dP).max())
    if masked:
        assert not dS[~mask].any()


@pytest.mark.parametrize("masked", [False, True])
def test_row_blocked_pass_keeps_y_block_sized_and_may_skip_the_projection(row_blocks, masked):
    S, T, P, mask = _problem(np.float64, n=300, d_s=5, d_t=7)
    rows = np.flatnonzero(mask) if masked else None
    workspace = pkd.workspace.Workspace()
    grad_s = np.empty_like(S)
    loss = pkd.engine.pair_loss_and_grad(S, T, P, rows, normalize=False, grad_student=grad_s,
                                       workspace=workspace)  # no ∂ℓ/∂P wanted
    ref_loss, ref_dS, _ = _reference(S, T, P, mask if masked else None, False)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    np.testing.assert_allclose(grad_s, ref_dS, rtol=1e-10, atol=1e-14)
    y = workspace._buffers[("y", np.dtype(np.float64))]
    assert y.size == 64 * 7  # one block of Y/G, not N × d_t


@pytest.mark.parametrize("masked", [False, True])
def test_row_blocked_pass_accumulates_a_layer_mapped_twice(row_blocks, masked):
    S, T, P, mask = _problem(np.float64, n=300, d_s=5, d_t=7)
    T2 = T[::-1].copy()
    mask = mask if masked else None
    cfg = pkd.ProgressiveDistillation([(0, 0), (0, 1)], projection=P)
    got = cfg.loss_and_grad([S], [T, T2], attention_mask=mask)
    w = None if mask is None else mask.astype(float)
    parts = [reference.projected_mse(S, t, P, w) for t in (T, T2)]
    assert got.loss == pytest.approx((parts[0][0] + parts[1][0]) / 2, rel=1e-12)
    np.testing.assert_allclose(got.grad_student[0], (parts[0][1] + parts[1][1]) / 2,
                               rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(got.grad_projection, (parts[0][2] + parts[1][2]) / 2,
                               rtol=1e-10, atol=1e-14)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 30),
    d_s=st.integers(1, 6),
    d_t=st.integers(1, 6),
    dtype=st.sampled_from(DTYPES),
    normalize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference(n, d_s, d_t, dtype, normalize, seed):
    rng = np.random.default_rng(seed)
    S = rng.standard_normal((n, d_s)).astype(dtype)
    T = rng.standard_normal((n, d_t)).astype(dtype)
    P = rng.standard_normal((d_s, d_t)).astype(dtype)
    mask = rng.random(n) < 0.6
    mask[rng.integers(n)] = True
    loss, dS, dP = pkd.projected_mse_grad(S, T, P, mask=mask, normalize=normalize)
    ref_loss, ref_dS, ref_dP = _reference(S, T, P, mask, normalize)
    tol = 1e-4 if dtype == np.float32 else 1e-9
    assert loss == pytest.approx(ref_loss, rel=tol, abs=tol)
    np.testing.assert_allclose(dS, ref_dS, rtol=tol, atol=tol * (1 + np.abs(ref_dS).max()))
    np.testing.assert_allclose(dP, ref_dP, rtol=tol, atol=tol * (1 + np.abs(ref_dP).max()))


# --- bad input --------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("student", "teacher", "projection", "error", "match"),
    [
        (np.ones((4, 3)), np.ones((4, 5)), None, ValueError, "pass a projection"),
        (np.ones((4, 3)), np.ones((4, 5)), np.ones((5, 3)), ValueError, r"must be \(3, 5\)"),
        (np.ones((4, 3)), np.ones((5, 3)), None, ValueError, "disagree on rows"),
        (np.ones((2, 2, 3)), np.ones((4, 3)), None, ValueError, "disagree on rows"),
        (np.ones(4), np.ones(4), None, ValueError, "must be 2-D or 3-D"),
        (np.ones((0, 3)), np.ones((0, 3)), None, ValueError, "empty"),
        (np.ones((4, 3), dtype=int), np.ones((4, 3)), None, TypeError, "int64"),
        (np.ones((4, 3), dtype=bool), np.ones((4, 3)), None, TypeError, "bool"),
        (np.array([["a"]]), np.ones((1, 1)), None, TypeError, "float32 or float64"),
        (np.ones((4, 3), dtype=object), np.ones((4, 3)), None, TypeError, "object"),
        ("abc", np.ones((4, 3)), None, TypeError, "str"),
        (np.ones((4, 3), dtype=np.float16), np.ones((4, 3)), None, TypeError, "float16"),
    ],
)
def test_bad_input(student, teacher, projection, error, match):
    with pytest.raises(error, match=match):
        pkd.projected_mse_grad(student, teacher, projection)


@pytest.mark.parametrize("where", ["student", "teacher", "projection"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("normalize", [False, True])
def test_non_finite_input_is_named(where, value, normalize):
    S, T, P, _ = _problem(np.float64)
    {"student": S, "teacher": T, "projection": P}[where][1, 2] = value
    with pytest.raises(ValueError, match=f"{where} contains 1 NaN/Inf"):
        pkd.projected_mse_grad(S, T, P, normalize=normalize)
    loss, _, _ = pkd.projected_mse_grad(S, T, P, normalize=normalize, check_finite=False)
    assert not np.isfinite(loss)


def test_overflow_is_reported():
    S = np.full((2, 2), 3e38, dtype=np.float32)
    with pytest.raises(ValueError, match="overflowed"):
        pkd.projected_mse(S, -S)


@pytest.mark.parametrize(
    ("mask", "match"),
    [
        (np.ones(3), "has shape"),
        (np.zeros(4), "select no row"),
        (np.array([0, 1, 2, 1]), "only 0 and 1"),
        (np.array(["a", "b", "c", "d"]), "0/1 integers or bools"),
    ],
)
def test_bad_mask(mask, match):
    with pytest.raises((ValueError, TypeError), match=match):
        pkd.projected_mse(np.ones((4, 3)), np.zeros((4, 3)), mask=mask)


def test_tokens_selection_for_3d():
    S, T, _, mask = _problem(np.float64, projected=False, three_d=True)
    cls = pkd.projected_mse(S, T, tokens="cls")
    assert cls == pytest.approx(reference.projected_mse(S[:, 0], T[:, 0])[0], rel=1e-14)
    third = pkd.projected_mse(S, T, tokens=3)
    assert third == pytest.approx(reference.projected_mse(S[:, 3], T[:, 3])[0], rel=1e-14)
    with pytest.raises(ValueError, match="out of range"):
        pkd.projected_mse(S, T, tokens=S.shape[1])
    with pytest.raises(ValueError, match="needs 3-D"):
        pkd.projected_mse(S[0], T[0], tokens="cls")
    with pytest.raises(ValueError, match='"all", "cls"'):
        pkd.projected_mse(S, T, tokens="first")
    with pytest.raises(ValueError, match=">= 0"):
        pkd.projected_mse(S, T, tokens=-1)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("projected", [True, False])
@pytest.mark.parametrize("normalize", [False, True])
def test_out_buffers_are_written_and_returned(masked, projected, normalize):
    S, T, P, mask = _problem(np.float32, three_d=True, projected=projected)
    mask = mask if masked else None
    # Stale values: every element must be overwritten, masked rows with exact zeros.
    grad_s = np.full(S.shape, 7.0, dtype=np.float32)
    grad_p = np.full(P.shape, 7.0, dtype=np.float32) if projected else None
    loss, dS, dP = pkd.projected_mse_grad(S, T, P, mask=mask, normalize=normalize,
                                          out=(grad_s, grad_p))
    want = pkd.projected_mse_grad(S, T, P, mask=mask, normalize=normalize)
    assert dS is grad_s and dP is grad_p and loss == want[0]
    np.testing.assert_array_equal(grad_s, want[1])
    if projected:
        np.testing.assert_array_equal(grad_p, want[2])
    ref_loss, ref_dS, _ = _reference(S, T, P, mask, normalize)
    np.testing.assert_allclose(grad_s, ref_dS, rtol=1e-4, atol=1e-7)
    if masked:
        assert not grad_s[~mask].any()


def test_fresh_gradients_are_disjoint_views_of_one_allocation():
    pkd.workspace.clear_workspace()  # no kept block: a new one of the exact size
    S, T, P, _ = _problem(np.float32, three_d=True)
    _, grad_s, grad_p = pkd.projected_mse_grad(S, T, P)
    assert grad_s.base is not None and grad_s.base is grad_p.base
    assert grad_s.base.size == grad_s.size + grad_p.size
    assert not np.shares_memory(grad_s, grad_p)
    _, grad_s, grad_p = pkd.projected_mse_grad(T, T)
    assert grad_p is None and grad_s.shape == T.shape


def test_workspace_hands_out_kept_views_and_forgets_those_of_an_outgrown_buffer():
    workspace = pkd.workspace.Workspace()
    small = workspace.get("y", (4, 3), np.float32)
    assert workspace.get("y", (4, 3), np.dtype(np.float32)).base is small.base
    assert workspace.get("y", (4, 3), np.float32) is small  # the same request: the same view
    other = workspace.get("y", (2, 6), np.float32)
    assert other.shape == (2, 6) and np.shares_memory(other, small)  # one buffer per tag
    assert not np.shares_memory(workspace.get("gather", (4, 3), np.float32), small)
    assert workspace.get("y", (4, 3), np.float64).dtype == np.float64
    large = workspace.get("y", (8, 3), np.float32)  # the buffer grows
    buffer = workspace._buffers[("y", np.dtype(np.float32))]
    assert large.base is buffer and buffer.size == 24
    again = workspace.get("y", (4, 3), np.float32)
    assert again is not small and again.base is buffer  # the old buffer is not pinned
    assert all(view.base is buffer for (tag, _, dtype), view in workspace._views.items()
               if tag == "y" and np.dtype(dtype) == np.float32)
    n_shapes = 2 * pkd.workspace.Workspace.KEPT_VIEWS
    workspace.get("y", (n_shapes, 3), np.float32)
    for n in range(1, n_shapes):  # shapes that vary from call to call, in one buffer
        assert workspace.get("y", (n, 3), np.float32).shape == (n, 3)
    assert len(workspace._views) <= pkd.workspace.Workspace.KEPT_VIEWS
    workspace.clear()
    assert workspace._views == {} and workspace._buffers == {}


def _kept(array):
    """Whether ``array`` is carved from a block the workspace keeps for reuse."""
    kept = pkd.workspace.thread_workspace()._gradient_blocks.get(array.dtype, [])
    return any(array.base is block for block in kept)


def test_gradient_blocks_are_reused_only_once_nothing_references_them():
    pkd.workspace.clear_workspace()
    S, T, P, mask = _problem(np.float32)
    first = pkd.projected_mse_grad(S, T, P)
    kept_values = [first[1].copy(), first[2].copy()]
    # Held results are never handed out again: every call while they live gets new memory.
    second = pkd.projected_mse_grad(2 * S, T, P, mask=mask)
    tail = second[1][3:]  # a view of a view still holds the block
    third = pkd.projected_mse_grad(S, 3 * T, P)
    blocks = [first[1].base, second[1].base, third[1].base]
    assert len({id(b) for b in blocks}) == 3
    assert not any(np.shares_memory(a, b) for a in blocks for b in blocks if a is not b)
    np.testing.assert_array_equal(first[1], kept_values[0])
    np.testing.assert_array_equal(first[2], kept_values[1])
    expected_tail = pkd.projected_mse_grad(2 * S, T, P, mask=mask)[1][3:].copy()
    del second
    fourth = pkd.projected_mse_grad(S, T, 2 * P)
    assert not np.shares_memory(fourth[1], tail)
    np.testing.assert_array_equal(tail, expected_tail)
    # Once dropped, a block is reused, with the results of a new one.
    assert _kept(first[1]) and not _kept(fourth[1])  # two kept, both held: fourth is new
    del first, kept_values, blocks
    again = pkd.projected_mse_grad(S, T, P, mask=mask)
    assert _kept(again[1])
    for got, want in zip(again[1:], reference.projected_mse(S, T, P, mask.astype(float))[1:],
                         strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_large_free_block_is_not_pinned_by_a_small_gradient():
    pkd.workspace.clear_workspace()
    S, T, P, _ = _problem(np.float64, n=400)
    large = pkd.projected_mse_grad(S, T, P)[1]
    large_size = large.base.size
    del large
    small = pkd.projected_mse_grad(S[:8], T[:8], P)[1]  # 1/24 of the free block
    assert small.base.size == small.size + P.size and _kept(small)  # a new one, kept beside
    half = pkd.projected_mse_grad(S[:240], T[:240], P)[1]  # over half of it: reused
    assert half.base.size == large_size and _kept(half)
    pkd.workspace.clear_workspace()
    assert pkd.workspace.thread_workspace()._gradient_blocks == {}


def test_bad_out_buffers():
    S, T, P, _ = _problem(np.float32)
    good_s, good_p = np.empty_like(S), np.empty_like(P)
    with pytest.raises(ValueError, match=r"out\[0\] \(grad_student\).*dtype float32"):
        pkd.projected_mse_grad(S, T, P, out=(good_s.astype(np.float64), good_p))
    with pytest.raises(ValueError, match=r"out\[1\] \(grad_projection\)"):
        pkd.projected_mse_grad(S, T, P, out=(good_s, np.empty((2, 2), dtype=np.float32)))
    with pytest.raises(ValueError, match="C-contiguous"):
        pkd.projected_mse_grad(S, T, P, out=(np.empty(S.shape[::-1], np.float32).T, good_p))
    with pytest.raises(ValueError, match="must be None without a projection"):
        pkd.projected_mse_grad(T, T, out=(np.empty_like(T), good_p))
    with pytest.raises(TypeError, match="pair"):
        pkd.projected_mse_grad(S, T, P, out=good_s)
    with pytest.raises(ValueError, match=r"out\[0\] \(grad_student\) shares memory with student"):
        pkd.projected_mse_grad(S, T, P, out=(S, good_p))
    with pytest.raises(ValueError, match=r"out\[1\] \(grad_projection\) shares memory with "
                                         r"projection"):
        pkd.projected_mse_grad(S, T, P, out=(good_s, P))


def test_non_native_byte_order_is_named():
    S = np.ones((3, 2))
    swapped = S.astype(S.dtype.newbyteorder("S"))
    with pytest.raises(TypeError, match=r"student must be .* \(non-native byte order: "
                                        r"convert it with \.astype\(float64\)\)"):
        pkd.projected_mse(swapped, S)
    assert pkd.projected_mse(swapped.astype(swapped.dtype.newbyteorder("=")), S) == 0.0
