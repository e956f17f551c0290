"""Tests of the embedded demo: the MLP's hand-written backward pass, Adam, the data
split, the training protocol, and ``run_demo`` / ``pkd demo --quick`` end to end."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import reference
from pkd.demo import run_demo
from pkd.demo.data import load_split
from pkd.demo.experiment import (
    METHODS,
    Settings,
    TeacherOutputs,
    batch_schedule,
    run_seed,
    train_student,
)
from pkd.demo.mlp import PARAM_NAMES, Adam, ResidualMLP
from pkd.distillation import ProgressiveDistillation, xavier_uniform
from pkd.objective import PKDObjective

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ("alignment.png", "cka.png", "layer_losses.png", "spectra.png", "accuracy.png")


def _random_mlp(seed=0, n_in=5, width=6, n_blocks=3, n_classes=4) -> ResidualMLP:
    """A float64 MLP with every parameter random (biases too), so no ReLU sits at a kink."""
    model = ResidualMLP(n_in, width, n_blocks, n_classes, seed=seed, dtype=np.float64)
    rng = np.random.default_rng(seed + 100)
    for value in model.params.values():
        value[...] = rng.standard_normal(value.shape) * 0.5
    return model


_finite_difference = reference.finite_difference


# --------------------------------------------------------------------------- the MLP


def test_backward_matches_finite_differences():
    """L = Σ z·R + Σ_l Σ h_l·Q_l (Q_1 absent): ∂L/∂z = R, ∂L/∂h_l = Q_l."""
    model = _random_mlp()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((7, model.n_in))
    R = rng.standard_normal((7, model.n_classes))
    Q = [rng.standard_normal((7, model.width)), None, rng.standard_normal((7, model.width))]

    def loss():
        logits, hidden, _ = model.forward(x)
        total = float((logits * R).sum())
        return total + sum(float((h * q).sum()) for h, q in zip(hidden, Q, strict=True)
                           if q is not None)

    _, _, cache = model.forward(x)
    grads = model.backward(cache, R, Q)
    assert sorted(grads) == sorted(PARAM_NAMES)
    for name in PARAM_NAMES:
        expected = _finite_difference(loss, model.params[name])
        assert grads[name].shape == model.params[name].shape
        np.testing.assert_allclose(grads[name], expected, rtol=1e-6, atol=1e-8, err_msg=name)


def test_backward_without_hidden_gradients_is_the_logit_path_only():
    model = _random_mlp(seed=3)
    x = np.random.default_rng(4).standard_normal((5, model.n_in))
    R = np.random.default_rng(5).standard_normal((5, model.n_classes))
    _, _, cache = model.forward(x)
    plain = model.backward(cache, R)
    with_nones = model.backward(cache, R, [None] * model.n_blocks)
    for name in PARAM_NAMES:
        np.testing.assert_array_equal(plain[name], with_nones[name])


def test_backward_through_the_pkd_objective_matches_finite_differences():
    """The demo's training step: PKD objective → grad_logits, grad_student, grad_projection,
    through the hand-written backward pass, against finite differences of the total loss."""
    student = _random_mlp(seed=6, n_in=5, width=4, n_blocks=3, n_classes=3)
    teacher = _random_mlp(seed=7, n_in=5, width=6, n_blocks=5, n_classes=3)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((9, 5))
    labels = rng.integers(0, 3, size=9)
    teacher_logits, teacher_hidden, _ = teacher.forward(x)
    for normalize in (False, True):
        hidden = ProgressiveDistillation([(0, 1), (1, 4)], hidden_weight=0.8,
                                         normalize=normalize,
                                         projection=xavier_uniform(4, 6, seed=9,
                                                                   dtype=np.float64))
        objective = PKDObjective(alpha=0.6, temperature=3.0, hidden=hidden)

        def loss(objective=objective):
            logits, student_hidden, _ = student.forward(x)
            return objective.loss_and_grad(logits, teacher_logits, labels, student_hidden,
                                           teacher_hidden).loss

        logits, student_hidden, cache = student.forward(x)
        result = objective.loss_and_grad(logits, teacher_logits, labels, student_hidden,
                                         teacher_hidden)
        assert result.grad_student[2] is None  # student layer 2 is not mapped
        grads = student.backward(cache, result.grad_logits, result.grad_student)
        for name in PARAM_NAMES:
            np.testing.assert_allclose(grads[name], _finite_difference(loss, student.params[name]),
                                       rtol=1e-5, atol=1e-8, err_msg=f"{name}, {normalize=}")
        np.testing.assert_allclose(result.grad_projection,
                                   _finite_difference(loss, hidden.projection),
                                   rtol=1e-5, atol=1e-8)


def test_backward_rejects_a_wrong_number_of_hidden_gradients():
    model = _random_mlp()
    _, _, cache = model.forward(np.zeros((2, model.n_in)))
    with pytest.raises(ValueError, match="grad_hidden has 2 entries but the network has 3"):
        model.backward(cache, np.zeros((2, model.n_classes)), [None, None])


def test_forward_shapes_dtype_and_copy():
    model = ResidualMLP(64, 16, 4, 10, seed=0, dtype=np.float32)
    logits, hidden, _ = model.forward(np.ones((3, 64)))
    assert logits.shape == (3, 10) and logits.dtype == np.float32
    assert [h.shape for h in hidden] == [(3, 16)] * 4
    clone = model.copy()
    clone.params["A"][0, 0, 0] += 1.0
    assert clone.params["A"][0, 0, 0] != model.params["A"][0, 0, 0]


def test_adam_matches_the_textbook_update():
    rng = np.random.default_rng(0)
    theta = rng.standard_normal(5)
    reference = theta.copy()
    m = np.zeros(5)
    v = np.zeros(5)
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    optimiser = Adam({"w": theta}, lr=lr, beta1=b1, beta2=b2, eps=eps)
    for t in range(1, 6):
        grad = rng.standard_normal(5)
        optimiser.step({"w": grad})
        m = b1 * m + (1 - b1) * grad
        v = b2 * v + (1 - b2) * grad ** 2
        reference -= lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
        np.testing.assert_allclose(theta, reference, rtol=1e-12, atol=1e-15)


def test_adam_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    theta = rng.standard_normal((3, 4))
    param = torch.nn.Parameter(torch.tensor(theta.copy()))
    ours = Adam({"w": theta}, lr=0.05)
    theirs = torch.optim.Adam([param], lr=0.05)
    for _ in range(4):
        grad = rng.standard_normal((3, 4))
        ours.step({"w": grad})
        param.grad = torch.tensor(grad)
        theirs.step()
    np.testing.assert_allclose(theta, param.detach().numpy(), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- data and protocol


def test_split_is_stratified_disjoint_seeded_and_standardised_on_train():
    pytest.importorskip("sklearn")
    a, b, c = load_split(0), load_split(0), load_split(1)
    assert len(a.y_train) + len(a.y_test) == 1797
    assert a.x_train.shape[1] == 64 and a.n_classes == 10
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert not np.array_equal(a.x_test, c.x_test)
    # Stratified: every class is ~20% held out.
    for label in range(10):
        share = (a.y_test == label).sum() / ((a.y_test == label).sum()
                                            + (a.y_train == label).sum())
        assert abs(share - 0.2) < 0.01
    # No test image is also a training image (the data has no duplicates across the split
    # by construction: rows are partitioned).
    train_rows = {row.tobytes() for row in a.x_train}
    assert sum(row.tobytes() in train_rows for row in a.x_test) <= 2  # rare identical images
    np.testing.assert_allclose(a.x_train.mean(axis=0), 0.0, atol=1e-12)


def test_batch_schedule_covers_each_epoch_without_replacement():
    schedule = batch_schedule(10, 3, 7, np.random.default_rng(0))
    assert schedule.shape == (7, 3)
    per_epoch = 3  # 10 // 3 full batches
    for epoch in range(2):
        rows = schedule[epoch * per_epoch:(epoch + 1) * per_epoch].ravel()
        assert len(set(rows.tolist())) == rows.size  # no repeats within an epoch


def _tiny_setup(**overrides):
    settings = Settings(teacher_width=8, teacher_blocks=5, student_width=4, student_blocks=3,
                        batch_size=16, student_steps=12, dtype="float64", **overrides)
    rng = np.random.default_rng(0)

    class Data:  # a stand-in with the Digits attributes train_student uses
        x_train = rng.standard_normal((64, 6))
        y_train = rng.integers(0, 3, 64)
        x_test = rng.standard_normal((20, 6))
        y_test = rng.integers(0, 3, 20)
        n_features, n_classes = 6, 3

    teacher = ResidualMLP(6, 8, 5, 3, seed=1)
    return settings, Data, TeacherOutputs.of(teacher, Data.x_train)


def test_pkd_with_zero_hidden_weight_reproduces_logit_kd_exactly():
    """The runs of a seed share init, batches and optimiser: only the loss differs."""
    settings, data, teacher = _tiny_setup(hidden_weight=0.0)
    init = ResidualMLP(6, 4, 3, 3, seed=2)
    projection = xavier_uniform(4, 8, seed=3, dtype=np.float64)
    schedule = batch_schedule(64, 16, 12, np.random.default_rng(4))
    kd = train_student("kd", data, teacher, init, projection, schedule, settings)
    pkd = train_student("pkd_skip", data, teacher, init, projection, schedule, settings,
                        layer_mapping=[(0, 1), (1, 3)])
    for name in PARAM_NAMES:
        np.testing.assert_array_equal(kd.model.params[name], pkd.model.params[name])
    assert pkd.history.shape == (12, 2) and np.all(pkd.history > 0)
    np.testing.assert_array_equal(pkd.initial_projection, projection)  # never modified
    assert init.params["A"] is not kd.model.params["A"]


def test_pkd_runs_train_their_own_copy_of_the_common_init():
    """Every PKD run starts from the same Xavier init: the caller's array is never trained."""
    settings, data, teacher = _tiny_setup(hidden_weight=1.0)
    init = ResidualMLP(6, 4, 3, 3, seed=2)
    projection = xavier_uniform(4, 8, seed=3, dtype=np.float64)
    common = projection.copy()
    schedule = batch_schedule(64, 16, 12, np.random.default_rng(4))
    runs = [train_student(method, data, teacher, init, projection, schedule, settings,
                          layer_mapping=mapping)
            for method, mapping in (("pkd_skip", [(0, 1), (1, 3)]),
                                    ("pkd_last", [(0, 2), (1, 3)]))]
    np.testing.assert_array_equal(projection, common)  # the caller's init, untouched
    for run in runs:
        np.testing.assert_array_equal(run.initial_projection, common)
        assert not np.allclose(run.projection, common)  # trained (hidden_weight > 0)
    assert not np.array_equal(runs[0].projection, runs[1].projection)


