"""ProgressiveDistillation: the reference implementation's behaviours, gradients against
three witnesses, per-pair options, and every bad input."""

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pkd
import reference
from pkd import ProgressiveDistillation

DTYPES = [np.float32, np.float64]
RTOL = {np.float32: 3e-5, np.float64: 1e-10}


def _layers(n_layers, lead, width, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((*lead, width)).astype(dtype) for _ in range(n_layers)]


def _flat(layers):
    return [a.reshape(-1, a.shape[-1]).astype(np.float64) for a in layers]


# --- the reference implementation's own behaviours ---------------------------------------

def test_default_config_is_the_reference_implementations():
    cfg = ProgressiveDistillation()
    assert cfg.layer_mapping == [(0, 2), (1, 5), (2, 8), (3, 11)]
    assert cfg.hidden_weight == 1.0
    assert cfg.projection is None
    assert cfg.layer_mapping == pkd.mapping.uniform(4, 12)


def test_identical_inputs_give_zero_and_different_inputs_positive():
    teacher = _layers(12, (10,), 8)
    student = [teacher[t] for _, t in ProgressiveDistillation().layer_mapping]
    assert ProgressiveDistillation().hidden_state_loss(student, teacher) == 0.0
    other = _layers(4, (10,), 8, seed=1)
    assert ProgressiveDistillation().hidden_state_loss(other, teacher) > 0.0


def test_with_weight_scales_the_loss_exactly():
    student, teacher = _layers(4, (10,), 8), _layers(12, (10,), 8, seed=1)
    base = ProgressiveDistillation().loss_and_grad(student, teacher)
    scaled = ProgressiveDistillation().with_weight(2.5).loss_and_grad(student, teacher)
    assert scaled.loss == 2.5 * base.loss
    np.testing.assert_array_equal(scaled.layer_losses, base.layer_losses)
    np.testing.assert_allclose(scaled.grad_student[0], 2.5 * base.grad_student[0], rtol=1e-15)


def test_builders_return_copies():
    cfg = ProgressiveDistillation()
    assert cfg.with_weight(3.0).hidden_weight == 3.0 and cfg.hidden_weight == 1.0
    assert cfg.with_projection(4, 6, seed=0).projection.shape == (4, 6)
    assert cfg.projection is None


def test_projection_shape_dtype_and_loss_with_projection():
    cfg = ProgressiveDistillation().with_projection(6, 9, seed=3)
    assert cfg.projection.shape == (6, 9) and cfg.projection.dtype == np.float32
    assert cfg.with_projection(6, 9, seed=3, dtype=np.float64).projection.dtype == np.float64
    student, teacher = _layers(4, (7,), 6), _layers(12, (7,), 9, seed=1)
    loss = cfg.hidden_state_loss(student, teacher)
    want = reference.hidden_loss(_flat(student), _flat(teacher), cfg.layer_mapping,
                                 cfg.projection.astype(np.float64))[0]
    assert loss == pytest.approx(want, rel=1e-12)


def test_reference_skipping_is_an_error_or_a_warning():
    student, teacher = _layers(4, (5,), 6), _layers(12, (5,), 8, seed=1)
    cfg = ProgressiveDistillation([(0, 2), (1, 5)])
    with pytest.raises(ValueError, match=r"layer pair \(0, 2\).*width 6 differs.*with_projection"):
        cfg.hidden_state_loss(student, teacher)
    mixed = [np.ones((5, 8)), *student[1:]]
    with pytest.warns(pkd.SkippedPairWarning, match=r"\(1, 5\)"):
        loss = cfg.hidden_state_loss(mixed, teacher, skip_invalid=True)
    assert loss == pytest.approx(reference.projected_mse(mixed[0], teacher[2])[0])
    with pytest.warns(pkd.SkippedPairWarning):
        result = cfg.loss_and_grad(mixed, teacher, skip_invalid=True)
    assert result.skipped == [(1, 5)] and np.isnan(result.layer_losses[1])
    with pytest.warns(pkd.SkippedPairWarning):
        assert cfg.hidden_state_loss(student, teacher, skip_invalid=True) == 0.0


