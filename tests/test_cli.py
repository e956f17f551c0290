"""The `pkd` command: analyze, fit and bench on small dumps, and their errors."""

import hashlib
import io
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
    assert sorted(p.name for p in out.iterdir()) == sorted(cli.ANALYZE_OUTPUTS)
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


def test_mistyped_mask_key_is_refused(dumps, tmp_path, capsys):
    s_path, t_path, *_ = dumps
    out = tmp_path / "o"
    assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(out),
                     "--mask-key", "atention_mask"]) == 2
    err = capsys.readouterr().err
    assert "'atention_mask'" in err and "other keys found: 'attention_mask'" in err
    assert not out.exists()


def test_mask_key_names_another_key(dumps, tmp_path):
    _, _, student, teacher, mask = dumps
    s_path, t_path = tmp_path / "s.npz", tmp_path / "t.npz"
    np.savez(s_path, **{f"hidden_states.{i}": a for i, a in enumerate(student)}, padding=mask)
    save_dump(t_path, teacher)  # one dump holding the mask is enough, as for the default key
    out = tmp_path / "o"
    assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(out),
                     "--mask-key", "padding"]) == 0
    assert json.loads((out / "summary.json").read_text())["rows"] == int(mask.sum())


def _strict_json(path):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_summary_json_writes_null_for_undefined_values(dumps, tmp_path):
    _, t_path, student, _, mask = dumps
    student = [a.copy() for a in student]
    student[0][:] = 1.0  # a constant layer: its CKA is undefined
    s_path = tmp_path / "s.safetensors"
    save_dump(s_path, student, attention_mask=mask)
    out = tmp_path / "o"
    assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(out)]) == 0
    summary = _strict_json(out / "summary.json")
    assert summary["cka"][0] == [None] * 6 and None not in summary["cka"][1]
    assert "nan" in (out / "summary.csv").read_text()


def test_analyze_with_a_constant_teacher_layer(dumps, tmp_path, capsys):
    s_path, _, _, teacher, mask = dumps
    teacher = [a.copy() for a in teacher]
    teacher[0][:] = 1.0  # no variance: its relative loss is undefined
    t_path = tmp_path / "t.safetensors"
    save_dump(t_path, teacher, attention_mask=mask)
    for mapping in ("uniform", "optimal"):
        out = tmp_path / mapping
        assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(out),
                         "--mapping", mapping]) == 0
        summary = _strict_json(out / "summary.json")
        assert all(row[0] is None for row in summary["relative_min_mse"])
        optimal = summary["optimal_mapping"]
        assert len(optimal) == 3 and all(t != 0 for _, t in optimal)
    # As many teacher as student layers: no optimal mapping avoids the constant one.
    t_path = tmp_path / "t3.safetensors"
    save_dump(t_path, teacher[:3], attention_mask=mask)
    assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(tmp_path / "x")]) == 2
    assert "teacher layer(s) [0] are constant" in capsys.readouterr().err
    out = tmp_path / "u"
    assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(out),
                     "--mapping", "uniform"]) == 0
    assert "teacher layer(s) [0] are constant" in capsys.readouterr().out
    assert _strict_json(out / "summary.json")["optimal_mapping"] is None


def test_analyze_student_deeper_than_teacher(tmp_path, capsys):
    rng = np.random.default_rng(5)
    s_path, t_path = tmp_path / "s.npz", tmp_path / "t.npz"
    save_dump(s_path, [rng.standard_normal((50, 8)).astype(np.float32) for _ in range(4)])
    save_dump(t_path, [rng.standard_normal((50, 12)).astype(np.float32) for _ in range(3)])
    out = tmp_path / "o"
    assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(out),
                     "--mapping", "0:0,1:1,2:2"]) == 0
    summary = _strict_json(out / "summary.json")
    assert [row["strategy"] for row in summary["strategies"]] == ["custom"]
    assert summary["optimal_mapping"] is None
    assert "student has more layers (4) than the teacher (3)" in capsys.readouterr().out
    assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(tmp_path / "x")]) == 2
    assert "give explicit pairs to --mapping" in capsys.readouterr().err


