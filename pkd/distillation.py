"""``ProgressiveDistillation``: the seed's configuration object, its loss, and gradients.

The seed (a Rust struct) holds a layer mapping, a loss weight and an optional
Xavier-initialised projection, and computes the mean over mapped pairs of the
MSE between (projected) student and teacher hidden states. pkd keeps those
meanings and adds what a careful user needs (DESIGN.md §1):

``L_hidden = λ · Σ_k ω_k ℓ_k / Σ_k ω_k``, λ = ``hidden_weight``, ω_k =
``layer_weights`` (default 1: the seed's plain mean), ℓ_k the pair's MSE or,
with ``normalize=True``, PKD's normalized loss.

When the projection is applied
------------------------------
``project="auto"`` (default, the seed's rule): a pair goes through the
projection only when its student and teacher widths differ; pairs of equal
width compare S with T directly and the projection gets no gradient from
them. ``project="always"``: every pair goes through the projection (which
must then be ``(d_s, d_t)`` for every pair, including d_s == d_t).

Where the seed silently skips a pair it cannot compute (a layer index out of
range, widths that differ with no projection, a projection of the wrong
shape, rows that differ) pkd raises ``ValueError``; ``skip_invalid=True``
restores the seed's skipping and warns once, listing every skipped pair.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field

import numpy as np

from . import _validation as V
from .loss import empty_views, pair_loss_and_grad, thread_workspace

Pair = tuple[int, int]

DEFAULT_MAPPING: tuple[Pair, ...] = ((0, 2), (1, 5), (2, 8), (3, 11))


class SkippedPairWarning(UserWarning):
    """A layer pair was skipped because ``skip_invalid=True``."""


@dataclass
class HiddenLossResult:
    """Loss and gradients of :meth:`ProgressiveDistillation.loss_and_grad`.

    Attributes
    ----------
    loss : float
        ``L_hidden = λ Σ ω_k ℓ_k / Σ ω_k`` over the computed pairs.
    layer_losses : (n_pairs,) float64 array
        ℓ_k for each mapped pair, in mapping order (unweighted); NaN for a
        pair skipped with ``skip_invalid=True``.
    pairs : list of (int, int)
        The mapping the entries above refer to.
    grad_student : list of arrays or None
        ∂L_hidden/∂(student layer l) in the input's shape and the computation's
        dtype (float64 if any input is), one entry per student layer given;
        ``None`` for layers no pair uses.
    grad_projection : array, dict or None
        ∂L_hidden/∂P, with the structure of the configuration's projection: one
        ``(d_s, d_t)`` array for a shared projection (summed over pairs), a dict
        ``{pair: array}`` for per-pair projections, ``None`` without one.
    skipped : list of (int, int)
        Pairs skipped with ``skip_invalid=True`` (empty otherwise).

    Notes
    -----
    The gradients of one call are disjoint views of one block (fewer page
    faults, see ``pkd.loss.empty_views``): keeping any one of them alive
    keeps the whole block; ``.copy()`` the ones to keep for long. A block
    nothing references any more is handed to a later call's gradients.
    """

    loss: float
    layer_losses: np.ndarray
    pairs: list
    grad_student: list
    grad_projection: np.ndarray | dict | None
    skipped: list = field(default_factory=list)


def named_gradients(grad_student: list, grad_projection) -> list:
    """``(name, array or None)`` of a result's gradients, named as ``out=`` errors name them."""
    named = [(f"out.grad_student[{s}]", g) for s, g in enumerate(grad_student)]
    if isinstance(grad_projection, dict):
        named += [(f"out.grad_projection[{pair}]", g) for pair, g in grad_projection.items()]
    else:
        named.append(("out.grad_projection", grad_projection))
    return named