@pytest.mark.parametrize("shared", [True, False])
def test_out_from_a_call_that_skipped_a_pair_can_be_handed_back(shared):
    rng = np.random.default_rng(3)
    cfg = ProgressiveDistillation([(0, 0), (1, 1)]).with_projection(3, 4, seed=0, shared=shared,
                                                                   dtype=np.float64)
    student = [rng.standard_normal((5, 3)) for _ in range(2)]
    teacher = [rng.standard_normal((5, 4)) for _ in range(2)]
    with pytest.warns(pkd.SkippedPairWarning):  # student layer 1 has the wrong width
        skipped = cfg.loss_and_grad([student[0], np.ones((5, 2))], teacher, skip_invalid=True)
    assert skipped.grad_student[1] is None
    kept = skipped.grad_student[0]
    result = cfg.loss_and_grad(student, teacher, out=skipped)
    fresh = cfg.loss_and_grad(student, teacher)
    assert result is skipped and result.grad_student[0] is kept and result.loss == fresh.loss
    for got, want in zip(result.grad_student, fresh.grad_student, strict=True):
        np.testing.assert_array_equal(got, want)


def test_xavier_statistics_and_reproducibility():
    d_s, d_t = 300, 500
    P = pkd.xavier_uniform(d_s, d_t, seed=11, dtype=np.float64)
    bound = np.sqrt(6 / (d_s + d_t))
    assert np.abs(P).max() <= bound
    assert np.abs(P).max() > 0.99 * bound
    assert abs(P.mean()) < 4 * bound / np.sqrt(3 * P.size)
    assert P.var() == pytest.approx(bound**2 / 3, rel=0.02)
    np.testing.assert_array_equal(P, pkd.xavier_uniform(d_s, d_t, seed=11, dtype=np.float64))
    assert not np.array_equal(P, pkd.xavier_uniform(d_s, d_t, seed=12, dtype=np.float64))
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    a = ProgressiveDistillation().with_projection(8, 16, seed=rng_a).projection
    b = ProgressiveDistillation().with_projection(8, 16, seed=rng_b).projection
    np.testing.assert_array_equal(a, b)


# --- gradients: reference, finite differences, torch ------------------------------------

CASES = [
    # (mapping, d_s, d_t, shared, normalize, project)
    ([(0, 1), (1, 3), (2, 5)], 4, 6, True, False, "auto"),
    ([(0, 1), (1, 3), (2, 5)], 4, 6, True, True, "auto"),
    ([(0, 1), (1, 3), (0, 4)], 4, 6, False, False, "auto"),
    ([(0, 1), (2, 3)], 5, 5, True, False, "always"),
    ([(0, 1), (2, 3)], 5, 5, True, True, "auto"),
]


def _case(case, dtype, masked, three_d, seed=0):
    mapping, d_s, d_t, shared, normalize, project = case
    lead = (3, 4) if three_d else (12,)
    student = _layers(3, lead, d_s, dtype, seed)
    teacher = _layers(6, lead, d_t, dtype, seed + 1)
    cfg = ProgressiveDistillation(mapping, hidden_weight=1.7, normalize=normalize,
                                  layer_weights=[1.0, 2.0, 0.5][: len(mapping)],
                                  project=project)
    cfg = cfg.with_projection(d_s, d_t, seed=seed, dtype=dtype, shared=shared)
    rng = np.random.default_rng(seed + 2)
    mask = (rng.random(lead) < 0.6) if masked else None
    if mask is not None:
        mask.flat[0] = True
    return cfg, student, teacher, mask


def _reference_for(cfg, student, teacher, mask):
    projection = cfg.projection
    projection = ({k: v.astype(np.float64) for k, v in projection.items()}
                  if isinstance(projection, dict) else projection.astype(np.float64))
    w = None if mask is None else mask.reshape(-1).astype(float)
    return reference.hidden_loss(_flat(student), _flat(teacher), cfg.layer_mapping, projection,
                                 hidden_weight=cfg.hidden_weight,
                                 layer_weights=cfg.layer_weights, normalize=cfg.normalize,
                                 project=cfg.project, w=w)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("three_d", [False, True])
