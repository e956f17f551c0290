"""Mapping study: uniform vs PKD-Skip vs PKD-Last vs optimal, on the demo's networks.

Which teacher layer should each student layer learn from? This study takes
the demo's setup (:mod:`pkd.demo`: a 12-block residual MLP teacher trained on
every label of scikit-learn's digits, a 4-block student that sees the labels
of only ``Settings.labelled_fraction`` (10%) of the training rows and the
teacher's outputs on all of them) with the demo's settings and seeds, and for
every student seed compares these layer mappings:

- ``uniform``: all 4 student layers, ⌊(m+1)·12/4⌋ − 1 (TinyBERT; pkd's default mapping);
- ``PKD-Skip`` and ``PKD-Last``: student layers 0–2 (the last is left to the logits);
- ``PKD-optimal``: student layers 0–2, chosen by the demo's measure
  (:data:`pkd.demo.experiment.MAPPING_MEASURE`: RBF CKA at σ = 0.2 × the median
  distance, :data:`pkd.cka.DEFAULT_BANDWIDTH`, the default measure of ``pkd analyze``,
  maximised) on the trained teacher and that seed's CE-only student;
- ``optimal by linear CKA``: student layers 0–2 chosen by linear CKA, maximised;
- ``optimal by 1 − R²``: student layers 0–2 chosen by the relative
  best-reachable loss, minimised (the old default);
- ``optimal by RBF CKA (4 pairs)``: all 4 student layers by RBF CKA (to set beside uniform).

For each mapping and seed it reports, from the CE-only student and the teacher
on the training rows (the transfer set): the summed relative best-reachable
loss (Σ over pairs of 1 − R², the share of each teacher layer's variance no
linear map of the student layer explains; lower is better), the mean linear
CKA and the mean RBF CKA over pairs (higher is more similar); and the test
accuracy and cross-entropy of a student trained with PKD on that mapping
(the demo's objective and settings).

The CE-only, logit-KD, PKD-Skip, PKD-Last and PKD-optimal runs are the demo's
own per-seed runs (:func:`pkd.demo.experiment.run_seed`, same seeds and
labelled fraction: the numbers equal ``analysis/results/demo/summary.json``);
the other mappings are trained with the same initial weights, projection,
labelled rows and minibatches, so every comparison is paired seed by seed. A
mapping equal to one already trained for that seed reuses its run (training
is deterministic).

Writes ``mapping_study.json``, ``mapping_study.md`` and ``mapping_study.png``
into ``analysis/results/mapping_study/``.

Run (from the repository root):

    .venv/bin/python analysis/mapping_study.py           # full: the demo's 5 seeds
    .venv/bin/python analysis/mapping_study.py --quick   # smoke run (2 short seeds),
                                                         # into results/mapping_study-quick/
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
from _common import output_dir, write_json, write_text

from pkd import mapping as mappings
from pkd.cka import DEFAULT_BANDWIDTH, rbf_cka_matrix
from pkd.demo import experiment
from pkd.demo.experiment import (
    LABELS,
    MAPPING_MEASURE,
    Settings,
    TeacherOutputs,
    accuracy,
    prepare,
    run_seed,
    student_seeds,
    train_student,
)
from pkd.objective import logit_loss_and_grad

NAME = "mapping_study"
# Mapping keys, in the order of every table and figure.
MAPPINGS = ("uniform", "skip", "last", "optimal", "optimal_cka", "optimal_relative",
            "optimal_all")
MAPPING_LABELS = {
    "uniform": "uniform",
    "skip": "PKD-Skip",
    "last": "PKD-Last",
    "optimal": f"PKD-optimal (demo, {MAPPING_MEASURE})",
    "optimal_cka": "optimal by linear CKA (3 pairs)",
    "optimal_relative": "optimal by 1 − R² (3 pairs)",
    "optimal_all": "optimal by RBF CKA (4 pairs)",
}
# The demo's runs that are reused as they are.
DEMO_RUN = {"skip": "pkd_skip", "last": "pkd_last", "optimal": "pkd_optimal"}


def test_nll(model, data) -> float:
    """Mean cross-entropy (negative log-likelihood, nats) of ``model`` on the test set.

    Finer than accuracy: on 359 test images students trained differently
    often make the same predictions with different confidence.
    """
    logits = model.forward(data.x_test)[0]
    return logit_loss_and_grad(logits, logits, data.y_test, alpha=0.0, temperature=1.0)[0]


def study_seed(k: int, seed: np.random.SeedSequence, data, teacher: TeacherOutputs,
               settings: Settings) -> dict:
    """The demo's five runs of seed ``k`` (on the test set), plus the other mappings."""
    test = (data.x_test, data.y_test)
    outcome = run_seed(k, seed, data, teacher, settings, test)
    # The material run_seed trained from (seed_material copies the seed, so it is the same).
    material = experiment.seed_material(seed, data, settings, settings.labelled_fraction)
    if not np.array_equal(outcome.runs["pkd_skip"].initial_projection, material.projection):
        raise RuntimeError("pkd.demo.experiment.run_seed no longer derives its material as "
                           "seed_material does: update study_seed")
    n_s, n_t = settings.student_blocks, settings.teacher_blocks
    _, student_hidden, _ = outcome.runs["ce"].model.forward(data.x_train)
    rbf = rbf_cka_matrix(student_hidden, teacher.hidden)  # the default bandwidth
    relative, cka = outcome.relative_min_mse, outcome.cka
    rows = list(range(n_s - 1))  # the last student layer is left to the logits, as in the demo
    chosen = {
        "uniform": mappings.uniform(n_s, n_t),
        "skip": mappings.skip(n_s, n_t),
        "last": mappings.last(n_s, n_t),
        "optimal": outcome.optimal_mapping,
        "optimal_cka": mappings.optimal(cka, student_layers=rows, maximize=True),
        "optimal_relative": mappings.optimal(relative, student_layers=rows),
        "optimal_all": mappings.optimal(rbf, maximize=True),
    }
    chosen = {key: [(int(s), int(t)) for s, t in pairs] for key, pairs in chosen.items()}
    runs = {"ce": outcome.runs["ce"], "kd": outcome.runs["kd"]}
    trained = {tuple(chosen[key]): outcome.runs[name] for key, name in DEMO_RUN.items()}
    for key in MAPPINGS:
        pairs = tuple(chosen[key])
        if key in DEMO_RUN:
            runs[key] = outcome.runs[DEMO_RUN[key]]
        elif pairs in trained:
            runs[key] = trained[pairs]
        else:
            # train_student's PKD methods differ only by the mapping they are given.
            runs[key] = trained[pairs] = train_student(
                "pkd_optimal", data, teacher, material, settings, test, seed_index=k,
                layer_mapping=list(pairs))
    return {
        "seed_index": k,
        "n_labelled": outcome.n_labelled,
        "mappings": {key: [list(p) for p in pairs] for key, pairs in chosen.items()},
        "sum_relative_min_mse": {key: float(sum(relative[s, t] for s, t in pairs))
                                 for key, pairs in chosen.items()},
        "mean_cka": {key: float(np.mean([cka[s, t] for s, t in pairs]))
                     for key, pairs in chosen.items()},
        "mean_rbf_cka": {key: float(np.mean([rbf[s, t] for s, t in pairs]))
                         for key, pairs in chosen.items()},
        "accuracy": {key: run.accuracy for key, run in runs.items()},
        "test_nll": {key: test_nll(run.model, data) for key, run in runs.items()},
        "relative_min_mse": relative.tolist(),
        "cka": cka.tolist(),
        "rbf_cka": rbf.tolist(),
    }


