"""Layer-matching benchmark: does a similarity measure find the corresponding layer?

The sanity check of Kornblith et al. (ICML 2019, section 6.1 and Table 2) at
CPU size. Several copies of one deep network are trained from different seeds
(same data, same split, same architecture and schedule; only the initial
weights and the minibatch order differ). For every ordered pair of copies
(i, j), i ≠ j, and every layer l of copy i, each measure names the layer of
copy j most similar to l; it is right when that is layer l itself. A measure
that cannot find the corresponding layer of an identically built and trained
network cannot be trusted to pick a layer mapping between a student and a
teacher.

The network is a plain (non-residual) MLP on scikit-learn's digits: ``L``
blocks ``h ← relu(LayerNorm(h W + b))`` of width ``W``, then a linear
classifier, trained with Adam on cross-entropy (torch, CPU, one thread). The
hidden states are the ``L`` block outputs on the held-out images, in float32.

Measures (rows: the query layer of copy i; columns: the layers of copy j):

- ``relative``: in-sample 1 − R² (:meth:`pkd.AlignmentStats.relative_min_mse`),
  the query layer as the *student* predicting each layer of copy j: the cost
  behind ``--mapping optimal`` (lower = more similar);
- ``relative-target``: the same, with the query layer as the *teacher*,
  predicted from each layer of copy j;
- ``heldout`` / ``heldout-target``: the same two, held out: fitted on k − 1
  folds, scored on the remaining fold, averaged over the k folds
  (``AlignmentStats(..., folds=k).relative_min_mse(heldout=True).mean``);
- ``cka``: linear CKA (:meth:`pkd.AlignmentStats.cka`);
- ``cka-debiased``: debiased linear CKA (``stats.cka(debiased=True)``);
- ``rbf-cka-<b>``: RBF CKA with σ = b × the median pairwise distance
  (:func:`pkd.cka.rbf_cka_matrix`), for each bandwidth fraction ``b``.

Ties: a query whose own layer ties with k − 1 others for the best value
(within :data:`TIE_TOLERANCE`) earns 1/k, the expected score of breaking the
tie at random; so a measure that says "everything is equally similar" scores
chance, not 100%.

Two settings: ``all rows`` (every held-out image, rows ≫ width) and
``few rows`` (a fixed random subset with rows < width, where in-sample
regression can fit anything).

Writes ``layer_matching.json``, ``layer_matching.md``, ``layer_matching.png``
and ``choices.png`` into ``analysis/results/layer_matching/``.

Run (from the repository root):

    .venv/bin/python analysis/layer_matching.py           # full: 10 copies, a few minutes
    .venv/bin/python analysis/layer_matching.py --quick   # smoke run, into
                                                          # results/layer_matching-quick/
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import ANALYSIS, RESULTS, output_dir, write_json, write_text

from pkd.alignment import AlignmentStats
from pkd.demo.data import load_split

NAME = "layer_matching"
# Two values of one measure closer than this are a tie (every measure here lies in
# [0, 1] up to rounding, or slightly above 1 for 1 − R² with R² < 0).
TIE_TOLERANCE = 1e-9
# Kornblith et al. 2019, Table 2: ten CNNs on CIFAR-10, accuracy (%) of identifying
# the corresponding layer, for the measures this benchmark shares with it.
KORNBLITH = {
    "relative": "45.4 (linear regression)",
    "relative-target": "45.4 (linear regression)",
    "cka": "99.3",
    "rbf-cka": "99.1–99.3",
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that fixes a run (and keys the hidden-state cache)."""

    n_copies: int = 10
    n_blocks: int = 10
    width: int = 64
    epochs: int = 40
    batch_size: int = 64
    lr: float = 1e-3
    test_fraction: float = 0.3
    few_rows: int | None = None  # None: three quarters of the width
    folds: int = 5
    bandwidths: tuple[float, ...] = (0.2, 0.5, 0.8)
    seed: int = 0
    quick: bool = False

    @classmethod
    def quick_run(cls, **changes) -> Settings:
        """A smoke run of the same code path: 2 copies of a 4-block net, 2 epochs."""
        base = dict(n_copies=2, n_blocks=4, width=16, epochs=2, quick=True)
        return cls(**{**base, **changes})

    @property
    def n_few_rows(self) -> int:
        """Rows of the few-rows setting: ``few_rows``, or three quarters of the width."""
        return self.few_rows if self.few_rows is not None else max(10, 3 * self.width // 4)

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "few_rows": self.n_few_rows,
                "bandwidths": list(self.bandwidths)}

    def training_key(self) -> str:
        """A hash of the settings that change the hidden states."""
        keys = ("n_copies", "n_blocks", "width", "epochs", "batch_size", "lr",
                "test_fraction", "seed")
        text = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- training


