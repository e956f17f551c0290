"""The benchmark table and figure: pkd's speed as ratios, from one ``pkd bench`` run.

Runs :func:`pkd.bench.run_bench` (the benchmark behind ``pkd bench``) over
its grid (variant × dtype × N rows × (d_s, d_t)) and writes, into
``analysis/results/bench/``:

- ``bench.json``: every measurement, the machine (CPU, BLAS, threads),
  the fixed cost of a call and the start-up times;
- ``bench.md``: the table: per case, pkd's time, its ratio to the GEMMs it
  cannot avoid (×GEMM; 1.00 is the physical limit), its speed-up over the
  plain NumPy version and over torch autograd, and its peak extra memory
  against the budget; before it, how many cases meet each of the
  performance targets (``TARGETS``), per dtype, with the worst case;
- ``ratio_vs_n.png``: ×GEMM against N per variant (top row) and the torch
  speed-up (bottom row), one column per dtype.

The full grid takes many minutes: run it on a quiet machine. ``--from-json``
rebuilds the table and the figure from an existing ``bench.json`` (or the
output of ``pkd bench --json``) without measuring anything.

Run (from the repository root):

    .venv/bin/python analysis/bench_table.py                     # full grid, many minutes
    .venv/bin/python analysis/bench_table.py --quick             # 14 cases, under a minute,
                                                                 # into results/bench-quick/
    .venv/bin/python analysis/bench_table.py --from-json analysis/results/bench/bench.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from _common import output_dir, write_json, write_text

from pkd.bench import describe_call_overhead, describe_cpu

NAME = "bench"
REQUIRED = ("variant", "dtype", "n_rows", "d_s", "d_t", "pkd_ms", "gemm_ms", "numpy_ms",
            "torch_ms", "peak_mb", "budget_mb")


def load_result(path: Path) -> dict:
    """Read a benchmark JSON and check it has the rows this script needs."""
    try:
        result = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SystemExit(f"--from-json {path}: no such file") from None
    except json.JSONDecodeError as error:
        raise SystemExit(f"--from-json {path}: not valid JSON ({error})") from None
    rows = result.get("rows") if isinstance(result, dict) else None
    if not isinstance(rows, list) or not rows:
        raise SystemExit(f"--from-json {path}: expected an object with a non-empty 'rows' "
                         "list (the output of pkd bench --json or of this script)")
    for k, row in enumerate(rows):
        missing = [key for key in REQUIRED if key not in row]
        if missing:
            raise SystemExit(f"--from-json {path}: rows[{k}] lacks {', '.join(missing)}")
        if not (row["pkd_ms"] > 0 and row["gemm_ms"] > 0):
            raise SystemExit(f"--from-json {path}: rows[{k}] has non-positive times")
    return result


def _ratio(numerator, denominator):
    return None if numerator is None or denominator is None else numerator / denominator


def _torch_blas(row: dict) -> float | None:
    """torch's GEMMs / numpy's (absent from benchmarks older than the column)."""
    return _ratio(row.get("torch_gemm_ms"), row["gemm_ms"])


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _geomean(values) -> float | None:
    values = [v for v in values if v is not None]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def _groups(rows: list[dict]) -> dict:
    """``{(variant, dtype): [rows]}`` in the order the rows first appear."""
    groups: dict = {}
    for row in rows:
        groups.setdefault((row["variant"], row["dtype"]), []).append(row)
    return groups


def _printed(value: float | None) -> float | None:
    """A time ratio as the tables print it (2 decimals): a printed 1.10 is within 1.10×."""
    return None if value is None else round(value, 2)


def _vs_gemm(row: dict) -> float:
    return _printed(row["pkd_ms"] / row["gemm_ms"])


def _torch_speedup(row: dict) -> float | None:
    return _printed(_ratio(row["torch_ms"], row["pkd_ms"]))


def _memory_share(row: dict) -> float | None:
    """Unrounded, as the summary's "peak within budget" compares it."""
    return _ratio(row["peak_mb"], row["budget_mb"])