def _stats(values) -> dict:
    values = np.asarray(values, dtype=np.float64)
    std = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return {"mean": float(values.mean()), "std": std, "per_seed": values.tolist()}


def aggregate(per_seed: list[dict]) -> dict:
    """Mean ± std over seeds of every metric, and accuracy differences paired with KD."""
    table = {}
    for key in MAPPINGS:
        acc = np.array([s["accuracy"][key] for s in per_seed])
        kd = np.array([s["accuracy"]["kd"] for s in per_seed])
        table[key] = {
            "label": MAPPING_LABELS[key],
            "n_pairs": len(per_seed[0]["mappings"][key]),
            "sum_relative_min_mse": _stats([s["sum_relative_min_mse"][key] for s in per_seed]),
            "mean_cka": _stats([s["mean_cka"][key] for s in per_seed]),
            "mean_rbf_cka": _stats([s["mean_rbf_cka"][key] for s in per_seed]),
            "accuracy": _stats(acc),
            "accuracy_minus_kd": _stats(acc - kd),
            "test_nll": _stats([s["test_nll"][key] for s in per_seed]),
        }
    references = {key: {"label": LABELS[key],
                        "accuracy": _stats([s["accuracy"][key] for s in per_seed]),
                        "test_nll": _stats([s["test_nll"][key] for s in per_seed])}
                  for key in ("ce", "kd")}
    return {"mappings": table, "references": references}