def _network(n_in: int, width: int, n_blocks: int, n_classes: int):
    import torch

    class DeepMLP(torch.nn.Module):
        """``n_blocks`` blocks relu(LayerNorm(h W + b)), then a linear classifier."""

        def __init__(self):
            super().__init__()
            widths = [n_in] + [width] * n_blocks
            self.blocks = torch.nn.ModuleList(
                torch.nn.Sequential(torch.nn.Linear(a, b), torch.nn.LayerNorm(b),
                                    torch.nn.ReLU())
                for a, b in zip(widths[:-1], widths[1:], strict=True))
            self.head = torch.nn.Linear(width, n_classes)

        def hidden_states(self, x):
            states = []
            for block in self.blocks:
                x = block(x)
                states.append(x)
            return states

        def forward(self, x):
            return self.head(self.hidden_states(x)[-1])

    return DeepMLP()


def train_copy(data, settings: Settings, seed: int):
    """Train one copy; return its block outputs on the test images and its accuracy.

    Returns
    -------
    hidden : ndarray, shape (L, N_test, W), float32
    accuracy : float
        Test accuracy in percent.
    """
    import torch

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = _network(data.n_features, settings.width, settings.n_blocks, data.n_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    n = x.shape[0]
    model.train()
    for _ in range(settings.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, settings.batch_size):
            batch = order[start:start + settings.batch_size]
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        states = model.hidden_states(torch.from_numpy(data.x_test))
        predicted = model.head(states[-1]).argmax(dim=1).numpy()
    hidden = np.stack([s.numpy() for s in states]).astype(np.float32)
    return hidden, float(100.0 * np.mean(predicted == data.y_test))


def train_copies(settings: Settings, cache: Path | None, log=print) -> dict:
    """Hidden states of every copy on the held-out images, from the cache if it has them.

    Returns
    -------
    dict with ``hidden`` (n_copies, L, N_test, W) float32, ``accuracy`` (n_copies,)
    percent, ``n_train``, ``n_test``, ``copy_seeds`` and ``train_s`` (seconds spent
    training; 0 when read from the cache).
    """
    if cache is not None and cache.is_file():
        with np.load(cache) as stored:
            if str(stored["key"]) == settings.training_key():
                log(f"hidden states read from {cache}")
                return {"hidden": stored["hidden"], "accuracy": stored["accuracy"],
                        "n_train": int(stored["n_train"]), "n_test": int(stored["n_test"]),
                        "copy_seeds": stored["copy_seeds"].tolist(), "train_s": 0.0}
    import torch

    torch.set_num_threads(1)  # tiny matrices: one thread is as fast, and the cores are shared
    torch.use_deterministic_algorithms(True)
    children = np.random.SeedSequence(settings.seed).spawn(1 + settings.n_copies)
    split_seed = int(children[0].generate_state(1)[0])
    data = load_split(split_seed, settings.test_fraction, dtype=np.float32)
    copy_seeds = [int(c.generate_state(1)[0]) for c in children[1:]]
    started = time.perf_counter()
    hidden, accuracy = [], []
    for k, seed in enumerate(copy_seeds):
        h, acc = train_copy(data, settings, seed)
        hidden.append(h)
        accuracy.append(acc)
        log(f"copy {k}: test accuracy {acc:.2f}% ({time.perf_counter() - started:.1f} s)")
    out = {"hidden": np.stack(hidden), "accuracy": np.array(accuracy),
           "n_train": int(len(data.y_train)), "n_test": int(len(data.y_test)),
           "copy_seeds": copy_seeds, "train_s": time.perf_counter() - started}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache.parent, suffix=".npz", delete=False) as f:
            np.savez(f, key=settings.training_key(), hidden=out["hidden"],
                     accuracy=out["accuracy"], n_train=out["n_train"],
                     n_test=out["n_test"], copy_seeds=np.array(copy_seeds))
        Path(f.name).replace(cache)
    return out


# --------------------------------------------------------------------------- measures


