"""The ``pkd`` commands that check their options and hand them to one library function.

``bench`` (:mod:`pkd.bench`), ``demo`` (:mod:`pkd.demo`) and ``dump`` (:mod:`pkd.hf`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ._cli_common import CommandError, _on_terminal, _out_dir, _out_file

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
