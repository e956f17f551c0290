"""A residual NumPy MLP with a hand-written backward pass, and the Adam optimiser.

The network (width W, L blocks, C classes)::

    h_0     = x W_in + b_in                          (B, W)
    a_l     = h_l A_l + c_l                          (B, W)    l = 0 .. L-1
    h_{l+1} = h_l + relu(a_l)                        (B, W)    the block outputs
    z       = h_L W_out + b_out                      (B, C)    the logits

The hidden states handed to pkd are the L block outputs ``h_1 .. h_L``.

Backward, given ``∂L/∂z`` and optionally ``∂L/∂h_{l+1}`` from the hidden-state
loss (added where that block's output leaves the network)::

    g = ∂L/∂h_L = (∂L/∂z) W_outᵀ (+ extra_L)
    for l = L-1 .. 0:
        d = g ⊙ [a_l > 0]       ∂A_l = h_lᵀ d    ∂c_l = Σ_rows d
        g = g + d A_lᵀ (+ extra_l, the outside gradient on h_l, for l ≥ 1)
    ∂W_in = xᵀ g    ∂b_in = Σ_rows g

Residual branches start small (their weights scaled by ``1/√L``) so a
12-block net without normalisation layers trains from the first step: the
identity path carries the signal while the branches grow.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PARAM_NAMES = ("W_in", "b_in", "A", "c", "W_out", "b_out")


@dataclass
class ForwardCache:
    """What :meth:`ResidualMLP.backward` needs from the forward pass.

    Attributes
    ----------
    x : (B, d_in) array
    hidden : list of L + 1 arrays (B, W)
        ``h_0 .. h_L`` (``hidden[1:]`` are the block outputs given to pkd).
    pre : list of L arrays (B, W)
        The pre-activations ``a_l``.
    """

    x: np.ndarray
    hidden: list
    pre: list


class ResidualMLP:
    """A residual MLP whose parameters live in a dict of NumPy arrays.

    Parameters
    ----------
    n_in, width, n_blocks, n_classes : int
        d_in, W, L and C.
    seed : int or numpy.random.Generator
        Initialisation.
    dtype : float32 or float64

    Attributes
    ----------
    params : dict of str to array
        ``W_in (d_in, W)``, ``b_in (W,)``, ``A (L, W, W)``, ``c (L, W)``,
        ``W_out (W, C)``, ``b_out (C,)``.
    """

    def __init__(self, n_in: int, width: int, n_blocks: int, n_classes: int, *, seed=0,
                 dtype=np.float64) -> None:
        rng = np.random.default_rng(seed)
        self.n_in, self.width, self.n_blocks, self.n_classes = n_in, width, n_blocks, n_classes
        self.dtype = np.dtype(dtype)
        he = np.sqrt(2.0 / width)
        self.params = {
            "W_in": rng.standard_normal((n_in, width)) / np.sqrt(n_in),
            "b_in": np.zeros(width),
            # Small residual branches: the variance of h grows by at most a
            # factor ~e over the L blocks at init.
            "A": rng.standard_normal((n_blocks, width, width)) * he / np.sqrt(n_blocks),
            "c": np.zeros((n_blocks, width)),
            "W_out": rng.standard_normal((width, n_classes)) / np.sqrt(width),
            "b_out": np.zeros(n_classes),
        }
        self.params = {k: v.astype(self.dtype) for k, v in self.params.items()}

    def copy(self) -> ResidualMLP:
        """A deep copy (same architecture, copied parameters)."""
        new = object.__new__(ResidualMLP)
        new.__dict__.update(self.__dict__)
        new.params = {k: v.copy() for k, v in self.params.items()}
        return new

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, list, ForwardCache]:
        """Logits and block outputs of a batch.

        Parameters
        ----------
        x : (B, d_in) array

        Returns
        -------
        logits : (B, C) array
        block_outputs : list of L arrays (B, W)
            ``h_1 .. h_L``, the hidden states for pkd.
        cache : ForwardCache
        """
        p = self.params
        x = np.asarray(x, dtype=self.dtype)
        h = x @ p["W_in"] + p["b_in"]
        hidden, pre = [h], []
        for layer in range(self.n_blocks):
            a = h @ p["A"][layer] + p["c"][layer]
            h = h + np.maximum(a, 0.0)
            pre.append(a)
            hidden.append(h)
        logits = h @ p["W_out"] + p["b_out"]
        return logits, hidden[1:], ForwardCache(x=x, hidden=hidden, pre=pre)

    def predict(self, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Predicted class of each row of ``x`` (B, d_in) → (B,) int."""
        out = [self.forward(x[i:i + batch_size])[0].argmax(axis=1)
               for i in range(0, len(x), batch_size)]
        return np.concatenate(out)

    def backward(self, cache: ForwardCache, grad_logits: np.ndarray,
                 grad_hidden: list | None = None) -> dict:
        """Gradients of the loss with respect to every parameter.

        Parameters
        ----------
        cache : ForwardCache
            From :meth:`forward` on the same batch.
        grad_logits : (B, C) array
            ∂L/∂z.
        grad_hidden : list of L arrays (B, W) or None, optional
            ∂L/∂h_{l+1} coming from outside (the hidden-state loss), one entry
            per block output; ``None`` entries (unmapped layers) add nothing.

        Returns
        -------
        dict of str to array
            Same keys and shapes as :attr:`params`.
        """
        p = self.params
        if grad_hidden is not None and len(grad_hidden) != self.n_blocks:
            raise ValueError(
                f"grad_hidden has {len(grad_hidden)} entries but the network has "
                f"{self.n_blocks} blocks: give one (B, {self.width}) array or None per block"
            )
        grad_logits = np.asarray(grad_logits, dtype=self.dtype)
        grads = {"A": np.empty_like(p["A"]), "c": np.empty_like(p["c"])}
        h_last = cache.hidden[-1]
        grads["W_out"] = h_last.T @ grad_logits
        grads["b_out"] = grad_logits.sum(axis=0)
        g = grad_logits @ p["W_out"].T
        for layer in range(self.n_blocks - 1, -1, -1):
            if grad_hidden is not None and grad_hidden[layer] is not None:
                g = g + grad_hidden[layer]  # ∂L/∂h_{layer+1} from the hidden loss
            d = g * (cache.pre[layer] > 0)
            grads["A"][layer] = cache.hidden[layer].T @ d
            grads["c"][layer] = d.sum(axis=0)
            g = g + d @ p["A"][layer].T
        grads["W_in"] = cache.x.T @ g
        grads["b_in"] = g.sum(axis=0)
        return grads