def _pairs_text(pairs) -> str:
    return ", ".join(f"{s}→{t}" for s, t in pairs)


def _mapping_cell(per_seed: list[dict], key: str) -> str:
    texts = [_pairs_text(s["mappings"][key]) for s in per_seed]
    if len(set(texts)) == 1:
        return texts[0]
    return "per seed: " + "; ".join(texts)


def interpretation(result: dict) -> str:
    """What the numbers show, written from them."""
    table = result["summary"]["mappings"]
    n_test = result["settings"]["n_test"]
    one_image = 100.0 / n_test
    n_seeds = len(result["per_seed"])
    by_acc = max(table, key=lambda k: table[k]["accuracy"]["mean"])
    accs = [table[k]["accuracy"]["mean"] for k in table]
    spread = max(accs) - min(accs)
    noise = max(table[k]["accuracy"]["std"] for k in table)
    per_pair = {k: table[k]["sum_relative_min_mse"]["mean"] / table[k]["n_pairs"]
                for k in table}
    best3 = min((k for k in table if table[k]["n_pairs"] == 3), key=per_pair.get)
    worst = max(table, key=per_pair.get)
    parts = [
        f"Over {n_seeds} student seed{'s' if n_seeds > 1 else ''}, "
        f"{table[best3]['label']} has the lowest relative "
        f"best-reachable loss of the 3-pair mappings (it minimises that sum by "
        f"construction): {per_pair[best3]:.3f} per pair, against {per_pair[worst]:.3f} "
        f"for {table[worst]['label']}, the worst of all {len(table)}; i.e. a linear map of the "
        f"CE-only student's layer leaves {100 * per_pair[best3]:.1f}–"
        f"{100 * per_pair[worst]:.1f}% of the mapped teacher layer's variance unexplained.",
        f"The highest mean test accuracy is {table[by_acc]['label']}'s, "
        f"{table[by_acc]['accuracy']['mean']:.2f} ± {table[by_acc]['accuracy']['std']:.2f}%; "
        f"the {len(table)} mappings' means lie within {spread:.2f} points of each other "
        f"(one test image = {one_image:.2f} points; the largest seed-to-seed std is "
        f"{noise:.2f} points).",
    ]
    if n_seeds < 3:
        parts.append("With fewer than 3 seeds the spread cannot be judged against the noise.")
    elif spread <= max(noise, one_image):
        parts.append("That is within the seed-to-seed noise: on this data the choice of "
                     "mapping does not measurably change accuracy.")
    else:
        parts.append("That spread exceeds the seed-to-seed noise, so the mapping matters "
                     "here; compare the paired differences with logit KD in the table.")
    nll = {k: table[k]["test_nll"]["mean"] for k in table}
    best_nll, worst_nll = min(nll, key=nll.get), max(nll, key=nll.get)
    # Paired by seed (same initial weights and minibatches): the sharper comparison.
    gap = _stats([s["test_nll"][worst_nll] - s["test_nll"][best_nll]
                  for s in result["per_seed"]])
    if n_seeds < 3:
        verdict = "too few seeds to judge"
    elif gap["mean"] <= gap["std"]:
        verdict = "within the seed-to-seed noise of the paired difference"
    else:
        verdict = "larger than the spread of the paired difference"
    parts.append(
        f"Test cross-entropy, a finer measure than accuracy, ranges from "
        f"{nll[best_nll]:.4f} ({table[best_nll]['label']}) to {nll[worst_nll]:.4f} nats "
        f"({table[worst_nll]['label']}); seed by seed the gap is {gap['mean']:.4f} ± "
        f"{gap['std']:.4f}, {verdict}."
    )
    per_pair_values = [per_pair[k] for k in table]
    if n_seeds >= 3 and len(set(per_pair_values)) > 1:
        rho = _spearman(per_pair_values, [nll[k] for k in table])
        parts.append(f"Across the {len(table)} mappings, the Spearman correlation between the "
                     f"relative loss per pair and the test cross-entropy is {rho:+.2f} "
                     f"(positive would mean better-aligned mappings train better students; "
                     f"with {len(table)} points, some of them the same run, it is only "
                     "indicative).")
    if result["settings"]["quick"]:
        parts.append(f"This was a --quick run ({result['settings']['student_steps']} steps, "
                     f"{n_seeds} seed{'s' if n_seeds > 1 else ''}): the numbers only show "
                     "that the pipeline works; run without --quick for the real study.")
    return " ".join(parts)


