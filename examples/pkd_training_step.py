"""Training steps with the full PKD objective, in plain NumPy.

A frozen 4-layer teacher (width 32) and a 2-layer student (width 16) read
the same token sequences ``x`` (B, T, 8) with right padding. Each model is a
stack of ``tanh`` linear layers whose token states are the hidden states;
its logits come from the masked mean of the last layer's states::

    h_0 = tanh(x W_0),  h_1 = tanh(h_0 W_1),  z = mean_T(h_1) W_out     (student)

``PKDObjective`` returns the loss
``(1 − α)·CE + α·τ²·KL(teacher ‖ student) + L_hidden`` (α = 0.7, τ = 10, the
paper's presets) with ``∂L/∂z`` (``grad_logits``), ``∂L/∂h_l``
(``grad_student``, zero on padding) and ``∂L/∂P`` (``grad_projection``, the
16 → 32 projection of the hidden loss). The student's backward pass below
turns them into gradients of W_out, W_1 and W_0, and plain SGD updates the
student and the projection together. The loss goes down step by step.

Run:  python examples/pkd_training_step.py   (a second or two)
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np

import pkd

B, T, D_IN, D_S, D_T, C = 32, 10, 8, 16, 32, 5


def init_net(rng, width, n_layers):
    """Weights of a tanh stack: [W_0 (D_IN, width), W_1 (width, width), ...], W_out."""
    sizes = [D_IN] + [width] * n_layers
    layers = [rng.standard_normal((a, b)) / np.sqrt(a) for a, b in pairwise(sizes)]
    return layers, rng.standard_normal((width, C)) / np.sqrt(width)


def forward(layers, w_out, x, mask):
    """Hidden states [h_l (B, T, width)], the pooled last layer (B, width), logits (B, C)."""
    hidden, h = [], x
    for w in layers:
        h = np.tanh(h @ w)
        hidden.append(h)
    weights = mask[:, :, None] / mask.sum(axis=1)[:, None, None]  # masked mean over tokens
    pooled = (h * weights).sum(axis=1)
    return hidden, pooled, pooled @ w_out, weights


def backward(layers, w_out, x, hidden, pooled, weights, result):
    """Gradients of the student's weights from the objective's ∂L/∂z and ∂L/∂h_l.

    Returns ``([∂L/∂W_0, ∂L/∂W_1, ...], ∂L/∂W_out)``.
    """
    grad_w_out = pooled.T @ result.grad_logits
    # h_1 feeds the logits (through the masked mean) and the hidden loss.
    grad_h = result.grad_student[-1] + (result.grad_logits @ w_out.T)[:, None, :] * weights
    grads = [None] * len(layers)
    for layer in range(len(layers) - 1, -1, -1):
        below = x if layer == 0 else hidden[layer - 1]
        grad_pre = grad_h * (1.0 - hidden[layer] ** 2)  # tanh'
        grads[layer] = below.reshape(-1, below.shape[-1]).T @ grad_pre.reshape(-1, D_S)
        if layer > 0:
            grad_h = result.grad_student[layer - 1] + grad_pre @ layers[layer].T
    return grads, grad_w_out


def main(steps: int = 40, lr: float = 0.5) -> list[float]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, T, D_IN))
    mask = np.arange(T) < rng.integers(3, T + 1, size=(B, 1))  # (B, T) bool
    teacher_layers, teacher_out = init_net(rng, D_T, 4)
    teacher_hidden, _, teacher_logits, _ = forward(teacher_layers, teacher_out * 3, x, mask)
    labels = teacher_logits.argmax(axis=1)
    layers, w_out = init_net(rng, D_S, 2)

    # Student layer 0 learns from teacher layer 1, student layer 1 from teacher layer 3.
    hidden_loss = pkd.ProgressiveDistillation([(0, 1), (1, 3)]).with_projection(
        D_S, D_T, seed=0, dtype=np.float64)
    objective = pkd.PKDObjective(alpha=0.7, temperature=10.0, hidden=hidden_loss)
    projection = hidden_loss.projection  # updated in place below

    history = []
    for step in range(steps):
        hidden, pooled, logits, weights = forward(layers, w_out, x, mask)
        result = objective.loss_and_grad(logits, teacher_logits, labels, hidden,
                                         teacher_hidden, attention_mask=mask)
        history.append(result.loss)
        if step % 10 == 0 or step == steps - 1:
            parts = ", ".join(f"{k} {v:.4f}" for k, v in result.weighted_parts.items())
            print(f"step {step:3d}  loss {result.loss:.4f}  ({parts})")

        grads, grad_w_out = backward(layers, w_out, x, hidden, pooled, weights, result)
        # SGD on the student and the projection together.
        w_out -= lr * grad_w_out
        for w, g in zip(layers, grads, strict=True):
            w -= lr * g
        projection -= lr * result.grad_projection
    return history


if __name__ == "__main__":
    losses = main()
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < 0.8 * losses[0], f"the loss did not go down: {losses[0]} -> {losses[-1]}"
    assert all(b < a for a, b in pairwise(losses)), "the loss went up at some step"
