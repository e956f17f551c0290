"""``ProgressiveDistillation``: the layer-matching configuration, its loss, and gradients.

The reference implementation (the Rust struct ``ProgressiveDistillation`` of the
crate aprender-train, module ``entrenar::hf_pipeline::distillation``; see
docs/math.md) holds a layer mapping, a loss weight and an optional
Xavier-initialised projection, and computes the mean over mapped pairs of the
MSE between (projected) student and teacher hidden states. pkd keeps those
meanings and adds what a careful user needs (docs/math.md):

``L_hidden = λ · Σ_k ω_k ℓ_k / Σ_k ω_k``, λ = ``hidden_weight``, ω_k =
``layer_weights`` (default 1: the reference implementation's plain mean), ℓ_k
the pair's MSE or, with ``normalize=True``, PKD's normalized loss. The loop
over pairs is :func:`pkd.engine.hidden_loss`.

When the projection is applied
------------------------------
``project="auto"`` (default, the reference implementation's rule): a pair goes
through the projection only when its student and teacher widths differ; pairs
of equal width compare S with T directly and the projection gets no gradient
from them. ``project="always"``: every pair goes through the projection (which
must then be ``(d_s, d_t)`` for every pair, including d_s == d_t).

Where the reference implementation silently skips a pair it cannot compute (a
layer index out of range, widths that differ with no projection, a projection
of the wrong shape, rows that differ) pkd raises ``ValueError``;
``skip_invalid=True`` restores the skipping and warns once, listing every
skipped pair.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from . import _validation as V
from . import engine
from ._validation import Pair
from .engine import SkippedPairWarning

__all__ = ["DEFAULT_MAPPING", "HiddenLossResult", "ProgressiveDistillation",
           "SkippedPairWarning", "xavier_uniform"]

DEFAULT_MAPPING: tuple[Pair, ...] = ((0, 2), (1, 5), (2, 8), (3, 11))


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
    faults, see ``pkd.workspace.empty_views``): keeping any one of them alive
    keeps the whole block; ``.copy()`` the ones to keep for long. A block
    nothing references any more is handed to a later call's gradients.
    """

    loss: float
    layer_losses: np.ndarray
    pairs: list
    grad_student: list
    grad_projection: np.ndarray | dict | None
    skipped: list = field(default_factory=list)


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
    dtype = V.check_float_dtype(dtype)
    bound = np.sqrt(6.0 / (d_s + d_t))
    rng = V.as_generator(seed)
    return rng.uniform(-bound, bound, size=(d_s, d_t)).astype(dtype)


class ProgressiveDistillation:
    """Matches student hidden states to teacher hidden states at selected layers.

    The reference implementation's ``ProgressiveDistillation`` (for PKD, Sun et al.
    2019), with gradients.

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
        self.project = V.check_choice(project, "project", ("auto", "always"))
        self.normalize = V.check_bool(normalize, "normalize")
        V.check_tokens(tokens)
        self.tokens = tokens
        self.projection = self._check_projection_structure(projection)

    # -- builder methods (the reference implementation's) ---------------------------

    def with_projection(self, student_dim: int, teacher_dim: int, *, seed=None,
                        dtype=np.float32, shared: bool = True) -> ProgressiveDistillation:
        """Return a copy with a Xavier-uniform projection ``(student_dim, teacher_dim)``.

        Parameters
        ----------
        student_dim, teacher_dim : int
            d_s and d_t (> 0).
        seed : int, numpy.random.Generator or None
            Makes the initialisation reproducible (the reference implementation
            draws from an unseeded generator).
        dtype : float32 (default) or float64
        shared : bool
            One projection for every pair (as the reference implementation), or
            one per pair, each
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
        """The hidden-state matching loss ``L_hidden`` (no gradients).

        Same arguments as :meth:`loss_and_grad`.
        """
        return engine.hidden_loss(
            self, student_hidden, teacher_hidden, attention_mask=attention_mask, tokens=tokens,
            skip_invalid=skip_invalid, check_finite=check_finite, grad_student=False,
            grad_projection=False).loss

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
            Skip (with a warning) pairs that cannot be computed (see the module
            docstring), instead of raising.
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
        result = engine.hidden_loss(
            self, student_hidden, teacher_hidden, attention_mask=attention_mask, tokens=tokens,
            skip_invalid=skip_invalid, check_finite=check_finite, out=out)
        if out is None:
            return HiddenLossResult(*result)
        for name, value in result._asdict().items():
            setattr(out, name, value)
        return out

    # -- internals -----------------------------------------------------------------

    def _check_unique_pairs(self) -> None:
        V.check_distinct_pairs(self.layer_mapping,
                               "per-pair projections need distinct pairs (they are keyed by pair)")

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
