"""analysis/layer_matching.py: the scoring rule, the identity case, and a tiny end-to-end run.

The end-to-end run trains 2 copies of a 3-block net for one epoch and scores
every measure on them; it checks the files written and that every accuracy
is a share in [0, 1] recomputed from its per-layer values.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "analysis"))

import layer_matching as lm  # noqa: E402

TINY = {"n_copies": 2, "n_blocks": 3, "width": 8, "epochs": 1, "few_rows": 10,
        "bandwidths": (0.5,)}


def test_credit_counts_the_own_layer_and_splits_ties():
    cost = np.array([[0.1, 0.5, 0.7],
                     [0.3, 0.2, 0.2],    # own layer 1 ties with layer 2: half a point
                     [0.0, 0.4, 0.6]])   # layer 0 wins: no point
    scores, chosen = lm.credit(cost, maximize=False)
    np.testing.assert_array_equal(scores, [1.0, 0.5, 0.0])
    np.testing.assert_array_equal(chosen, [[1, 0, 0], [0, 0.5, 0.5], [1, 0, 0]])
    # The same matrix read as a similarity picks the largest value.
    scores, _ = lm.credit(cost, maximize=True)
    np.testing.assert_array_equal(scores, [0.0, 0.0, 1.0])


def test_credit_never_picks_nan_and_gives_nothing_for_an_all_nan_row():
    similarity = np.array([[np.nan, 0.2], [np.nan, np.nan]])
    scores, chosen = lm.credit(similarity, maximize=True)
    np.testing.assert_array_equal(scores, [0.0, 0.0])
    np.testing.assert_array_equal(chosen, [[0.0, 1.0], [0.0, 0.0]])


def test_everything_tied_scores_chance():
    scores, _ = lm.credit(np.zeros((4, 4)), maximize=False)
    np.testing.assert_allclose(scores, 0.25)


@pytest.fixture(scope="module", autouse=True)
def _restore_torch_globals():
    """Undo what ``train_copies`` sets for its own run: torch's thread count (the
    OpenMP limit, which pkd's parallel rule reads) and deterministic algorithms."""
    torch = pytest.importorskip("torch")
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


@pytest.fixture(scope="module")
def tiny_copies():
    """Block outputs (2, 3, 200, 8) float32 of two copies trained for one epoch.

    The first 200 held-out rows: the measures' kernels stay small and quick.
    """
    settings = lm.Settings.quick_run(**TINY)
    hidden = lm.train_copies(settings, cache=None, log=lambda _: None)["hidden"]
    return np.ascontiguousarray(hidden[:, :, :200]), settings


def test_a_copy_against_itself_is_matched_by_every_cka(tiny_copies):
    hidden, settings = tiny_copies
    assert hidden.dtype == np.float32 and hidden.shape[:2] == (2, 3)
    tensors = lm.similarity_tensors(hidden, settings, log=lambda _: None)
    for key in ("cka", "cka-debiased", "rbf-cka-0.5"):
        for i in range(2):
            itself = tensors[key][i, :, i, :]
            np.testing.assert_allclose(np.diag(itself), 1.0, rtol=1e-9, err_msg=key)
            assert lm.credit(itself, maximize=True)[0].tolist() == [1.0, 1.0, 1.0], key
        # Symmetric measures: copy 0 against copy 1 is the transpose of 1 against 0.
        np.testing.assert_allclose(tensors[key][0, :, 1, :], tensors[key][1, :, 0, :].T,
                                   rtol=1e-9, atol=1e-12)
    # The teacher side is the student side read the other way round.
    np.testing.assert_array_equal(tensors["relative-target"][0, :, 1, :],
                                  tensors["relative"][1, :, 0, :].T)
    # In-sample 1 − R² of a layer from itself is 0 (to float32 rounding of the data).
    assert np.all(np.diag(tensors["relative"][0, :, 0, :]) < 1e-6)


def test_tiny_run_writes_its_files_and_shares(tmp_path, monkeypatch):
    settings = lm.Settings.quick_run(**TINY)
    monkeypatch.setattr(lm.Settings, "quick_run", classmethod(lambda cls, **c: settings))
    out = tmp_path / "layer_matching"
    result = lm.main(["--quick", "--no-cache", "--out", str(out)])
    for name in ("layer_matching.json", "layer_matching.md", "layer_matching.png",
                 "choices.png"):
        assert (out / name).is_file(), name
    def strict(constant):
        raise AssertionError(f"{constant} in layer_matching.json: not strict JSON")

    stored = json.loads((out / "layer_matching.json").read_text(), parse_constant=strict)
    assert stored["settings"]["quick"] is True
    assert set(stored["results"]) == {"all_rows", "few_rows"}
    assert stored["results"]["few_rows"]["n_rows"] == 10
    for setting in stored["results"].values():
        assert setting["pairs"] == [[0, 1], [1, 0]]
        assert list(setting["measures"]) == list(lm.measures(settings))
        for key, row in setting["measures"].items():
            assert 0.0 <= row["accuracy"] <= 1.0, key
            assert len(row["per_layer"]) == 3
            assert all(0.0 <= v <= 1.0 for v in row["per_layer"])
            assert row["accuracy"] == pytest.approx(np.mean(row["per_layer"]), abs=1e-12)
            # Every query spreads one unit of choice over the candidates.
            assert row["undefined_queries"] == 0, key
            np.testing.assert_allclose(np.sum(row["chosen"], axis=1), 1.0, rtol=1e-12)
        for key in ("cka", "cka-debiased", "rbf-cka-0.5"):
            assert setting["measures"][key]["identity"] == 1.0, key
    assert stored == json.loads(json.dumps(result))
    assert "| linear CKA (`cka`) |" in (out / "layer_matching.md").read_text()


def _plain_linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    x = x.astype(np.float64) - x.mean(axis=0)
    y = y.astype(np.float64) - y.mean(axis=0)
    return float(np.linalg.norm(x.T @ y) ** 2
                 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def _plain_relative(student: np.ndarray, teacher: np.ndarray) -> float:
    """1 − R² of the least-squares map student → teacher (no intercept, centred variance)."""
    s, t = student.astype(np.float64), teacher.astype(np.float64)
    projection = np.linalg.lstsq(s, t, rcond=1e-6)[0]
    return float(np.sum((s @ projection - t) ** 2) / np.sum((t - t.mean(axis=0)) ** 2))


def test_tensor_entries_are_the_measures_of_the_layers_they_name(tiny_copies):
    hidden, settings = tiny_copies
    tensors = lm.similarity_tensors(hidden, settings, log=lambda _: None)
    for i, q, j, m in [(0, 0, 1, 2), (1, 2, 0, 1), (0, 1, 0, 2)]:
        query, candidate = hidden[i, q], hidden[j, m]
        assert tensors["cka"][i, q, j, m] == pytest.approx(
            _plain_linear_cka(query, candidate), rel=1e-6)
        # Student side: the query predicts the candidate; teacher side: the reverse.
        assert tensors["relative"][i, q, j, m] == pytest.approx(
            _plain_relative(query, candidate), rel=1e-3)
        assert tensors["relative-target"][i, q, j, m] == pytest.approx(
            _plain_relative(candidate, query), rel=1e-3)
