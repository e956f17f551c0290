"""The PKD hidden-state loss and its gradients, in ten lines.

A 4-layer student (width 64) is matched to a 12-layer teacher (width 128)
with pkd's default mapping ``[(0, 2), (1, 5), (2, 8), (3, 11)]`` through
one shared, Xavier-initialised 64 × 128 projection. Hidden states are
``(B, T, d)`` token states with right padding; the attention mask keeps the
padding out of the loss and out of every gradient. The last lines compute one
layer pair alone with the functional API, ``pkd.projected_mse_grad``.

Run:  python examples/loss_and_gradients.py   (about a second, once compiled)
"""

from __future__ import annotations

import numpy as np

import pkd

rng = np.random.default_rng(0)
B, T, d_s, d_t = 8, 16, 64, 128
student = [rng.standard_normal((B, T, d_s), dtype=np.float32) for _ in range(4)]
teacher = [rng.standard_normal((B, T, d_t), dtype=np.float32) for _ in range(12)]
mask = np.arange(T) < rng.integers(4, T + 1, size=(B, 1))  # (B, T): True = real token

config = pkd.ProgressiveDistillation().with_projection(d_s, d_t, seed=0)
result = config.loss_and_grad(student, teacher, attention_mask=mask)
print(f"L_hidden = {result.loss:.6f} over pairs {result.pairs}")
print("per-pair losses:", np.round(result.layer_losses, 6).tolist())
print("grad_student shapes:", [g.shape for g in result.grad_student])
print("grad_projection shape:", result.grad_projection.shape)
print("largest |gradient| on padding:", float(np.abs(result.grad_student[0][~mask]).max()))

# One pair alone: student layer 0 against teacher layer 2, through the same projection.
loss, grad_s, grad_p = pkd.projected_mse_grad(student[0], teacher[2], config.projection,
                                              mask=mask)
print(f"pair (0, 2): loss {loss:.6f}, grad_student {grad_s.shape}, grad_projection "
      f"{grad_p.shape}")
