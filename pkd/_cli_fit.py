"""``pkd fit``: the projection(s) of one layer mapping, fitted on two dumps.

Its options checked under their CLI names before any work, the fit and its
closed-form floor, the figures and projection.safetensors, the table on stdout.
"""

from __future__ import annotations

import json

import numpy as np

from ._atomic import figure_writer, write_together
from ._cli_common import (
    CommandError,
    Console,
    _check_option,
    _check_ridge,
    _load_pair,
    _on_terminal,
    _out_dir,
    _positive_int,
)
from ._cli_mapping import (
    _EXPLICIT_HINT,
    _check_optimal_exists,
    _layer_conventions,
    _optimal,
    _parse_mapping_arg,
)
from ._cli_measures import MEASURES, _measure_layer_pairs, _selected_rows

GRADIENT_OPTIONS = ("steps", "lr", "batch_size", "seed")  # what --method closed_form ignores
DEFAULT_STEPS = 500
DEFAULT_SEED = 0

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
        plan, _, values = _measure_layer_pairs(args, student, teacher, rows, chunk_rows,
                                               ridge, console, scheduler=None,
                                               report_heldout=False)
        measure = MEASURES[plan.measure]
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
