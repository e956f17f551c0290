"""The `pkd` command: analyze, fit and bench on small dumps, and their errors."""

import hashlib
import json
import math
import subprocess
import sys
import time

import numpy as np
import pytest

import pkd
from pkd import cli
from pkd.io import save_dump


@pytest.fixture
def dumps(tmp_path):
    rng = np.random.default_rng(0)
    B, T = 6, 10
    student = [rng.standard_normal((B, T, 8)).astype(np.float32) for _ in range(3)]
    maps = [rng.standard_normal((8, 12)).astype(np.float32) for _ in range(6)]
    teacher = [(student[k // 2] @ maps[k] + 0.1 * rng.standard_normal((B, T, 12)))
               .astype(np.float32) for k in range(6)]
    mask = np.ones((B, T), dtype=np.uint8)
    mask[:, 7:] = 0
    mask[5] = 0  # a fully padded example
    s_path, t_path = tmp_path / "student.safetensors", tmp_path / "teacher.npz"
    save_dump(s_path, student, attention_mask=mask)
    save_dump(t_path, teacher, attention_mask=mask)
    return s_path, t_path, student, teacher, mask


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_analyze_writes_every_output_and_matches_alignment_stats(dumps, tmp_path, capsys):
    s_path, t_path, student, teacher, mask = dumps
    before = (_digest(s_path), _digest(t_path))
    out = tmp_path / "analysis"
    assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(out),
                     "--chunk-rows", "7"]) == 0
    for name in ("alignment.png", "cka.png", "spectra.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    stats = pkd.AlignmentStats.from_arrays(student, teacher, mask=mask)
    np.testing.assert_allclose(summary["min_mse"], stats.min_mse(), rtol=1e-10)
    np.testing.assert_allclose(summary["cka"], stats.cka(), rtol=1e-10)
    assert summary["rows"] == int(mask.sum())
    assert {row["strategy"] for row in summary["strategies"]} == {"uniform", "skip", "last",
                                                                  "optimal"}
    assert summary["optimal_mapping"] == [list(p) for p in
                                          pkd.mapping.optimal(stats.relative_min_mse())]
    csv = (out / "summary.csv").read_text().splitlines()
    assert csv[0] == "student_layer,teacher_layer,min_mse,relative_min_mse,cka"
    assert len(csv) == 1 + 3 * 6
    printed = capsys.readouterr().out
    assert "optimal mapping" in printed and "uniform" in printed
    assert (_digest(s_path), _digest(t_path)) == before  # inputs never modified


def test_analyze_with_an_explicit_mapping(dumps, tmp_path):
    s_path, t_path, *_ = dumps
    out = tmp_path / "a"
    assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(out),
                     "--mapping", "0:1,2:5"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["chosen_mapping"] == "custom"
    assert summary["strategies"][-1]["pairs"] == [[0, 1], [2, 5]]


def test_analyze_refuses_dumps_of_different_rows_and_leaves_nothing(dumps, tmp_path, capsys):
    s_path, _, student, teacher, _ = dumps
    other = tmp_path / "other.npz"
    save_dump(other, [t[:4] for t in teacher])
    out = tmp_path / "never"
    assert cli.main(["analyze", str(s_path), str(other), "--out", str(out)]) == 2
    assert "disagree on rows" in capsys.readouterr().err
    assert not out.exists()


def test_analyze_refuses_different_masks(dumps, tmp_path, capsys):
    s_path, _, _, teacher, mask = dumps
    other_mask = mask.copy()
    other_mask[0, 0] = 0
    other = tmp_path / "other.safetensors"
    save_dump(other, teacher, attention_mask=other_mask)
    assert cli.main(["analyze", str(s_path), str(other), "--out", str(tmp_path / "x")]) == 2
    assert "masks differ at 1 position" in capsys.readouterr().err


def test_missing_and_corrupt_dumps_are_clear_errors(dumps, tmp_path, capsys):
    s_path, t_path, *_ = dumps
    assert cli.main(["analyze", str(tmp_path / "nope.npz"), str(t_path), "--out",
                     str(tmp_path / "o")]) == 2
    assert "no such dump file" in capsys.readouterr().err
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(s_path.read_bytes()[:100])
    assert cli.main(["analyze", str(broken), str(t_path), "--out", str(tmp_path / "o")]) == 2
    assert "broken.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_out_that_is_a_file_is_refused(dumps, tmp_path, capsys):
    s_path, t_path, *_ = dumps
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(blocker / "sub")]) == 2
    assert "not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["closed_form", "adam"])
