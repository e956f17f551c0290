"""Tests for pkd.plots: every figure renders to a valid PNG of the right size,
draws what its arguments say (checked on the artists), and refuses bad input."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import LogNorm
from matplotlib.container import BarContainer
from matplotlib.figure import Figure

import pkd.plots as pp

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

MAPPINGS = {
    "uniform": [(0, 2), (1, 5), (2, 8), (3, 11)],
    "PKD-Skip": [(0, 2), (1, 5), (2, 8)],
    "PKD-Last": [(0, 8), (1, 9), (2, 10)],
    "optimal": [(0, 2), (1, 5), (2, 7), (3, 11)],
}


def png_size(path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the PNG signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


def check_png(fig: Figure, path, dpi: float = 80) -> None:
    """Save ``fig`` and check the PNG's pixel size is figsize × dpi."""
    pp.save_figure(fig, path, dpi=dpi)
    assert path.is_file()
    w_in, h_in = fig.get_size_inches()
    width, height = png_size(path)
    assert abs(width - w_in * dpi) <= 1 and abs(height - h_in * dpi) <= 1


def legend_texts(ax) -> list[str]:
    legend = ax.get_legend()
    assert legend is not None
    return [t.get_text() for t in legend.get_texts()]


def alignment_matrix(n_s=4, n_t=12, seed=0):
    rng = np.random.default_rng(seed)
    s = np.arange(n_s)[:, None]
    t = np.arange(n_t)[None, :]
    return 0.05 + np.abs((t + 1) / n_t - (s + 1) / n_s) + 0.02 * rng.random((n_s, n_t))


def loss_history(steps=50, pairs=4, seed=0):
    rng = np.random.default_rng(seed)
    floor = np.linspace(0.1, 0.2, pairs)
    curve = floor + np.exp(-0.05 * np.arange(steps))[:, None] * np.linspace(1, 2, pairs)
    return curve * (1 + 0.02 * rng.random((steps, pairs))), floor


# ----------------------------------------------------------------------------- import


def test_import_pkd_does_not_import_matplotlib():
    code = "import pkd, sys; assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr


def test_import_pkd_plots_does_not_import_pyplot():
    # Figures are built without pyplot: no global state, no backend chosen.
    code = (
        "import sys, pkd.plots; assert 'matplotlib' in sys.modules; "
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MPLBACKEND", "DISPLAY")}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------------------- heatmap


def heatmap_parts(fig):
    """The heatmap Axes (the one holding the image) and its image."""
    (ax,) = [a for a in fig.axes if a.images and a.images[0].colorbar is not None]
    return ax, ax.images[0]


def test_heatmap_renders_png_of_figsize_times_dpi(tmp_path):
    fig = pp.alignment_heatmap(alignment_matrix(), mappings=MAPPINGS, title="t")
    assert isinstance(fig, Figure)
    check_png(fig, tmp_path / "heat.png", dpi=80)


def test_heatmap_explicit_figsize_and_dpi(tmp_path):
    fig = pp.alignment_heatmap(alignment_matrix(), figsize=(7.5, 3.0))
    pp.save_figure(fig, tmp_path / "h.png", dpi=100)
    assert png_size(tmp_path / "h.png") == (750, 300)


def test_heatmap_orientation_ticks_colourbar_and_legend():
    M = alignment_matrix(4, 12)
    fig = pp.alignment_heatmap(M, mappings=MAPPINGS, value_label="linear CKA")
    ax, image = heatmap_parts(fig)
    # Rows are student layers (y), columns teacher layers (x).
    np.testing.assert_array_equal(image.get_array(), M)
    assert ax.get_xlabel() == "teacher layer" and ax.get_ylabel() == "student layer"
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(i) for i in range(12)]
    assert [t.get_text() for t in ax.get_yticklabels()] == [str(i) for i in range(4)]
    assert image.colorbar.ax.get_ylabel() == "linear CKA"
    texts = legend_texts(ax)
    for name, pairs in MAPPINGS.items():
        assert f"{name} ({len(pairs)} pairs)" in texts
    # Legend below the heatmap, outside the cells.
    fig.draw_without_rendering()
    legend_box = ax.get_legend().get_window_extent()
    assert legend_box.y1 < ax.xaxis.label.get_window_extent().y0  # below the x label
    assert legend_box.y0 >= 0 and legend_box.x0 >= 0 and legend_box.x1 <= fig.bbox.width


