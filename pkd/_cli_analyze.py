"""``pkd analyze``: the alignment of every layer pair, from a student and a teacher dump.

The mappings compared by the chosen measure, the held-out near-tie check, the
figures, summary.json and summary.csv, and the table on stdout.
"""

from __future__ import annotations

import json

import numpy as np

from ._atomic import figure_writer, text_writer, write_together
from ._cli_common import (
    CommandError,
    Console,
    _check_option,
    _check_ridge,
    _load_pair,
    _out_dir,
    _positive_int,
)
from ._cli_mapping import (
    _EXPLICIT_HINT,
    FIXED_MAPPINGS,
    _check_optimal_exists,
    _fixed_strategies,
    _layer_conventions,
    _optimal,
    _parse_mapping_arg,
)
from ._cli_measures import MEASURES, _label, _measure_layer_pairs, _selected_rows


def _as_cost(matrix: np.ndarray, maximize: bool) -> np.ndarray:
    """A cost to minimise, undefined (NaN) pairs forbidden (+inf).

    A constant layer has no variance, so its measures are NaN: there is
    nothing to distil from it, so its pairs are forbidden rather than the
    whole matrix refused (``_optimal`` in pkd._cli_mapping does the same).
    """
    cost = -matrix if maximize else matrix
    return np.where(np.isnan(cost), np.inf, cost)


def _runner_up(cost: np.ndarray, best: list) -> list | None:
    """The best mapping other than ``best`` (it lacks at least one of best's pairs)."""
    from . import mapping

    found = None
    for pair in best:
        excluded = cost.copy()
        excluded[pair] = np.inf
        try:
            candidate = mapping.optimal(excluded)
        except ValueError:
            continue
        total = sum(excluded[p] for p in candidate)
        if found is None or total < found[0]:
            found = (total, candidate)
    return None if found is None else found[1]


def _near_tie(mean: np.ndarray, std: np.ndarray, rows: list[int], cols: list[int]) -> dict:
    """Does the held-out optimal mapping beat its runner-up by more than the folds' spread?

    The spread is the fold-to-fold standard deviation of the pairs in which
    the two mappings differ, combined as independent (root of summed squares).
    """
    from . import mapping

    cost = _as_cost(mean[np.ix_(rows, cols)], False)
    try:
        best = mapping.optimal(cost)
    except ValueError:
        return {"optimal_mapping": None}
    second = _runner_up(cost, best)
    result = {"optimal_mapping": [[rows[s], cols[t]] for s, t in best]}
    if second is None:
        return result | {"runner_up": None}
    sub_std = std[np.ix_(rows, cols)]
    differ = set(best) ^ set(second)
    gap = float(sum(cost[p] for p in second) - sum(cost[p] for p in best))
    spread = float(np.sqrt(sum(sub_std[p] ** 2 for p in differ)))
    return result | {"runner_up": [[rows[s], cols[t]] for s, t in second], "gap": gap,
                     "fold_spread": spread, "near_tie": bool(gap < spread)}