def test_arguments_are_checked_before_streaming(dumps, tmp_path, monkeypatch, capsys):
    s_path, t_path, *_ = dumps

    def never(*args, **kwargs):
        raise AssertionError("streamed the dumps before checking the arguments")

    monkeypatch.setattr(cli, "_stream_stats", never)
    out = ["--out", str(tmp_path / "o")]
    analyze = ["analyze", str(s_path), str(t_path)] + out
    fit = ["fit", str(s_path), str(t_path), "--mapping", "optimal"] + out
    assert cli.main(analyze + ["--mapping", "0:99"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert cli.main(analyze + ["--ridge", "-1"]) == 2
    assert "--ridge must be finite and >= 0" in capsys.readouterr().err
    assert cli.main(fit + ["--ridge", "-1"]) == 2
    assert "--ridge" in capsys.readouterr().err
    assert cli.main(fit + ["--tokens", "99"]) == 2
    assert "out of range for sequences of length 10" in capsys.readouterr().err


def test_scheduler_without_dask_is_a_clear_error(dumps, tmp_path, monkeypatch, capsys):
    s_path, t_path, *_ = dumps
    monkeypatch.setitem(sys.modules, "dask", None)  # as if pkd[dask] were not installed
    monkeypatch.setitem(sys.modules, "distributed", None)
    assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(tmp_path / "o"),
                     "--scheduler", "tcp://127.0.0.1:8786"]) == 2
    assert "pip install 'pkd[dask]'" in capsys.readouterr().err


def test_an_output_that_is_a_directory_is_refused_before_any_work(dumps, tmp_path, capsys):
    s_path, t_path, *_ = dumps
    out = tmp_path / "o"
    (out / "summary.csv").mkdir(parents=True)
    assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(out)]) == 2
    assert "summary.csv: it is a directory" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["summary.csv"]


def test_a_failed_write_leaves_no_output(dumps, tmp_path, monkeypatch):
    s_path, t_path, *_ = dumps

    def failing_writer(payload):
        def write(tmp):
            raise OSError("disk full")
        return write

    monkeypatch.setattr(cli, "_json_writer", failing_writer)
    existing = tmp_path / "existing"
    existing.mkdir()
    for out in (tmp_path / "new" / "deeper", existing):
        assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(out)]) == 2
    assert not (tmp_path / "new").exists()
    assert list(existing.iterdir()) == []  # no output, no temporary file


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
    assert sorted(p.name for p in out.iterdir()) == sorted(cli.FIT_OUTPUTS)
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


def _saved_mapping(out):
    from safetensors import safe_open

    with safe_open(out / "projection.safetensors", framework="numpy") as f:
        return json.loads(f.metadata()["mapping"])


def test_fit_optimal_mapping(dumps, tmp_path):
    s_path, t_path, student, teacher, mask = dumps
    out = tmp_path / "f"
    assert cli.main(["fit", str(s_path), str(t_path), "--mapping", "optimal", "--out",
                     str(out)]) == 0
    relative = pkd.AlignmentStats.from_arrays(student, teacher, mask=mask).relative_min_mse()
    assert _saved_mapping(out) == [list(p) for p in pkd.mapping.optimal(relative)]


def test_fit_optimal_mapping_is_chosen_on_the_fitted_tokens(tmp_path):
    # Teacher layer 0 equals the student on every position but [CLS], teacher layer 1
    # on [CLS] only: over all rows layer 0 is best, over the [CLS] rows layer 1.
    rng = np.random.default_rng(8)
    student = rng.standard_normal((40, 8, 4))
    t0 = student + 0.01 * rng.standard_normal(student.shape)
    t1 = rng.standard_normal(student.shape)
    t0[:, 0] = rng.standard_normal((40, 4))
    t1[:, 0] = student[:, 0]
    s_path, t_path = tmp_path / "s.npz", tmp_path / "t.npz"
    save_dump(s_path, [student])
    save_dump(t_path, [t0, t1])
    base = ["fit", str(s_path), str(t_path), "--mapping", "optimal"]
    assert cli.main(base + ["--out", str(tmp_path / "all")]) == 0
    assert _saved_mapping(tmp_path / "all") == [[0, 0]]
    assert cli.main(base + ["--tokens", "cls", "--out", str(tmp_path / "cls")]) == 0
    assert _saved_mapping(tmp_path / "cls") == [[0, 1]]


