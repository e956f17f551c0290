"""The ``pkd`` command: ``demo``, ``analyze``, ``fit``, ``bench``, ``dump``.

Every command validates its inputs before any expensive work, computes
everything, and only then writes its outputs: each to a temporary file, all
renamed into place once every one is written. An error never leaves partial
outputs behind, and inputs are never modified. Tables go to stdout; warnings,
the conventions a command assumes and progress bars (on a terminal only) go to
stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._atomic import check_output_dir, figure_writer, text_writer, write_together


class CommandError(Exception):
    """A user-facing error: printed as ``pkd <command>: error: ...``, exit status 2."""


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
FIXED_MAPPINGS = ("uniform", "skip", "last")
GRADIENT_OPTIONS = ("steps", "lr", "batch_size", "seed")  # what --method closed_form ignores
DEFAULT_STEPS = 500
DEFAULT_SEED = 0


class Console:
    """stderr notes of one command, also collected for its summary."""

    def __init__(self, command: str):
        self.command = command
        self.warnings: list[str] = []

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        print(f"pkd {self.command}: warning: {text}", file=sys.stderr)


def _on_terminal() -> bool:
    """Progress bars only where a person watches: never into pipes or logs."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


# --- shared helpers -----------------------------------------------------------------


def _out_dir(path: str, names=()) -> Path:
    """Check that ``path`` is (or can be created as) a writable directory; create nothing.

    ``names`` are the files the command will write there; one that is a
    directory is refused now rather than after the computation.
    """
    try:
        out = check_output_dir(path, "--out")
    except ValueError as error:
        raise CommandError(str(error)) from None
    for name in names:
        if (out / name).is_dir():
            raise CommandError(f"cannot write {out / name}: it is a directory")
    return out


def _out_file(path: str, flag: str) -> Path:
    """Check that the file ``path`` can be written: its directory exists and is writable."""
    import os

    target = Path(path)
    if target.is_dir():
        raise CommandError(f"{flag} {target} is a directory; give a file name")
    if not target.parent.is_dir():
        raise CommandError(
            f"{flag} {target}: directory {target.parent} does not exist (create it first)"
        )
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise CommandError(f"{flag} {target}: directory {target.parent} is not writable")
    return target


def _check_option(check, value, flag: str):
    """``check(value, flag)`` from pkd._validation, its error as a CommandError."""
    try:
        return check(value, flag)
    except (TypeError, ValueError) as error:
        raise CommandError(str(error)) from None


def _positive_int(value, name):
    from ._validation import check_positive_int

    return check_positive_int(value, name)


def _check_ridge(ridge: float) -> float:
    from ._validation import check_nonnegative

    return _check_option(check_nonnegative, ridge, "--ridge")


def _check_dump_path(path: str, role: str) -> None:
    """A directory given as a dump is named as such, with the dump files it holds."""
    given = Path(path)
    if given.is_dir():
        found = sorted(p.name for p in given.iterdir()
                       if p.suffix.lower() in (".safetensors", ".npz"))
        inside = (f"; it holds {', '.join(found)}" if found else
                  "; it holds no .safetensors or .npz file")
        raise CommandError(
            f"{role} dump {given} is a directory, not a dump file: give the .safetensors or "
            f".npz file itself{inside}"
        )


@dataclass
class MaskUse:
    """The mask a command applies, and where it came from (said on the console and kept)."""

    mask: np.ndarray | None
    description: str  # "no mask", or the key and the file(s) it came from


