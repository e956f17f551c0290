"""The demo's outputs: the six figures, summary.json, summary.md and the printed table.

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
from .experiment import (
    LABELS,
    MAPPING_MEASURE,
    MEASURE_REASON,
    MEASURE_TEXT,
    METHODS,
    PKD_METHODS,
    RBF_BANDWIDTH,
    SETTINGS_SELECTED_WITH,
    SeedOutcome,
    Settings,
    TeacherOutputs,
    choose_optimal,
)

FIGURES = ("alignment.png", "cka.png", "layer_losses.png", "spectra.png", "accuracy.png",
           "fraction.png")
MEASURE_NAME = {"rbf-cka": f"RBF CKA (σ = {RBF_BANDWIDTH} × median distance)",
                "cka": "linear CKA", "relative": "1 − R²"}
SMOKE = ("SMOKE RUN (--quick): a few dozen steps and 2 seeds, to check that the pipeline "
         "runs; its accuracies mean nothing. Run `pkd demo` (no --quick) for the comparison.")


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


def curve_table(curve: dict, settings: Settings) -> list:
    """The accuracy-against-fraction rows: ``[{"fraction", "n_labelled", method: stats}]``."""
    rows = []
    for fraction, outcomes in curve.items():
        row = {"fraction": float(fraction),
               "n_labelled": [int(o.n_labelled) for o in outcomes]}
        for method in ("ce", "kd", settings.curve_method):
            accs = [o.runs[method].accuracy for o in outcomes]
            row[method] = {"accuracies": accs, "mean": float(np.mean(accs)),
                           "std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0}
        rows.append(row)
    return rows


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
                  closed_form: np.ndarray, curve_rows: list) -> dict:
    """The six figures, as ``{file name: matplotlib Figure}``.

    ``closed_form`` is the shared least-squares projection of the first
    seed's trained PKD-optimal student onto the teacher, on its mapping;
    ``curve_rows`` comes from :func:`curve_table`.
    """
    from matplotlib.figure import Figure

    from .. import plots

    first = outcomes[0]
    n_s, n_t = settings.student_blocks, settings.teacher_blocks
    labels_text = f"{settings.labelled_fraction:.0%} of the labels"
    drawn = {
        "uniform": mappings.uniform(n_s, n_t),
        "PKD-Skip": mappings.skip(n_s, n_t),
        "PKD-Last": mappings.last(n_s, n_t),
        f"optimal by {MEASURE_NAME[MAPPING_MEASURE]}": first.optimal_mapping,
    }
    figures = {}
    size = (9.4, 4.7)
    figures["alignment.png"] = plots.alignment_heatmap(
        first.relative_min_mse, mappings=drawn, figsize=size,
        value_label="relative best-reachable loss (1 − R²)",
        title=f"Teacher × CE-only student ({labels_text}): share of each teacher layer's\n"
              "variance that no linear map of the student layer explains (lower = better)",
    )
    figures["cka.png"] = plots.alignment_heatmap(
        first.rbf_cka, mappings=drawn, figsize=size,
        value_label=f"RBF CKA, σ = {RBF_BANDWIDTH} × median distance (1 = same geometry)",
        title=f"Teacher × CE-only student ({labels_text}): RBF CKA per layer pair "
              "(higher = more similar),\nthe measure that chooses PKD-optimal's mapping",
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
                        title=f"Digits test accuracy of the 4×64 student with {labels_text} "
                              f"and the teacher's outputs,\n{len(outcomes)} seeds "
                              f"({settings.student_steps} steps each)")
    every = [a for runs in table.values() for a in runs] + [teacher_accuracy]
    bottom = max(float(np.floor(min(every) - 3.0)), 0.0)
    top = max(every)
    ax.set_ylim(bottom, min(top + 0.25 * (top - bottom), 100.0 + 0.1 * (100.0 - bottom)))
    ax.axhline(teacher_accuracy, color="0.25", linestyle="--", linewidth=1.2,
               label=f"teacher (12×128, all labels): {teacher_accuracy:.1f}%")
    ax.legend(loc="lower right", fontsize="small")
    ax.set_ylabel(f"test accuracy (%, axis starts at {bottom:g})")
    figures["accuracy.png"] = fig
    figures["fraction.png"] = fraction_figure(curve_rows, teacher_accuracy, settings)
    return figures


def fraction_figure(curve_rows: list, teacher_accuracy: float, settings: Settings):
    """Test accuracy against the labelled fraction: CE, logit KD and the curve's PKD variant."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.6, 4.8), layout="constrained")
    ax = fig.add_subplot()
    fractions = np.array([row["fraction"] for row in curve_rows]) * 100.0
    methods = ("ce", "kd", settings.curve_method)
    colours = {"ce": "tab:grey", "kd": "tab:blue", settings.curve_method: "tab:red"}
    for shift, method in zip((0.96, 1.0, 1.04), methods, strict=True):
        means = np.array([row[method]["mean"] for row in curve_rows])
        stds = np.array([row[method]["std"] for row in curve_rows])
        x = fractions * shift  # a small offset on the log axis keeps the error bars apart
        ax.errorbar(x, means, yerr=stds, color=colours[method], marker="o", capsize=3,
                    label=f"{LABELS[method]} (mean ± std)")
        for xi, row in zip(x, curve_rows, strict=True):
            accs = row[method]["accuracies"]
            ax.plot([xi] * len(accs), accs, linestyle="none", marker=".", markersize=4,
                    color=colours[method], alpha=0.45)
    ax.axhline(teacher_accuracy, color="0.25", linestyle="--", linewidth=1.2,
               label=f"teacher (all labels): {teacher_accuracy:.1f}%")
    ax.axvline(settings.labelled_fraction * 100.0, color="0.6", linestyle=":", linewidth=1.0,
               label=f"the demo's fraction ({settings.labelled_fraction:.0%})")
    ax.set_xscale("log")
    ax.set_xticks(fractions, [f"{f:g}%" for f in fractions])
    ax.minorticks_off()
    ax.set_xlabel("labelled share of the training set (the student sees the teacher's "
                  "outputs on all of it)")
    ax.set_ylabel("test accuracy (%)")
    n_seeds = len(curve_rows[0]["ce"]["accuracies"])
    ax.set_title(f"What the teacher adds as labels get scarce ({n_seeds} seeds per point, "
                 "dots: single runs)", fontsize="medium")
    ax.legend(loc="lower right", fontsize="small")
    return fig


