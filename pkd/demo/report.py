"""The demo's outputs: the five figures, summary.json, summary.md and the printed table.

Everything is built in memory first (:func:`build_figures`,
:func:`build_summary`, :func:`summary_markdown`) and written at the end by
:func:`write_outputs`, all together: a failure leaves none of them behind (and
an earlier run's files as they were, never a mix of old and new).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .. import mapping as mappings
from ..spectrum import spectrum, xavier_mp_edges
from .experiment import LABELS, METHODS, SeedOutcome, Settings, TeacherOutputs

FIGURES = ("alignment.png", "cka.png", "layer_losses.png", "spectra.png", "accuracy.png")
PKD_METHODS = ("pkd_skip", "pkd_last", "pkd_optimal")


def _pairs(pairs) -> list:
    return [[int(s), int(t)] for s, t in pairs]


def method_table(outcomes: list[SeedOutcome]) -> dict:
    """``{method: {"label", "accuracies", "mean", "std"}}`` over the seeds (std with ddof=1)."""
    table = {}
    for method in METHODS:
        accs = [o.runs[method].accuracy for o in outcomes]
        table[method] = {
            "label": LABELS[method],
            "accuracies": accs,
            "mean": float(np.mean(accs)),
            "std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
        }
    return table


def _paired(outcomes, a: str, b: str) -> dict:
    """The per-seed difference a − b: mean, std (ddof=1), and seeds better / tied / worse."""
    diff = np.array([o.runs[a].accuracy - o.runs[b].accuracy for o in outcomes])
    std = float(diff.std(ddof=1)) if diff.size > 1 else 0.0
    return {"mean_diff": float(diff.mean()), "std_diff": std,
            "seeds_better": int((diff > 0).sum()), "seeds_tied": int((diff == 0).sum()),
            "seeds_worse": int((diff < 0).sum())}


def windowed(history: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean of each block of ``window`` steps: ``(steps at block ends, (n_blocks, pairs))``."""
    n_blocks = max(1, history.shape[0] // window)
    window = history.shape[0] // n_blocks
    blocks = history[:n_blocks * window].reshape(n_blocks, window, -1).mean(axis=1)
    return np.arange(1, n_blocks + 1) * window, blocks


def build_figures(outcomes: list[SeedOutcome], teacher_accuracy: float, settings: Settings,
                  closed_form: np.ndarray) -> dict:
    """The five figures, as ``{file name: matplotlib Figure}``.

    ``closed_form`` is the shared least-squares projection of the first
    seed's trained PKD-optimal student onto the teacher, on its mapping.
    """
    from matplotlib.figure import Figure

    from .. import plots

    first = outcomes[0]
    n_s, n_t = settings.student_blocks, settings.teacher_blocks
    drawn = {
        "uniform": mappings.uniform(n_s, n_t),
        "PKD-Skip": mappings.skip(n_s, n_t),
        "PKD-Last": mappings.last(n_s, n_t),
        "optimal by 1 − R²": first.optimal_mapping,
    }
    figures = {}
    size = (9.4, 4.7)
    figures["alignment.png"] = plots.alignment_heatmap(
        first.relative_min_mse, mappings=drawn, figsize=size,
        value_label="relative best-reachable loss (1 − R²)",
        title="Teacher × CE-only student: share of each teacher layer's variance that no\n"
              "linear map of the student layer explains, min-MSE / var (lower = better)",
    )
    figures["cka.png"] = plots.alignment_heatmap(
        first.cka, mappings=drawn, figsize=size,
        value_label="linear CKA (1 = same up to rotation, scale)",
        title="Teacher × CE-only student: linear CKA per layer pair (higher = more similar)",
    )

    # Per-pair hidden loss of the PKD runs of the first seed, one panel per mapping.
    fig = Figure(figsize=(12.5, 4.4), layout="constrained")
    axes = fig.subplots(1, len(PKD_METHODS), sharey=True)
    for ax, method in zip(axes, PKD_METHODS, strict=True):
        run = first.runs[method]
        steps, history = windowed(run.history, settings.history_window)
        plots.layer_losses(history, labels=run.mapping, steps=steps, ax=ax,
                           loss_label="normalized hidden loss per pair",
                           title=f"{LABELS[method]} (test accuracy {run.accuracy:.1f}%)")
        ax.set_xlabel(f"training step (mean over each {settings.history_window} steps)")
        ax.tick_params(which="both", labelleft=True)
    fig.suptitle("PKD's hidden-state loss ‖u − v‖² per layer pair during training "
                 "(u, v: unit-normalised projected student and teacher states; "
                 "student seed 0)", fontsize="medium")
    figures["layer_losses.png"] = fig

    run = first.runs["pkd_optimal"]
    projections = {"Xavier init (common to the three PKD runs)": run.initial_projection}
    for method in PKD_METHODS:
        projections[f"after {LABELS[method]} training"] = first.runs[method].projection
    projections["closed form (least squares, PKD-optimal student)"] = closed_form
    d_s, d_t = settings.student_width, settings.teacher_width
    figures["spectra.png"] = plots.projection_spectrum(
        projections, mp_edges=xavier_mp_edges(d_s, d_t), figsize=(8.0, 5.0),
        title=f"Singular values of the shared {d_s}→{d_t} projection P (student seed 0)\n"
              "PKD's normalized loss ignores the overall scale of P; the least-squares "
              "fit does not",
    )

    table = {f"{LABELS[m]}": [o.runs[m].accuracy for o in outcomes] for m in METHODS}
    fig = Figure(figsize=(8.6, 4.8), layout="constrained")
    ax = fig.add_subplot()
    plots.accuracy_bars(table, ax=ax,
                        title=f"Digits test accuracy of the 4×64 student, "
                              f"{len(outcomes)} seeds ({settings.student_steps} steps each)")
    every = [a for runs in table.values() for a in runs] + [teacher_accuracy]
    bottom = max(float(np.floor(min(every) - 3.0)), 0.0)
    top = max(every)
    ax.set_ylim(bottom, min(top + 0.25 * (top - bottom), 100.0 + 0.1 * (100.0 - bottom)))
    ax.axhline(teacher_accuracy, color="0.25", linestyle="--", linewidth=1.2,
               label=f"teacher (12×128): {teacher_accuracy:.1f}%")
    ax.legend(loc="lower right", fontsize="small")
    ax.set_ylabel(f"test accuracy (%, axis starts at {bottom:g})")
    figures["accuracy.png"] = fig
    return figures


def _mapping_text(pairs) -> str:
    return ", ".join(f"{s}→{t}" for s, t in pairs)


def build_summary(outcomes: list[SeedOutcome], teacher_accuracy: float, settings: Settings,
                  base_seed: int, quick: bool, data_sizes: dict, timing: dict,
                  closed_form: np.ndarray) -> dict:
    """The content of summary.json."""
    n_s, n_t = settings.student_blocks, settings.teacher_blocks
    first = outcomes[0]
    spectra = {"xavier_init": first.runs["pkd_optimal"].initial_projection,
               "closed_form": closed_form}
    for method in PKD_METHODS:
        spectra[method] = first.runs[method].projection
    return {
        "teacher_accuracy": teacher_accuracy,
        "methods": method_table(outcomes),
        "mapping": {
            "uniform": _pairs(mappings.uniform(n_s, n_t)),
            "skip": _pairs(mappings.skip(n_s, n_t)),
            "last": _pairs(mappings.last(n_s, n_t)),
            "optimal": _pairs(first.optimal_mapping),
            "optimal_per_seed": [_pairs(o.optimal_mapping) for o in outcomes],
            "optimal_cost": "relative_min_mse (min-MSE / teacher variance = 1 − R²) of the "
                            "teacher and the seed's CE-only student on the training set",
            "indices": "0-based block outputs: student 0..3, teacher 0..11",
        },
        "settings": {
            **settings.as_dict(),
            "seed": base_seed,
            "quick": quick,
            "optimiser": "Adam (β1 0.9, β2 0.999, ε 1e-8), no weight decay",
            "data": "sklearn.datasets.load_digits, stratified seeded split, standardised",
            **data_sizes,
        },
        "paired_vs_kd": {m: _paired(outcomes, m, "kd") for m in PKD_METHODS},
        "alignment_seed0": {
            "relative_min_mse": first.relative_min_mse.tolist(),
            "cka": first.cka.tolist(),
        },
        "final_layer_losses_seed0": {
            m: first.runs[m].history[-settings.history_window:].mean(axis=0).tolist()
            for m in PKD_METHODS
        },
        "spectra_seed0": {k: _spectrum_dict(v) for k, v in spectra.items()},
        "timing_s": {
            **timing,
            "per_student_run_mean": {
                m: round(float(np.mean([o.runs[m].seconds for o in outcomes])), 3)
                for m in METHODS
            },
        },
        "files": list(FIGURES) + ["summary.json", "summary.md"],
    }


def _spectrum_dict(P) -> dict:
    sp = spectrum(P)
    return {"sigma_max": float(sp.singular_values[0]), "sigma_min": float(sp.singular_values[-1]),
            "effective_rank": sp.effective_rank, "stable_rank": sp.stable_rank,
            "n_above_mp_bulk": int(sp.n_above_bulk)}


def table_lines(summary: dict) -> list[str]:
    """The accuracy table as markdown lines."""
    n_seeds = len(summary["settings"]["student_seeds"])
    lines = [
        f"| method | layer mapping (student→teacher) | test accuracy, mean ± std over "
        f"{n_seeds} seeds (%) | per seed (%) |",
        "|---|---|---|---|",
        f"| teacher (12 blocks × 128) | – | {summary['teacher_accuracy']:.2f} | – |",
    ]
    mapping_of = {"pkd_skip": summary["mapping"]["skip"], "pkd_last": summary["mapping"]["last"]}
    for method, row in summary["methods"].items():
        if method == "pkd_optimal":
            per_seed = summary["mapping"]["optimal_per_seed"]
            distinct = {tuple(map(tuple, p)) for p in per_seed}
            text = ("; ".join(_mapping_text(p) for p in per_seed) + " (per seed)"
                    if len(distinct) > 1 else _mapping_text(per_seed[0]))
        elif method in mapping_of:
            text = _mapping_text(mapping_of[method])
        else:
            text = "–"
        seeds = ", ".join(f"{a:.2f}" for a in row["accuracies"])
        lines.append(f"| {row['label']} | {text} | {row['mean']:.2f} ± {row['std']:.2f} "
                     f"| {seeds} |")
    return lines


def interpretation(summary: dict) -> str:
    """A short paragraph saying what the numbers show (generated from them, not canned)."""
    methods, settings = summary["methods"], summary["settings"]
    n_test = settings["n_test"]
    one_image = 100.0 / n_test
    ce, kd = methods["ce"], methods["kd"]
    best = max(PKD_METHODS, key=lambda m: methods[m]["mean"])
    paired = summary["paired_vs_kd"][best]
    diff, diff_std = paired["mean_diff"], paired["std_diff"]
    n = len(ce["accuracies"])
    teacher = summary["teacher_accuracy"]
    parts = [
        f"The teacher reaches {summary['teacher_accuracy']:.2f}% on the {n_test} test images "
        f"(one image = {one_image:.2f} points). Trained with the same seeds, batches, steps "
        f"and optimiser, the CE-only student reaches {ce['mean']:.2f} ± {ce['std']:.2f}% and "
        f"logit KD {kd['mean']:.2f} ± {kd['std']:.2f}% "
        f"({kd['mean'] - ce['mean']:+.2f} points over CE).",
    ]
    if ce["mean"] > teacher + one_image:
        parts.append("CE-only students beat the teacher on average: on this small data set "
                     "the teacher has little to pass on, which bounds what any distillation "
                     "can show here.")
    elif ce["mean"] >= teacher - one_image:
        parts.append(
            f"The CE-only student already matches the {teacher:.2f}% teacher to within one "
            "test image: on this small data set the teacher has little to pass on beyond "
            "its soft labels, which bounds what any distillation can show here."
        )
    if kd["mean"] > teacher + one_image:
        parts.append("Logit-KD students beat their own teacher on average.")
    if abs(diff) <= max(diff_std, one_image) or n < 3:
        verdict = ("which is within the seed-to-seed noise: on this data PKD does not "
                   "measurably beat logit KD")
    elif diff > 0:
        verdict = "a gain larger than the spread of the paired differences"
    else:
        verdict = "a loss larger than the spread of the paired differences: PKD hurts here"
    parts.append(
        f"The best PKD variant, {methods[best]['label']}, reaches "
        f"{methods[best]['mean']:.2f} ± {methods[best]['std']:.2f}%: "
        f"{diff:+.2f} ± {diff_std:.2f} points against logit KD, seed by seed (better on "
        f"{paired['seeds_better']}, tied on {paired['seeds_tied']}, worse on "
        f"{paired['seeds_worse']} of {n} seeds), {verdict}."
    )
    spread = max(methods[m]["mean"] for m in PKD_METHODS) - min(
        methods[m]["mean"] for m in PKD_METHODS)
    relative = np.asarray(summary["alignment_seed0"]["relative_min_mse"])
    parts.append(
        f"The three layer mappings differ by {spread:.2f} points between their means. "
        f"The optimal mapping (chosen by relative best-reachable loss on the CE-only "
        f"student) was {_mapping_text(summary['mapping']['optimal'])} for seed 0; "
        f"the relative best-reachable loss of that student's layers spans only "
        f"{relative.min():.3f}–{relative.max():.3f} over all layer pairs (a linear map of "
        f"any student layer explains at least {100 * (1 - relative.max()):.0f}% of any "
        f"teacher layer's variance), so the mappings ask for similar things."
    )
    if settings["quick"]:
        parts.append("This was a --quick run (few steps and seeds): the numbers only show "
                     "that the pipeline works; run without --quick for the real comparison.")
    return " ".join(parts)


def summary_markdown(summary: dict) -> str:
    """summary.md: the table, what it shows, and how it was made."""
    s = summary["settings"]
    lines = [
        "# pkd demo: distilling a 12-layer MLP into a 4-layer one on the digits",
        "",
        *table_lines(summary),
        "",
        interpretation(summary),
        "",
        "## Setup",
        "",
        f"- Data: scikit-learn's bundled `load_digits` (8×8 images, 10 classes), "
        f"{s['n_train']} train / {s['n_test']} test, stratified split seeded by --seed "
        f"{s['seed']}, standardised with training statistics.",
        f"- Teacher: residual MLP, {s['teacher_blocks']} blocks of width "
        f"{s['teacher_width']}, {s['teacher_steps']} Adam steps (lr {s['lr']}, batch "
        f"{s['batch_size']}), cross-entropy.",
        f"- Student: residual MLP, {s['student_blocks']} blocks of width "
        f"{s['student_width']}; every method runs {s['student_steps']} Adam steps per seed "
        f"from the same initial weights and minibatches.",
        f"- Logit KD and PKD: α = {s['alpha']}, τ = {s['temperature']} (the paper's "
        f"presets, not tuned here). PKD adds the normalized (patient) hidden loss with "
        f"λ = {s['hidden_weight']} (the paper's β = λ·d_t = "
        f"{s['hidden_weight'] * s['teacher_width']:g}) through one shared {s['student_width']}→"
        f"{s['teacher_width']} projection, trained jointly with the student.",
        "- The optimal mapping minimises the summed relative best-reachable loss "
        "(1 − R² of a linear projection) of the teacher and the seed's CE-only student, "
        "over student layers 0–2 (as PKD-Skip/Last, the last layer is left to the logits).",
        f"- Wall time: {summary['timing_s']['total']:.1f} s.",
        "",
    ]
    return "\n".join(lines)


def print_report(summary: dict, out: Path) -> None:
    """The table and the written files, on stdout."""
    methods = summary["methods"]
    n = len(summary["settings"]["student_seeds"])
    width = max(len(r["label"]) for r in methods.values()) + 2
    print(f"\nDigits test accuracy (%), student 4×64, mean ± std over {n} seeds:")
    print(f"  {'teacher 12×128':<{width}} {summary['teacher_accuracy']:6.2f}")
    for row in methods.values():
        seeds = "  ".join(f"{a:6.2f}" for a in row["accuracies"])
        print(f"  {row['label']:<{width}} {row['mean']:6.2f} ± {row['std']:4.2f}   [{seeds}]")
    print(f"optimal mapping (seed 0): {_mapping_text(summary['mapping']['optimal'])}")
    print(f"done in {summary['timing_s']['total']:.1f} s; wrote to {out}/:")
    for name in summary["files"]:
        print(f"  {out / name}")


def write_outputs(out: Path, figures: dict, summary: dict) -> None:
    """Write every figure, summary.json and summary.md: all of them, or none."""
    from .._atomic import figure_writer, text_writer, write_together

    files = {out / name: figure_writer(fig) for name, fig in figures.items()}
    files[out / "summary.json"] = text_writer(
        json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    files[out / "summary.md"] = text_writer(summary_markdown(summary))
    write_together(files)


def closed_form_projection(outcome: SeedOutcome, teacher: TeacherOutputs,
                           x: np.ndarray) -> np.ndarray:
    """The shared least-squares projection of the trained PKD-optimal student (its pairs).

    A shared P minimises ``Σ_k ‖S_k P − T_k‖²`` over the mapped pairs k: the
    least-squares fit of the pairs' rows stacked on top of each other, solved
    by :meth:`AlignmentStats.projection` (minimum-norm, robust to rank
    deficiency).

    Returns
    -------
    (d_s, d_t) float64 array
    """
    from ..alignment import AlignmentStats

    run = outcome.runs["pkd_optimal"]
    _, student_hidden, _ = run.model.forward(x)
    stacked_s = np.concatenate([student_hidden[s] for s, _ in run.mapping])
    stacked_t = np.concatenate([teacher.hidden[t] for _, t in run.mapping])
    return AlignmentStats.from_arrays([stacked_s], [stacked_t]).projection(0, 0)
