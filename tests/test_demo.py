"""Tests of the embedded demo: the MLP's hand-written backward pass, Adam, the data
split, the training protocol, and ``run_demo`` / ``pkd demo --quick`` end to end."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import reference
from pkd import mapping as mappings
from pkd.demo import run_demo
from pkd.demo.data import labelled_subset, load_split
from pkd.demo.experiment import (
    METHODS,
    SeedMaterial,
    Settings,
    TeacherOutputs,
    batch_schedule,
    run_seed,
    seed_material,
    train_student,
)
from pkd.demo.mlp import PARAM_NAMES, Adam, ResidualMLP
from pkd.distillation import ProgressiveDistillation, xavier_uniform
from pkd.objective import PKDObjective

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ("alignment.png", "cka.png", "layer_losses.png", "spectra.png", "accuracy.png",
           "fraction.png")


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
    assert len(a.y_train) + len(a.y_val) + len(a.y_test) == 1797
    assert a.x_train.shape[1] == 64 and a.n_classes == 10
    np.testing.assert_array_equal(a.x_test, b.x_test)
    np.testing.assert_array_equal(a.x_val, b.x_val)
    assert not np.array_equal(a.x_test, c.x_test)
    # Stratified: every class is ~20% test, and ~20% of the rest is validation.
    for label in range(10):
        n_test, n_val, n_train = ((y == label).sum() for y in (a.y_test, a.y_val, a.y_train))
        assert abs(n_test / (n_test + n_val + n_train) - 0.2) < 0.01
        assert abs(n_val / (n_val + n_train) - 0.2) < 0.01
    # Rows are partitioned: a training image is neither a validation nor a test image
    # (up to the rare identical images of the data set).
    train_rows = {row.tobytes() for row in a.x_train}
    for held_out in (a.x_val, a.x_test):
        assert sum(row.tobytes() in train_rows for row in held_out) <= 2
    np.testing.assert_allclose(a.x_train.mean(axis=0), 0.0, atol=1e-12)
    assert abs(a.x_val.mean()) > 1e-6  # standardised with the training statistics only


def test_labelled_subset_is_stratified_nested_and_seeded():
    y = np.repeat(np.arange(4), [50, 30, 20, 3])
    small = labelled_subset(y, 0.1, 7)
    large = labelled_subset(y, 0.5, 7)
    assert np.array_equal(small, np.unique(small))  # sorted, no repeats
    assert [int((y[small] == c).sum()) for c in range(4)] == [5, 3, 2, 1]  # >= 1 per class
    assert [int((y[large] == c).sum()) for c in range(4)] == [25, 15, 10, 2]
    assert set(small.tolist()) <= set(large.tolist())  # nested: larger fractions add labels
    np.testing.assert_array_equal(labelled_subset(y, 0.1, 7), small)
    assert not np.array_equal(labelled_subset(y, 0.1, 8), small)
    np.testing.assert_array_equal(labelled_subset(y, 1.0, 7), np.arange(y.size))
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction must be in"):
            labelled_subset(y, bad, 0)


def test_batch_schedule_covers_each_epoch_without_replacement():
    schedule = batch_schedule(10, 3, 7, np.random.default_rng(0))
    assert schedule.shape == (7, 3)
    per_epoch = 3  # 10 // 3 full batches
    for epoch in range(2):
        rows = schedule[epoch * per_epoch:(epoch + 1) * per_epoch].ravel()
        assert len(set(rows.tolist())) == rows.size  # no repeats within an epoch
    small = batch_schedule(5, 8, 3, np.random.default_rng(0))  # batch above the set: cut
    assert small.shape == (3, 5)
    assert all(sorted(row.tolist()) == list(range(5)) for row in small)


def _tiny_setup(**overrides):
    settings = Settings(teacher_width=8, teacher_blocks=5, student_width=4, student_blocks=3,
                        batch_size=16, labelled_batch_size=8, student_steps=12,
                        labelled_fraction=0.25, dtype="float64", **overrides)
    rng = np.random.default_rng(0)

    class Data:  # a stand-in with the Digits attributes the student runs use
        x_train = rng.standard_normal((64, 6))
        y_train = rng.integers(0, 3, 64)
        x_test = rng.standard_normal((20, 6))
        y_test = rng.integers(0, 3, 20)
        n_features, n_classes = 6, 3

    teacher = ResidualMLP(6, 8, 5, 3, seed=1)
    return settings, Data, TeacherOutputs.of(teacher, Data.x_train)


def _material(settings, data, seed=7, fraction=0.25) -> SeedMaterial:
    return seed_material(np.random.SeedSequence(seed), data, settings, fraction)


def test_seed_material_shares_everything_but_the_labels_across_fractions():
    settings, data, _ = _tiny_setup()
    seed = np.random.SeedSequence(7)
    a = seed_material(seed, data, settings, 0.25)
    b = seed_material(seed, data, settings, 0.5)  # the same seed object: not advanced
    again = seed_material(seed, data, settings, 0.25)
    for name in PARAM_NAMES:
        np.testing.assert_array_equal(a.init.params[name], b.init.params[name])
    np.testing.assert_array_equal(a.projection, b.projection)
    np.testing.assert_array_equal(a.transfer_batches, b.transfer_batches)
    np.testing.assert_array_equal(a.labelled_batches, again.labelled_batches)
    assert set(a.labelled.tolist()) < set(b.labelled.tolist())
    assert np.isin(a.labelled_batches, a.labelled).all()  # labelled batches: labelled rows only
    assert a.labelled_batches.shape == (12, 8) and a.transfer_batches.shape == (12, 16)


@pytest.mark.parametrize("method", ["ce", "kd", "pkd_skip"])
def test_a_student_never_reads_the_labels_it_does_not_see(method):
    """Scrambling the labels of the unlabelled rows changes nothing, for every loss."""
    settings, data, teacher = _tiny_setup()
    material = _material(settings, data)
    evaluation = (data.x_test, data.y_test)
    mapping = [(0, 1), (1, 3)] if method == "pkd_skip" else None
    first = train_student(method, data, teacher, material, settings, evaluation,
                          layer_mapping=mapping)

    class Scrambled(data):
        y_train = data.y_train.copy()

    hidden = np.setdiff1d(np.arange(64), material.labelled)
    Scrambled.y_train[hidden] = (Scrambled.y_train[hidden] + 1) % 3
    second = train_student(method, Scrambled, teacher, material, settings, evaluation,
                           layer_mapping=mapping)
    for name in PARAM_NAMES:
        np.testing.assert_array_equal(first.model.params[name], second.model.params[name])
    # ... while the labels it does see matter.
    Scrambled.y_train[material.labelled] = (Scrambled.y_train[material.labelled] + 1) % 3
    third = train_student(method, Scrambled, teacher, material, settings, evaluation,
                          layer_mapping=mapping)
    assert not np.array_equal(first.model.params["W_out"], third.model.params["W_out"])


def test_pkd_with_zero_hidden_weight_reproduces_logit_kd_exactly():
    """The runs of a seed share init, batches and optimiser: only the loss differs."""
    settings, data, teacher = _tiny_setup(hidden_weight=0.0)
    material = _material(settings, data)
    evaluation = (data.x_test, data.y_test)
    kd = train_student("kd", data, teacher, material, settings, evaluation)
    pkd = train_student("pkd_skip", data, teacher, material, settings, evaluation,
                        layer_mapping=[(0, 1), (1, 3)])
    for name in PARAM_NAMES:
        np.testing.assert_array_equal(kd.model.params[name], pkd.model.params[name])
    assert pkd.history.shape == (12, 2) and np.all(pkd.history > 0)
    np.testing.assert_array_equal(pkd.initial_projection, material.projection)  # never modified
    assert material.init.params["A"] is not kd.model.params["A"]


def test_kd_with_alpha_zero_is_ce_on_the_labelled_rows():
    """α = 0: logit KD's loss is the CE of the labelled minibatch, CE-only's loss."""
    settings, data, teacher = _tiny_setup(alpha=0.0)
    material = _material(settings, data)
    evaluation = (data.x_test, data.y_test)
    ce = train_student("ce", data, teacher, material, settings, evaluation)
    kd = train_student("kd", data, teacher, material, settings, evaluation)
    for name in PARAM_NAMES:
        np.testing.assert_allclose(kd.model.params[name], ce.model.params[name], rtol=1e-9,
                                   atol=1e-12, err_msg=name)


def test_pkd_runs_train_their_own_copy_of_the_common_init():
    """Every PKD run starts from the same Xavier init: the caller's array is never trained."""
    settings, data, teacher = _tiny_setup(hidden_weight=1.0)
    material = _material(settings, data)
    common = material.projection.copy()
    runs = [train_student(method, data, teacher, material, settings, (data.x_test, data.y_test),
                          layer_mapping=mapping)
            for method, mapping in (("pkd_skip", [(0, 1), (1, 3)]),
                                    ("pkd_last", [(0, 2), (1, 3)]))]
    np.testing.assert_array_equal(material.projection, common)  # the caller's init, untouched
    for run in runs:
        np.testing.assert_array_equal(run.initial_projection, common)
        assert not np.allclose(run.projection, common)  # trained (hidden_weight > 0)
    assert not np.array_equal(runs[0].projection, runs[1].projection)