def test_fit_shared_projection_with_a_repeated_pair(dumps, tmp_path, capsys):
    s_path, t_path, student, teacher, mask = dumps
    out = tmp_path / "f"
    assert cli.main(["fit", str(s_path), str(t_path), "--mapping", "0:1,0:1", "--out",
                     str(out)]) == 0
    assert _saved_mapping(out) == [[0, 1], [0, 1]]
    floor = pkd.fit_projection(student, teacher, [(0, 1)], method="closed_form",
                               attention_mask=mask).layer_losses[0]
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("0→1")]
    assert len(rows) == 2 and all(float(line.split()[-1]) == pytest.approx(floor, rel=1e-5)
                                  for line in rows)


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
        assert row.torch_ms > 0 and row.torch_gemm_ms > 0
        assert row.torch_blas == row.torch_gemm_ms / row.gemm_ms
    else:
        assert row.torch_gemm_ms is None and row.torch_blas is None


def test_bench_peak_counts_the_gradients_even_when_a_block_could_be_reused():
    import pkd
    from pkd.bench import _peak_bytes

    rng = np.random.default_rng(0)
    S, T = rng.standard_normal((512, 64)), rng.standard_normal((512, 96))
    P = rng.standard_normal((64, 96))
    pkd.projected_mse_grad(S, T, P)  # its block is free again, and kept
    gradient_bytes = S.nbytes + P.nbytes
    assert _peak_bytes(lambda: pkd.projected_mse_grad(S, T, P)) >= gradient_bytes


def test_bench_alternates_thread_pool_groups_in_rounds(monkeypatch):
    from pkd import bench

    monkeypatch.setattr(bench, "_COOL_DOWN_S", 0.0)
    monkeypatch.setattr(bench, "_MIN_ROUND_S", 0.0)  # exactly the runs asked for
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


def test_bench_fast_groups_get_more_runs_per_round(monkeypatch):
    from pkd import bench

    monkeypatch.setattr(bench, "_COOL_DOWN_S", 0.0)
    monkeypatch.setattr(bench, "_MIN_ROUND_S", 0.06)
    monkeypatch.setattr(bench, "_MAX_RUNS_PER_ROUND", 40)
    calls = []

    def contender(name, seconds):
        def run():
            calls.append(name)
            time.sleep(seconds)
        return run

    bench._median_times([{"fast": contender("fast", 0.0)},
                         {"mid": contender("mid", 0.005)},
                         {"slow": contender("slow", 0.04)}], repeats=5, rounds=2)
    assert calls.count("fast") == 2 * (40 + 1)  # capped, plus a warm-up per round
    # ≥ 0.06 s per round at ≥ 5 ms a run: at most 12 runs, and more than the 3 + 2 asked
    # for unless sleep overshoots 3-fold (the margin a loaded CI machine needs)
    assert 5 + 2 < calls.count("mid") <= 2 * (12 + 1)
    assert calls.count("slow") == 5 + 2  # 3 + 2 runs, as asked, and a warm-up per round
    assert bench._runs_per_round(3, 0.0) == 40 and bench._runs_per_round(3, 1.0) == 3


def _as_shown(text: str) -> list[str]:
    """The lines a terminal shows for ``text``: a carriage return rewrites its line."""
    shown = []
    for line in text.split("\n"):
        screen = ""
        for segment in line.split("\r"):
            screen = segment + screen[len(segment):]
        shown.append(screen.rstrip())
    return shown


