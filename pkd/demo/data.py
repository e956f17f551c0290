"""The demo's data: scikit-learn's bundled digits, split and standardised.

``sklearn.datasets.load_digits`` ships 1,797 real 8×8 grey-level images of
handwritten digits inside the scikit-learn package (no download). The split
is stratified and seeded; features are standardised with the training set's
statistics only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Digits:
    """A train/test split of the digits.

    Attributes
    ----------
    x_train : (N_train, 64) array
    y_train : (N_train,) int64
    x_test : (N_test, 64) array
    y_test : (N_test,) int64
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def n_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max()) + 1)


def _load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # the demo extra is missing
        raise ImportError(
            "pkd demo needs scikit-learn for its bundled digits data set: "
            "pip install 'pkd[demo]' (or run `make demo`, which installs it)"
        ) from error
    return load_digits(return_X_y=True)


def load_split(seed: int, test_fraction: float = 0.2, dtype=np.float64) -> Digits:
    """The digits split into train and test, stratified by class, standardised.

    Parameters
    ----------
    seed : int
        Seeds the split.
    test_fraction : float
        Share of each class held out for testing.
    dtype : float32 or float64

    Returns
    -------
    Digits
    """
    x, y = _load_digits()
    x = x.astype(np.float64)
    y = y.astype(np.int64)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        n_test = int(round(test_fraction * members.size))
        test[rng.choice(members, size=n_test, replace=False)] = True
    train_idx = rng.permutation(np.flatnonzero(~test))
    test_idx = np.flatnonzero(test)
    mean = x[train_idx].mean(axis=0)
    # Border pixels are (almost) always 0: a floor keeps them from blowing up.
    std = np.maximum(x[train_idx].std(axis=0), 1.0)
    scaled = ((x - mean) / std).astype(dtype)
    return Digits(scaled[train_idx], y[train_idx], scaled[test_idx], y[test_idx])
