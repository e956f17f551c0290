"""Every check and coercion of user input lives here (or calls a helper from here).

Kernels trust what this module hands on: arrays are float32 or float64,
finite (unless the caller opted out), of the documented shapes, and every
index is in range. Errors name the argument, the layer pair and the shapes,
and say what to do.

Dtype policy (used by every public function): if every floating input is
float32 the computation and all outputs are float32 (losses are still
accumulated in float64); any float64 input promotes everything to float64.
Integer, bool, complex, object and string arrays are refused with a
``TypeError``: silently casting them would hide a bug upstream.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

Pair = tuple[int, int]


def _describe(pair: Pair | None) -> str:
    return "" if pair is None else f" for layer pair {tuple(pair)}"


def find_nonfinite(values: np.ndarray, bad: np.ndarray | None = None):
    """``(count, first index)`` of the NaN/Inf entries of ``values``, or ``None`` if there are none.

    The one search behind every "contains NaN/Inf, first at ..." message.

    Parameters
    ----------
    values : ndarray
    bad : bool ndarray of ``values``' shape, optional
        The entries to report instead of the non-finite ones (e.g. NaN or +inf only).

    Returns
    -------
    None, or (int, tuple of int)
        How many entries are bad, and the index of the first in C order.
    """
    if bad is None:
        bad = ~np.isfinite(values)
        if not bad.any():
            return None
    elif not bad.any():
        return None
    first = np.unravel_index(int(np.argmax(bad.ravel())), bad.shape)
    return int(bad.sum()), tuple(int(i) for i in first)


def check_lower_bound(values: np.ndarray, name: str, *, low: float = 0.0, strict: bool = False,
                      problem: str = "negative value(s)", advice: str = "") -> None:
    """Refuse entries of ``values`` below ``low`` (at or below it with ``strict``); NaN passes.

    The message names ``problem`` (e.g. ``"negative value(s)"``), how many there are,
    the minimum and the first one's index, then ``advice``.
    """
    with np.errstate(invalid="ignore"):
        bad = values <= low if strict else values < low
    found = find_nonfinite(values, bad)
    if found is not None:
        raise ValueError(
            f"{name} has {found[0]} {problem} (minimum {np.nanmin(values):g}, first at index "
            f"{found[1]}){'; ' + advice if advice else ''}"
        )


def check_scalar(value, name: str, *, integer: bool = False, low=None, high=None,
                 low_inclusive: bool = True, hint: str = ""):
    """Return ``value`` as an ``int`` (``integer=True``) or a finite ``float`` in bounds, or raise.

    Bools are refused (``True`` is not the number 1 here), and so are NaN and
    ±inf for real numbers.

    Parameters
    ----------
    value : object
        The user's value.
    name : str
        The argument's name, for the messages.
    integer : bool
        Accept integers only (any ``numbers.Integral``); else any ``numbers.Real``.
    low, high : number, optional
        Bounds; ``high`` is inclusive, ``low`` too unless ``low_inclusive=False``.
    hint : str
        Appended to the out-of-range message (what to do, or why).

    Raises
    ------
    TypeError
        Not a number of the kind asked for.
    ValueError
        Out of range, or not finite.
    """
    kind = "an int" if integer else "a real number"
    if low is not None and high is not None:
        bounds = f"in [{low}, {high}]"
    elif low is not None:
        bounds = f"{'>=' if low_inclusive else '>'} {low}"
    elif high is not None:
        bounds = f"<= {high}"
    else:
        bounds = ""
    if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, numbers.Integral if integer else numbers.Real):
        wanted = f"{kind} {bounds}" if bounds else kind
        raise TypeError(f"{name} must be {wanted}, got {value!r} ({type(value).__name__})")
    value = int(value) if integer else float(value)
    finite = integer or math.isfinite(value)
    if (not finite or (low is not None and (value < low or (value == low and not low_inclusive)))
            or (high is not None and value > high)):
        wanted = bounds if integer or (low is not None and high is not None) else (
            f"finite and {bounds}" if bounds else "finite")
        raise ValueError(f"{name} must be {wanted}, got {value}{hint}")
    return value


def check_choice(value, name: str, choices: Sequence):
    """Return ``value`` if it is one of ``choices``, else a ValueError listing them."""
    if not isinstance(value, (str, bytes, numbers.Number)) or value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {listed}; got {value!r}")
    return value


def check_str(value, name: str, *, optional: bool = False, nonempty: bool = False,
              what: str = "") -> str | None:
    """Return ``value`` as a str (``None`` too with ``optional``), or raise TypeError."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or (nonempty and not value):
        wanted = "a non-empty str" if nonempty else "a str"
        wanted += " or None" if optional else ""
        raise TypeError(f"{name} must be {wanted}{what}, got {value!r}")
    return value


