"""PyTorch bridge: pkd's fused kernels behind ``torch.autograd`` (optional; needs torch).

``import pkd`` never imports this module (nor torch); import it explicitly::

    import pkd.torch

Two entry points, same math and names as :mod:`pkd.loss` (docs/math.md):

- :func:`projected_mse` — the loss of one layer pair as a differentiable
  scalar tensor (a ``torch.autograd.Function``).
- :class:`PKDHiddenLoss` — an ``nn.Module`` built from a
  :class:`pkd.ProgressiveDistillation`, holding the projection(s) as
  ``nn.Parameter`` and returning ``L_hidden = λ Σ_k ω_k ℓ_k / Σ_k ω_k`` for lists
  of hidden states (HF ``hidden_states`` style).

How it runs: the forward pass computes the loss *and*, for the inputs that
need it, the gradients (the fused kernel produces ∂ℓ/∂Y anyway, so the
backward GEMMs run while the data is hot): :func:`projected_mse` calls
:func:`pkd.engine.pair_loss_and_grad`, and :class:`PKDHiddenLoss` runs all its
pairs in one autograd node through :func:`pkd.engine.hidden_loss`, so pairs
sharing the projection or a student layer add their gradients in pkd's
buffers. The gradients are saved for backward, which only scales them by the
incoming scalar. When nothing requires grad (or under ``torch.no_grad()``)
only the loss is computed. Saving the gradients costs one buffer per student
layer and per projection that needs one, until backward.

Memory: the kernels read and write torch's own memory through NumPy views
(``Tensor.numpy()``); contiguous CPU tensors are never copied. Non-contiguous
tensors are made contiguous first (one copy, recorded by autograd).

What is supported, and what is refused with a clear error:

- CPU tensors of float32 or float64, all tensors of one pair in one dtype
  (torch does not promote in a matmul either). Other devices (CUDA, MPS,
  meta), sparse layouts, float16/bfloat16 and integer tensors → ``TypeError``.
- The teacher gets no gradient: a teacher that requires grad (with grad mode
  on) → ``ValueError`` (pass ``teacher.detach()`` or compute it under
  ``torch.no_grad()``). Likewise for a mask that requires grad.
- Double backward is not supported: ``create_graph=True`` through a pkd.torch
  loss raises ``RuntimeError`` (the backward is ``once_differentiable``).
- NaN/Inf in a value that takes part in the loss → ``ValueError`` naming the
  tensor, as in :func:`pkd.projected_mse` (``check_finite=False`` to opt out).
"""

from __future__ import annotations

import numpy as np
import torch  # absolute import: the real torch, never this module (pkd.torch)
from torch import nn
from torch.autograd.function import once_differentiable

from . import _validation as V
from . import engine
from .distillation import ProgressiveDistillation
from .workspace import empty_views

__all__ = ["PKDHiddenLoss", "projected_mse"]

_FLOAT_DTYPES = (torch.float32, torch.float64)


# -- validation of torch inputs (the array-level checks are reused from pkd._validation) ----


def _where(pair) -> str:
    return "" if pair is None else f" for layer pair {tuple(pair)}"


def _check_tensor(x, name: str, pair=None) -> torch.Tensor:
    """A strided CPU float32/float64 tensor, or a clear TypeError."""
    where = _where(pair)
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{name}{where} must be a torch.Tensor, got {type(x).__name__}; wrap NumPy "
            "arrays with torch.from_numpy(...) or use pkd.projected_mse for NumPy input"
        )
    if x.device.type != "cpu":
        raise TypeError(
            f"{name}{where} is on device {x.device}: pkd's kernels run on the CPU only; "
            f"move it with .cpu() (and the result back), or use a torch loss on {x.device.type}"
        )
    if x.layout != torch.strided:
        raise TypeError(f"{name}{where} has layout {x.layout}: pass a dense tensor (.to_dense())")
    if x.dtype not in _FLOAT_DTYPES:
        hint = " (cast with .float())" if x.dtype.is_floating_point else ""
        raise TypeError(f"{name}{where} must be float32 or float64, got {x.dtype}{hint}")
    return x


def _view(x: torch.Tensor) -> np.ndarray:
    """NumPy view of a CPU tensor's memory (no copy; autograd is bypassed on purpose)."""
    return x.detach().numpy()