def test_heatmap_default_label_says_what_is_drawn():
    fig = pp.alignment_heatmap(alignment_matrix())
    _, image = heatmap_parts(fig)
    assert image.colorbar.ax.get_ylabel() == pp.DEFAULT_VALUE_LABEL
    assert "1 − R²" in pp.DEFAULT_VALUE_LABEL


def test_heatmap_markers_at_the_mapped_cells_with_distinct_styles():
    fig = pp.alignment_heatmap(alignment_matrix(), mappings=MAPPINGS, annotate=False)
    ax, _ = heatmap_parts(fig)
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == set(MAPPINGS)
    for name, pairs in MAPPINGS.items():
        x, y = lines[name].get_xdata(), lines[name].get_ydata()
        # Markers stay inside the mapped cell (shared cells spread them sideways).
        assert [(int(round(yy)), int(round(xx))) for xx, yy in zip(x, y, strict=True)] == pairs
        assert np.all(np.abs(x - np.round(x)) < 0.45)
    styles = {(line.get_marker(), line.get_markerfacecolor()) for line in lines.values()}
    assert len({m for m, _ in styles}) == len(MAPPINGS)  # distinct shapes
    assert len({c for _, c in styles}) == len(MAPPINGS)  # distinct colours
    # (0, 2) is in three mappings: three different x positions in that cell.
    shared = [
        lines[n].get_xdata()[MAPPINGS[n].index((0, 2))] for n in ("uniform", "PKD-Skip", "optimal")
    ]
    assert len(set(np.round(shared, 6))) == 3
    # (1, 9) only in PKD-Last: centred.
    last = lines["PKD-Last"]
    assert last.get_xdata()[1] == pytest.approx(9.0)


def test_heatmap_annotations_small_matrix_only():
    M = alignment_matrix(3, 5)
    ax, _ = heatmap_parts(pp.alignment_heatmap(M, fmt=".3f"))
    assert sorted(t.get_text() for t in ax.texts) == sorted(format(v, ".3f") for v in M.ravel())
    ax, _ = heatmap_parts(pp.alignment_heatmap(M, annotate=False))
    assert len(ax.texts) == 0
    ax, _ = heatmap_parts(pp.alignment_heatmap(alignment_matrix(13, 24)))
    assert len(ax.texts) == 0  # too big by default


def test_heatmap_nan_cells_masked_and_in_legend(tmp_path):
    M = alignment_matrix()
    M[1, 3] = np.nan
    fig = pp.alignment_heatmap(M, annotate=True)
    ax, image = heatmap_parts(fig)
    data = image.get_array()
    assert data.mask[1, 3] and data.mask.sum() == 1
    assert "NaN (not computed)" in legend_texts(ax)
    assert "NaN" in [t.get_text() for t in ax.texts]
    check_png(fig, tmp_path / "nan.png")


def test_heatmap_log_colour_scale():
    fig = pp.alignment_heatmap(alignment_matrix(), log=True)
    _, image = heatmap_parts(fig)
    assert isinstance(image.norm, LogNorm)


def test_heatmap_many_layers_thins_ticks():
    fig = pp.alignment_heatmap(alignment_matrix(6, 40))
    ax, _ = heatmap_parts(fig)
    labels = [int(t.get_text()) for t in ax.get_xticklabels()]
    assert labels[0] == 0 and len(labels) <= 16 and labels == sorted(labels)


def test_heatmap_into_given_axes(tmp_path):
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    out = pp.alignment_heatmap(alignment_matrix(), mappings=MAPPINGS, ax=ax2)
    assert out is fig
    assert ax2.images and not ax1.images
    check_png(out, tmp_path / "ax.png")
    assert png_size(tmp_path / "ax.png") == (800, 320)


