"""The demo study: a 12-layer teacher distilled into a 4-layer student on the digits.

Runs :func:`pkd.demo.run_demo` (the experiment behind ``pkd demo``): a
12-block residual MLP teacher is trained on scikit-learn's bundled digits,
and a 4-block student is trained five ways (CE only, logit KD, PKD-Skip,
PKD-Last, PKD with the optimal mapping) from the same initial weights and
minibatches, over 5 seeds. It writes, into ``analysis/results/demo/``:

- ``accuracy.png``: test accuracy per method (mean ± std, every seed a dot);
- ``alignment.png`` / ``cka.png``: the teacher × CE-only-student alignment
  matrices (relative best-reachable loss 1 − R², and linear CKA) with the
  uniform / PKD-Skip / PKD-Last / optimal mappings marked;
- ``layer_losses.png``: PKD's per-pair hidden loss during training;
- ``spectra.png``: singular values of the learned projections;
- ``summary.json`` / ``summary.md``: every number, and what they show.

Run (from the repository root):

    .venv/bin/python analysis/demo_study.py            # full: about a minute
    .venv/bin/python analysis/demo_study.py --quick    # smoke run, ~10 s,
                                                       # into analysis/results/demo-quick/
"""

from __future__ import annotations

import argparse
import time

from _common import output_dir

from pkd.demo import run_demo

NAME = "demo"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer steps and seeds (a smoke run; writes to demo-quick/)")
    parser.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    parser.add_argument("--out", default=None,
                        help="output directory (default analysis/results/demo)")
    args = parser.parse_args(argv)
    out = output_dir(NAME, args.out, args.quick)
    start = time.perf_counter()
    summary = run_demo(out=out, seed=args.seed, quick=args.quick)
    print(f"demo study done in {time.perf_counter() - start:.1f} s")
    return summary


if __name__ == "__main__":
    main()
