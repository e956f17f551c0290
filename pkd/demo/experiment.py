"""The demo experiment: one teacher, a student trained five ways over several seeds.

Every student run of a seed starts from the same initial weights (and, for
the PKD runs, the same Xavier projection), sees the same minibatches in the
same order, and is trained for the same number of Adam steps with the same
learning rate. Only the loss differs:

- ``ce``: cross-entropy only (α = 0);
- ``kd``: logit KD, ``(1 − α)·CE + α·τ²·KL`` (Hinton et al.);
- ``pkd_skip``, ``pkd_last``, ``pkd_optimal``: logit KD plus PKD's hidden-state
  loss through a shared 64→128 projection trained jointly with the student,
  with the PKD-Skip, PKD-Last or "optimal" layer mapping. The optimal mapping
  is chosen per seed by :class:`~pkd.alignment.AlignmentStats` on the trained
  teacher and that seed's CE-only student (relative best-reachable loss,
  1 − R², as the cost); the PKD run itself starts from the common init.

Test accuracy is measured once, after the last step: nothing is selected on
the test set.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import mapping as mappings
from ..alignment import AlignmentStats
from ..distillation import ProgressiveDistillation, xavier_uniform
from ..objective import PKDObjective, logit_loss_and_grad
from .data import Digits
from .mlp import Adam, ResidualMLP

METHODS = ("ce", "kd", "pkd_skip", "pkd_last", "pkd_optimal")
LABELS = {
    "ce": "CE only",
    "kd": "logit KD",
    "pkd_skip": "PKD-Skip",
    "pkd_last": "PKD-Last",
    "pkd_optimal": "PKD-optimal",
}


@dataclass(frozen=True)
class Settings:
    """Everything that defines a demo run (written to summary.json).

    The loss hyperparameters are fixed in advance from the paper, not tuned
    on this data: α = 0.7 and τ = 10 are PKD's presets (Sun et al. 2019).
    The hidden loss is PKD's own normalized ("patient") loss rather than the
    plain MSE: the teacher's residual stream grows several-fold in scale
    from its first block to its last, so an MSE would weigh the deep pairs
    of PKD-Last far more than the shallow pairs of PKD-Skip and β would have
    to be chosen per mapping; the normalized loss lies in [0, 4] per pair
    whatever the layer's scale. β = 1 (the paper's β, which also averages
    over the d_t = 128 hidden dimensions, would be 128 here, inside the
    paper's range 10 – 1000) makes the hidden term start at the size of the
    cross-entropy (≈ 2).
    """

    teacher_width: int = 128
    teacher_blocks: int = 12
    student_width: int = 64
    student_blocks: int = 4
    batch_size: int = 64
    lr: float = 1e-3
    teacher_steps: int = 3000
    student_steps: int = 1500
    n_seeds: int = 5
    alpha: float = 0.7
    temperature: float = 10.0
    hidden_weight: float = 1.0
    normalize: bool = True
    test_fraction: float = 0.2
    dtype: str = "float64"
    history_window: int = 25

    @classmethod
    def full(cls) -> Settings:
        return cls()

    @classmethod
    def quick(cls) -> Settings:
        """Same code path, fewer steps and seeds (for tests and a first look)."""
        return cls(teacher_steps=300, student_steps=150, n_seeds=2, history_window=10)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class StudentRun:
    """One trained student.

    Attributes
    ----------
    method : str
        One of :data:`METHODS`.
    seed_index : int
    accuracy : float
        Test accuracy in percent.
    model : ResidualMLP
    mapping : list of (int, int) or None
        The PKD layer mapping (None for CE and KD).
    history : (steps, n_pairs) float64 array or None
        The unweighted per-pair hidden loss at every step (PKD runs only).
    projection : (d_s, d_t) array or None
        The trained projection (PKD runs only).
    initial_projection : (d_s, d_t) array or None
        Its Xavier initialisation.
    seconds : float
    """

    method: str
    seed_index: int
    accuracy: float
    model: ResidualMLP
    mapping: list | None = None
    history: np.ndarray | None = None
    projection: np.ndarray | None = None
    initial_projection: np.ndarray | None = None
    seconds: float = 0.0


@dataclass
class SeedOutcome:
    """Everything about one student seed: the runs and the alignment analysis."""

    seed_index: int
    runs: dict = field(default_factory=dict)
    relative_min_mse: np.ndarray | None = None
    cka: np.ndarray | None = None
    optimal_mapping: list | None = None


def accuracy(model: ResidualMLP, x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of ``model`` on ``(x, y)``, in percent."""
    return float(100.0 * np.mean(model.predict(x) == y))


