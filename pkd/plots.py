"""Matplotlib figures for PKD analysis: alignment heatmaps, loss curves, spectra.

This module is the only place ``pkd`` touches matplotlib, and ``import pkd``
does not import it: ``import pkd.plots`` does.

No pyplot and no backend. When ``ax`` is ``None`` each function builds a
:class:`matplotlib.figure.Figure` directly (constrained layout), which needs no
display and leaves pyplot's global state and the user's backend alone; save it
with :func:`save_figure` (or ``fig.savefig``). In Jupyter a returned Figure is
shown inline. To draw into a window or a larger layout, create the Axes
yourself (``fig, ax = plt.subplots(layout="constrained")``) and pass ``ax``:
the function then draws into ``ax.figure`` and returns that figure.

Every function returns the :class:`~matplotlib.figure.Figure` it drew into.
"""

from __future__ import annotations

import numbers
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm, Normalize, to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import LogFormatter
from matplotlib.transforms import ScaledTranslation

from pkd import _validation as V
from pkd._atomic import atomic_write
from pkd._validation import check_float_array, check_mapping

__all__ = [
    "accuracy_bars",
    "alignment_heatmap",
    "layer_losses",
    "projection_spectrum",
    "save_figure",
]

DEFAULT_VALUE_LABEL = "relative best-reachable loss (1 − R²)"
MP_LABEL = "Marchenko–Pastur band (Xavier init)"
FLOOR_LABEL = "closed-form floor"

# Marker styles for mappings on the heatmap: shapes and fills that stay visible
# on both ends of viridis (black edge on the yellow end, bright fill on the dark
# end).
_MAPPING_STYLES = (
    ("o", "#e6194b"),  # red circle
    ("s", "#ffffff"),  # white square
    ("D", "#f58231"),  # orange diamond
    ("^", "#42d4f4"),  # cyan triangle
    ("v", "#f032e6"),  # magenta triangle
    ("P", "#bfef45"),  # lime plus
    ("X", "#fabed4"),  # pink cross
    ("*", "#ffe119"),  # yellow star
)
_NAN_COLOUR = "0.82"  # light grey for NaN cells


# --------------------------------------------------------------------------- helpers


def _new_figure(figsize: tuple[float, float]) -> Figure:
    """A pyplot-free figure with constrained layout (needs no backend)."""
    return Figure(figsize=figsize, layout="constrained")


def _check_axes(ax, name: str = "ax") -> Axes:
    if not isinstance(ax, Axes):
        raise TypeError(f"{name} must be a matplotlib Axes, got {type(ax).__name__}")
    return ax


def _root_figure(ax: Axes) -> Figure:
    """The top-level Figure of ``ax`` (not a SubFigure it may live in)."""
    try:
        return ax.get_figure(root=True)  # matplotlib >= 3.10
    except TypeError:
        return ax.get_figure().figure


def _check_figsize(figsize) -> tuple[float, float] | None:
    if figsize is None:
        return None
    w, h = V.check_number_pair(figsize, "figsize", "(width, height) in inches")
    if not (np.isfinite(w) and np.isfinite(h) and w > 0 and h > 0):
        raise ValueError(f"figsize must be two finite positive numbers (inches), got {figsize!r}")
    return (w, h)


def _check_title(title) -> str | None:
    return V.check_str(title, "title", optional=True)


def _layer_ticks(ax_axis, n: int, embeddings: int | None = None) -> None:
    """Integer ticks at every layer (or every k-th one when there are many); "emb" marks
    the embeddings' index, which always gets its tick."""
    step = 1 if n <= 16 else int(np.ceil(n / 16))
    ticks = set(range(0, n, step)) | ({embeddings} if embeddings is not None else set())
    ticks = sorted(ticks)
    ax_axis.set_ticks(ticks, labels=["emb" if t == embeddings else str(t) for t in ticks])


def _check_embeddings(value, n: int, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int layer index or None, got {value!r}")
    if not 0 <= value < n:
        raise ValueError(f"{name}={value} is out of range for {n} layers (0..{n - 1})")
    return int(value)


class _PlainLogFormatter(LogFormatter):
    """LogFormatter's choice of which ticks to label, written as plain numbers
    ("0.2", not "2×10⁻¹" or "2e-01")."""

    def __call__(self, x, pos=None):
        shown = super().__call__(x, pos)
        return f"{x:.3g}" if shown else ""


def _plain_log_labels(ax: Axes) -> None:
    """Plain-number labels on a log y axis; minor ticks labelled (a subset of
    them) when the axis spans fewer than two decades."""
    ax.yaxis.set_major_formatter(_PlainLogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(
        _PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5))
    )


