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
from pkd import _cli_analyze, _cli_fit, _cli_measures, cli
from pkd.cka import rbf_cka_matrix
from pkd.io import save_dump


@pytest.fixture
def dumps(tmp_path):
    rng = np.random.default_rng(0)
    B, T = 30, 10  # 203 kept rows: more than 10 × the student width, no held-out estimates
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
    assert sorted(p.name for p in out.iterdir()) == sorted(_cli_analyze.ANALYZE_OUTPUTS)
    for name in ("alignment.png", "cka.png", "spectra.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    stats = pkd.AlignmentStats.from_arrays(student, teacher, mask=mask)
    np.testing.assert_allclose(summary["min_mse"], stats.min_mse(), rtol=1e-10)
    np.testing.assert_allclose(summary["cka"], stats.cka(), rtol=1e-10)
    assert summary["rows"] == int(mask.sum())
    assert {row["strategy"] for row in summary["strategies"]} == {"uniform", "skip", "last",
                                                                  "optimal"}
    # The default: RBF CKA at σ = 0.2 × the median distance, a similarity (maximised).
    assert summary["measure"] == cli.DEFAULT_MEASURE == "rbf-cka"
    assert summary["bandwidth"] == 0.2 and summary["measure_maximize"] is True
    rbf = rbf_cka_matrix(student, teacher, mask=mask, bandwidth=0.2)  # 203 rows: all used
    np.testing.assert_allclose(summary["rbf_cka"], rbf, rtol=1e-10)
    assert summary["optimal_mapping"] == [list(p) for p in pkd.mapping.optimal(rbf,
                                                                                maximize=True)]
    assert summary["heldout"] is None  # 203 rows > 10 × width 8
    csv = (out / "summary.csv").read_text().splitlines()
    assert csv[0] == "student_layer,teacher_layer,min_mse,relative_min_mse,cka,rbf_cka"
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
    assert "the dumps hold different rows" in capsys.readouterr().err
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
        assert "teacher layer(s) [0] is constant over the 203 rows used" in \
            capsys.readouterr().err
        summary = _strict_json(out / "summary.json")
        assert all(row[0] is None for row in summary["relative_min_mse"])
        optimal = summary["optimal_mapping"]
        assert len(optimal) == 3 and all(t != 0 for _, t in optimal)
    # As many teacher as student layers: no optimal mapping avoids the constant one.
    t_path = tmp_path / "t3.safetensors"
    save_dump(t_path, teacher[:3], attention_mask=mask)
    out = tmp_path / "x"  # by default the heatmaps are written and the summary says why
    assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(out)]) == 0
    assert "teacher layer(s) [0] are constant" in capsys.readouterr().out
    summary = _strict_json(out / "summary.json")
    assert summary["optimal_mapping"] is None and summary["chosen_mapping"] is None
    assert "teacher layer(s) [0] are constant" in summary["no_optimal_mapping"]
    assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(tmp_path / "y"),
                     "--mapping", "optimal"]) == 2
    assert "teacher layer(s) [0] are constant" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
    out = tmp_path / "u"
    assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(out),
                     "--mapping", "uniform"]) == 0
    assert "teacher layer(s) [0] are constant" in capsys.readouterr().out
    assert _strict_json(out / "summary.json")["optimal_mapping"] is None


def test_analyze_student_deeper_than_teacher(tmp_path, capsys):
    rng = np.random.default_rng(5)
    s_path, t_path = tmp_path / "s.npz", tmp_path / "t.npz"
    save_dump(s_path, [rng.standard_normal((100, 8)).astype(np.float32) for _ in range(4)])
    save_dump(t_path, [rng.standard_normal((100, 12)).astype(np.float32) for _ in range(3)])
    out = tmp_path / "o"
    assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(out),
                     "--mapping", "0:0,1:1,2:2"]) == 0
    summary = _strict_json(out / "summary.json")
    assert [row["strategy"] for row in summary["strategies"]] == ["custom"]
    assert summary["optimal_mapping"] is None
    assert "student has more layers (4) than the teacher (3)" in capsys.readouterr().out
    # The default mapping: every heatmap, a summary saying why there is no mapping, exit 0.
    out = tmp_path / "default"
    assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(_cli_analyze.ANALYZE_OUTPUTS)
    printed = capsys.readouterr().out
    assert "no increasing mapping exists: the student has more layers (4)" in printed
    summary = _strict_json(out / "summary.json")
    assert summary["strategies"] == [] and summary["chosen_mapping"] is None
    assert summary["no_optimal_mapping"].startswith("no increasing mapping exists")
    # Asked for explicitly, it is an error, before any streaming.
    assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(tmp_path / "x"),
                     "--mapping", "optimal"]) == 2
    assert "give explicit pairs to --mapping" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_arguments_are_checked_before_streaming(dumps, tmp_path, monkeypatch, capsys):
    s_path, t_path, *_ = dumps

    def never(*args, **kwargs):
        raise AssertionError("streamed the dumps before checking the arguments")

    # analyze and fit stream through _measure_layer_pairs, which looks this name up here.
    monkeypatch.setattr(_cli_measures, "_stream_stats", never)
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

    monkeypatch.setattr(_cli_analyze, "_json_writer", failing_writer)
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
            "--out", str(out)] + ([] if shared else ["--per-pair"])
    args += [] if method == "closed_form" else ["--steps", "50"]
    assert cli.main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(_cli_fit.FIT_OUTPUTS)
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
    err = capsys.readouterr().err  # in the CLI's spelling, not the library's
    assert "--normalize needs --method adam or --method sgd" in err and "method=" not in err
    assert not (tmp_path / "f").exists()