def _load_pair(args, console: Console):
    """Open both dumps and check they describe the same rows; return (s, t, MaskUse)."""
    from .io import MASK_KEY, check_same_texts, load_dump

    mask_key = args.mask_key
    _check_dump_path(args.student, "student")
    _check_dump_path(args.teacher, "teacher")
    try:
        student = load_dump(args.student, mask_key=mask_key)
        teacher = load_dump(args.teacher, mask_key=mask_key)
    except FileNotFoundError as error:
        raise CommandError(str(error)) from None
    check_same_texts(student, teacher)  # the same texts (where recorded) and rows
    owners = [d for d in (student, teacher) if d.attention_mask is not None]
    if not owners and mask_key != MASK_KEY:
        # A dump may lack the default mask, but a key asked for by name that no dump
        # has is a typo: ignoring it would silently count the padding.
        found = sorted(set(student.extra_keys) | set(teacher.extra_keys))
        raise CommandError(
            f"--mask-key {mask_key!r}: neither {args.student} nor {args.teacher} has that "
            f"key (other keys found: {', '.join(map(repr, found)) or 'none'})"
        )
    if len(owners) == 2 and not np.array_equal(student.attention_mask, teacher.attention_mask):
        n_diff = int((student.attention_mask != teacher.attention_mask).sum())
        raise CommandError(
            f"the dumps' {mask_key!r} masks differ at {n_diff} position(s): "
            f"{args.student} and {args.teacher} must come from the same batch"
        )
    if len(owners) == 2:
        use = MaskUse(student.attention_mask,
                      f"{mask_key!r} of {args.student} and {args.teacher} (identical)")
    elif owners:
        other = args.teacher if owners[0] is student else args.student
        use = MaskUse(owners[0].attention_mask,
                      f"{mask_key!r} of {owners[0].path} ({other} has none)")
    else:
        use = MaskUse(None, "no mask")
        if len(student.lead_shape) == 2:
            console.warn(
                f"neither {args.student} nor {args.teacher} has a {mask_key!r} mask: every "
                f"one of the {student.n_rows} (batch, position) rows counts, padding included "
                "(save the attention mask with the dumps, or name its key with --mask-key)"
            )
    return student, teacher, use


# --- layers: which indices are the embeddings ------------------------------------


def _parse_embeddings_option(text: str | None):
    """``--embeddings-index``: None (not given), "none" or an int >= 0."""
    if text is None:
        return None
    if text.strip().lower() == "none":
        return "none"
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise CommandError(
            f'--embeddings-index must be a layer index >= 0 or "none", got {text!r}'
        )
    return value


@dataclass
class Layers:
    """The layer convention of one dump: which index (if any) holds the embeddings."""

    count: int
    embeddings: int | None
    source: str  # where the convention comes from, for summary.json

    def mappable(self, include_embeddings: bool) -> list[int]:
        """The dump indices the mapping strategies pair: transformer layers, or all."""
        if include_embeddings or self.embeddings is None:
            return list(range(self.count))
        return [i for i in range(self.count) if i != self.embeddings]


def _layer_conventions(student, teacher, args, console: Console) -> tuple[Layers, Layers]:
    """Both dumps' layer conventions; one note on stderr for the dumps that do not say."""
    option = _parse_embeddings_option(args.embeddings_index)
    silent = [path for dump, path in ((student, args.student), (teacher, args.teacher))
              if option is None and dump.has_embeddings is None]
    if silent:
        console.warn(
            f"no embeddings_index in {' or '.join(map(str, silent))}: treating every layer "
            "as a transformer layer; pass --embeddings-index 0 if index 0 holds the "
            "embeddings (as in Hugging Face hidden_states), or --embeddings-index none to "
            "say there are none"
        )
    return (_layer_convention(student, args.student, option),
            _layer_convention(teacher, args.teacher, option))


def _layer_convention(dump, path: str, option) -> Layers:
    """The embeddings' index of ``dump``: its metadata, ``--embeddings-index``, or none."""
    recorded = dump.has_embeddings is not None
    own = dump.embeddings_index
    if option is None:
        if not recorded:
            return Layers(dump.n_layers, None, "assumed: no embeddings (no metadata)")
        index, source = own, f"metadata of {path}"
    else:
        index = None if option == "none" else option
        if recorded and own != index:
            raise CommandError(
                f"--embeddings-index {option} contradicts {path}, whose metadata says "
                f"embeddings_index={own if own is not None else 'none'}: drop the option "
                "(it is for dumps that do not say)"
            )
        source = f"--embeddings-index {option}"
    if index is not None and index >= dump.n_layers:
        raise CommandError(
            f"embeddings index {index} ({source}) is out of range: {path} has "
            f"{dump.n_layers} layer(s)"
        )
    return Layers(dump.n_layers, index, source)