def check_str_keyed(mapping, name: str, what: str, *, key_meaning: str,
                    nonempty: bool = True) -> dict:
    """A dict (non-empty unless ``nonempty=False``) whose keys are str, or a TypeError.

    ``what`` describes the expected dict (``"{label: matrix}"``); ``key_meaning``
    what the keys are (``"legend labels"``).
    """
    if not isinstance(mapping, Mapping) or (nonempty and len(mapping) == 0):
        wanted = "a non-empty dict" if nonempty else "a dict"
        raise TypeError(f"{name} must be {wanted} {what}, got {type(mapping).__name__}")
    for key in mapping:
        if not isinstance(key, str):
            raise TypeError(f"{name} keys must be str ({key_meaning}), got {key!r}")
    return dict(mapping)


def check_number_pair(value, name: str, what: str) -> tuple[float, float]:
    """Two real numbers as floats (e.g. a figure size), or a TypeError naming ``name``."""
    if (
        isinstance(value, (str, bytes))
        or not isinstance(value, (Sequence, np.ndarray))
        or len(value) != 2
        or not all(isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))
                   for v in value)
    ):
        raise TypeError(f"{name} must be a {what} pair of numbers, got {value!r}")
    return float(value[0]), float(value[1])


def check_float_dtype(dtype, name: str = "dtype") -> np.dtype:
    """``dtype`` as a NumPy dtype, float32 or float64, or a TypeError."""
    try:
        checked = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name} must be float32 or float64, got {dtype!r}") from None
    if checked not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {checked}")
    return checked


def check_float_array(
    x,
    name: str,
    *,
    ndims: Sequence[int] = (2, 3),
    check_finite: bool = True,
    pair: Pair | None = None,
    advice: str = "fix the input: NaN/Inf cannot take part in this computation",
) -> np.ndarray:
    """Return ``x`` as a float32/float64 ndarray, or raise.

    Parameters
    ----------
    x : array_like
        The user's array. It is not copied unless it is not an ndarray.
    name : str
        The argument's name, used in error messages.
    ndims : sequence of int
        Accepted numbers of dimensions.
    check_finite : bool
        Refuse NaN and Inf.
    pair : tuple of int, optional
        The layer pair the array belongs to, for error messages.
    advice : str
        What the NaN/Inf message tells the user to do.
    """
    if (type(x) is np.ndarray and x.dtype in FLOAT_DTYPES and x.ndim in ndims and x.size
            and not check_finite):
        return x  # the common case, checked in a few hundred ns (it runs per layer per call)
    where = _describe(pair)
    if isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"{name}{where} must be a float array, got {type(x).__name__}")
    if type(x).__module__.startswith("torch"):
        raise TypeError(
            f"{name}{where} is a torch tensor; pass `tensor.detach().cpu().numpy()` "
            "or use pkd.torch for autograd"
        )
    arr = np.asarray(x)
    if arr.dtype not in FLOAT_DTYPES:
        hint = ""
        if arr.dtype.kind in "iub":
            hint = (" (integer and bool arrays are refused: "
                    "cast explicitly with .astype(np.float32))")
        elif arr.dtype.kind == "f" and arr.dtype.newbyteorder("=") in FLOAT_DTYPES:
            hint = (" (non-native byte order: convert it with "
                    f".astype({arr.dtype.newbyteorder('=').name}))")
        elif arr.dtype.kind == "f":
            hint = " (cast to float32 or float64)"
        raise TypeError(
            f"{name}{where} must be float32 or float64, got dtype {arr.dtype}{hint}"
        )
    if arr.ndim not in ndims:
        want = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(f"{name}{where} must be {want}, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name}{where} is empty (shape {arr.shape})")
    found = find_nonfinite(arr) if check_finite else None
    if found is not None:
        raise ValueError(
            f"{name}{where} contains {found[0]} NaN/Inf value(s), first at index "
            f"{found[1]} (shape {arr.shape}); {advice}"
        )
    return arr


