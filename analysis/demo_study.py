"""The demo study: a 12-layer teacher distilled into a 4-layer student that sees few labels.

Runs :func:`pkd.demo.run_demo` (the experiment behind ``pkd demo`` and
``make demo``): a 12-block residual MLP teacher is trained on every training
label of scikit-learn's bundled digits; a 4-block student sees the labels of
a small stratified part of the training set and the teacher's outputs on all
of it, and is trained five ways (CE only, logit KD, PKD-Skip, PKD-Last, PKD
with the optimal mapping) from the same initial weights and minibatches, over
5 seeds, then CE, KD and the best PKD variant over several labelled
fractions. It writes, into ``analysis/results/demo/`` (what ``pkd demo``
writes into ``pkd-demo/``):

- ``accuracy.png``: test accuracy per method (mean ± std, every seed a dot);
- ``fraction.png``: test accuracy against the labelled fraction;
- ``alignment.png`` / ``cka.png``: the teacher × CE-only-student alignment
  matrices (relative best-reachable loss 1 − R², and RBF CKA with σ = 0.2 × the median
  distance, the measure that chooses PKD-optimal's mapping) with the
  uniform / PKD-Skip / PKD-Last / optimal mappings marked;
- ``layer_losses.png``: PKD's per-pair hidden loss during training;
- ``spectra.png``: singular values of the learned projections;
- ``summary.json`` / ``summary.md``: every number, and what they show.

``--select`` instead runs :func:`pkd.demo.selection.select`, which chose the
demo's settings on the validation split, and writes its record into
``analysis/results/demo/selection/``.

Run (from the repository root):

    .venv/bin/python analysis/demo_study.py            # the full demo
    .venv/bin/python analysis/demo_study.py --quick    # smoke run, into demo-quick/
    .venv/bin/python analysis/demo_study.py --select   # the settings' selection
"""

from __future__ import annotations

import argparse
import time

from _common import RESULTS, output_dir, write_json, write_text

from pkd.demo import run_demo

NAME = "demo"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer steps and seeds (a smoke run; writes to demo-quick/)")
    parser.add_argument("--select", action="store_true",
                        help="choose the settings on the validation split (writes to "
                             "demo/selection/)")
    parser.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    parser.add_argument("--out", default=None,
                        help="output directory (default analysis/results/demo)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.select:
        from pkd.demo.selection import select, selection_markdown

        out = output_dir(NAME, args.out or str(RESULTS / NAME / "selection"), False)
        record = select(seed=args.seed)
        write_json(out / "selection.json", record)
        write_text(out / "selection.md", selection_markdown(record))
        print(selection_markdown(record))
        print(f"selection done in {time.perf_counter() - start:.1f} s; wrote {out}/")
        return record
    out = output_dir(NAME, args.out, args.quick)
    summary = run_demo(out=out, seed=args.seed, quick=args.quick)
    print(f"demo study done in {time.perf_counter() - start:.1f} s")
    return summary


if __name__ == "__main__":
    main()
