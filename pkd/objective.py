"""The full PKD objective: cross-entropy, temperature-scaled KD and the hidden-state loss.

docs/math.md, for B examples, C classes, temperature τ and labels y::

    L = (1 − α) · CE(z_s, y) + α · τ² · KL(softmax(z_t/τ) ‖ softmax(z_s/τ)) + L_hidden

    CE = mean_i −log softmax(z_s,i)[y_i]
    KL = mean_i Σ_c p_t,ic (log p_t,ic − log p_s,ic),   p^τ = softmax(z/τ)
    ∂L/∂z_s = (1 − α)(softmax(z_s) − onehot(y))/B + α τ (softmax(z_s/τ) − softmax(z_t/τ))/B

``L_hidden`` is :class:`~pkd.distillation.ProgressiveDistillation`'s loss
(already weighted by its ``hidden_weight`` λ: the paper's β for the MSE, β/d_t
for the normalized loss, which the paper's code also averages over d_t). The
teacher's logits get no gradient. The logit part is one fused Numba pass over the
``(B, C)`` logits (:mod:`pkd.kernels.softmax`); the hidden part is computed by
the configuration itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _validation as V
from .distillation import HiddenLossResult, ProgressiveDistillation
from .engine import named_gradients

# The logit pass is compute-bound (three exp per logit), so from this many logits
# (B·C) on, with two threads or more, its parallel twin runs; below, the fork and
# join are not paid back (docs/performance.md, "Parallel kernels").
PARALLEL_MIN_ELEMENTS = 1 << 20


@dataclass
class PKDResult:
    """Loss and gradients of :meth:`PKDObjective.loss_and_grad`.

    ``loss == (1 - alpha) * parts["ce"] + alpha * temperature ** 2 * parts["kd"]
    + parts["hidden"]`` holds exactly (that is how it is computed), except that
    a term of weight 0 counts 0 even when it is infinite (KL with ``alpha=0``,
    CE with ``alpha=1``); ``weighted_parts`` holds the three terms of that sum.

    Attributes
    ----------
    loss : float
        The total L.
    parts : dict of str to float
        The raw values: ``"ce"`` = CE, ``"kd"`` = the KL (before α·τ²),
        ``"hidden"`` = L_hidden (already weighted by λ; 0 without a hidden part).
    weighted_parts : dict of str to float
        The contributions to ``loss``: ``"ce"`` = (1 − α)·CE, ``"kd"`` = α·τ²·KL
        (0 when their weight is 0), ``"hidden"`` = L_hidden.
    grad_logits : (B, C) array
        ∂L/∂z_s, in the logits' common dtype (float64 if either is float64).
    grad_student : list of arrays or None
        ∂L/∂(student layer l), as in :class:`~pkd.HiddenLossResult`; ``None``
        without a hidden part.
    grad_projection : array, dict or None
        ∂L/∂P: one array for a shared projection, ``{pair: array}`` for
        per-pair projections; ``None`` without a projection or a hidden part.
    layer_losses : (n_pairs,) float64 array or None
        The unweighted ℓ_k of each mapped pair; ``None`` without a hidden part.
    hidden_result : HiddenLossResult or None
        The hidden part's full result (pairs, skipped pairs, ...).
    """

    loss: float
    parts: dict
    weighted_parts: dict
    grad_logits: np.ndarray
    grad_student: list | None = None
    grad_projection: np.ndarray | dict | None = None
    layer_losses: np.ndarray | None = None
    hidden_result: HiddenLossResult | None = None


def _check_out_overlap(out: PKDResult, grad_logits, logits: list, student_hidden,
                       teacher_hidden) -> None:
    """``out``'s buffers must not share memory with the inputs (or each other).

    The hidden part writes its gradients before the logit part reads the
    logits and writes ``grad_logits``, so any overlap would silently corrupt
    one of them. (The hidden part checks its own buffers against the hidden
    states.)
    """
    def arrays(named):  # entries that are not arrays are refused later, by their own checks
        return [(name, a) for name, a in named if isinstance(a, np.ndarray)]

    hidden_grads = arrays([] if out.hidden_result is None else
                          named_gradients(out.hidden_result.grad_student or [],
                                          out.hidden_result.grad_projection))
    hidden_inputs = []
    for name, hidden in (("student_hidden", student_hidden), ("teacher_hidden", teacher_hidden)):
        if isinstance(hidden, (list, tuple)):
            hidden_inputs += [(f"{name}[{layer}]", a) for layer, a in enumerate(hidden)]
        else:
            hidden_inputs.append((name, hidden))
    V.check_no_overlap([("out.grad_logits", grad_logits)],
                       logits + hidden_grads + arrays(hidden_inputs))
    V.check_no_overlap(hidden_grads, logits)


def _check_hyperparameters(alpha, temperature) -> tuple[float, float]:
    return (V.check_fraction(alpha, "alpha"),
            V.check_positive(temperature, "temperature"))


def _prepare_logits(student_logits, teacher_logits, labels):
    """Validate the logit inputs; return same-dtype C-contiguous logits and int64 labels."""
    student = V.check_logits(student_logits, "student_logits")
    teacher = V.check_logits(teacher_logits, "teacher_logits")
    if student.shape != teacher.shape:
        raise ValueError(
            f"student_logits has shape {student.shape} but teacher_logits has shape "
            f"{teacher.shape}: both must be (B, C) with the same examples and classes"
        )
    labels = V.check_labels(labels, student.shape[0], student.shape[1])
    dtype = V.result_dtype(student, teacher)
    return (np.ascontiguousarray(student, dtype=dtype),
            np.ascontiguousarray(teacher, dtype=dtype), labels)


def _logit_part(student, teacher, labels, alpha, temperature, grad=None):
    """(CE, KL, ∂/∂z_s of (1 − α)CE + ατ²KL) from validated inputs, into ``grad`` if given."""
    # On use: `import pkd` imports neither numba nor scipy.
    from .kernels import softmax as softmax_kernels
    from .kernels._jit import available_threads

    n_examples = student.shape[0]
    grad = np.empty_like(student) if grad is None else grad
    ce_rows = np.empty(n_examples, dtype=np.float64)
    kl_rows = np.empty(n_examples, dtype=np.float64)
    threads = available_threads() if student.size >= PARALLEL_MIN_ELEMENTS else 1
    if threads > 1:
        # One chunk of rows per thread; each row's result does not depend on the chunking.
        run = softmax_kernels.logit_loss_grad_parallel
        n_chunks = min(threads, n_examples)
    else:
        run, n_chunks = softmax_kernels.logit_loss_grad_serial, 1
    scratch = np.empty((n_chunks, 3, student.shape[1]), dtype=np.float64)
    run(student, teacher, labels, 1.0 / temperature, (1.0 - alpha) / n_examples,
        alpha * temperature / n_examples, grad, ce_rows, kl_rows, scratch)
    ce = float(ce_rows.sum() / n_examples)
    kd = float(kl_rows.sum() / n_examples)
    # A term of weight 0 may be infinite (alpha=0 is plain CE whatever the teacher says).
    ce_infinite = alpha < 1 and not np.isfinite(ce)
    if ce_infinite or (alpha > 0 and not np.isfinite(kd)):
        _explain_infinite(student, teacher, labels, ce_rows if ce_infinite else None, kl_rows)
    return ce, kd, grad


def _explain_infinite(student, teacher, labels, ce_rows, kl_rows):
    """Raise the ValueError that says which example made CE (``ce_rows`` given) or KL infinite."""
    bad_ce = np.flatnonzero(~np.isfinite(ce_rows)) if ce_rows is not None else []
    if len(bad_ce):
        i = int(bad_ce[0])
        raise ValueError(
            f"the cross-entropy is infinite: student_logits[{i}, {int(labels[i])}] (the "
            f"label's logit) is {student[i, labels[i]]} while the row's largest is "
            f"{student[i].max()} ({bad_ce.size} such example(s)); the label must have "
            "probability > 0 (no -inf logit, and a finite logit range)"
        )
    i = int(np.flatnonzero(~np.isfinite(kl_rows))[0])
    raise ValueError(
        f"the KD term is infinite for example {i}: student_logits[{i}] gives probability 0 "
        "to a class the teacher gives probability > 0 (a -inf student logit, or a logit "
        f"range too large for the dtype; shapes {student.shape} and {teacher.shape})"
    )


def logit_loss_and_grad(student_logits, teacher_logits, labels, *, alpha: float,
                        temperature: float) -> tuple[float, float, np.ndarray]:
    """The logit part of the PKD objective: CE, KL, and ∂/∂z_s of (1 − α)·CE + α·τ²·KL.

    ``alpha=0`` is plain cross-entropy training ("CE only"), ``alpha=1`` pure
    logit distillation.

    Parameters
    ----------
    student_logits : (B, C) array of float32/float64
        z_s. Entries may be −inf (probability 0), never NaN or +inf.
    teacher_logits : (B, C) array of float32/float64
        z_t (no gradient).
    labels : (B,) array of int
        Class indices in ``0..C-1``.
    alpha : float in [0, 1]
        Weight of the KD term.
    temperature : float > 0
        τ.

    Returns
    -------
    ce : float
        CE = mean_i −log softmax(z_s,i)[y_i], accumulated in float64.
    kd : float
        KL = mean_i KL(softmax(z_t,i/τ) ‖ softmax(z_s,i/τ)), unweighted.
        A term of weight 0 may be ``inf`` (KL with ``alpha=0``, CE with
        ``alpha=1``); an infinite term that counts raises ``ValueError``.
    grad_logits : (B, C) array
        ∂/∂z_s of ``(1 − alpha)·ce + alpha·temperature²·kd``, in the logits'
        common dtype.
    """
    alpha, temperature = _check_hyperparameters(alpha, temperature)
    student, teacher, labels = _prepare_logits(student_logits, teacher_logits, labels)
    return _logit_part(student, teacher, labels, alpha, temperature)


class PKDObjective:
    """The full PKD objective ``(1 − α)·CE + α·τ²·KL + L_hidden`` with its gradients.

    Parameters
    ----------
    alpha : float in [0, 1]
        Weight of the KD term; CE gets ``1 − alpha``. Default 0.7 (the paper).
    temperature : float > 0
        τ. Default 10 (the paper).
    hidden : ProgressiveDistillation or None
        The hidden-state loss (its ``hidden_weight`` λ is the paper's β, or
        β/d_t with the normalized loss).
        ``None`` gives logit-only KD.

    Examples
    --------
    >>> import numpy as np, pkd
    >>> from pkd.objective import PKDObjective
    >>> hidden = pkd.ProgressiveDistillation([(0, 1), (1, 3)]).with_projection(8, 16, seed=0)
    >>> objective = PKDObjective(alpha=0.7, temperature=10.0, hidden=hidden)
    >>> rng = np.random.default_rng(0)
    >>> z_s, z_t = rng.standard_normal((2, 4, 3))
    >>> labels = np.array([0, 2, 1, 1])
    >>> student = [rng.standard_normal((4, 5, 8)) for _ in range(2)]
    >>> teacher = [rng.standard_normal((4, 5, 16)) for _ in range(4)]
    >>> result = objective.loss_and_grad(z_s, z_t, labels, student, teacher)
    >>> sorted(result.parts), result.grad_logits.shape, result.grad_projection.shape
    (['ce', 'hidden', 'kd'], (4, 3), (8, 16))
    """

    def __init__(self, alpha: float = 0.7, temperature: float = 10.0,
                 hidden: ProgressiveDistillation | None = None) -> None:
        self.alpha, self.temperature = _check_hyperparameters(alpha, temperature)
        if hidden is not None and not isinstance(hidden, ProgressiveDistillation):
            raise TypeError(
                f"hidden must be a pkd.ProgressiveDistillation or None (logit-only KD), "
                f"got {type(hidden).__name__}"
            )
        self.hidden = hidden

    def __repr__(self) -> str:
        return (f"PKDObjective(alpha={self.alpha}, temperature={self.temperature}, "
                f"hidden={self.hidden!r})")

    def loss_and_grad(self, student_logits, teacher_logits, labels, student_hidden=None,
                      teacher_hidden=None, *, attention_mask=None, tokens=None,
                      skip_invalid: bool = False, check_finite: bool = True,
                      out: PKDResult | None = None) -> PKDResult:
        """The total loss, its parts, and the gradients for the student.

        Parameters
        ----------
        student_logits, teacher_logits : (B, C) arrays of float32/float64
            z_s and z_t; −inf entries mean probability 0, NaN/+inf are refused.
        labels : (B,) array of int
            Class indices in ``0..C-1``.
        student_hidden, teacher_hidden : list of arrays, stacked array, or None
            Per-layer hidden states for the hidden part, each ``(B, T, d)`` or
            ``(B, d)`` (one row per example); see
            :meth:`ProgressiveDistillation.loss_and_grad`. When both are
            ``None`` (or ``hidden`` is ``None``) the hidden part is 0. Passing
            them to an objective without ``hidden`` raises (they would be
            ignored).
        attention_mask : (B, T) or (B,) array of 0/1 or bool, optional
            Tokens that count in the hidden part (the logits are per example).
        tokens, skip_invalid, check_finite
            Passed to :meth:`ProgressiveDistillation.loss_and_grad`.
        out : PKDResult, optional
            The result of an earlier call on inputs of the same shapes and
            dtypes: its gradient arrays (``grad_logits`` and those of
            ``hidden_result``) are overwritten, and ``out`` is updated and
            returned, instead of allocating new ones (see
            :meth:`ProgressiveDistillation.loss_and_grad`).

        Returns
        -------
        PKDResult
            A new result, or ``out`` updated.
        """
        if out is not None and not isinstance(out, PKDResult):
            raise TypeError(
                f"out must be a PKDResult (the result of an earlier loss_and_grad call) or "
                f"None, got {type(out).__name__}"
            )
        student, teacher, labels = _prepare_logits(student_logits, teacher_logits, labels)
        grad_logits = None
        if out is not None:
            grad_logits = V.check_output(out.grad_logits, "out.grad_logits", student.shape,
                                         student.dtype)
            _check_out_overlap(out, grad_logits,
                               [("student_logits", student), ("teacher_logits", teacher)],
                               student_hidden, teacher_hidden)
        hidden_result = self._hidden_part(
            student.shape[0], student_hidden, teacher_hidden, attention_mask, tokens,
            skip_invalid, check_finite, None if out is None else out.hidden_result)
        ce, kd, grad_logits = _logit_part(student, teacher, labels, self.alpha,
                                          self.temperature, grad_logits)
        hidden = 0.0 if hidden_result is None else hidden_result.loss
        weighted = {  # a term of weight 0 counts 0, even when it is infinite
            "ce": (1 - self.alpha) * ce if self.alpha < 1 else 0.0,
            "kd": self.alpha * self.temperature ** 2 * kd if self.alpha > 0 else 0.0,
            "hidden": hidden,
        }
        fields = dict(
            loss=weighted["ce"] + weighted["kd"] + weighted["hidden"],
            parts={"ce": ce, "kd": kd, "hidden": hidden},
            weighted_parts=weighted,
            grad_logits=grad_logits,
            grad_student=None if hidden_result is None else hidden_result.grad_student,
            grad_projection=None if hidden_result is None else hidden_result.grad_projection,
            layer_losses=None if hidden_result is None else hidden_result.layer_losses,
            hidden_result=hidden_result,
        )
        if out is None:
            return PKDResult(**fields)
        for name, value in fields.items():
            setattr(out, name, value)
        return out

    def _hidden_part(self, n_examples, student_hidden, teacher_hidden, attention_mask,
                     tokens, skip_invalid, check_finite, out) -> HiddenLossResult | None:
        given = (student_hidden is not None, teacher_hidden is not None)
        if given == (False, False):
            return None
        if given != (True, True):
            missing = "teacher_hidden" if given[0] else "student_hidden"
            raise ValueError(
                f"{missing} is None but the other hidden states were given: pass both "
                "(for the hidden-state loss) or neither (logit-only)"
            )
        if self.hidden is None:
            raise ValueError(
                "student_hidden and teacher_hidden were given but this PKDObjective has no "
                "hidden-state part (hidden=None), so they would be ignored: pass "
                "hidden=ProgressiveDistillation(...) or leave them out"
            )
        student_layers = V.as_layers(student_hidden, "student_hidden")
        teacher_layers = V.as_layers(teacher_hidden, "teacher_hidden")
        self._check_batch(n_examples, student_layers, "student_hidden", 0)
        self._check_batch(n_examples, teacher_layers, "teacher_hidden", 1)
        return self.hidden.loss_and_grad(
            student_layers, teacher_layers, attention_mask=attention_mask, tokens=tokens,
            skip_invalid=skip_invalid, check_finite=check_finite, out=out,
        )

    def _check_batch(self, n_examples, layers, name, side) -> None:
        """Mapped layers must hold one example per logit row: (B, T, d) or (B, d)."""
        for pair in self.hidden.layer_mapping:
            index = pair[side]
            if not 0 <= index < len(layers):
                continue  # the hidden part names the bad index (or skips it if asked)
            shape = np.shape(layers[index])
            if len(shape) not in (2, 3) or shape[0] == n_examples:
                continue  # other ranks are refused by the hidden part
            layout = ("(B, T, d)" if len(shape) == 3 else
                      "(B, d), one row per example (token-level states go in 3-D as (B, T, d))")
            raise ValueError(
                f"{name}[{index}] (layer pair {pair}) has shape {shape} but the logits have "
                f"B={n_examples} examples: hidden states must be {layout} with B={n_examples}"
            )