def _series_colours(n: int) -> list:
    if n <= 10:
        cmap = colormaps["tab10"]
        return [cmap(i) for i in range(n)]
    if n <= 20:
        cmap = colormaps["tab20"]
        return [cmap(i) for i in range(n)]
    cmap = colormaps["viridis"]
    return [cmap(v) for v in np.linspace(0.0, 0.9, n)]


def _legend_below(ax: Axes, handles, labels, max_width_px: float | None = None):
    """Place a legend under the axes, below its tick labels and x label.

    The space the x axis takes below the axes is measured once (fonts do not
    change when constrained layout later resizes the axes), and the legend is
    anchored that far below the axes' bottom edge, in inches, so it never
    covers cells or axis text; constrained layout then makes room for it.
    It gets as many columns as fit within ``max_width_px`` (default: the axes'
    current width): a legend wider than the axes would make constrained layout
    squeeze them, or be clipped.
    """
    fig = ax.figure
    below_px = ax.get_window_extent().y0 - ax.get_tightbbox().y0
    below_in = max(below_px, 0.0) / fig.dpi + 0.04
    transform = ax.transAxes + ScaledTranslation(0.0, -below_in, fig.dpi_scale_trans)
    width = ax.get_window_extent().width if max_width_px is None else max_width_px
    for ncols in range(len(handles), 0, -1):
        legend = ax.legend(
            handles,
            labels,
            loc="upper center",
            bbox_to_anchor=(0.5, 0.0),
            bbox_transform=transform,
            ncols=ncols,
            frameon=False,
            handletextpad=0.4,
            columnspacing=1.2,
        )
        if legend.get_window_extent().width <= width:
            break
    return legend


def _fit_colourbar_label(colourbar, label: str) -> None:
    """Wrap the colour bar label onto several lines when it is longer than the bar.

    Measured after a layout pass (``draw_without_rendering``), since the bar's
    final height is only known then: a short heatmap has a short colour bar,
    and a long label would otherwise run off the figure.
    """
    _root_figure(colourbar.ax).draw_without_rendering()
    text = colourbar.ax.yaxis.label
    bar_px = colourbar.ax.get_window_extent().height
    label_px = text.get_window_extent().height
    if label_px <= bar_px or bar_px <= 0:
        return
    lines = int(np.ceil(1.05 * label_px / bar_px))
    width = max(8, int(np.ceil(len(label) / lines)))
    text.set_text("\n".join(textwrap.wrap(label, width, break_on_hyphens=False)))


# --------------------------------------------------------------------------- heatmap


def _check_heatmap_mappings(mappings, shape: tuple[int, int]) -> dict[str, list[tuple[int, int]]]:
    if mappings is None:
        return {}
    mappings = V.check_str_keyed(mappings, "mappings",
                                 "{name: [(student_layer, teacher_layer), ...]}",
                                 key_meaning="legend labels", nonempty=False)
    n_s, n_t = shape
    checked = {}
    for name, pairs in mappings.items():
        try:
            pairs = check_mapping(pairs)
        except (TypeError, ValueError) as err:
            raise type(err)(f"mappings[{name!r}]: {err}") from err
        for s, t in pairs:
            if s >= n_s or t >= n_t:
                raise ValueError(
                    f"mappings[{name!r}] has layer pair {(s, t)}, outside the matrix of shape "
                    f"{shape} (student layers 0..{n_s - 1} on rows, teacher layers "
                    f"0..{n_t - 1} on columns)"
                )
        checked[name] = pairs
    return checked


def _text_colour(rgba) -> str:
    r, g, b = to_rgb(rgba)
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return "black" if luminance > 0.5 else "white"