def test_run_seed_is_deterministic_and_trains_every_method():
    settings, data, teacher = _tiny_setup()
    first = run_seed(0, np.random.SeedSequence(7), data, teacher, settings)
    again = run_seed(0, np.random.SeedSequence(7), data, teacher, settings)
    assert tuple(first.runs) == METHODS
    for method in METHODS:
        assert first.runs[method].accuracy == again.runs[method].accuracy
        for name in PARAM_NAMES:
            np.testing.assert_array_equal(first.runs[method].model.params[name],
                                          again.runs[method].model.params[name])
    assert first.relative_min_mse.shape == (3, 5) and first.cka.shape == (3, 5)
    assert [s for s, _ in first.optimal_mapping] == [0, 1]
    teachers = [t for _, t in first.optimal_mapping]
    assert teachers == sorted(set(teachers))
    assert first.runs["pkd_optimal"].mapping == first.optimal_mapping


def test_train_student_rejects_an_unknown_method_and_a_missing_mapping():
    settings, data, teacher = _tiny_setup()
    init = ResidualMLP(6, 4, 3, 3, seed=2)
    projection = xavier_uniform(4, 8, seed=3, dtype=np.float64)
    schedule = batch_schedule(64, 16, 2, np.random.default_rng(4))
    with pytest.raises(ValueError, match="method must be one of"):
        train_student("pkd", data, teacher, init, projection, schedule, settings)
    with pytest.raises(ValueError, match="needs a layer_mapping"):
        train_student("pkd_last", data, teacher, init, projection, schedule, settings)


