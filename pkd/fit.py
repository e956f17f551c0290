"""Fitting a projection P on fixed hidden states: closed form, or gradient steps.

The objective is the hidden-state loss of :class:`~pkd.ProgressiveDistillation`
with every pair going through the projection (``project="always"``):

- shared projection: the mean over the K pairs of ℓ_k(P), plus
  ``ρ‖P‖_F² / (K n_w d_t)`` (one P for all pairs, penalised once);
- per-pair projections: each ``ℓ_k(P_k) + ρ‖P_k‖_F² / (n_w d_t)`` on its own;

with ℓ_k the mean squared error over the n_w selected rows and d_t columns and
ρ = ``ridge``. Every method minimises this objective.

``method="closed_form"`` (MSE only) solves the normal equations from the
Gram statistics of :class:`~pkd.AlignmentStats`: ``(G + ρI) P = C`` per pair,
or ``(ΣG_k + ρI) P = ΣC_k`` for a shared projection (the stationarity
conditions of the objective above); the solution is the
minimum-norm least-squares one, robust to rank-deficient hidden states (see
``AlignmentStats.projection``).

``method="adam" | "sgd"`` take ``steps`` gradient steps from a Xavier
initialisation. Minibatches go through the fused kernels
(:func:`pkd.engine.pair_loss_and_grad`). Full-batch steps of the plain MSE use
the algebra instead (docs/math.md): the loss and ∂ℓ/∂P depend on the data only
through G, C and q, so each step costs O(d_s²·d_t) whatever the number of
rows; the result is the same up to rounding (tested).

Dumps (:class:`pkd.io.Dump`) are streamed: the closed form and full-batch
MSE steps read the mapped layers chunk by chunk (one pass for the statistics,
one for the final losses), so memory does not grow with the number of rows;
minibatch steps and the normalized loss read the mapped layers whole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from . import _validation as V
from ._validation import Pair
from .alignment import DEFAULT_CHUNK_ROWS
from .distillation import ProgressiveDistillation, xavier_uniform

METHODS = ("closed_form", "adam", "sgd")
DEFAULT_LR = {"adam": 1e-2, "sgd": None}


@dataclass
class FitResult:
    """Result of :func:`fit_projection`.

    Attributes
    ----------
    projection : (d_s, d_t) array or None
        The fitted shared projection (``shared=True``).
    projections : dict {pair: (d_s, d_t) array} or None
        The fitted per-pair projections (``shared=False``).
    history : (steps, n_pairs) float64 array
        Per-pair loss ℓ_k at each step (before the step's update), on the
        step's batch; one row, the final losses, for the closed form.
    layer_losses : (n_pairs,) float64 array
        Final per-pair losses over all selected rows.
    mapping : list of (int, int)
    method : str
    initial : array, dict or None
        The starting point of gradient methods (Xavier), for comparisons.
    settings : dict
        The arguments the fit ran with: method, shared, ridge, normalize and
        tokens, plus steps, lr (the one used) and batch_size for gradient methods.
    """

    projection: np.ndarray | None
    projections: dict | None
    history: np.ndarray
    layer_losses: np.ndarray
    mapping: list
    method: str
    initial: np.ndarray | dict | None = None
    settings: dict = field(default_factory=dict)

    def projection_for(self, pair: Pair) -> np.ndarray:
        """The projection used by ``pair`` (shared or its own)."""
        if self.projections is None:
            return self.projection
        return self.projections[tuple(pair)]

    def config(self, **kwargs) -> ProgressiveDistillation:
        """A :class:`ProgressiveDistillation` holding the fitted projection(s)."""
        projection = self.projection if self.projections is None else self.projections
        return ProgressiveDistillation(self.mapping, projection=projection, project="always",
                                       **kwargs)


def fit_projection(
    student_hidden,
    teacher_hidden,
    mapping,
    *,
    method: str = "closed_form",
    shared: bool = True,
    ridge: float = 0.0,
    steps: int = 500,
    lr: float | None = None,
    batch_size: int | None = None,
    seed=None,
    normalize: bool = False,
    attention_mask=None,
    tokens="all",
    dtype=None,
    callback: Callable[[int, np.ndarray], None] | None = None,
    progress: bool = False,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> FitResult:
    """Fit the projection(s) that map student layers onto their teacher layers.

    Parameters
    ----------
    student_hidden, teacher_hidden : list of arrays, one stacked array, or pkd.io.Dump
        Per-layer hidden states, each ``(N, d)`` or ``(B, T, d)``; or two
        dumps (:func:`pkd.io.load_dump`), streamed ``chunk_rows`` rows at a
        time by the closed form and full-batch MSE steps (see the module
        docstring). A dump's own attention mask is used unless
        ``attention_mask`` is given.
    mapping : sequence of (int, int)
        The layer pairs to align.
    method : {"closed_form", "adam", "sgd"}
    shared : bool
        One projection for all pairs, or one per pair.
    ridge : float
        ρ >= 0, an L2 penalty on the projection(s), the same for every method.
        Per-pair projections minimise ``ℓ_k(P_k) + ρ‖P_k‖_F² / (n_w d_t)``,
        solved by ``(G_k + ρI) P_k = C_k``; a shared projection minimises
        ``mean_k ℓ_k(P) + ρ‖P‖_F² / (K n_w d_t)`` (the penalty counted once,
        not once per pair), solved by ``(ΣG_k + ρI) P = ΣC_k`` as in
        :meth:`~pkd.AlignmentStats.projection`. n_w is the number of selected rows
        (for minibatches too: their gradients are unbiased), d_t the teacher
        width, K the number of pairs.
    steps : int
        Gradient steps (ignored by the closed form).
    lr : float, optional
        Learning rate. Default 1e-2 for Adam; for SGD on the MSE,
        ``1/L`` with L the largest curvature of the objective (computed from
        the Gram statistics); SGD on the normalized loss needs an explicit lr,
        and so does SGD with ``ridge=0`` on all-zero student hidden states
        (the loss then does not depend on P: no curvature to derive a step from).
    batch_size : int, optional
        Rows per minibatch (sampled without replacement, epoch by epoch, from
        the selected rows); ``None`` for full-batch steps.
    seed : int or numpy.random.Generator, optional
        Seeds the Xavier initialisation and the minibatch order.
    normalize : bool
        Fit PKD's normalized loss (gradient methods only).
    attention_mask : (N,) or (B, T) array, optional
    tokens : {"all", "cls"} or int
        For 3-D input, which positions count ("cls": the first position the
        attention mask keeps in each sequence, position 0 without a mask).
    dtype : float32 or float64, optional
        Dtype of the projection(s); default that of the hidden states.
    callback : callable(step, layer_losses), optional
        Called after every gradient step with the step's per-pair losses.
    progress : bool
        Show a tqdm progress bar.
    chunk_rows : int
        Rows read at a time from dumps (the default is
        :data:`pkd.alignment.DEFAULT_CHUNK_ROWS`, as for ``AlignmentStats``).

    Returns
    -------
    FitResult
    """
    method = V.check_choice(method, "method", METHODS)
    mapping = V.check_mapping(mapping)
    ridge = V.check_nonnegative(ridge, "ridge")
    if not shared:
        V.check_distinct_pairs(mapping,
                               "per-pair projections need distinct pairs (they are keyed by pair)")
    dumps = _dump_pair(student_hidden, teacher_hidden)
    if dumps is not None:
        attention_mask = _dump_mask(*dumps, attention_mask)
    if dumps is not None and (method == "closed_form" or (batch_size is None and not normalize)):
        data = _StreamedFitData(*dumps, mapping, attention_mask, tokens, chunk_rows)
    else:
        student_layers = V.as_layers(student_hidden if dumps is None else list(dumps[0].layers),
                                     "student_hidden")
        teacher_layers = V.as_layers(teacher_hidden if dumps is None else list(dumps[1].layers),
                                     "teacher_hidden")
        data = _FitData(student_layers, teacher_layers, mapping, attention_mask, tokens)
    dtype = V.check_float_dtype(dtype) if dtype is not None else data.dtype
    settings = {"method": method, "shared": shared, "ridge": ridge, "normalize": normalize,
                "tokens": tokens}

    if method == "closed_form":
        if normalize:
            raise ValueError(
                "the closed form exists for the MSE only: use method='adam' or 'sgd' "
                "with normalize=True"
            )
        solution = _closed_form(data, shared, ridge, dtype)
        losses = data.exact_losses(solution, shared)
        return _result(solution, shared, losses[None, :], losses, mapping, method, None,
                       settings)

    steps = V.check_positive_int(steps, "steps")
    if batch_size is not None:
        batch_size = V.check_positive_int(batch_size, "batch_size")
    rng = V.as_generator(seed)
    d_s, d_t = data.widths
    if shared:
        initial = xavier_uniform(d_s, d_t, seed=rng, dtype=dtype)
    else:
        initial = {pair: xavier_uniform(d_s, d_t, seed=rng, dtype=dtype) for pair in mapping}
    lr = _default_lr(method, lr, normalize, data, shared, ridge)
    settings.update(steps=steps, lr=lr, batch_size=batch_size)
    solution, history = _descend(data, initial, method, steps, lr, batch_size, rng, normalize,
                                 ridge, shared, callback, progress)
    losses = data.exact_losses(solution, shared, normalize=normalize)
    return _result(solution, shared, history, losses, mapping, method, initial, settings)


def _result(solution, shared, history, losses, mapping, method, initial, settings):
    return FitResult(
        projection=solution if shared else None,
        projections=None if shared else solution,
        history=np.asarray(history, dtype=np.float64),
        layer_losses=losses,
        mapping=list(mapping),
        method=method,
        initial=initial,
        settings=settings,
    )


class _PairGrams:
    """The Gram statistics of each mapped pair, from the subclass's ``stats`` (cached)."""

    def gram(self, pair):
        """(G_s, C_st, q_t) of a pair, float64, from the statistics (cached)."""
        if pair not in self._grams:
            stats = self.stats
            s, t = self._s_index[pair[0]], self._t_index[pair[1]]
            self._grams[pair] = (stats.student_gram(s), stats.cross_gram(s, t),
                                 stats.teacher_sq_norm(t))
        return self._grams[pair]


class _FitData(_PairGrams):
    """The mapped layers, flattened to rows, with the selected row indices."""

    def __init__(self, student_layers, teacher_layers, mapping, attention_mask, tokens):
        self.mapping = mapping
        self.student: dict[int, np.ndarray] = {}
        self.teacher: dict[int, np.ndarray] = {}
        lead = None
        for pair in mapping:
            s, t = pair
            # Finiteness is checked below, on the selected rows only: padding may hold NaN.
            student = V.layer_at(student_layers, s, "student_hidden", pair, check_finite=False)
            teacher = V.layer_at(teacher_layers, t, "teacher_hidden", pair, check_finite=False)
            V.check_paired(student, teacher, pair, names=("student_hidden", "teacher_hidden"))
            if lead is not None and student.shape[:-1] != lead:
                raise ValueError(
                    f"layer pair {pair} has leading shape {student.shape[:-1]} but earlier "
                    f"pairs have {lead}: all layers must hold the same rows"
                )
            lead = student.shape[:-1]
            self.student[s], self.teacher[t] = student, teacher
        widths_s = {a.shape[-1] for a in self.student.values()}
        widths_t = {a.shape[-1] for a in self.teacher.values()}
        if len(widths_s) > 1 or len(widths_t) > 1:
            raise ValueError(
                f"fitting one projection shape needs equal widths per side; student widths "
                f"{sorted(widths_s)}, teacher widths {sorted(widths_t)}"
            )
        self.widths = (widths_s.pop(), widths_t.pop())
        self.dtype = V.result_dtype(*self.student.values(), *self.teacher.values())
        self.student = {k: np.ascontiguousarray(a.reshape(-1, a.shape[-1]), dtype=self.dtype)
                        for k, a in self.student.items()}
        self.teacher = {k: np.ascontiguousarray(a.reshape(-1, a.shape[-1]), dtype=self.dtype)
                        for k, a in self.teacher.items()}
        self.rows = V.select_rows(lead, attention_mask, tokens)
        self.n_rows = int(np.prod(lead)) if self.rows is None else len(self.rows)
        self._selected = V.rows_mask((int(np.prod(lead)),), self.rows)  # None: every row
        for name, layers in (("student_hidden", self.student), ("teacher_hidden", self.teacher)):
            for index, values in layers.items():
                self._check_finite(values, f"{name}[{index}]")
        self._stats = None
        self._grams: dict = {}

    def _check_finite(self, values, name):
        """Refuse NaN/Inf in the selected rows of ``values`` (flattened ``(N, d)``)."""
        V.check_finite_rows(values, name, self._selected,
                            advice="fix the input, or leave those rows out with attention_mask "
                                   "(rows it excludes may hold anything)")

    @property
    def stats(self):
        """AlignmentStats of the mapped layers (computed once, on first use)."""
        if self._stats is None:
            from .alignment import AlignmentStats

            s_keys, t_keys = sorted(self.student), sorted(self.teacher)
            # check_finite=False: the selected rows were checked in __init__.
            self._stats = AlignmentStats.from_arrays(
                [self.student[k] for k in s_keys], [self.teacher[k] for k in t_keys],
                mask=self._selected, check_finite=False,
            )
            self._s_index = {k: i for i, k in enumerate(s_keys)}
            self._t_index = {k: i for i, k in enumerate(t_keys)}
        return self._stats

    def exact_losses(self, solution, shared, normalize=False) -> np.ndarray:
        """Per-pair losses of ``solution`` over all selected rows (fused kernels)."""
        from .engine import pair_loss_and_grad

        losses = np.empty(len(self.mapping))
        for k, pair in enumerate(self.mapping):
            P = solution if shared else solution[pair]
            P = np.ascontiguousarray(P, dtype=self.dtype)
            losses[k] = pair_loss_and_grad(self.student[pair[0]], self.teacher[pair[1]], P,
                                           self.rows, normalize=normalize)
        return losses


def _dump_pair(student, teacher):
    """``(student, teacher)`` when both are dumps, None when neither is; else refuse."""
    from .io import Dump

    kinds = (isinstance(student, Dump), isinstance(teacher, Dump))
    if kinds == (False, False):
        return None
    if kinds != (True, True):
        raise TypeError(
            "student_hidden and teacher_hidden must both be pkd.io.Dump or both arrays; for "
            "one dump and one array, pass dump.layers (a tuple of lazy layers) for the dump"
        )
    from .io import check_same_texts

    check_same_texts(student, teacher)
    return student, teacher


def _dump_mask(student, teacher, attention_mask):
    """The mask to use with two dumps: the given one, else theirs (which must agree)."""
    if attention_mask is not None:
        return attention_mask
    masks = [m for m in (student.attention_mask, teacher.attention_mask) if m is not None]
    if len(masks) == 2 and not np.array_equal(*masks):
        raise ValueError(
            f"the attention masks of {student.path} and {teacher.path} differ; pass the one "
            "to use as attention_mask"
        )
    return masks[0] if masks else None


class _StreamedFitData(_PairGrams):
    """The mapped layers of two dumps, read in chunks: statistics and exact losses only."""

    def __init__(self, student, teacher, mapping, attention_mask, tokens, chunk_rows):
        self.mapping = mapping
        self._dumps = (student, teacher)
        self._chunk_rows = V.check_positive_int(chunk_rows, "chunk_rows")
        for pair in mapping:
            for dump, index, name in ((student, pair[0], "student_hidden"),
                                      (teacher, pair[1], "teacher_hidden")):
                if not 0 <= index < dump.n_layers:
                    raise ValueError(
                        f"layer pair {tuple(pair)} asks for layer {index} of {name} "
                        f"({dump.path}), which has {dump.n_layers} layer(s) (valid indices "
                        f"0..{dump.n_layers - 1})"
                    )
        self._s_keys = sorted({s for s, _ in mapping})
        self._t_keys = sorted({t for _, t in mapping})
        widths_s = {student.layers[k].width for k in self._s_keys}
        widths_t = {teacher.layers[k].width for k in self._t_keys}
        if len(widths_s) > 1 or len(widths_t) > 1:
            raise ValueError(
                f"fitting one projection shape needs equal widths per side; student widths "
                f"{sorted(widths_s)}, teacher widths {sorted(widths_t)}"
            )
        self.widths = (widths_s.pop(), widths_t.pop())
        self.dtype = V.result_dtype(*(student.layers[k] for k in self._s_keys),
                                    *(teacher.layers[k] for k in self._t_keys))
        lead = student.lead_shape
        self.rows = V.select_rows(lead, attention_mask, tokens)
        self.n_rows = student.n_rows if self.rows is None else len(self.rows)
        selected = V.rows_mask(lead, self.rows)
        self._selected = None if selected is None else selected.reshape(-1)
        self._s_index = {k: i for i, k in enumerate(self._s_keys)}
        self._t_index = {k: i for i, k in enumerate(self._t_keys)}
        self._stats = None
        self._grams: dict = {}

    def _chunks(self):
        """(student arrays, teacher arrays, selected rows of the chunk or None) per chunk."""
        student, teacher = self._dumps
        pairs = zip(student.iter_chunks(self._chunk_rows, self._s_keys),
                    teacher.iter_chunks(self._chunk_rows, self._t_keys), strict=True)
        for (start, stop, s_arrays), (_, _, t_arrays) in pairs:
            keep = None if self._selected is None else self._selected[start:stop]
            if keep is not None and not keep.any():
                continue
            yield s_arrays, t_arrays, keep

    @property
    def stats(self):
        if self._stats is None:
            from .alignment import AlignmentStats

            self._stats = AlignmentStats.from_chunks(self._chunks())
        return self._stats

    def exact_losses(self, solution, shared, normalize=False) -> np.ndarray:
        """Per-pair losses over all selected rows: a second pass through the fused kernels."""
        from .engine import pair_loss_and_grad

        totals = np.zeros(len(self.mapping))
        for s_arrays, t_arrays, keep in self._chunks():
            rows = None if keep is None else np.flatnonzero(keep).astype(np.int64)
            n_chunk = s_arrays[0].shape[0] if rows is None else len(rows)
            for k, pair in enumerate(self.mapping):
                P = np.ascontiguousarray(solution if shared else solution[pair],
                                         dtype=self.dtype)
                S = np.ascontiguousarray(s_arrays[self._s_index[pair[0]]], dtype=self.dtype)
                T = np.ascontiguousarray(t_arrays[self._t_index[pair[1]]], dtype=self.dtype)
                totals[k] += n_chunk * pair_loss_and_grad(S, T, P, rows, normalize=normalize)
        return totals / self.n_rows


def _closed_form(data: _FitData, shared: bool, ridge: float, dtype):
    from .alignment import solve_projection

    if shared:
        G = sum(data.gram(pair)[0] for pair in data.mapping)
        C = sum(data.gram(pair)[1] for pair in data.mapping)
        return solve_projection(G, C, ridge, dtype=data.dtype).astype(dtype)
    return {pair: solve_projection(*data.gram(pair)[:2], ridge, dtype=data.dtype).astype(dtype)
            for pair in data.mapping}


def _default_lr(method, lr, normalize, data, shared, ridge):
    if lr is not None:
        return V.check_positive(lr, "lr")
    if method == "adam":
        return DEFAULT_LR["adam"]
    if normalize:
        raise ValueError("SGD on the normalized loss needs an explicit lr")
    # The objective's Hessian is 2(G_k + ρI)/(n_w d_t) per pair, 2(ΣG_k + ρI)/(K n_w d_t)
    # for a shared P: L = 2 top/(n_w d_t) with top below.
    n_w, d_t, n_pairs = data.n_rows, data.widths[1], len(data.mapping)
    if shared:
        G = sum(data.gram(pair)[0] for pair in data.mapping)
        top = (np.linalg.eigvalsh(G)[-1] + ridge) / n_pairs
    else:
        top = max(np.linalg.eigvalsh(data.gram(pair)[0])[-1] for pair in data.mapping) + ridge
    if not top > 0:
        layers = ", ".join(f"student_hidden[{s}]" for s in sorted({s for s, _ in data.mapping}))
        raise ValueError(
            f"SGD's default lr is 1/L, L the curvature of the loss, but the student hidden "
            f"states ({layers}) are all zero on the selected rows and ridge=0: the loss does "
            "not depend on the projection, so there is no curvature (L = 0). Check the hidden "
            "states (wrong layer? a mask that keeps only padding?), or pass an explicit lr or "
            "ridge > 0; method='closed_form' returns the minimum-norm projection, 0"
        )
    return float(n_w * d_t / (2.0 * top))


def _descend(data, initial, method, steps, lr, batch_size, rng, normalize, ridge, shared,
             callback, progress):
    from tqdm.auto import tqdm

    mapping = data.mapping
    keys = ["shared"] if shared else list(mapping)
    params = {k: (initial if shared else initial[k]).astype(np.float64) for k in keys}
    moments = {k: (np.zeros_like(p), np.zeros_like(p)) for k, p in params.items()}
    use_gram = batch_size is None and not normalize
    all_rows = (np.arange(data.n_rows) if data.rows is None else data.rows)
    order, cursor = None, 0
    history = np.empty((steps, len(mapping)))
    bar = tqdm(range(steps), desc=f"fit ({method})", disable=not progress, leave=False)
    for step in bar:
        if use_gram:
            losses, grads = _gram_step(data, params, shared, ridge)
        else:
            if batch_size is None:
                rows = all_rows
            else:
                if order is None or cursor + batch_size > len(order):
                    order, cursor = rng.permutation(all_rows), 0
                rows = np.sort(order[cursor:cursor + batch_size])
                cursor += batch_size
            losses, grads = _kernel_step(data, params, rows, shared, normalize, ridge)
        history[step] = losses
        for k in keys:
            _update(method, params[k], grads[k], moments[k], lr, step + 1)
        if callback is not None:
            callback(step, losses.copy())
        if progress:
            bar.set_postfix(loss=f"{losses.mean():.4g}", refresh=False)
    dtype = initial.dtype if shared else next(iter(initial.values())).dtype
    solution = (params["shared"].astype(dtype) if shared
                else {k: params[k].astype(dtype) for k in keys})
    return solution, history


def _gram_step(data, params, shared, ridge):
    """Per-pair losses and gradients from (G, C, q): no pass over the rows."""
    n_w, d_t = data.n_rows, data.widths[1]
    scale = 1.0 / (n_w * d_t)
    losses = np.empty(len(data.mapping))
    grads = {k: np.zeros_like(p) for k, p in params.items()}
    coef = 1.0 / len(data.mapping) if shared else 1.0
    for k, pair in enumerate(data.mapping):
        G, C, q = data.gram(pair)
        key = "shared" if shared else pair
        P = params[key]
        GP = G @ P
        losses[k] = scale * (np.sum(P * GP) - 2.0 * np.sum(P * C) + q)
        grads[key] += coef * 2.0 * scale * (GP - C)
        losses[k] = max(losses[k], 0.0)
    _add_ridge(grads, params, ridge, coef, n_w * d_t)
    return losses, grads


def _add_ridge(grads, params, ridge, coef, size):
    """Add the penalty's gradient, once per projection (a shared P is penalised once).

    ``size`` is n_w·d_t over all the selected rows, for minibatches too: a
    minibatch's gradient is then an unbiased estimate of the objective's.
    """
    if ridge:
        for key, P in params.items():
            grads[key] += coef * 2.0 * ridge * P / size


def _kernel_step(data, params, rows, shared, normalize, ridge):
    """Per-pair losses and gradients on ``rows`` through the fused kernels."""
    from .engine import pair_loss_and_grad
    from .workspace import thread_workspace

    d_t = data.widths[1]
    losses = np.empty(len(data.mapping))
    grads = {}
    coef = 1.0 / len(data.mapping) if shared else 1.0
    workspace = thread_workspace()
    batch_rows = None if len(rows) == data.n_rows and data.rows is None else rows
    for k, pair in enumerate(data.mapping):
        key = "shared" if shared else pair
        P = params[key].astype(data.dtype)
        grad = np.empty_like(P)
        losses[k] = pair_loss_and_grad(
            data.student[pair[0]], data.teacher[pair[1]], P, batch_rows, normalize=normalize,
            coef=coef, grad_projection=grad, workspace=workspace,
        )
        grad = grad.astype(np.float64)
        grads[key] = grads[key] + grad if key in grads else grad
    _add_ridge(grads, params, ridge, coef, data.n_rows * d_t)
    return losses, grads


def _update(method, param, grad, moments, lr, t, beta1=0.9, beta2=0.999, eps=1e-8):
    """One in-place SGD or Adam (Kingma & Ba 2015, bias-corrected) update, float64."""
    if method == "sgd":
        param -= lr * grad
        return
    m, v = moments
    m *= beta1
    m += (1 - beta1) * grad
    v *= beta2
    v += (1 - beta2) * grad * grad
    m_hat = m / (1 - beta1**t)
    v_hat = v / (1 - beta2**t)
    param -= lr * m_hat / (np.sqrt(v_hat) + eps)