def _saved_mapping(out):
    from safetensors import safe_open

    with safe_open(out / "projection.safetensors", framework="numpy") as f:
        return json.loads(f.metadata()["mapping"])


def test_fit_optimal_mapping(dumps, tmp_path):
    s_path, t_path, student, teacher, mask = dumps
    stats = pkd.AlignmentStats.from_arrays(student, teacher, mask=mask)
    base = ["fit", str(s_path), str(t_path), "--mapping", "optimal", "--out"]
    assert cli.main(base + [str(tmp_path / "rbf")]) == 0  # the default measure
    rbf = rbf_cka_matrix(student, teacher, mask=mask, bandwidth=0.2)
    assert _saved_mapping(tmp_path / "rbf") == [list(p) for p in
                                                pkd.mapping.optimal(rbf, maximize=True)]
    assert cli.main(base + [str(tmp_path / "cka"), "--measure", "cka"]) == 0
    assert _saved_mapping(tmp_path / "cka") == [list(p) for p in
                                                pkd.mapping.optimal(-stats.cka())]
    assert cli.main(base + [str(tmp_path / "rel"), "--measure", "relative"]) == 0
    assert _saved_mapping(tmp_path / "rel") == [
        list(p) for p in pkd.mapping.optimal(stats.relative_min_mse())]


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
    monkeypatch.setattr(bench, "bench_dump",
                        lambda *size, repeats, out: ran.append(("dump", size)) or {})
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
                           "layer analysis": bench.LAYER_ANALYSIS_QUICK,
                           "dump": bench.DUMP_QUICK}


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


def test_bench_alignment_matrix_times_the_solve_not_a_cache_hit(monkeypatch):
    import pkd._estimates as estimates
    from pkd import bench

    solves = []
    real = estimates.residuals
    monkeypatch.setattr(estimates, "residuals", lambda *a: solves.append(1) or real(*a))
    bench.bench_alignment_matrix(n=40, n_s=2, n_t=2, d_s=3, d_t=4, repeats=3, out=io.StringIO())
    assert len(solves) >= 3  # one solve per timed min_mse call


def test_bench_prints_to_the_stdout_of_the_call_by_default(monkeypatch):
    from pkd import bench

    # sys.stdout swapped after pkd.bench was imported: a default bound at import time
    # would print past it.
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    bench.bench_rbf_cka(40, 6, 9, repeats=5)
    assert "RBF CKA, N=40, 6→9, float32" in out.getvalue()


def test_bench_layer_analysis_times_every_contender():
    from pkd import bench

    out = io.StringIO()
    result = bench.bench_layer_analysis(30, 2, 3, 4, 6, repeats=5, out=out)
    assert result["analysis_s"] > 0 and result["gemm_s"] > 0 and result["lstsq_s"] > 0
    assert result["lstsq_vs_analysis"] == result["lstsq_s"] / result["analysis_s"]
    assert result["heldout_s"] > 0
    assert result["heldout_added"] == result["heldout_s"] / result["analysis_s"] - 1
    assert "5-fold held-out estimates" in out.getvalue()
    # The query's floor: 5 folds × 2 students × 3 triangular products of 4·4·18 flops
    # over the accumulation's 30·(2·16 + 3·36 + 2·8·18) flops.
    assert result["heldout_floor_added"] == pytest.approx(5 * 2 * 3 * 16 * 18
                                                          / (30 * (32 + 108 + 288)))


def test_bench_refuses_fewer_than_five_repeats(capsys):
    assert cli.main(["bench", "--quick", "--repeats", "0"]) == 2
    assert "repeats must be an int >= 5 (the figures are medians), got 0" in \
        capsys.readouterr().err


# --- embeddings are not a transformer layer ---------------------------------------------