class Adam:
    """Adam (Kingma & Ba 2015) over a dict of arrays, updated in place.

    Parameters
    ----------
    params : dict of str to array
        The arrays to update (e.g. :attr:`ResidualMLP.params`, or
        ``{"P": projection}``).
    lr, beta1, beta2, eps : float
    """

    def __init__(self, params: dict, lr: float = 1e-3, beta1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8) -> None:
        self.params = params
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self._scratch = {k: np.empty_like(v) for k, v in params.items()}
        self.t = 0

    def step(self, grads: dict) -> None:
        """One update ``θ ← θ − lr · m̂ / (√v̂ + ε̂)`` for every key of ``grads``.

        In place, through one scratch buffer per parameter (no temporaries:
        the 12-block teacher has ~200k weights and the step runs every batch).
        """
        self.t += 1
        correction1 = 1.0 - self.beta1 ** self.t
        correction2 = 1.0 - self.beta2 ** self.t
        step_size = self.lr * np.sqrt(correction2) / correction1
        eps = self.eps * np.sqrt(correction2)  # = eps on the bias-corrected v̂
        for name, grad in grads.items():
            m, v, tmp = self.m[name], self.v[name], self._scratch[name]
            m *= self.beta1
            np.multiply(grad, 1.0 - self.beta1, out=tmp)
            m += tmp
            v *= self.beta2
            np.square(grad, out=tmp)
            tmp *= 1.0 - self.beta2
            v += tmp
            np.sqrt(v, out=tmp)
            tmp += eps
            np.divide(m, tmp, out=tmp)
            tmp *= step_size
            self.params[name] -= tmp