def measures(settings: Settings) -> dict[str, dict]:
    """Every measure of the benchmark: key -> label, kind ("cost" or "similarity")."""
    table = {
        "relative": {"label": "1 − R², in-sample (student side)", "kind": "cost"},
        "relative-target": {"label": "1 − R², in-sample (teacher side)", "kind": "cost"},
        "heldout": {"label": f"1 − R², held out, {settings.folds} folds (student side)",
                    "kind": "cost"},
        "heldout-target": {"label": f"1 − R², held out, {settings.folds} folds "
                                    "(teacher side)", "kind": "cost"},
        "cka": {"label": "linear CKA", "kind": "similarity"},
        "cka-debiased": {"label": "debiased linear CKA", "kind": "similarity"},
    }
    for b in settings.bandwidths:
        table[f"rbf-cka-{b:g}"] = {"label": f"RBF CKA, σ = {b:g} × median distance",
                                  "kind": "similarity"}
    return table


def similarity_tensors(hidden: np.ndarray, settings: Settings,
                       log=print) -> dict[str, np.ndarray]:
    """Every measure between every layer of every copy and every layer of every copy.

    One :class:`pkd.AlignmentStats` per copy (its layers as the students, the
    layers of all copies as the teachers) and one RBF CKA matrix per bandwidth
    over all layers, so each solve and each kernel is computed once.

    Parameters
    ----------
    hidden : ndarray, shape (C, L, N, W), float32
        The block outputs of ``C`` copies on the same ``N`` inputs.

    Returns
    -------
    dict of str to ndarray, shape (C, L, C, L), float64
        Entry ``[i, l, j, m]``: the measure between layer l of copy i (the query)
        and layer m of copy j (a candidate).
    """
    from pkd.cka import rbf_cka_matrix

    n_copies, n_layers = hidden.shape[:2]
    every_layer = list(hidden.reshape(n_copies * n_layers, *hidden.shape[2:]))
    shape = (n_layers, n_copies, n_layers)
    keys = ("relative", "heldout", "cka", "cka-debiased")
    out = {key: np.empty((n_copies, *shape)) for key in keys}
    started = time.perf_counter()
    for i in range(n_copies):
        stats = AlignmentStats.from_arrays(list(hidden[i]), every_layer, folds=settings.folds)
        out["relative"][i] = stats.relative_min_mse().reshape(shape)
        out["heldout"][i] = stats.relative_min_mse(heldout=True).mean.reshape(shape)
        out["cka"][i] = stats.cka().reshape(shape)
        out["cka-debiased"][i] = stats.cka(debiased=True).reshape(shape)
        log(f"  copy {i}: 1 − R², held out, CKA ({time.perf_counter() - started:.1f} s)")
    # The query as the teacher: copy j's layer m predicts copy i's layer l.
    out["relative-target"] = out["relative"].transpose(2, 3, 0, 1)
    out["heldout-target"] = out["heldout"].transpose(2, 3, 0, 1)
    for bandwidth in settings.bandwidths:
        matrix = rbf_cka_matrix(every_layer, every_layer, bandwidth=bandwidth)
        out[f"rbf-cka-{bandwidth:g}"] = matrix.reshape(n_copies, *shape)
        log(f"  RBF CKA, bandwidth {bandwidth:g} ({time.perf_counter() - started:.1f} s)")
    return {key: out[key] for key in measures(settings)}