def alignment_heatmap(
    matrix,
    *,
    mappings: Mapping[str, Sequence[tuple[int, int]]] | None = None,
    value_label: str = DEFAULT_VALUE_LABEL,
    title: str | None = None,
    log: bool = False,
    annotate: bool | None = None,
    fmt: str = ".2g",
    cmap: str = "viridis",
    ax: Axes | None = None,
    figsize: tuple[float, float] | None = None,
    student_embeddings: int | None = None,
    teacher_embeddings: int | None = None,
) -> Figure:
    """Heatmap of a student × teacher alignment matrix, with layer mappings marked.

    Parameters
    ----------
    matrix : array_like, shape (n_s, n_t)
        One value per (student layer, teacher layer): e.g. the relative
        best-reachable loss ``min_mse / var(T_t)``, the raw minimum MSE, or
        linear CKA. Rows are student layers (y axis), columns teacher layers
        (x axis). NaN marks a cell that was not computed and is drawn grey;
        Inf is refused.
    mappings : dict of str to sequence of (int, int), optional
        Layer mappings to overlay, e.g. ``{"uniform": uniform(4, 12),
        "PKD-Skip": skip(4, 12), "optimal": optimal(cost)}``. Each is drawn
        with its own marker shape and colour.
        Mappings that share a cell are drawn side by side in it. At most 8
        mappings. The legend sits below the heatmap, outside the cells.
    value_label : str
        Colour bar label: say what is drawn (the default is the relative
        best-reachable loss; pass e.g. ``"linear CKA"`` for a CKA matrix).
    title : str, optional
        Axes title.
    log : bool
        Logarithmic colour scale (every non-NaN value must then be > 0).
    annotate : bool, optional
        Write each cell's value in the cell. By default only when the matrix is
        at most 12 × 12.
    fmt : str
        Format spec for annotations (``format(value, fmt)``).
    cmap : str
        Matplotlib colormap name.
    ax : matplotlib.axes.Axes, optional
        Draw into this Axes (the colour bar takes space from it).
    figsize : (float, float), optional
        Figure size in inches when ``ax`` is None; by default sized so that
        cells are roughly square.
    student_embeddings, teacher_embeddings : int, optional
        The row (student) and column (teacher) that hold the embeddings
        rather than a transformer layer (index 0 of Hugging Face
        ``hidden_states``): their tick reads "emb".

    Returns
    -------
    matplotlib.figure.Figure
    """
    M = check_float_array(matrix, "matrix", ndims=(2,), check_finite=False)
    found = V.find_nonfinite(M, np.isinf(M))
    if found is not None:
        raise ValueError(
            f"matrix contains {found[0]} Inf value(s) (first at index {found[1]}, shape "
            f"{M.shape}); use NaN for cells that were not computed"
        )
    finite = M[~np.isnan(M)]
    if finite.size == 0:
        raise ValueError(f"matrix of shape {M.shape} is all NaN: nothing to draw")
    V.check_str(value_label, "value_label", nonempty=True, what=" saying what the matrix holds")
    title = _check_title(title)
    figsize = _check_figsize(figsize)
    n_s, n_t = M.shape
    student_embeddings = _check_embeddings(student_embeddings, n_s, "student_embeddings")
    teacher_embeddings = _check_embeddings(teacher_embeddings, n_t, "teacher_embeddings")
    checked = _check_heatmap_mappings(mappings, (n_s, n_t))
    if len(checked) > len(_MAPPING_STYLES):
        raise ValueError(
            f"mappings has {len(checked)} entries; at most {len(_MAPPING_STYLES)} can be told "
            "apart on one heatmap: draw them on several"
        )
    if log:
        V.check_lower_bound(M, "matrix", strict=True, problem="value(s) <= 0",
                            advice="log=True needs every non-NaN value > 0: use log=False")
    if annotate is None:
        annotate = n_s <= 12 and n_t <= 12
    try:
        colour_map = colormaps[cmap].with_extremes(bad=_NAN_COLOUR)
    except KeyError:
        raise ValueError(f"cmap {cmap!r} is not a matplotlib colormap name") from None

    if ax is None:
        cell = 0.55 if max(n_s, n_t) <= 16 else 0.3
        legend_rows = int(np.ceil(len(checked) / 4)) if checked else 0
        auto = (n_t * cell + 2.4, n_s * cell + 1.5 + 0.3 * legend_rows + 0.35 * bool(title))
        fig = _new_figure(figsize or (max(auto[0], 5.0), max(auto[1], 3.2)))
        ax = fig.add_subplot()
    else:
        ax = _check_axes(ax)
        fig = ax.figure
    own_figure = fig.axes == [ax] and fig.get_layout_engine() is not None

    lo, hi = float(finite.min()), float(finite.max())
    if log:
        norm = LogNorm(vmin=lo, vmax=hi if hi > lo else lo * 10)
    else:
        norm = Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1)
    image = ax.imshow(
        np.ma.masked_invalid(M), cmap=colour_map, norm=norm, aspect="auto",
        origin="upper", interpolation="nearest",
    )
    colourbar = fig.colorbar(image, ax=ax, pad=0.02)
    colourbar.set_label(value_label)

    ax.set_xlabel("teacher layer")
    ax.set_ylabel("student layer")
    _layer_ticks(ax.xaxis, n_t, teacher_embeddings)
    _layer_ticks(ax.yaxis, n_s, student_embeddings)
    ax.tick_params(which="minor", length=0)
    # Thin white grid between cells.
    ax.set_xticks(np.arange(-0.5, n_t, 1.0), minor=True)
    ax.set_yticks(np.arange(-0.5, n_s, 1.0), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.6, alpha=0.6)
    ax.grid(which="major", visible=False)
    if title:
        ax.set_title(title)

    if annotate:
        # Values sit in the top of each cell, so markers (centred lower) do not hide them.
        y_text = -0.42 if checked else 0.0
        size = 7 if checked else 8
        for (i, j), value in np.ndenumerate(M):
            if np.isnan(value):
                label, colour = "NaN", "0.3"
            else:
                label, colour = format(value, fmt), _text_colour(colour_map(norm(value)))
            ax.text(
                j, i + y_text, label, ha="center", va="top" if checked else "center",
                fontsize=size, color=colour,
            )

    handles, labels = [], []
    # Marker size from the cell size (measured before constrained layout, which
    # only shrinks the axes a little). Mappings that share a cell are spread
    # side by side across it, so every one of them stays visible.
    box = ax.get_window_extent()
    cell_pt = min(box.width / n_t, box.height / n_s) * 72.0 / fig.dpi
    cell_w_pt = box.width / n_t * 72.0 / fig.dpi
    marker_pt = float(np.clip(0.4 * cell_pt, 4.0, 11.0))
    sharing: dict[tuple[int, int], list[int]] = {}
    for k, pairs in enumerate(checked.values()):
        for pair in pairs:
            sharing.setdefault(pair, []).append(k)
    widest = max((len(v) for v in sharing.values()), default=1)
    step = min(1.25 * marker_pt / cell_w_pt, 0.9 / widest) if widest > 1 else 0.0
    marker_y = 0.15 if annotate else 0.0
    for k, (name, pairs) in enumerate(checked.items()):
        marker, colour = _MAPPING_STYLES[k]
        s_idx = np.array([p[0] for p in pairs], dtype=float)
        t_idx = np.array([p[1] for p in pairs], dtype=float)
        for i, pair in enumerate(pairs):
            owners = sharing[pair]
            t_idx[i] += (owners.index(k) - (len(owners) - 1) / 2) * step
        (line,) = ax.plot(
            t_idx, s_idx + marker_y, linestyle="none", marker=marker, markersize=marker_pt,
            markerfacecolor=colour, markeredgecolor="black", markeredgewidth=1.0,
            zorder=3 + k, label=name,
        )
        handles.append(line)
        labels.append(f"{name} ({len(pairs)} pairs)")
    if np.isnan(M).any():
        handles.append(Patch(facecolor=_NAN_COLOUR, edgecolor="0.5", label="not computed"))
        labels.append("NaN (not computed)")
    ax.set_xlim(-0.5, n_t - 0.5)
    ax.set_ylim(n_s - 0.5, -0.5)
    if handles:
        max_width = None
        if own_figure:
            # The axes' width once constrained layout has run (wider than now):
            # the figure minus the y labels on the left, the colour bar with its
            # labels on the right, and the layout pads.
            left = ax.get_window_extent().x0 - ax.get_tightbbox().x0
            bar = colourbar.ax.get_tightbbox().width
            max_width = fig.bbox.width - left - bar - 0.35 * fig.dpi
        _legend_below(ax, handles, labels, max_width)
    _fit_colourbar_label(colourbar, value_label)
    return _root_figure(ax)


