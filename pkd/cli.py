"""The ``pkd`` command: ``demo``, ``analyze``, ``fit``, ``bench``.

Every command validates its inputs before any expensive work, computes
everything, and only then writes its outputs: each to a temporary file, all
renamed into place once every one is written. An error never leaves partial
outputs behind, and inputs are never modified. Progress bars go to stderr;
tables to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ._atomic import check_output_dir, figure_writer, text_writer, write_together


class CommandError(Exception):
    """A user-facing error: printed as ``pkd <command>: error: ...``, exit status 2."""


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


def _check_ridge(ridge: float) -> float:
    from ._validation import check_nonnegative

    try:
        return check_nonnegative(ridge, "--ridge")
    except (TypeError, ValueError) as error:
        raise CommandError(str(error)) from None


def _load_pair(student_path: str, teacher_path: str, mask_key: str):
    """Open both dumps and check they describe the same rows; return (s, t, mask)."""
    from .io import MASK_KEY, load_dump

    try:
        student = load_dump(student_path, mask_key=mask_key)
        teacher = load_dump(teacher_path, mask_key=mask_key)
    except FileNotFoundError as error:
        raise CommandError(str(error)) from None
    if student.lead_shape != teacher.lead_shape:
        raise CommandError(
            f"the dumps disagree on rows: {student_path} has leading shape "
            f"{student.lead_shape}, {teacher_path} has {teacher.lead_shape}; both must hold "
            "the hidden states of the same inputs"
        )
    masks = [m for m in (student.attention_mask, teacher.attention_mask) if m is not None]
    if not masks and mask_key != MASK_KEY:
        # A dump may lack the default mask, but a key asked for by name that no dump
        # has is a typo: ignoring it would silently count the padding.
        found = sorted(set(student.extra_keys) | set(teacher.extra_keys))
        raise CommandError(
            f"--mask-key {mask_key!r}: neither {student_path} nor {teacher_path} has that "
            f"key (other keys found: {', '.join(map(repr, found)) or 'none'})"
        )
    if len(masks) == 2 and not np.array_equal(*masks):
        n_diff = int((masks[0] != masks[1]).sum())
        raise CommandError(
            f"the dumps' {mask_key!r} masks differ at {n_diff} position(s): "
            f"{student_path} and {teacher_path} must come from the same batch"
        )
    return student, teacher, (masks[0] if masks else None)


def _parse_mapping_arg(text: str, n_s: int, n_t: int):
    from . import mapping

    try:
        return mapping.parse_mapping(text, n_s, n_t)
    except (ValueError, TypeError) as error:
        raise CommandError(f"--mapping {text!r}: {error}") from None


# Appended to the reason there is no optimal mapping when --mapping optimal was asked for.
_EXPLICIT_HINT = "; give explicit pairs to --mapping"


def _check_optimal_exists(n_s: int, n_t: int, hint: str = "") -> None:
    if n_s > n_t:
        raise CommandError(
            f"no optimal mapping: the student has more layers ({n_s}) than the teacher "
            f"({n_t}) and a mapping is strictly increasing{hint}"
        )


def _optimal(cost, hint: str = ""):
    """``mapping.optimal`` of the relative min-MSE, or a CommandError saying why none exists.

    A constant teacher layer has no variance, so its relative loss is NaN: there
    is nothing to distil from it, so its pairs are treated as forbidden (+inf)
    rather than refusing the whole matrix.
    """
    from . import mapping

    n_s, n_t = cost.shape
    _check_optimal_exists(n_s, n_t, hint)
    undefined = np.isnan(cost)
    try:
        return mapping.optimal(np.where(undefined, np.inf, cost))
    except ValueError as error:
        constant = np.flatnonzero(undefined.all(axis=0)).tolist()
        if not constant:
            raise CommandError(f"no optimal mapping: {error}{hint}") from None
        raise CommandError(
            f"no optimal mapping: teacher layer(s) {constant} are constant over the rows "
            f"used (no variance, so the relative loss is undefined), which leaves fewer "
            f"teacher layers than the {n_s} student layers{hint}"
        ) from None


def _fixed_strategies(n_s: int, n_t: int) -> dict:
    """uniform / PKD-Skip / PKD-Last, where they exist for these sizes."""
    from . import mapping

    found = {}
    for name, build in (("uniform", mapping.uniform), ("skip", mapping.skip),
                        ("last", mapping.last)):
        try:
            found[name] = build(n_s, n_t)
        except ValueError:
            continue
    return found


def _selected_rows(lead_shape: tuple, mask, tokens):
    """The rows the mask and ``--tokens`` keep, as a bool array of ``lead_shape`` (None: all)."""
    from ._validation import rows_mask, select_rows

    try:
        return rows_mask(lead_shape, select_rows(lead_shape, mask, tokens))
    except (TypeError, ValueError) as error:
        raise CommandError(str(error)) from None


def _stream_stats(student, teacher, mask, chunk_rows: int, scheduler: str | None):
    """One pass over both dumps; the statistics of every (student, teacher) layer pair."""
    from tqdm.auto import tqdm

    from .alignment import AlignmentStats

    if scheduler is not None:
        try:
            return AlignmentStats.from_dumps_dask(student, teacher, chunk_rows=chunk_rows,
                                                  scheduler=scheduler, mask=mask)
        except ImportError as error:  # dask lives in the `dask` extra; the message says so
            raise CommandError(str(error)) from None
    stats = AlignmentStats(chunk_rows=chunk_rows)
    flat_mask = None if mask is None else mask.reshape(-1)
    seen_rows = False
    with tqdm(total=student.n_rows, desc="streaming", unit="rows", file=sys.stderr,
              disable=None) as bar:
        chunks = zip(student.iter_chunks(chunk_rows), teacher.iter_chunks(chunk_rows),
                     strict=True)
        for (start, stop, s_chunk), (_, _, t_chunk) in chunks:
            rows_mask = None if flat_mask is None else flat_mask[start:stop]
            if rows_mask is None or rows_mask.any():  # a chunk of padding only is skipped
                stats.update(s_chunk, t_chunk, mask=rows_mask)
                seen_rows = True
            bar.update(stop - start)
    if not seen_rows:
        raise CommandError("the attention mask selects no row: nothing to analyze")
    return stats


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


# --- pkd analyze --------------------------------------------------------------------

ANALYZE_OUTPUTS = ("alignment.png", "cka.png", "spectra.png", "summary.json", "summary.csv")


def cmd_analyze(args) -> None:
    from . import plots
    from .spectrum import spectrum, xavier_mp_edges

    out = _out_dir(args.out, ANALYZE_OUTPUTS)
    ridge = _check_ridge(args.ridge)
    student, teacher, mask = _load_pair(args.student, args.teacher, args.mask_key)
    n_s, n_t = student.n_layers, teacher.n_layers
    # Every mapping but "optimal" depends on the layer counts only: check it before streaming.
    strategies = _fixed_strategies(n_s, n_t)
    chosen_name, custom = args.mapping.strip().lower(), None
    hint = _EXPLICIT_HINT if chosen_name == "optimal" else ""
    if chosen_name == "optimal":
        _check_optimal_exists(n_s, n_t, hint)
    elif chosen_name not in strategies:
        custom, chosen_name = _parse_mapping_arg(args.mapping, n_s, n_t), "custom"
    stats = _stream_stats(student, teacher, mask, args.chunk_rows, args.scheduler)
    min_mse = stats.min_mse(ridge=ridge)
    relative = stats.relative_min_mse(ridge=ridge)
    cka = stats.cka()
    no_optimal = None  # why there is no optimal mapping, when it is not the one asked for
    try:
        strategies["optimal"] = _optimal(relative, hint)
    except CommandError as error:
        if chosen_name == "optimal":
            raise
        no_optimal = str(error)
    if custom is not None:
        strategies["custom"] = custom
    chosen = strategies[chosen_name]

    table = []
    for name, pairs in strategies.items():
        table.append({
            "strategy": name,
            "pairs": [list(p) for p in pairs],
            "sum_min_mse": float(sum(min_mse[p] for p in pairs)),
            "sum_relative_min_mse": float(sum(relative[p] for p in pairs)),
            "mean_cka": float(np.mean([cka[p] for p in pairs])),
        })

    spectra, widths = {}, (student.width(0), teacher.width(0))
    for pair in chosen[:3]:
        spectra[f"closed form s{pair[0]}→t{pair[1]}"] = stats.projection(*pair, ridge=ridge)
    from .distillation import xavier_uniform

    d_s, d_t = stats.student_widths[chosen[0][0]], stats.teacher_widths[chosen[0][1]]
    spectra["Xavier init"] = xavier_uniform(d_s, d_t, seed=0)
    label = "1 − R² = min-MSE / teacher variance"
    figures = {
        out / "alignment.png": plots.alignment_heatmap(
            relative, mappings=strategies, value_label=label,
            title="Best-reachable loss of a linear projection per layer pair"),
        out / "cka.png": plots.alignment_heatmap(
            cka, mappings=strategies, value_label="linear CKA (1 = same representation)",
            title="Linear CKA per layer pair"),
        out / "spectra.png": plots.projection_spectrum(
            spectra, mp_edges=xavier_mp_edges(d_s, d_t),
            title=f"Projection spectra ({d_s}→{d_t}), mapping '{chosen_name}'"),
    }
    summary = {
        "student_dump": str(args.student), "teacher_dump": str(args.teacher),
        "rows": int(stats.n_rows), "n_student_layers": n_s, "n_teacher_layers": n_t,
        "student_widths": list(map(int, stats.student_widths)),
        "teacher_widths": list(map(int, stats.teacher_widths)),
        "ridge": ridge, "chosen_mapping": chosen_name, "strategies": table,
        "optimal_mapping": ([list(p) for p in strategies["optimal"]]
                            if "optimal" in strategies else None),
        "min_mse": min_mse.tolist(), "relative_min_mse": relative.tolist(), "cka": cka.tolist(),
        "chosen_spectrum": {k: spectrum(v).summary() for k, v in spectra.items()},
    }

    csv = ["student_layer,teacher_layer,min_mse,relative_min_mse,cka"]
    csv += [f"{s},{t},{min_mse[s, t]:.9g},{relative[s, t]:.9g},{cka[s, t]:.9g}"
            for s in range(n_s) for t in range(n_t)]
    files = {path: figure_writer(fig) for path, fig in figures.items()}
    files[out / "summary.json"] = _json_writer(summary)
    files[out / "summary.csv"] = text_writer("\n".join(csv) + "\n")
    write_together(files)

    print(f"{stats.n_rows} rows, {n_s} student × {n_t} teacher layers "
          f"(widths {widths[0]} → {widths[1]}), ridge {ridge}")
    print(f"{'strategy':<9} {'Σ min-MSE':>11} {'Σ relative':>11} {'mean CKA':>9}  pairs")
    for row in table:
        pairs = ",".join(f"{s}:{t}" for s, t in row["pairs"])
        print(f"{row['strategy']:<9} {row['sum_min_mse']:>11.4g} "
              f"{row['sum_relative_min_mse']:>11.4g} {row['mean_cka']:>9.3f}  {pairs}")
    if no_optimal is None:
        optimal = ",".join(f"{s}:{t}" for s, t in strategies["optimal"])
        print(f"optimal mapping (by relative best-reachable loss): {optimal}")
    else:
        print(no_optimal)
    print(f"wrote {', '.join(sorted(p.name for p in files))} to {out}/")


# --- pkd fit ------------------------------------------------------------------------

FIT_OUTPUTS = ("layer_losses.png", "spectra.png", "projection.safetensors")


def cmd_fit(args) -> None:
    from . import plots
    from .fit import fit_projection
    from .spectrum import xavier_mp_edges

    out = _out_dir(args.out, FIT_OUTPUTS)
    ridge = _check_ridge(args.ridge)
    student, teacher, mask = _load_pair(args.student, args.teacher, args.mask_key)
    n_s, n_t = student.n_layers, teacher.n_layers
    rows = _selected_rows(student.lead_shape, mask, args.tokens)  # also checks --tokens
    if args.mapping.strip().lower() == "optimal":
        _check_optimal_exists(n_s, n_t, _EXPLICIT_HINT)
        # Chosen from the rows that are fitted: the mask and --tokens both apply.
        stats = _stream_stats(student, teacher, rows, args.chunk_rows, None)
        mapping = _optimal(stats.relative_min_mse(ridge), _EXPLICIT_HINT)
    else:
        mapping = _parse_mapping_arg(args.mapping, n_s, n_t)
    used_s = sorted({s for s, _ in mapping})
    used_t = sorted({t for _, t in mapping})
    student_layers = [np.asarray(student.layers[i]) if i in used_s else None
                      for i in range(n_s)]
    teacher_layers = [np.asarray(teacher.layers[i]) if i in used_t else None
                      for i in range(n_t)]
    common = {"shared": args.shared, "ridge": ridge, "attention_mask": mask,
              "tokens": args.tokens}
    try:
        result = fit_projection(student_layers, teacher_layers, mapping, method=args.method,
                                steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                                seed=args.seed, normalize=args.normalize, progress=True,
                                **common)
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
        raise CommandError(str(error)) from None

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
    figures = {
        out / "layer_losses.png": plots.layer_losses(
            result.history, labels=mapping, floor=floor, loss_label=loss_name,
            title=f"Per-pair alignment loss ({args.method})"),
        out / "spectra.png": plots.projection_spectrum(
            spectra, mp_edges=xavier_mp_edges(d_s, d_t),
            title=f"Projection spectrum ({d_s}→{d_t})"),
    }
    metadata = {"mapping": json.dumps([list(p) for p in mapping]),
                "settings": json.dumps(result.settings, default=str),
                "student_dump": str(args.student), "teacher_dump": str(args.teacher)}
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
          f" ({d_s}→{d_t}) on {mapping}")
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
    result = run_bench(quick=args.quick, dtypes=dtypes, variants=variants,
                       repeats=args.repeats)
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


def _add_dump_parser(sub) -> None:
    dump = sub.add_parser("dump", help="hidden states of a local Hugging Face model on texts, "
                                       "to a .safetensors dump")
    dump.add_argument("model_dir", help="directory written by save_pretrained (model and "
                                        "tokenizer); never downloads")
    dump.add_argument("--texts", required=True, help=".txt (one per line), .jsonl, .csv, .tsv")
    dump.add_argument("--out", required=True, help="the dump to write (.safetensors)")
    dump.add_argument("--field", default=None, help="JSON key of the text (.jsonl)")
    dump.add_argument("--column", default=None, help="column of the text (.csv, .tsv)")
    dump.add_argument("--batch-size", type=int, default=32, help="texts per batch (default 32)")
    dump.add_argument("--max-length", type=int, default=None, help="truncate to N tokens")
    dump.add_argument("--pool", choices=("none", "cls", "mean"), default="none",
                      help="none: token states + attention_mask (default); cls: first real "
                           "token; mean: masked mean")
    dump.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    dump.add_argument("--layers", default=None,
                      help='hidden_states indices to keep, e.g. "0,2,4" (default all)')
    dump.set_defaults(run=cmd_dump)


# --- the parser ---------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pkd", description="Patient Knowledge Distillation on the CPU.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="distil a 12-layer teacher into a 4-layer student "
                                       "on scikit-learn's digits and draw every figure")
    demo.add_argument("--out", default="pkd-demo", help="output directory (default pkd-demo/)")
    demo.add_argument("--seed", type=int, default=0, help="base random seed")
    demo.add_argument("--quick", action="store_true", help="fewer steps and seeds (~15 s)")
    demo.set_defaults(run=cmd_demo)

    def dumps(p):
        p.add_argument("student", help="student dump (.safetensors or .npz)")
        p.add_argument("teacher", help="teacher dump (.safetensors or .npz)")
        p.add_argument("--mask-key", default="attention_mask",
                       help="key of the attention mask in the dumps (default attention_mask)")
        p.add_argument("--ridge", type=float, default=0.0, help="ridge ρ >= 0 (default 0)")
        p.add_argument("--chunk-rows", type=int, default=4096,
                       help="rows per streamed chunk (default 4096)")
        p.add_argument("--out", required=True, help="output directory")

    analyze = sub.add_parser("analyze", help="alignment of every layer pair, from two dumps")
    dumps(analyze)
    analyze.add_argument("--mapping", default="optimal",
                         help='uniform, skip, last, optimal (default) or pairs "0:2,1:5"')
    analyze.add_argument("--scheduler", default=None,
                         help="address of a dask.distributed scheduler (optional)")
    analyze.set_defaults(run=cmd_analyze)

    fit = sub.add_parser("fit", help="fit the projection(s) of a layer mapping on two dumps")
    dumps(fit)
    fit.add_argument("--mapping", required=True,
                     help='uniform, skip, last, optimal or pairs "0:2,1:5"')
    fit.add_argument("--method", choices=("closed_form", "adam", "sgd"), default="closed_form")
    fit.add_argument("--steps", type=int, default=500)
    fit.add_argument("--lr", type=float, default=None)
    fit.add_argument("--batch-size", type=int, default=None)
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--tokens", default="all", help='"all", "cls" or a position')
    group = fit.add_mutually_exclusive_group()
    group.add_argument("--shared", dest="shared", action="store_true", default=True,
                       help="one projection for all pairs (default)")
    group.add_argument("--per-pair", dest="shared", action="store_false",
                       help="one projection per pair")
    fit.add_argument("--normalize", action="store_true", help="PKD's normalized loss")
    fit.set_defaults(run=cmd_fit)

    bench = sub.add_parser("bench", help="speed as ratios: vs GEMMs alone, NumPy, torch")
    bench.add_argument("--quick", action="store_true", help="a subset, under a minute")
    bench.add_argument("--json", default=None, help="also write every figure to this file")
    bench.add_argument("--repeats", type=int, default=5, help="timed runs per case (>= 5)")
    bench.add_argument("--dtype", action="append", choices=("float32", "float64"),
                       default=None,
                       help="repeat for both (default: both; with --quick: float32)")
    bench.add_argument("--variant", action="append", default=None)
    bench.set_defaults(run=cmd_bench)
    _add_dump_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "fit" and args.tokens not in ("all", "cls"):
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