def test_checkpoints_record_the_evaluation_after_those_steps():
    settings, data, teacher = _tiny_setup()
    material = _material(settings, data)
    evaluation = (data.x_test, data.y_test)
    run = train_student("kd", data, teacher, material, settings, evaluation,
                        checkpoints=(4, 12))
    assert sorted(run.checkpoint_scores) == [4, 12]
    assert run.checkpoint_scores[12] == (run.accuracy, run.nll)
    short_settings = replace(settings, student_steps=4)
    short_material = _material(short_settings, data)  # the first 4 minibatches of the 12
    np.testing.assert_array_equal(short_material.transfer_batches, material.transfer_batches[:4])
    short = train_student("kd", data, teacher, short_material, short_settings, evaluation)
    assert run.checkpoint_scores[4][0] == pytest.approx(short.accuracy)


def test_run_seed_is_deterministic_and_trains_every_method():
    settings, data, teacher = _tiny_setup()
    evaluation = (data.x_test, data.y_test)
    first = run_seed(0, np.random.SeedSequence(7), data, teacher, settings, evaluation)
    again = run_seed(0, np.random.SeedSequence(7), data, teacher, settings, evaluation)
    assert tuple(first.runs) == METHODS
    for method in METHODS:
        assert first.runs[method].accuracy == again.runs[method].accuracy
        for name in PARAM_NAMES:
            np.testing.assert_array_equal(first.runs[method].model.params[name],
                                          again.runs[method].model.params[name])
    assert first.relative_min_mse.shape == (3, 5) and first.cka.shape == (3, 5)
    assert first.rbf_cka.shape == (3, 5)
    assert [s for s, _ in first.optimal_mapping] == [0, 1]
    teachers = [t for _, t in first.optimal_mapping]
    assert teachers == sorted(set(teachers))
    assert first.runs["pkd_optimal"].mapping == first.optimal_mapping
    counts = np.bincount(data.y_train, minlength=3)
    assert first.n_labelled == sum(max(1, round(0.25 * c)) for c in counts)