def batch_schedule(n_rows: int, batch_size: int, steps: int, rng: np.random.Generator):
    """Row indices of every minibatch, epoch by epoch without replacement.

    Returns
    -------
    (steps, batch_size) int64 array
    """
    per_epoch = n_rows // batch_size  # drop the ragged last batch: equal-size batches
    epochs = -(-steps // per_epoch)
    order = np.concatenate([rng.permutation(n_rows)[:per_epoch * batch_size]
                            for _ in range(epochs)])
    return order[:steps * batch_size].reshape(steps, batch_size)


def train_teacher(data: Digits, settings: Settings, seed, progress=None) -> ResidualMLP:
    """Train the 12-block teacher with cross-entropy and Adam.

    Parameters
    ----------
    data : Digits
    settings : Settings
    seed : int or numpy.random.SeedSequence
        Seeds the initialisation and the minibatch order.
    progress : tqdm bar, optional
        Advanced by one per step.
    """
    init_seed, batch_seed = np.random.SeedSequence(seed).spawn(2) if not isinstance(
        seed, np.random.SeedSequence) else seed.spawn(2)
    model = ResidualMLP(data.n_features, settings.teacher_width, settings.teacher_blocks,
                        data.n_classes, seed=np.random.default_rng(init_seed),
                        dtype=settings.dtype)
    optimiser = Adam(model.params, lr=settings.lr)
    schedule = batch_schedule(len(data.y_train), settings.batch_size, settings.teacher_steps,
                              np.random.default_rng(batch_seed))
    for rows in schedule:
        logits, _, cache = model.forward(data.x_train[rows])
        labels = data.y_train[rows]
        # alpha = 0: plain cross-entropy (the teacher logits are then unused).
        _, _, grad = logit_loss_and_grad(logits, logits, labels, alpha=0.0,
                                         temperature=1.0)
        optimiser.step(model.backward(cache, grad))
        if progress is not None:
            progress.update()
    return model


@dataclass
class TeacherOutputs:
    """The frozen teacher's logits and block outputs on the whole training set."""

    logits: np.ndarray       # (N_train, C)
    hidden: list             # n_blocks arrays (N_train, W_t)

    @classmethod
    def of(cls, teacher: ResidualMLP, x: np.ndarray) -> TeacherOutputs:
        logits, hidden, _ = teacher.forward(x)
        return cls(logits=logits, hidden=hidden)


def _objective(method: str, settings: Settings, layer_mapping, projection):
    """The PKDObjective of a method (None for CE-only, which uses α = 0 directly)."""
    if method == "ce":
        return None
    if method == "kd":
        return PKDObjective(alpha=settings.alpha, temperature=settings.temperature)
    hidden = ProgressiveDistillation(layer_mapping, hidden_weight=settings.hidden_weight,
                                     normalize=settings.normalize, projection=projection)
    return PKDObjective(alpha=settings.alpha, temperature=settings.temperature, hidden=hidden)


def train_student(method: str, data: Digits, teacher: TeacherOutputs, init: ResidualMLP,
                  initial_projection: np.ndarray, schedule: np.ndarray, settings: Settings,
                  *, seed_index: int = 0, layer_mapping=None, progress=None) -> StudentRun:
    """Train one student from ``init`` with the loss of ``method``.

    Parameters
    ----------
    method : str
        One of :data:`METHODS`.
    data : Digits
    teacher : TeacherOutputs
        The teacher's outputs on ``data.x_train`` (rows indexed by ``schedule``).
    init : ResidualMLP
        The common initial student (copied, not modified).
    initial_projection : (d_s, d_t) array
        The common Xavier projection (copied, not modified; PKD methods only).
    schedule : (steps, batch) int array
        The minibatches (see :func:`batch_schedule`).
    settings : Settings
    layer_mapping : list of (int, int), optional
        Required for the PKD methods.
    progress : tqdm bar, optional
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    pkd = method.startswith("pkd")
    if pkd and layer_mapping is None:
        raise ValueError(f"method {method!r} needs a layer_mapping")
    start = time.perf_counter()
    model = init.copy()
    params = dict(model.params)
    projection = None
    if pkd:
        projection = initial_projection.copy()
        params["P"] = projection  # the same array the objective reads: updated in place
    optimiser = Adam(params, lr=settings.lr)
    objective = _objective(method, settings, layer_mapping, projection)
    used_teacher = sorted({t for _, t in layer_mapping}) if pkd else []
    history = np.empty((len(schedule), len(layer_mapping))) if pkd else None

    for step, rows in enumerate(schedule):
        logits, student_hidden, cache = model.forward(data.x_train[rows])
        labels, teacher_logits = data.y_train[rows], teacher.logits[rows]
        grad_hidden = None
        extra = {}
        if method == "ce":
            _, _, grad_logits = logit_loss_and_grad(logits, teacher_logits, labels,
                                                    alpha=0.0, temperature=1.0)
        elif method == "kd":
            grad_logits = objective.loss_and_grad(logits, teacher_logits, labels).grad_logits
        else:
            teacher_hidden = [teacher.hidden[t][rows] if t in used_teacher else None
                              for t in range(len(teacher.hidden))]
            result = objective.loss_and_grad(logits, teacher_logits, labels, student_hidden,
                                             teacher_hidden)
            grad_logits, grad_hidden = result.grad_logits, result.grad_student
            extra["P"] = result.grad_projection
            history[step] = result.layer_losses
        grads = model.backward(cache, grad_logits, grad_hidden)
        grads.update(extra)
        optimiser.step(grads)
        if progress is not None:
            progress.update()

    return StudentRun(
        method=method, seed_index=seed_index,
        accuracy=accuracy(model, data.x_test, data.y_test), model=model,
        mapping=None if not pkd else [tuple(map(int, p)) for p in layer_mapping],
        history=history, projection=projection,
        initial_projection=initial_projection if pkd else None,
        seconds=time.perf_counter() - start,
    )


def alignment_stats(student: ResidualMLP, teacher: TeacherOutputs,
                    x: np.ndarray) -> AlignmentStats:
    """AlignmentStats of every (student block, teacher block) pair on the rows ``x``."""
    _, student_hidden, _ = student.forward(x)
    return AlignmentStats.from_arrays(student_hidden, teacher.hidden)


def choose_optimal(stats: AlignmentStats, n_student: int) -> list:
    """The optimal mapping of student layers ``0 .. n_student − 2`` by relative min-MSE.

    Like PKD-Skip and PKD-Last, the last student layer is left to the logit
    loss, so the three PKD runs differ only in the teacher layers they choose.
    """
    cost = stats.relative_min_mse()
    return mappings.optimal(cost, student_layers=list(range(n_student - 1)))


def seed_material(seed: np.random.SeedSequence, data: Digits, settings: Settings):
    """The initial student, Xavier projection and minibatches every run of a seed shares.

    Spawns the first three children of ``seed`` (pass a fresh copy to derive
    them again without disturbing ``seed``).
    """
    init_seed, projection_seed, batch_seed = seed.spawn(3)
    init = ResidualMLP(data.n_features, settings.student_width, settings.student_blocks,
                       data.n_classes, seed=np.random.default_rng(init_seed),
                       dtype=settings.dtype)
    projection = xavier_uniform(settings.student_width, settings.teacher_width,
                                seed=np.random.default_rng(projection_seed),
                                dtype=settings.dtype)
    schedule = batch_schedule(len(data.y_train), settings.batch_size, settings.student_steps,
                              np.random.default_rng(batch_seed))
    return init, projection, schedule


def run_seed(seed_index: int, seed: np.random.SeedSequence, data: Digits,
             teacher: TeacherOutputs, settings: Settings, progress=None) -> SeedOutcome:
    """The five student runs of one seed (CE first: the optimal mapping needs it)."""
    init, projection, schedule = seed_material(seed, data, settings)
    outcome = SeedOutcome(seed_index=seed_index)
    common = {"seed_index": seed_index, "progress": progress}

    def run(method, layer_mapping=None):
        if progress is not None:
            progress.set_description(f"student seed {seed_index}: {LABELS[method]}")
        outcome.runs[method] = train_student(method, data, teacher, init, projection,
                                             schedule, settings, layer_mapping=layer_mapping,
                                             **common)

    run("ce")
    stats = alignment_stats(outcome.runs["ce"].model, teacher, data.x_train)
    outcome.relative_min_mse = stats.relative_min_mse()
    outcome.cka = stats.cka()
    outcome.optimal_mapping = choose_optimal(stats, settings.student_blocks)
    run("kd")
    run("pkd_skip", mappings.skip(settings.student_blocks, settings.teacher_blocks))
    run("pkd_last", mappings.last(settings.student_blocks, settings.teacher_blocks))
    run("pkd_optimal", outcome.optimal_mapping)
    return outcome