# --------------------------------------------------------------------------- loss curves


def _pair_labels(labels, n_pairs: int) -> list[str]:
    if labels is None:
        return [f"pair {k}" for k in range(n_pairs)]
    if isinstance(labels, (str, bytes)) or not isinstance(labels, (Sequence, np.ndarray)):
        raise TypeError(
            "labels must be a sequence of str, or the layer mapping "
            f"[(student, teacher), ...], got {type(labels).__name__}"
        )
    if len(labels) != n_pairs:
        raise ValueError(
            f"labels has {len(labels)} entries but history has {n_pairs} pair column(s): "
            "give one label per column of history"
        )
    if all(isinstance(lab, str) for lab in labels):
        return list(labels)
    try:
        pairs = check_mapping(labels)
    except (TypeError, ValueError) as err:
        raise TypeError(
            "labels must be a sequence of str, or the layer mapping [(student, teacher), ...] "
            f"(which gives labels like 's0→t2'): {err}"
        ) from err
    return [f"s{s}→t{t}" for s, t in pairs]


def _check_positive_for_log(values: np.ndarray, name: str) -> None:
    V.check_lower_bound(values, name, strict=True,
                        problem="value(s) <= 0, which a log axis cannot show",
                        advice="pass log=False")


def layer_losses(
    history,
    *,
    labels=None,
    floor=None,
    steps=None,
    loss_label: str = "hidden-state loss",
    log: bool = True,
    title: str | None = None,
    ax: Axes | Sequence[Axes] | None = None,
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Per-pair loss curves over training steps, and the final losses against their floor.

    Left panel: one curve per mapped pair (log y). Right panel: the final
    loss of each pair as a bar, with the closed-form floor (the smallest loss
    any projection reaches) as a black tick across the bar. A one-row history
    (e.g. the closed form alone) is drawn with markers.

    Parameters
    ----------
    history : array_like, shape (n_steps, n_pairs)
        Loss of each pair at each recorded step; finite and >= 0 (> 0 with
        ``log=True``).
    labels : sequence of str, or sequence of (int, int), optional
        One label per pair; a layer mapping gives labels like ``"s0→t2"``.
        Default ``"pair k"``.
    floor : array_like, shape (n_pairs,), optional
        Closed-form floor per pair, marked on the bars.
    steps : array_like, shape (n_steps,), optional
        Step number of each row of ``history`` (default ``0 .. n_steps - 1``).
    loss_label : str
        Y axis label.
    log : bool
        Logarithmic loss axis.
    title : str, optional
        Figure title (the title of the curves panel when ``ax`` is given).
    ax : Axes or sequence of two Axes, optional
        A single Axes gets the curves only; two Axes ``(curves, bars)`` of the
        same figure get both panels.
    figsize : (float, float), optional
        Figure size in inches when ``ax`` is None (default ``(10, 4)``).

    Returns
    -------
    matplotlib.figure.Figure
    """
    H = check_float_array(history, "history", ndims=(2,),
                          advice="losses must be finite to be drawn (a diverged run?)")
    n_steps, n_pairs = H.shape
    V.check_lower_bound(H, "history", problem="negative loss(es)", advice="losses are >= 0")
    if log:
        _check_positive_for_log(H, "history")
    names = _pair_labels(labels, n_pairs)
    if floor is not None:
        floor = check_float_array(floor, "floor", ndims=(1,),
                                  advice="losses must be finite to be drawn")
        if floor.shape != (n_pairs,):
            raise ValueError(
                f"floor has shape {floor.shape} but history has {n_pairs} pair column(s) "
                f"(history shape {H.shape}): give one floor per pair"
            )
        V.check_lower_bound(floor, "floor", advice="a loss floor is >= 0")
        if log:
            _check_positive_for_log(floor, "floor")
    if steps is None:
        x = np.arange(n_steps)
    else:
        x = np.asarray(steps)
        if x.dtype.kind not in "iuf" or x.shape != (n_steps,):
            raise ValueError(
                f"steps must be {n_steps} numbers (one per row of history, shape {H.shape}), "
                f"got shape {x.shape} and dtype {x.dtype}"
            )
        found = V.find_nonfinite(x) if x.dtype.kind == "f" else None
        if found is not None:
            raise ValueError(f"steps must be finite, but steps[{found[1][0]}] is "
                             f"{x[found[1]]}")
    V.check_str(loss_label, "loss_label")
    title = _check_title(title)
    figsize = _check_figsize(figsize)

    if ax is None:
        fig = _new_figure(figsize or (10.0, 4.0))
        # Shared y: each bar top lines up with the end of its curve.
        ax_curves, ax_bars = fig.subplots(1, 2, width_ratios=(3, 1.6), sharey=True)
    elif isinstance(ax, Axes):
        ax_curves, ax_bars = ax, None
        fig = ax.figure
    elif isinstance(ax, (Sequence, np.ndarray)) and len(ax) == 2:
        ax_curves, ax_bars = _check_axes(ax[0], "ax[0]"), _check_axes(ax[1], "ax[1]")
        fig = ax_curves.figure
        if ax_bars.figure is not fig:
            raise ValueError("ax[0] and ax[1] must belong to the same figure")
    else:
        raise TypeError(
            "ax must be None, one Axes (curves only) or a sequence of two Axes "
            f"(curves, bars), got {ax!r}"
        )

    colours = _series_colours(n_pairs)
    few = n_steps <= 25
    for k in range(n_pairs):
        ax_curves.plot(
            x, H[:, k], color=colours[k], label=names[k], linewidth=1.6,
            linestyle="-" if n_steps > 1 else "none", marker="o" if few else None,
            markersize=5 if few else None,
        )
    if log:
        ax_curves.set_yscale("log")
        _plain_log_labels(ax_curves)
    ax_curves.set_xlabel("step")
    ax_curves.set_ylabel(loss_label)
    ax_curves.grid(True, which="major", alpha=0.3)
    ax_curves.legend(
        title="layer pair", fontsize="small", ncols=1 if n_pairs <= 6 else 2,
        loc="upper right",
    )
    if n_steps == 1:
        ax_curves.set_xticks(x)

    if ax_bars is not None:
        final = H[-1]
        positions = np.arange(n_pairs)
        ax_bars.bar(positions, final, color=colours, width=0.7)
        if floor is not None:
            ax_bars.hlines(
                floor, positions - 0.42, positions + 0.42, colors="black", linewidth=2.5,
                label=FLOOR_LABEL, zorder=3,
            )
        if log:
            ax_bars.set_yscale("log")
            values = H if floor is None else np.concatenate([H.ravel(), floor])
            ax_bars.set_ylim(values.min() / 1.5, values.max() * 1.5)
            _plain_log_labels(ax_bars)
        ax_bars.set_xticks(positions, labels=names, rotation=45 if n_pairs > 4 else 0,
                           ha="right" if n_pairs > 4 else "center")
        ax_bars.set_xlabel("layer pair")
        ax_bars.set_ylabel(f"final {loss_label}")
        ax_bars.tick_params(which="both", labelleft=True)  # sharey hides them
        ax_bars.grid(True, axis="y", alpha=0.3)
        if floor is not None:
            ax_bars.legend(fontsize="small", loc="upper left")
        ax_curves.set_title("loss per pair", fontsize="medium")
        ax_bars.set_title("final loss vs floor", fontsize="medium")
    if title:
        if ax_bars is not None and ax is None:
            fig.suptitle(title)
        else:
            ax_curves.set_title(title)
    return _root_figure(ax_curves)


# --------------------------------------------------------------------------- spectra


def _singular_values(value, label: str) -> np.ndarray:
    from scipy.linalg import svdvals

    arr = check_float_array(value, f"projections[{label!r}]", ndims=(1, 2),
                            advice="a projection with NaN/Inf has no spectrum")
    if arr.ndim == 2:
        return svdvals(arr.astype(np.float64, copy=False))
    V.check_lower_bound(arr, f"projections[{label!r}]", problem="negative entries",
                        advice="a 1-D array is read as singular values: pass the matrix instead")
    return np.sort(arr.astype(np.float64))[::-1]


def projection_spectrum(
    projections,
    *,
    mp_edges: tuple[float, float] | None = None,
    mp_label: str = MP_LABEL,
    logx: bool = False,
    title: str | None = None,
    ax: Axes | None = None,
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Sorted singular values of one or more projections, one line each (log y).

    Parameters
    ----------
    projections : dict of str to array_like
        Label → projection matrix ``P`` of shape ``(d_s, d_t)`` (its singular
        values are computed with :func:`scipy.linalg.svdvals`), or a 1-D array
        of singular values (sorted here, descending). E.g. ``{"Xavier init":
        P0, "trained": P1, "closed form": P2}``.
    mp_edges : (float, float), optional
        ``(lo, hi)`` edges of the Marchenko–Pastur bulk for the Xavier init,
        drawn as a shaded horizontal band (``lo`` may be 0 when d_s = d_t).
    mp_label : str
        Legend label of the band.
    logx : bool
        Logarithmic index axis (useful for wide spectra).
    title : str, optional
        Axes title.
    ax : matplotlib.axes.Axes, optional
        Draw into this Axes.
    figsize : (float, float), optional
        Figure size in inches when ``ax`` is None (default ``(6.5, 4.2)``).

    Returns
    -------
    matplotlib.figure.Figure

    Notes
    -----
    Exactly zero singular values cannot be drawn on a log axis; their count is
    written into the legend entry (e.g. ``"closed form (3 σ = 0 not shown)"``).
    """
    projections = V.check_str_keyed(projections, "projections",
                                    "{label: matrix or 1-D singular values}",
                                    key_meaning="legend labels")
    spectra = {label: _singular_values(value, label) for label, value in projections.items()}
    if mp_edges is not None:
        lo, hi = V.check_number_pair(mp_edges, "mp_edges", "(lo, hi)")
        if not (np.isfinite(lo) and np.isfinite(hi) and 0 <= lo <= hi and hi > 0):
            raise ValueError(f"mp_edges must satisfy 0 <= lo <= hi, hi > 0, got {mp_edges!r}")
    title = _check_title(title)
    figsize = _check_figsize(figsize)

    if ax is None:
        fig = _new_figure(figsize or (6.5, 4.2))
        ax = fig.add_subplot()
    else:
        ax = _check_axes(ax)
        fig = ax.figure

    colours = _series_colours(len(spectra))
    positive_min = np.inf
    for k, (label, sigma) in enumerate(spectra.items()):
        zeros = int((sigma == 0).sum())
        shown = f"{label} ({zeros} σ = 0 not shown)" if zeros else label
        index = np.arange(1, sigma.size + 1)
        few = sigma.size <= 30
        ax.plot(index, np.where(sigma > 0, sigma, np.nan), color=colours[k], linewidth=1.8,
                marker="o" if few else None, markersize=4, label=shown)
        if (sigma > 0).any():
            positive_min = min(positive_min, sigma[sigma > 0].min())
    ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
    if mp_edges is not None:
        # A band down to 0 (d_s = d_t) cannot be drawn on a log axis: start it
        # below every plotted value instead.
        floor = min(positive_min, hi) / 10 if np.isfinite(positive_min) else hi / 10
        ax.axhspan(lo if lo > 0 else floor, hi, color="0.6", alpha=0.25, zorder=0,
                   label=mp_label)
        if lo <= 0:
            ax.set_ylim(bottom=floor)
    ax.set_xlabel("singular value index (descending)")
    ax.set_ylabel("singular value σ")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    if title:
        ax.set_title(title)
    return _root_figure(ax)


# --------------------------------------------------------------------------- accuracy


def _mean_std(name: str, value) -> tuple[float, float, np.ndarray | None]:
    """(mean, std, runs): a tuple of two numbers is (mean, std); a list/array is runs."""
    if isinstance(value, tuple):
        if len(value) != 2 or not all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value
        ):
            raise TypeError(
                f"table[{name!r}] is a tuple, read as (mean, std), but it is {value!r}; "
                "give runs as a list or array instead"
            )
        mean, std = float(value[0]), float(value[1])
        if not (np.isfinite(mean) and np.isfinite(std) and std >= 0):
            raise ValueError(f"table[{name!r}] = {value!r}: mean must be finite, std >= 0")
        return mean, std, None
    if isinstance(value, (list, np.ndarray)):
        runs = np.asarray(value)
        if runs.dtype.kind not in "iuf" or runs.ndim != 1 or runs.size == 0:
            raise TypeError(
                f"table[{name!r}] must be a non-empty 1-D list of accuracies (one per run), "
                f"got {value!r}"
            )
        runs = runs.astype(np.float64)
        if V.find_nonfinite(runs) is not None:
            raise ValueError(f"table[{name!r}] has NaN/Inf accuracies: {runs.tolist()}")
        std = float(runs.std(ddof=1)) if runs.size > 1 else 0.0
        return float(runs.mean()), std, runs
    raise TypeError(
        f"table[{name!r}] must be a (mean, std) tuple or a list of per-run accuracies, "
        f"got {type(value).__name__}"
    )


