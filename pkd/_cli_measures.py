"""The per-pair measures of ``pkd analyze`` and ``pkd fit --mapping optimal``.

What ``--measure`` can choose, the plan decided before streaming (the measure,
its bandwidth, whether held-out estimates are computed), the rows the mask and
``--tokens`` keep, one streaming pass over both dumps, RBF CKA on a
reproducible sample of those rows, and the layers constant over them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ._cli_common import CommandError, Console, _check_option, _on_terminal

if TYPE_CHECKING:
    from .alignment import AlignmentStats

# The measure behind ``--mapping optimal`` and the main heatmap when --measure is not
# given: RBF CKA at σ = 0.2 × the median distance found the corresponding layer of another
# copy of a network most often in analysis/results/layer_matching/layer_matching.md.
DEFAULT_MEASURE = "rbf-cka"


@dataclass(frozen=True)
class Measure:
    """A layer-pair measure ``--measure`` can choose."""

    name: str  # as a heading
    label: str  # the heatmap's colour-bar label
    key: str  # its name in summary.json / summary.csv
    maximize: bool  # a similarity (higher is better) rather than a cost


MEASURES = {
    "relative": Measure("In-sample 1 − R²", "in-sample 1 − R² = min-MSE / teacher variance",
                        "relative_min_mse", False),
    "heldout": Measure("Held-out 1 − R²", "held-out 1 − R² (k-fold mean)",
                       "heldout_relative_min_mse", False),
    "cka": Measure("Linear CKA", "linear CKA (1 = same representation)", "cka", True),
    "cka-debiased": Measure("Debiased linear CKA", "debiased linear CKA", "cka_debiased",
                            True),
    "rbf-cka": Measure("RBF CKA", "RBF CKA, σ = {bandwidth:g} × median distance", "rbf_cka",
                       True),
}
# Below this many rows per student dimension in-sample statistics flatter: a linear map
# of d inputs fits a few times d rows closely by chance alone.
ROWS_PER_WIDTH = 10
DEFAULT_FOLDS = 5


def _selected_rows(lead_shape: tuple, mask, tokens):
    """The rows the mask and ``--tokens`` keep, as a bool array of ``lead_shape`` (None: all)."""
    from ._validation import rows_mask, select_rows

    try:
        return rows_mask(lead_shape, select_rows(lead_shape, mask, tokens))
    except (TypeError, ValueError) as error:
        raise CommandError(str(error).replace("tokens=", "--tokens ")) from None


def _stream_stats(student, teacher, rows, chunk_rows: int, scheduler: str | None,
                  folds: int | None):
    """One pass over both dumps; the statistics of every (student, teacher) layer pair.

    ``rows`` (the mask and ``--tokens`` combined, resolved and said by the CLI) is
    passed as the mask, so the library applies exactly the rows the console names.
    """
    from .alignment import AlignmentStats

    common = {"chunk_rows": chunk_rows, "mask": rows, "folds": folds}
    try:
        if scheduler is not None:
            return AlignmentStats.from_dumps_dask(student, teacher, scheduler=scheduler,
                                                  **common)
        return AlignmentStats.from_dumps(student, teacher, progress=_on_terminal(), **common)
    except ImportError as error:  # dask lives in the `dask` extra; the message says so
        raise CommandError(str(error)) from None
    except (TypeError, ValueError) as error:
        raise CommandError(str(error)) from None


def _sample_rows(rows, n_rows: int, max_rows: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most ``max_rows`` kept rows, the same on every run."""
    kept = np.arange(n_rows) if rows is None else np.flatnonzero(rows.reshape(-1))
    if kept.size > max_rows:
        kept = np.sort(np.random.default_rng(seed).choice(kept, max_rows, replace=False))
    return kept