def credit(matrix: np.ndarray, maximize: bool) -> tuple[np.ndarray, np.ndarray]:
    """How often each query layer's own counterpart is the measure's best candidate.

    Parameters
    ----------
    matrix : ndarray, shape (L, L)
        Query layers by candidate layers; NaN is never best.
    maximize : bool
        True for a similarity, False for a cost.

    Returns
    -------
    credit : ndarray, shape (L,)
        1/k when query l's own layer is among the k candidates tied for the
        best value (within :data:`TIE_TOLERANCE`), else 0; 0 when every
        candidate is NaN.
    chosen : ndarray, shape (L, L)
        Row l spreads one unit over the candidates tied for the best (1/k each):
        the expected choice under random tie-breaking.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    n_query, n_candidate = matrix.shape
    values = matrix if maximize else -matrix
    scores = np.zeros(n_query)
    chosen = np.zeros((n_query, n_candidate))
    for q in range(n_query):
        row = values[q]
        finite = np.isfinite(row)
        if not finite.any():
            continue
        best = np.flatnonzero(finite & (row >= row[finite].max() - TIE_TOLERANCE))
        chosen[q, best] = 1.0 / best.size
        scores[q] = chosen[q, q] if q < n_candidate else 0.0
    return scores, chosen


def few_rows_subset(n_rows: int, settings: Settings) -> np.ndarray:
    """The fixed random rows of the few-rows setting, in increasing order."""
    if settings.n_few_rows > n_rows:
        raise ValueError(f"few_rows = {settings.n_few_rows} exceeds the {n_rows} held-out rows")
    rng = np.random.default_rng(np.random.SeedSequence([settings.seed, 1]))
    return np.sort(rng.choice(n_rows, size=settings.n_few_rows, replace=False))


def score_setting(hidden: np.ndarray, settings: Settings, log=print) -> dict:
    """Accuracy of every measure over every ordered pair of copies and every layer.

    Parameters
    ----------
    hidden : ndarray, shape (C, L, N, W), float32

    Returns
    -------
    dict with ``pairs`` (the ordered pairs (i, j), i ≠ j), ``measure_s`` and, per
    measure: ``accuracy`` (share of the queries matched), ``per_layer`` (L,),
    ``per_pair`` (one per ordered pair), ``within_one`` (share of queries whose
    choice is at most one layer away), ``tied_queries`` (queries whose best value
    was shared), ``undefined_queries`` (queries whose every candidate was NaN,
    counted as misses), ``chosen`` (L, L: the share of queries at layer l that picked
    layer m), ``corresponding`` (L,: the measure between layer l of two copies,
    averaged over the pairs) and ``identity`` (the accuracy of each copy matched
    against itself, averaged over the copies).
    """
    n_copies, n_layers = hidden.shape[:2]
    table = measures(settings)
    started = time.perf_counter()
    tensors = similarity_tensors(hidden, settings, log=log)
    pairs = [(i, j) for i in range(n_copies) for j in range(n_copies) if i != j]
    offset = np.abs(np.subtract.outer(np.arange(n_layers), np.arange(n_layers)))
    results = {}
    for key, spec in table.items():
        maximize = spec["kind"] == "similarity"
        tensor = tensors[key]
        credits = np.zeros((len(pairs), n_layers))
        chosen = np.zeros((n_layers, n_layers))
        corresponding = np.zeros(n_layers)
        tied = undefined = 0
        for p, (i, j) in enumerate(pairs):
            scores, picks = credit(tensor[i, :, j, :], maximize)
            credits[p] = scores
            chosen += picks
            tied += int(np.sum((picks.max(axis=1) < 1.0) & (picks.sum(axis=1) > 0)))
            undefined += int(np.sum(picks.sum(axis=1) == 0))
            corresponding += np.diag(tensor[i, :, j, :])
        identity = [credit(tensor[i, :, i, :], maximize)[0].mean() for i in range(n_copies)]
        chosen /= len(pairs)
        results[key] = {
            **spec,
            "accuracy": float(credits.mean()),
            "per_layer": credits.mean(axis=0).tolist(),
            "per_pair": credits.mean(axis=1).tolist(),
            "within_one": float(chosen[offset <= 1].sum() / n_layers),
            "tied_queries": tied,
            "undefined_queries": undefined,
            "chosen": chosen.tolist(),
            "corresponding": (corresponding / len(pairs)).tolist(),
            "identity": float(np.mean(identity)),
        }
    return {"pairs": [[i, j] for i, j in pairs],
            "measure_s": time.perf_counter() - started, "measures": results}


# --------------------------------------------------------------------------- run


def _train_and_score(settings: Settings, cache: Path | None, log):
    """The copies (:func:`train_copies`), the scores of both settings, the few-rows subset."""
    copies = train_copies(settings, cache, log=log)
    hidden = copies["hidden"]
    n_copies, n_layers, n_rows, width = hidden.shape
    subset = few_rows_subset(n_rows, settings)
    settings_rows = {"all_rows": hidden, "few_rows": hidden[:, :, subset]}
    results = {}
    for name, states in settings_rows.items():
        log(f"{name}: {states.shape[2]} rows × width {width}, "
            f"{n_copies * (n_copies - 1)} ordered pairs × {n_layers} layers")
        results[name] = {"n_rows": int(states.shape[2]),
                         **score_setting(states, settings, log=log)}
    return copies, results, subset


def run(settings: Settings, cache: Path | None, log=print) -> dict:
    """Train (or read) the copies, then score every measure in both settings."""
    import numba
    from threadpoolctl import threadpool_limits

    started = time.perf_counter()
    numba_threads = numba.get_num_threads()
    # One thread everywhere: the matrices are small and the cores shared; pkd's Numba
    # kernels give the same values with any thread count.
    numba.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            copies, results, subset = _train_and_score(settings, cache, log)
    finally:
        numba.set_num_threads(numba_threads)
    hidden = copies["hidden"]
    n_layers, width = hidden.shape[1], hidden.shape[3]
    return {
        "settings": {**settings.as_dict(), "n_train": copies["n_train"],
                     "n_test": copies["n_test"], "copy_seeds": copies["copy_seeds"],
                     "few_rows_subset": subset.tolist(), "tie_tolerance": TIE_TOLERANCE},
        "copies": {"test_accuracy": copies["accuracy"].tolist(),
                   "hidden_dtype": str(hidden.dtype), "n_layers": n_layers, "width": width},
        "results": results,
        "kornblith_2019": KORNBLITH,
        "timing_s": {"train": round(copies["train_s"], 2),
                     **{f"measures_{k}": round(v["measure_s"], 2) for k, v in results.items()},
                     "total": round(time.perf_counter() - started, 2)},
    }


def _json_safe(value):
    """``value`` with every non-finite float replaced by None (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --------------------------------------------------------------------------- report


def _percent(value: float) -> str:
    return f"{100.0 * value:.1f}"


def _last_layer_share(row: dict) -> float:
    """Share of all queries whose choice was the last layer."""
    chosen = np.asarray(row["chosen"])
    return float(chosen[:, -1].mean())


def interpretation(result: dict) -> str:
    """What the numbers show, written from them."""
    main = result["results"]["all_rows"]["measures"]
    few = result["results"]["few_rows"]["measures"]
    n_rows_all = result["results"]["all_rows"]["n_rows"]
    n_rows_few = result["results"]["few_rows"]["n_rows"]
    width, n_layers = result["copies"]["width"], result["copies"]["n_layers"]
    ranked = sorted(main, key=lambda k: -main[k]["accuracy"])
    best, second = ranked[0], ranked[1]
    middle = slice(1, n_layers - 1)
    parts = [
        f"With {n_rows_all} held-out rows (width {width}), the most accurate measure is "
        f"{main[best]['label']}: {_percent(main[best]['accuracy'])}% of queries matched "
        f"({_percent(main[best]['within_one'])}% within one layer), ahead of "
        f"{main[second]['label']} ({_percent(main[second]['accuracy'])}%); linear CKA "
        f"scores {_percent(main['cka']['accuracy'])}%, debiased linear CKA "
        f"{_percent(main['cka-debiased']['accuracy'])}%.",
        f"In-sample 1 − R² on the student side, the cost behind `--mapping optimal`, scores "
        f"{_percent(main['relative']['accuracy'])}% (chance is {100 / n_layers:.0f}%): it "
        f"picks the last layer for {_percent(_last_layer_share(main['relative']))}% of all "
        "queries (the last layer is the one other layers predict best). Held out it scores "
        f"{_percent(main['heldout']['accuracy'])}%; on the teacher side "
        f"{_percent(main['relative-target']['accuracy'])}% in-sample and "
        f"{_percent(main['heldout-target']['accuracy'])}% held out.",
        f"Kornblith et al. report about 99% for linear and RBF CKA on ten copies of a CNN "
        f"on CIFAR-10; the best here is {_percent(main[best]['accuracy'])}%. Accuracy is "
        f"lowest on the middle layers (1–{n_layers - 2}): "
        f"{_percent(np.mean(main[best]['per_layer'][middle]))}% for {best} and "
        f"{_percent(np.mean(main['cka']['per_layer'][middle]))}% for linear CKA, against "
        f"{_percent(main[best]['per_layer'][0])}% and "
        f"{_percent(main['cka']['per_layer'][0])}% on layer 0.",
        f"With {n_rows_few} rows ({'fewer' if n_rows_few < width else 'more'} than the "
        f"width {width}), in-sample 1 − R² scores {_percent(few['relative']['accuracy'])}% "
        f"({few['relative']['tied_queries']} of "
        f"{len(result['results']['few_rows']['pairs']) * n_layers} queries tied: with "
        "rows ≤ width it is 0 for every pair); held out it scores "
        f"{_percent(few['heldout']['accuracy'])}% (student side) and "
        f"{_percent(few['heldout-target']['accuracy'])}% (teacher side); linear CKA "
        f"{_percent(few['cka']['accuracy'])}%, {best} {_percent(few[best]['accuracy'])}%.",
    ]
    if result["settings"]["quick"]:
        parts.append("This was a --quick run: the numbers only show that the pipeline works; "
                     "run without --quick for the benchmark.")
    return " ".join(parts)


def rerun_command(result: dict, out: Path | None = None) -> str:
    """The command line that reproduces ``result`` (options that differ from the defaults)."""
    s, default = result["settings"], Settings()
    parts = [".venv/bin/python analysis/layer_matching.py"]
    if s["quick"]:
        parts.append("--quick")
    else:
        for option, key in (("--copies", "n_copies"), ("--blocks", "n_blocks"),
                            ("--width", "width"), ("--seed", "seed")):
            if s[key] != getattr(default, key):
                parts.append(f"{option} {s[key]}")
    if out is not None and out.resolve() != (RESULTS / NAME).resolve():
        try:
            parts.append(f"--out {out.resolve().relative_to(ANALYSIS.parent)}")
        except ValueError:  # outside the repository
            parts.append(f"--out {out}")
    return " ".join(parts)


def markdown(result: dict, out: Path | None = None) -> str:
    """layer_matching.md: the tables, what they show, and how to rerun them."""
    s, copies = result["settings"], result["copies"]
    main, few = result["results"]["all_rows"], result["results"]["few_rows"]
    n_copies = len(copies["test_accuracy"])
    n_pairs = len(main["pairs"])
    n_layers, width = copies["n_layers"], copies["width"]
    accuracy = np.array(copies["test_accuracy"])
    lines = [
        "# Layer matching: does a measure find the corresponding layer of another copy?",
        "",
        f"{n_copies} copies of a {n_layers}-block MLP (width {width}, LayerNorm, ReLU) trained "
        f"on scikit-learn's digits from different seeds (test accuracy "
        f"{accuracy.mean():.2f} ± {accuracy.std(ddof=1) if n_copies > 1 else 0.0:.2f}%). "
        f"For each of the {n_pairs} ordered pairs of copies and each of the {n_layers} "
        f"layers of the first, a measure is right when its most similar layer of the "
        f"second copy is the same layer ({n_pairs * n_layers} queries per setting; "
        "ties earn 1/k). Hidden states: the block outputs on held-out images, float32.",
        "",
        f"| measure | accuracy (%), {main['n_rows']} rows | within one layer (%), "
        f"{main['n_rows']} rows | accuracy (%), {few['n_rows']} rows "
        "| Kornblith et al. 2019, Table 2 (%) |",
        "|---|---|---|---|---|",
    ]
    for key, row in main["measures"].items():
        reference = result["kornblith_2019"].get(key)
        if reference is None and key.startswith("rbf-cka"):
            reference = result["kornblith_2019"]["rbf-cka"]
        ties = (f" ({few['measures'][key]['tied_queries']} tied)"
                if few["measures"][key]["tied_queries"] else "")
        lines.append(f"| {row['label']} (`{key}`) | {_percent(row['accuracy'])} "
                     f"| {_percent(row['within_one'])} "
                     f"| {_percent(few['measures'][key]['accuracy'])}{ties} "
                     f"| {reference or '–'} |")
    lines += [
        "",
        interpretation(result),
        "",
        "*Student side*: the query layer predicts each layer of the other copy (the "
        "direction of `pkd analyze --mapping optimal`, where a student layer is mapped "
        "onto teacher layers). *Teacher side*: the query layer is predicted from each "
        "layer of the other copy (linear regression in Kornblith et al. fits one "
        "network's layer from the other's; its 45.4% is set beside both sides). CKA is "
        "symmetric. *Within one layer*: the "
        "share of queries whose choice is the corresponding layer or a neighbour.",
        "",
        "![accuracy per measure](layer_matching.png)",
    ]
    for setting in (main, few):
        lines += [
            "",
            f"## Per layer ({setting['n_rows']} rows)",
            "",
            "| measure | " + " | ".join(str(layer) for layer in range(n_layers)) + " |",
            "|---|" + "---|" * n_layers,
        ]
        lines += [f"| `{key}` | " + " | ".join(_percent(v) for v in row["per_layer"]) + " |"
                  for key, row in setting["measures"].items()]
    identity = {key: row["identity"] for key, row in main["measures"].items()}
    lines += [
        "",
        "![which layer each measure picked](choices.png)",
        "",
        "## How it was made",
        "",
        f"- Network: {n_layers} blocks `relu(LayerNorm(h W + b))` of width {width}, a linear "
        f"classifier; Adam lr {s['lr']}, batch {s['batch_size']}, {s['epochs']} epochs, "
        "torch on the CPU with one thread, deterministic algorithms.",
        f"- Data: scikit-learn digits, {s['n_train']} training / {s['n_test']} held-out "
        f"images (one split, seed {s['seed']}); the measures see the {main['n_rows']} "
        f"held-out rows, or a fixed random subset of {few['n_rows']} of them.",
        f"- Held-out 1 − R²: {s['folds']} folds of the rows. RBF CKA bandwidths: "
        + ", ".join(f"{b:g}" for b in s["bandwidths"]) + " × the median pairwise distance "
        "(each layer its own).",
        f"- Ties: values within {s['tie_tolerance']:g} of the best count as tied.",
        "- Each copy against itself (identity check, all rows, mean over the copies): "
        + ", ".join(f"`{k}` {_percent(v)}%" for k, v in identity.items()) + ".",
        f"- Wall time: {result['timing_s']['total']:.1f} s (training "
        f"{result['timing_s']['train']:.1f} s; measures "
        f"{result['timing_s']['measures_all_rows']:.1f} s with all rows, "
        f"{result['timing_s']['measures_few_rows']:.1f} s with few rows).",
        f"- Rerun: `{rerun_command(result, out)}` (`--quick` for a smoke run).",
        "",
    ]
    return "\n".join(lines)


def _colours(keys) -> dict[str, str]:
    return {key: f"C{k}" for k, key in enumerate(keys)}


def build_figure(result: dict):
    """Accuracy per measure in both settings (left), per layer in each (right)."""
    from matplotlib.figure import Figure

    main, few = result["results"]["all_rows"], result["results"]["few_rows"]
    keys = list(main["measures"])
    colours = _colours(keys)
    n_layers, width = result["copies"]["n_layers"], result["copies"]["width"]
    fig = Figure(figsize=(16.0, 5.6), layout="constrained")
    axes = fig.subplot_mosaic([["bars", "all_rows", "few_rows"]],
                              width_ratios=[1.5, 1.0, 1.0])
    ax = axes["bars"]
    x = np.arange(len(keys))
    for offset, setting, hatch in ((-0.2, main, None), (0.2, few, "//")):
        values = [100.0 * setting["measures"][k]["accuracy"] for k in keys]
        ax.bar(x + offset, values, width=0.4, color=[colours[k] for k in keys],
               alpha=0.9 if hatch is None else 0.45, hatch=hatch, edgecolor="black",
               linewidth=0.5)
        for xi, v in zip(x + offset, values, strict=True):
            ax.annotate(f"{v:.0f}", (xi, v), xytext=(0, 2), textcoords="offset points",
                        ha="center", va="bottom", fontsize="x-small")
    ax.axhline(100.0 / n_layers, color="0.3", linestyle=":", linewidth=1.0)
    ax.set_xticks(x, labels=[k.replace("-", "-\n", 1) for k in keys], fontsize="small")
    ax.set_ylim(0, 110)
    ax.set_ylabel("queries whose most similar layer is the corresponding one (%)")
    n_copies = len(result["copies"]["test_accuracy"])
    ax.set_title(f"Layer matching accuracy per measure ({n_copies} copies, {n_layers} blocks "
                 f"of width {width})", fontsize="medium")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(facecolor="0.5", edgecolor="black", label=f"{main['n_rows']} rows"),
                       Patch(facecolor="0.85", edgecolor="black", hatch="//",
                             label=f"{few['n_rows']} rows"),
                       Line2D([], [], color="0.3", linestyle=":",
                              label=f"chance (1/{n_layers})")],
              fontsize="small", loc="upper left")
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    layers = np.arange(n_layers)
    for name, setting in (("all_rows", main), ("few_rows", few)):
        ax = axes[name]
        for key in keys:
            ax.plot(layers, 100.0 * np.asarray(setting["measures"][key]["per_layer"]), "o-",
                    color=colours[key], label=key, markersize=3, linewidth=1.2)
        ax.set_xticks(layers)
        ax.set_ylim(-3, 103)
        ax.set_xlabel("query layer")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"Per layer, {setting['n_rows']} rows", fontsize="medium")
        ax.grid(True, alpha=0.3)
    axes["all_rows"].legend(fontsize="x-small", loc="upper center", ncols=2)
    return fig