def test_matches_reference(case, dtype, masked, three_d):
    cfg, student, teacher, mask = _case(case, dtype, masked, three_d)
    result = cfg.loss_and_grad(student, teacher, attention_mask=mask)
    loss, layer_losses, grads_s, grad_p = _reference_for(cfg, student, teacher, mask)
    tol = RTOL[dtype]
    assert result.loss == pytest.approx(loss, rel=tol)
    np.testing.assert_allclose(result.layer_losses, layer_losses, rtol=tol)
    for got, want, layer in zip(result.grad_student, grads_s, student, strict=True):
        if want is None:
            assert got is None
            continue
        assert got.shape == layer.shape and got.dtype == dtype
        np.testing.assert_allclose(got.reshape(-1, got.shape[-1]), want, rtol=tol,
                                   atol=tol * np.abs(want).max())
    if isinstance(grad_p, dict):
        assert set(result.grad_projection) == set(grad_p)
        for pair, want in grad_p.items():
            np.testing.assert_allclose(result.grad_projection[pair], want, rtol=tol,
                                       atol=tol * (np.abs(want).max() + 1e-30))
    else:
        assert result.grad_projection.dtype == dtype
        np.testing.assert_allclose(result.grad_projection, grad_p, rtol=tol,
                                   atol=tol * (np.abs(grad_p).max() + 1e-30))
    assert cfg.hidden_state_loss(student, teacher, attention_mask=mask) == pytest.approx(
        result.loss, rel=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_gradients_match_finite_differences(case):
    cfg, student, teacher, mask = _case(case, np.float64, masked=True, three_d=True)
    result = cfg.loss_and_grad(student, teacher, attention_mask=mask)

    def loss():
        return cfg.hidden_state_loss(student, teacher, attention_mask=mask)

    eps = 1e-6
    rng = np.random.default_rng(0)
    params = [(f"student[{i}]", student[i], result.grad_student[i])
              for i in range(len(student)) if result.grad_student[i] is not None]
    if isinstance(cfg.projection, dict):
        params += [(f"P{k}", cfg.projection[k], result.grad_projection[k]) for k in cfg.projection]
    else:
        params.append(("P", cfg.projection, result.grad_projection))
    for name, array, grad in params:
        for _ in range(6):
            index = tuple(rng.integers(n) for n in array.shape)
            numeric = reference.central_difference(loss, array, index, eps)
            assert grad[index] == pytest.approx(numeric, rel=1e-5, abs=1e-9), name


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_torch_autograd(case, dtype):
    torch = pytest.importorskip("torch")
    functional = torch.nn.functional
    cfg, student, teacher, mask = _case(case, dtype, masked=True, three_d=True)
    result = cfg.loss_and_grad(student, teacher, attention_mask=mask)
    s_t = [torch.tensor(a, requires_grad=True) for a in student]
    t_t = [torch.tensor(a) for a in teacher]
    if isinstance(cfg.projection, dict):
        p_t = {k: torch.tensor(v, requires_grad=True) for k, v in cfg.projection.items()}
    else:
        shared = torch.tensor(cfg.projection, requires_grad=True)
        p_t = {k: shared for k in cfg.layer_mapping}
    w = torch.tensor(mask, dtype=s_t[0].dtype)
    omega = cfg.layer_weights
    total = 0.0
    for k, (s, t) in enumerate(cfg.layer_mapping):
        y = s_t[s]
        if cfg.project == "always" or y.shape[-1] != t_t[t].shape[-1]:
            y = y @ p_t[(s, t)]
        if cfg.normalize:
            diff = functional.normalize(y, dim=-1) - functional.normalize(t_t[t], dim=-1)
            per_row = (diff**2).sum(-1)
        else:
            per_row = ((y - t_t[t]) ** 2).mean(-1)
        total = total + omega[k] * (per_row * w).sum() / w.sum()
    total = cfg.hidden_weight * total / omega.sum()
    total.backward()
    tol = 1e-4 if dtype == np.float32 else 1e-10
    assert result.loss == pytest.approx(total.item(), rel=tol)
    for i, tensor in enumerate(s_t):
        if tensor.grad is None:
            assert result.grad_student[i] is None
            continue
        np.testing.assert_allclose(result.grad_student[i], tensor.grad.numpy(), rtol=tol,
                                   atol=tol * float(tensor.grad.abs().max()))
    if isinstance(cfg.projection, dict):
        for k, tensor in p_t.items():
            np.testing.assert_allclose(result.grad_projection[k], tensor.grad.numpy(), rtol=tol,
                                       atol=tol * float(tensor.grad.abs().max()))
    elif shared.grad is None:  # no pair goes through the projection (d_s == d_t, "auto")
        np.testing.assert_array_equal(result.grad_projection, 0.0)
    else:
        np.testing.assert_allclose(result.grad_projection, shared.grad.numpy(), rtol=tol,
                                   atol=tol * float(shared.grad.abs().max()))


def test_student_layer_mapped_twice_accumulates():
    student, teacher = _layers(2, (9,), 4), _layers(4, (9,), 4, seed=1)
    both = ProgressiveDistillation([(0, 1), (0, 3)]).loss_and_grad(student, teacher)
    one = ProgressiveDistillation([(0, 1)]).loss_and_grad(student, teacher)
    other = ProgressiveDistillation([(0, 3)]).loss_and_grad(student, teacher)
    np.testing.assert_allclose(both.grad_student[0],
                               (one.grad_student[0] + other.grad_student[0]) / 2, rtol=1e-14)
    assert both.grad_student[1] is None


def test_auto_projection_skips_equal_widths_and_always_applies_it():
    student = [np.ones((3, 4)), np.ones((3, 6))]
    teacher = _layers(2, (3,), 6, seed=2)
    cfg = ProgressiveDistillation([(0, 0), (1, 1)]).with_projection(4, 6, seed=0)
    result = cfg.loss_and_grad(student, teacher)  # pair (1, 1): 6 == 6, no projection
    want = reference.projected_mse(student[1], teacher[1])[0]
    assert result.layer_losses[1] == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match=r"\(1, 1\).*must be \(6, 6\)"):
        ProgressiveDistillation([(0, 0), (1, 1)], project="always",
                                projection=cfg.projection).loss_and_grad(student, teacher)