def _spearman(a, b) -> float:
    ranks_a = np.argsort(np.argsort(a)).astype(float)
    ranks_b = np.argsort(np.argsort(b)).astype(float)
    if ranks_a.std() == 0 or ranks_b.std() == 0:
        return float("nan")
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


def markdown(result: dict) -> str:
    """mapping_study.md: the table, what it shows, and how to rerun it."""
    summary, per_seed, s = result["summary"], result["per_seed"], result["settings"]
    n = len(per_seed)
    lines = [
        "# Mapping study: uniform vs PKD-Skip vs PKD-Last vs optimal",
        "",
        f"Teacher: {s['teacher_blocks']}-block residual MLP (width {s['teacher_width']}), "
        f"test accuracy {result['teacher_accuracy']:.2f}%. Student: {s['student_blocks']} "
        f"blocks of width {s['student_width']}, trained on the labels of "
        f"{s['labelled_fraction']:.0%} of the training rows ({per_seed[0]['n_labelled']}) and "
        f"the teacher's outputs on all {s['n_train']}. Mean ± std over {n} seeds; alignment "
        "columns from the teacher and each seed's CE-only student on the training rows "
        f"(RBF CKA: σ = {s['rbf_bandwidth']:g} × the median distance).",
        "",
        "| mapping (student→teacher) | pairs | Σ relative loss (1 − R²) ↓ | per pair ↓ "
        "| mean CKA ↑ | mean RBF CKA ↑ | test accuracy (%) "
        "| accuracy − logit KD, paired (points) | test cross-entropy (nats) ↓ |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, row in summary["mappings"].items():
        rel, cka, rbf = row["sum_relative_min_mse"], row["mean_cka"], row["mean_rbf_cka"]
        acc, diff = row["accuracy"], row["accuracy_minus_kd"]
        lines.append(
            f"| **{row['label']}**: {_mapping_cell(per_seed, key)} | {row['n_pairs']} "
            f"| {rel['mean']:.3f} ± {rel['std']:.3f} | {rel['mean'] / row['n_pairs']:.3f} "
            f"| {cka['mean']:.3f} ± {cka['std']:.3f} | {rbf['mean']:.3f} ± {rbf['std']:.3f} "
            f"| {acc['mean']:.2f} ± {acc['std']:.2f} | {diff['mean']:+.2f} ± {diff['std']:.2f} "
            f"| {row['test_nll']['mean']:.4f} ± {row['test_nll']['std']:.4f} |"
        )
    for row in summary["references"].values():
        acc = row["accuracy"]
        lines.append(f"| {row['label']} (no hidden loss) | – | – | – | – | – "
                     f"| {acc['mean']:.2f} ± {acc['std']:.2f} | – "
                     f"| {row['test_nll']['mean']:.4f} ± {row['test_nll']['std']:.4f} |")
    lines += [
        "",
        interpretation(result),
        "",
        "Σ relative loss sums 1 − R² over the mapping's pairs, so compare a 4-pair mapping "
        "(uniform, optimal by RBF CKA (4 pairs)) with the 3-pair ones through the per-pair "
        "column. "
        "The alignment columns describe the CE-only student, before any hidden-state "
        "loss; the accuracy column, the students trained with each mapping.",
        "",
        "![mapping study](mapping_study.png)",
        "",
        "## How it was made",
        "",
        f"- Settings (those of `pkd demo`): {s['teacher_steps']} teacher steps, "
        f"{s['student_steps']} student steps per run, Adam lr {s['lr']}, batches of "
        f"{s['labelled_batch_size']} labelled and {s['batch_size']} transfer rows, "
        f"labelled fraction {s['labelled_fraction']}, α = {s['alpha']}, τ = "
        f"{s['temperature']}, hidden weight λ = {s['hidden_weight']}, normalized hidden loss: "
        f"{s['normalize']}.",
        f"- Data: scikit-learn digits, {s['n_train']} train / {s['n_test']} test, seed "
        f"{s['seed']}.",
        "- The CE, logit KD, PKD-Skip, PKD-Last and PKD-optimal runs are the demo's "
        "(`pkd.demo.experiment.run_seed`); the other mappings are trained from the same "
        "initial weights, projection, labelled rows and minibatches (a mapping equal to one "
        "already trained for the seed reuses that run).",
        f"- Wall time: {result['timing_s']['total']:.1f} s.",
        "- Rerun: `.venv/bin/python analysis/mapping_study.py` "
        "(`--quick` for a smoke run).",
        "",
    ]
    return "\n".join(lines)


# One colour per method in every panel; the references without hidden loss in grey.
COLOURS = {"ce": "0.55", "kd": "0.35", **{key: f"C{k}" for k, key in enumerate(MAPPINGS)}}


def _metric_bars(ax, values: dict, ylabel: str, title: str, fmt: str,
                 bottom: float = 0.0) -> None:
    """Mean ± std bars, every seed a dot, the mean written above.

    ``values`` maps a method key (of :data:`COLOURS`) to ``(tick label, per-seed values)``.
    """
    rng = np.random.default_rng(0)  # fixed jitter: the same figure every run
    tops = []
    for k, (key, (_, runs)) in enumerate(values.items()):
        runs = np.asarray(runs, dtype=np.float64)
        mean = runs.mean()
        std = runs.std(ddof=1) if runs.size > 1 else 0.0
        ax.bar(k, mean - bottom, bottom=bottom, yerr=std, color=COLOURS[key], alpha=0.85,
               width=0.65, capsize=4)
        ax.plot(k + rng.uniform(-0.12, 0.12, runs.size), runs, "o", color="black",
                markersize=3, alpha=0.6, zorder=3)
        top = max(mean + std, runs.max())
        tops.append(top)
        ax.annotate(format(mean, fmt), (k, top), xytext=(0, 3), textcoords="offset points",
                    ha="center", va="bottom", fontsize="x-small")
    ax.set_xticks(np.arange(len(values)), labels=[label for label, _ in values.values()],
                  fontsize="x-small")
    ax.set_ylim(bottom, bottom + (max(tops) - bottom) * 1.15 if max(tops) > bottom else 1.0)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize="medium")
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def _tick(label: str) -> str:
    return (label.replace(" (", "\n(").replace("logit ", "logit\n")
            .replace("optimal by ", "optimal by\n"))