def _gather_rows(dump, index: np.ndarray, chunk_rows: int) -> list[np.ndarray]:
    """Rows ``index`` (sorted) of every layer of ``dump``, streamed: ``(len(index), d)`` each."""
    out = [np.empty((index.size, layer.width), dtype=layer.dtype) for layer in dump.layers]
    for start, stop, arrays in dump.iter_chunks(chunk_rows):
        lo, hi = np.searchsorted(index, (start, stop))
        for gathered, chunk in zip(out, arrays, strict=True):
            gathered[lo:hi] = chunk[index[lo:hi] - start]
    return out


def _rbf_cka(student, teacher, rows, chunk_rows: int, bandwidth: float,
             console: Console, known: dict) -> np.ndarray:
    """RBF CKA of every layer pair on a reproducible subsample of the kept rows.

    A layer constant over the subsample has no kernel bandwidth: its pairs are NaN,
    the other pairs computed without it; those not in ``known`` (the layers
    constant over all rows, already said) are said on stderr.
    """
    import re

    from .cka import DEFAULT_MAX_ROWS, rbf_cka_matrix

    # Subsampled here, while reading, so no more than these rows are ever in memory.
    index = _sample_rows(rows, student.n_rows, DEFAULT_MAX_ROWS)
    s_rows = _gather_rows(student, index, chunk_rows)
    t_rows = _gather_rows(teacher, index, chunk_rows)
    live = {side: [k for k, layer in enumerate(layers) if np.ptp(layer, axis=0).any()]
            for side, layers in (("student", s_rows), ("teacher", t_rows))}
    out = np.full((len(s_rows), len(t_rows)), np.nan)
    dead = {side: sorted(set(range(len(layers))) - set(live[side]))
            for side, layers in (("student", s_rows), ("teacher", t_rows))}
    new = {side: [k for k in found if k not in known[side]] for side, found in dead.items()}
    if new["student"] or new["teacher"]:
        console.warn("RBF CKA: " + _constant_text(new, f"the {index.size} rows it uses"))
    if not live["student"] or not live["teacher"]:
        return out

    def layer_name(match):  # the library names layers by their place in the lists it got
        side = match.group(1).split("_")[0]
        return f"{side} layer {live[side][int(match.group(2))]}"

    try:
        values = rbf_cka_matrix([s_rows[k] for k in live["student"]],
                                [t_rows[k] for k in live["teacher"]],
                                bandwidth=bandwidth, max_rows=index.size)
    except (TypeError, ValueError) as error:
        message = re.sub(r"(student_layers|teacher_layers)\[(\d+)\]", layer_name, str(error))
        raise CommandError(f"--measure rbf-cka: {message}") from None
    out[np.ix_(live["student"], live["teacher"])] = values
    return out


def _constant_text(layers: dict, rows: str) -> str:
    """``student layer(s) [..] and teacher layer(s) [..] are constant over <rows>: ...``."""
    named = " and ".join(f"{side} layer(s) {found}" for side, found in layers.items() if found)
    one = sum(map(len, layers.values())) == 1
    return (f"{named} {'is' if one else 'are'} constant over {rows} (no variance): every "
            f"similarity with {'it' if one else 'them'} is undefined (NaN in the heatmaps and "
            "summaries) and never chosen by the optimal mapping")


def _warn_constant(stats, console: Console) -> dict:
    """Name on stderr every layer constant over the rows used (its measures are NaN);
    return them, ``{"student": [...], "teacher": [...]}``."""
    layers = {
        "student": [s for s in range(stats.n_student)
                    if not np.trace(stats.student_gram(s, centered=True)) > 0],
        "teacher": np.flatnonzero(~(np.asarray(stats.teacher_variance()) > 0)).tolist()}
    if layers["student"] or layers["teacher"]:
        console.warn(_constant_text(layers, f"the {stats.n_rows} rows used"))
    return layers


