"""The demo's data: scikit-learn's bundled digits, split three ways and standardised.

``sklearn.datasets.load_digits`` ships 1,797 real 8×8 grey-level images of
handwritten digits inside the scikit-learn package (no download). The split
is stratified and seeded: a test set (touched once, after the last step of
the final runs), a validation set carved from the rest (on which the demo's
settings were chosen), and the training set. Features are standardised with
the training set's statistics only.

In the demo the teacher learns from every training label; a student sees the
labels of only a small stratified part of the training set
(:func:`labelled_subset`) and the teacher's outputs on every training input
(the transfer set).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Digits:
    """A train/validation/test split of the digits.

    Attributes
    ----------
    x_train : (N_train, 64) array
    y_train : (N_train,) int64
    x_val : (N_val, 64) array
    y_val : (N_val,) int64
    x_test : (N_test, 64) array
    y_test : (N_test,) int64
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def n_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_val.max(), self.y_test.max()) + 1)


def _load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # the demo extra is missing
        raise ImportError(
            "pkd demo needs scikit-learn for its bundled digits data set: "
            "pip install 'pkd[demo]' (or run `make demo`, which installs it)"
        ) from error
    return load_digits(return_X_y=True)


def _stratified_take(y: np.ndarray, rows: np.ndarray, fraction: float,
                     rng: np.random.Generator) -> np.ndarray:
    """A boolean mask over ``rows`` taking ``round(fraction · n_c)`` rows of each class c."""
    taken = np.zeros(rows.size, dtype=bool)
    for label in np.unique(y[rows]):
        members = np.flatnonzero(y[rows] == label)
        n_take = int(round(fraction * members.size))
        taken[rng.choice(members, size=n_take, replace=False)] = True
    return taken


def load_split(seed: int, test_fraction: float = 0.2, val_fraction: float = 0.2,
               dtype=np.float64) -> Digits:
    """The digits split into train, validation and test, stratified by class, standardised.

    Parameters
    ----------
    seed : int
        Seeds the split.
    test_fraction : float
        Share of each class held out for testing.
    val_fraction : float
        Share of each class of the remaining rows held out for validation.
    dtype : float32 or float64

    Returns
    -------
    Digits
    """
    x, y = _load_digits()
    x = x.astype(np.float64)
    y = y.astype(np.int64)
    rng = np.random.default_rng(seed)
    everything = np.arange(len(y))
    test = _stratified_take(y, everything, test_fraction, rng)
    rest = everything[~test]
    val = _stratified_take(y, rest, val_fraction, rng)
    train_idx = rng.permutation(rest[~val])
    val_idx = rest[val]
    test_idx = everything[test]
    mean = x[train_idx].mean(axis=0)
    # Border pixels are (almost) always 0: a floor keeps them from blowing up.
    std = np.maximum(x[train_idx].std(axis=0), 1.0)
    scaled = ((x - mean) / std).astype(dtype)
    return Digits(scaled[train_idx], y[train_idx], scaled[val_idx], y[val_idx],
                  scaled[test_idx], y[test_idx])


def labelled_subset(y: np.ndarray, fraction: float, order_seed) -> np.ndarray:
    """The rows whose labels a student may see: ``fraction`` of each class, nested.

    Each class's rows are put in a seeded random order and the first
    ``max(1, round(fraction · n_c))`` are taken, so for one seed the subset
    of a smaller fraction is contained in that of a larger one (a curve over
    fractions adds labels, it does not redraw them).

    Parameters
    ----------
    y : (N,) int array
        The training labels.
    fraction : float in (0, 1]
    order_seed : int or numpy.random.SeedSequence
        Seeds the per-class orders.

    Returns
    -------
    (n_labelled,) int64 array
        Sorted row indices into ``y``.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    rng = np.random.default_rng(order_seed)
    chosen = []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        chosen.append(members[:max(1, int(round(fraction * members.size)))])
    return np.sort(np.concatenate(chosen)).astype(np.int64)