def build_figure(result: dict):
    """Four panels: Σ relative loss and mean CKA per mapping (before distillation, top);
    test accuracy and test cross-entropy of the students trained with each (bottom)."""
    from matplotlib.figure import Figure

    per_seed = result["per_seed"]
    n = len(per_seed)
    fig = Figure(figsize=(19.0, 10.0), layout="constrained")
    axes = fig.subplot_mosaic([["relative"] * 2 + ["cka"] * 2 + ["rbf"] * 2,
                               ["accuracy"] * 3 + ["nll"] * 3])

    def runs(metric, keys):
        return {key: (_tick(MAPPING_LABELS.get(key) or LABELS[key]),
                      [s[metric][key] for s in per_seed]) for key in keys}

    _metric_bars(axes["relative"], runs("sum_relative_min_mse", MAPPINGS),
                 "Σ over the pairs of 1 − R²  (lower = better)",
                 "Before distillation: relative best-reachable loss of the\n"
                 "mapped pairs (teacher vs CE-only student; 4-pair mappings sum 4 terms)",
                 ".3f")
    _metric_bars(axes["cka"], runs("mean_cka", MAPPINGS),
                 "mean linear CKA over the pairs  (higher = more similar)",
                 "Before distillation: linear CKA of the mapped pairs\n"
                 "(teacher vs CE-only student)", ".3f")
    _metric_bars(axes["rbf"], runs("mean_rbf_cka", MAPPINGS),
                 "mean RBF CKA over the pairs  (higher = more similar)",
                 f"Before distillation: RBF CKA (σ = {result['settings']['rbf_bandwidth']:g} × "
                 "median distance)\nof the mapped pairs (teacher vs CE-only student)", ".3f")
    keys = ("ce", "kd", *MAPPINGS)
    accuracies = runs("accuracy", keys)
    every = [a for _, values in accuracies.values() for a in values]
    bottom = max(float(np.floor(min(every + [result["teacher_accuracy"]]) - 2.0)), 0.0)
    ax = axes["accuracy"]
    _metric_bars(ax, accuracies, f"test accuracy (%, axis starts at {bottom:g})",
                 f"After distillation: test accuracy of the students trained with each\n"
                 f"mapping ({n} seeds; grey: no hidden loss; dashed: the teacher, "
                 f"{result['teacher_accuracy']:.1f}%)",
                 ".2f", bottom=bottom)
    top = max(every + [result["teacher_accuracy"]])
    ax.set_ylim(bottom, min(top + 0.3 * (top - bottom), 100.0 + 0.1 * (100.0 - bottom)))
    ax.axhline(result["teacher_accuracy"], color="0.25", linestyle="--", linewidth=1.2)
    _metric_bars(axes["nll"], runs("test_nll", keys),
                 "test cross-entropy (nats, lower = better)",
                 "After distillation: test cross-entropy of the same students\n"
                 "(finer than accuracy: confidence, not just the argmax)", ".4f")
    fig.suptitle("Layer mappings compared on the demo's 12×128 teacher and 4×64 student "
                 "(bars: mean ± std over seeds; dots: seeds)", fontsize="medium")
    return fig