def _fixed_strategies(student: Layers, teacher: Layers, include_embeddings: bool) -> dict:
    """uniform / PKD-Skip / PKD-Last in dump indices, where they exist for these sizes."""
    from . import mapping

    s_layers = student.mappable(include_embeddings)
    t_layers = teacher.mappable(include_embeddings)
    found = {}
    for name in FIXED_MAPPINGS:
        try:
            pairs = mapping.MAPPINGS[name](len(s_layers), len(t_layers))
        except ValueError:
            continue
        found[name] = [(s_layers[s], t_layers[t]) for s, t in pairs]
    return found


def _parse_mapping_arg(text: str, student: Layers, teacher: Layers, include_embeddings: bool):
    """A fixed strategy by name (in dump indices) or explicit pairs, as the CLI spells them."""
    from . import mapping

    name = text.strip().lower()
    if name in FIXED_MAPPINGS:
        strategies = _fixed_strategies(student, teacher, include_embeddings)
        if name not in strategies:  # say why, with the counts the strategy saw
            s_layers = student.mappable(include_embeddings)
            t_layers = teacher.mappable(include_embeddings)
            left_out = len(s_layers) < student.count or len(t_layers) < teacher.count
            try:
                mapping.MAPPINGS[name](len(s_layers), len(t_layers))
            except ValueError as error:
                note = (" (counted in transformer layers: the embeddings are left out unless "
                        "--include-embeddings)" if left_out else "")
                raise CommandError(f"--mapping {text}: {error}{note}") from None
        return strategies[name]
    if ":" not in name:
        raise CommandError(
            f"--mapping {text!r} is not a mapping: choose from uniform, skip, last, optimal, "
            'or give explicit student:teacher pairs such as "0:2,1:5"'
        )
    try:
        return mapping.parse_mapping(text, student.count, teacher.count)
    except (ValueError, TypeError) as error:
        raise CommandError(f"--mapping {text!r}: {error}") from None


# --- rows, statistics and measures ----------------------------------------------


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


def _as_cost(matrix: np.ndarray, maximize: bool) -> np.ndarray:
    """A cost to minimise, undefined (NaN) pairs forbidden (+inf).

    A constant layer has no variance, so its measures are NaN: there is
    nothing to distil from it, so its pairs are forbidden rather than the
    whole matrix refused (:func:`_optimal` does the same).
    """
    cost = -matrix if maximize else matrix
    return np.where(np.isnan(cost), np.inf, cost)


def _optimal(matrix, maximize: bool, rows: list[int], cols: list[int], hint: str = ""):
    """``mapping.optimal`` over the mappable layers, or a CommandError saying why none exists."""
    from . import mapping

    n_s, n_t = len(rows), len(cols)
    _check_optimal_exists(n_s, n_t, hint)
    values = np.asarray(matrix)[np.ix_(rows, cols)]
    undefined = np.isnan(values)
    dead_rows = [rows[i] for i in np.flatnonzero(undefined.all(axis=1))]
    if undefined.all():
        raise CommandError(f"no optimal mapping: the measure is undefined (NaN) for every "
                           f"layer pair: constant layers, named in the warnings{hint}")
    if dead_rows:
        raise CommandError(
            f"no optimal mapping: student layer(s) {dead_rows} are constant over the rows "
            f"used (no variance, so the measure is undefined for every pair with them), and "
            f"an optimal mapping maps every student layer{hint}"
        )
    try:
        pairs = mapping.optimal(np.where(undefined, -np.inf if maximize else np.inf, values),
                                maximize=maximize)
    except ValueError as error:
        constant = [cols[j] for j in np.flatnonzero(undefined.all(axis=0))]
        if not constant:
            raise CommandError(f"no optimal mapping: {error}{hint}") from None
        raise CommandError(
            f"no optimal mapping: teacher layer(s) {constant} are constant over the rows "
            f"used (no variance, so the measure is undefined), which leaves fewer "
            f"teacher layers than the {n_s} student layers{hint}"
        ) from None
    return [(rows[s], cols[t]) for s, t in pairs]


# Appended to the reason there is no optimal mapping when --mapping optimal was asked for.
_EXPLICIT_HINT = "; give explicit pairs to --mapping"


