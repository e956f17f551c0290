"""The demo experiment: distillation with few labels, a student trained five ways.

The setting in which distillation is used in practice: the teacher (12
residual blocks of width 128) learns from every training label; the student
(4 blocks of width 64) sees the labels of only a small stratified part of the
training set, and the teacher's outputs (logits and hidden states) on every
training input, the transfer set. Each step draws a minibatch of labelled
rows and a minibatch of transfer rows. Only the loss differs between the
methods:

- ``ce``: cross-entropy on the labelled rows only (all a student without a
  teacher can do);
- ``kd``: logit KD, ``(1 − α)·CE(labelled) + α·τ²·KL(transfer)`` (Hinton et al.);
- ``pkd_skip``, ``pkd_last``, ``pkd_optimal``: logit KD plus PKD's hidden-state
  loss on the transfer rows, through a shared 64→128 projection trained
  jointly with the student, with the PKD-Skip, PKD-Last or "optimal" layer
  mapping. The optimal mapping is chosen per seed, by the measure named in
  :data:`MAPPING_MEASURE`, on the trained teacher and that seed's CE-only
  student; the PKD run itself starts from the common init.

Every run of a seed starts from the same initial weights (and, for the PKD
runs, the same Xavier projection), sees the same labelled subset and the
same minibatches in the same order, and takes the same number of Adam steps
with the same learning rate. Accuracy is measured once, after the last step,
on the evaluation set the caller names: the validation set when settings are
chosen (:mod:`pkd.demo.selection`), the test set in the final runs.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import mapping as mappings
from ..alignment import AlignmentStats
from ..cka import rbf_cka_matrix
from ..distillation import ProgressiveDistillation, xavier_uniform
from ..objective import logit_loss_and_grad
from .data import Digits, labelled_subset
from .mlp import Adam, ResidualMLP

METHODS = ("ce", "kd", "pkd_skip", "pkd_last", "pkd_optimal")
PKD_METHODS = ("pkd_skip", "pkd_last", "pkd_optimal")
LABELS = {
    "ce": "CE only",
    "kd": "logit KD",
    "pkd_skip": "PKD-Skip",
    "pkd_last": "PKD-Last",
    "pkd_optimal": "PKD-optimal",
}

# The layer-similarity measure that picks PKD-optimal's mapping: the one the
# layer-matching benchmark recommends (RBF CKA with σ = 0.2 × the median
# distance, a similarity: higher is better). Change it here only; "cka" (linear
# CKA, a similarity) and "relative" (1 − R², a cost) are the other choices.
MAPPING_MEASURE = "rbf-cka"
# σ of the RBF kernel as a fraction of each layer's median pairwise distance.
RBF_BANDWIDTH = 0.2
MEASURE_TEXT = {
    "rbf-cka": f"RBF CKA with σ = {RBF_BANDWIDTH} × the median pairwise distance "
               "(a similarity; the mapping maximises its sum)",
    "cka": "linear CKA (a similarity; the mapping maximises its sum)",
    "relative": "relative best-reachable loss 1 − R² (a cost; the mapping minimises its sum)",
}
# The measures to maximise (the others are costs, minimised).
SIMILARITIES = ("rbf-cka", "cka")
# Why MAPPING_MEASURE: one sentence for the report, with the evidence's path.
MEASURE_REASON = (
    "it found the corresponding layer of another trained copy of a network most often in the "
    "layer-matching benchmark (54.3% of the queries against 29.3% for linear CKA, with "
    "in-sample 1 − R² at chance; "
    "[analysis/results/layer_matching/layer_matching.md](../layer_matching/layer_matching.md))")
# The measure PKD-optimal's mapping was chosen by when Settings.full() was
# selected (analysis/results/demo/selection/): update it when the selection is rerun.
SETTINGS_SELECTED_WITH = "cka"


@dataclass(frozen=True)
class Settings:
    """Everything that defines a demo run (written to summary.json).

    The architecture, the teacher's training, the batch sizes and the split
    are fixed by design. The student's learning rate and steps, the labelled
    fraction, α, τ and the hidden weight λ were chosen on the validation
    split by :func:`pkd.demo.selection.select` (its record is in
    ``analysis/results/demo/selection/``), before any test accuracy was
    computed, and are the same for every method. The hidden loss is PKD's
    normalized ("patient") loss: it lies in [0, 4] per pair whatever the
    scale of the layer, so one λ serves every mapping (the paper's β is
    λ·d_t).

    ``curve_fractions`` and ``curve_seeds`` define the accuracy-against-
    labelled-fraction curve of CE, KD and ``curve_method`` (the PKD variant
    with the best validation accuracy in the selection); three seeds per
    fraction keep ``pkd demo`` within its time budget on two cores.
    """

    teacher_width: int = 128
    teacher_blocks: int = 12
    student_width: int = 64
    student_blocks: int = 4
    batch_size: int = 64
    labelled_batch_size: int = 32
    teacher_lr: float = 1e-3
    teacher_steps: int = 3000
    lr: float = 1e-3
    student_steps: int = 500
    n_seeds: int = 5
    labelled_fraction: float = 0.1
    alpha: float = 0.7
    temperature: float = 10.0
    hidden_weight: float = 10.0
    normalize: bool = True
    test_fraction: float = 0.2
    val_fraction: float = 0.2
    curve_fractions: tuple = (0.02, 0.05, 0.1, 0.25, 1.0)
    curve_seeds: int = 3
    curve_method: str = "pkd_optimal"
    dtype: str = "float64"
    history_window: int = 25

    @classmethod
    def full(cls) -> Settings:
        return cls()

    @classmethod
    def quick(cls) -> Settings:
        """Same code path, far fewer steps and seeds: a smoke run, its numbers mean nothing."""
        return cls(teacher_steps=120, student_steps=40, n_seeds=2, curve_fractions=(0.05, 0.1),
                   curve_seeds=1, history_window=5)

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
        Accuracy in percent on the evaluation set, after the last step.
    model : ResidualMLP
    mapping : list of (int, int) or None
        The PKD layer mapping (None for CE and KD).
    history : (steps, n_pairs) float64 array or None
        The unweighted per-pair hidden loss at every step (PKD runs only).
    projection : (d_s, d_t) array or None
        The trained projection (PKD runs only).
    initial_projection : (d_s, d_t) array or None
        Its Xavier initialisation.
    checkpoint_scores : dict of int to (float, float)
        ``(accuracy, nll)`` on the evaluation set after each requested step.
    nll : float
        Mean cross-entropy (negative log-likelihood, nats) on the evaluation
        set after the last step: a finer tie-breaker than accuracy.
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
    checkpoint_scores: dict = field(default_factory=dict)
    nll: float = float("nan")
    seconds: float = 0.0


@dataclass
class SeedOutcome:
    """Everything about one student seed at one labelled fraction."""

    seed_index: int
    fraction: float
    n_labelled: int
    runs: dict = field(default_factory=dict)
    relative_min_mse: np.ndarray | None = None
    cka: np.ndarray | None = None
    rbf_cka: np.ndarray | None = None
    optimal_mapping: list | None = None


@dataclass
class SeedMaterial:
    """What every run of a seed shares: init, projection, labelled rows and minibatches.

    Attributes
    ----------
    init : ResidualMLP
    projection : (d_s, d_t) array
    labelled : (n_labelled,) int64 array
        Training rows whose labels the student sees.
    labelled_batches : (steps, b_l) int64 array
        Training rows (all in ``labelled``) of every labelled minibatch.
    transfer_batches : (steps, b) int64 array
        Training rows of every transfer minibatch (any training row).
    """

    init: ResidualMLP
    projection: np.ndarray
    labelled: np.ndarray
    labelled_batches: np.ndarray
    transfer_batches: np.ndarray


def accuracy(model: ResidualMLP, x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of ``model`` on ``(x, y)``, in percent."""
    return float(100.0 * np.mean(model.predict(x) == y))