# --------------------------------------------------------------------------- end to end


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _check_outputs(out: Path, summary: dict | None = None) -> dict:
    for name in FIGURES:
        width, height = _png_size(out / name)
        assert 500 <= width <= 3000 and 300 <= height <= 2000, (name, width, height)
    loaded = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    for key in ("teacher_accuracy", "methods", "mapping", "settings", "timing_s"):
        assert key in loaded
    assert set(loaded["methods"]) == set(METHODS)
    n_seeds = loaded["settings"]["n_seeds"]
    for row in loaded["methods"].values():
        assert len(row["accuracies"]) == n_seeds
        assert row["mean"] == pytest.approx(np.mean(row["accuracies"]))
        assert row["std"] == pytest.approx(np.std(row["accuracies"], ddof=1))
        assert all(0 <= a <= 100 for a in row["accuracies"])
    for key in ("skip", "last", "optimal", "uniform"):
        assert all(len(p) == 2 for p in loaded["mapping"][key])
    assert loaded["mapping"]["skip"] == [[0, 2], [1, 5], [2, 8]]
    assert loaded["mapping"]["last"] == [[0, 8], [1, 9], [2, 10]]
    for key in ("alpha", "temperature", "hidden_weight", "student_steps", "teacher_steps",
                "student_seeds", "teacher_width", "student_width"):
        assert key in loaded["settings"]
    assert loaded["timing_s"]["total"] > 0
    markdown = (out / "summary.md").read_text(encoding="utf-8")
    assert "| PKD-Skip |" in markdown and "logit KD" in markdown
    if summary is not None:
        assert json.loads(json.dumps(summary)) == loaded
    return loaded