def _check_optimal_exists(n_s: int, n_t: int, hint: str = "") -> None:
    if n_s > n_t:
        raise CommandError(
            f"no increasing mapping exists: the student has more layers ({n_s}) than the "
            f"teacher ({n_t}), and a mapping gives each student layer its own, deeper "
            f"teacher layer{hint}"
        )


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


# --- pkd analyze --------------------------------------------------------------------

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
    plan = _plan(args, student, rows, console, report_heldout=True)
    stats = _stream_stats(student, teacher, rows, chunk_rows, args.scheduler, plan.folds)
    constant = _warn_constant(stats, console)
    measure = MEASURES[plan.measure]
    values = _matrices(stats, ridge, plan.measure, plan.folds,
                       lambda: _rbf_cka(student, teacher, rows, chunk_rows, plan.bandwidth,
                                        console, constant))
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


# --- pkd fit ------------------------------------------------------------------------

FIT_OUTPUTS = ("layer_losses.png", "spectra.png", "projection.safetensors")
FIT_FILES = """\
writes into --out:
  projection.safetensors  the fitted projection(s) ("projection", or "projection.S_T" per
                          pair with --per-pair), the mapping and settings in its metadata
  layer_losses.png        loss per pair over the steps, with the closed-form floor
  spectra.png             singular values of the fitted projection"""


# pkd.fit's argument names as ``pkd fit`` spells them, for the errors the library raises.
_FIT_SPELLING = (("method='closed_form'", "--method closed_form"),
                 ("method='adam' or 'sgd'", "--method adam or --method sgd"),
                 ("normalize=True", "--normalize"), ("an explicit lr", "an explicit --lr"),
                 ("ridge > 0", "--ridge > 0"), ("ridge=0", "--ridge 0"))


def _cli_spelling(message: str) -> str:
    for library, cli in _FIT_SPELLING:
        message = message.replace(library, cli)
    return message


def _check_fit_options(args) -> None:
    """Options the method ignores are refused; the others checked under their CLI names."""
    from ._validation import check_positive

    if args.method == "closed_form":
        given = [f"--{name.replace('_', '-')}" for name in GRADIENT_OPTIONS
                 if getattr(args, name) is not None]
        if given:
            raise CommandError(
                f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to --method adam "
                "or --method sgd only: the closed form (the default --method) takes no steps"
            )
        if args.normalize:
            raise CommandError(
                "--normalize needs --method adam or --method sgd: the closed form exists for "
                "the MSE only"
            )
        return
    if args.steps is not None:
        _check_option(_positive_int, args.steps, "--steps")
    if args.batch_size is not None:
        _check_option(_positive_int, args.batch_size, "--batch-size")
    if args.lr is not None:
        _check_option(check_positive, args.lr, "--lr")
    if args.method == "sgd" and args.normalize and args.lr is None:
        raise CommandError("--method sgd with --normalize needs an explicit --lr")