def _hf_like_dumps(tmp_path, n_s=7, n_t=13, rows=120, metadata=True, seed=3):
    """Pooled dumps laid out as Hugging Face hidden_states: index 0 holds the embeddings."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((rows, 6))
    student = [(base @ rng.standard_normal((6, 6)) + 0.5 * rng.standard_normal((rows, 6)))
               .astype(np.float32) for _ in range(n_s)]
    teacher = [(base @ rng.standard_normal((6, 10)) + 0.5 * rng.standard_normal((rows, 10)))
               .astype(np.float32) for _ in range(n_t)]
    meta = {"embeddings_index": "0"} if metadata else None
    s_path, t_path = tmp_path / "s.safetensors", tmp_path / "t.safetensors"
    save_dump(s_path, student, metadata=meta)
    save_dump(t_path, teacher, metadata=meta)
    return s_path, t_path


def _strategies(out):
    summary = _strict_json(out / "summary.json")
    return {row["strategy"]: [tuple(p) for p in row["pairs"]] for row in summary["strategies"]}


def test_fixed_mappings_leave_the_embeddings_out(tmp_path, capsys):
    s_path, t_path = _hf_like_dumps(tmp_path)
    out = tmp_path / "o"
    assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(out)]) == 0
    assert "embeddings_index" not in capsys.readouterr().err  # the dumps say it: no note
    found = _strategies(out)
    # PKD-Skip of a 6-layer student and a 12-layer teacher, in hidden_states indices.
    assert found["skip"] == [(1, 2), (2, 4), (3, 6), (4, 8), (5, 10)]
    assert found["uniform"] == [(1, 2), (2, 4), (3, 6), (4, 8), (5, 10), (6, 12)]
    assert found["last"] == [(1, 7), (2, 8), (3, 9), (4, 10), (5, 11)]
    assert all(s != 0 and t != 0 for s, t in found["optimal"]) and len(found["optimal"]) == 6
    summary = _strict_json(out / "summary.json")
    assert summary["embeddings_index"]["student"] == summary["embeddings_index"]["teacher"] == 0
    assert summary["include_embeddings"] is False
    # --include-embeddings: every index is mapped, embeddings included.
    out = tmp_path / "all"
    assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(out),
                     "--include-embeddings"]) == 0
    found = _strategies(out)
    assert found["skip"] == pkd.mapping.skip(7, 13)
    assert len(found["optimal"]) == 7


def test_fit_skip_maps_transformer_layers(tmp_path):
    s_path, t_path = _hf_like_dumps(tmp_path)
    out = tmp_path / "f"
    assert cli.main(["fit", str(s_path), str(t_path), "--mapping", "skip", "--out",
                     str(out)]) == 0
    assert _saved_mapping(out) == [[1, 2], [2, 4], [3, 6], [4, 8], [5, 10]]
    with __import__("safetensors").safe_open(out / "projection.safetensors", "numpy") as f:
        assert json.loads(f.metadata()["embeddings_index"]) == {"student": 0, "teacher": 0}


def test_a_dump_without_the_convention_says_what_is_assumed(tmp_path, capsys):
    s_path, t_path = _hf_like_dumps(tmp_path, metadata=False)
    out = tmp_path / "o"
    assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"no embeddings_index in {s_path} or {t_path}: treating every layer as a " \
           "transformer layer; pass --embeddings-index 0" in err
    summary = _strict_json(out / "summary.json")
    assert summary["embeddings_index"]["student"] is None
    assert summary["embeddings_index"]["student_source"].startswith("assumed")
    assert any("no embeddings_index" in w for w in summary["warnings"])
    assert _strategies(out)["skip"] == pkd.mapping.skip(7, 13)
    # Said on the command line: the same as the metadata would give, and no note.
    out = tmp_path / "given"
    assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(out),
                     "--embeddings-index", "0"]) == 0
    assert "no embeddings_index" not in capsys.readouterr().err
    assert _strategies(out)["skip"] == [(1, 2), (2, 4), (3, 6), (4, 8), (5, 10)]
    assert _strict_json(out / "summary.json")["embeddings_index"]["teacher_source"] == \
        "--embeddings-index 0"
    assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(tmp_path / "n"),
                     "--embeddings-index", "none"]) == 0
    assert "no embeddings_index" not in capsys.readouterr().err


def test_embeddings_index_errors(tmp_path, capsys):
    s_path, t_path = _hf_like_dumps(tmp_path)
    base = ["analyze", str(s_path), str(t_path), "--out", str(tmp_path / "o")]
    assert cli.main(base + ["--embeddings-index", "1"]) == 2
    assert f"--embeddings-index 1 contradicts {s_path}" in capsys.readouterr().err
    for metadata, said in (({"embeddings_index": "x"}, "must be a non-negative integer"),
                           ({"embeddings_index": "9"}, "'embeddings_index' is 9 but")):
        save_dump(s_path, [np.ones((120, 2), np.float32)] * 7, metadata=metadata)
        assert cli.main(base) == 2
        assert said in capsys.readouterr().err
    assert cli.main(base + ["--embeddings-index", "first"]) == 2
    assert '--embeddings-index must be a layer index >= 0 or "none"' in capsys.readouterr().err
    (tmp_path / "bare").mkdir()
    bare_s, bare_t = _hf_like_dumps(tmp_path / "bare", metadata=False)
    assert cli.main(["analyze", str(bare_s), str(bare_t), "--out", str(tmp_path / "o"),
                     "--embeddings-index", "7"]) == 2
    assert "embeddings index 7 (--embeddings-index 7) is out of range" in \
        capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_heatmap_labels_the_embeddings():
    from pkd import plots

    rng = np.random.default_rng(0)
    fig = plots.alignment_heatmap(rng.random((3, 5)), student_embeddings=0,
                                  teacher_embeddings=0)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["emb", "1", "2", "3", "4"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["emb", "1", "2"]
    plain = plots.alignment_heatmap(rng.random((3, 5))).axes[0]
    assert [t.get_text() for t in plain.get_yticklabels()] == ["0", "1", "2"]
    with pytest.raises(ValueError, match="teacher_embeddings=5 is out of range for 5"):
        plots.alignment_heatmap(rng.random((3, 5)), teacher_embeddings=5)


# --- masks are never silent; dumps of different texts are refused ------------------------


def test_a_3d_pair_without_a_mask_is_named_and_recorded(dumps, tmp_path, capsys):
    _, _, student, teacher, _ = dumps
    s_path, t_path = tmp_path / "s.safetensors", tmp_path / "t.safetensors"
    save_dump(s_path, student)
    save_dump(t_path, teacher)
    out = tmp_path / "o"
    assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert f"neither {s_path} nor {t_path} has a 'attention_mask' mask" in captured.err
    assert "padding included" in captured.err
    assert "mask: no mask" in captured.out
    summary = _strict_json(out / "summary.json")
    assert summary["mask"] == "no mask" and summary["rows"] == 300
    assert any("padding included" in w for w in summary["warnings"])


def test_the_mask_used_is_named(dumps, tmp_path, capsys):
    s_path, t_path, _, teacher, mask = dumps
    out = tmp_path / "both"
    assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(out)]) == 0
    assert f"mask: 'attention_mask' of {s_path} and {t_path} (identical)" in \
        capsys.readouterr().out
    bare = tmp_path / "bare.safetensors"
    save_dump(bare, teacher)
    out = tmp_path / "one"
    assert cli.main(["analyze", str(s_path), str(bare), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    said = f"'attention_mask' of {s_path} ({bare} has none)"
    assert f"mask: {said}" in captured.out
    assert "padding included" not in captured.err  # a mask is used: no warning
    summary = _strict_json(out / "summary.json")
    assert summary["mask"] == said and summary["rows"] == int(mask.sum())


def test_pooled_dumps_without_a_mask_need_no_warning(tmp_path, capsys):
    s_path, t_path = _hf_like_dumps(tmp_path)
    assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(tmp_path / "o")]) == 0
    assert capsys.readouterr().err == ""
    assert _strict_json(tmp_path / "o" / "summary.json")["mask"] == "no mask"


@pytest.mark.parametrize("command", ["analyze", "fit"])
def test_dumps_of_different_texts_are_refused(dumps, tmp_path, capsys, command):
    _, _, student, teacher, mask = dumps
    s_path, t_path = tmp_path / "s.safetensors", tmp_path / "t.safetensors"
    save_dump(s_path, student, attention_mask=mask,
              metadata={"texts_sha256": "a" * 64, "n_texts": "30"})
    save_dump(t_path, teacher, attention_mask=mask,
              metadata={"texts_sha256": "b" * 64, "n_texts": "30"})
    out = tmp_path / "o"
    args = [command, str(s_path), str(t_path), "--out", str(out), "--mapping", "skip"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "the dumps were made from different texts (their texts_sha256 differ)" in err
    assert str(s_path) in err and str(t_path) in err
    assert "dump both models from the same texts file" in err
    save_dump(t_path, teacher, attention_mask=mask,
              metadata={"texts_sha256": "a" * 64, "n_texts": "31"})
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert f"{s_path} (30 texts" in err and f"{t_path} (31 texts" in err
    assert not out.exists()
    save_dump(t_path, teacher, attention_mask=mask,
              metadata={"texts_sha256": "a" * 64, "n_texts": "30"})
    assert cli.main(args) == 0


# --- the strategy table compares like with like -------------------------------------------


def test_strategy_table_has_per_pair_means_and_pair_counts(dumps, tmp_path, capsys):
    s_path, t_path, *_ = dumps
    out = tmp_path / "o"
    assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(out)]) == 0
    summary = _strict_json(out / "summary.json")
    relative, cka = np.array(summary["relative_min_mse"]), np.array(summary["cka"])
    min_mse = np.array(summary["min_mse"])
    counts = {}
    for row in summary["strategies"]:
        pairs = [tuple(p) for p in row["pairs"]]
        assert row["n_pairs"] == len(pairs)
        counts[row["strategy"]] = len(pairs)
        assert row["mean_relative_min_mse"] == pytest.approx(np.mean([relative[p]
                                                                      for p in pairs]))
        assert row["mean_min_mse"] == pytest.approx(np.mean([min_mse[p] for p in pairs]))
        assert row["mean_cka"] == pytest.approx(np.mean([cka[p] for p in pairs]))
        assert not any(key.startswith("sum") for key in row)
    assert counts == {"uniform": 3, "skip": 2, "last": 2, "optimal": 3}
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("strategy"))
    assert header.split()[:2] == ["strategy", "pairs"] and "mean 1 − R²" in header
    skip = next(line for line in lines if line.startswith("skip "))
    assert skip.split()[1] == "2"


# --- tokens="cls" under left padding ------------------------------------------------------


def _left_padded(tmp_path, rng):
    B, T = 60, 6  # 60 [CLS] rows > 10 × the width 4: no held-out estimates needed
    student = rng.standard_normal((B, T, 4)).astype(np.float32)
    first = rng.integers(0, T - 1, size=B)  # left padding: the text starts at first[b]
    first[0] = 0
    mask = (np.arange(T)[None, :] >= first[:, None]).astype(np.uint8)
    t_cls = rng.standard_normal((B, T, 4)).astype(np.float32)
    t_cls[np.arange(B), first] = student[np.arange(B), first]  # agrees on the first real token
    t_zero = rng.standard_normal((B, T, 4)).astype(np.float32)
    t_zero[:, 0] = student[:, 0]  # agrees at position 0, mostly padding
    s_path, t_path = tmp_path / "s.npz", tmp_path / "t.npz"
    save_dump(s_path, [student], attention_mask=mask)
    save_dump(t_path, [t_zero, t_cls], attention_mask=mask)
    return s_path, t_path, student, [t_zero, t_cls], mask, first


def test_fit_tokens_cls_takes_the_first_real_token_under_left_padding(tmp_path, capsys):
    rng = np.random.default_rng(11)
    s_path, t_path, student, teacher, mask, first = _left_padded(tmp_path, rng)
    out = tmp_path / "cls"
    assert cli.main(["fit", str(s_path), str(t_path), "--mapping", "optimal", "--tokens", "cls",
                     "--measure", "relative", "--out", str(out)]) == 0
    assert _saved_mapping(out) == [[0, 1]]  # the teacher layer that agrees on real tokens
    assert "0→1" in capsys.readouterr().out  # an exact fit (loss 0) is drawn on a linear axis
    rows = np.arange(len(first))
    want = pkd.fit_projection([student[rows, first]], [teacher[1][rows, first]], [(0, 0)],
                              method="closed_form")
    from safetensors.numpy import load_file

    np.testing.assert_allclose(load_file(out / "projection.safetensors")["projection"],
                               want.projection, rtol=1e-5, atol=1e-6)


def test_analyze_tokens_cls_counts_one_row_per_sequence(tmp_path, capsys):
    rng = np.random.default_rng(12)
    s_path, t_path, *_ = _left_padded(tmp_path, rng)
    out = tmp_path / "o"
    assert cli.main(["analyze", str(s_path), str(t_path), "--tokens", "cls", "--out",
                     str(out), "--mapping", "0:1"]) == 0
    summary = _strict_json(out / "summary.json")
    assert summary["rows"] == 60 and summary["tokens"] == "cls"
    assert summary["cka"][0][1] == pytest.approx(1.0)


# --- measures -------------------------------------------------------------------------------


def test_measure_relative_picks_the_least_loss_and_draws_it(dumps, tmp_path):
    s_path, t_path, student, teacher, mask = dumps
    out = tmp_path / "o"
    assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(out),
                     "--measure", "relative"]) == 0
    summary = _strict_json(out / "summary.json")
    stats = pkd.AlignmentStats.from_arrays(student, teacher, mask=mask)
    assert summary["measure"] == "relative" and summary["measure_maximize"] is False
    assert summary["optimal_mapping"] == [list(p) for p in
                                          pkd.mapping.optimal(stats.relative_min_mse())]


def test_unknown_measure_lists_the_choices(dumps, tmp_path, capsys):
    s_path, t_path, *_ = dumps
    with pytest.raises(SystemExit):
        cli.main(["analyze", str(s_path), str(t_path), "--out", str(tmp_path / "o"),
                  "--measure", "r2"])
    err = capsys.readouterr().err
    for name in ("relative", "heldout", "cka", "cka-debiased", "rbf-cka"):
        assert name in err


# --- CLI polish -----------------------------------------------------------------------------


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"pkd {pkd.__version__}"


def _help(*command):
    out = subprocess.run([sys.executable, "-m", "pkd.cli", *command, "--help"],
                         capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "COLUMNS": "200"}).stdout
    return " ".join(out.split())  # argparse wraps lines; compare words


def test_help_gives_every_default_and_the_files_written():
    from pkd.alignment import DEFAULT_CHUNK_ROWS
    from pkd.bench import VARIANTS

    analyze = _help("analyze")
    assert f"rows per streamed chunk (default: {DEFAULT_CHUNK_ROWS})" in analyze
    assert f"(default: {cli.DEFAULT_MEASURE})" in analyze
    for name in _cli_analyze.ANALYZE_OUTPUTS:
        assert name in analyze
    fit = _help("fit")
    assert "(default: closed_form)" in fit and "default 500" in fit
    for name in _cli_fit.FIT_OUTPUTS:
        assert name in fit
    bench = _help("bench")
    assert all(variant in bench for variant in VARIANTS)
    assert "accuracy.png" in _help("demo")
    dump = _help("dump")
    assert "(default: float32)" in dump and "(default: 32)" in dump and "(default: none)" in dump
    assert "writes --out, one .safetensors file: hidden_states.0" in dump
    assert "attention_mask (N, T), with --pool none" in dump


def test_chunk_rows_default_is_the_library_default():
    from pkd.alignment import DEFAULT_CHUNK_ROWS

    args = cli.build_parser().parse_args(["analyze", "s.npz", "t.npz", "--out", "o"])
    assert args.chunk_rows == DEFAULT_CHUNK_ROWS


def test_unknown_mapping_lists_every_choice(dumps, tmp_path, capsys):
    s_path, t_path, *_ = dumps
    for command in ("analyze", "fit"):
        assert cli.main([command, str(s_path), str(t_path), "--out", str(tmp_path / "o"),
                         "--mapping", "foo"]) == 2
        assert "choose from uniform, skip, last, optimal" in capsys.readouterr().err


def test_options_the_closed_form_ignores_are_refused(dumps, tmp_path, capsys):
    s_path, t_path, *_ = dumps
    base = ["fit", str(s_path), str(t_path), "--mapping", "0:1", "--out", str(tmp_path / "o")]
    assert cli.main(base + ["--steps", "10", "--lr", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "--steps, --lr apply to --method adam or --method sgd only" in err
    assert cli.main(base + ["--batch-size", "4"]) == 2
    assert "--batch-size applies to --method adam or --method sgd only" in \
        capsys.readouterr().err
    assert cli.main(base + ["--method", "adam", "--steps", "0"]) == 2
    assert "--steps must be" in capsys.readouterr().err
    assert cli.main(base + ["--method", "adam", "--lr", "-1"]) == 2
    assert "--lr must be" in capsys.readouterr().err
    assert cli.main(base + ["--method", "sgd", "--normalize"]) == 2
    assert "--method sgd with --normalize needs an explicit --lr" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_directory_given_as_a_dump_says_so(dumps, tmp_path, capsys):
    s_path, t_path, *_ = dumps
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "hidden.safetensors").write_bytes(b"")
    assert cli.main(["analyze", str(s_path), str(folder), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"teacher dump {folder} is a directory, not a dump file" in err
    assert "it holds hidden.safetensors" in err


def test_fit_draws_no_progress_bar_into_a_pipe(dumps, tmp_path, capsys):
    s_path, t_path, *_ = dumps
    assert cli.main(["fit", str(s_path), str(t_path), "--mapping", "0:1", "--method", "adam",
                     "--steps", "20", "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "fit (adam)" not in err and "\r" not in err and "it/s" not in err


def test_measure_cka_debiased_and_rbf_cka(dumps, tmp_path):
    from pkd.io import load_dump

    s_path, t_path, student, teacher, mask = dumps
    stats = pkd.AlignmentStats.from_dumps(load_dump(s_path), load_dump(t_path))
    debiased = stats.cka(debiased=True)
    out = tmp_path / "debiased"
    assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(out),
                     "--measure", "cka-debiased"]) == 0
    summary = _strict_json(out / "summary.json")
    np.testing.assert_allclose(summary["cka_debiased"], debiased, rtol=1e-10)
    assert summary["optimal_mapping"] == [list(p) for p in
                                          pkd.mapping.optimal(debiased, maximize=True)]
    assert "mean_cka_debiased" in summary["strategies"][0]
    out = tmp_path / "rbf"
    assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(out),
                     "--measure", "rbf-cka"]) == 0
    summary = _strict_json(out / "summary.json")
    rbf = rbf_cka_matrix(student, teacher, mask=mask)  # 203 rows: no subsample
    np.testing.assert_allclose(summary["rbf_cka"], rbf, rtol=1e-9)
    assert summary["optimal_mapping"] == [list(p) for p in
                                          pkd.mapping.optimal(rbf, maximize=True)]
    assert (out / "summary.csv").read_text().splitlines()[0].endswith(",rbf_cka")


def test_bandwidth_option(dumps, tmp_path, capsys):
    s_path, t_path, student, teacher, mask = dumps
    out = tmp_path / "wide"
    assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(out),
                     "--bandwidth", "0.5"]) == 0
    summary = _strict_json(out / "summary.json")
    assert summary["bandwidth"] == 0.5
    wide = rbf_cka_matrix(student, teacher, mask=mask, bandwidth=0.5)
    np.testing.assert_allclose(summary["rbf_cka"], wide, rtol=1e-9)
    narrow = rbf_cka_matrix(student, teacher, mask=mask, bandwidth=0.2)
    assert np.abs(wide - narrow).max() > 1e-3  # the option changes the numbers
    capsys.readouterr()
    for bad in ("0", "-1", "nan"):
        assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(tmp_path / "x"),
                         "--bandwidth", bad]) == 2
        assert "--bandwidth" in capsys.readouterr().err
    assert cli.main(["fit", str(s_path), str(t_path), "--out", str(tmp_path / "x"),
                     "--mapping", "optimal", "--measure", "cka", "--bandwidth", "0.5"]) == 2
    assert "--bandwidth applies to --measure rbf-cka only" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_constant_student_layer_on_the_default_measure(dumps, tmp_path, capsys):
    _, t_path, student, _, mask = dumps
    student = [a.copy() for a in student]
    student[1][:] = 0.25  # no variance: no RBF bandwidth, no CKA
    s_path = tmp_path / "s.safetensors"
    save_dump(s_path, student, attention_mask=mask)
    out = tmp_path / "o"
    assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "student layer(s) [1] is constant over the 203 rows used" in captured.err
    assert "RBF CKA:" not in captured.err  # said once, not again by the RBF pass
    assert "Traceback" not in captured.err
    summary = _strict_json(out / "summary.json")
    assert summary["rbf_cka"][1] == [None] * 6
    assert None not in summary["rbf_cka"][0] and None not in summary["rbf_cka"][2]
    assert summary["optimal_mapping"] is None  # never chosen through NaN
    assert "student layer(s) [1] are constant" in summary["no_optimal_mapping"]
    assert any("student layer(s) [1]" in w for w in summary["warnings"])
    for command in (["analyze"], ["fit"]):
        assert cli.main([*command, str(s_path), str(t_path), "--out", str(tmp_path / "x"),
                         "--mapping", "optimal"]) == 2
        err = capsys.readouterr().err
        assert "no optimal mapping: student layer(s) [1] are constant" in err
        assert "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_mostly_identical_rows_name_the_layer_in_the_dumps(tmp_path, capsys):
    rng = np.random.default_rng(6)
    student = [rng.standard_normal((100, 6)).astype(np.float32) for _ in range(3)]
    teacher = [rng.standard_normal((100, 10)).astype(np.float32) for _ in range(4)]
    student[0][:] = 1.0  # constant: left out of the RBF matrix, so the list indices shift
    student[2][:80] = student[2][0]  # not constant, but the median distance is 0
    s_path, t_path = tmp_path / "s.npz", tmp_path / "t.npz"
    save_dump(s_path, student)
    save_dump(t_path, teacher)
    assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--measure rbf-cka: student layer 2 (shape (100, 6))" in err
    assert "median squared distance between rows is 0" in err and "Traceback" not in err


def test_layer_constant_on_the_rbf_subsample_only(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("pkd.cka.DEFAULT_MAX_ROWS", 64)
    index = _cli_measures._sample_rows(None, 300, 64)
    rng = np.random.default_rng(4)
    student = [rng.standard_normal((300, 6)).astype(np.float32) for _ in range(2)]
    teacher = [rng.standard_normal((300, 10)).astype(np.float32) for _ in range(3)]
    outside = np.setdiff1d(np.arange(300), index)[0]
    teacher[2][:] = 1.0
    teacher[2][outside] = 2.0  # varies over all rows, not over the subsample
    s_path, t_path = tmp_path / "s.npz", tmp_path / "t.npz"
    save_dump(s_path, student)
    save_dump(t_path, teacher)
    out = tmp_path / "o"
    assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "RBF CKA: teacher layer(s) [2] is constant over the 64 rows it uses" in err
    summary = _strict_json(out / "summary.json")
    assert [row[2] for row in summary["rbf_cka"]] == [None, None]
    want = rbf_cka_matrix([a[index] for a in student], [a[index] for a in teacher[:2]])
    got = np.array([row[:2] for row in summary["rbf_cka"]], dtype=float)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert all(t != 2 for _, t in summary["optimal_mapping"])


def test_rbf_cka_reads_a_reproducible_subsample(tmp_path, monkeypatch):
    s_path, t_path = _hf_like_dumps(tmp_path, n_s=2, n_t=3, rows=300)
    monkeypatch.setattr("pkd.cka.DEFAULT_MAX_ROWS", 64)
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(out),
                         "--measure", "rbf-cka", "--chunk-rows", "7"]) == 0
    first, second = (_strict_json(out / "summary.json")["rbf_cka"] for out in outs)
    assert first == second  # the same rows every run

    from pkd.io import load_dump

    index = _cli_measures._sample_rows(None, 300, 64)
    assert index.size == 64 and np.all(np.diff(index) > 0)
    s, t = load_dump(s_path), load_dump(t_path)
    want = rbf_cka_matrix([np.asarray(x)[index] for x in s.layers],
                          [np.asarray(x)[index] for x in t.layers])
    np.testing.assert_allclose(first, want, rtol=1e-12)


def _few_rows(tmp_path, t1_noise, rows=60, seed=21):
    """2-D dumps of ``rows`` rows, width 8 (≤ 10 × width): teacher 1 = teacher 0 + noise."""
    rng = np.random.default_rng(seed)
    student = rng.standard_normal((rows, 8)).astype(np.float32)
    t0 = (student @ rng.standard_normal((8, 6)) + rng.standard_normal((rows, 6))).astype(
        np.float32)
    t1 = (t0 + t1_noise * rng.standard_normal((rows, 6))).astype(np.float32)
    s_path, t_path = tmp_path / "s.safetensors", tmp_path / "t.safetensors"
    save_dump(s_path, [student], metadata={"embeddings_index": "none"})
    save_dump(t_path, [t0, t1], metadata={"embeddings_index": "none"})
    return s_path, t_path


def test_few_rows_report_heldout_estimates_and_warn(tmp_path, capsys):
    from pkd.io import load_dump

    s_path, t_path = _few_rows(tmp_path, t1_noise=3.0)
    out = tmp_path / "o"
    assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "60 rows for a student width of 8 (≤ 10 × width)" in captured.err
    assert "held-out estimates are reported beside them" in captured.err
    summary = _strict_json(out / "summary.json")
    assert any("(≤ 10 × width)" in w for w in summary["warnings"])
    stats = pkd.AlignmentStats.from_dumps(load_dump(s_path), load_dump(t_path), folds=5)
    want = stats.relative_min_mse(heldout=True)
    np.testing.assert_allclose(summary["heldout_relative_min_mse"], want.mean, rtol=1e-10)
    np.testing.assert_allclose(summary["heldout_relative_min_mse_std"], want.std, rtol=1e-10)
    heldout = summary["heldout"]
    assert heldout["folds"] == 5 and heldout["reason"].startswith("rows (60) <= 10")
    # A clear winner: teacher layer 0 is what the student predicts; layer 1 is mostly noise.
    assert heldout["optimal_mapping"] == [[0, 0]] and heldout["runner_up"] == [[0, 1]]
    assert heldout["gap"] > heldout["fold_spread"] and heldout["near_tie"] is False
    assert "near-tie" not in captured.err
    assert "held-out (5 folds): optimal 0:0, runner-up 0:1" in captured.out
    assert "heldout_relative_min_mse" in (out / "summary.csv").read_text().splitlines()[0]
    assert "mean held-out" in captured.out


def test_a_near_tie_is_not_a_choice(tmp_path, capsys):
    s_path, t_path = _few_rows(tmp_path, t1_noise=1e-3)  # two teacher layers alike
    out = tmp_path / "o"
    assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(out),
                     "--measure", "heldout", "--folds", "4"]) == 0
    captured = capsys.readouterr()
    assert "a near-tie is not a choice" in captured.err
    summary = _strict_json(out / "summary.json")
    heldout = summary["heldout"]
    assert heldout["folds"] == 4 and heldout["reason"] == "asked for"
    assert heldout["near_tie"] is True and 0 <= heldout["gap"] < heldout["fold_spread"]
    assert summary["optimal_mapping"] == heldout["optimal_mapping"]  # the measure is heldout
    assert any("near-tie" in w for w in summary["warnings"])


def test_heldout_on_request_with_many_rows(dumps, tmp_path, capsys):
    s_path, t_path, *_ = dumps
    out = tmp_path / "o"
    assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(out),
                     "--heldout"]) == 0
    assert "≤ 10 × width" not in capsys.readouterr().err  # 203 rows > 80: no warning
    summary = _strict_json(out / "summary.json")
    assert summary["heldout"]["reason"] == "asked for"
    assert not any("10 × width" in w for w in summary["warnings"])
    assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(tmp_path / "x"),
                     "--heldout", "--folds", "1"]) == 2
    assert "--folds must be >= 2" in capsys.readouterr().err


def test_dumps_from_pkd_dump_carry_their_conventions(hf_models, texts_file, tmp_path, capsys):
    """pkd dump → pkd analyze: embeddings and mask from the dumps, said, no assumption noted."""
    paths = {}
    for role in ("student", "teacher"):
        paths[role] = tmp_path / f"{role}.safetensors"
        assert cli.main(["dump", str(hf_models[role]), "--texts", str(texts_file), "--out",
                         str(paths[role])]) == 0
    capsys.readouterr()
    out = tmp_path / "o"
    assert cli.main(["analyze", str(paths["student"]), str(paths["teacher"]), "--out", str(out),
                     "--mapping", "skip"]) == 0
    captured = capsys.readouterr()
    assert "no embeddings_index" not in captured.err and "padding included" not in captured.err
    assert "embeddings: student index 0, teacher index 0" in captured.out
    summary = _strict_json(out / "summary.json")
    # 2 and 4 transformer layers: PKD-Skip maps student layer 1 to teacher layer 2.
    assert _strategies(out)["skip"] == [(1, 2)] and summary["chosen_mapping"] == "skip"
    assert summary["mask"].startswith("'attention_mask' of ") and "(identical)" in summary["mask"]


def test_scheduler_path_gives_the_local_numbers(tmp_path, capsys):
    """--scheduler streams through from_dumps_dask: the same mask, folds and matrices."""
    pytest.importorskip("dask")
    s_path, t_path = _few_rows(tmp_path, t1_noise=3.0)
    outs = {"local": [], "dask": ["--scheduler", "synchronous"]}
    summaries = {}
    for name, extra in outs.items():
        out = tmp_path / name
        assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(out)] + extra) == 0
        summaries[name] = _strict_json(out / "summary.json")
    local, dask = summaries["local"], summaries["dask"]
    assert dask["heldout"]["folds"] == 5 and dask["rows"] == local["rows"] == 60
    for key in ("cka", "relative_min_mse", "heldout_relative_min_mse"):
        np.testing.assert_allclose(dask[key], local[key], rtol=1e-9)
    assert dask["optimal_mapping"] == local["optimal_mapping"]


def test_rbf_cka_on_enough_rows_for_the_parallel_kernels(tmp_path):
    """600 rows: past the RBF passes' parallel threshold, the path real dumps take."""

    from pkd.io import load_dump

    s_path, t_path = _hf_like_dumps(tmp_path, n_s=2, n_t=3, rows=600)
    out = tmp_path / "o"
    assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(out),
                     "--measure", "rbf-cka"]) == 0
    s, t = load_dump(s_path), load_dump(t_path)
    want = rbf_cka_matrix([np.asarray(x) for x in s.layers], [np.asarray(x) for x in t.layers])
    np.testing.assert_allclose(_strict_json(out / "summary.json")["rbf_cka"], want, rtol=1e-9)


def test_fit_errors_use_the_cli_spelling(dumps, tmp_path, capsys):
    s_path, t_path, student, teacher, mask = dumps
    zero = tmp_path / "zero.safetensors"
    save_dump(zero, [np.zeros_like(a) for a in student], attention_mask=mask)
    out = tmp_path / "o"
    assert cli.main(["fit", str(zero), str(t_path), "--mapping", "0:0", "--method", "sgd",
                     "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--method closed_form returns the minimum-norm projection" in err
    assert "an explicit --lr or --ridge > 0" in err and "method=" not in err
    assert cli.main(["fit", str(s_path), str(t_path), "--mapping", "0:1,0:1", "--per-pair",
                     "--out", str(out)]) == 2
    assert "--per-pair fits one projection per pair, but --mapping 0:1,0:1 repeats 0:1" in \
        capsys.readouterr().err
    assert not out.exists()