def build_choices_figure(result: dict):
    """One panel per measure and setting: share of queries at layer l picking layer m."""
    from matplotlib.figure import Figure

    settings_rows = [result["results"]["all_rows"], result["results"]["few_rows"]]
    keys = list(settings_rows[0]["measures"])
    n_layers = result["copies"]["n_layers"]
    fig = Figure(figsize=(2.3 * len(keys) + 1.0, 5.4), layout="constrained")
    axes = fig.subplots(2, len(keys), squeeze=False, sharex=True, sharey=True)
    image = None
    for r, setting in enumerate(settings_rows):
        for c, key in enumerate(keys):
            ax = axes[r, c]
            image = ax.imshow(np.asarray(setting["measures"][key]["chosen"]), vmin=0, vmax=1,
                              cmap="viridis", origin="upper")
            ax.set_xticks(np.arange(n_layers))
            ax.set_yticks(np.arange(n_layers))
            ax.tick_params(labelsize="xx-small")
            if r == 0:
                ax.set_title(key, fontsize="small")
            if c == 0:
                ax.set_ylabel(f"{setting['n_rows']} rows\nquery layer", fontsize="small")
            if r == 1:
                ax.set_xlabel("chosen layer", fontsize="small")
    fig.colorbar(image, ax=axes, shrink=0.8, label="share of queries")
    fig.suptitle("Which layer of the other copy each measure picked (diagonal = right)",
                 fontsize="medium")
    return fig