def _mapping_text(pairs) -> str:
    return ", ".join(f"{s}→{t}" for s, t in pairs)


def build_summary(outcomes: list[SeedOutcome], teacher_accuracy: float, settings: Settings,
                  base_seed: int, quick: bool, data_sizes: dict, timing: dict,
                  closed_form: np.ndarray, curve_rows: list,
                  teacher_val_accuracy: float) -> dict:
    """The content of summary.json."""
    n_s, n_t = settings.student_blocks, settings.teacher_blocks
    first = outcomes[0]
    spectra = {"xavier_init": first.runs["pkd_optimal"].initial_projection,
               "closed_form": closed_form}
    for method in PKD_METHODS:
        spectra[method] = first.runs[method].projection
    return {
        "teacher_accuracy": teacher_accuracy,
        "teacher_val_accuracy": teacher_val_accuracy,
        "methods": method_table(outcomes),
        "n_labelled_per_seed": [int(o.n_labelled) for o in outcomes],
        "mapping": {
            "uniform": _pairs(mappings.uniform(n_s, n_t)),
            "skip": _pairs(mappings.skip(n_s, n_t)),
            "last": _pairs(mappings.last(n_s, n_t)),
            "optimal": _pairs(first.optimal_mapping),
            "optimal_per_seed": [_pairs(o.optimal_mapping) for o in outcomes],
            "optimal_measure": MAPPING_MEASURE,
            "optimal_rule": f"{MEASURE_TEXT[MAPPING_MEASURE]}, between the teacher and the "
                            "seed's CE-only student, on the training inputs",
            "optimal_measure_reason": MEASURE_REASON,
            "optimal_by_linear_cka_per_seed": [
                _pairs(choose_optimal({"cka": o.cka}, n_s, "cka")) for o in outcomes],
            "settings_selected_with": SETTINGS_SELECTED_WITH,
            "indices": "0-based block outputs: student 0..3, teacher 0..11",
        },
        "settings": {
            **settings.as_dict(),
            "seed": base_seed,
            "quick": quick,
            "optimiser": "Adam (β1 0.9, β2 0.999, ε 1e-8), no weight decay",
            "data": "sklearn.datasets.load_digits, stratified seeded train/validation/test "
                    "split, standardised with training statistics",
            "selection": "chosen on the validation split by pkd.demo.selection.select "
                         "(record: analysis/results/demo/selection/)",
            **data_sizes,
        },
        "paired_vs_kd": {m: _paired(outcomes, m, "kd") for m in PKD_METHODS},
        "kd_vs_ce": _paired(outcomes, "kd", "ce"),
        "curve": curve_rows,
        "alignment_seed0": {
            "relative_min_mse": first.relative_min_mse.tolist(),
            "cka": first.cka.tolist(),
            "rbf_cka": first.rbf_cka.tolist(),
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


def _paired_text(p: dict) -> str:
    return (f"{p['mean_diff']:+.2f} ± {p['std_diff']:.2f} (better on {p['seeds_better']}, "
            f"tied on {p['seeds_tied']}, worse on {p['seeds_worse']})")


def table_lines(summary: dict) -> list[str]:
    """The accuracy table as markdown lines (with the paired differences against logit KD)."""
    n_seeds = len(summary["settings"]["student_seeds"])
    lines = [
        f"| method | layer mapping (student→teacher) | test accuracy, mean ± std over "
        f"{n_seeds} seeds (%) | − logit KD, per-seed differences: mean ± std (seeds better, "
        "tied, worse) | per seed (%) |",
        "|---|---|---|---|---|",
        f"| teacher (12 blocks × 128, all labels) | – | {summary['teacher_accuracy']:.2f} "
        "| – | – |",
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
        if method in summary["paired_vs_kd"]:
            paired = _paired_text(summary["paired_vs_kd"][method])
        elif method == "ce":
            kd = summary["kd_vs_ce"]
            paired = _paired_text({**kd, "mean_diff": -kd["mean_diff"],
                                   "seeds_better": kd["seeds_worse"],
                                   "seeds_worse": kd["seeds_better"]})
        else:
            paired = "–"
        seeds = ", ".join(f"{a:.2f}" for a in row["accuracies"])
        lines.append(f"| {row['label']} | {text} | {row['mean']:.2f} ± {row['std']:.2f} "
                     f"| {paired} | {seeds} |")
    return lines


def curve_lines(summary: dict) -> list[str]:
    """The accuracy-against-fraction table as markdown lines."""
    method = summary["settings"]["curve_method"]
    rows = summary["curve"]
    n = len(rows[0]["ce"]["accuracies"])
    lines = [f"| labelled share (images) | CE only | logit KD | {LABELS[method]} |",
             "|---|---|---|---|"]
    for row in rows:
        cells = " | ".join(f"{row[m]['mean']:.2f} ± {row[m]['std']:.2f}"
                           for m in ("ce", "kd", method))
        lines.append(f"| {row['fraction']:.0%} ({row['n_labelled'][0]}) | {cells} |")
    lines.append("")
    lines.append(f"Test accuracy (%), mean ± std over {n} seeds per fraction (the seeds and "
                 "minibatches of the main table; a seed's labelled images at a smaller "
                 "fraction are part of those at a larger one).")
    return lines


def _noise_verdict(paired: dict, one_image: float, n: int) -> str:
    """'noise', 'better' or 'worse' for a paired difference."""
    if n < 3 or abs(paired["mean_diff"]) <= max(paired["std_diff"], one_image):
        return "noise"
    return "better" if paired["mean_diff"] > 0 else "worse"


def interpretation(summary: dict) -> str:
    """A short paragraph saying what the numbers show (generated from them, not canned)."""
    methods, settings = summary["methods"], summary["settings"]
    n_test = settings["n_test"]
    one_image = 100.0 / n_test
    ce, kd = methods["ce"], methods["kd"]
    n = len(ce["accuracies"])
    teacher = summary["teacher_accuracy"]
    n_labelled = summary.get("n_labelled_per_seed", [0])[0]
    parts = []
    if settings["quick"]:
        parts.append(SMOKE)
    parts.append(
        f"The teacher, trained on all {settings['n_train']} training labels, reaches "
        f"{teacher:.2f}% on the {n_test} test images (one image = {one_image:.2f} points). "
        f"The student sees the labels of {settings['labelled_fraction']:.0%} of the training "
        f"set ({n_labelled} images, stratified) and the teacher's outputs on all of it."
    )
    gap = teacher - ce["mean"]
    if gap >= 3.0:
        parts.append(f"Alone (CE only) it reaches {ce['mean']:.2f} ± {ce['std']:.2f}%, "
                     f"{gap:.2f} points below the teacher: the teacher has something to teach.")
    else:
        parts.append(f"Alone (CE only) it reaches {ce['mean']:.2f} ± {ce['std']:.2f}%, only "
                     f"{gap:.2f} points below the teacher: this setting leaves distillation "
                     "little to show.")
    kd_ce = summary["kd_vs_ce"]
    closed = (kd["mean"] - ce["mean"]) / gap if gap > 0 else float("nan")
    parts.append(
        f"Logit KD reaches {kd['mean']:.2f} ± {kd['std']:.2f}%: {kd_ce['mean_diff']:+.2f} ± "
        f"{kd_ce['std_diff']:.2f} points over CE seed by seed (better on "
        f"{kd_ce['seeds_better']} of {n} seeds)"
        + (f", closing {100 * closed:.0f}% of the gap to the teacher." if gap > 0 else ".")
    )
    paired = summary["paired_vs_kd"]
    parts.append("Against logit KD, seed by seed: " + "; ".join(
        f"{methods[m]['label']} {_paired_text(paired[m])}" for m in PKD_METHODS) + ".")
    verdicts = {m: _noise_verdict(paired[m], one_image, n) for m in PKD_METHODS}
    better = [methods[m]["label"] for m in PKD_METHODS if verdicts[m] == "better"]
    worse = [methods[m]["label"] for m in PKD_METHODS if verdicts[m] == "worse"]
    diffs = [paired[m]["mean_diff"] for m in PKD_METHODS]
    if not better and not worse:
        if max(diffs) < 0:
            lean = (f" All three are below logit KD on average (by {-max(diffs):.2f}–"
                    f"{-min(diffs):.2f} points, {-max(diffs) / one_image:.1f}–"
                    f"{-min(diffs) / one_image:.1f} test images): if anything, the "
                    "hidden-state loss costs a little here.")
        elif min(diffs) > 0:
            lean = (" All three are above logit KD on average, by less than the spread: "
                    "a lean, not a measured gain.")
        else:
            lean = ""
        parts.append(
            "No PKD variant differs from logit KD by more than the spread of the paired "
            "differences (or one test image): on this data PKD does not measurably beat "
            "logit KD; the teacher's soft labels on the transfer set already carry what "
            "this student takes from it." + lean
        )
    else:
        if better:
            parts.append(f"{' and '.join(better)} gain(s) more than the spread of the paired "
                         "differences over logit KD.")
        if worse:
            parts.append(f"{' and '.join(worse)} lose(s) more than the spread of the paired "
                         "differences: PKD hurts here.")
    parts.append(
        f"PKD-optimal's mapping, chosen by {MEASURE_NAME[summary['mapping']['optimal_measure']]}"
        f" on the seed's CE-only student, was {_mapping_text(summary['mapping']['optimal'])} "
        "for seed 0."
    )
    rows = summary.get("curve") or []
    if len(rows) >= 2:
        low, high = rows[0], rows[-1]
        parts.append(
            f"Over labelled fractions (table below, fraction.png) the gain of logit KD over "
            f"CE goes from {low['kd']['mean'] - low['ce']['mean']:+.2f} points at "
            f"{low['fraction']:.0%} of the labels to "
            f"{high['kd']['mean'] - high['ce']['mean']:+.2f} at {high['fraction']:.0%}."
        )
    return " ".join(parts)


def summary_markdown(summary: dict) -> str:
    """summary.md: the table, what it shows, and how it was made."""
    s = summary["settings"]
    lines = [
        "# pkd demo: distilling a 12-layer MLP into a 4-layer one that sees few labels",
        "",
        *([f"**{SMOKE}**", ""] if s["quick"] else []),
        *table_lines(summary),
        "",
        interpretation(summary),
        "",
        "## Accuracy against the labelled fraction",
        "",
        *curve_lines(summary),
        "",
        "## Setup",
        "",
        f"- Data: scikit-learn's bundled `load_digits` (8×8 images, 10 classes), "
        f"{s['n_train']} train / {s['n_val']} validation / {s['n_test']} test, stratified "
        f"split seeded by --seed {s['seed']}, standardised with training statistics.",
        f"- Teacher: residual MLP, {s['teacher_blocks']} blocks of width "
        f"{s['teacher_width']}, {s['teacher_steps']} Adam steps (lr {s['teacher_lr']}, batch "
        f"{s['batch_size']}), cross-entropy on every training label "
        f"({summary['teacher_val_accuracy']:.2f}% on validation).",
        f"- Student: residual MLP, {s['student_blocks']} blocks of width "
        f"{s['student_width']}. It sees the labels of {s['labelled_fraction']:.0%} of each "
        f"class of the training set (drawn per seed) and the teacher's logits and hidden "
        f"states on every training input (the transfer set). Each of its {s['student_steps']} "
        f"Adam steps (lr {s['lr']}) takes a minibatch of {s['labelled_batch_size']} labelled "
        f"images and one of {s['batch_size']} transfer images; every method of a seed starts "
        "from the same weights and sees the same minibatches.",
        "- CE only: cross-entropy on the labelled minibatch. Logit KD: "
        f"(1 − α)·CE(labelled) + α·τ²·KL(teacher ‖ student at τ) on the transfer minibatch, "
        f"α = {s['alpha']}, τ = {s['temperature']}. PKD adds the normalized (patient) "
        f"hidden loss on the transfer minibatch with λ = {s['hidden_weight']} (the paper's "
        f"β = λ·d_t = {s['hidden_weight'] * s['teacher_width']:g}) through one shared "
        f"{s['student_width']}→{s['teacher_width']} projection, trained jointly with the "
        "student.",
        f"- PKD-optimal's mapping: {summary['mapping']['optimal_rule']}, over student layers "
        "0–2 (as PKD-Skip/Last, the last layer is left to the logits). This measure, because "
        f"{summary['mapping']['optimal_measure_reason']}.",
        *_selection_measure_lines(summary),
        "- How the settings were chosen: the labelled fraction, the student's learning rate "
        "and steps, α, τ, λ and the PKD variant of the fraction curve were chosen on the "
        "validation split (never the test set) with other student seeds, before any test "
        "accuracy was computed, and are the same for every method: see "
        "`analysis/results/demo/selection/selection.md` (written by "
        "`analysis/demo_study.py --select`).",
        f"- Test accuracy is measured once per run, after the last step. Wall time: "
        f"{summary['timing_s']['total']:.1f} s.",
        "",
    ]
    return "\n".join(lines)


def _selection_measure_lines(summary: dict) -> list:
    """A line saying plainly when the settings were selected with another mapping measure."""
    mapping = summary["mapping"]
    used = mapping.get("settings_selected_with", mapping["optimal_measure"])
    if used == mapping["optimal_measure"]:
        return []
    line = (f"- Caveat: the settings (next item) were selected with PKD-optimal's mapping "
            f"chosen by {MEASURE_NAME[used]}, not by "
            f"{MEASURE_NAME[mapping['optimal_measure']]}; the selection was not rerun.")
    if used == "cka" and "optimal_by_linear_cka_per_seed" in mapping:
        same = sum(a == b for a, b in zip(mapping["optimal_per_seed"],
                                          mapping["optimal_by_linear_cka_per_seed"],
                                          strict=True))
        line += (f" On the final seeds linear CKA would have chosen the same mapping for "
                 f"{same} of {len(mapping['optimal_per_seed'])} seeds (summary.json: "
                 "`mapping.optimal_by_linear_cka_per_seed`).")
    return [line]


def print_report(summary: dict, out: Path) -> None:
    """The table and the written files, on stdout (a smoke run says so, twice)."""
    methods = summary["methods"]
    quick = summary["settings"]["quick"]
    n = len(summary["settings"]["student_seeds"])
    width = max(len(r["label"]) for r in methods.values()) + 2
    if quick:
        print(f"\n{SMOKE}")
    fraction = summary["settings"]["labelled_fraction"]
    print(f"\nDigits test accuracy (%), student 4×64 with {fraction:.0%} of the labels, "
          f"mean ± std over {n} seeds; last column: per-seed difference to logit KD:")
    print(f"  {'teacher 12×128':<{width}} {summary['teacher_accuracy']:6.2f}")
    for method, row in methods.items():
        seeds = "  ".join(f"{a:6.2f}" for a in row["accuracies"])
        paired = summary["paired_vs_kd"].get(method)
        diff = f"   {paired['mean_diff']:+.2f} ± {paired['std_diff']:.2f}" if paired else ""
        print(f"  {row['label']:<{width}} {row['mean']:6.2f} ± {row['std']:4.2f}   "
              f"[{seeds}]{diff}")
    print(f"optimal mapping (seed 0, by {MEASURE_NAME[summary['mapping']['optimal_measure']]}):"
          f" {_mapping_text(summary['mapping']['optimal'])}")
    if quick:
        print(f"({SMOKE})")
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
