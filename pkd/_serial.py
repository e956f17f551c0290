"""Plain-array form of :class:`pkd.AlignmentStats` (``to_dict``/``from_dict``, Dask transport).

Format 2: ``format_version``, ``student_widths``, ``teacher_widths``, ``folds``
(0 for none), ``examples`` (the next example index of the fold rule),
``student_dtype_bits``/``teacher_dtype_bits`` (32 or 64 per layer, 0 if
unknown), the shared ``student_shift``/``teacher_shift``, and per fold
(leading axis of length k, 1 without folds) every shifted moment of
:class:`pkd._moments.Moments`: ``n_rows``, sums, ``cross_gram``,
``student_gram_{s}``/``teacher_gram_{t}`` (full symmetric), and the
fourth-order ``quartic_cross``, ``*_quartic``, ``*_cubic_cross``, ``*_cubic``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ._moments import Layout, Moments, symmetric

_SIDES = ("student", "teacher")


def _fields(layout: Layout) -> dict[str, tuple]:
    """Per-fold array keys and their shapes (without the leading fold axis)."""
    n_s, n_t = layout.count("student"), layout.count("teacher")
    total_s, total_t = layout.total["student"], layout.total["teacher"]
    fields = {
        "n_rows": (), "student_sum": (total_s,), "teacher_sum": (total_t,),
        "cross_gram": (total_s, total_t), "quartic_cross": (n_s, n_t),
        "student_quartic": (n_s,), "teacher_quartic": (n_t,),
        "student_cubic_cross": (n_s, total_t), "teacher_cubic_cross": (n_t, total_s),
        "student_cubic": (total_s,), "teacher_cubic": (total_t,),
    }
    for side in _SIDES:
        fields.update({f"{side}_gram_{k}": (d, d) for k, d in enumerate(layout.widths[side])})
    return fields


def _get(m: Moments, key: str):
    if key == "n_rows":
        return m.n
    if key == "cross_gram":
        return m.cross
    if key == "quartic_cross":
        return m.quartic_cross
    side, name = key.split("_", 1)
    if name.startswith("gram_"):
        return symmetric(m.gram[side][int(name[5:])])
    return {"sum": m.sum, "quartic": m.quartic, "cubic_cross": m.cubic_cross,
            "cubic": m.cubic}[name][side]


def _set(m: Moments, key: str, value: np.ndarray) -> None:
    if key == "n_rows":
        m.n = int(value)
    elif key == "cross_gram":
        m.cross = np.ascontiguousarray(value)
    elif key == "quartic_cross":
        m.quartic_cross = value.copy()
    else:
        side, name = key.split("_", 1)
        if name.startswith("gram_"):
            m.gram[side][int(name[5:])] = np.asfortranarray(value)
        else:
            {"sum": m.sum, "quartic": m.quartic, "cubic_cross": m.cubic_cross,
             "cubic": m.cubic}[name][side] = value.copy()


def pack(layout: Layout, folds: list[Moments], dtypes: dict, version: int, *, folds_k: int,
         examples: int) -> dict[str, np.ndarray]:
    bits = {side: np.array([0 if d is None else 8 * d.itemsize for d in dtypes[side]],
                           dtype=np.int64) for side in _SIDES}
    data = {
        "format_version": np.asarray(version, dtype=np.int64),
        "student_widths": np.asarray(layout.widths["student"], dtype=np.int64),
        "teacher_widths": np.asarray(layout.widths["teacher"], dtype=np.int64),
        "folds": np.asarray(folds_k, dtype=np.int64),
        "examples": np.asarray(examples, dtype=np.int64),
        "student_dtype_bits": bits["student"], "teacher_dtype_bits": bits["teacher"],
        "student_shift": folds[0].shift["student"].copy(),
        "teacher_shift": folds[0].shift["teacher"].copy(),
    }
    for key in _fields(layout):
        data[key] = np.stack([np.asarray(_get(m, key)) for m in folds]).astype(
            np.int64 if key == "n_rows" else np.float64)
    return data


def unpack(data: Mapping, version: int, check_widths):
    """``(layout, folds, dtypes, k, examples)`` from :func:`pack`'s arrays, checked."""

    def get(key):
        try:
            return np.asarray(data[key])
        except KeyError:
            raise ValueError(
                f"data has no key {key!r}: pass the dict AlignmentStats.to_dict() returned "
                "(or np.load of the file np.savez wrote from it)"
            ) from None

    found = get("format_version")
    if found.shape != () or int(found) != version:
        raise ValueError(
            f"data['format_version'] is {found.tolist()!r}; this version of pkd reads format "
            f"{version} (statistics saved by an older pkd must be accumulated again)"
        )
    widths = []
    for key in ("student_widths", "teacher_widths"):
        value = get(key)
        if value.ndim != 1 or value.dtype.kind not in "iu":
            raise ValueError(f"data[{key!r}] must be a 1-D int array, got {value!r}")
        widths.append(check_widths(value.tolist(), f"data[{key!r}]"))
    layout = Layout(*widths)
    scalars = {}
    for key in ("folds", "examples"):
        value = get(key)
        if value.shape != () or value.dtype.kind not in "iu" or int(value) < 0 or (
                key == "folds" and int(value) == 1):
            raise ValueError(f"data[{key!r}] must be a 0-d int >= 0 (folds: 0 or >= 2), "
                             f"got {value!r}")
        scalars[key] = int(value)
    k = max(scalars["folds"], 1)
    bits = {}
    for side in _SIDES:
        value = get(f"{side}_dtype_bits")
        if value.shape != (layout.count(side),) or not np.isin(value, (0, 32, 64)).all():
            raise ValueError(f"data['{side}_dtype_bits'] must hold 0, 32 or 64 per {side} "
                             f"layer, got {value!r}")
        bits[side] = [None if b == 0 else np.dtype(f"float{b}") for b in value.tolist()]
    shift = {}
    for side in _SIDES:
        shift[side] = _checked(get(f"{side}_shift"), f"{side}_shift", (layout.total[side],))
    folds = [Moments(layout, shift) for _ in range(k)]
    for key, shape in _fields(layout).items():
        value = get(key)
        if key == "n_rows":
            if value.shape != (k,) or value.dtype.kind not in "iu" or (value < 0).any():
                raise ValueError(f"data['n_rows'] must be {k} int(s) >= 0, got {value!r}")
        else:
            value = _checked(value, key, (k, *shape))
        for f, m in enumerate(folds):
            _set(m, key, value[f])
    return layout, folds, bits, scalars["folds"], scalars["examples"]


def _checked(value: np.ndarray, key: str, shape: tuple) -> np.ndarray:
    if value.dtype.kind != "f" or value.shape != shape:
        raise ValueError(
            f"data[{key!r}] must be a float array of shape {shape} (from the widths and "
            f"folds), got dtype {value.dtype} and shape {value.shape}"
        )
    if not np.isfinite(value).all():
        raise ValueError(f"data[{key!r}] contains NaN/Inf")
    return value.astype(np.float64)