def cmd_fit(args) -> None:
    from . import plots
    from .fit import fit_projection
    from .spectrum import xavier_mp_edges

    console = Console("fit")
    out = _out_dir(args.out, FIT_OUTPUTS)
    ridge = _check_ridge(args.ridge)
    chunk_rows = _check_option(_positive_int, args.chunk_rows, "--chunk-rows")
    _check_fit_options(args)
    student, teacher, mask = _load_pair(args, console)
    s_layers, t_layers = _layer_conventions(student, teacher, args, console)
    rows = _selected_rows(student.lead_shape, mask.mask, args.tokens)  # also checks --tokens
    chosen_by = None
    if args.mapping.strip().lower() == "optimal":
        rows_s = s_layers.mappable(args.include_embeddings)
        rows_t = t_layers.mappable(args.include_embeddings)
        _check_optimal_exists(len(rows_s), len(rows_t), _EXPLICIT_HINT)
        # Chosen from the rows that are fitted: the mask and --tokens both apply.
        plan = _plan(args, student, rows, console, report_heldout=False)
        stats = _stream_stats(student, teacher, rows, chunk_rows, None, plan.folds)
        constant = _warn_constant(stats, console)
        measure = MEASURES[plan.measure]
        values = _matrices(stats, ridge, plan.measure, plan.folds,
                           lambda: _rbf_cka(student, teacher, rows, chunk_rows,
                                            plan.bandwidth, console, constant))
        mapping = _optimal(values[measure.key], measure.maximize, rows_s, rows_t,
                           _EXPLICIT_HINT)
        chosen_by = plan.measure
    else:
        mapping = _parse_mapping_arg(args.mapping, s_layers, t_layers, args.include_embeddings)
    repeated = sorted({pair for pair in mapping if mapping.count(pair) > 1})
    if not args.shared and repeated:
        raise CommandError(
            f"--per-pair fits one projection per pair, but --mapping {args.mapping} repeats "
            f"{', '.join(f'{s}:{t}' for s, t in repeated)}: give each pair once, or drop "
            "--per-pair"
        )
    # The dumps themselves: the closed form and full-batch steps stream the mapped layers.
    student_layers, teacher_layers = student, teacher
    common = {"shared": args.shared, "ridge": ridge, "attention_mask": mask.mask,
              "tokens": args.tokens, "chunk_rows": chunk_rows}
    gradient = {} if args.method == "closed_form" else {
        "steps": DEFAULT_STEPS if args.steps is None else args.steps, "lr": args.lr,
        "batch_size": args.batch_size, "seed": DEFAULT_SEED if args.seed is None else args.seed,
        "progress": _on_terminal()}
    try:
        result = fit_projection(student_layers, teacher_layers, mapping, method=args.method,
                                normalize=args.normalize, **gradient, **common)
        floor = None
        if not args.normalize:
            # A shared fit may repeat a pair; per-pair projections need each pair once.
            unique = list(dict.fromkeys(mapping))
            per_pair = fit_projection(student_layers, teacher_layers, unique,
                                      method="closed_form", **(common | {"shared": False}))
            floor_of = dict(zip(unique, per_pair.layer_losses, strict=True))
            floor = np.array([floor_of[pair] for pair in mapping])
            best = (result if args.method == "closed_form" else
                    fit_projection(student_layers, teacher_layers, mapping,
                                   method="closed_form", **common))
    except (ValueError, TypeError) as error:
        raise CommandError(_cli_spelling(str(error))) from None

    first = mapping[0]
    d_s, d_t = result.projection_for(first).shape
    spectra = {}
    if result.initial is not None:
        initial = result.initial if args.shared else result.initial[first]
        spectra["Xavier init"] = initial
    label = "fitted" if args.shared else f"fitted s{first[0]}→t{first[1]}"
    spectra[f"{label} ({args.method})"] = result.projection_for(first)
    if floor is not None and args.method != "closed_form":
        spectra["closed form"] = best.projection_for(first)
    loss_name = "normalized loss" if args.normalize else "MSE"
    # An exact fit reaches a loss of 0, which a log axis cannot show.
    log = bool((result.history > 0).all() and (floor is None or (floor > 0).all()))
    figures = {
        out / "layer_losses.png": plots.layer_losses(
            result.history, labels=mapping, floor=floor, loss_label=loss_name, log=log,
            title=f"Per-pair alignment loss ({args.method})"),
        out / "spectra.png": plots.projection_spectrum(
            spectra, mp_edges=xavier_mp_edges(d_s, d_t),
            title=f"Projection spectrum ({d_s}→{d_t})"),
    }
    metadata = {"mapping": json.dumps([list(p) for p in mapping]),
                "settings": json.dumps(result.settings, default=str),
                "student_dump": str(args.student), "teacher_dump": str(args.teacher),
                "mask": mask.description,
                "embeddings_index": json.dumps({"student": s_layers.embeddings,
                                                "teacher": t_layers.embeddings})}
    if chosen_by is not None:
        metadata["mapping_chosen_by"] = chosen_by
    tensors = ({"projection": result.projection} if args.shared else
               {f"projection.{s}_{t}": p for (s, t), p in result.projections.items()})

    def write_projection(tmp):
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp,
                  metadata=metadata)

    files = {path: figure_writer(fig) for path, fig in figures.items()}
    files[out / "projection.safetensors"] = write_projection
    write_together(files)

    print(f"{args.method} fit of {'a shared projection' if args.shared else 'per-pair projections'}"
          f" ({d_s}→{d_t}) on {mapping}"
          + (f" (optimal by {chosen_by})" if chosen_by else ""))
    print(f"mask: {mask.description}")
    shared_best = floor is not None and args.shared and args.method != "closed_form"
    print(f"{'pair':<10} {loss_name:>12} {'closed-form floor':>18}"
          + (f" {'shared closed form':>19}" if shared_best else ""))
    for k, pair in enumerate(mapping):
        floor_text = "-" if floor is None else f"{floor[k]:.6g}"
        line = f"{pair[0]}→{pair[1]:<7} {result.layer_losses[k]:>12.6g} {floor_text:>18}"
        if shared_best:
            line += f" {best.layer_losses[k]:>19.6g}"
        print(line)
    if floor is not None:
        print("closed-form floor: the best any projection reaches for the pair alone"
              + ("; shared closed form: the best one shared projection reaches" if shared_best
                 else ""))
    print(f"wrote {', '.join(sorted(p.name for p in files))} to {out}/")