def run(quick: bool, seed: int, n_seeds: int | None) -> dict:
    """Train the teacher, then every seed's students; return everything as a dict."""
    from threadpoolctl import threadpool_limits

    settings = Settings.quick() if quick else Settings.full()
    if n_seeds is not None:
        settings = dataclasses.replace(settings, n_seeds=n_seeds)
    started = time.perf_counter()
    # The demo's seeding (pkd.demo.run_demo): split and teacher, then the student seeds.
    seeds = student_seeds(seed, settings.n_seeds)
    with threadpool_limits(limits=1, user_api="blas"):  # small GEMMs: one thread is faster
        prepared = prepare(seed, settings)
        data = prepared.data
        teacher_accuracy = accuracy(prepared.teacher, data.x_test, data.y_test)
        print(f"teacher: {teacher_accuracy:.2f}% test accuracy "
              f"({time.perf_counter() - started:.1f} s)", flush=True)
        per_seed = []
        for k in range(settings.n_seeds):
            per_seed.append(study_seed(k, seeds[k], data, prepared.outputs, settings))
            acc = per_seed[-1]["accuracy"]
            print(f"seed {k}: " + ", ".join(f"{key} {acc[key]:.2f}" for key in
                                            ("ce", "kd", *MAPPINGS))
                  + f" ({time.perf_counter() - started:.1f} s)", flush=True)
    result = {
        "teacher_accuracy": teacher_accuracy,
        "settings": {**settings.as_dict(), "seed": seed, "quick": quick,
                     "n_train": int(len(data.y_train)), "n_test": int(len(data.y_test)),
                     "split_seed": prepared.split_seed, "mapping_measure": MAPPING_MEASURE,
                     "rbf_bandwidth": DEFAULT_BANDWIDTH},
        "per_seed": per_seed,
    }
    result["summary"] = aggregate(per_seed)
    result["timing_s"] = {"total": round(time.perf_counter() - started, 2)}
    return result