def test_bench_table_rows_stay_off_the_progress_bar(monkeypatch):
    """The table (stdout) and the bar (stderr) on one terminal: every row on a line of its own."""
    import io

    from pkd import bench

    rows = [bench.Row("plain", "float32", 256, 128, 256, 0.5, 0.4, 0.6, 0.7, 0.3, 0.6, 0.35),
            bench.Row("alignment", "float64", 512, 8, 16, 1.5, 1.0, 1.2, None, 2.4, None)]
    cases = iter(rows)
    monkeypatch.setattr(bench, "bench_case", lambda *case, repeats: next(cases))
    monkeypatch.setattr(bench, "bench_cases", lambda **kw: [("a",), ("b",)])
    monkeypatch.setattr(bench, "call_overhead", lambda calls: dict.fromkeys(
        ("one_pair_us", "one_pair_floor_us", "four_pairs_us", "four_pairs_floor_us"), 1.0))
    monkeypatch.setattr(bench, "startup_times", lambda repeats: dict.fromkeys(
        ("import_s", "first_call_warm_s", "first_call_cold_s", "numba_floor_s"), 0.1))

    class Terminal(io.StringIO):  # what tqdm asks before it draws a bar
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(sys, "stderr", terminal)
    result = bench.run_bench(quick=True, variants=("plain",), out=terminal, progress=True)

    assert "bench:" in terminal.getvalue()  # the bar was drawn on the same stream
    shown = _as_shown(terminal.getvalue())
    header = bench._format_row(None)
    assert shown.count(header) == 1
    for row in rows:
        assert shown.count(bench._format_row(row)) == 1
    assert not [line for line in shown if "bench:" in line]  # cleared once done
    assert [r["variant"] for r in result["rows"]] == ["plain", "alignment"]
    log = io.StringIO()  # not a terminal: no bar at all, the table alone
    monkeypatch.setattr(sys, "stderr", log)
    cases = iter(rows)
    bench.run_bench(quick=True, variants=("plain",), out=log, progress=True)
    assert "bench:" not in log.getvalue() and "\r" not in log.getvalue()
    assert _as_shown(log.getvalue()).count(bench._format_row(rows[0])) == 1
    # a missing figure keeps its column: the alignment row lines up with the header
    missing = bench._format_row(rows[1])
    assert len(missing) == len(header) and missing.split()[-1] == "-"
    assert missing.split()[-5:] == ["0.80", "-", "-", "2.4", "-"]


def test_bench_cases_full_grid_and_quick_subset():
    from pkd.bench import GRID_N, GRID_SHAPES, GRID_VARIANTS, QUICK_CASES, VARIANTS, bench_cases

    full = bench_cases(quick=False, dtypes=("float32", "float64"), variants=VARIANTS)
    # The workloads (rbf cka, layer analysis) have sizes of their own: not in the grid.
    assert len(full) == len(set(full)) == 2 * len(GRID_VARIANTS) * len(GRID_N) * len(GRID_SHAPES)
    assert {(n, d_s, d_t) for _, n, d_s, d_t, _ in full} == {
        (n, d_s, d_t) for n in GRID_N for d_s, d_t in GRID_SHAPES}
    assert bench_cases(quick=False, variants=VARIANTS) == full
    quick = bench_cases(quick=True, variants=VARIANTS)
    assert len(quick) == len(GRID_VARIANTS) * len(QUICK_CASES)
    assert {dtype for *_, dtype in quick} == {"float32"}
    quick64 = bench_cases(quick=True, dtypes=("float64",), variants=VARIANTS)
    assert {dtype for *_, dtype in quick64} == {"float64"}  # an explicit dtype is honoured
    assert {variant for variant, *_ in quick} == set(GRID_VARIANTS)
    # a small and a large N, a narrow and a wide student: every regime of the grid
    sizes = set(QUICK_CASES)
    assert min(n for n, _, _ in sizes) <= 512 and max(n for n, _, _ in sizes) >= 4096
    assert {d_s for _, d_s, _ in sizes} >= {128, 384}
    assert sizes <= {(n, d_s, d_t) for n in GRID_N for d_s, d_t in GRID_SHAPES}