def xavier_uniform(student_dim: int, teacher_dim: int, *, seed=None,
                   dtype=np.float32) -> np.ndarray:
    """Xavier-uniform ``(student_dim, teacher_dim)`` matrix, ``U(−a, a)``, a = √(6/(d_s+d_t)).

    Parameters
    ----------
    student_dim, teacher_dim : int
        d_s and d_t, both > 0.
    seed : int, numpy.random.Generator or None
        Source of randomness; an int makes the result reproducible.
    dtype : float32 or float64
    """
    d_s = V.check_positive_int(student_dim, "student_dim")
    d_t = V.check_positive_int(teacher_dim, "teacher_dim")
    dtype = np.dtype(dtype)
    if dtype not in V.FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    bound = np.sqrt(6.0 / (d_s + d_t))
    rng = V.as_generator(seed)
    return rng.uniform(-bound, bound, size=(d_s, d_t)).astype(dtype)


def _reused_student_gradients(out: HiddenLossResult, planned: dict, pairs, n_layers: int,
                              dtype) -> list:
    """The student gradients of ``out`` that this call writes, checked; ``None`` elsewhere.

    A ``None`` entry (a layer the previous call did not use, e.g. a skipped pair)
    gets a fresh array, so a loop can always hand its last result back.
    """
    given = out.grad_student
    if not isinstance(given, (list, tuple)) or len(given) != n_layers:
        count = len(given) if isinstance(given, (list, tuple)) else type(given).__name__
        raise ValueError(
            f"out.grad_student must hold one entry per student layer ({n_layers}), got "
            f"{count}: pass the result of a call on hidden states of the same layout"
        )
    grads = [None] * n_layers
    for k, (student, _, _) in planned.items():
        s = pairs[k][0]
        if grads[s] is None and given[s] is None:
            grads[s] = np.empty(student.shape, dtype=dtype)
        elif grads[s] is None:
            grads[s] = V.check_output(given[s], f"out.grad_student[{s}]", student.shape, dtype,
                                      pair=pairs[k])
    return grads


_UNSET = object()


def _flat(cache: dict, key, layer: np.ndarray, dtype) -> np.ndarray:
    """``layer`` as a C-contiguous ``(rows, width)`` array of ``dtype``, once per key."""
    if layer.ndim == 2 and layer.dtype == dtype and layer.flags.c_contiguous:
        return layer  # the common case, without the cache (three calls per pair)
    if key not in cache:
        cache[key] = np.ascontiguousarray(layer.reshape(-1, layer.shape[-1]), dtype=dtype)
    return cache[key]