def print_table(result: dict) -> None:
    print(f"\n{'mapping':<32}{'pairs':>5}  {'Σ 1-R²':>14}  {'mean CKA':>14}  "
          f"{'mean RBF CKA':>14}  {'accuracy %':>14}  {'vs KD':>6}  {'test CE':>8}")
    for row in result["summary"]["mappings"].values():
        rel, cka, acc = row["sum_relative_min_mse"], row["mean_cka"], row["accuracy"]
        rbf = row["mean_rbf_cka"]
        print(f"{row['label']:<32}{row['n_pairs']:>5}  {rel['mean']:>6.3f} ± {rel['std']:<5.3f}"
              f"  {cka['mean']:>6.3f} ± {cka['std']:<5.3f}  {rbf['mean']:>6.3f} ± "
              f"{rbf['std']:<5.3f}  {acc['mean']:>6.2f} ± "
              f"{acc['std']:<5.2f}  {row['accuracy_minus_kd']['mean']:+6.2f}  "
              f"{row['test_nll']['mean']:8.4f}")
    for row in result["summary"]["references"].values():
        acc = row["accuracy"]
        print(f"{row['label']:<32}{'-':>5}  {'-':>14}  {'-':>14}  {'-':>14}  {acc['mean']:>6.2f} ± "
              f"{acc['std']:<5.2f}  {'-':>6}  {row['test_nll']['mean']:8.4f}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="few steps, 2 seeds (a smoke run; writes to mapping_study-quick/)")
    parser.add_argument("--seed", type=int, default=0, help="base seed, as pkd demo's")
    parser.add_argument("--seeds", type=int, default=None,
                        help="number of student seeds (default: the demo's, 5; 2 with --quick)")
    parser.add_argument("--out", default=None,
                        help="output directory (default analysis/results/mapping_study)")
    args = parser.parse_args(argv)
    if args.seeds is not None and args.seeds < 1:
        parser.error("--seeds must be >= 1")
    out = output_dir(NAME, args.out, args.quick)
    result = run(args.quick, args.seed, args.seeds)
    fig = build_figure(result)
    from pkd import plots

    written = [write_json(out / "mapping_study.json", result),
               write_text(out / "mapping_study.md", markdown(result)),
               plots.save_figure(fig, out / "mapping_study.png")]
    print_table(result)
    print(f"\n{interpretation(result)}\n")
    print("wrote:\n" + "\n".join(f"  {p}" for p in written))
    return result


if __name__ == "__main__":
    main()