def test_stacked_arrays_equal_lists():
    student, teacher = _layers(4, (2, 3), 5), _layers(12, (2, 3), 5, seed=1)
    cfg = ProgressiveDistillation()
    a = cfg.loss_and_grad(student, teacher)
    b = cfg.loss_and_grad(np.stack(student), np.stack(teacher))
    assert a.loss == b.loss
    np.testing.assert_array_equal(a.grad_student[3], b.grad_student[3])


def test_tokens_cls_uses_position_zero_only():
    student, teacher = _layers(4, (3, 5), 6), _layers(12, (3, 5), 6, seed=1)
    cfg = ProgressiveDistillation(tokens="cls")
    result = cfg.loss_and_grad(student, teacher)
    want = ProgressiveDistillation().loss_and_grad([a[:, :1] for a in student],
                                                  [a[:, :1] for a in teacher])
    assert result.loss == pytest.approx(want.loss, rel=1e-14)
    assert not result.grad_student[0][:, 1:].any()
    np.testing.assert_allclose(result.grad_student[0][:, :1], want.grad_student[0], rtol=1e-14)


def test_tokens_cls_takes_the_first_real_token_under_left_padding():
    # Left padding: sequence b starts at position first[b]; sequence 3 is all padding.
    student, teacher = _layers(4, (4, 5), 6), _layers(12, (4, 5), 6, seed=1)
    first = np.array([0, 2, 4, 5])
    mask = np.arange(5)[None, :] >= first[:, None]
    cfg = ProgressiveDistillation(tokens="cls")
    result = cfg.loss_and_grad(student, teacher, attention_mask=mask.astype(np.int64))
    rows = np.arange(3)  # the sequences with a real token
    want = ProgressiveDistillation().loss_and_grad(
        [a[rows, first[rows]] for a in student], [a[rows, first[rows]] for a in teacher])
    assert result.loss == pytest.approx(want.loss, rel=1e-14)
    expected = np.zeros_like(student[0])
    expected[rows, first[rows]] = want.grad_student[0]
    np.testing.assert_allclose(result.grad_student[0], expected, rtol=1e-14, atol=0)
    # Without a mask, "cls" is position 0, even where that is padding.
    plain = cfg.loss_and_grad(student, teacher)
    at_zero = ProgressiveDistillation().loss_and_grad([a[:, 0] for a in student],
                                                      [a[:, 0] for a in teacher])
    assert plain.loss == pytest.approx(at_zero.loss, rel=1e-14)


@pytest.mark.parametrize("index", [2, 4])
def test_tokens_int_uses_that_position_only(index):
    student, teacher = _layers(4, (3, 5), 6), _layers(12, (3, 5), 6, seed=1)
    with pytest.raises(ValueError, match="negative indices do not wrap"):
        ProgressiveDistillation(tokens=-1)
    result = ProgressiveDistillation(tokens=index).loss_and_grad(student, teacher)
    want = ProgressiveDistillation().loss_and_grad([a[:, index] for a in student],
                                                  [a[:, index] for a in teacher])
    assert result.loss == pytest.approx(want.loss, rel=1e-14)
    others = np.delete(result.grad_student[0], index, axis=1)
    assert not others.any()
    np.testing.assert_allclose(result.grad_student[0][:, index], want.grad_student[0],
                               rtol=1e-14)


def test_padding_contributes_nothing():
    student, teacher = _layers(4, (2, 5), 6), _layers(12, (2, 5), 6, seed=1)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    cfg = ProgressiveDistillation()
    result = cfg.loss_and_grad(student, teacher, attention_mask=mask)
    for layer in student:
        layer[0, 3:] = 1e6
    again = cfg.loss_and_grad(student, teacher, attention_mask=mask)
    assert again.loss == result.loss
    assert not again.grad_student[0][0, 3:].any()