def mean_nll(model: ResidualMLP, x: np.ndarray, y: np.ndarray) -> float:
    """Mean cross-entropy of ``model`` on ``(x, y)`` (nats)."""
    logits = model.forward(x)[0]
    ce, _, _ = logit_loss_and_grad(logits, logits, y, alpha=0.0, temperature=1.0)
    return ce


def batch_schedule(n_rows: int, batch_size: int, steps: int, rng: np.random.Generator):
    """Row indices of every minibatch, epoch by epoch without replacement.

    A batch size above ``n_rows`` is cut to ``n_rows`` (every batch is then
    the whole set, reshuffled).

    Returns
    -------
    (steps, min(batch_size, n_rows)) int64 array
    """
    batch_size = min(batch_size, n_rows)
    per_epoch = n_rows // batch_size  # drop the ragged last batch: equal-size batches
    epochs = -(-steps // per_epoch)
    order = np.concatenate([rng.permutation(n_rows)[:per_epoch * batch_size]
                            for _ in range(epochs)])
    return order[:steps * batch_size].reshape(steps, batch_size)


def train_teacher(data: Digits, settings: Settings, seed, progress=None) -> ResidualMLP:
    """Train the 12-block teacher with cross-entropy on every training label.

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
    optimiser = Adam(model.params, lr=settings.teacher_lr)
    schedule = batch_schedule(len(data.y_train), settings.batch_size, settings.teacher_steps,
                              np.random.default_rng(batch_seed))
    for rows in schedule:
        logits, _, cache = model.forward(data.x_train[rows])
        # alpha = 0: plain cross-entropy (the teacher logits are then unused).
        _, _, grad = logit_loss_and_grad(logits, logits, data.y_train[rows], alpha=0.0,
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


def _padded(grad: np.ndarray | None, n_before: int) -> np.ndarray | None:
    """``grad`` (transfer rows) below ``n_before`` zero rows (the labelled rows of the batch)."""
    if grad is None:
        return None
    full = np.zeros((n_before + grad.shape[0], grad.shape[1]), dtype=grad.dtype)
    full[n_before:] = grad
    return full


def train_student(method: str, data: Digits, teacher: TeacherOutputs, material: SeedMaterial,
                  settings: Settings, evaluation: tuple, *, seed_index: int = 0,
                  layer_mapping=None, checkpoints=(), progress=None) -> StudentRun:
    """Train one student from the seed's common init with the loss of ``method``.

    Parameters
    ----------
    method : str
        One of :data:`METHODS`.
    data : Digits
        Only its training rows are used (inputs; labels of ``material.labelled``).
    teacher : TeacherOutputs
        The teacher's outputs on ``data.x_train``.
    material : SeedMaterial
        Init, projection, labelled rows and minibatches (copied, not modified).
    settings : Settings
    evaluation : (x (N, d_in) array, y (N,) int array)
        Where accuracy is measured (validation or test).
    layer_mapping : list of (int, int), optional
        Required for the PKD methods.
    checkpoints : iterable of int
        Steps (1-based) after which accuracy and NLL on ``evaluation`` are also recorded.
    progress : tqdm bar, optional
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    pkd = method.startswith("pkd")
    if pkd and layer_mapping is None:
        raise ValueError(f"method {method!r} needs a layer_mapping")
    start = time.perf_counter()
    model = material.init.copy()
    params = dict(model.params)
    projection = hidden_loss = None
    if pkd:
        projection = material.projection.copy()
        params["P"] = projection  # the same array the hidden loss reads: updated in place
        hidden_loss = ProgressiveDistillation(layer_mapping, hidden_weight=settings.hidden_weight,
                                              normalize=settings.normalize,
                                              projection=projection)
    optimiser = Adam(params, lr=settings.lr)
    used_teacher = sorted({t for _, t in layer_mapping}) if pkd else []
    history = np.empty((len(material.labelled_batches), len(layer_mapping))) if pkd else None
    checkpoints = {int(c) for c in checkpoints}
    reached = {}
    alpha, temperature = settings.alpha, settings.temperature

    for step, (labelled_rows, transfer_rows) in enumerate(
            zip(material.labelled_batches, material.transfer_batches, strict=True)):
        labels = data.y_train[labelled_rows]
        if method == "ce":
            logits, _, cache = model.forward(data.x_train[labelled_rows])
            _, _, grad_logits = logit_loss_and_grad(logits, logits, labels, alpha=0.0,
                                                    temperature=1.0)
            grads = model.backward(cache, grad_logits)
        else:
            n_l = len(labelled_rows)
            rows = np.concatenate([labelled_rows, transfer_rows])
            logits, student_hidden, cache = model.forward(data.x_train[rows])
            grad_logits = np.empty_like(logits)
            _, _, grad_ce = logit_loss_and_grad(logits[:n_l], logits[:n_l], labels, alpha=0.0,
                                                temperature=1.0)
            grad_logits[:n_l] = (1.0 - alpha) * grad_ce
            teacher_logits = teacher.logits[transfer_rows]
            # alpha = 1: τ²·KL only; the transfer rows' labels are unseen, and the labels
            # argument (the teacher's own argmax) gets weight 0.
            _, _, grad_kd = logit_loss_and_grad(logits[n_l:], teacher_logits,
                                                teacher_logits.argmax(axis=1), alpha=1.0,
                                                temperature=temperature)
            grad_logits[n_l:] = alpha * grad_kd
            grad_hidden = None
            if pkd:
                teacher_hidden = [teacher.hidden[t][transfer_rows] if t in used_teacher
                                  else None for t in range(len(teacher.hidden))]
                result = hidden_loss.loss_and_grad([h[n_l:] for h in student_hidden],
                                                   teacher_hidden)
                grad_hidden = [_padded(g, n_l) for g in result.grad_student]
                history[step] = result.layer_losses
            grads = model.backward(cache, grad_logits, grad_hidden)
            if pkd:
                grads["P"] = result.grad_projection
        optimiser.step(grads)
        if step + 1 in checkpoints:
            reached[step + 1] = (accuracy(model, *evaluation), mean_nll(model, *evaluation))
        if progress is not None:
            progress.update()

    return StudentRun(
        method=method, seed_index=seed_index, accuracy=accuracy(model, *evaluation),
        model=model, mapping=None if not pkd else [tuple(map(int, p)) for p in layer_mapping],
        history=history, projection=projection,
        initial_projection=material.projection if pkd else None,
        checkpoint_scores=reached, nll=mean_nll(model, *evaluation),
        seconds=time.perf_counter() - start,
    )


def alignment_matrices(student: ResidualMLP, teacher: TeacherOutputs,
                       x: np.ndarray) -> dict[str, np.ndarray]:
    """Every mapping measure of every (student block, teacher block) pair on the rows ``x``.

    Returns
    -------
    dict
        ``{"relative": 1 − R², "cka": linear CKA, "rbf-cka": RBF CKA}``, each
        of shape ``(n_student_blocks, n_teacher_blocks)``, float64; the RBF
        bandwidth is :data:`RBF_BANDWIDTH`.
    """
    _, student_hidden, _ = student.forward(x)
    stats = AlignmentStats.from_arrays(student_hidden, teacher.hidden)
    return {"relative": stats.relative_min_mse(), "cka": stats.cka(),
            "rbf-cka": rbf_cka_matrix(student_hidden, teacher.hidden,
                                      bandwidth=RBF_BANDWIDTH)}


def choose_optimal(matrices: dict, n_student: int, measure: str = MAPPING_MEASURE) -> list:
    """The optimal mapping of student layers ``0 .. n_student − 2`` by ``measure``.

    Like PKD-Skip and PKD-Last, the last student layer is left to the logit
    loss, so the three PKD runs differ only in the teacher layers they choose.
    A similarity (CKA) is maximised, a cost (1 − R²) minimised.

    Parameters
    ----------
    matrices : dict
        From :func:`alignment_matrices`: measure name -> ``(n_student, n_teacher)``.
    n_student : int
    measure : str
        A key of :data:`MEASURE_TEXT`.
    """
    if measure not in MEASURE_TEXT:
        raise ValueError(f"measure must be one of {tuple(MEASURE_TEXT)}, got {measure!r}")
    rows = list(range(n_student - 1))
    return mappings.optimal(matrices[measure], student_layers=rows,
                            maximize=measure in SIMILARITIES)


def seed_material(seed: np.random.SeedSequence, data: Digits, settings: Settings,
                  fraction: float) -> SeedMaterial:
    """The init, projection, labelled rows and minibatches every run of a seed shares.

    The first five children of ``seed``, derived from a copy (``seed`` is not
    advanced: the same seed gives the same material every time). The labelled rows of one seed are
    nested across fractions (:func:`~pkd.demo.data.labelled_subset`); the
    transfer minibatches do not depend on the fraction.
    """
    # A fresh copy: spawning advances the sequence, and a seed's runs at several
    # fractions must share the same children.
    fresh = np.random.SeedSequence(seed.entropy, spawn_key=seed.spawn_key,
                                   pool_size=seed.pool_size)
    init_seed, projection_seed, label_seed, labelled_batch_seed, transfer_seed = fresh.spawn(5)
    init = ResidualMLP(data.n_features, settings.student_width, settings.student_blocks,
                       data.n_classes, seed=np.random.default_rng(init_seed),
                       dtype=settings.dtype)
    projection = xavier_uniform(settings.student_width, settings.teacher_width,
                                seed=np.random.default_rng(projection_seed),
                                dtype=settings.dtype)
    labelled = labelled_subset(data.y_train, fraction, label_seed)
    positions = batch_schedule(len(labelled), settings.labelled_batch_size,
                               settings.student_steps, np.random.default_rng(labelled_batch_seed))
    transfer = batch_schedule(len(data.y_train), settings.batch_size, settings.student_steps,
                              np.random.default_rng(transfer_seed))
    return SeedMaterial(init=init, projection=projection, labelled=labelled,
                        labelled_batches=labelled[positions], transfer_batches=transfer)


def run_seed(seed_index: int, seed: np.random.SeedSequence, data: Digits,
             teacher: TeacherOutputs, settings: Settings, evaluation: tuple, *,
             fraction: float | None = None, methods=METHODS, checkpoints=(),
             progress=None) -> SeedOutcome:
    """The runs of one seed at one labelled fraction (CE first: the optimal mapping needs it).

    Parameters
    ----------
    seed_index : int
    seed : numpy.random.SeedSequence
    data : Digits
    teacher : TeacherOutputs
    settings : Settings
    evaluation : (x, y)
        Where accuracy is measured.
    fraction : float, optional
        Labelled fraction (default ``settings.labelled_fraction``).
    methods : sequence of str
        A subset of :data:`METHODS`; CE runs first, and also when only
        PKD-optimal needs it.
    checkpoints : iterable of int
        Passed to :func:`train_student`.
    progress : tqdm bar, optional
    """
    fraction = settings.labelled_fraction if fraction is None else fraction
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"methods must be among {METHODS}, got {unknown}")
    material = seed_material(seed, data, settings, fraction)
    outcome = SeedOutcome(seed_index=seed_index, fraction=fraction,
                          n_labelled=int(len(material.labelled)))

    def run(method, layer_mapping=None):
        if progress is not None:
            progress.set_description(f"{fraction:.0%} labelled, seed {seed_index}: "
                                     f"{LABELS[method]}")
        outcome.runs[method] = train_student(
            method, data, teacher, material, settings, evaluation, seed_index=seed_index,
            layer_mapping=layer_mapping, checkpoints=checkpoints, progress=progress)

    if "ce" in methods or "pkd_optimal" in methods:
        run("ce")
    if "pkd_optimal" in methods:
        matrices = alignment_matrices(outcome.runs["ce"].model, teacher, data.x_train)
        outcome.relative_min_mse = matrices["relative"]
        outcome.cka = matrices["cka"]
        outcome.rbf_cka = matrices["rbf-cka"]
        outcome.optimal_mapping = choose_optimal(matrices, settings.student_blocks)
    n_s, n_t = settings.student_blocks, settings.teacher_blocks
    mapping_of = {"pkd_skip": mappings.skip(n_s, n_t), "pkd_last": mappings.last(n_s, n_t),
                  "pkd_optimal": outcome.optimal_mapping}
    for method in METHODS[1:]:
        if method in methods:
            run(method, mapping_of.get(method))
    return outcome


