"""The ``pkd`` command: ``demo``, ``analyze``, ``fit``, ``bench``, ``dump``.

Every command validates its inputs before any expensive work, computes
everything, and only then writes its outputs: each to a temporary file, all
renamed into place once every one is written. An error never leaves partial
outputs behind, and inputs are never modified. Tables go to stdout; warnings,
the conventions a command assumes and progress bars (on a terminal only) go to
stderr.

This module holds the parser and :func:`main`, the entry point. Each command's
body lives in a module of its own: ``analyze`` in pkd._cli_analyze, ``fit`` in
pkd._cli_fit, ``bench``, ``demo`` and ``dump`` in pkd._cli_bench_demo_dump.
What they share: pkd._cli_common (the error, the console, output and option
checks, opening the dump pair), pkd._cli_mapping (layer conventions, mappings)
and pkd._cli_measures (the measures, streaming statistics, RBF CKA's sample).
"""

from __future__ import annotations

import argparse
import sys

from ._cli_analyze import ANALYZE_FILES, cmd_analyze
from ._cli_bench_demo_dump import cmd_bench, cmd_demo, cmd_dump
from ._cli_common import CommandError
from ._cli_fit import DEFAULT_SEED, DEFAULT_STEPS, FIT_FILES, cmd_fit
from ._cli_measures import DEFAULT_FOLDS, DEFAULT_MEASURE, MEASURES, ROWS_PER_WIDTH

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