def print_table(result: dict) -> None:
    main, few = result["results"]["all_rows"], result["results"]["few_rows"]
    print(f"\n{'measure':<18}{main['n_rows']:>6} rows{few['n_rows']:>6} rows")
    for key, row in main["measures"].items():
        print(f"{key:<18}{_percent(row['accuracy']):>10}"
              f"{_percent(few['measures'][key]['accuracy']):>11}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="2 copies of a 4-block net, 2 epochs (a smoke run; writes to "
                             "layer_matching-quick/)")
    parser.add_argument("--copies", type=int, default=None,
                        help="number of copies (default 10; 2 with --quick)")
    parser.add_argument("--blocks", type=int, default=None,
                        help="blocks per network (default 10; 4 with --quick)")
    parser.add_argument("--width", type=int, default=None,
                        help="width of every block (default 64; 16 with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="base seed")
    parser.add_argument("--out", default=None,
                        help="output directory (default analysis/results/layer_matching)")
    parser.add_argument("--cache", default=None,
                        help="file caching the trained copies' hidden states (default: in "
                             "the system's temporary directory, keyed by the settings)")
    parser.add_argument("--no-cache", action="store_true", help="always train the copies")
    parser.add_argument("--from-json", default=None,
                        help="rewrite the table and figures from a layer_matching.json "
                             "written earlier (no training, no measures)")
    args = parser.parse_args(argv)
    changes = {"seed": args.seed}
    if args.copies is not None:
        if args.copies < 2:
            parser.error("--copies must be >= 2 (the benchmark compares pairs of copies)")
        changes["n_copies"] = args.copies
    for name, key, least in (("blocks", "n_blocks", 2), ("width", "width", 2)):
        value = getattr(args, name)
        if value is not None:
            if value < least:
                parser.error(f"--{name} must be >= {least}")
            changes[key] = value
    settings = Settings.quick_run(**changes) if args.quick else Settings(**changes)
    out = output_dir(NAME, args.out, args.quick)
    if args.no_cache:
        cache = None
    elif args.cache is not None:
        cache = Path(args.cache)
    else:
        cache = Path(tempfile.gettempdir()) / f"pkd-{NAME}-{settings.training_key()}.npz"
    if args.from_json is not None:
        result = json.loads(Path(args.from_json).read_text(encoding="utf-8"))
    else:
        result = _json_safe(run(settings, cache))
    from pkd import plots

    written = [write_json(out / "layer_matching.json", result),
               write_text(out / "layer_matching.md", markdown(result, out)),
               plots.save_figure(build_figure(result), out / "layer_matching.png"),
               plots.save_figure(build_choices_figure(result), out / "choices.png")]
    print_table(result)
    print(f"\n{interpretation(result)}\n")
    print("wrote:\n" + "\n".join(f"  {p}" for p in written))
    return result


if __name__ == "__main__":
    main()