def test_per_pair_projections_each_get_their_own_gradient():
    cfg = ProgressiveDistillation([(0, 1), (1, 2)]).with_projection(3, 5, seed=0, shared=False)
    assert set(cfg.projection) == {(0, 1), (1, 2)}
    assert not np.array_equal(cfg.projection[(0, 1)], cfg.projection[(1, 2)])
    student, teacher = _layers(2, (8,), 3), _layers(3, (8,), 5, seed=1)
    result = cfg.loss_and_grad(student, teacher)
    assert set(result.grad_projection) == {(0, 1), (1, 2)}
    only_first = ProgressiveDistillation([(0, 1)], projection=cfg.projection[(0, 1)])
    np.testing.assert_allclose(result.grad_projection[(0, 1)],
                               only_first.loss_and_grad(student, teacher).grad_projection / 2,
                               rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    n_s=st.integers(1, 3), n_t=st.integers(1, 4), n=st.integers(1, 9),
    d_s=st.integers(1, 4), d_t=st.integers(1, 4), dtype=st.sampled_from(DTYPES),
    normalize=st.booleans(), shared=st.booleans(), seed=st.integers(0, 1000),
)
def test_property_matches_reference(n_s, n_t, n, d_s, d_t, dtype, normalize, shared, seed):
    rng = np.random.default_rng(seed)
    mapping = sorted({(int(rng.integers(n_s)), int(rng.integers(n_t))) for _ in range(3)})
    student = _layers(n_s, (n,), d_s, dtype, seed)
    teacher = _layers(n_t, (n,), d_t, dtype, seed + 1)
    mask = rng.random(n) < 0.7
    mask[0] = True
    cfg = ProgressiveDistillation(mapping, normalize=normalize, project="always")
    cfg = cfg.with_projection(d_s, d_t, seed=seed, dtype=dtype, shared=shared)
    result = cfg.loss_and_grad(student, teacher, attention_mask=mask)
    loss, _, grads_s, _ = _reference_for(cfg, student, teacher, mask)
    tol = 1e-4 if dtype == np.float32 else 1e-9
    assert result.loss == pytest.approx(loss, rel=tol, abs=tol)
    for got, want in zip(result.grad_student, grads_s, strict=True):
        if want is not None:
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol * (1 + np.abs(want).max()))


# --- bad input --------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"layer_mapping": [(0, -1)]}, ValueError, "negative indices do not wrap"),
        ({"layer_mapping": [(0, 1, 2)]}, ValueError, "exactly 2 entries"),
        ({"layer_mapping": [5]}, TypeError, "must be a .student_layer, teacher_layer. pair"),
        ({"layer_mapping": [(0.5, 1)]}, TypeError, "must be an int"),
        ({"layer_mapping": [(True, 1)]}, TypeError, "must be an int"),
        ({"layer_mapping": []}, ValueError, "empty"),
        ({"layer_mapping": "0:1"}, TypeError, "sequence of"),
        ({"hidden_weight": float("nan")}, ValueError, "finite and >= 0"),
        ({"hidden_weight": -1.0}, ValueError, "finite and >= 0"),
        ({"layer_weights": [1.0]}, ValueError, "has 1 entries but the mapping has 4"),
        ({"layer_weights": [0, 0, 0, 0]}, ValueError, "all zero"),
        ({"layer_weights": [1, -1, 1, 1]}, ValueError, "finite and >= 0"),
        ({"layer_weights": [1e308] * 4}, ValueError, "sum to more than float64 holds"),
        ({"project": "sometimes"}, ValueError, "auto"),
        ({"tokens": "first"}, ValueError, "tokens"),
        ({"normalize": "yes"}, TypeError, "normalize must be True or False"),
    ],
)
def test_bad_configuration(kwargs, error, match):
    with pytest.raises(error, match=match):
        ProgressiveDistillation(**kwargs)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda c: c.with_weight(float("inf")), ValueError, "finite"),
        (lambda c: c.with_weight(-0.5), ValueError, ">= 0"),
        (lambda c: c.with_projection(0, 4), ValueError, "student_dim must be > 0"),
        (lambda c: c.with_projection(4, -2), ValueError, "teacher_dim must be > 0"),
        (lambda c: c.with_projection(4, 2.5), TypeError, "teacher_dim"),
        (lambda c: c.with_projection(4, 4, seed="x"), TypeError, "seed"),
        (lambda c: c.with_projection(4, 4, dtype=np.int32), TypeError, "dtype"),
    ],
)
def test_bad_builder_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call(ProgressiveDistillation())