def test_heatmap_into_pyplot_axes():
    plt = pytest.importorskip("matplotlib.pyplot")
    fig, ax = plt.subplots()
    try:
        assert pp.alignment_heatmap(alignment_matrix(), ax=ax) is fig
    finally:
        plt.close(fig)


def test_heatmap_in_subfigure_returns_root_figure():
    fig = Figure(layout="constrained")
    sub = fig.subfigures(1, 2)[1]
    ax = sub.add_subplot()
    assert pp.alignment_heatmap(alignment_matrix(), ax=ax) is fig


@pytest.mark.parametrize(
    ("matrix", "error", "match"),
    [
        (np.zeros(5), ValueError, "must be 2-D"),
        (np.zeros((2, 3, 4)), ValueError, "must be 2-D"),
        (np.arange(6).reshape(2, 3), TypeError, "float32 or float64"),
        (np.full((2, 3), np.nan), ValueError, "all NaN"),
        (np.array([[1.0, np.inf]]), ValueError, "Inf"),
        (np.zeros((0, 3)), ValueError, "empty"),
    ],
)
def test_heatmap_bad_matrix(matrix, error, match):
    with pytest.raises(error, match=match):
        pp.alignment_heatmap(matrix)


def test_heatmap_pair_out_of_range_names_pair_and_shape():
    with pytest.raises(ValueError, match=r"'PKD-Last'.*\(3, 12\).*\(4, 12\)"):
        pp.alignment_heatmap(alignment_matrix(), mappings={"PKD-Last": [(0, 8), (3, 12)]})
    with pytest.raises(ValueError, match=r"\(4, 0\).*\(4, 12\)"):
        pp.alignment_heatmap(alignment_matrix(), mappings={"m": [(4, 0)]})


@pytest.mark.parametrize(
    ("mappings", "error", "match"),
    [
        ([(0, 1)], TypeError, "mappings must be a dict"),
        ({1: [(0, 1)]}, TypeError, "keys must be str"),
        ({"m": []}, ValueError, r"mappings\['m'\].*empty"),
        ({"m": [(0, 1, 2)]}, ValueError, r"mappings\['m'\].*exactly 2"),
        ({"m": [(0, -1)]}, ValueError, r"mappings\['m'\].*>= 0"),
        ({"m": [(0.0, 1)]}, TypeError, r"mappings\['m'\].*int"),
        ({f"m{k}": [(0, 0)] for k in range(9)}, ValueError, "at most 8"),
    ],
)
def test_heatmap_bad_mappings(mappings, error, match):
    with pytest.raises(error, match=match):
        pp.alignment_heatmap(alignment_matrix(), mappings=mappings)


def test_heatmap_other_bad_arguments():
    M = alignment_matrix()
    bad = M.copy()
    bad[0, 0] = 0.0
    with pytest.raises(ValueError, match="log=True"):
        pp.alignment_heatmap(bad, log=True)
    with pytest.raises(ValueError, match="colormap"):
        pp.alignment_heatmap(M, cmap="no-such-map")
    with pytest.raises(TypeError, match="Axes"):
        pp.alignment_heatmap(M, ax="axes")
    with pytest.raises(TypeError, match="value_label"):
        pp.alignment_heatmap(M, value_label="")
    with pytest.raises(TypeError, match="figsize"):
        pp.alignment_heatmap(M, figsize=(3,))
    with pytest.raises(ValueError, match="figsize"):
        pp.alignment_heatmap(M, figsize=(3, -1))
    with pytest.raises(TypeError, match="title"):
        pp.alignment_heatmap(M, title=3)


# ----------------------------------------------------------------------------- layer_losses


