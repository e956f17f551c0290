"""Layer mappings: which student layer learns from which teacher layer.

A mapping is a list of ``(student, teacher)`` pairs of 0-based indices into
the per-layer lists the caller passes (``docs/math.md``). The fixed schemes are

- ``uniform(n_s, n_t)``: student m ↔ teacher ⌊(m+1)·n_t/n_s⌋ − 1 for every m
  (TinyBERT; ``uniform(4, 12)`` is the reference implementation's default
  ``[(0,2),(1,5),(2,8),(3,11)]``);
- ``skip(n_s, n_t)``: PKD-Skip, the same formula for m < n_s − 1;
- ``last(n_s, n_t)``: PKD-Last, student m ↔ teacher n_t − n_s + m for m < n_s − 1.

PKD-Skip and PKD-Last leave the last student layer to the logit loss, as the
paper does. ``optimal(cost)`` picks the strictly increasing mapping of least
summed cost from an alignment matrix (e.g. relative min-MSE), or with
``maximize=True`` the one of greatest summed similarity (e.g. CKA).

Hugging Face ``hidden_states`` tuples hold the embeddings at index 0; use
:func:`to_hidden_states_indices` to shift a mapping onto them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ._validation import (
    Pair,
    check_bool,
    check_float_array,
    check_increasing_indices,
    check_int,
    check_mapping,
    check_positive_int,
)


def _check_counts(n_s, n_t, scheme: str) -> tuple[int, int]:
    n_s = check_positive_int(n_s, "n_s (number of student layers)")
    n_t = check_positive_int(n_t, "n_t (number of teacher layers)")
    if n_s > n_t:
        raise ValueError(
            f"{scheme} mapping needs at least as many teacher as student layers, got "
            f"n_s={n_s} student and n_t={n_t} teacher layers: a strictly increasing "
            "mapping cannot give every student layer its own teacher layer"
        )
    return n_s, n_t


def _check_not_single(n_s: int, scheme: str) -> None:
    if n_s < 2:
        raise ValueError(
            f"{scheme} maps student layers 0..n_s-2 and leaves the last student layer to "
            f"the logit loss, so with n_s={n_s} the mapping would be empty: n_s must be "
            ">= 2 (use uniform for a single student layer)"
        )


def uniform(n_s: int, n_t: int) -> list[Pair]:
    """Every student layer m ↔ teacher layer ⌊(m+1)·n_t/n_s⌋ − 1, last layers included.

    Parameters
    ----------
    n_s, n_t : int
        Numbers of student and teacher layers, ``1 <= n_s <= n_t``.

    Returns
    -------
    list of (int, int)
        ``n_s`` pairs; teacher indices strictly increase and end at ``n_t - 1``.
    """
    n_s, n_t = _check_counts(n_s, n_t, "uniform")
    # Integer arithmetic: floor((m+1)·n_t/n_s) exactly, no float rounding.
    return [(m, (m + 1) * n_t // n_s - 1) for m in range(n_s)]


def skip(n_s: int, n_t: int) -> list[Pair]:
    """PKD-Skip: student m ↔ teacher ⌊(m+1)·n_t/n_s⌋ − 1 for m < n_s − 1.

    Parameters
    ----------
    n_s, n_t : int
        Numbers of student and teacher layers, ``2 <= n_s <= n_t``.

    Returns
    -------
    list of (int, int)
        ``n_s - 1`` pairs (the last student layer is left to the logit loss).
    """
    n_s, n_t = _check_counts(n_s, n_t, "skip (PKD-Skip)")
    _check_not_single(n_s, "skip (PKD-Skip)")
    return uniform(n_s, n_t)[:-1]  # uniform's pairs, the last student layer left out


def last(n_s: int, n_t: int) -> list[Pair]:
    """PKD-Last: student m ↔ teacher n_t − n_s + m for m < n_s − 1.

    Parameters
    ----------
    n_s, n_t : int
        Numbers of student and teacher layers, ``2 <= n_s <= n_t``.

    Returns
    -------
    list of (int, int)
        ``n_s - 1`` pairs onto the teacher layers just below its last one.
    """
    n_s, n_t = _check_counts(n_s, n_t, "last (PKD-Last)")
    _check_not_single(n_s, "last (PKD-Last)")
    return [(m, n_t - n_s + m) for m in range(n_s - 1)]


def optimal(matrix, student_layers: Sequence[int] | None = None, *,
            maximize: bool = False) -> list[Pair]:
    """The strictly increasing mapping of least summed cost (or greatest similarity).

    Teacher layers ``t_0 < t_1 < ... < t_{k-1}`` are chosen for the student
    layers ``r_0 < ... < r_{k-1}`` to minimise ``Σ_i matrix[r_i, t_i]`` (maximise
    with ``maximize=True``), by dynamic programming in O(k·n_t) time with
    suffix minima.

    Parameters
    ----------
    matrix : array_like, shape (n_s, n_t)
        float32/float64 alignment cost, lower is better (e.g. relative min-MSE),
        or with ``maximize=True`` a similarity, higher is better (e.g. CKA).
        ``+inf`` (``-inf`` when maximizing) marks a forbidden pair; NaN and
        the opposite infinity are refused in the rows used (other rows are
        ignored): a NaN usually means a constant layer, forbid its pairs
        explicitly. Computed in float64.
    student_layers : sequence of int, optional
        Strictly increasing row indices to map; default every row ``0..n_s-1``.
    maximize : bool
        ``matrix`` is a similarity to maximise rather than a cost.

    Returns
    -------
    list of (int, int)
        One ``(student, teacher)`` pair per student layer, in order.

    Raises
    ------
    ValueError
        Fewer teacher layers than student layers to map, NaN or ``-inf`` in a
        used row, or every feasible mapping uses a ``+inf`` (forbidden) pair.

    Notes
    -----
    Ties (equal sums as computed in float64) go to the lexicographically
    smallest teacher sequence: the earliest first teacher layer, then the
    earliest second one, and so on. Sums that are equal in exact arithmetic
    but differ by rounding are not ties.
    """
    name = "matrix (a similarity: maximize=True)" if check_bool(maximize, "maximize") \
        else "matrix"
    cost = check_float_array(matrix, name, ndims=(2,), check_finite=False)
    if maximize:
        cost = -cost.astype(np.float64)
    n_s, n_t = cost.shape
    if student_layers is None:
        rows = list(range(n_s))
    else:
        rows = check_increasing_indices(
            student_layers, f"student_layers (rows of the {n_s}x{n_t} cost matrix)", n_s
        )
    k = len(rows)
    if k > n_t:
        raise ValueError(
            f"cost has shape {cost.shape}: {k} student layer(s) to map onto only {n_t} "
            "teacher layer(s); a strictly increasing mapping needs n_t >= the number of "
            "student layers (pass fewer student_layers or more teacher layers)"
        )
    used = cost[rows].astype(np.float64)
    bad = np.isnan(used) | (used == -np.inf)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        kind = ("similarity matrix has {} NaN/+inf", "similarities must be finite or -inf "
                "(-inf forbids a pair)") if maximize else ("cost has {} NaN/-inf",
                                                           "costs must be finite or +inf "
                                                           "(+inf forbids a pair)")
        raise ValueError(
            f"{kind[0].format(int(bad.sum()))} value(s) in the rows used, first at "
            f"({rows[i]}, {int(j)}) (shape {cost.shape}); {kind[1]}. A NaN usually means a "
            "constant layer (no variance): forbid its pairs explicitly, e.g. "
            "np.where(np.isnan(m), np.inf, m) for a cost"
        )

    # best[i, j]: least cost of rows i..k-1 with row i on teacher j (inf if infeasible).
    best = np.empty((k, n_t), dtype=np.float64)
    best[k - 1] = used[k - 1]
    for i in range(k - 2, -1, -1):
        # after[j] = min over j' > j of best[i+1, j'] (a reversed running minimum).
        after = np.full(n_t, np.inf)
        after[:-1] = np.minimum.accumulate(best[i + 1, ::-1])[::-1][1:]
        try:  # finite + finite overflowing sets the flag; +inf + finite does not
            with np.errstate(over="raise"):
                best[i] = used[i] + after
        except FloatingPointError:
            finite = np.abs(used[np.isfinite(used)])
            raise ValueError(
                f"cost of shape {cost.shape} overflows float64 when summed along a mapping "
                f"(largest finite |cost| {finite.max():.3g}): rescale it, e.g. divide by "
                "its largest finite value"
            ) from None

    total = best[0].min()
    if not np.isfinite(total):
        raise ValueError(
            f"no feasible mapping for a matrix of shape {cost.shape} and student layers "
            f"{rows}: every strictly increasing assignment uses a forbidden pair (+inf "
            "cost, -inf similarity)"
        )
    # Walk forward taking the earliest teacher that attains the optimum: the
    # lexicographically smallest optimal sequence (np.argmin returns the first).
    teachers = [int(np.argmin(best[0]))]
    for i in range(1, k):
        start = teachers[-1] + 1
        teachers.append(start + int(np.argmin(best[i, start:])))
    return list(zip(rows, teachers, strict=True))


def to_hidden_states_indices(
    mapping, student_offset: int = 1, teacher_offset: int = 1
) -> list[Pair]:
    """Shift a layer mapping onto Hugging Face ``hidden_states`` tuples.

    ``hidden_states[0]`` is the embeddings output, so transformer layer k is
    ``hidden_states[k + 1]``: the default offsets of 1 turn layer indices into
    ``hidden_states`` indices. Negative offsets shift back.

    Parameters
    ----------
    mapping : sequence of (int, int)
        ``(student, teacher)`` layer pairs.
    student_offset, teacher_offset : int
        Added to every student and teacher index.

    Returns
    -------
    list of (int, int)
        The shifted pairs, in the same order.
    """
    pairs = check_mapping(mapping)
    ds = check_int(student_offset, "student_offset")
    dt = check_int(teacher_offset, "teacher_offset")
    shifted = [(s + ds, t + dt) for s, t in pairs]
    for (s, t), (s2, t2) in zip(pairs, shifted, strict=True):
        if s2 < 0 or t2 < 0:
            raise ValueError(
                f"shifting layer pair {(s, t)} by (student_offset={ds}, "
                f"teacher_offset={dt}) gives the negative index pair {(s2, t2)}"
            )
    return shifted


MAPPINGS: dict[str, Callable[[int, int], list[Pair]]] = {
    "uniform": uniform,
    "skip": skip,
    "last": last,
}


def parse_mapping(text: str, n_s: int, n_t: int) -> list[Pair]:
    """Parse a mapping given on the command line.

    Parameters
    ----------
    text : str
        A scheme name from :data:`MAPPINGS` (``"uniform"``, ``"skip"``,
        ``"last"``; case and surrounding spaces ignored) or explicit pairs
        ``"s:t,s:t,..."`` such as ``"0:2,1:5"``.
    n_s, n_t : int
        Numbers of student and teacher layers; explicit pairs must lie in range.

    Returns
    -------
    list of (int, int)
        The mapping.
    """
    if not isinstance(text, str):
        raise TypeError(f"mapping must be a str, got {type(text).__name__}")
    n_s = check_positive_int(n_s, "n_s (number of student layers)")
    n_t = check_positive_int(n_t, "n_t (number of teacher layers)")
    name = text.strip().lower()
    if name in MAPPINGS:
        return MAPPINGS[name](n_s, n_t)
    if name == "optimal":
        raise ValueError(
            'mapping "optimal" needs a cost matrix (e.g. relative min-MSE or 1 - CKA from '
            "the alignment statistics), which a mapping string cannot carry: compute the "
            "cost and call pkd.mapping.optimal(cost)"
        )
    if ":" not in name:
        raise ValueError(
            f"unknown mapping {text!r}: use one of {', '.join(map(repr, MAPPINGS))} "
            'or explicit student:teacher pairs such as "0:2,1:5"'
        )
    pairs = []
    for item in name.split(","):
        fields = item.split(":")
        try:
            if len(fields) != 2:
                raise ValueError
            s, t = int(fields[0]), int(fields[1])
        except ValueError:
            raise ValueError(
                f"cannot read {item.strip()!r} in mapping {text!r}: each comma-separated item "
                'must be "student:teacher" with two non-negative ints, e.g. "0:2,1:5"'
            ) from None
        if not (0 <= s < n_s and 0 <= t < n_t):
            raise ValueError(
                f"layer pair {(s, t)} in mapping {text!r} is out of range: student layers "
                f"are 0..{n_s - 1} and teacher layers 0..{n_t - 1}"
            )
        pairs.append((s, t))
    return check_mapping(pairs)