def test_the_optimal_mapping_maximises_the_summed_similarity_or_minimises_the_cost():
    """choose_optimal = the best of every increasing assignment, by brute force, per measure."""
    import itertools

    from pkd.cka import rbf_cka
    from pkd.demo.experiment import (
        MAPPING_MEASURE,
        RBF_BANDWIDTH,
        alignment_matrices,
        choose_optimal,
    )

    assert MAPPING_MEASURE == "rbf-cka" and RBF_BANDWIDTH == 0.2
    settings, data, teacher = _tiny_setup()
    outcome = run_seed(0, np.random.SeedSequence(3), data, teacher, settings,
                       (data.x_test, data.y_test), methods=("ce",))
    student = outcome.runs["ce"].model
    matrices = alignment_matrices(student, teacher, data.x_train)
    # The RBF matrix entry by entry from the single-pair function (an independent path).
    _, student_hidden, _ = student.forward(data.x_train)
    for s, t in [(0, 0), (1, 3), (2, 4)]:
        assert matrices["rbf-cka"][s, t] == pytest.approx(
            rbf_cka(student_hidden[s], teacher.hidden[t], bandwidth=0.2), rel=1e-9)
    for measure, pick in [("rbf-cka", max), ("cka", max), ("relative", min)]:
        m = matrices[measure]
        best = pick(itertools.combinations(range(5), 2),
                    key=lambda ts, m=m: m[0, ts[0]] + m[1, ts[1]])
        assert choose_optimal(matrices, 3, measure) == [(0, best[0]), (1, best[1])]
    assert choose_optimal(matrices, 3) == choose_optimal(matrices, 3, "rbf-cka")
    with pytest.raises(ValueError, match="measure must be one of"):
        choose_optimal(matrices, 3, "rbf")


