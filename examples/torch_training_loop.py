"""Train a small PyTorch student to match a frozen teacher's hidden states with PKD.

The teacher is a 6-layer token encoder of width 32, the student a 3-layer one
of width 16; both return HF-style ``hidden_states`` tuples (embeddings at
index 0, then one entry per layer). ``pkd.torch.PKDHiddenLoss`` maps student
layers 1..3 to teacher layers 2, 4, 6 (PKD-Skip style) through one learned
16 × 32 projection, ignoring padded tokens via the attention mask. The
student's parameters and the projection are optimised together.

Run:  python examples/torch_training_loop.py   (a few seconds on a laptop CPU)
"""

from __future__ import annotations

import torch
from torch import nn

import pkd
import pkd.torch


class TinyEncoder(nn.Module):
    """Token embedding + residual MLP blocks; returns (hidden_states tuple)."""

    def __init__(self, vocab: int, width: int, n_layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width))
            for _ in range(n_layers)
        )

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.embed(tokens)  # (B, T, width)
        hidden_states = [h]
        for block in self.blocks:
            h = h + block(h)
            hidden_states.append(h)
        return tuple(hidden_states)


def make_batch(generator: torch.Generator, batch: int = 16, length: int = 12, vocab: int = 50):
    """Random token ids (B, T) and an attention mask with right padding (B, T)."""
    tokens = torch.randint(0, vocab, (batch, length), generator=generator)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=generator)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return tokens, mask


def main(steps: int = 150) -> tuple[float, float]:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    teacher = TinyEncoder(vocab=50, width=32, n_layers=6).eval()
    student = TinyEncoder(vocab=50, width=16, n_layers=3)

    # hidden_states index 0 is the embedding output, so layer m sits at index m.
    config = pkd.ProgressiveDistillation([(1, 2), (2, 4), (3, 6)]).with_projection(
        16, 32, seed=0)
    criterion = pkd.torch.PKDHiddenLoss(config)
    optimizer = torch.optim.Adam([*student.parameters(), *criterion.parameters()], lr=1e-2)

    eval_tokens, eval_mask = make_batch(generator, batch=64)
    with torch.no_grad():
        eval_teacher = teacher(eval_tokens)

    def evaluate() -> float:
        with torch.no_grad():
            return criterion(student(eval_tokens), eval_teacher, eval_mask).item()

    initial = evaluate()
    for step in range(steps):
        tokens, mask = make_batch(generator)
        with torch.no_grad():  # the teacher is frozen: its hidden states need no graph
            teacher_hidden = teacher(tokens)
        loss = criterion(student(tokens), teacher_hidden, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            print(f"step {step:4d}  train L_hidden {loss.item():.4f}")
    final = evaluate()
    print(f"held-out L_hidden: {initial:.4f} -> {final:.4f}")
    return initial, final


if __name__ == "__main__":
    initial, final = main()
    assert final < 0.5 * initial, f"the loss did not go down enough: {initial} -> {final}"
