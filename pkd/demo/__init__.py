"""The embedded demo behind ``pkd demo``: PKD on real data, with nothing to download.

A 12-block residual MLP teacher (width 128) is trained on scikit-learn's
bundled digits; a 4-block student (width 64) is then trained five ways with
the same seeds, batches, steps and optimiser (CE only, logit KD, PKD-Skip,
PKD-Last, PKD with the optimal mapping) over several seeds, and every figure
of the analysis is drawn. See :mod:`pkd.demo.experiment` for the protocol and
:mod:`pkd.demo.mlp` for the network and its hand-written backward pass.

This package imports matplotlib and scikit-learn (the ``demo`` extra) only
when :func:`run_demo` runs.
"""

from __future__ import annotations

import numbers
import os
import sys
import time
from pathlib import Path

import numpy as np

from .._atomic import check_output_dir
from .._validation import check_bool
from .experiment import METHODS, Settings

__all__ = ["METHODS", "Settings", "run_demo"]


def _check_seed(seed) -> int:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {seed!r} ({type(seed).__name__})")
    if seed < 0:
        raise ValueError(f"seed must be >= 0 (it seeds numpy.random.SeedSequence), got {seed}")
    return int(seed)


def _check_out(out) -> Path:
    """``out`` as a Path; ValueError unless it is (or can become) a writable directory.

    Nothing is created before the outputs are written, all together, at the end.
    """
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be a path (str or pathlib.Path), got {type(out).__name__}")
    return check_output_dir(out, "out")


def run_demo(out: Path, seed: int = 0, quick: bool = False) -> dict:
    """Run the demo experiment and write its figures and summary into ``out``.

    Parameters
    ----------
    out : str or pathlib.Path
        Output directory (created if missing). Receives ``alignment.png``,
        ``cka.png``, ``layer_losses.png``, ``spectra.png``, ``accuracy.png``,
        ``summary.json`` and ``summary.md``; each file is written atomically,
        all at the end.
    seed : int
        Base seed (>= 0): it fixes the train/test split, the teacher and the
        student seeds, so the same seed reproduces the same numbers (on the
        same BLAS).
    quick : bool
        Fewer steps and seeds, same code path (~10 s; for tests and a first look).

    Returns
    -------
    dict
        The content of summary.json: ``teacher_accuracy``, ``methods`` (per
        method: ``label``, per-seed ``accuracies``, ``mean``, ``std``),
        ``mapping``, ``settings``, ``timing_s``, and more.

    Raises
    ------
    ValueError
        ``out`` cannot be created or written, or ``seed`` is negative
        (checked before any training).
    ImportError
        scikit-learn (the ``demo`` extra) is not installed.
    """
    from threadpoolctl import threadpool_limits
    from tqdm.auto import tqdm

    from . import report
    from .data import load_split
    from .experiment import TeacherOutputs, accuracy, run_seed, train_teacher

    seed = _check_seed(seed)
    quick = check_bool(quick, "quick")
    out = _check_out(out)
    settings = Settings.quick() if quick else Settings.full()
    started = time.perf_counter()
    timing = {}
    children = np.random.SeedSequence(seed).spawn(2 + settings.n_seeds)
    split_seed = int(children[0].generate_state(1)[0])

    total = settings.teacher_steps + settings.n_seeds * len(METHODS) * settings.student_steps
    interactive = sys.stderr.isatty()
    # The networks are small: one BLAS thread per GEMM is faster than two that
    # wait on each other (and on anything else running on a 2-core machine).
    with threadpool_limits(limits=1, user_api="blas"), tqdm(
            total=total, desc="teacher", unit="step", file=sys.stderr, dynamic_ncols=True,
            mininterval=0.2 if interactive else 10.0) as bar:
        tick = time.perf_counter()
        data = load_split(split_seed, settings.test_fraction, dtype=settings.dtype)
        timing["data"] = time.perf_counter() - tick

        tick = time.perf_counter()
        bar.set_description(f"teacher {settings.teacher_blocks}×{settings.teacher_width}")
        teacher = train_teacher(data, settings, children[1], progress=bar)
        teacher_accuracy = accuracy(teacher, data.x_test, data.y_test)
        teacher_outputs = TeacherOutputs.of(teacher, data.x_train)
        timing["teacher"] = time.perf_counter() - tick

        tick = time.perf_counter()
        outcomes = [run_seed(k, children[2 + k], data, teacher_outputs, settings, progress=bar)
                    for k in range(settings.n_seeds)]
        timing["students"] = time.perf_counter() - tick
        bar.set_description("done")

    tick = time.perf_counter()
    closed_form = report.closed_form_projection(outcomes[0], teacher_outputs, data.x_train)
    figures = report.build_figures(outcomes, teacher_accuracy, settings, closed_form)
    timing["figures"] = time.perf_counter() - tick
    timing["total"] = time.perf_counter() - started
    data_sizes = {"n_train": int(len(data.y_train)), "n_test": int(len(data.y_test)),
                  "split_seed": split_seed, "student_seeds": list(range(settings.n_seeds))}
    summary = report.build_summary(outcomes, teacher_accuracy, settings, seed, quick,
                                   data_sizes, {k: round(v, 3) for k, v in timing.items()},
                                   closed_form)
    report.write_outputs(out, figures, summary)
    report.print_report(summary, out)
    return summary