@pytest.mark.parametrize("shared", [True, False])
def test_fit_saves_projection_with_metadata(dumps, tmp_path, capsys, method, shared):
    from safetensors import safe_open

    s_path, t_path, student, teacher, mask = dumps
    out = tmp_path / "fit"
    args = ["fit", str(s_path), str(t_path), "--mapping", "0:1,1:3", "--method", method,
            "--steps", "50", "--out", str(out)] + ([] if shared else ["--per-pair"])
    assert cli.main(args) == 0
    for name in ("layer_losses.png", "spectra.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with safe_open(out / "projection.safetensors", framework="numpy") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert json.loads(metadata["mapping"]) == [[0, 1], [1, 3]]
    assert json.loads(metadata["settings"])["method"] == method
    expected = pkd.fit_projection(student, teacher, [(0, 1), (1, 3)], method=method,
                                  steps=50, seed=0, shared=shared, attention_mask=mask)
    if shared:
        np.testing.assert_allclose(tensors["projection"], expected.projection, rtol=1e-6)
    else:
        assert set(tensors) == {"projection.0_1", "projection.1_3"}
        np.testing.assert_allclose(tensors["projection.1_3"],
                                   expected.projections[(1, 3)], rtol=1e-6)
    printed = capsys.readouterr().out
    assert "closed-form floor" in printed


def test_fit_errors(dumps, tmp_path, capsys):
    s_path, t_path, *_ = dumps
    base = ["fit", str(s_path), str(t_path), "--out", str(tmp_path / "f")]
    assert cli.main(base + ["--mapping", "0:1,1:99"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert cli.main(base + ["--mapping", "0:1", "--normalize"]) == 2
    assert "closed form exists for the MSE only" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()


def test_fit_optimal_mapping(dumps, tmp_path):
    s_path, t_path, *_ = dumps
    assert cli.main(["fit", str(s_path), str(t_path), "--mapping", "optimal", "--out",
                     str(tmp_path / "f")]) == 0


@pytest.mark.parametrize("variant", ["plain", "masked", "normalized+masked", "4 pairs shared",
                                     "alignment", "torch bridge", "torch module"])
def test_bench_case_measures_every_contender(variant):
    from pkd.bench import TORCH_VARIANTS, bench_case

    if variant in TORCH_VARIANTS:
        pytest.importorskip("torch")
    row = bench_case(variant, 64, 8, 16, "float32", repeats=1)
    assert row.variant == variant
    assert row.pkd_ms > 0 and row.gemm_ms > 0 and row.numpy_ms > 0
    assert row.peak_mb is not None and row.vs_gemm > 0
    if variant != "alignment":
        pytest.importorskip("torch")
        assert row.torch_ms > 0


def test_bench_alternates_thread_pool_groups_in_rounds(monkeypatch):
    from pkd import bench

    monkeypatch.setattr(bench, "_COOL_DOWN_S", 0.0)
    calls = []

    def contender(name, seconds=0.0):
        def run():
            calls.append(name)
            time.sleep(seconds)
        return run

    groups = [{"pkd": contender("pkd"), "gemm": contender("gemm"), "none": None},
              {"torch": contender("torch"), "slow": contender("slow", 0.06)}]
    medians = bench._median_times(groups, repeats=5, rounds=3)
    assert set(medians) == {"pkd", "gemm", "torch", "slow"}
    assert medians["slow"] >= 0.06 > medians["pkd"]
    # 5 timed runs each, split 2 + 2 + 1 over three rounds that alternate the two groups;
    # a warm-up per round, except for "slow" after its first round.
    assert calls.count("pkd") == 5 + 3 and calls.count("slow") == 5 + 1
    blocks = [name in ("pkd", "gemm") for name in calls]
    switches = sum(a != b for a, b in zip(blocks, blocks[1:], strict=False))
    assert switches == 5 and blocks[0]
    assert calls[:6] == ["pkd", "gemm", "pkd", "gemm", "pkd", "gemm"]  # warm-up, 2 rounds


def test_bench_cases_full_grid_and_quick_subset():
    from pkd.bench import GRID_N, GRID_SHAPES, QUICK_CASES, VARIANTS, bench_cases

    full = bench_cases(quick=False, dtypes=("float32", "float64"), variants=VARIANTS)
    assert len(full) == len(set(full)) == 2 * len(VARIANTS) * len(GRID_N) * len(GRID_SHAPES)
    assert {(n, d_s, d_t) for _, n, d_s, d_t, _ in full} == {
        (n, d_s, d_t) for n in GRID_N for d_s, d_t in GRID_SHAPES}
    quick = bench_cases(quick=True, dtypes=("float32", "float64"), variants=VARIANTS)
    assert len(quick) == len(VARIANTS) * len(QUICK_CASES)
    assert {dtype for *_, dtype in quick} == {"float32"}
    assert {variant for variant, *_ in quick} == set(VARIANTS)
    # a small and a large N, a narrow and a wide student: every regime of the grid
    sizes = set(QUICK_CASES)
    assert min(n for n, _, _ in sizes) <= 512 and max(n for n, _, _ in sizes) >= 4096
    assert {d_s for _, d_s, _ in sizes} >= {128, 384}
    assert sizes <= {(n, d_s, d_t) for n in GRID_N for d_s, d_t in GRID_SHAPES}


def test_startup_times_measures_every_stage():
    from pkd.bench import startup_times

    times = startup_times(repeats=1)
    assert set(times) == {"import_s", "first_call_warm_s", "first_call_cold_s", "numba_floor_s"}
    assert all(math.isfinite(t) and t > 0 for t in times.values())


def test_bench_rejects_unknown_variant(capsys):
    assert cli.main(["bench", "--variant", "fastest"]) == 2
    assert "choose from" in capsys.readouterr().err


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "pkd.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for command in ("demo", "analyze", "fit", "bench"):
        assert command in out