def test_bad_hidden_states():
    cfg = ProgressiveDistillation([(0, 1)])
    good_s, good_t = _layers(1, (4,), 3), _layers(2, (4,), 3)
    with pytest.raises(ValueError, match=r"\(0, 1\) asks for layer 1 of teacher_hidden, which has"):
        cfg.loss_and_grad(good_s, good_t[:1])
    with pytest.raises(ValueError,
                       match=r"student_hidden\[0\] and teacher_hidden\[1\] for layer pair "
                             r"\(0, 1\)"):
        cfg.loss_and_grad(good_s, [good_t[0], np.ones((5, 3))])
    with pytest.raises(TypeError, match=r"student_hidden\[0\] for layer pair \(0, 1\).*int64"):
        cfg.loss_and_grad([np.ones((4, 3), dtype=int)], good_t)
    with pytest.raises(ValueError, match="empty sequence"):
        cfg.loss_and_grad([], good_t)
    with pytest.raises(ValueError, match="stacked array"):
        cfg.loss_and_grad(np.ones((4, 3)), good_t)
    bad = [good_t[0], good_t[1].copy()]
    bad[1][2, 1] = np.inf
    with pytest.raises(ValueError, match=r"teacher_hidden\[1\] for layer pair \(0, 1\) contains"):
        cfg.loss_and_grad(good_s, bad)
    with pytest.raises(ValueError, match="has shape"):
        cfg.loss_and_grad(good_s, good_t, attention_mask=np.ones(3))
    wrong = ProgressiveDistillation([(0, 1)], projection=np.ones((2, 3)), project="always")
    with pytest.raises(ValueError, match=r"projection for layer pair \(0, 1\) has shape \(2, 3\)"):
        wrong.loss_and_grad(good_s, good_t)


def test_per_pair_projection_needs_unique_pairs():
    with pytest.raises(ValueError, match="repeats a pair"):
        ProgressiveDistillation([(0, 1), (0, 1)]).with_projection(2, 3, shared=False)
    with pytest.raises(ValueError, match="missing"):
        ProgressiveDistillation([(0, 1)], projection={(0, 2): np.ones((2, 3))})


def test_no_warning_without_skipping():
    student, teacher = _layers(4, (5,), 6), _layers(12, (5,), 6, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ProgressiveDistillation().loss_and_grad(student, teacher, skip_invalid=True)


# --- out=: a training loop's gradients reused ---------------------------------------------

def _stale_like(result):
    """A copy of ``result`` whose gradient arrays are new and hold garbage (7.0)."""
    def stale(array):
        return None if array is None else np.full_like(array, 7.0)

    grad_p = result.grad_projection
    grad_p = ({pair: stale(g) for pair, g in grad_p.items()} if isinstance(grad_p, dict)
              else stale(grad_p))
    return pkd.HiddenLossResult(loss=np.nan, layer_losses=np.zeros(0), pairs=[],
                                grad_student=[stale(g) for g in result.grad_student],
                                grad_projection=grad_p)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True])
def test_out_overwrites_every_gradient_and_is_returned(case, dtype, masked):
    cfg, student, teacher, mask = _case(case, dtype, masked, three_d=True)
    fresh = cfg.loss_and_grad(student, teacher, attention_mask=mask)
    out = _stale_like(fresh)
    arrays_s = list(out.grad_student)
    arrays_p = out.grad_projection
    result = cfg.loss_and_grad(student, teacher, attention_mask=mask, out=out)
    assert result is out
    assert result.loss == fresh.loss and result.pairs == fresh.pairs
    np.testing.assert_array_equal(result.layer_losses, fresh.layer_losses)
    for got, array, want in zip(result.grad_student, arrays_s, fresh.grad_student, strict=True):
        if want is None:
            assert got is None
            continue
        assert got is array  # written in place, in the layer's own shape
        np.testing.assert_array_equal(got, want)
        if mask is not None:
            assert not got[~mask].any()  # stale values on padding were overwritten with 0
    if isinstance(fresh.grad_projection, dict):
        for pair, want in fresh.grad_projection.items():
            assert result.grad_projection[pair] is arrays_p[pair]
            np.testing.assert_array_equal(result.grad_projection[pair], want)
    else:
        assert result.grad_projection is arrays_p
        np.testing.assert_array_equal(result.grad_projection, fresh.grad_projection)
    # An independent witness too, not only agreement with the fresh path.
    loss, _, grads_s, _ = _reference_for(cfg, student, teacher, mask)
    assert result.loss == pytest.approx(loss, rel=RTOL[dtype])
    for got, want in zip(result.grad_student, grads_s, strict=True):
        if want is not None:
            np.testing.assert_allclose(got.reshape(want.shape), want, rtol=RTOL[dtype],
                                       atol=RTOL[dtype] * np.abs(want).max())