def test_layer_losses_two_panels(tmp_path):
    H, floor = loss_history()
    mapping = [(0, 2), (1, 5), (2, 8), (3, 11)]
    fig = pp.layer_losses(H, labels=mapping, floor=floor, title="run")
    check_png(fig, tmp_path / "losses.png")
    curves, bars = fig.axes
    assert len(curves.get_lines()) == 4
    assert curves.get_yscale() == "log" and bars.get_yscale() == "log"
    assert legend_texts(curves) == ["s0→t2", "s1→t5", "s2→t8", "s3→t11"]
    for k, line in enumerate(curves.get_lines()):
        np.testing.assert_array_equal(line.get_ydata(), H[:, k])
        np.testing.assert_array_equal(line.get_xdata(), np.arange(len(H)))
    heights = [p.get_height() for p in bars.patches]
    np.testing.assert_allclose(heights, H[-1])
    assert [t.get_text() for t in bars.get_xticklabels()] == legend_texts(curves)
    assert legend_texts(bars) == [pp.FLOOR_LABEL]
    (floor_lines,) = bars.collections
    segments = floor_lines.get_segments()
    np.testing.assert_allclose([seg[0, 1] for seg in segments], floor)
    np.testing.assert_allclose([seg[:, 0].mean() for seg in segments], np.arange(4))
    assert fig.get_suptitle() == "run"
    assert "loss" in curves.get_ylabel() and curves.get_xlabel() == "step"


def test_layer_losses_default_labels_steps_and_linear_axis():
    H, _ = loss_history(steps=10, pairs=3)
    steps = np.arange(10) * 100
    fig = pp.layer_losses(H, steps=steps, log=False)
    curves, bars = fig.axes
    assert legend_texts(curves) == ["pair 0", "pair 1", "pair 2"]
    np.testing.assert_array_equal(curves.get_lines()[0].get_xdata(), steps)
    assert curves.get_yscale() == "linear"
    assert bars.get_legend() is None  # no floor given: nothing to explain


def test_layer_losses_string_labels_and_many_pairs():
    H, _ = loss_history(steps=30, pairs=12)
    labels = [f"L{k}" for k in range(12)]
    fig = pp.layer_losses(H, labels=labels)
    curves, _ = fig.axes
    assert legend_texts(curves) == labels
    colours = {line.get_color() for line in curves.get_lines()}
    assert len(colours) == 12


def test_layer_losses_one_row_history_uses_markers(tmp_path):
    _, floor = loss_history()
    fig = pp.layer_losses(floor[None, :] * 1.01, floor=floor)
    curves, bars = fig.axes
    for line in curves.get_lines():
        assert line.get_marker() == "o" and line.get_linestyle() == "None"
    assert len(bars.patches) == 4
    check_png(fig, tmp_path / "one.png")


def test_layer_losses_single_axes_draws_curves_only(tmp_path):
    H, floor = loss_history()
    fig = Figure(figsize=(5, 4), layout="constrained")
    ax = fig.add_subplot()
    assert pp.layer_losses(H, floor=floor, ax=ax, title="t") is fig
    assert fig.axes == [ax] and len(ax.get_lines()) == 4 and ax.get_title() == "t"
    check_png(fig, tmp_path / "one_ax.png")


def test_layer_losses_two_given_axes(tmp_path):
    H, floor = loss_history()
    fig = Figure(figsize=(9, 4), layout="constrained")
    axes = fig.subplots(1, 2)  # an ndarray of two Axes
    assert pp.layer_losses(H, floor=floor, ax=axes) is fig
    assert len(axes[0].get_lines()) == 4 and len(axes[1].patches) == 4
    check_png(fig, tmp_path / "two_ax.png")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"history": np.ones(5)}, ValueError, "2-D"),
        ({"history": np.ones((3, 2), dtype=int)}, TypeError, "float32 or float64"),
        ({"history": np.array([[1.0, np.nan]])}, ValueError, "NaN.*finite to be drawn"),
        ({"history": np.array([[1.0, -0.5]])}, ValueError, "negative"),
        ({"history": np.array([[1.0, 0.0]])}, ValueError, "log=False"),
        ({"labels": ["a"]}, ValueError, "1 entries but history has 2"),
        ({"labels": "ab"}, TypeError, "labels"),
        ({"labels": [(0, 1), "x"]}, TypeError, "labels"),
        ({"floor": np.ones(3)}, ValueError, r"floor has shape \(3,\).*2 pair"),
        ({"floor": np.array([1.0, -1.0])}, ValueError, "negative"),
        ({"floor": np.array([1.0, 0.0])}, ValueError, "log=False"),
        ({"steps": np.arange(4)}, ValueError, "steps must be 3"),
        ({"ax": "x"}, TypeError, "ax must be"),
        ({"ax": [1, 2]}, TypeError, r"ax\[0\]"),
    ],
)
def test_layer_losses_bad_input(kwargs, error, match):
    args = {"history": np.ones((3, 2))} | kwargs
    history = args.pop("history")
    with pytest.raises(error, match=match):
        pp.layer_losses(history, **args)