class ProgressiveDistillation:
    """Matches student hidden states to teacher hidden states at selected layers.

    The seed's ``ProgressiveDistillation`` (Sun et al. 2019), with gradients.

    Parameters
    ----------
    layer_mapping : sequence of (int, int), optional
        ``(student_layer, teacher_layer)`` pairs, 0-based indices into the
        lists of hidden states passed to the loss. Default
        ``[(0, 2), (1, 5), (2, 8), (3, 11)]`` (= ``pkd.mapping.uniform(4, 12)``).
    hidden_weight : float
        λ, the weight of the hidden-state loss. Default 1.0. The paper's β is λ
        for the MSE and λ·d_t for the normalized loss (its code also averages
        that loss over the d_t hidden dimensions).
    projection : array or dict, optional
        A shared ``(d_s, d_t)`` projection, or ``{pair: (d_s, d_t) array}``.
        Usually set with :meth:`with_projection`.
    normalize : bool
        Use PKD's normalized ("patient") loss instead of the MSE.
    layer_weights : sequence of float, optional
        ω_k, one finite weight >= 0 per pair, not all zero. Default all 1.
    project : {"auto", "always"}
        When the projection is applied (see the module docstring).
    tokens : {"all", "cls"} or int
        For 3-D hidden states, which positions count ("cls": the first
        position the attention mask keeps in each sequence, position 0
        without a mask).

    Examples
    --------
    >>> import numpy as np, pkd
    >>> cfg = pkd.ProgressiveDistillation().with_projection(64, 128, seed=0)
    >>> rng = np.random.default_rng(0)
    >>> student = [rng.standard_normal((32, 64), dtype=np.float32) for _ in range(4)]
    >>> teacher = [rng.standard_normal((32, 128), dtype=np.float32) for _ in range(12)]
    >>> result = cfg.loss_and_grad(student, teacher)
    >>> result.grad_projection.shape
    (64, 128)
    """

    def __init__(
        self,
        layer_mapping=None,
        *,
        hidden_weight: float = 1.0,
        projection=None,
        normalize: bool = False,
        layer_weights=None,
        project: str = "auto",
        tokens="all",
    ) -> None:
        self.layer_mapping = V.check_mapping(
            DEFAULT_MAPPING if layer_mapping is None else layer_mapping
        )
        self.hidden_weight = V.check_nonnegative(hidden_weight, "hidden_weight")
        self.layer_weights = V.check_layer_weights(layer_weights, len(self.layer_mapping))
        if project not in ("auto", "always"):
            raise ValueError(f'project must be "auto" or "always", got {project!r}')
        self.project = project
        self.normalize = V.check_bool(normalize, "normalize")
        V.check_tokens(tokens)
        self.tokens = tokens
        self.projection = self._check_projection_structure(projection)

    # -- the seed's builder methods -------------------------------------------------

    def with_projection(self, student_dim: int, teacher_dim: int, *, seed=None,
                        dtype=np.float32, shared: bool = True) -> ProgressiveDistillation:
        """Return a copy with a Xavier-uniform projection ``(student_dim, teacher_dim)``.

        Parameters
        ----------
        student_dim, teacher_dim : int
            d_s and d_t (> 0).
        seed : int, numpy.random.Generator or None
            Makes the initialisation reproducible (the seed crate is unseeded).
        dtype : float32 (default) or float64
        shared : bool
            One projection for every pair (the seed), or one per pair, each
            drawn in mapping order from the same generator.
        """
        rng = V.as_generator(seed)
        if shared:
            projection = xavier_uniform(student_dim, teacher_dim, seed=rng, dtype=dtype)
        else:
            self._check_unique_pairs()
            projection = {
                pair: xavier_uniform(student_dim, teacher_dim, seed=rng, dtype=dtype)
                for pair in self.layer_mapping
            }
        return self._replace(projection=projection)

    def with_weight(self, weight: float) -> ProgressiveDistillation:
        """Return a copy whose hidden-state loss weight λ is ``weight`` (finite, >= 0)."""
        return self._replace(hidden_weight=V.check_nonnegative(weight, "weight"))

    def with_layer_weights(self, weights) -> ProgressiveDistillation:
        """Return a copy with per-pair weights ω_k."""
        return self._replace(
            layer_weights=V.check_layer_weights(weights, len(self.layer_mapping))
        )

    def _replace(self, **changes) -> ProgressiveDistillation:
        new = copy.copy(self)
        for name, value in changes.items():
            setattr(new, name, value)
        return new

    @property
    def shared_projection(self) -> bool:
        """True when the projection is one matrix shared by all pairs."""
        return not isinstance(self.projection, dict)

    def __repr__(self) -> str:
        if self.projection is None:
            proj = "None"
        elif self.shared_projection:
            proj = f"shared {self.projection.shape} {self.projection.dtype}"
        else:
            proj = f"per-pair x{len(self.projection)}"
        extras = ""
        if self.normalize:
            extras += ", normalize=True"
        if self.layer_weights is not None:
            extras += f", layer_weights={self.layer_weights.tolist()}"
        if self.project != "auto":
            extras += f", project={self.project!r}"
        if self.tokens != "all":
            extras += f", tokens={self.tokens!r}"
        return (f"ProgressiveDistillation(layer_mapping={self.layer_mapping}, "
                f"hidden_weight={self.hidden_weight}, projection={proj}{extras})")

    # -- losses ------------------------------------------------------------------

    def hidden_state_loss(self, student_hidden, teacher_hidden, *, attention_mask=None,
                          tokens=None, skip_invalid: bool = False,
                          check_finite: bool = True) -> float:
        """The seed's hidden-state matching loss ``L_hidden`` (no gradients).

        Same arguments as :meth:`loss_and_grad`.
        """
        return self._run(student_hidden, teacher_hidden, attention_mask, tokens,
                         skip_invalid, check_finite, need_grad=False).loss

    def loss_and_grad(self, student_hidden, teacher_hidden, *, attention_mask=None,
                      tokens=None, skip_invalid: bool = False, check_finite: bool = True,
                      out: HiddenLossResult | None = None) -> HiddenLossResult:
        """``L_hidden`` and its gradients with respect to every student layer and P.

        Parameters
        ----------
        student_hidden, teacher_hidden : list of arrays, or one stacked array
            Per-layer hidden states, each ``(N, d)`` or ``(B, T, d)``; or one
            array ``(L, N, d)`` / ``(L, B, T, d)``. Mapped pairs must agree on
            every dimension but the width.
        attention_mask : (N,) or (B, T) array of 0/1 or bool, optional
            Rows (tokens) that count; padding contributes nothing to the loss
            or any gradient.
        tokens : {"all", "cls"} or int, optional
            Overrides the configuration's token selection for 3-D input.
        skip_invalid : bool
            Skip (with a warning) pairs the seed would skip, instead of raising.
        check_finite : bool
            Refuse NaN/Inf (default).
        out : HiddenLossResult, optional
            The result of an earlier call on hidden states of the same shapes
            and dtype (a training loop's previous step). Its gradient arrays
            are overwritten, and ``out`` itself is updated and returned,
            instead of allocating new ones: a loop that passes its last result
            back allocates no gradients. Arrays that do not fit (shape, dtype,
            C order) or that share memory with an input raise ``ValueError``.

        Returns
        -------
        HiddenLossResult
            A new result, or ``out`` updated.

        Examples
        --------
        A training loop that reuses its gradient arrays:

        >>> import numpy as np, pkd
        >>> cfg = pkd.ProgressiveDistillation([(0, 1)]).with_projection(8, 16, seed=0)
        >>> rng = np.random.default_rng(0)
        >>> result = None
        >>> for step in range(3):
        ...     student = [rng.standard_normal((32, 8))]
        ...     teacher = [rng.standard_normal((32, 16)) for _ in range(2)]
        ...     result = cfg.loss_and_grad(student, teacher, out=result)
        >>> result.grad_student[0].shape
        (32, 8)
        """
        if out is not None and not isinstance(out, HiddenLossResult):
            raise TypeError(
                f"out must be a HiddenLossResult (the result of an earlier loss_and_grad "
                f"call) or None, got {type(out).__name__}"
            )
        return self._run(student_hidden, teacher_hidden, attention_mask, tokens,
                         skip_invalid, check_finite, need_grad=True, out=out)

    # -- internals -----------------------------------------------------------------

    def _check_unique_pairs(self) -> None:
        if len(set(self.layer_mapping)) != len(self.layer_mapping):
            raise ValueError(
                f"per-pair projections are keyed by pair, but layer_mapping "
                f"{self.layer_mapping} repeats a pair"
            )

    def _check_projection_structure(self, projection):
        if projection is None:
            return None
        if isinstance(projection, dict):
            self._check_unique_pairs()
            missing = [p for p in self.layer_mapping if p not in projection]
            extra = [p for p in projection if p not in self.layer_mapping]
            if missing or extra:
                raise ValueError(
                    f"per-pair projections must have one entry per mapped pair; missing "
                    f"{missing}, unexpected {extra}"
                )
            return {pair: V.check_float_array(projection[pair], "projection", ndims=(2,),
                                              pair=pair) for pair in self.layer_mapping}
        return V.check_float_array(projection, "projection", ndims=(2,))

    def _projection_for(self, pair):
        if self.projection is None:
            return None
        # .get: pkd.torch leaves out the per-pair projections no pair goes through.
        return self.projection if self.shared_projection else self.projection.get(pair)

    def _projection_applies(self, projection, d_s: int, d_t: int) -> bool:
        """Whether a pair of widths ``d_s``, ``d_t`` goes through ``projection`` (or None).

        ``project="auto"`` (the seed's rule): only when the widths differ;
        ``"always"``: whenever there is a projection.
        """
        return projection is not None and (self.project == "always" or d_s != d_t)

    def _plan_pair(self, pair, student_layers, teacher_layers):
        """Check one pair's structure; return (S, T, P or None) or raise ValueError."""
        s, t = pair
        student = V.layer_at(student_layers, s, "student_hidden", pair, check_finite=False)
        teacher = V.layer_at(teacher_layers, t, "teacher_hidden", pair, check_finite=False)
        V.check_paired(student, teacher, pair,
                       names=(f"student_hidden[{s}]", f"teacher_hidden[{t}]"))
        d_s, d_t = student.shape[-1], teacher.shape[-1]
        projection = self._projection_for(pair)
        if not self._projection_applies(projection, d_s, d_t):
            if d_s != d_t:
                raise ValueError(
                    f"layer pair {pair}: student width {d_s} differs from teacher width {d_t} "
                    f"(shapes {student.shape} and {teacher.shape}) and no projection is set; "
                    f"use .with_projection({d_s}, {d_t})"
                )
            projection = None
        else:
            projection = V.check_projection(projection, d_s, d_t, pair=pair,
                                            check_finite=False)
        return student, teacher, projection

    def _run(self, student_hidden, teacher_hidden, attention_mask, tokens, skip_invalid,
             check_finite, *, need_grad, out=None, student_grads=True, projection_grads=True):
        """The loss, and with ``need_grad`` the gradients (``student_grads`` /
        ``projection_grads`` False leave those out: ``None``, no GEMM for them)."""
        skip_invalid = V.check_bool(skip_invalid, "skip_invalid")
        check_finite = V.check_bool(check_finite, "check_finite")
        student_layers = V.as_layers(student_hidden, "student_hidden")
        teacher_layers = V.as_layers(teacher_hidden, "teacher_hidden")
        tokens = self.tokens if tokens is None else tokens
        pairs = self.layer_mapping
        # Python floats: numpy scalar arithmetic per pair costs µs, which count at N ≤ 512.
        weights = ([1.0] * len(pairs) if self.layer_weights is None
                   else self.layer_weights.tolist())

        planned, skipped, reasons = {}, [], []
        float64 = False
        for k, pair in enumerate(pairs):
            try:  # structure first: these are the pairs the seed would skip
                plan = planned[k] = self._plan_pair(pair, student_layers, teacher_layers)
            except ValueError as error:
                if not skip_invalid:
                    raise
                skipped.append(pair)
                reasons.append(f"{pair}: {error}")
                continue
            float64 = float64 or V.result_dtype(*plan) == V.FLOAT_DTYPES[1]
        if skipped:
            warnings.warn(
                "skip_invalid=True skipped layer pair(s):\n  " + "\n  ".join(reasons),
                SkippedPairWarning, stacklevel=3,
            )
        dtype = V.FLOAT_DTYPES[1] if float64 else V.FLOAT_DTYPES[0]
        total_weight = float(sum(weights[k] for k in planned))
        layer_losses = [math.nan] * len(pairs)
        n_layers = len(student_layers)
        if not need_grad:
            grad_student, grad_projection = [None] * n_layers, None
        elif out is None:
            grad_student, grad_projection = self._gradient_buffers(
                planned, n_layers, dtype, student_grads, projection_grads)
        else:
            grad_student = _reused_student_gradients(out, planned, pairs, n_layers, dtype)
            grad_projection = self._reused_projection_grads(out, dtype)
            self._check_out_overlap(planned, grad_student, grad_projection)
        returned = grad_student  # the caller's arrays, in the layers' own shapes
        grad_student = [g if g is None or g.ndim == 2 else g.reshape(-1, g.shape[-1])
                        for g in grad_student]
        written: set = set()  # student layers whose gradient holds a first pair's values
        touched_projection: set = set()
        rows_cache: dict = {}
        flat: dict = {}  # a layer mapped twice is flattened (and cast, if at all) once
        workspace = thread_workspace()
        shared = self.shared_projection
        loss = 0.0

        for k, (student, teacher, projection) in planned.items():
            pair = pairs[k]
            s = pair[0]
            lead = student.shape[:-1]
            rows = rows_cache.get(lead, _UNSET)
            if rows is _UNSET:
                rows = rows_cache[lead] = V.select_rows(lead, attention_mask, tokens)
            coef = self.hidden_weight * weights[k] / total_weight if total_weight > 0 else 0.0
            s2 = _flat(flat, ("student", s), student, dtype)
            t2 = _flat(flat, ("teacher", pair[1]), teacher, dtype)
            p = None if projection is None else _flat(flat, ("projection", id(projection)),
                                                       projection, dtype)
            g_s = grad_student[s]
            accumulate_s = s in written  # the first pair assigns, rows not counted → 0
            written.add(s)
            g_p, accumulate_p = None, False
            if grad_projection is not None and p is not None:
                key = "shared" if shared else pair
                g_p = grad_projection if shared else grad_projection[pair]
                accumulate_p = key in touched_projection
                touched_projection.add(key)
            layer_losses[k] = pair_loss_and_grad(
                s2, t2, p, rows, normalize=self.normalize, coef=coef,
                grad_student=g_s, accumulate_student=accumulate_s,
                grad_projection=g_p, accumulate_projection=accumulate_p,
                workspace=workspace,
            )
            if check_finite and not math.isfinite(layer_losses[k]):
                V.explain_nonfinite([(f"student_hidden[{s}]", student, True),
                                     (f"teacher_hidden[{pair[1]}]", teacher, True),
                                     ("projection", projection, False)], pair, rows)
            loss += coef * layer_losses[k]

        self._zero_untouched(grad_projection, touched_projection)
        fields = dict(loss=float(loss), layer_losses=np.array(layer_losses), pairs=list(pairs),
                      grad_student=returned, grad_projection=grad_projection, skipped=skipped)
        if out is None:
            return HiddenLossResult(**fields)
        for name, value in fields.items():
            setattr(out, name, value)
        return out

    def _gradient_buffers(self, planned, n_layers, dtype, student_grads, projection_grads):
        """Fresh, uninitialised gradients, all views of one block (see
        ``loss.empty_views``): the mapped student layers' (``None`` elsewhere,
        or everywhere without ``student_grads``), and the projection's (or
        ``None``)."""
        student_shapes = {}
        if student_grads:
            for k, plan in planned.items():
                student_shapes.setdefault(self.layer_mapping[k][0], plan[0].shape)
        layers = sorted(student_shapes)
        shapes = [student_shapes[s] for s in layers]
        projection = self.projection if projection_grads else None
        if isinstance(projection, dict):
            shapes += [p.shape for p in projection.values()]
        elif projection is not None:
            shapes.append(projection.shape)
        views = empty_views(shapes, dtype)
        grad_student = [None] * n_layers
        for s, view in zip(layers, views, strict=False):
            grad_student[s] = view
        if projection is None:
            return grad_student, None
        if isinstance(projection, dict):
            return grad_student, dict(zip(projection, views[len(layers):], strict=True))
        return grad_student, views[-1]

    def _reused_projection_grads(self, out: HiddenLossResult, dtype):
        """The projection gradients of ``out``, checked against this configuration."""
        if self.projection is None:
            return None
        given = out.grad_projection
        if self.shared_projection:
            return V.check_output(given, "out.grad_projection", self.projection.shape, dtype)
        if not isinstance(given, dict):
            raise ValueError(
                f"out.grad_projection must be a dict {{pair: array}} for per-pair "
                f"projections, got {type(given).__name__}"
            )
        return {pair: V.check_output(given.get(pair), f"out.grad_projection[{pair}]",
                                     p.shape, dtype, pair=pair)
                for pair, p in self.projection.items()}

    def _check_out_overlap(self, planned, grad_student, grad_projection) -> None:
        """Reused gradients must not alias an input the kernels read."""
        outputs = named_gradients(grad_student, grad_projection)
        inputs, seen = [], set()
        for k, arrays in planned.items():
            pair = self.layer_mapping[k]
            names = (f"student_hidden[{pair[0]}]", f"teacher_hidden[{pair[1]}]", "projection")
            for name, array in zip(names, arrays, strict=True):
                if array is not None and id(array) not in seen:
                    seen.add(id(array))
                    inputs.append((name, array))
        V.check_no_overlap(outputs, inputs)

    @staticmethod
    def _zero_untouched(grad_projection, touched: set) -> None:
        """Projection gradients no pair wrote (no pair goes through them) are zero."""
        if grad_projection is None:
            return
        if not isinstance(grad_projection, dict):
            if "shared" not in touched:
                grad_projection.fill(0)
            return
        for pair, grad in grad_projection.items():
            if pair not in touched:
                grad.fill(0)