@pytest.mark.parametrize("case", CASES)
def test_fresh_gradients_are_disjoint_views_of_one_allocation(case):
    pkd.workspace.clear_workspace()  # no kept block: a new one of the exact size
    cfg, student, teacher, _ = _case(case, np.float32, masked=False, three_d=True)
    result = cfg.loss_and_grad(student, teacher)
    grads = [g for g in result.grad_student if g is not None]
    grad_p = result.grad_projection
    grads += list(grad_p.values()) if isinstance(grad_p, dict) else [grad_p]
    base = grads[0].base
    assert base is not None and all(g.base is base for g in grads)
    assert base.size == sum(g.size for g in grads)  # nothing else in the block
    for i, g in enumerate(grads):
        assert g.flags.c_contiguous and g.flags.writeable
        assert not any(np.shares_memory(g, h) for h in grads[i + 1:])


def test_out_zeroes_projection_gradients_no_pair_uses():
    # "auto" with equal widths: the projection exists but no pair goes through it.
    student, teacher = _layers(2, (6,), 4), _layers(2, (6,), 4, seed=1)
    cfg = ProgressiveDistillation([(0, 0), (1, 1)]).with_projection(4, 4, seed=0)
    fresh = cfg.loss_and_grad(student, teacher)
    assert not fresh.grad_projection.any()
    result = cfg.loss_and_grad(student, teacher, out=_stale_like(fresh))
    assert not result.grad_projection.any()
    per_pair = ProgressiveDistillation([(0, 0), (1, 1)]).with_projection(4, 4, seed=0,
                                                                         shared=False)
    result = per_pair.loss_and_grad(student, teacher,
                                    out=_stale_like(per_pair.loss_and_grad(student, teacher)))
    assert not any(g.any() for g in result.grad_projection.values())


def test_out_in_a_loop_equals_fresh_calls():
    cfg = ProgressiveDistillation([(0, 1), (1, 2), (0, 2)]).with_projection(3, 5, seed=0)
    out = None
    for step in range(3):
        student, teacher = _layers(2, (7,), 3, seed=step), _layers(3, (7,), 5, seed=10 + step)
        fresh = cfg.loss_and_grad(student, teacher)
        out = cfg.loss_and_grad(student, teacher, out=out)
        assert out.loss == fresh.loss
        for got, want in zip(out.grad_student, fresh.grad_student, strict=True):
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(out.grad_projection, fresh.grad_projection)


def test_results_held_in_a_loop_keep_their_values():
    # The loop holds the previous result while the next call runs, and keeps some.
    cfg = ProgressiveDistillation([(0, 1), (1, 2), (0, 2)]).with_projection(3, 5, seed=0)
    kept, result = [], None
    for step in range(6):
        student, teacher = _layers(2, (7,), 3, seed=step), _layers(3, (7,), 5, seed=10 + step)
        result = cfg.loss_and_grad(student, teacher)
        copies = ([g.copy() for g in result.grad_student if g is not None],
                  result.grad_projection.copy())
        if step % 2 == 0:
            kept.append((result, copies))
    for held, (students, projection) in kept:
        for got, want in zip([g for g in held.grad_student if g is not None], students,
                             strict=True):
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(held.grad_projection, projection)
    blocks = [held.grad_projection.base for held, _ in kept] + [result.grad_projection.base]
    assert len({id(b) for b in blocks}) == len(blocks)


