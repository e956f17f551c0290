from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reference
from pkd.spectrum import Spectrum, spectrum, xavier_mp_edges


@settings(max_examples=30, deadline=None)
@given(
    d_s=st.integers(1, 12),
    d_t=st.integers(1, 12),
    seed=st.integers(0, 2**32 - 1),
    scale=st.sampled_from([1e-3, 1.0, 1e4]),
)
def test_against_reference(d_s, d_t, seed, scale):
    P = np.random.default_rng(seed).standard_normal((d_s, d_t)) * scale
    spec = spectrum(P)
    expected_sv = np.linalg.svd(P, compute_uv=False)
    np.testing.assert_allclose(spec.singular_values, expected_sv, rtol=1e-10, atol=0)
    assert spec.effective_rank == pytest.approx(reference.effective_rank(P), rel=1e-10)
    assert spec.stable_rank == pytest.approx(reference.stable_rank(P), rel=1e-10)
    assert spec.condition == pytest.approx(np.linalg.cond(P), rel=1e-8)
    assert spec.mp_edges == pytest.approx(reference.mp_edges(d_s, d_t), rel=1e-14)
    assert spec.shape == (d_s, d_t)
    k = min(d_s, d_t)
    assert 1 - 1e-12 <= spec.effective_rank <= k + 1e-9
    assert 1 - 1e-12 <= spec.stable_rank <= k + 1e-9
    # Invariances: transpose and positive scaling change none of the ratios.
    other = spectrum(3.5 * P.T)
    assert other.effective_rank == pytest.approx(spec.effective_rank, rel=1e-10)
    assert other.stable_rank == pytest.approx(spec.stable_rank, rel=1e-10)
    assert other.condition == pytest.approx(spec.condition, rel=1e-8)
    assert other.mp_edges == pytest.approx(spec.mp_edges, rel=1e-14)


def test_singular_values_descending_float64_readonly():
    P = np.random.default_rng(0).standard_normal((7, 4)).astype(np.float32)
    spec = spectrum(P)
    sv = spec.singular_values
    assert sv.dtype == np.float64 and sv.shape == (4,)
    assert np.all(np.diff(sv) <= 0)
    np.testing.assert_allclose(
        sv, np.linalg.svd(P.astype(np.float64), compute_uv=False), rtol=1e-12
    )
    with pytest.raises(ValueError, match="read-only"):
        sv[0] = 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.condition = 1.0


@pytest.mark.parametrize("n", [1, 3, 16])
def test_identity(n):
    spec = spectrum(np.eye(n))
    np.testing.assert_array_equal(spec.singular_values, np.ones(n))
    assert spec.effective_rank == pytest.approx(n, rel=1e-14)
    assert spec.stable_rank == pytest.approx(n, rel=1e-14)
    assert spec.condition == pytest.approx(1.0, rel=1e-14)


def test_rank_one():
    u = np.array([1.0, 2.0, 2.0])  # norm 3
    v = np.array([3.0, 0.0, 4.0, 0.0, 0.0])  # norm 5
    spec = spectrum(np.outer(u, v))
    assert spec.singular_values[0] == pytest.approx(15.0, rel=1e-14)
    np.testing.assert_allclose(spec.singular_values[1:], 0.0, atol=1e-13)
    assert spec.effective_rank == pytest.approx(1.0, abs=1e-12)
    assert spec.stable_rank == pytest.approx(1.0, rel=1e-14)
    assert spec.condition > 1e12  # sigma_min is rounding noise or exactly 0


def test_exactly_singular_condition_is_inf():
    P = np.diag([2.0, 1.0, 0.0])
    spec = spectrum(P)
    assert spec.condition == math.inf
    # p = (2/3, 1/3, 0): exp(H) with the zero contributing nothing.
    h = -(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3)
    assert spec.effective_rank == pytest.approx(math.exp(h), rel=1e-14)
    assert spec.stable_rank == pytest.approx(5 / 4, rel=1e-14)


def test_zero_matrix():
    spec = spectrum(np.zeros((3, 5)))
    assert spec.effective_rank == 0.0
    assert spec.stable_rank == 0.0
    assert spec.condition == math.inf