def _check_same_dtype(named, pair=None) -> None:
    dtypes = {name: x.dtype for name, x in named if x is not None}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{name} {dtype}" for name, dtype in dtypes.items())
        raise TypeError(
            f"mixed dtypes{_where(pair)}: {listed}; cast them to one dtype "
            "(e.g. module.double() or tensor.float())"
        )


def _refuse_grad(x, name: str, what: str, pair=None) -> None:
    if isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{name}{_where(pair)} requires grad, but {what}; pass {name}.detach() "
            "(or compute it under torch.no_grad())"
        )


def _mask_array(mask, name: str):
    """A mask given as a tensor or array → something pkd._validation.check_mask accepts."""
    if mask is None or not isinstance(mask, torch.Tensor):
        return mask
    if mask.device.type != "cpu":
        raise TypeError(f"{name} is on device {mask.device}: pass {name}.cpu()")
    _refuse_grad(mask, name, "a mask is not differentiable")
    if mask.dtype.is_floating_point and mask.dtype not in _FLOAT_DTYPES:
        mask = mask.float()  # half-precision 0/1 is exact in float32; numpy lacks bfloat16
    return mask.detach().numpy()


def _input(x, name: str, pair=None) -> tuple[torch.Tensor, np.ndarray]:
    """A checked tensor made contiguous (autograd records the copy, if any), and its NumPy view."""
    x = _check_tensor(x, name, pair).contiguous()
    return x, _view(x)


def _pair_tensors(student, teacher, projection, names, pair):
    """Check one pair's tensors; return them contiguous, and NumPy views of them.

    The views are taken once here and handed to the autograd Function, which
    computes in them (each ``detach().numpy()`` costs microseconds, which weigh on
    small inputs).
    """
    student, s = _input(student, names[0], pair)
    teacher, t = _input(teacher, names[1], pair)
    projection, p = (None, None) if projection is None else _input(projection, names[2], pair)
    _check_same_dtype(zip(names, (student, teacher, projection), strict=True), pair)
    _refuse_grad(teacher, names[1], "pkd.torch gives the teacher no gradient", pair)
    s = V.check_float_array(s, names[0], check_finite=False, pair=pair)
    t = V.check_float_array(t, names[1], check_finite=False, pair=pair)
    V.check_paired(s, t, pair, names=names[:2])
    if p is not None:
        p = V.check_projection(p, s.shape[-1], t.shape[-1], names[2], pair, check_finite=False)
    return (student, teacher, projection), (s, t, p)


def _scalar(value: float, dtype) -> torch.Tensor:
    """A 0-d tensor of ``dtype``, through NumPy (several times cheaper than torch.tensor)."""
    return torch.from_numpy(np.array(value, dtype=dtype))


# -- the autograd Functions ----------------------------------------------------------------