def test_layer_losses_zero_loss_allowed_without_log():
    fig = pp.layer_losses(np.array([[1.0, 0.0]]), floor=np.zeros(2), log=False)
    assert fig.axes[0].get_yscale() == "linear"


def test_layer_losses_axes_from_two_figures_refused():
    a = Figure().add_subplot()
    b = Figure().add_subplot()
    with pytest.raises(ValueError, match="same figure"):
        pp.layer_losses(np.ones((3, 2)), ax=(a, b))


# ----------------------------------------------------------------------------- spectrum


def spectra(seed=0):
    rng = np.random.default_rng(seed)
    d_s, d_t = 16, 32
    a = np.sqrt(6 / (d_s + d_t))
    P0 = rng.uniform(-a, a, (d_s, d_t))
    P1 = P0 + 0.5 * rng.standard_normal((d_s, d_t))
    return {"Xavier init": P0, "trained": P1}, (0.2, 1.9)


def test_spectrum_lines_are_sorted_singular_values(tmp_path):
    projections, edges = spectra()
    fig = pp.projection_spectrum(projections, mp_edges=edges, title="spec")
    check_png(fig, tmp_path / "spec.png")
    (ax,) = fig.axes
    assert ax.get_yscale() == "log" and ax.get_xscale() == "linear"
    lines = ax.get_lines()
    assert len(lines) == 2
    for line, P in zip(lines, projections.values(), strict=True):
        expected = np.linalg.svd(P, compute_uv=False)  # independent of scipy's svdvals
        np.testing.assert_allclose(line.get_ydata(), expected, rtol=1e-10)
        np.testing.assert_array_equal(line.get_xdata(), np.arange(1, 17))
    texts = legend_texts(ax)
    assert texts == ["Xavier init", "trained", pp.MP_LABEL]
    assert "Marchenko–Pastur" in pp.MP_LABEL
    (band,) = [p for p in ax.patches if p.get_label() == pp.MP_LABEL]
    if hasattr(band, "get_height"):  # a Rectangle (matplotlib >= 3.9)
        lo, hi = band.get_y(), band.get_y() + band.get_height()
    else:  # a Polygon
        lo, hi = band.get_xy()[:, 1].min(), band.get_xy()[:, 1].max()
    assert (lo, hi) == (pytest.approx(0.2), pytest.approx(1.9))
    assert ax.get_title() == "spec"


def test_spectrum_singular_values_given_directly_and_zeros_reported():
    sigma = np.array([0.5, 2.0, 0.0, 1.0, 0.0])
    fig = pp.projection_spectrum({"given": sigma}, logx=True)
    (ax,) = fig.axes
    assert ax.get_xscale() == "log"
    (line,) = ax.get_lines()
    np.testing.assert_array_equal(line.get_ydata()[:3], [2.0, 1.0, 0.5])
    assert np.isnan(line.get_ydata()[3:]).all()
    assert legend_texts(ax) == ["given (2 σ = 0 not shown)"]


def test_spectrum_band_down_to_zero_square_projection(tmp_path):
    rng = np.random.default_rng(1)
    P = rng.uniform(-0.3, 0.3, (8, 8))
    fig = pp.projection_spectrum({"square": P}, mp_edges=(0.0, 1.0))
    (ax,) = fig.axes
    assert 0 < ax.get_ylim()[0] < np.linalg.svd(P, compute_uv=False).min()
    check_png(fig, tmp_path / "square.png")