# --- pkd bench ----------------------------------------------------------------------


def cmd_bench(args) -> None:
    from .bench import VARIANTS, check_variants, run_bench, write_json

    try:  # every variant by default; one asked for by name must run
        variants = check_variants(args.variant) if args.variant else VARIANTS
    except ValueError as error:
        raise CommandError(f"--variant: {error}") from None
    if args.json:  # checked now: the full run takes most of an hour
        _out_file(args.json, "--json")
    dtypes = None if args.dtype is None else tuple(dict.fromkeys(args.dtype))
    # stdout as it is now: run_bench's default is the stream of the moment pkd.bench was imported.
    result = run_bench(quick=args.quick, dtypes=dtypes, variants=variants,
                       repeats=args.repeats, progress=_on_terminal(), out=sys.stdout)
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")


# --- pkd demo -----------------------------------------------------------------------


def cmd_demo(args) -> None:
    from .demo import run_demo

    out = _out_dir(args.out)
    try:
        run_demo(out=out, seed=args.seed, quick=args.quick)
    except ImportError as error:  # scikit-learn lives in the `demo` extra
        raise CommandError(f"{error} (install it with: pip install 'pkd[demo]')") from None


# --- pkd dump -----------------------------------------------------------------------


def cmd_dump(args) -> None:
    import hashlib

    from . import hf

    out = _out_file(args.out, "--out")
    if out.suffix.lower() != ".safetensors":
        raise CommandError(f"--out {out}: a dump is written as .safetensors; end the name so")
    for flag, value in (("--batch-size", args.batch_size), ("--max-length", args.max_length)):
        if value is not None and value <= 0:
            raise CommandError(f"{flag} must be a positive integer, got {value}")
    layers = None
    if args.layers is not None:
        try:
            layers = [int(i) for i in args.layers.split(",")]
        except ValueError:
            raise CommandError(f'--layers must be comma-separated hidden_states indices like '
                               f'"0,2,4", got {args.layers!r}') from None
    texts = hf.read_texts(args.texts, field=args.field, column=args.column)
    try:
        model, tokenizer = hf.load_model(args.model_dir)
    except ImportError as error:
        raise CommandError(str(error)) from None
    source = {"texts_file": Path(args.texts).name,
              "texts_file_sha256": hashlib.sha256(Path(args.texts).read_bytes()).hexdigest()}
    source.update({"texts_field": args.field} if args.field else {})
    source.update({"texts_column": args.column} if args.column else {})
    hf.dump_hidden_states(model, tokenizer, texts, out, batch_size=args.batch_size,
                          max_length=args.max_length, pool=args.pool, dtype=args.dtype,
                          layers=layers, metadata=source,
                          log=lambda note: print(f"pkd dump: {note}", file=sys.stderr))
    print(f"wrote {out}: {len(texts)} texts, {type(model).__name__} "
          f"({model.config.num_hidden_layers} layers), pool={args.pool}, {args.dtype}")


DUMP_FILES = """\
writes --out, one .safetensors file:
  hidden_states.0, ...  one tensor per kept layer, (N, T, d) or pooled (N, d)
  attention_mask        (N, T), with --pool none
  metadata              the model, tokenizer, pool, dtype, layer indices, embeddings
                        index, texts file, number of texts and their SHA-256"""