def test_run_demo_quick_writes_every_file(tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "new" / "demo"  # created, parents too
    summary = run_demo(out, seed=0, quick=True)
    loaded = _check_outputs(out, summary)
    assert loaded["settings"]["quick"] is True and loaded["settings"]["n_seeds"] >= 2
    assert loaded["teacher_accuracy"] > 80  # a real, trained teacher even in --quick
    printed = capsys.readouterr().out
    assert "PKD-optimal" in printed and str(out / "accuracy.png") in printed
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_cli_demo_quick(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "cli-demo"
    proc = subprocess.run([sys.executable, "-m", "pkd.cli", "demo", "--quick", "--seed", "3",
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    loaded = _check_outputs(out)
    assert loaded["settings"]["seed"] == 3
    assert "logit KD" in proc.stdout and "teacher" in proc.stdout


def test_cli_demo_refuses_an_output_under_a_file(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = subprocess.run([sys.executable, "-m", "pkd.cli", "demo", "--quick", "--out",
                           str(blocker / "out")], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    assert proc.returncode == 2
    assert "pkd demo: error:" in proc.stderr and "output directory" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("make_bad", ["under_file", "is_file"])
def test_run_demo_refuses_a_bad_out_before_training(tmp_path, make_bad):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker / "out" if make_bad == "under_file" else blocker
    with pytest.raises(ValueError, match="directory"):
        run_demo(out, quick=True)


def test_a_failed_demo_leaves_no_directory(tmp_path, monkeypatch):
    import pkd.demo.data

    def broken(*args, **kwargs):
        raise OSError("no data")

    monkeypatch.setattr(pkd.demo.data, "load_split", broken)
    with pytest.raises(OSError, match="no data"):
        run_demo(tmp_path / "new" / "out", quick=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root can write to any directory")
def test_run_demo_refuses_a_read_only_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="not writable"):
            run_demo(locked, quick=True)
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize(("seed", "error"), [(-1, ValueError), (1.5, TypeError),
                                             (True, TypeError)])
def test_run_demo_refuses_a_bad_seed(tmp_path, seed, error):
    with pytest.raises(error, match="seed"):
        run_demo(tmp_path, seed=seed, quick=True)


def test_run_demo_refuses_a_non_bool_quick(tmp_path):
    with pytest.raises(TypeError, match="quick"):
        run_demo(tmp_path, quick="yes")


def test_importing_the_demo_imports_neither_matplotlib_nor_sklearn():
    code = ("import sys, pkd.demo; "
            "print(sorted(m for m in ('matplotlib', 'sklearn') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# --------------------------------------------------------------------------- the report


def _fake_summary(kd_runs, pkd_runs, quick=False):
    from pkd.demo.report import PKD_METHODS, _paired

    class Run:
        def __init__(self, accuracy):
            self.accuracy = accuracy

    class Outcome:
        def __init__(self, k):
            self.runs = {"ce": Run(95.0), "kd": Run(kd_runs[k])}
            self.runs.update({m: Run(pkd_runs[k]) for m in PKD_METHODS})

    outcomes = [Outcome(k) for k in range(len(kd_runs))]
    methods = {m: {"label": m, "accuracies": [o.runs[m].accuracy for o in outcomes],
                   "mean": float(np.mean([o.runs[m].accuracy for o in outcomes])),
                   "std": 0.1} for m in METHODS}
    return {
        "teacher_accuracy": 97.0, "methods": methods,
        "paired_vs_kd": {m: _paired(outcomes, m, "kd") for m in PKD_METHODS},
        "settings": {"n_test": 359, "quick": quick},
        "mapping": {"optimal": [[0, 0], [1, 5], [2, 9]]},
        "alignment_seed0": {"relative_min_mse": [[0.1, 0.2], [0.3, 0.4]]},
    }


@pytest.mark.parametrize(("pkd_runs", "expected"), [
    ([96.0, 96.3, 96.1], "within the seed-to-seed noise"),
    ([98.0, 98.3, 98.1], "a gain larger than the spread"),
    ([93.0, 93.3, 93.1], "PKD hurts here"),
])
def test_interpretation_says_what_the_numbers_show(pkd_runs, expected):
    from pkd.demo.report import interpretation

    text = interpretation(_fake_summary([96.0, 96.2, 96.1], pkd_runs))
    assert expected in text
    assert "--quick" not in text


def test_interpretation_counts_seeds_and_flags_quick_runs():
    from pkd.demo.report import interpretation

    text = interpretation(_fake_summary([96.0, 96.2, 96.1], [96.0, 96.5, 95.9], quick=True))
    assert "better on 1, tied on 1, worse on 1 of 3 seeds" in text
    assert "--quick run" in text


@pytest.mark.parametrize(("ce", "expected", "absent"), [
    (96.9, "already matches the 97.00% teacher to within one", "beat the teacher"),
    (99.5, "CE-only students beat the teacher on average", "to within one"),
    (90.0, None, "to within one"),
])
def test_interpretation_compares_ce_with_the_teacher_both_ways(ce, expected, absent):
    from pkd.demo.report import interpretation

    summary = _fake_summary([96.0, 96.2, 96.1], [96.0, 96.3, 96.1])
    summary["methods"]["ce"]["mean"] = ce
    text = interpretation(summary)
    assert expected is None or expected in text
    assert absent not in text


def test_write_outputs_writes_all_files_or_none(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from pkd.demo import report

    summary = _fake_summary([96.0, 96.2, 96.1], [96.0, 96.3, 96.1])
    (tmp_path / "summary.json").write_text("old")

    def broken(summary):
        raise OSError("disk full")

    monkeypatch.setattr(report, "summary_markdown", broken)
    with pytest.raises(OSError, match="disk full"):
        report.write_outputs(tmp_path, {"a.png": Figure(), "b.png": Figure()}, summary)
    assert sorted(os.listdir(tmp_path)) == ["summary.json"]  # no new figure, no temporary
    assert (tmp_path / "summary.json").read_text() == "old"  # not a mix of two runs
    monkeypatch.setattr(report, "summary_markdown", lambda summary: "# ok\n")
    report.write_outputs(tmp_path, {"a.png": Figure(), "b.png": Figure()}, summary)
    assert sorted(os.listdir(tmp_path)) == ["a.png", "b.png", "summary.json", "summary.md"]
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


def test_windowed_means_blocks_of_steps():
    from pkd.demo.report import windowed

    history = np.arange(20, dtype=float).reshape(10, 2)
    steps, blocks = windowed(history, 5)
    np.testing.assert_array_equal(steps, [5, 10])
    np.testing.assert_allclose(blocks, [[4.0, 5.0], [14.0, 15.0]])
    steps, blocks = windowed(history[:3], 5)  # fewer steps than a window: one block
    np.testing.assert_array_equal(steps, [3])
    np.testing.assert_allclose(blocks, [[2.0, 3.0]])