# The loss and gradient variants the performance targets speak of.
CORE = ("plain", "masked", "normalized+masked", "4 pairs shared")

# (what is asked, the variants it covers (None: all), value of a row, bound,
# True when the value must reach the bound from above).
TARGETS = (
    ("loss and gradients within 1.10× the GEMMs", CORE, _vs_gemm, 1.10, False),
    ("at least as fast as torch autograd", CORE, _torch_speedup, 1.0, True),
    ("masked and normalized+masked ≥ 1.3× faster than torch",
     ("masked", "normalized+masked"), _torch_speedup, 1.3, True),
    ("4 pairs sharing P ≥ 1.2× faster than four torch calls", ("4 pairs shared",),
     _torch_speedup, 1.2, True),
    ("peak extra memory within the budget (share of it)", None, _memory_share, 1.0, False),
)

START_UP_TARGETS = (("`import pkd`", "import_s", 0.5),
                    ("first `loss_and_grad`, cache warm", "first_call_warm_s", 1.0))


def target_counts(rows: list[dict], variants, value, bound: float, at_least: bool,
                  dtype: str) -> tuple[int, int, float] | None:
    """``(met, cases, worst value)`` of one target over the rows of one dtype.

    Rows without the value (no torch, no budget) do not count. ``None`` when
    no row has the value.
    """
    values = [value(r) for r in rows
              if r["dtype"] == dtype and (variants is None or r["variant"] in variants)]
    values = [v for v in values if v is not None]
    if not values:
        return None
    met = sum(v >= bound if at_least else v <= bound for v in values)
    return met, len(values), (min(values) if at_least else max(values))