def _add_dump_parser(sub) -> None:
    help_text = "hidden states of a local Hugging Face model on texts, to a .safetensors dump"
    dump = sub.add_parser("dump", help=help_text, description=help_text, epilog=DUMP_FILES,
                          formatter_class=_HelpFormatter)
    dump.add_argument("model_dir", help="directory written by save_pretrained (model and "
                                        "tokenizer); never downloads")
    dump.add_argument("--texts", required=True, help=".txt (one per line), .jsonl, .csv, .tsv")
    dump.add_argument("--out", required=True, help="the dump to write (.safetensors)")
    dump.add_argument("--field", default=None, help="JSON key of the text (.jsonl)")
    dump.add_argument("--column", default=None, help="column of the text (.csv, .tsv)")
    dump.add_argument("--batch-size", type=int, default=32, help="texts per forward pass")
    dump.add_argument("--max-length", type=int, default=None,
                      help="truncate to N tokens (default: no truncation, and a text longer "
                           "than the model takes is an error naming it)")
    dump.add_argument("--pool", choices=("none", "cls", "mean"), default="none",
                      help="none: token states + attention_mask; cls: the first position the "
                           "mask keeps in each text; mean: the mean over real tokens")
    dump.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                      help="stored dtype (float16 halves the disk; read back as float32)")
    dump.add_argument("--layers", default=None,
                      help='hidden_states indices to keep, e.g. "0,2,4" (default all)')
    dump.set_defaults(run=cmd_dump)