class _PairLoss(torch.autograd.Function):
    """ℓ of one pair; forward also computes the gradients the inputs need, backward scales them.

    Inputs are validated by the caller: contiguous CPU tensors of one float
    dtype, ``arrays`` their NumPy views, ``rows`` sorted int64 indices or None,
    ``options`` = (normalize, want_grad, check_finite, names, pair).
    """

    @staticmethod
    def forward(ctx, student, teacher, projection, rows, arrays, options):
        normalize, want_grad, check_finite, names, pair = options
        s, t, p = arrays
        s2, t2 = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
        # Inside forward grad mode is off, so the caller says whether a graph is being built.
        # From NumPy, in one block (the kernels write every row, zeros outside the mask):
        # torch.empty/zeros would first-touch it with torch's OpenMP threads, which then
        # spin against OpenBLAS's on a 2-core machine.
        need_student = want_grad and ctx.needs_input_grad[0]
        need_projection = want_grad and p is not None and ctx.needs_input_grad[2]
        views = iter(empty_views(
            ([s2.shape] if need_student else []) + ([p.shape] if need_projection else []),
            s2.dtype))
        grad_student = next(views) if need_student else None
        grad_projection = next(views) if need_projection else None
        loss = engine.pair_loss_and_grad(s2, t2, p, rows, normalize=normalize,
                                         grad_student=grad_student,
                                         grad_projection=grad_projection)
        if check_finite and not np.isfinite(loss):
            V.explain_nonfinite([(names[0], s2, True), (names[1], t2, True),
                                 (names[2], p, False)], pair, rows)
        ctx.save_for_backward(
            None if grad_student is None else torch.from_numpy(grad_student.reshape(s.shape)),
            None if grad_projection is None else torch.from_numpy(grad_projection))
        return _scalar(loss, s2.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        _refuse_double_backward()
        grad_student, grad_projection = _scaled(ctx, grad_output)
        return grad_student, None, grad_projection, None, None, None


class _HiddenLoss(torch.autograd.Function):
    """``L_hidden`` of :class:`PKDHiddenLoss` over all its pairs, in one autograd node.

    ``tensors`` are the mapped student layers and then the projection
    parameters (``plan.n_student`` of the first). Forward runs
    :func:`pkd.engine.hidden_loss` on NumPy views, so pairs that
    share a projection or a student layer add their gradients in pkd's
    buffers, not in torch ops between the kernels (torch's OpenMP threads
    would then spin against OpenBLAS's); backward scales them.
    """

    @staticmethod
    def forward(ctx, plan, *tensors):
        n_student = plan.n_student
        needs = ctx.needs_input_grad[1:]
        student_grads = plan.want_grad and any(needs[:n_student])
        projection_grads = plan.want_grad and any(needs[n_student:])
        result = engine.hidden_loss(
            plan.config, plan.student, plan.teacher, attention_mask=plan.mask,
            tokens=plan.tokens, check_finite=plan.check_finite, grad_student=student_grads,
            grad_projection=projection_grads, projection=plan.projection)
        grads = []
        for index, needed in zip(plan.student_indices, needs[:n_student], strict=True):
            grad = result.grad_student[index]
            grads.append(torch.from_numpy(grad) if needed and grad is not None else None)
        projection_grads = result.grad_projection
        if isinstance(projection_grads, dict):
            projection_grads = [projection_grads[pair] for pair in plan.projection_keys]
        else:
            projection_grads = [projection_grads] * (len(tensors) - n_student)
        grads += [None if grad is None or not needed else torch.from_numpy(grad)
                  for grad, needed in zip(projection_grads, needs[n_student:], strict=True)]
        ctx.save_for_backward(*grads)
        return _scalar(result.loss, plan.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        _refuse_double_backward()
        return None, *_scaled(ctx, grad_output)


def _refuse_double_backward() -> None:
    # once_differentiable alone would return gradients without a graph when
    # grad_output does not require grad, so a later double backward would
    # silently treat them as constants: refuse create_graph=True up front.
    if torch.is_grad_enabled():
        raise RuntimeError(
            "pkd.torch does not support double backward (create_graph=True): its "
            "gradients come from hand-written kernels, not from differentiable torch ops"
        )


@once_differentiable
def _scaled(ctx, grad_output):
    return tuple(_scale(saved, grad_output) for saved in ctx.saved_tensors)


def _scale(saved, grad_output):
    """``saved · grad_output`` without touching the saved buffer.

    The usual ``loss.backward()`` passes exactly 1: the saved tensor is returned
    as is. Autograd never writes into an incoming gradient that something else
    still references (ctx holds it), so a retain_graph=True second backward
    sees it intact. Otherwise the product is taken out of place in NumPy, one
    thread, rather than by torch's OpenMP pool (which would then spin against
    OpenBLAS's threads).
    """
    if saved is None:
        return None
    factor = float(grad_output)
    if factor == 1.0:
        return saved
    return torch.from_numpy(saved.numpy() * saved.numpy().dtype.type(factor))


def projected_mse(
    student: torch.Tensor,
    teacher: torch.Tensor,
    projection: torch.Tensor | None = None,
    *,
    mask=None,
    tokens="all",
    normalize: bool = False,
    check_finite: bool = True,
) -> torch.Tensor:
    """Differentiable loss of one layer pair, ``ℓ = Σ_i w_i ‖y_i − t_i‖² / (n_w d_t)``, Y = S P.

    The torch twin of :func:`pkd.projected_mse`: gradients flow to ``student``
    and ``projection`` (whichever require grad), computed by pkd's kernels.

    Parameters
    ----------
    student : (N, d_s) or (B, T, d_s) tensor, float32 or float64, on the CPU
    teacher : (N, d_t) or (B, T, d_t) tensor, same dtype and leading shape
        Gets no gradient: it must not require grad (pass ``teacher.detach()``).
    projection : (d_s, d_t) tensor, optional
        Required when d_s != d_t; without it Y = S.
    mask : (N,) or (B, T) tensor or array of 0/1 or bool, optional
        Rows (tokens) that count, e.g. an HF ``attention_mask``.
    tokens : {"all", "cls"} or int
        For 3-D input, which positions count ("cls": the first position the
        attention mask keeps in each sequence, position 0 without a mask).
    normalize : bool
        PKD's normalized loss ``Σ w‖u − v‖²/n_w`` on L2-normalised rows.
    check_finite : bool
        Raise ``ValueError`` when a NaN/Inf takes part in the loss (default).

    Returns
    -------
    () tensor
        The loss, accumulated in float64 and returned in the inputs' dtype.

    Raises
    ------
    TypeError
        A non-CPU, sparse, non-float32/float64 tensor, or mixed dtypes.
    ValueError
        Shapes that do not pair up, a teacher or mask that requires grad,
        a mask selecting nothing, or NaN/Inf.
    """
    names = ("student", "teacher", "projection")
    tensors, arrays = _pair_tensors(student, teacher, projection, names, None)
    s, t, _ = arrays
    if projection is None and s.shape[-1] != t.shape[-1]:
        raise ValueError(
            f"student width {s.shape[-1]} differs from teacher width {t.shape[-1]} (shapes "
            f"{s.shape} and {t.shape}): pass a projection of shape ({s.shape[-1]}, "
            f"{t.shape[-1]})"
        )
    rows = V.select_rows(s.shape[:-1], _mask_array(mask, "mask"), tokens, mask_name="mask")
    options = (V.check_bool(normalize, "normalize"), torch.is_grad_enabled(),
               V.check_bool(check_finite, "check_finite"), names, None)
    return _PairLoss.apply(*tensors, rows, arrays, options)


# -- the module ------------------------------------------------------------------------


def _as_layers(hidden, name: str) -> list:
    """A list/tuple of per-layer tensors, or one stacked (L, N, d) / (L, B, T, d) tensor."""
    if isinstance(hidden, (list, tuple)):
        if len(hidden) == 0:
            raise ValueError(f"{name} is an empty sequence: pass one tensor per layer")
        return list(hidden)
    if isinstance(hidden, torch.Tensor):
        if hidden.dim() in (3, 4):
            return list(hidden.unbind(0))  # views, so gradients reach the stacked tensor
        raise ValueError(
            f"{name} must be a list of per-layer tensors or one stacked tensor of shape "
            f"(L, N, d) or (L, B, T, d), got a tensor of shape {tuple(hidden.shape)}"
        )
    raise TypeError(
        f"{name} must be a list/tuple of per-layer tensors (e.g. an HF `hidden_states` "
        f"tuple) or a stacked tensor, got {type(hidden).__name__}"
    )


def _pair_key(pair) -> str:
    return f"{pair[0]}_{pair[1]}"


class PKDHiddenLoss(nn.Module):
    """``L_hidden = λ Σ_k ω_k ℓ_k / Σ_k ω_k`` as an ``nn.Module`` (docs/math.md).

    Built from a :class:`pkd.ProgressiveDistillation`, whose meaning it keeps:
    layer mapping, λ (``hidden_weight``), ω_k (``layer_weights``),
    ``normalize``, the ``project`` rule ("auto": a pair goes through the
    projection only when its widths differ; "always") and ``tokens``. The
    configuration's projection is *copied* into trainable parameters:

    - shared projection → ``self.projection``, an ``nn.Parameter`` (d_s, d_t);
    - per-pair projections → ``self.projections``, an ``nn.ParameterDict``
      keyed ``"s_t"`` (e.g. ``"0_2"``); :meth:`projection_for` looks one up
      by pair.

    Optimise them with the student's parameters, e.g.
    ``torch.optim.Adam([*student.parameters(), *criterion.parameters()])``.
    All pairs are computed by pkd's kernels in one autograd node (through
    :func:`pkd.engine.hidden_loss`), so gradients reach the student's hidden
    states and the projection(s).

    Parameters
    ----------
    config : ProgressiveDistillation

    Examples
    --------
    >>> import torch, pkd, pkd.torch
    >>> config = pkd.ProgressiveDistillation([(1, 2), (2, 4)]).with_projection(8, 16, seed=0)
    >>> criterion = pkd.torch.PKDHiddenLoss(config)
    >>> student = [torch.randn(2, 5, 8, requires_grad=True) for _ in range(3)]
    >>> teacher = [torch.randn(2, 5, 16) for _ in range(5)]
    >>> loss = criterion(student, teacher, attention_mask=torch.ones(2, 5, dtype=torch.long))
    >>> loss.backward()
    >>> criterion.projection.grad.shape
    torch.Size([8, 16])
    """

    def __init__(self, config: ProgressiveDistillation) -> None:
        super().__init__()
        if not isinstance(config, ProgressiveDistillation):
            raise TypeError(
                f"config must be a pkd.ProgressiveDistillation, got {type(config).__name__}"
            )
        self.layer_mapping: list = list(config.layer_mapping)
        self.hidden_weight = float(config.hidden_weight)
        self.layer_weights = (None if config.layer_weights is None
                              else [float(w) for w in config.layer_weights])
        self.normalize = bool(config.normalize)
        self.project = config.project
        self.tokens = config.tokens
        self.register_parameter("projection", None)
        self.projections = None
        if config.projection is not None and config.shared_projection:
            self.projection = nn.Parameter(torch.tensor(config.projection))  # a copy
        elif config.projection is not None:
            self.projections = nn.ParameterDict({
                _pair_key(pair): nn.Parameter(torch.tensor(p))
                for pair, p in config.projection.items()
            })

    def projection_for(self, pair) -> nn.Parameter | None:
        """The projection parameter pair ``(s, t)`` uses when its widths call for one."""
        pair = tuple(pair)
        if pair not in self.layer_mapping:
            raise ValueError(f"layer pair {pair} is not in the mapping {self.layer_mapping}")
        if self.projections is not None:
            return self.projections[_pair_key(pair)]
        return self.projection

    def to_config(self) -> ProgressiveDistillation:
        """A :class:`pkd.ProgressiveDistillation` holding copies of the current projection(s).

        For the NumPy side of pkd (spectra, fitting, saving) after training.
        """
        def as_array(parameter):
            return parameter.detach().cpu().numpy().copy()

        if self.projections is not None:
            projection = {pair: as_array(self.projections[_pair_key(pair)])
                          for pair in self.layer_mapping}
        else:
            projection = None if self.projection is None else as_array(self.projection)
        return ProgressiveDistillation(
            self.layer_mapping, hidden_weight=self.hidden_weight, projection=projection,
            normalize=self.normalize, layer_weights=self.layer_weights, project=self.project,
            tokens=self.tokens,
        )

    def extra_repr(self) -> str:
        text = f"layer_mapping={self.layer_mapping}, hidden_weight={self.hidden_weight}"
        if self.normalize:
            text += ", normalize=True"
        if self.layer_weights is not None:
            text += f", layer_weights={self.layer_weights}"
        if self.project != "auto":
            text += f", project={self.project!r}"
        if self.tokens != "all":
            text += f", tokens={self.tokens!r}"
        return text

    def forward(self, student_hidden, teacher_hidden, attention_mask=None, *, tokens=None,
                check_finite: bool = True) -> torch.Tensor:
        """``L_hidden`` over the mapped pairs, differentiable w.r.t. student and projection(s).

        Parameters
        ----------
        student_hidden, teacher_hidden : list/tuple of tensors, or one stacked tensor
            Per-layer hidden states, each ``(N, d)`` or ``(B, T, d)`` (an HF
            ``hidden_states`` tuple has the embeddings at index 0: the mapping
            indexes this sequence as given). Or one ``(L, N, d)`` /
            ``(L, B, T, d)`` tensor. CPU, float32/float64; the teacher's must
            not require grad.
        attention_mask : (N,) or (B, T) tensor or array of 0/1 or bool, optional
            Rows (tokens) that count; padding gets no loss and no gradient.
        tokens : {"all", "cls"} or int, optional
            Overrides the configuration's token selection.
        check_finite : bool
            Refuse NaN/Inf in the values that take part (default).

        Returns
        -------
        () tensor
            ``L_hidden``, in the computation's dtype (float64 if any pair is; the
            tensors of one pair must share a dtype).
        """
        plan = self._plan(_as_layers(student_hidden, "student_hidden"),
                          _as_layers(teacher_hidden, "teacher_hidden"))
        plan.mask = _mask_array(attention_mask, "attention_mask")
        plan.tokens = self.tokens if tokens is None else tokens
        plan.check_finite = V.check_bool(check_finite, "check_finite")
        plan.want_grad = torch.is_grad_enabled()  # grad mode is off inside forward
        return _HiddenLoss.apply(plan, *plan.tensors)

    def _plan(self, student_layers: list, teacher_layers: list) -> _Plan:
        """Check every pair's tensors; gather the Function's inputs and their NumPy views.

        Only what is particular to tensors is checked here (type, device,
        dtype, a teacher that requires grad), once per tensor; shapes and
        values are checked by :func:`pkd.engine.hidden_loss`.
        """
        plan = _Plan(len(student_layers), len(teacher_layers))
        config = self._config()
        student_inputs: dict = {}  # layer index -> contiguous tensor, in order of first use
        teacher_inputs: dict = {}
        projection_inputs: dict = {}  # "shared" or pair -> parameter
        for pair in self.layer_mapping:
            s, t = pair
            for layers, index, name in ((student_layers, s, "student_hidden"),
                                        (teacher_layers, t, "teacher_hidden")):
                if not 0 <= index < len(layers):
                    V.layer_at(layers, index, name, pair)  # raises the shared out-of-range error
            names = (f"student_hidden[{s}]", f"teacher_hidden[{t}]",
                     "projection" if self.projections is None
                     else f"projections[{_pair_key(pair)!r}]")
            if s not in student_inputs:
                student_inputs[s], plan.student[s] = _input(student_layers[s], names[0], pair)
            if t not in teacher_inputs:
                teacher_inputs[t], plan.teacher[t] = _input(teacher_layers[t], names[1], pair)
                _refuse_grad(teacher_inputs[t], names[1],
                             "pkd.torch gives the teacher no gradient", pair)
            # Widths as 1-tuples: a 0-d tensor has none (and hidden_loss refuses it). Widths
            # that differ with no projection are left to hidden_loss's own error.
            projection = self.projection_for(pair)
            if not engine.projection_applies(self.project, projection,
                                             student_inputs[s].shape[-1:],
                                             teacher_inputs[t].shape[-1:]):
                projection = None
            key = "shared" if self.projections is None else pair
            if projection is not None and key not in projection_inputs:
                projection_inputs[key], plan.projections[key] = _input(projection, names[2],
                                                                       pair)
            in_pair = (student_inputs[s], teacher_inputs[t],
                       None if projection is None else projection_inputs[key])
            if len({x.dtype for x in in_pair if x is not None}) > 1:
                _check_same_dtype(zip(names, in_pair, strict=True), pair)
        # The computation's dtype (any float64 input promotes it), as hidden_loss computes in.
        plan.dtype = V.result_dtype(*plan.student, *plan.teacher, *plan.projections.values())
        plan.student_indices = list(student_inputs)
        plan.n_student = len(student_inputs)
        plan.projection_keys = [key for key in projection_inputs if key != "shared"]
        plan.tensors = [*student_inputs.values(), *projection_inputs.values()]
        plan.projection = (plan.projections.get("shared") if self.projections is None
                           else {pair: plan.projections[pair] for pair in plan.projection_keys})
        plan.config = config
        return plan

    def _config(self) -> ProgressiveDistillation:
        """The configuration of the module's current settings (rebuilt only when they change)."""
        key = (tuple(self.layer_mapping), self.hidden_weight, self.normalize, self.project,
               self.tokens, None if self.layer_weights is None else tuple(self.layer_weights))
        if getattr(self, "_config_key", None) != key:
            self._cached_config = ProgressiveDistillation(
                self.layer_mapping, hidden_weight=self.hidden_weight, normalize=self.normalize,
                layer_weights=self.layer_weights, project=self.project, tokens=self.tokens)
            self._config_key = key
        return self._cached_config


class _Plan:
    """What :class:`_HiddenLoss` needs besides its tensor inputs (built by ``PKDHiddenLoss._plan``).

    ``student`` / ``teacher`` hold NumPy views at the mapped indices (``None``
    elsewhere; only those are read); ``tensors`` are the Function's inputs:
    the mapped student layers (indices ``student_indices``) and then the
    projection parameters (the shared one, or those of ``projection_keys``).
    """

    def __init__(self, n_student_layers: int, n_teacher_layers: int) -> None:
        self.student: list = [None] * n_student_layers
        self.teacher: list = [None] * n_teacher_layers
        self.projections: dict = {}
        self.student_indices: list = []
        self.n_student = 0
        self.projection_keys: list = []
        self.tensors: list = []
        self.config: ProgressiveDistillation | None = None
        self.projection = None  # the NumPy views hidden_loss uses instead of config.projection
        self.dtype = None
        self.mask = None
        self.tokens = "all"
        self.check_finite = True
        self.want_grad = False