def test_spectrum_into_given_axes(tmp_path):
    projections, edges = spectra()
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    assert pp.projection_spectrum(projections, mp_edges=edges, ax=ax) is fig
    assert len(ax.get_lines()) == 2
    check_png(fig, tmp_path / "spec_ax.png")


@pytest.mark.parametrize(
    ("projections", "kwargs", "error", "match"),
    [
        ({}, {}, TypeError, "non-empty dict"),
        ([np.eye(2)], {}, TypeError, "dict"),
        ({1: np.eye(2)}, {}, TypeError, "keys must be str"),
        ({"a": np.ones((2, 2, 2))}, {}, ValueError, r"projections\['a'\].*1-D or 2-D"),
        ({"a": np.array([1.0, -1.0])}, {}, ValueError, "negative"),
        ({"a": np.array([[np.nan, 1.0]])}, {}, ValueError, "NaN.*has no spectrum"),
        ({"a": np.eye(2, dtype=int)}, {}, TypeError, "float32 or float64"),
        ({"a": np.eye(2)}, {"mp_edges": (2.0, 1.0)}, ValueError, "lo <= hi"),
        ({"a": np.eye(2)}, {"mp_edges": (-1.0, 1.0)}, ValueError, "lo <= hi"),
        ({"a": np.eye(2)}, {"mp_edges": 1.0}, TypeError, "mp_edges"),
        ({"a": np.eye(2)}, {"ax": 1}, TypeError, "Axes"),
    ],
)
def test_spectrum_bad_input(projections, kwargs, error, match):
    with pytest.raises(error, match=match):
        pp.projection_spectrum(projections, **kwargs)


# ----------------------------------------------------------------------------- accuracy


def test_accuracy_bars_means_and_stds(tmp_path):
    runs = [84.0, 85.0, 86.5]
    table = {"no KD": (81.0, 0.5), "PKD": runs, "two runs": [80.0, 82.0]}
    fig = pp.accuracy_bars(table, title="SST-2")
    check_png(fig, tmp_path / "acc.png")
    (ax,) = fig.axes
    heights = [p.get_height() for p in ax.patches]
    np.testing.assert_allclose(heights, [81.0, np.mean(runs), 81.0])
    # A tuple is (mean, std); a list is runs (sample std, ddof=1).
    stds = [0.5, np.std(runs, ddof=1), np.std([80.0, 82.0], ddof=1)]
    (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]
    (segments,) = bars.errorbar.lines[2]
    spans = [seg[1, 1] - seg[0, 1] for seg in segments.get_segments()]
    np.testing.assert_allclose(spans, 2 * np.array(stds))
    assert ax.get_ylabel() == "test accuracy (%)"
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["no KD", "PKD\n(n=3)", "two runs\n(n=2)"]
    assert f"{np.mean(runs):.1f} ± {np.std(runs, ddof=1):.1f}" in [t.get_text() for t in ax.texts]
    # The single runs are drawn as dots.
    dots = [line for line in ax.get_lines() if line.get_marker() == "o"]
    assert sorted(np.concatenate([d.get_ydata() for d in dots])) == sorted(runs + [80.0, 82.0])


def test_accuracy_bars_ylim_and_given_axes(tmp_path):
    fig = Figure(figsize=(5, 4), layout="constrained")
    ax = fig.add_subplot()
    assert pp.accuracy_bars({"a": [80.0, 81.0], "b": (82.0, 1.0)}, ylim=(75, 90), ax=ax) is fig
    assert ax.get_ylim() == (75.0, 90.0)
    check_png(fig, tmp_path / "acc_ax.png")


@pytest.mark.parametrize(
    ("table", "kwargs", "error", "match"),
    [
        ({}, {}, TypeError, "non-empty dict"),
        ({"a": (80.0, 1.0, 2.0)}, {}, TypeError, r"table\['a'\].*\(mean, std\)"),
        ({"a": (80.0, -1.0)}, {}, ValueError, "std >= 0"),
        ({"a": []}, {}, TypeError, "non-empty 1-D"),
        ({"a": ["x"]}, {}, TypeError, "non-empty 1-D"),
        ({"a": [80.0, np.nan]}, {}, ValueError, "NaN"),
        ({"a": 80.0}, {}, TypeError, r"table\['a'\]"),
        ({3: [80.0]}, {}, TypeError, "keys must be str"),
        ({"a": [80.0]}, {"ylim": (90, 80)}, ValueError, "bottom < top"),
    ],
)
def test_accuracy_bars_bad_input(table, kwargs, error, match):
    with pytest.raises(error, match=match):
        pp.accuracy_bars(table, **kwargs)