@dataclass
class Prepared:
    """The split and the trained teacher that the selection and the final runs share.

    Attributes
    ----------
    data : Digits
    teacher : ResidualMLP
    outputs : TeacherOutputs
        The teacher's outputs on ``data.x_train`` (the transfer set).
    split_seed : int
    seconds : dict of str to float
        ``data`` and ``teacher`` wall times.
    """

    data: Digits
    teacher: ResidualMLP
    outputs: TeacherOutputs
    split_seed: int
    seconds: dict


def prepare(seed: int, settings: Settings, progress=None) -> Prepared:
    """The split of base seed ``seed`` and the teacher trained on it.

    Children 0 (split) and 1 (teacher) of ``SeedSequence(seed)``; the final
    runs take their student seeds from children 2, 3, ... and the selection
    from another sequence, so that the selection and the final runs share the
    split and the teacher but no student seed.
    """
    from .data import load_split

    split_child, teacher_child = np.random.SeedSequence(seed).spawn(2)
    split_seed = int(split_child.generate_state(1)[0])
    tick = time.perf_counter()
    data = load_split(split_seed, settings.test_fraction, settings.val_fraction,
                      dtype=settings.dtype)
    seconds = {"data": time.perf_counter() - tick}
    tick = time.perf_counter()
    if progress is not None:
        progress.set_description(f"teacher {settings.teacher_blocks}×{settings.teacher_width}")
    teacher = train_teacher(data, settings, teacher_child, progress=progress)
    outputs = TeacherOutputs.of(teacher, data.x_train)
    seconds["teacher"] = time.perf_counter() - tick
    return Prepared(data=data, teacher=teacher, outputs=outputs, split_seed=split_seed,
                    seconds=seconds)


def student_seeds(seed: int, n_seeds: int) -> list:
    """The final runs' student seeds: children 2 .. 2 + n_seeds − 1 of ``SeedSequence(seed)``."""
    return np.random.SeedSequence(seed).spawn(2 + n_seeds)[2:]