def test_bench_header_names_the_cpu_model_and_caches(tmp_path, monkeypatch):
    from pkd import bench

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n"
                       "model\t\t: 167\nmodel name\t: Test CPU\n\nprocessor\t: 1\n"
                       "model\t\t: 99\n")
    caches = tmp_path / "cache"
    for index, (level, kind, size) in enumerate([(1, "Data", "48K"), (1, "Instruction", "32K"),
                                                 (2, "Unified", "2048K")]):
        folder = caches / f"index{index}"
        folder.mkdir(parents=True)
        for name, value in (("level", level), ("type", kind), ("size", size)):
            (folder / name).write_text(f"{value}\n")
    assert bench._cpuinfo_fields(str(cpuinfo))["model"] == "167"  # the first processor's
    assert bench._cache_sizes(str(caches)) == {"L1d": "48K", "L2": "2048K"}
    assert bench._cache_sizes(str(tmp_path / "absent")) == {}

    read_cpuinfo, read_caches = bench._cpuinfo_fields, bench._cache_sizes
    monkeypatch.setattr(bench, "_cpuinfo_fields", lambda: read_cpuinfo(str(cpuinfo)))
    monkeypatch.setattr(bench, "_cache_sizes", lambda: read_caches(str(caches)))
    header = bench.machine_header()
    assert header["cpu"] == "Test CPU" and header["cpu_model"] == "family 6, model 167"
    assert bench._format_header(header).startswith(
        "machine: Test CPU (family 6, model 167; L1d 48K; L2 2048K), ")
    # A header without them (an older JSON, another OS) still formats.
    for key in ("cpu_model", "caches"):
        header.pop(key)
    assert bench._format_header(header).startswith("machine: Test CPU, ")


def test_startup_times_measures_every_stage():
    from pkd.bench import startup_times

    times = startup_times(repeats=1)
    assert set(times) == {"import_s", "first_call_warm_s", "first_call_cold_s", "numba_floor_s"}
    assert all(math.isfinite(t) and t > 0 for t in times.values())


def test_call_overhead_sets_each_call_against_what_it_cannot_avoid():
    from pkd.bench import call_overhead, describe_call_overhead

    cost = call_overhead(calls=50, repeats=2)
    assert set(cost) == {"one_pair_us", "one_pair_floor_us", "four_pairs_us",
                         "four_pairs_floor_us"}
    assert all(math.isfinite(t) and t > 0 for t in cost.values())
    # The calls do the floor's GEMMs and fused passes and more; four pairs, four times one's.
    assert cost["one_pair_us"] > cost["one_pair_floor_us"]
    assert cost["four_pairs_us"] > cost["four_pairs_floor_us"] > cost["one_pair_floor_us"]
    text = describe_call_overhead(dict(one_pair_us=15.04, one_pair_floor_us=5.0,
                                       four_pairs_us=70.0, four_pairs_floor_us=20.0))
    assert text.startswith("Fixed cost of a call (N = 8, 8×16 float32, best of 7 rounds): ")
    assert "projected_mse_grad 15.0 µs, of which the GEMMs and the fused pass 5.0 µs" in text
    assert text.endswith("4 pairs sharing P 70.0 µs (20.0 µs).")


def test_bench_rejects_unknown_variant(capsys):
    assert cli.main(["bench", "--variant", "fastest"]) == 2
    assert "choose from" in capsys.readouterr().err


@pytest.fixture
def fake_bench(monkeypatch):
    """Stand-ins for the timings: the cases ``pkd bench`` would run, in a list."""
    from pkd import bench

    ran = []

    def bench_case(variant, n, d_s, d_t, dtype, repeats):
        ran.append((variant, dtype))
        return bench.Row(variant, dtype, n, d_s, d_t, 1.0, 1.0, None, None, None, None)

    monkeypatch.setattr(bench, "bench_case", bench_case)
    monkeypatch.setattr(bench, "bench_rbf_cka",
                        lambda *size, repeats, out: ran.append(("rbf cka", size)) or {})
    monkeypatch.setattr(bench, "bench_layer_analysis",
                        lambda *size, repeats, out: ran.append(("layer analysis", size)) or {})
    monkeypatch.setattr(bench, "call_overhead", lambda calls=2000: dict.fromkeys(
        ("one_pair_us", "one_pair_floor_us", "four_pairs_us", "four_pairs_floor_us"), 1.0))
    monkeypatch.setattr(bench, "startup_times", lambda repeats=3: dict.fromkeys(
        ("import_s", "first_call_warm_s", "first_call_cold_s", "numba_floor_s"), 0.0))
    return ran


def test_bench_quick_honours_an_explicit_dtype(fake_bench, capsys):
    assert cli.main(["bench", "--quick", "--variant", "plain", "--dtype", "float64"]) == 0
    assert fake_bench and {dtype for _, dtype in fake_bench} == {"float64"}
    fake_bench.clear()
    assert cli.main(["bench", "--quick", "--variant", "plain"]) == 0
    assert fake_bench and {dtype for _, dtype in fake_bench} == {"float32"}