# ----------------------------------------------------------------------------- save_figure


def small_figure() -> Figure:
    fig = Figure(figsize=(2, 1))
    fig.add_subplot().plot([0, 1], [0, 1])
    return fig


def test_save_figure_replaces_atomically_and_leaves_no_temp(tmp_path):
    target = tmp_path / "fig.png"
    target.write_bytes(b"old")
    fig = small_figure()
    assert pp.save_figure(fig, str(target), dpi=50) == target
    assert png_size(target) == (100, 50)
    assert os.listdir(tmp_path) == ["fig.png"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    # The figure is not closed: it can be saved again.
    pp.save_figure(fig, tmp_path / "again.svg")
    assert (tmp_path / "again.svg").read_text().lstrip().startswith("<?xml")


def test_save_figure_failure_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    target = tmp_path / "fig.png"
    target.write_bytes(b"old")
    fig = small_figure()

    def broken(temporary, **kwargs):
        Path(temporary).write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(fig, "savefig", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        pp.save_figure(fig, target)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["fig.png"]


@pytest.mark.parametrize(
    ("fig", "path", "dpi", "error", "match"),
    [
        ("fig", "x.png", 100, TypeError, "Figure"),
        (None, "x", 100, ValueError, "suffix"),
        (None, "x.notaformat", 100, ValueError, "suffix"),
        (None, "missing/x.png", 100, ValueError, "does not exist"),
        (None, "x.png", 0, ValueError, "dpi"),
        (None, "x.png", True, TypeError, "dpi"),
    ],
)
def test_save_figure_bad_input(tmp_path, fig, path, dpi, error, match):
    fig = small_figure() if fig is None else fig
    with pytest.raises(error, match=match):
        pp.save_figure(fig, tmp_path / path, dpi=dpi)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(("n_s", "n_t"), [(2, 3), (4, 4), (6, 12), (3, 30)])
def test_heatmap_legend_fits_for_any_shape(n_s, n_t):
    M = alignment_matrix(n_s, n_t)
    M[0, -1] = np.nan
    names = ["uniform", "PKD-Skip", "PKD-Last", "optimal"]
    mappings = {
        name: [(s, min(s + k, n_t - 1)) for s in range(n_s)] for k, name in enumerate(names)
    }
    fig = pp.alignment_heatmap(M, mappings=mappings, title="a title")
    ax, _ = heatmap_parts(fig)
    fig.draw_without_rendering()
    legend_box = ax.get_legend().get_window_extent()
    assert legend_box.y1 < ax.xaxis.label.get_window_extent().y0
    assert legend_box.y0 >= 0 and legend_box.x0 >= 0 and legend_box.x1 <= fig.bbox.width
    # The heatmap keeps most of the figure's width (the legend did not squeeze it).
    assert ax.get_window_extent().width > 0.4 * fig.bbox.width
    assert len(legend_texts(ax)) == 5


def test_heatmap_long_colourbar_label_is_wrapped_to_fit():
    label = "relative best-reachable loss of the student layer (1 − R²), held-out rows"
    fig = pp.alignment_heatmap(alignment_matrix(2, 3), value_label=label)
    _, image = heatmap_parts(fig)
    fig.draw_without_rendering()
    text = image.colorbar.ax.yaxis.label
    assert "\n" in text.get_text() and text.get_text().replace("\n", " ") == label
    assert text.get_window_extent().height <= image.colorbar.ax.get_window_extent().height
    # A short label is left alone.
    fig = pp.alignment_heatmap(alignment_matrix(2, 3), value_label="CKA")
    assert heatmap_parts(fig)[1].colorbar.ax.get_ylabel() == "CKA"