def test_bad_out():
    cfg = ProgressiveDistillation([(0, 1), (1, 2)]).with_projection(3, 5, seed=0,
                                                                    dtype=np.float64)
    student, teacher = _layers(2, (2, 4), 3), _layers(3, (2, 4), 5, seed=1)
    good = cfg.loss_and_grad(student, teacher)

    def with_(**changes):
        out = _stale_like(good)
        for name, value in changes.items():
            setattr(out, name, value)
        return out

    s0, s1 = good.grad_student[0], good.grad_student[1]
    with pytest.raises(TypeError, match="out must be a HiddenLossResult.*got tuple"):
        cfg.loss_and_grad(student, teacher, out=(s0, s1))
    with pytest.raises(ValueError, match=r"one entry per student layer \(2\), got 1:"):
        cfg.loss_and_grad(student, teacher, out=with_(grad_student=[s0]))
    with pytest.raises(ValueError, match=r"out.grad_student\[1\] for layer pair \(1, 2\) must "
                                         r"be .* shape \(2, 4, 3\) and dtype float64; got "
                                         r"shape \(8, 3\)"):
        cfg.loss_and_grad(student, teacher, out=with_(grad_student=[s0, s1.reshape(8, 3)]))
    with pytest.raises(ValueError, match=r"out.grad_student\[0\].*dtype float64; got .*float32"):
        cfg.loss_and_grad(student, teacher,
                          out=with_(grad_student=[s0.astype(np.float32), s1]))
    with pytest.raises(ValueError, match=r"out.grad_student\[0\].*got str"):
        cfg.loss_and_grad(student, teacher, out=with_(grad_student=["s0", s1]))
    # None (a layer the earlier call did not use): a fresh array.
    assert cfg.loss_and_grad(student, teacher,
                             out=with_(grad_student=[None, s1])).grad_student[0] is not None
    with pytest.raises(ValueError, match="writable"):
        frozen = s0.copy()
        frozen.flags.writeable = False
        cfg.loss_and_grad(student, teacher, out=with_(grad_student=[frozen, s1]))
    with pytest.raises(ValueError, match=r"out.grad_projection must be .* shape \(3, 5\)"):
        cfg.loss_and_grad(student, teacher, out=with_(grad_projection=None))
    per_pair = cfg.with_projection(3, 5, seed=0, dtype=np.float64, shared=False)
    with pytest.raises(ValueError, match=r"must be a dict \{pair: array\}"):
        per_pair.loss_and_grad(student, teacher, out=good)
    with pytest.raises(ValueError, match=r"out.grad_projection\[\(1, 2\)\] for layer pair"):
        per_pair.loss_and_grad(student, teacher,
                               out=with_(grad_projection={(0, 1): good.grad_projection}))
    # Overlaps would silently corrupt the gradients (or the inputs): refused.
    with pytest.raises(ValueError, match=r"out.grad_student\[0\] shares memory with "
                                         r"student_hidden\[0\]"):
        cfg.loss_and_grad(student, teacher, out=with_(grad_student=[student[0], s1]))
    with pytest.raises(ValueError, match=r"out.grad_student\[0\] shares memory with "
                                         r"out.grad_student\[1\]"):
        same = s0.copy()
        cfg.loss_and_grad(student, teacher, out=with_(grad_student=[same, same]))
    with pytest.raises(ValueError, match="out.grad_projection shares memory with projection"):
        cfg.loss_and_grad(student, teacher, out=with_(grad_projection=cfg.projection))


def test_flags_must_be_true_or_false():
    """A truthy string such as "False" would silently mean True; a dict key, a KeyError."""
    rng = np.random.default_rng(0)
    S, T = rng.standard_normal((6, 3)), rng.standard_normal((6, 3))
    config = pkd.ProgressiveDistillation([(0, 0)])
    calls = [
        ("normalize", lambda v: pkd.projected_mse(S, T, normalize=v)),
        ("check_finite", lambda v: pkd.projected_mse_grad(S, T, check_finite=v)),
        ("normalize", lambda v: pkd.ProgressiveDistillation([(0, 0)], normalize=v)),
        ("skip_invalid", lambda v: config.loss_and_grad([S], [T], skip_invalid=v)),
        ("check_finite", lambda v: config.hidden_state_loss([S], [T], check_finite=v)),
        ("check_finite", lambda v: pkd.AlignmentStats.from_arrays([S], [T], check_finite=v)),
        ("progress", lambda v: pkd.AlignmentStats.from_arrays([S], [T], progress=v)),
        ("check_finite", lambda v: pkd.AlignmentStats.from_chunks([([S], [T])],
                                                                  check_finite=v)),
    ]
    for name, call in calls:
        for value in ("False", 1, np.array(True), None):
            with pytest.raises(TypeError, match=f"{name} must be True or False, got"):
                call(value)
        call(np.bool_(False))  # NumPy bools are bools


def test_engine_result_fields_are_those_of_hidden_loss_result():
    # ProgressiveDistillation builds its HiddenLossResult from the engine's HiddenPass by
    # position: the two must list the same fields in the same order.
    import dataclasses

    from pkd.engine import HiddenPass

    assert HiddenPass._fields == tuple(f.name for f in dataclasses.fields(pkd.HiddenLossResult))