# --- the parser ---------------------------------------------------------------------


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default in its help (where there is one), the file lists as written."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool) \
                or "default" in (action.help or ""):
            return action.help  # the help says what happens without the option
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .alignment import DEFAULT_CHUNK_ROWS
    from .bench import TORCH_VARIANTS, VARIANTS
    from .cka import DEFAULT_BANDWIDTH
    from .fit import DEFAULT_LR

    parser = argparse.ArgumentParser(
        prog="pkd", description="Patient Knowledge Distillation on the CPU.",
        formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"pkd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help_text, epilog):
        return sub.add_parser(name, help=help_text, description=help_text, epilog=epilog,
                              formatter_class=_HelpFormatter)

    demo = command("demo", "distil a 12-layer teacher into a 4-layer student on "
                           "scikit-learn's digits and draw every figure",
                   "writes into --out: alignment.png, cka.png, layer_losses.png, spectra.png, "
                   "accuracy.png, summary.json, summary.md")
    demo.add_argument("--out", default="pkd-demo", help="output directory")
    demo.add_argument("--seed", type=int, default=0, help="base random seed")
    demo.add_argument("--quick", action="store_true", help="fewer steps and seeds (~15 s)")
    demo.set_defaults(run=cmd_demo)

    def dumps(p):
        p.add_argument("student", help="student dump (.safetensors or .npz)")
        p.add_argument("teacher", help="teacher dump (.safetensors or .npz)")
        p.add_argument("--out", required=True, help="output directory")
        p.add_argument("--mask-key", default="attention_mask",
                       help="key of the attention mask in the dumps")
        p.add_argument("--tokens", default="all",
                       help='rows of 3-D dumps that count: "all" (every position the mask '
                            'keeps), "cls" (the first position the mask keeps in each '
                            "sequence, correct under left padding) or a position")
        p.add_argument("--embeddings-index", default=None, metavar="INDEX",
                       help="the layer index holding the embeddings, for dumps whose "
                            'metadata does not say (0 for Hugging Face hidden_states; "none": '
                            "every layer is a transformer layer). Default: the dumps' "
                            "metadata, else none (and a note on stderr)")
        p.add_argument("--include-embeddings", action="store_true",
                       help="let uniform, skip, last and optimal map the embeddings too "
                            "(by default they map transformer layers only)")
        p.add_argument("--measure", choices=tuple(MEASURES), default=DEFAULT_MEASURE,
                       help="the per-pair measure --mapping optimal maximises (CKA "
                            "variants) or minimises (1 − R²); analyze draws it in "
                            f"alignment.png (default: {DEFAULT_MEASURE}). The default found "
                            "the corresponding layer of another copy of a network most often "
                            "(54%%; linear CKA 29%%, in-sample 1 − R² 11%%: "
                            "analysis/results/layer_matching)")
        p.add_argument("--bandwidth", type=float, default=None,
                       help=f"RBF CKA's σ as a fraction of each layer's median distance "
                            f"between rows (--measure rbf-cka; default {DEFAULT_BANDWIDTH:g}, "
                            "the best of 0.2, 0.5, 0.8 in that benchmark)")
        p.add_argument("--folds", type=int, default=DEFAULT_FOLDS,
                       help="folds of the held-out estimates")
        p.add_argument("--ridge", type=float, default=0.0, help="ridge ρ >= 0")
        p.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS,
                       help="rows per streamed chunk")

    analyze = command(
        "analyze", "alignment of every layer pair, from a student and a teacher dump",
        ANALYZE_FILES)
    dumps(analyze)
    analyze.add_argument("--mapping", default=None,
                         help='uniform, skip, last, optimal or pairs "0:2,1:5" (default: '
                              "optimal, or none when no increasing mapping exists)")
    analyze.add_argument("--heldout", action="store_true",
                         help=f"report held-out 1 − R² (k-fold) even with more than "
                              f"{ROWS_PER_WIDTH} × the student width rows (below that they "
                              "are always reported)")
    analyze.add_argument("--scheduler", default=None,
                         help="address of a dask.distributed scheduler (default: stream "
                              "locally)")
    analyze.set_defaults(run=cmd_analyze)

    fit = command("fit", "fit the projection(s) of a layer mapping on two dumps", FIT_FILES)
    dumps(fit)
    fit.set_defaults(scheduler=None)
    fit.add_argument("--mapping", required=True,
                     help='uniform, skip, last, optimal (by --measure) or pairs "0:2,1:5"')
    fit.add_argument("--method", choices=("closed_form", "adam", "sgd"), default="closed_form",
                     help="closed_form solves the normal equations (MSE only); adam and sgd "
                          "take --steps gradient steps from a Xavier initialisation")
    fit.add_argument("--steps", type=int, default=None,
                     help=f"gradient steps (adam, sgd; default {DEFAULT_STEPS})")
    fit.add_argument("--lr", type=float, default=None,
                     help=f"learning rate (adam, sgd; default: {DEFAULT_LR['adam']:g} for adam, "
                          "1/L for sgd, L the loss's curvature)")
    fit.add_argument("--batch-size", type=int, default=None,
                     help="rows per step (adam, sgd; default: every row)")
    fit.add_argument("--seed", type=int, default=None,
                     help=f"seed of the initialisation and batches (adam, sgd; default "
                          f"{DEFAULT_SEED})")
    group = fit.add_mutually_exclusive_group()
    group.add_argument("--shared", dest="shared", action="store_true", default=True,
                       help="one projection for all pairs (default)")
    group.add_argument("--per-pair", dest="shared", action="store_false",
                       help="one projection per pair")
    fit.add_argument("--normalize", action="store_true",
                     help="PKD's normalized loss (adam, sgd)")
    fit.set_defaults(run=cmd_fit)

    bench = command("bench", "speed as ratios: vs GEMMs alone, NumPy, torch",
                    "writes the table to stdout, and with --json every figure to that file")
    bench.add_argument("--quick", action="store_true", help="a subset, under a minute")
    bench.add_argument("--json", default=None, help="also write every figure to this file")
    bench.add_argument("--repeats", type=int, default=5, help="timed runs per case (>= 5)")
    bench.add_argument("--dtype", action="append", choices=("float32", "float64"),
                       default=None,
                       help="repeat for both (default: both; with --quick: float32)")
    bench.add_argument("--variant", action="append", default=None, metavar="NAME",
                       help=f"run only this variant (repeatable): {', '.join(VARIANTS)} "
                            f"(default: all; {', '.join(TORCH_VARIANTS)} need torch)")
    bench.set_defaults(run=cmd_bench)
    _add_dump_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("fit", "analyze") and args.tokens not in ("all", "cls"):
        try:
            args.tokens = int(args.tokens)
        except ValueError:
            parser.error(f'--tokens must be "all", "cls" or an int, got {args.tokens!r}')
    try:
        args.run(args)
    except CommandError as error:
        print(f"pkd {args.command}: error: {error}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as error:  # DumpError, validation, files: no traceback
        print(f"pkd {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