def _json_safe(value):
    """``value`` with every non-finite float as None: JSON has no NaN or Infinity."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return value


def _json_writer(payload):
    return text_writer(json.dumps(_json_safe(payload), indent=2, allow_nan=False) + "\n")


def _pairs_text(pairs) -> str:
    return ",".join(f"{s}:{t}" for s, t in pairs)


ANALYZE_OUTPUTS = ("alignment.png", "best_reachable.png", "cka.png", "spectra.png",
                   "summary.json", "summary.csv")
ANALYZE_FILES = """\
writes into --out:
  alignment.png       heatmap of --measure per layer pair, with the mappings marked
  best_reachable.png  heatmap of the in-sample 1 − R² a linear projection reaches
  cka.png             heatmap of linear CKA
  spectra.png         singular values of the closed-form projections of the mapping
  summary.json        every matrix, the strategies, the mask and layer conventions used,
                      the warnings
  summary.csv         one row per layer pair"""


def cmd_analyze(args) -> None:
    from . import plots
    from .spectrum import spectrum, xavier_mp_edges

    console = Console("analyze")
    out = _out_dir(args.out, ANALYZE_OUTPUTS)
    ridge = _check_ridge(args.ridge)
    chunk_rows = _check_option(_positive_int, args.chunk_rows, "--chunk-rows")
    student, teacher, mask = _load_pair(args, console)
    s_layers, t_layers = _layer_conventions(student, teacher, args, console)
    rows_s = s_layers.mappable(args.include_embeddings)
    rows_t = t_layers.mappable(args.include_embeddings)
    rows = _selected_rows(student.lead_shape, mask.mask, args.tokens)
    # Every mapping but "optimal" depends on the layer counts only: check it before streaming.
    strategies = _fixed_strategies(s_layers, t_layers, args.include_embeddings)
    explicit = args.mapping is not None
    chosen_name = "optimal" if args.mapping is None else args.mapping.strip().lower()
    custom = None
    hint = _EXPLICIT_HINT if explicit and chosen_name == "optimal" else ""
    if chosen_name == "optimal":
        if explicit:
            _check_optimal_exists(len(rows_s), len(rows_t), hint)
    else:
        custom = _parse_mapping_arg(args.mapping, s_layers, t_layers, args.include_embeddings)
        if chosen_name not in FIXED_MAPPINGS:
            chosen_name = "custom"
    plan, stats, values = _measure_layer_pairs(args, student, teacher, rows, chunk_rows, ridge,
                                               console, scheduler=args.scheduler,
                                               report_heldout=True)
    measure = MEASURES[plan.measure]
    main = values[measure.key]
    no_optimal = None  # why there is no optimal mapping, when it is not the one asked for
    try:
        strategies["optimal"] = _optimal(main, measure.maximize, rows_s, rows_t, hint)
    except CommandError as error:
        if explicit and chosen_name == "optimal":
            raise
        no_optimal = str(error)
    if custom is not None:
        strategies[chosen_name] = custom
    chosen = strategies.get(chosen_name)
    heldout = None
    if plan.folds is not None:
        heldout = {"folds": plan.folds, "reason": plan.heldout_reason} | _near_tie(
            values["heldout_relative_min_mse"], values["heldout_relative_min_mse_std"],
            rows_s, rows_t)
        if heldout.get("near_tie"):
            console.warn(
                f"a near-tie is not a choice: by held-out 1 − R² the optimal mapping "
                f"{_pairs_text(heldout['optimal_mapping'])} beats the runner-up "
                f"{_pairs_text(heldout['runner_up'])} by {heldout['gap']:.3g}, less than the "
                f"fold-to-fold spread {heldout['fold_spread']:.3g}")

    columns = ["min_mse", "relative_min_mse", "cka"]
    columns += [k for k in ("heldout_relative_min_mse", measure.key) if k in values
                and k not in columns]
    table = []
    for name, pairs in strategies.items():
        row = {"strategy": name, "n_pairs": len(pairs), "pairs": [list(p) for p in pairs]}
        for key in columns:  # per-pair means: strategies of different lengths compare
            row[f"mean_{key}"] = float(np.mean([values[key][p] for p in pairs]))
        table.append(row)

    spectra, widths = {}, (student.width(0), teacher.width(0))
    shown = chosen[:3] if chosen else _best_pairs(main, measure.maximize, rows_s, rows_t)[:3]
    for pair in shown:
        spectra[f"closed form s{pair[0]}→t{pair[1]}"] = stats.projection(*pair, ridge=ridge)
    from .distillation import xavier_uniform

    d_s, d_t = stats.student_widths[shown[0][0]], stats.teacher_widths[shown[0][1]]
    spectra["Xavier init"] = xavier_uniform(d_s, d_t, seed=0)
    embeddings = {"student_embeddings": s_layers.embeddings,
                  "teacher_embeddings": t_layers.embeddings}
    figures = {
        out / "alignment.png": plots.alignment_heatmap(
            main, mappings=strategies, value_label=_label(plan), **embeddings,
            title=f"{measure.name} per layer pair"),
        out / "best_reachable.png": plots.alignment_heatmap(
            values["relative_min_mse"], mappings=strategies, **embeddings,
            value_label=MEASURES["relative"].label,
            title="Best-reachable loss of a linear projection per layer pair"),
        out / "cka.png": plots.alignment_heatmap(
            values["cka"], mappings=strategies, value_label=MEASURES["cka"].label, **embeddings,
            title="Linear CKA per layer pair"),
        out / "spectra.png": plots.projection_spectrum(
            spectra, mp_edges=xavier_mp_edges(d_s, d_t),
            title=f"Projection spectra ({d_s}→{d_t}), "
                  + (f"mapping '{chosen_name}'" if chosen else "best teacher layer per row")),
    }
    summary = {
        "student_dump": str(args.student), "teacher_dump": str(args.teacher),
        "rows": int(stats.n_rows), "n_student_layers": s_layers.count,
        "n_teacher_layers": t_layers.count,
        "student_widths": list(map(int, stats.student_widths)),
        "teacher_widths": list(map(int, stats.teacher_widths)),
        "mask": mask.description, "tokens": args.tokens,
        "embeddings_index": {"student": s_layers.embeddings, "teacher": t_layers.embeddings,
                             "student_source": s_layers.source,
                             "teacher_source": t_layers.source},
        "include_embeddings": bool(args.include_embeddings),
        "ridge": ridge, "measure": plan.measure, "measure_maximize": measure.maximize,
        "bandwidth": plan.bandwidth,
        "chosen_mapping": chosen_name if chosen else None, "strategies": table,
        "optimal_mapping": ([list(p) for p in strategies["optimal"]]
                            if "optimal" in strategies else None),
        "no_optimal_mapping": no_optimal,
        "heldout": heldout,
        "warnings": console.warnings,
        "chosen_spectrum": {k: spectrum(v).summary() for k, v in spectra.items()},
    }
    summary |= {key: value.tolist() for key, value in values.items()}

    csv_keys = list(values)
    csv = ["student_layer,teacher_layer," + ",".join(csv_keys)]
    csv += [f"{s},{t}," + ",".join(f"{values[k][s, t]:.9g}" for k in csv_keys)
            for s in range(s_layers.count) for t in range(t_layers.count)]
    files = {path: figure_writer(fig) for path, fig in figures.items()}
    files[out / "summary.json"] = _json_writer(summary)
    files[out / "summary.csv"] = text_writer("\n".join(csv) + "\n")
    write_together(files)

    _print_analysis(stats, s_layers, t_layers, widths, ridge, mask, plan, table, columns,
                    strategies, no_optimal, heldout)
    print(f"wrote {', '.join(sorted(p.name for p in files))} to {out}/")


def _best_pairs(matrix, maximize: bool, rows: list[int], cols: list[int]) -> list:
    """Each mappable student layer with its best teacher layer (when no mapping exists)."""
    cost = _as_cost(np.asarray(matrix)[np.ix_(rows, cols)], maximize)
    return [(s, cols[int(np.argmin(cost[i]))]) for i, s in enumerate(rows)
            if np.isfinite(cost[i]).any()] or [(rows[0], cols[0])]


_HEADINGS = {"min_mse": "min-MSE", "relative_min_mse": "1 − R²", "cka": "CKA",
             "heldout_relative_min_mse": "held-out", "cka_debiased": "dCKA",
             "rbf_cka": "RBF CKA"}


def _print_analysis(stats, s_layers, t_layers, widths, ridge, mask, plan, table, columns,
                    strategies, no_optimal, heldout) -> None:
    print(f"{stats.n_rows} rows, {s_layers.count} student × {t_layers.count} teacher layers "
          f"(widths {widths[0]} → {widths[1]}), ridge {ridge}")
    print(f"mask: {mask.description}")
    emb = {"student": s_layers.embeddings, "teacher": t_layers.embeddings}
    print("embeddings: " + ", ".join(f"{k} index {v}" if v is not None else f"{k} none"
                                     for k, v in emb.items()))
    heads = "".join(f" {'mean ' + _HEADINGS[k]:>14}" for k in columns)
    print(f"{'strategy':<9} {'pairs':>5}{heads}  mapping")
    for row in table:
        cells = "".join(f" {row[f'mean_{k}']:>14.4g}" for k in columns)
        print(f"{row['strategy']:<9} {row['n_pairs']:>5}{cells}  {_pairs_text(row['pairs'])}")
    measure = MEASURES[plan.measure]
    if no_optimal is None:
        print(f"optimal mapping (by {plan.measure}, "
              f"{'maximised' if measure.maximize else 'minimised'}): "
              f"{_pairs_text(strategies['optimal'])}")
    else:
        print(no_optimal)
    if heldout is not None and heldout.get("runner_up") is not None:
        verdict = ("a near-tie is not a choice: the held-out optimal mapping beats the "
                   "runner-up by less than the fold-to-fold spread" if heldout["near_tie"] else
                   "the held-out optimal mapping beats the runner-up by more than the "
                   "fold-to-fold spread")
        print(f"held-out ({heldout['folds']} folds): optimal "
              f"{_pairs_text(heldout['optimal_mapping'])}, runner-up "
              f"{_pairs_text(heldout['runner_up'])}, gap {heldout['gap']:.3g} vs spread "
              f"{heldout['fold_spread']:.3g}: {verdict}")