def as_layers(hidden, name: str) -> list:
    """Split hidden states into a list of per-layer arrays (not yet checked).

    Accepts a list/tuple of per-layer arrays, each ``(N, d)`` or ``(B, T, d)``,
    or one stacked array ``(L, N, d)`` / ``(L, B, T, d)``.
    """
    if isinstance(hidden, (list, tuple)):
        if len(hidden) == 0:
            raise ValueError(f"{name} is an empty sequence: pass one array per layer")
        return list(hidden)
    if hasattr(hidden, "shape") and hasattr(hidden, "dtype"):
        arr = np.asarray(hidden) if not isinstance(hidden, np.ndarray) else hidden
        if arr.ndim in (3, 4):
            return [arr[i] for i in range(arr.shape[0])]
        raise ValueError(
            f"{name} must be a list of per-layer arrays or one stacked array of shape "
            f"(L, N, d) or (L, B, T, d), got an array of shape {arr.shape}"
        )
    raise TypeError(
        f"{name} must be a list/tuple of per-layer arrays or a stacked array, "
        f"got {type(hidden).__name__}"
    )


def layer_at(
    layers: list, index: int, name: str, pair: Pair, *, check_finite: bool = True
) -> np.ndarray:
    """Return the validated layer ``index`` of ``layers``; negative indices never wrap."""
    if not 0 <= index < len(layers):
        raise ValueError(
            f"layer pair {tuple(pair)} asks for layer {index} of {name}, which has "
            f"{len(layers)} layer(s) (valid indices 0..{len(layers) - 1})"
        )
    return check_float_array(
        layers[index], f"{name}[{index}]", check_finite=check_finite, pair=pair
    )


def _as_index(value, what: str) -> int:
    return check_scalar(value, what, integer=True, low=0,
                        hint=" (negative indices do not wrap)")


def check_mapping(mapping) -> list[Pair]:
    """Return the layer mapping as a list of ``(student, teacher)`` int pairs."""
    if isinstance(mapping, (str, bytes)) or not isinstance(mapping, Sequence):
        if isinstance(mapping, np.ndarray) and mapping.ndim == 2 and mapping.shape[1] == 2:
            mapping = mapping.tolist()
        else:
            raise TypeError(
                "layer_mapping must be a sequence of (student_layer, teacher_layer) pairs, "
                f"got {type(mapping).__name__}"
            )
    if len(mapping) == 0:
        raise ValueError("layer_mapping is empty: give at least one (student, teacher) pair")
    pairs = []
    for k, entry in enumerate(mapping):
        if isinstance(entry, (str, bytes)) or not isinstance(entry, (Sequence, np.ndarray)):
            raise TypeError(
                f"layer_mapping[{k}] must be a (student_layer, teacher_layer) pair, got {entry!r}"
            )
        if len(entry) != 2:
            raise ValueError(
                f"layer_mapping[{k}] must have exactly 2 entries (student, teacher), got {entry!r}"
            )
        pairs.append(
            (
                _as_index(entry[0], f"layer_mapping[{k}][0] (student layer)"),
                _as_index(entry[1], f"layer_mapping[{k}][1] (teacher layer)"),
            )
        )
    return pairs


def check_distinct_pairs(mapping: list[Pair], why: str) -> None:
    """Refuse a layer mapping that lists a pair twice, saying ``why`` pairs must be distinct."""
    seen = set()
    for k, pair in enumerate(mapping):
        if pair in seen:
            raise ValueError(
                f"{why}, but layer_mapping {mapping} repeats a pair: {pair} at position {k}"
            )
        seen.add(pair)


def check_nonnegative(value, name: str) -> float:
    """Return ``value`` as a finite float >= 0."""
    return check_scalar(value, name, low=0)