def _matrices(stats, ridge: float, measure: str, folds: int | None, rbf) -> dict:
    """Every per-pair matrix the command reports, keyed as in summary.json."""
    try:
        values = {"min_mse": stats.min_mse(ridge=ridge),
                  "relative_min_mse": stats.relative_min_mse(ridge=ridge),
                  "cka": stats.cka()}
        if folds is not None:
            estimate = stats.relative_min_mse(ridge=ridge, heldout=True)
            values["heldout_relative_min_mse"] = np.asarray(estimate.mean)
            values["heldout_relative_min_mse_std"] = np.asarray(estimate.std)
        if measure == "cka-debiased":
            values["cka_debiased"] = stats.cka(debiased=True)
    except (TypeError, ValueError) as error:
        raise CommandError(str(error)) from None
    if measure == "rbf-cka":
        values["rbf_cka"] = rbf()
    return values


@dataclass
class Plan:
    """What ``analyze`` and ``fit --mapping optimal`` compute, decided before streaming."""

    measure: str
    folds: int | None
    rows_used: int
    student_width: int
    heldout_reason: str | None = None
    bandwidth: float | None = None  # RBF CKA's σ / median distance (rbf-cka only)


def _label(plan: Plan) -> str:
    """The colour-bar label of the plan's measure, with its bandwidth."""
    return MEASURES[plan.measure].label.format(bandwidth=plan.bandwidth)


def _check_bandwidth(args) -> float | None:
    """``--bandwidth`` checked (rbf-cka only); its default when not given."""
    from ._validation import check_positive
    from .cka import DEFAULT_BANDWIDTH

    if args.measure != "rbf-cka":
        if args.bandwidth is not None:
            raise CommandError(f"--bandwidth applies to --measure rbf-cka only, not to "
                               f"--measure {args.measure}")
        return None
    if args.bandwidth is None:
        return DEFAULT_BANDWIDTH
    return _check_option(check_positive, args.bandwidth, "--bandwidth")


def _plan(args, student, rows, console: Console, report_heldout: bool) -> Plan:
    """Choose the measure and whether held-out estimates are computed; warn on few rows.

    ``report_heldout``: held-out numbers are reported with few rows (analyze); otherwise
    they are computed only when the measure needs them (fit).
    """
    from ._validation import check_int

    measure = args.measure
    bandwidth = _check_bandwidth(args)
    rows_used = student.n_rows if rows is None else int(rows.sum())
    width = max(layer.width for layer in student.layers)
    few = rows_used <= ROWS_PER_WIDTH * width
    folds = _check_option(check_int, args.folds, "--folds")
    if folds < 2:
        raise CommandError(f"--folds must be >= 2 (k-fold estimates), got {folds}")
    wanted = getattr(args, "heldout", False) or measure == "heldout"
    reason = ("asked for" if wanted else
              f"rows ({rows_used}) <= {ROWS_PER_WIDTH} × the student width ({width})"
              if few and report_heldout else None)
    if few:
        console.warn(
            f"{rows_used} rows for a student width of {width} (≤ {ROWS_PER_WIDTH} × width): "
            "in-sample 1 − R² and CKA are optimistic with so few rows (a linear map fits "
            "noise)" + ("; held-out estimates are reported beside them" if report_heldout
                        else "")
        )
    if reason is None:
        return Plan(measure, None, rows_used, width, bandwidth=bandwidth)
    return Plan(measure, folds, rows_used, width, reason, bandwidth)


def _measure_layer_pairs(args, student, teacher, rows, chunk_rows: int, ridge: float,
                         console: Console, *, scheduler: str | None,
                         report_heldout: bool) -> tuple[Plan, AlignmentStats, dict]:
    """Plan, stream both dumps once and measure every layer pair: ``(plan, stats, values)``.

    ``stats`` holds the statistics of the rows used, ``values`` the matrices of
    :func:`_matrices`; the layers constant over those rows are named on stderr
    first. ``report_heldout`` as in :func:`_plan`.
    """
    plan = _plan(args, student, rows, console, report_heldout=report_heldout)
    stats = _stream_stats(student, teacher, rows, chunk_rows, scheduler, plan.folds)
    constant = _warn_constant(stats, console)
    values = _matrices(stats, ridge, plan.measure, plan.folds,
                       lambda: _rbf_cka(student, teacher, rows, chunk_rows, plan.bandwidth,
                                        console, constant))
    return plan, stats, values