def accuracy_bars(
    table,
    *,
    ylabel: str = "test accuracy (%)",
    ylim: tuple[float, float] | None = None,
    title: str | None = None,
    ax: Axes | None = None,
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Bar chart of mean ± std accuracy per method.

    Parameters
    ----------
    table : dict of str to (float, float) or sequence of float
        Method name → ``(mean, std)`` as a **tuple**, or → a **list / 1-D
        array** of per-run accuracies (mean and sample std, ddof=1, are
        computed here; the runs are drawn as dots, and ``n`` is shown under the
        name). Values are percentages.
    ylabel : str
        Y axis label.
    ylim : (float, float), optional
        Y range; by default bars start at 0.
    title : str, optional
        Axes title.
    ax : matplotlib.axes.Axes, optional
        Draw into this Axes.
    figsize : (float, float), optional
        Figure size in inches when ``ax`` is None (default grows with the
        number of methods).

    Returns
    -------
    matplotlib.figure.Figure
    """
    table = V.check_str_keyed(table, "table", "{method: (mean, std) or [run accuracies]}",
                              key_meaning="method names")
    rows = [(name, *_mean_std(name, value)) for name, value in table.items()]
    if ylim is not None:
        y0, y1 = V.check_number_pair(ylim, "ylim", "(bottom, top)")
        if not (np.isfinite(y0) and np.isfinite(y1) and y0 < y1):
            raise ValueError(f"ylim must be finite with bottom < top, got {ylim!r}")
    title = _check_title(title)
    figsize = _check_figsize(figsize)

    n = len(rows)
    if ax is None:
        fig = _new_figure(figsize or (max(4.5, 1.1 * n + 2.0), 4.2))
        ax = fig.add_subplot()
    else:
        ax = _check_axes(ax)
        fig = ax.figure

    positions = np.arange(n)
    means = np.array([r[1] for r in rows])
    stds = np.array([r[2] for r in rows])
    colours = _series_colours(n)
    ax.bar(positions, means, yerr=stds, color=colours, alpha=0.85, width=0.65,
           capsize=5, error_kw={"elinewidth": 1.4, "ecolor": "black"})
    rng = np.random.default_rng(0)  # fixed jitter: the same figure every run
    for k, (_, _, _, runs) in enumerate(rows):
        if runs is not None and runs.size > 1:
            jitter = rng.uniform(-0.12, 0.12, runs.size)
            ax.plot(positions[k] + jitter, runs, linestyle="none", marker="o", markersize=3.5,
                    color="black", alpha=0.6, zorder=3)
    tick_labels = [name if runs is None else f"{name}\n(n={runs.size})"
                   for name, _, _, runs in rows]
    ax.set_xticks(positions, labels=tick_labels)
    ax.set_ylabel(ylabel)
    ax.set_xlabel("bars: mean; error bars: ± 1 std; dots: single runs", fontsize="small")
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    top = max(float((r[1] + r[2]) if r[3] is None else max(r[1] + r[2], r[3].max()))
              for r in rows)
    if ylim is not None:
        ax.set_ylim(y0, y1)
    else:
        ax.set_ylim(min(0.0, float(means.min())), top * 1.12 if top > 0 else 1.0)
    for k, (_, mean, std, runs) in enumerate(rows):
        # Above the error bar and above every run's dot.
        top_k = mean + std if runs is None else max(mean + std, float(runs.max()))
        ax.annotate(f"{mean:.1f} ± {std:.1f}", (positions[k], top_k),
                    xytext=(0, 4), textcoords="offset points", ha="center", va="bottom",
                    fontsize="small")
    if title:
        ax.set_title(title)
    return _root_figure(ax)


# --------------------------------------------------------------------------- saving


def save_figure(fig: Figure, path, *, dpi: float = 120) -> Path:
    """Write ``fig`` to ``path`` atomically; the format follows the file suffix.

    The figure is rendered into a temporary file in the same directory, flushed
    to disk, then renamed over ``path`` (``os.replace``), so a reader never sees
    a half-written file. The figure is not closed.

    Parameters
    ----------
    fig : matplotlib.figure.Figure
    path : str or os.PathLike
        Destination; its suffix (``.png``, ``.pdf``, ``.svg``, ...) picks the format.
    dpi : float
        Resolution: a raster image is ``figsize × dpi`` pixels.

    Returns
    -------
    pathlib.Path
        The written path.
    """
    if not isinstance(fig, Figure):
        raise TypeError(f"fig must be a matplotlib Figure, got {type(fig).__name__}")
    dpi = V.check_scalar(dpi, "dpi", low=0, low_inclusive=False)
    path = Path(os.fspath(path))
    fmt = path.suffix[1:].lower()
    supported = fig.canvas.get_supported_filetypes()
    if fmt not in supported:
        raise ValueError(
            f"cannot tell the image format from {str(path)!r}: give a suffix among "
            f"{', '.join('.' + s for s in sorted(supported))}"
        )
    directory = path.parent
    if not directory.is_dir():
        raise ValueError(f"directory {str(directory)!r} of {str(path)!r} does not exist")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi))
    return path