def check_positive_int(value, name: str) -> int:
    """Return ``value`` as an int > 0."""
    return check_scalar(value, name, integer=True, low=0, low_inclusive=False)


def check_layer_weights(weights, n_pairs: int) -> np.ndarray | None:
    """Per-pair weights: one finite >= 0 value per mapped pair, not all zero."""
    if weights is None:
        return None
    arr = np.asarray(weights)
    if arr.dtype.kind not in "iuf" or arr.ndim != 1:
        raise TypeError(
            f"layer_weights must be a 1-D sequence of numbers, got {weights!r}"
        )
    if arr.shape[0] != n_pairs:
        raise ValueError(
            f"layer_weights has {arr.shape[0]} entries but the mapping has {n_pairs} pairs"
        )
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise ValueError(f"layer_weights must be finite and >= 0, got {arr.tolist()}")
    with np.errstate(over="ignore"):  # an overflowing sum is reported below
        total = arr.sum()
    if total == 0:
        raise ValueError("layer_weights are all zero: at least one pair must count")
    if not np.isfinite(total):
        raise ValueError(
            f"layer_weights sum to more than float64 holds (largest {arr.max():.3g}): only "
            "their ratios matter, so divide them by their maximum"
        )
    return arr


def as_generator(seed) -> np.random.Generator:
    """An int, None or a ``numpy.random.Generator`` → a Generator."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None or (isinstance(seed, numbers.Integral) and not isinstance(seed, bool)):
        return np.random.default_rng(seed)
    raise TypeError(f"seed must be an int, None or a numpy.random.Generator, got {seed!r}")


def result_dtype(*arrays) -> np.dtype:
    """float32 if every given array is float32, else float64 (``None`` entries ignored)."""
    # Against dtype instances: ``a.dtype == np.float64`` converts the type at every
    # comparison, and this runs at every call.
    for a in arrays:
        if a is not None and a.dtype == FLOAT_DTYPES[1]:
            return FLOAT_DTYPES[1]
    return FLOAT_DTYPES[0]


def check_mask(mask, lead_shape: tuple, name: str = "mask") -> np.ndarray:
    """Return a 0/1 mask of shape ``lead_shape`` as a bool array."""
    arr = np.asarray(mask)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold 0/1 integers or bools, got dtype {arr.dtype}")
    if arr.shape != tuple(lead_shape):
        raise ValueError(
            f"{name} has shape {arr.shape} but the hidden states have leading shape "
            f"{tuple(lead_shape)}: one entry per row (2-D input) or per (batch, position) "
            "(3-D input)"
        )
    if arr.dtype.kind != "b":
        if not np.isin(arr, (0, 1)).all():
            bad = np.unique(arr[~np.isin(arr, (0, 1))])[:5]
            raise ValueError(f"{name} must contain only 0 and 1, found {bad.tolist()}")
        arr = arr.astype(bool)
    return arr


def check_tokens(tokens) -> int | None:
    """``"all"`` → None, ``"cls"`` → 0 (its position when nothing is masked), an int → itself."""
    if isinstance(tokens, str):
        if tokens not in ("all", "cls"):
            raise ValueError(f'tokens must be "all", "cls" or an int position, got {tokens!r}')
        return None if tokens == "all" else 0
    return _as_index(tokens, "tokens (a sequence position)")


def select_rows(
    lead_shape: tuple, mask=None, tokens="all", *, mask_name: str = "attention_mask"
) -> np.ndarray | None:
    """Indices of the rows that count, into the flattened ``(N, d)`` view.

    Returns ``None`` when every row counts (so callers skip the gather).

    Parameters
    ----------
    lead_shape : tuple
        ``(N,)`` for 2-D hidden states, ``(B, T)`` for 3-D.
    mask : array_like, optional
        0/1 of shape ``lead_shape``.
    tokens : {"all", "cls"} or int
        For 3-D input: every position; "cls", the first position the mask
        keeps in each sequence (position 0 without a mask; under left padding
        the first real token, a sequence the mask drops entirely gives none);
        or one position (kept where the mask keeps it).
    """
    selected = None
    position = check_tokens(tokens)
    if position is not None:
        if len(lead_shape) != 2:
            raise ValueError(
                f"tokens={tokens!r} selects a sequence position and needs 3-D (B, T, d) "
                f"hidden states; got rows of leading shape {tuple(lead_shape)}"
            )
        if position >= lead_shape[1]:
            raise ValueError(
                f"tokens={tokens!r} is out of range for sequences of length {lead_shape[1]}"
            )
        selected = np.zeros(lead_shape, dtype=bool)
        selected[:, position] = True
    if mask is not None:
        m = check_mask(mask, lead_shape, mask_name)
        if isinstance(tokens, str) and tokens == "cls":
            # The first kept position of each sequence: position 0 may be padding.
            kept = np.flatnonzero(m.any(axis=1))
            selected = np.zeros(lead_shape, dtype=bool)
            selected[kept, m[kept].argmax(axis=1)] = True
        else:
            selected = m if selected is None else selected & m
    if selected is None:
        return None
    rows = selected.ravel().nonzero()[0]
    if rows.size == 0:
        raise ValueError(
            f"{mask_name} and tokens={tokens!r} select no row: the loss would be 0/0"
        )
    if rows.size == selected.size:
        return None
    return rows


def rows_mask(lead_shape: tuple, rows: np.ndarray | None) -> np.ndarray | None:
    """The bool form, of shape ``lead_shape``, of :func:`select_rows`' result (None stays None)."""
    if rows is None:
        return None
    selected = np.zeros(math.prod(lead_shape), dtype=bool)
    selected[rows] = True
    return selected.reshape(lead_shape)