def test_bench_checks_the_json_path_first(fake_bench, tmp_path, capsys):
    assert cli.main(["bench", "--quick", "--json", str(tmp_path / "nodir" / "b.json")]) == 2
    assert "nodir does not exist" in capsys.readouterr().err
    assert cli.main(["bench", "--quick", "--json", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert fake_bench == []


def test_bench_torch_variant_without_torch(fake_bench, monkeypatch, capsys):
    from pkd import bench

    monkeypatch.setattr(bench, "_torch", lambda: None)
    assert cli.main(["bench", "--quick", "--variant", "torch bridge"]) == 2
    assert "need torch" in capsys.readouterr().err
    assert fake_bench == []
    assert cli.main(["bench", "--quick"]) == 0  # by default the torch variants are left out
    assert {v for v, _ in fake_bench} == set(bench.VARIANTS) - set(bench.TORCH_VARIANTS)
    quick_sizes = {v: size for v, size in fake_bench if v in bench.WORKLOADS}
    assert quick_sizes == {"rbf cka": bench.RBF_CKA_QUICK,
                           "layer analysis": bench.LAYER_ANALYSIS_QUICK}


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "pkd.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for command in ("demo", "analyze", "fit", "bench"):
        assert command in out


def test_bench_runs_a_variant_named_twice_once():
    from pkd.bench import check_variants

    assert check_variants(["plain", "masked", "plain"]) == ("plain", "masked")


def test_bench_workloads_run_by_name_at_their_full_size(fake_bench, capsys):
    from pkd import bench

    assert cli.main(["bench", "--variant", "rbf cka", "--variant", "layer analysis"]) == 0
    assert fake_bench == [("rbf cka", bench.RBF_CKA_CASE),
                          ("layer analysis", bench.LAYER_ANALYSIS_CASE)]


def test_bench_rbf_cka_times_every_contender_and_agrees_with_numpy():
    from pkd import bench

    out = io.StringIO()
    result = bench.bench_rbf_cka(40, 6, 9, repeats=5, out=out)
    for key in ("parallel_s", "serial_s", "numpy_s", "gemm_s"):
        assert result[key] > 0, key
    assert result["parallel_vs_gemm"] == result["parallel_s"] / result["gemm_s"]
    assert 0 < result["cka"] <= 1 and result["numpy_difference"] < 1e-12
    assert "RBF CKA, N=40, 6→9, float32" in out.getvalue()


@pytest.mark.parametrize("folds", [False, True])
def test_bench_layer_analysis_times_every_contender(folds, monkeypatch):
    """Without folds= the held-out part is skipped and says so; with it, it is timed."""
    import inspect

    from pkd import AlignmentStats, bench

    has_folds = "folds" in inspect.signature(AlignmentStats.from_arrays).parameters
    if folds and not has_folds:
        pytest.skip("this AlignmentStats has no folds= (branch trust-core)")
    if not folds and has_folds:
        original = AlignmentStats.from_arrays

        def no_folds(cls, student_layers, teacher_layers, mask=None):
            return original.__func__(cls, student_layers, teacher_layers, mask)

        monkeypatch.setattr(AlignmentStats, "from_arrays", classmethod(no_folds))
    out = io.StringIO()
    result = bench.bench_layer_analysis(30, 2, 3, 4, 6, repeats=5, out=out)
    assert result["analysis_s"] > 0 and result["gemm_s"] > 0 and result["lstsq_s"] > 0
    assert result["lstsq_vs_analysis"] == result["lstsq_s"] / result["analysis_s"]
    if folds:
        assert result["heldout_s"] > 0
        assert result["heldout_added"] == result["heldout_s"] / result["analysis_s"] - 1
        assert "5-fold held-out estimates" in out.getvalue()
    else:
        assert result["heldout_s"] is None and result["heldout_added"] is None
        assert "takes no folds=" in out.getvalue()


def test_bench_refuses_fewer_than_five_repeats(capsys):
    assert cli.main(["bench", "--quick", "--repeats", "0"]) == 2
    assert "repeats must be an int >= 5 (the figures are medians), got 0" in \
        capsys.readouterr().err