def test_xavier_mp_edges_formula():
    lo, hi = xavier_mp_edges(768, 384)
    s = math.sqrt(2 / (768 + 384))
    assert lo == pytest.approx(s * (math.sqrt(768) - math.sqrt(384)), rel=1e-15)
    assert hi == pytest.approx(s * (math.sqrt(768) + math.sqrt(384)), rel=1e-15)
    assert xavier_mp_edges(384, 768) == (lo, hi)  # symmetric
    assert xavier_mp_edges(5, 5)[0] == 0.0  # square: the bulk reaches zero
    assert xavier_mp_edges(5, 5)[1] == pytest.approx(2.0, rel=1e-15)


@pytest.mark.parametrize(("d_s", "d_t"), [(400, 800), (800, 400)])
def test_xavier_init_fills_mp_bulk(d_s, d_t):
    rng = np.random.default_rng(12345)
    a = math.sqrt(6 / (d_s + d_t))
    P = rng.uniform(-a, a, size=(d_s, d_t))
    spec = spectrum(P)
    lo, hi = spec.mp_edges
    # ~(0.338, 1.971): finite-size fluctuations at the edges are well under 3%.
    assert spec.singular_values[0] == pytest.approx(hi, rel=0.03)
    assert spec.singular_values[-1] == pytest.approx(lo, rel=0.03)
    assert spec.n_above_bulk <= 3


def test_summary_and_repr():
    spec = spectrum(np.diag([4.0, 2.0]))
    text = spec.summary()
    assert "2x2" in text and "condition 2" in text and "stable rank 1.25" in text
    assert "effective rank" in text and "MP bulk" in text
    assert repr(spec) == f"Spectrum({text})"
    assert isinstance(spec, Spectrum)


def test_n_above_bulk():
    # 2x2 Xavier bulk upper edge is 2 (s = sqrt(1/2), 2·s·sqrt(2) = 2).
    assert spectrum(np.diag([3.0, 1.0])).n_above_bulk == 1
    assert spectrum(np.diag([3.0, 2.5])).n_above_bulk == 2
    assert spectrum(np.diag([1.0, 0.5])).n_above_bulk == 0


@pytest.mark.parametrize(
    ("P", "error", "match"),
    [
        (np.ones(4), ValueError, "2-D"),
        (np.ones((2, 3, 4)), ValueError, "2-D"),
        (np.ones((0, 3)), ValueError, "empty"),
        (np.ones((3, 3), dtype=np.int64), TypeError, "float32 or float64"),
        (np.ones((3, 3), dtype=bool), TypeError, "float32 or float64"),
        (np.ones((3, 3), dtype=np.complex128), TypeError, "float32 or float64"),
        (np.array([[1.0, np.nan], [0.0, 1.0]]), ValueError, "NaN/Inf.*has no spectrum"),
        (np.array([[1.0, np.inf], [0.0, 1.0]]), ValueError, "NaN/Inf"),
        ("P", TypeError, "float array"),
        (None, TypeError, "float array"),
    ],
)
def test_bad_input(P, error, match):
    with pytest.raises(error, match=match):
        spectrum(P)


def test_torch_tensor_refused():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="torch tensor"):
        spectrum(torch.eye(3))


@pytest.mark.parametrize(
    ("d_s", "d_t", "error", "match"),
    [
        (0, 4, ValueError, "d_s"),
        (4, -1, ValueError, "d_t"),
        (4.0, 4, TypeError, "d_s"),
        (4, True, TypeError, "d_t"),
    ],
)
def test_xavier_mp_edges_bad_input(d_s, d_t, error, match):
    with pytest.raises(error, match=match):
        xavier_mp_edges(d_s, d_t)


@pytest.mark.parametrize("scale", [1e-200, 1e-30, 1.0, 1e160, 1e300])
def test_stable_rank_does_not_overflow_or_underflow(scale):
    P = np.random.default_rng(5).standard_normal((5, 3))
    sv = np.linalg.svd(P, compute_uv=False)
    result = spectrum(P * scale)
    assert result.stable_rank == pytest.approx(float(np.sum(sv**2) / sv[0] ** 2), rel=1e-12)
    assert result.effective_rank == pytest.approx(spectrum(P).effective_rank, rel=1e-12)