def test_a_subset_of_methods_reproduces_the_full_runs():
    """The fraction curve reuses the main runs: a subset of methods gives the same runs."""
    settings, data, teacher = _tiny_setup()
    evaluation = (data.x_test, data.y_test)
    full = run_seed(0, np.random.SeedSequence(5), data, teacher, settings, evaluation)
    subset = run_seed(0, np.random.SeedSequence(5), data, teacher, settings, evaluation,
                      methods=("ce", "kd", "pkd_optimal"))
    assert tuple(subset.runs) == ("ce", "kd", "pkd_optimal")
    for method in subset.runs:
        for name in PARAM_NAMES:
            np.testing.assert_array_equal(full.runs[method].model.params[name],
                                          subset.runs[method].model.params[name])
    other = run_seed(0, np.random.SeedSequence(5), data, teacher, settings, evaluation,
                     fraction=0.5, methods=("kd",))
    assert tuple(other.runs) == ("kd",) and other.n_labelled > full.n_labelled
    assert not np.array_equal(other.runs["kd"].model.params["W_out"],
                              full.runs["kd"].model.params["W_out"])
    with pytest.raises(ValueError, match="methods must be among"):
        run_seed(0, np.random.SeedSequence(5), data, teacher, settings, evaluation,
                 methods=("pkd",))


def test_train_student_rejects_an_unknown_method_and_a_missing_mapping():
    settings, data, teacher = _tiny_setup()
    material = _material(settings, data)
    evaluation = (data.x_test, data.y_test)
    with pytest.raises(ValueError, match="method must be one of"):
        train_student("pkd", data, teacher, material, settings, evaluation)
    with pytest.raises(ValueError, match="needs a layer_mapping"):
        train_student("pkd_last", data, teacher, material, settings, evaluation)


# --------------------------------------------------------------------------- the selection


def test_best_candidate_is_highest_accuracy_then_lowest_nll_then_first():
    from pkd.demo.selection import _best

    assert _best([{"mean": 90.0, "nll": 0.1}, {"mean": 91.0, "nll": 0.5}]) == 1
    assert _best([{"mean": 91.0, "nll": 0.3}, {"mean": 91.0, "nll": 0.2}]) == 1
    assert _best([{"mean": 91.0, "nll": 0.2}, {"mean": 91.0, "nll": 0.2}]) == 0


def test_selection_scores_on_the_validation_split_only(monkeypatch):
    """A miniature selection: every student is scored on x_val, never x_test."""
    pytest.importorskip("sklearn")
    from pkd.demo import selection

    monkeypatch.setattr(selection, "FRACTIONS", (0.05, 0.1))
    monkeypatch.setattr(selection, "LEARNING_RATES", (1e-3,))
    monkeypatch.setattr(selection, "STEPS", (3, 6))
    monkeypatch.setattr(selection, "ALPHAS", (0.7,))
    monkeypatch.setattr(selection, "TEMPERATURES", (10.0, 2.0))
    monkeypatch.setattr(selection, "HIDDEN_WEIGHTS", (1.0, 3.0))
    seen = []
    real_run_seed = selection.run_seed

    def spy(seed_index, seed, data, teacher, settings, evaluation, **kwargs):
        seen.append((evaluation[0] is data.x_val, evaluation[0] is data.x_test))
        return real_run_seed(seed_index, seed, data, teacher, settings, evaluation, **kwargs)

    monkeypatch.setattr(selection, "run_seed", spy)
    base = Settings(teacher_steps=20, student_width=8, teacher_width=16, student_steps=6)
    record = selection.select(seed=0, n_seeds=1, base=base, progress=False)
    assert seen and all(val and not test for val, test in seen)
    assert [stage["name"] for stage in record["stages"]] == [
        "labelled fraction", "learning rate and steps", "alpha and temperature",
        "hidden weight", "PKD variant of the fraction curve"]
    chosen = record["chosen"]
    assert chosen["labelled_fraction"] in (0.05, 0.1) and chosen["student_steps"] in (3, 6)
    assert chosen["temperature"] in (10.0, 2.0) and chosen["hidden_weight"] in (1.0, 3.0)
    assert chosen["curve_method"] in ("pkd_skip", "pkd_last", "pkd_optimal")
    assert record["starting_settings"] == selection.STARTING_SETTINGS
    text = selection.selection_markdown(record)
    assert "validation" in text and "Chosen:" in text
    assert "Starting settings (before any stage chose them): lr = 0.001" in text


class _StopSelection(Exception):
    pass