def _targets_lines(result: dict) -> list[str]:
    rows = result["rows"]
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    lines = [
        "## Targets",
        "",
        "Cases that meet each target, and the worst case (time ratios to 2 decimals, as "
        "printed below).",
        "",
        "| target | " + " | ".join(dtypes) + " |",
        "|---|" + "---|" * len(dtypes),
    ]
    for label, variants, value, bound, at_least in TARGETS:
        cells = []
        for dtype in dtypes:
            counts = target_counts(rows, variants, value, bound, at_least, dtype)
            cells.append("–" if counts is None else
                         f"{counts[0]} of {counts[1]} (worst {counts[2]:.2f})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    startup = result.get("startup")
    if startup:
        lines += [""] + [
            f"- {label} ≤ {bound:g} s: {startup[key]:.2f} s, "
            + ("met" if startup[key] <= bound else f"not met ({startup[key] / bound:.2f}×)")
            for label, key, bound in START_UP_TARGETS if key in startup
        ]
    return lines + [""]


def _machine_lines(header: dict) -> list[str]:
    if not header:
        return ["- machine: not recorded"]
    blas = ", ".join(f"{b.get('internal_api')} {b.get('version')} ({b.get('architecture')}, "
                     f"{b.get('num_threads')} threads)" for b in header.get("blas", []))
    torch = (f"torch {header['torch']} ({header.get('torch_threads')} threads)"
             if header.get("torch") else "torch not installed")
    return [
        f"- machine: {describe_cpu(header)}, {header.get('cores')} cores",
        f"- numpy {header.get('numpy')}, numba {header.get('numba')} "
        f"({header.get('numba_threads')} threads), BLAS: {blas or 'unknown'}; {torch}",
    ]


def markdown(result: dict) -> str:
    """bench.md: how to read it, a summary per variant and dtype, then every case."""
    rows = result["rows"]
    lines = [
        "# pkd benchmark",
        "",
        *_machine_lines(result.get("header", {})),
        f"- {result.get('repeats', '?')} timed runs per case after a warm-up"
        + (f" (more for fast cases: each round lasts at least {result['min_round_s']:g} s)"
           if result.get("min_round_s") else "")
        + ", pkd and the GEMMs interleaved call by call"
        + (f", NumPy and torch in separate blocks, alternated in {result['rounds']} rounds"
           if "rounds" in result else "")
        + ", medians; " + ("--quick subset." if result.get("quick") else "full grid."),
        "",
        "How to read it: **×GEMM** = pkd's time / the time of the GEMMs the computation "
        "cannot avoid, alone, in the same BLAS (for the projected loss S·P, Sᵀ·G, G·Pᵀ; for "
        "`alignment` SᵀS, TᵀT, SᵀT): 1.00 is the physical limit, lower is better. "
        "**NumPy/pkd** and **torch/pkd** are speed-ups over the plain NumPy version and "
        "torch CPU autograd (higher is better). **torch BLAS** = the same GEMMs in torch's "
        "own BLAS (MKL in its x86 wheels) / in numpy's: below 1, torch's GEMMs are the "
        "faster, and a torch/pkd below 1 can be the BLAS library's doing. "
        "**peak / budget**: pkd's peak extra memory "
        "(tracemalloc) against 1.2 × (one N×d_t buffer + the gradient outputs).",
        "",
        "## Summary per variant and dtype",
        "",
        "| variant | dtype | cases | ×GEMM median | ×GEMM worst | NumPy/pkd (geomean) "
        "| torch/pkd (geomean) | torch BLAS (geomean) | peak within budget |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (variant, dtype), group in _groups(rows).items():
        ratios = [r["pkd_ms"] / r["gemm_ms"] for r in group]
        numpy_up = _geomean(_ratio(r["numpy_ms"], r["pkd_ms"]) for r in group)
        torch_up = _geomean(_ratio(r["torch_ms"], r["pkd_ms"]) for r in group)
        torch_blas = _geomean(_torch_blas(r) for r in group)
        budgeted = [r for r in group if r["peak_mb"] is not None and r["budget_mb"] is not None]
        within = (f"{sum(r['peak_mb'] <= r['budget_mb'] for r in budgeted)} of {len(budgeted)}"
                  if budgeted else "–")
        lines.append(f"| {variant} | {dtype} | {len(group)} | {np.median(ratios):.2f} "
                     f"| {max(ratios):.2f} | {_fmt(numpy_up, '.2f')} | {_fmt(torch_up, '.2f')} "
                     f"| {_fmt(torch_blas, '.2f')} | {within} |")
    lines += [
        "",
        *_targets_lines(result),
        "![pkd time / GEMM time against N](ratio_vs_n.png)",
        "",
        "## Every case",
        "",
        "| variant | dtype | N | d_s×d_t | pkd ms | ×GEMM | NumPy/pkd | torch/pkd "
        "| torch BLAS | peak / budget MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        memory = (f"{_fmt(r['peak_mb'], '.1f')} / {_fmt(r['budget_mb'], '.1f')}"
                  if r["peak_mb"] is not None else "–")
        lines.append(
            f"| {r['variant']} | {r['dtype']} | {r['n_rows']} | {r['d_s']}×{r['d_t']} "
            f"| {r['pkd_ms']:.3f} | {r['pkd_ms'] / r['gemm_ms']:.2f} "
            f"| {_fmt(_ratio(r['numpy_ms'], r['pkd_ms']), '.2f')} "
            f"| {_fmt(_ratio(r['torch_ms'], r['pkd_ms']), '.2f')} "
            f"| {_fmt(_torch_blas(r), '.2f')} | {memory} |"
        )
    startup = result.get("startup")
    if startup:
        lines += [
            "",
            f"Start-up: `import pkd` {startup['import_s']:.2f} s; first `loss_and_grad` in a "
            f"fresh process {startup['first_call_warm_s']:.2f} s with Numba's on-disk cache "
            f"warm, {startup['first_call_cold_s']:.2f} s cold (compiling)."
            + ("" if "numba_floor_s" not in startup else
               f" The floor under it, a trivial cached Numba kernel's first call in a fresh "
               f"process: {startup['numba_floor_s']:.2f} s."),
        ]
    if result.get("call_overhead"):
        lines += ["", describe_call_overhead(result["call_overhead"])]
    matrix = result.get("alignment_6x12")
    if matrix:
        lines += [
            "",
            f"Layer-mapping workload ({matrix['n_student']} student × {matrix['n_teacher']} "
            f"teacher layers, N = {matrix['n_rows']}, {matrix['d_s']} → {matrix['d_t']}, "
            f"float32): the accumulation of `AlignmentStats` takes "
            f"{matrix['accumulate_s']:.2f} s, {matrix['accumulate_vs_gemm']:.2f}× its float64 "
            f"GEMMs alone ({matrix['gemm_s']:.2f} s); the whole `min_mse` matrix then takes "
            f"{matrix['min_mse_s']:.2f} s, against {matrix['lstsq_72_s']:.1f} s for "
            f"{matrix['n_student'] * matrix['n_teacher']} `scipy.linalg.lstsq` fits "
            f"({matrix['lstsq_vs_min_mse']:.0f}× faster).",
        ]
    if result.get("notes"):
        lines += ["", f"Note: {result['notes']}."]
    lines += ["", "Rerun: `.venv/bin/python analysis/bench_table.py` (measures; many minutes) "
              "or `--from-json analysis/results/bench/bench.json` (redraws only).", ""]
    return "\n".join(lines)


def _series(group: list[dict], value) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per N: the median, min and max of ``value(row)`` over the shapes (None skipped)."""
    by_n: dict = {}
    for row in group:
        v = value(row)
        if v is not None:
            by_n.setdefault(row["n_rows"], []).append(v)
    ns = np.array(sorted(by_n), dtype=float)
    values = [np.array(by_n[int(n)]) for n in ns]
    return (ns, np.array([np.median(v) for v in values]),
            np.array([v.min() for v in values]), np.array([v.max() for v in values]))


def _reference(ax, y: float, text: str, colour, above: bool = True) -> None:
    """A dashed horizontal reference line, labelled in the panel (not in the legend)."""
    ax.axhline(y, color=colour, linestyle="--", linewidth=1.0)
    ax.annotate(text, (1.0, y), xycoords=("axes fraction", "data"),
                xytext=(-4, 2 if above else -2), textcoords="offset points", ha="right",
                va="bottom" if above else "top", fontsize="x-small", color=colour)


def _plain_log_label(y: float, _=None) -> str:
    """Labels 1, 2, 3, 5 × 10^k on a log axis as plain numbers; other ticks unlabelled."""
    if y <= 0:
        return ""
    leading = round(y / 10 ** math.floor(math.log10(y)), 6)
    return f"{y:g}" if leading in (1, 2, 3, 5) else ""


def build_figure(result: dict):
    """×GEMM (top) and torch/pkd (bottom) against N; one line per variant, one column per dtype."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    rows = result["rows"]
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    colours = {v: f"C{k}" for k, v in enumerate(variants)}
    has_torch = any(r["torch_ms"] is not None for r in rows)
    n_rows = 2 if has_torch else 1
    fig = Figure(figsize=(max(5.2 * len(dtypes) + 0.6, 8.0), 4.0 * n_rows + 1.1),
                 layout="constrained")
    axes = np.atleast_2d(fig.subplots(n_rows, len(dtypes), squeeze=False, sharex=True))
    shapes = sorted({(r["d_s"], r["d_t"]) for r in rows})
    groups = _groups(rows)
    panels = [("×GEMM", lambda r: r["pkd_ms"] / r["gemm_ms"])]
    if has_torch:
        panels.append(("torch/pkd", lambda r: _ratio(r["torch_ms"], r["pkd_ms"])))

    for col, dtype in enumerate(dtypes):
        for row_index, (kind, value) in enumerate(panels):
            ax = axes[row_index, col]
            for variant in variants:
                group = groups.get((variant, dtype))
                if not group:
                    continue
                ns, mid, lo, hi = _series(group, value)
                if ns.size == 0:
                    continue
                ax.fill_between(ns, lo, hi, color=colours[variant], alpha=0.15, linewidth=0)
                ax.plot(ns, mid, marker="o", markersize=4, color=colours[variant],
                        label=variant)
            ax.set_xscale("log")
            ax.set_xticks(sorted({r["n_rows"] for r in rows}))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.grid(True, alpha=0.3)
            if kind == "×GEMM":
                _reference(ax, 1.0, "1.00: the GEMMs alone", "black", above=False)
                _reference(ax, 1.10, "1.10: 10% over them", "0.45")
                ax.set_ylabel("pkd time / GEMM time (lower = better)")
                ax.set_title(f"{dtype}: pkd vs the GEMMs it needs", fontsize="medium")
                ax.set_ylim(bottom=min(0.95, ax.get_ylim()[0]))
                if ax.get_ylim()[1] > 3.0:  # an outlier would flatten 1.0 vs 1.1: log scale
                    ax.set_yscale("log")
                    ax.set_ylim(bottom=min(0.9, 0.9 * ax.dataLim.y0))
                    ax.yaxis.set_major_formatter(FuncFormatter(_plain_log_label))
                    ax.yaxis.set_minor_formatter(FuncFormatter(_plain_log_label))
            else:
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(FuncFormatter(_plain_log_label))
                ax.yaxis.set_minor_formatter(FuncFormatter(_plain_log_label))
                _reference(ax, 1.0, "1: as fast as torch", "black")
                ax.set_ylabel("torch time / pkd time (higher = better)")
                ax.set_title(f"{dtype}: speed-up over torch CPU autograd", fontsize="medium")
            if row_index == n_rows - 1:
                ax.set_xlabel("N rows (log scale)")
            ax.tick_params(labelbottom=True)
    handles: dict = {}
    for ax in axes.flat:  # one legend for all panels, each variant once
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center",
               ncols=min(len(handles), 5 if len(dtypes) > 1 else 3), frameon=False,
               fontsize="small",
               title="variant", title_fontsize="small")
    shape_text = ", ".join(f"{a}×{b}" for a, b in shapes)
    fig.suptitle(f"pkd benchmark: lines are the median over the (d_s × d_t) shapes\n"
                 f"{shape_text}; bands their min–max", fontsize="medium")
    return fig


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="pkd bench --quick's subset (writes to bench-quick/)")
    parser.add_argument("--from-json", default=None, metavar="PATH",
                        help="rebuild bench.md and ratio_vs_n.png from this JSON; no timing")
    parser.add_argument("--out", default=None,
                        help="output directory (default analysis/results/bench)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (>= 5)")
    parser.add_argument("--dtype", action="append", choices=("float32", "float64"),
                        default=None,
                        help="repeat to measure several (default both; with --quick float32)")
    parser.add_argument("--variant", action="append", default=None,
                        help="repeat to measure several (default all)")
    args = parser.parse_args(argv)
    out = output_dir(NAME, args.out, args.quick)
    json_path = out / "bench.json"
    if args.from_json is not None:
        result = load_result(Path(args.from_json))
        if Path(args.from_json).resolve() != json_path.resolve():
            write_json(json_path, result)  # the results directory stays self-contained
    else:
        from pkd.bench import VARIANTS, check_variants, run_bench

        dtypes = None if args.dtype is None else tuple(dict.fromkeys(args.dtype))
        try:
            variants = check_variants(args.variant) if args.variant else VARIANTS
            result = run_bench(quick=args.quick, dtypes=dtypes, variants=variants,
                               repeats=args.repeats)
        except ValueError as error:  # raised before any timing
            parser.error(str(error))
        write_json(json_path, result)
    from pkd import plots

    written = [json_path, write_text(out / "bench.md", markdown(result)),
               plots.save_figure(build_figure(result), out / "ratio_vs_n.png")]
    print("wrote:\n" + "\n".join(f"  {p}" for p in written))
    return result


if __name__ == "__main__":
    main()
