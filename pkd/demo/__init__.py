"""The embedded demo behind ``pkd demo``: distillation where it matters, nothing to download.

A 12-block residual MLP teacher (width 128) is trained on every training label
of scikit-learn's bundled digits; a 4-block student (width 64) sees the labels
of only a small stratified part of the training set and the teacher's outputs
on all of it (the transfer set). The student is trained five ways with the
same seeds, batches, steps and optimiser (CE only, logit KD, PKD-Skip,
PKD-Last, PKD with the optimal mapping) over several seeds, then CE, logit KD
and one PKD variant over several labelled fractions, and every figure of the
analysis is drawn. The settings were chosen on a validation split
(:mod:`pkd.demo.selection`). See :mod:`pkd.demo.experiment` for the protocol
and :mod:`pkd.demo.mlp` for the network and its hand-written backward pass.

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


def on_terminal() -> bool:
    """Progress bars only where a person watches: never into pipes or logs."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


__all__ = ["METHODS", "Settings", "on_terminal", "run_demo"]


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
        ``fraction.png``, ``summary.json`` and ``summary.md``; each file is
        written atomically, all at the end.
    seed : int
        Base seed (>= 0): it fixes the split, the teacher and the student
        seeds, so the same seed reproduces the same numbers (on the same BLAS).
    quick : bool
        Far fewer steps and seeds, same code path: a smoke run (for tests and
        a first look) whose accuracies mean nothing, and whose output says so.

    Returns
    -------
    dict
        The content of summary.json: ``teacher_accuracy``, ``methods`` (per
        method: ``label``, per-seed ``accuracies``, ``mean``, ``std``),
        ``paired_vs_kd``, ``curve``, ``mapping``, ``settings``, ``timing_s``,
        and more.

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
    from .experiment import accuracy, prepare, run_seed, student_seeds

    seed = _check_seed(seed)
    quick = check_bool(quick, "quick")
    out = _check_out(out)
    settings = Settings.quick() if quick else Settings.full()
    started = time.perf_counter()
    timing = {}
    seeds = student_seeds(seed, max(settings.n_seeds, settings.curve_seeds))
    other_fractions = [f for f in settings.curve_fractions if f != settings.labelled_fraction]
    curve_methods = ("ce", "kd", settings.curve_method)
    n_curve_runs = len(other_fractions) * settings.curve_seeds * len(curve_methods)
    total = settings.teacher_steps + settings.student_steps * (
        settings.n_seeds * len(METHODS) + n_curve_runs)
    # The networks are small: one BLAS thread per GEMM is faster than two that
    # wait on each other (and on anything else running on a 2-core machine).
    with threadpool_limits(limits=1, user_api="blas"), tqdm(
            total=total, desc="teacher", unit="step", file=sys.stderr, dynamic_ncols=True,
            mininterval=0.2, disable=not on_terminal()) as bar:
        prepared = prepare(seed, settings, progress=bar)
        data, teacher_outputs = prepared.data, prepared.outputs
        timing.update(prepared.seconds)
        test = (data.x_test, data.y_test)
        teacher_accuracy = accuracy(prepared.teacher, *test)
        teacher_val_accuracy = accuracy(prepared.teacher, data.x_val, data.y_val)

        tick = time.perf_counter()
        outcomes = [run_seed(k, seeds[k], data, teacher_outputs, settings, test, progress=bar)
                    for k in range(settings.n_seeds)]
        timing["students"] = time.perf_counter() - tick

        tick = time.perf_counter()
        curve = {}
        for fraction in sorted(settings.curve_fractions):
            if fraction == settings.labelled_fraction:  # the main runs, same seeds
                curve[fraction] = outcomes[:settings.curve_seeds]
                continue
            curve[fraction] = [run_seed(k, seeds[k], data, teacher_outputs, settings, test,
                                        fraction=fraction, methods=curve_methods,
                                        progress=bar)
                               for k in range(settings.curve_seeds)]
        timing["fraction_curve"] = time.perf_counter() - tick
        bar.set_description("done")

    tick = time.perf_counter()
    closed_form = report.closed_form_projection(outcomes[0], teacher_outputs, data.x_train)
    curve_rows = report.curve_table(curve, settings)
    figures = report.build_figures(outcomes, teacher_accuracy, settings, closed_form,
                                   curve_rows)
    timing["figures"] = time.perf_counter() - tick
    timing["total"] = time.perf_counter() - started
    data_sizes = {"n_train": int(len(data.y_train)), "n_val": int(len(data.y_val)),
                  "n_test": int(len(data.y_test)), "split_seed": prepared.split_seed,
                  "student_seeds": list(range(settings.n_seeds))}
    summary = report.build_summary(outcomes, teacher_accuracy, settings, seed, quick,
                                   data_sizes, {k: round(v, 3) for k, v in timing.items()},
                                   closed_form, curve_rows, teacher_val_accuracy)
    report.write_outputs(out, figures, summary)
    report.print_report(summary, out)
    return summary
