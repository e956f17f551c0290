"""How the demo's settings were chosen: on the validation split, before the test set.

:func:`select` trains the demo's teacher (the same split and teacher as the
final runs) and students on seeds the final runs never use, scores them on
the validation split carved from the training set, and fixes the settings
stage by stage, each stage keeping the choices of the ones before:

1. labelled fraction: the largest candidate at which the CE-only student is
   at least :data:`MIN_GAP` points below the teacher (so the teacher has
   something to teach, with room to spare);
2. learning rate and steps (checkpoints of the same runs): the best mean
   over all five methods, so no method is favoured;
3. α and τ: the best mean of logit KD (the baseline gets its best settings;
   PKD adds its hidden term on top with the same α and τ, as in the paper);
4. hidden weight λ: the best mean over the three PKD variants;
5. the PKD variant drawn in the accuracy-against-fraction curve: the best of
   the three at the chosen λ.

"Best" is the highest mean validation accuracy; ties go to the lower mean
validation NLL, then to the candidate listed first. The settings not yet
chosen start from :data:`STARTING_SETTINGS`, fixed here rather than read
from :class:`~pkd.demo.experiment.Settings`, whose defaults are the result:
a rerun starts where the recorded selection started. The record, with the
starting settings and every candidate's per-seed scores, is what
``analysis/demo_study.py --select`` writes; :class:`~pkd.demo.experiment.Settings`
holds the result.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import replace

import numpy as np

from .experiment import (
    MAPPING_MEASURE,
    METHODS,
    PKD_METHODS,
    Settings,
    accuracy,
    prepare,
    run_seed,
)

FRACTIONS = (0.05, 0.10)
LEARNING_RATES = (1e-3, 3e-3)
STEPS = (500, 1000, 1500)
ALPHAS = (0.7, 0.5, 0.9)
TEMPERATURES = (10.0, 5.0, 2.0)
HIDDEN_WEIGHTS = (1.0, 0.1, 0.3, 3.0, 10.0)
MIN_GAP = 5.0
N_SEEDS = 3
# The tuned settings before any stage chooses them: stage 1 trains CE with this
# learning rate and these steps, stage 2 trains KD and PKD with these α, τ and λ
# (the paper's α and τ, λ = 1). The recorded selection started from them.
STARTING_SETTINGS = {"lr": 1e-3, "student_steps": 1000, "alpha": 0.7, "temperature": 10.0,
                     "hidden_weight": 1.0}


def selection_seeds(seed: int, n_seeds: int) -> list:
    """Student seeds of the selection: a sequence the final runs never draw from."""
    return np.random.SeedSequence([seed, 1]).spawn(n_seeds)


def _score(values: list) -> dict:
    """Per-seed ``(accuracy, nll)`` pairs → ``{"accuracies", "nlls", "mean", "nll"}``."""
    accs = [float(a) for a, _ in values]
    nlls = [float(n) for _, n in values]
    return {"accuracies": accs, "nlls": nlls, "mean": float(np.mean(accs)),
            "nll": float(np.mean(nlls))}


def _best(candidates: list) -> int:
    """Index of the best candidate: highest mean accuracy, then lowest NLL, then first."""
    keys = [(-c["mean"], c["nll"], i) for i, c in enumerate(candidates)]
    return min(keys)[2]


def select(seed: int = 0, n_seeds: int = N_SEEDS, base: Settings | None = None,
           progress: bool = True, start: dict | None = None) -> dict:
    """Choose the demo's settings on the validation split (never the test set).

    Parameters
    ----------
    seed : int
        The demo's base seed (fixes the split and the teacher, as in ``pkd demo``).
    n_seeds : int
        Student seeds per candidate.
    base : Settings, optional
        Architecture, teacher and batch sizes (default ``Settings.full()``);
        its values of the settings in ``start`` are not used.
    progress : bool
        A tqdm bar on stderr.
    start : dict, optional
        Settings field -> value the tuned settings start from (default
        :data:`STARTING_SETTINGS`).

    Returns
    -------
    dict
        ``{"starting_settings": {...}, "stages": [...], "chosen": {...},
        "teacher_val_accuracy", "seconds", ...}``.
    """
    import sys

    from threadpoolctl import threadpool_limits
    from tqdm.auto import tqdm

    from . import on_terminal

    start = dict(STARTING_SETTINGS if start is None else start)
    unknown = sorted(set(start) - set(Settings.__dataclass_fields__))
    if unknown:
        raise ValueError(f"start: {unknown} are not fields of pkd.demo.experiment.Settings; "
                         f"pass Settings field names, e.g. {sorted(STARTING_SETTINGS)}")
    settings = replace(Settings.full() if base is None else base, **start)
    started = time.perf_counter()
    seeds = selection_seeds(seed, n_seeds)
    stages = []
    with threadpool_limits(limits=1, user_api="blas"), tqdm(
            disable=not (progress and on_terminal()), file=sys.stderr, unit="run") as bar:
        prepared = prepare(seed, settings)
        data, teacher = prepared.data, prepared.outputs
        validation = (data.x_val, data.y_val)
        teacher_val = accuracy(prepared.teacher, *validation)

        def runs(stage_settings, methods, fraction=None, checkpoints=()):
            outcomes = []
            for k, child in enumerate(seeds):
                bar.set_description(f"selection: {methods}")
                outcomes.append(run_seed(k, child, data, teacher, stage_settings, validation,
                                         fraction=fraction, methods=methods,
                                         checkpoints=checkpoints))
                bar.update()
            return outcomes

        def final_scores(outcomes, methods):
            return _score([(np.mean([o.runs[m].accuracy for m in methods]),
                            np.mean([o.runs[m].nll for m in methods])) for o in outcomes])

        # 1. labelled fraction, by the CE-only student's gap to the teacher.
        candidates = []
        for fraction in FRACTIONS:
            score = final_scores(runs(settings, ("ce",), fraction=fraction), ("ce",))
            candidates.append({"labelled_fraction": fraction, **score,
                               "gap_to_teacher": teacher_val - score["mean"]})
        eligible = [c for c in candidates if c["gap_to_teacher"] >= MIN_GAP]
        chosen = max(eligible, key=lambda c: c["labelled_fraction"]) if eligible else min(
            candidates, key=lambda c: c["labelled_fraction"])
        settings = replace(settings, labelled_fraction=chosen["labelled_fraction"])
        stages.append({"name": "labelled fraction", "scored_by": "CE only",
                       "rule": f"largest fraction with teacher − CE ≥ {MIN_GAP:g} points "
                               "(validation accuracy)",
                       "candidates": candidates,
                       "chosen": {"labelled_fraction": settings.labelled_fraction}})

        # 2. learning rate and steps: all five methods, steps read at checkpoints.
        candidates = []
        for lr in LEARNING_RATES:
            stage = replace(settings, lr=lr, student_steps=max(STEPS))
            outcomes = runs(stage, METHODS, checkpoints=STEPS)
            for steps in STEPS:
                values = [(np.mean([o.runs[m].checkpoint_scores[steps][0] for m in METHODS]),
                           np.mean([o.runs[m].checkpoint_scores[steps][1] for m in METHODS]))
                          for o in outcomes]
                per_method = {m: float(np.mean([o.runs[m].checkpoint_scores[steps][0]
                                                for o in outcomes])) for m in METHODS}
                candidates.append({"lr": lr, "student_steps": steps, **_score(values),
                                   "mean_per_method": per_method})
        chosen = candidates[_best(candidates)]
        settings = replace(settings, lr=chosen["lr"], student_steps=chosen["student_steps"])
        stages.append({"name": "learning rate and steps", "scored_by": "mean of all methods",
                       "rule": "best mean validation accuracy (then NLL)",
                       "candidates": candidates,
                       "chosen": {"lr": settings.lr, "student_steps": settings.student_steps}})

        # 3. alpha and tau, by logit KD.
        candidates = []
        for alpha, temperature in itertools.product(ALPHAS, TEMPERATURES):
            stage = replace(settings, alpha=alpha, temperature=temperature)
            score = final_scores(runs(stage, ("kd",)), ("kd",))
            candidates.append({"alpha": alpha, "temperature": temperature, **score})
        chosen = candidates[_best(candidates)]
        settings = replace(settings, alpha=chosen["alpha"], temperature=chosen["temperature"])
        stages.append({"name": "alpha and temperature", "scored_by": "logit KD",
                       "rule": "best mean validation accuracy (then NLL)",
                       "candidates": candidates,
                       "chosen": {"alpha": settings.alpha,
                                  "temperature": settings.temperature}})

        # 4. hidden weight, by the mean of the three PKD variants; 5. the curve's variant.
        candidates = []
        for weight in HIDDEN_WEIGHTS:
            outcomes = runs(replace(settings, hidden_weight=weight), PKD_METHODS)
            per_method = {m: _score([(o.runs[m].accuracy, o.runs[m].nll) for o in outcomes])
                          for m in PKD_METHODS}
            candidates.append({"hidden_weight": weight,
                               **final_scores(outcomes, PKD_METHODS),
                               "per_method": per_method})
        chosen = candidates[_best(candidates)]
        settings = replace(settings, hidden_weight=chosen["hidden_weight"])
        stages.append({"name": "hidden weight", "scored_by": "mean of the three PKD variants",
                       "rule": "best mean validation accuracy (then NLL)",
                       "candidates": candidates,
                       "chosen": {"hidden_weight": settings.hidden_weight}})
        variants = [{"method": m, **chosen["per_method"][m]} for m in PKD_METHODS]
        best_variant = variants[_best(variants)]["method"]
        settings = replace(settings, curve_method=best_variant)
        stages.append({"name": "PKD variant of the fraction curve",
                       "scored_by": "each PKD variant at the chosen hidden weight",
                       "rule": "best mean validation accuracy (then NLL)",
                       "candidates": variants, "chosen": {"curve_method": best_variant}})

    keys = ("labelled_fraction", "lr", "student_steps", "alpha", "temperature",
            "hidden_weight", "curve_method")
    return {
        "seed": seed,
        "n_seeds": n_seeds,
        "n_train": int(len(data.y_train)),
        "n_val": int(len(data.y_val)),
        "teacher_val_accuracy": teacher_val,
        "mapping_measure": MAPPING_MEASURE,
        "starting_settings": start,
        "stages": stages,
        "chosen": {k: getattr(settings, k) for k in keys},
        "seconds": round(time.perf_counter() - started, 1),
    }


def _value(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def selection_markdown(record: dict) -> str:
    """The selection record as a readable page (every candidate, its mean, the choice)."""
    one = 100.0 / record["n_val"]
    lines = [
        "# How the demo's settings were chosen (validation split only)",
        "",
        f"Teacher validation accuracy {record['teacher_val_accuracy']:.2f}% on "
        f"{record['n_val']} validation images (one image = {one:.2f} points); "
        f"{record['n_seeds']} student seeds per candidate, none of them used by the final "
        f"runs; {record['seconds']:.0f} s. Stages run in order, each keeping the choices "
        "before it; ties go to the lower validation NLL, then to the candidate listed first. "
        "PKD-optimal's mapping was chosen by "
        f"{record.get('mapping_measure', 'cka')!r} (`pkd.demo.experiment.MEASURE_TEXT`).",
        "",
    ]
    if "starting_settings" in record:
        start = ", ".join(f"{k} = {_value(v)}" for k, v in record["starting_settings"].items())
        lines += [f"Starting settings (before any stage chose them): {start}.", ""]
    for stage in record["stages"]:
        lines += [f"## {stage['name']} (scored by {stage['scored_by']}; {stage['rule']})", ""]
        keys = [k for k in stage["candidates"][0] if k not in (
            "accuracies", "nlls", "mean", "nll", "per_method", "mean_per_method",
            "gap_to_teacher")]
        lines.append("| " + " | ".join(keys) + " | mean val acc (%) | per seed | mean NLL |")
        lines.append("|" + "---|" * (len(keys) + 3))
        for c in stage["candidates"]:
            seeds = ", ".join(f"{a:.2f}" for a in c["accuracies"])
            lines.append("| " + " | ".join(_value(c[k]) for k in keys)
                         + f" | {c['mean']:.2f} | {seeds} | {c['nll']:.3f} |")
        chosen = ", ".join(f"{k} = {_value(v)}" for k, v in stage["chosen"].items())
        lines += ["", f"Chosen: {chosen}.", ""]
    chosen = ", ".join(f"{k} = {_value(v)}" for k, v in record["chosen"].items())
    lines += ["## Result", "", f"{chosen}. These are the defaults of "
              "`pkd.demo.experiment.Settings`.", ""]
    return "\n".join(lines)