def check_projection(P, d_s: int, d_t: int, name: str = "projection", pair=None,
                     *, check_finite: bool = True) -> np.ndarray:
    """Return ``P`` checked to be a ``(d_s, d_t)`` float matrix."""
    P = check_float_array(P, name, ndims=(2,), check_finite=check_finite, pair=pair)
    if P.shape != (d_s, d_t):
        raise ValueError(
            f"{name}{_describe(pair)} has shape {P.shape}, but the student width is {d_s} "
            f"and the teacher width {d_t}: it must be ({d_s}, {d_t})"
        )
    return P


def check_output(array, name: str, shape: tuple, dtype, pair: Pair | None = None) -> np.ndarray:
    """An ``out=`` buffer: a writable C-contiguous ndarray of ``shape`` and ``dtype``."""
    if isinstance(array, np.ndarray) and array.shape == tuple(shape) and array.dtype == dtype \
            and array.flags.c_contiguous and array.flags.writeable:
        return array
    got = (type(array).__name__ if not isinstance(array, np.ndarray) else
           f"shape {array.shape}, dtype {array.dtype}, C-contiguous "
           f"{array.flags.c_contiguous}, writable {array.flags.writeable}")
    raise ValueError(
        f"{name}{_describe(pair)} must be a writable C-contiguous array of shape "
        f"{tuple(shape)} and dtype {np.dtype(dtype)}; got {got}"
    )


def check_no_overlap(outputs, inputs) -> None:
    """``out=`` buffers must not share memory with an input or with each other.

    The kernels read the inputs while they write the outputs, so an overlap
    would silently give wrong gradients. ``outputs`` and ``inputs`` are
    ``(name, array or None)`` pairs.
    """
    outputs = [(name, a) for name, a in outputs if a is not None]
    inputs = [(name, a) for name, a in inputs if a is not None]
    for i, (name, out) in enumerate(outputs):
        others = inputs + outputs[i + 1:]
        for other_name, other in others:
            if np.may_share_memory(out, other):
                raise ValueError(
                    f"{name} shares memory with {other_name}: out= buffers must be "
                    "separate arrays (e.g. the gradients of an earlier call), not views "
                    "of an input or of each other"
                )


def check_paired(student: np.ndarray, teacher: np.ndarray, pair: Pair | None,
                 names=("student", "teacher")) -> None:
    """Student and teacher arrays must agree on every dimension but the last."""
    if student.ndim != teacher.ndim or student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(
            f"{names[0]} and {names[1]}{_describe(pair)} disagree on rows: shapes "
            f"{student.shape} and {teacher.shape} must match in every dimension but the "
            "last (hidden width)"
        )