def test_selection_starts_from_its_pinned_settings_not_the_demo_defaults(monkeypatch):
    """Stages 1 and 2 train with STARTING_SETTINGS whatever Settings.full()'s tuned values are."""
    pytest.importorskip("sklearn")
    from pkd.demo import selection

    # Settings.full() with every tuned value changed (and a tiny architecture and teacher).
    changed = Settings(teacher_steps=20, student_width=8, teacher_width=16, lr=0.5,
                       student_steps=7, alpha=0.1, temperature=1.5, hidden_weight=99.0,
                       labelled_fraction=0.25)
    monkeypatch.setattr(Settings, "full", classmethod(lambda cls: changed))
    calls = []
    real_run_seed = selection.run_seed

    def spy(seed_index, seed, data, teacher, settings, evaluation, **kwargs):
        calls.append((settings, kwargs))
        if kwargs.get("checkpoints"):  # stage 2's first run: enough seen
            raise _StopSelection
        return real_run_seed(seed_index, seed, data, teacher, settings, evaluation, **kwargs)

    monkeypatch.setattr(selection, "run_seed", spy)
    with pytest.raises(_StopSelection):
        selection.select(seed=0, n_seeds=1, progress=False)
    *stage1, (stage2, stage2_kwargs) = calls
    assert [kwargs["fraction"] for _, kwargs in stage1] == list(selection.FRACTIONS)
    for settings, _ in stage1:
        assert {k: getattr(settings, k) for k in selection.STARTING_SETTINGS} == \
            selection.STARTING_SETTINGS
        assert settings.student_width == 8  # the architecture still comes from Settings.full()
    # The recorded selection's start, written out: a change to it must be deliberate.
    assert selection.STARTING_SETTINGS == {"lr": 1e-3, "student_steps": 1000, "alpha": 0.7,
                                           "temperature": 10.0, "hidden_weight": 1.0}
    assert (stage2.alpha, stage2.temperature, stage2.hidden_weight) == (0.7, 10.0, 1.0)
    assert stage2.labelled_fraction in selection.FRACTIONS
    assert stage2_kwargs["checkpoints"] == selection.STEPS


def test_selection_refuses_a_start_that_is_not_settings():
    from pkd.demo import selection

    with pytest.raises(ValueError, match=r"start: \['learning_rate'\] are not fields"):
        selection.select(start={"learning_rate": 1e-3}, progress=False)