def check_bool(value, name: str) -> bool:
    """Return ``value`` as a bool; anything but True/False (or a NumPy bool) is refused.

    A truthy string such as ``"False"`` would otherwise silently mean True.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return bool(value)


def check_int(value, name: str) -> int:
    """Return ``value`` as an int of any sign (bools are refused)."""
    return check_scalar(value, name, integer=True)


def check_increasing_indices(indices, name: str, size: int) -> list[int]:
    """Return ``indices`` as a non-empty, strictly increasing list of ints in ``0..size-1``."""
    if isinstance(indices, (str, bytes)) or not isinstance(indices, (Sequence, np.ndarray)):
        raise TypeError(
            f"{name} must be a sequence of int indices, got {type(indices).__name__}"
        )
    if isinstance(indices, np.ndarray) and indices.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got an array of shape {indices.shape}")
    if len(indices) == 0:
        raise ValueError(f"{name} is empty: give at least one index")
    out = [_as_index(v, f"{name}[{k}]") for k, v in enumerate(indices)]
    for k, v in enumerate(out):
        if v >= size:
            raise ValueError(
                f"{name}[{k}] = {v} is out of range: valid indices are 0..{size - 1}"
            )
        if k and v <= out[k - 1]:
            raise ValueError(
                f"{name} must be strictly increasing, got {out[k - 1]} then {v} "
                f"at positions {k - 1} and {k}"
            )
    return out


def explain_nonfinite(named_arrays, pair: Pair | None = None, rows=None) -> None:
    """Raise the ValueError that explains a non-finite loss.

    The fused kernels sum every residual they read, so a NaN/Inf in any value
    that takes part in the loss (a selected row of S or T, or any entry of P)
    makes the loss non-finite; checking only then costs nothing on good input.
    Rows a mask leaves out are never read, so padding may hold anything.

    Parameters
    ----------
    named_arrays : sequence of (name, array, row_indexed)
        ``row_indexed`` arrays are checked on ``rows`` only (their first axis,
        after flattening to 2-D); others are checked whole.
    pair : tuple, optional
    rows : int array or None
    """
    where = _describe(pair)
    for name, array, row_indexed in named_arrays:
        if array is None:
            continue
        view = array.reshape(-1, array.shape[-1])
        if row_indexed and rows is not None:
            view = view[rows]
        found = find_nonfinite(view)
        if found is not None:
            count, (r, c) = found
            r = int(rows[r]) if (row_indexed and rows is not None) else r
            raise ValueError(
                f"{name}{where} contains {count} NaN/Inf value(s) in the rows "
                f"that count, first at flattened row {r}, column {c} (shape "
                f"{array.shape}); pass check_finite=False to get the non-finite result instead"
            )
    raise ValueError(
        f"the loss{where} overflowed although every input is finite: values are too large "
        "for the dtype (rescale the hidden states, or use float64)"
    )


def check_fraction(value, name: str) -> float:
    """Return ``value`` as a float in [0, 1] (e.g. the KD weight α)."""
    return check_scalar(value, name, low=0, high=1)


def check_positive(value, name: str) -> float:
    """Return ``value`` as a finite float > 0 (e.g. the temperature τ)."""
    return check_scalar(value, name, low=0, low_inclusive=False)


def check_logits(x, name: str) -> np.ndarray:
    """Return ``x`` as a ``(B, C)`` float array of logits, C >= 2, or raise.

    −inf is accepted (a class with probability exactly 0); NaN and +inf are
    refused, and so is a row with no finite logit (its softmax is undefined).
    """
    arr = check_float_array(x, name, ndims=(2,), check_finite=False)
    if arr.shape[1] < 2:
        raise ValueError(
            f"{name} has shape {arr.shape}: a softmax needs at least 2 classes (columns); "
            "for a single-logit binary classifier pass np.stack([np.zeros_like(z), z], axis=1)"
        )
    found = find_nonfinite(arr, np.isnan(arr) | (arr == np.inf))
    if found is not None:
        raise ValueError(
            f"{name} contains {found[0]} NaN/+inf value(s), first at index {found[1]} "
            f"(shape {arr.shape}); logits must be finite or -inf"
        )
    dead = ~np.isfinite(arr).any(axis=1)
    if dead.any():
        row = int(np.flatnonzero(dead)[0])
        raise ValueError(
            f"{name} row {row} has no finite logit (shape {arr.shape}): every class has "
            "probability 0 and the softmax is undefined"
        )
    return arr


def check_labels(labels, n_examples: int, n_classes: int, name: str = "labels") -> np.ndarray:
    """Return class labels as a ``(B,)`` int64 array with values in ``[0, C)``, or raise."""
    if isinstance(labels, (str, bytes)) or labels is None:
        raise TypeError(f"{name} must be a 1-D array of int class indices, got {labels!r}")
    if type(labels).__module__.startswith("torch"):
        raise TypeError(f"{name} is a torch tensor; pass `tensor.detach().cpu().numpy()`")
    arr = np.asarray(labels)
    if arr.dtype.kind == "b":
        raise TypeError(
            f"{name} must hold int class indices, got dtype bool: cast explicitly with "
            ".astype(np.int64) if True/False really are classes 1/0"
        )
    if arr.dtype.kind == "f":
        raise TypeError(
            f"{name} must hold int class indices, got dtype {arr.dtype}: float labels are "
            "refused (cast with .astype(np.int64) after checking they are whole numbers; "
            "soft targets go in teacher_logits)"
        )
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold int class indices, got dtype {arr.dtype}")
    if arr.ndim != 1:
        hint = ""
        if arr.ndim == 2 and arr.shape == (n_examples, n_classes):
            hint = " (one-hot labels? pass labels.argmax(axis=1))"
        raise ValueError(
            f"{name} must be 1-D with one class index per example, got shape {arr.shape}{hint}"
        )
    if arr.shape[0] != n_examples:
        raise ValueError(
            f"{name} has {arr.shape[0]} entries but the logits have {n_examples} examples "
            "(rows): one label per example"
        )
    out_of_range = (arr < 0) | (arr >= n_classes)
    if out_of_range.any():
        k = int(np.flatnonzero(out_of_range)[0])
        raise ValueError(
            f"{name}[{k}] = {int(arr[k])} is out of range: the logits have {n_classes} "
            f"classes, so labels must be in 0..{n_classes - 1} ({int(out_of_range.sum())} "
            "bad label(s))"
        )
    return np.ascontiguousarray(arr, dtype=np.int64)


def check_layer_index(value, count: int, name: str, side: str) -> int:
    """Return ``value`` as an index into ``count`` layers (negative indices never wrap)."""
    index = _as_index(value, f"{name} ({side} layer)")
    if index >= count:
        raise ValueError(
            f"{name}={index} is out of range: there are {count} {side} layer(s) "
            f"(valid indices 0..{count - 1})"
        )
    return index


def check_finite_rows(values: np.ndarray, name: str, selected=None, *,
                      block_rows: int = 4096,
                      advice: str = "fix the input, mask the row out, or pass "
                                    "check_finite=False") -> None:
    """Refuse NaN/Inf in the rows of ``values`` that count, a block of rows at a time.

    Temporaries are bounded by ``block_rows`` rows, so checking a large dump does
    not add memory that grows with its length. Rows ``selected`` leaves out are
    not read (padding may hold anything).

    Parameters
    ----------
    values : ndarray, shape (N, d)
        Hidden states with rows flattened.
    name : str
        The argument's name, for the message.
    selected : ndarray of bool, shape (N,), optional
        The rows that count; ``None``: all.
    block_rows : int
    advice : str
        What the message tells the user to do.
    """
    n_rows = values.shape[0]
    for start in range(0, n_rows, block_rows):
        stop = min(start + block_rows, n_rows)
        rows = None if selected is None else start + np.flatnonzero(selected[start:stop])
        block = values[start:stop] if rows is None else values[rows]
        found = find_nonfinite(block)
        if found is not None:
            r, c = found[1]
            r = start + r if rows is None else int(rows[r])
            raise ValueError(
                f"{name} contains NaN/Inf in the rows that count, first at flattened row {r}, "
                f"column {c} (flattened shape {values.shape}); {advice}"
            )