def test_the_demo_settings_are_those_the_recorded_selection_chose():
    record = json.loads((ROOT / "analysis" / "results" / "demo" / "selection"
                         / "selection.json").read_text(encoding="utf-8"))
    settings = Settings.full()
    for key, value in record["chosen"].items():
        assert getattr(settings, key) == value, key
    assert settings.labelled_fraction in settings.curve_fractions


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
                "student_seeds", "teacher_width", "student_width", "labelled_fraction", "lr",
                "n_train", "n_val", "n_test"):
        assert key in loaded["settings"]
    assert loaded["settings"]["n_train"] + loaded["settings"]["n_val"] + loaded["settings"][
        "n_test"] == 1797
    assert loaded["timing_s"]["total"] > 0
    assert set(loaded["paired_vs_kd"]) == {"pkd_skip", "pkd_last", "pkd_optimal"}
    for method, paired in loaded["paired_vs_kd"].items():
        diffs = np.subtract(loaded["methods"][method]["accuracies"],
                            loaded["methods"]["kd"]["accuracies"])
        assert paired["mean_diff"] == pytest.approx(diffs.mean())
        assert paired["seeds_better"] == int((diffs > 0).sum())
    fractions = [row["fraction"] for row in loaded["curve"]]
    assert fractions == sorted(loaded["settings"]["curve_fractions"])
    main = fractions.index(loaded["settings"]["labelled_fraction"])
    n_curve = loaded["settings"]["curve_seeds"]
    assert loaded["curve"][main]["kd"]["accuracies"] == loaded["methods"]["kd"][
        "accuracies"][:n_curve]  # the main runs, reused
    labelled = [row["n_labelled"][0] for row in loaded["curve"]]
    assert labelled == sorted(labelled)
    markdown = (out / "summary.md").read_text(encoding="utf-8")
    assert "| PKD-Skip |" in markdown and "logit KD" in markdown
    assert "labelled share" in markdown
    mapping = loaded["mapping"]
    assert mapping["optimal_measure"] == "rbf-cka"
    assert "(../layer_matching/layer_matching.md)" in markdown  # a link from results/demo/
    assert "RBF CKA with σ = 0.2" in markdown
    # The committed settings were selected with the linear-CKA mapping: the report says so.
    assert mapping["settings_selected_with"] == "cka"
    assert "were selected with PKD-optimal's mapping chosen by linear CKA" in markdown
    assert len(mapping["optimal_by_linear_cka_per_seed"]) == len(mapping["optimal_per_seed"])
    rbf = np.array(loaded["alignment_seed0"]["rbf_cka"])
    assert rbf.shape == (loaded["settings"]["student_blocks"],
                         loaded["settings"]["teacher_blocks"])
    assert mapping["optimal"] == [[s, t] for s, t in mappings.optimal(
        rbf, student_layers=range(rbf.shape[0] - 1), maximize=True)]
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
    assert printed.count("SMOKE RUN") == 2 and "mean nothing" in printed
    assert "SMOKE RUN" in (out / "summary.md").read_text(encoding="utf-8")
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
    assert "SMOKE RUN" in proc.stdout and "mean nothing" in proc.stdout
    # stderr is a pipe here: no progress bar redrawn into it.
    assert "step/s" not in proc.stderr and "s/step" not in proc.stderr, proc.stderr


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
            self.runs = {"ce": Run(90.0), "kd": Run(kd_runs[k])}
            self.runs.update({m: Run(pkd_runs[k]) for m in PKD_METHODS})

    outcomes = [Outcome(k) for k in range(len(kd_runs))]
    methods = {m: {"label": m, "accuracies": [o.runs[m].accuracy for o in outcomes],
                   "mean": float(np.mean([o.runs[m].accuracy for o in outcomes])),
                   "std": 0.1} for m in METHODS}
    return {
        "teacher_accuracy": 97.0, "teacher_val_accuracy": 97.5, "methods": methods,
        "paired_vs_kd": {m: _paired(outcomes, m, "kd") for m in PKD_METHODS},
        "kd_vs_ce": _paired(outcomes, "kd", "ce"),
        "n_labelled_per_seed": [116] * len(kd_runs),
        "settings": {"n_test": 359, "n_train": 1151, "quick": quick,
                     "labelled_fraction": 0.1},
        "mapping": {"optimal": [[0, 0], [1, 5], [2, 9]], "optimal_measure": "cka"},
        "curve": [
            {"fraction": 0.02, "ce": {"mean": 60.0}, "kd": {"mean": 95.0}},
            {"fraction": 1.0, "ce": {"mean": 96.0}, "kd": {"mean": 96.5}},
        ],
    }


@pytest.mark.parametrize(("pkd_runs", "expected", "absent"), [
    ([96.0, 96.3, 96.1], "within the spread", None),
    ([95.9, 96.1, 96.0], "All three are below logit KD on average", "above"),
    ([98.0, 98.3, 98.1], "gain(s) more than the spread", "PKD hurts"),
    ([93.0, 93.3, 93.1], "PKD hurts here", "gain(s)"),
])
def test_interpretation_says_what_the_numbers_show(pkd_runs, expected, absent):
    from pkd.demo.report import interpretation

    text = interpretation(_fake_summary([96.0, 96.2, 96.1], pkd_runs))
    assert expected.replace("within the spread", "by more than the spread") in text
    assert absent is None or absent not in text
    assert "--quick" not in text and "SMOKE" not in text
    assert "+35.00 points at 2% of the labels to +0.50 at 100%" in text
    assert "closing 87% of the gap" in text  # (96.1 − 90) / (97 − 90)


def test_interpretation_counts_seeds_and_flags_quick_runs():
    from pkd.demo.report import interpretation

    text = interpretation(_fake_summary([96.0, 96.2, 96.1], [96.0, 96.5, 95.9], quick=True))
    assert "(better on 1, tied on 1, worse on 1)" in text
    assert text.startswith("SMOKE RUN (--quick)") and "mean nothing" in text


@pytest.mark.parametrize(("ce", "expected"), [
    (90.0, "7.00 points below the teacher: the teacher has something to teach"),
    (95.5, "only 1.50 points below the teacher: this setting leaves distillation little"),
])
def test_interpretation_says_whether_the_teacher_has_something_to_teach(ce, expected):
    from pkd.demo.report import interpretation

    summary = _fake_summary([96.0, 96.2, 96.1], [96.0, 96.3, 96.1])
    summary["methods"]["ce"]["mean"] = ce
    assert expected in interpretation(summary)


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
