"""Fit a projection on saved hidden-state dumps, choose the mapping, plot the spectrum.

The workflow when student and teacher hidden states were dumped to disk
(e.g. from a Hugging Face model with ``output_hidden_states=True``):

1. save the hidden states with ``pkd.io.save_dump`` (here synthetic ones: a
   4-layer student of width 32 and an 8-layer teacher of width 48, as
   ``(B, T, d)`` token states with right padding and an attention mask);
2. load them back with ``pkd.io.load_dump`` (lazily: layers are read on use);
3. compute the alignment statistics of every (student, teacher) layer pair
   in one pass, and the optimal layer mapping by relative best-reachable
   loss (1 − R², comparable across teacher layers of different scale);
4. fit one shared projection on that mapping, in closed form and with Adam;
5. plot the projections' singular values against the Marchenko–Pastur band
   of their Xavier initialisation.

The synthetic teacher is built so that the answer is known: teacher layers
0, 2, 5 and 7 are noisy linear images of student layers 0, 1, 2 and 3 (the
other teacher layers are noisier images of nearby student layers), all
through one linear map whose singular values decay geometrically, which the
fitted projections' spectra recover. The optimal mapping finds ``[(0, 0), (1, 2), (2, 5), (3, 7)]``.

Run:  python examples/fit_projection_on_dumps.py [OUTPUT_DIR]
      (a few seconds; without OUTPUT_DIR a new temporary directory is used)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

import pkd
import pkd.io
import pkd.plots

B, T, D_S, D_T = 24, 16, 32, 48
CLEAN = {0: 0, 2: 1, 5: 2, 7: 3}  # teacher layer -> the student layer it is an image of


def synthetic_hidden_states(seed: int = 0):
    """Student (4 layers) and teacher (8 layers) states (B, T, d), and the (B, T) mask."""
    rng = np.random.default_rng(seed)
    mask = np.arange(T) < rng.integers(T // 2, T + 1, size=(B, 1))
    student = [rng.standard_normal((B, T, D_S)) for _ in range(4)]
    # One map for every layer, with decaying singular values 4·0.85^k (k = 0..31).
    left = np.linalg.qr(rng.standard_normal((D_S, D_S)))[0]
    right = np.linalg.qr(rng.standard_normal((D_T, D_S)))[0]
    true_map = (left * (4.0 * 0.85 ** np.arange(D_S))) @ right.T
    teacher = []
    for t in range(8):
        source = CLEAN.get(t, min(t // 2, 3))
        noise = 0.2 if t in CLEAN else 1.0
        teacher.append(student[source] @ true_map
                       + noise * rng.standard_normal((B, T, D_T)))
    for layer in student + teacher:  # padding holds junk: the mask must keep it out
        layer[~mask] = 1e3
    return ([s.astype(np.float32) for s in student], [t.astype(np.float32) for t in teacher],
            mask)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    student, teacher, mask = synthetic_hidden_states()
    pkd.io.save_dump(out / "student.safetensors", student, attention_mask=mask)
    pkd.io.save_dump(out / "teacher.npz", teacher, attention_mask=mask)

    with pkd.io.load_dump(out / "student.safetensors") as s_dump, \
            pkd.io.load_dump(out / "teacher.npz") as t_dump:
        mask = s_dump.attention_mask  # (B, T) bool
        stats = pkd.AlignmentStats.from_arrays(s_dump.layers, t_dump.layers, mask=mask)
        relative = stats.relative_min_mse()  # (4, 8): 1 − R² of the best projection
        mapping = pkd.mapping.optimal(relative)
        uniform = pkd.mapping.uniform(s_dump.n_layers, t_dump.n_layers)
        print(f"{stats.n_rows} unpadded tokens of {s_dump.n_rows}; "
              f"{s_dump.n_layers} student x {t_dump.n_layers} teacher layers")
        for name, pairs in (("optimal", mapping), ("uniform", uniform)):
            total = sum(relative[s, t] for s, t in pairs)
            print(f"{name:>8} mapping {pairs}: summed 1 - R^2 = {total:.3f}")

        common = {"attention_mask": mask}
        closed = pkd.fit_projection(s_dump.layers, t_dump.layers, mapping, **common)
        adam = pkd.fit_projection(s_dump.layers, t_dump.layers, mapping, method="adam",
                                  steps=100, seed=0, **common)

    print("per-pair MSE, closed form:", np.round(closed.layer_losses, 5).tolist())
    print("per-pair MSE, Adam (100): ", np.round(adam.layer_losses, 5).tolist())
    gap = adam.layer_losses.mean() / closed.layer_losses.mean() - 1
    print(f"Adam ends {100 * gap:.2f}% above the closed-form floor")
    print("closed form:", pkd.spectrum(closed.projection).summary())
    print("Adam:       ", pkd.spectrum(adam.projection).summary())

    fig = pkd.plots.projection_spectrum(
        {"Xavier init": adam.initial, "Adam, 100 full-batch steps": adam.projection,
         "closed form (least squares)": closed.projection},
        mp_edges=pkd.xavier_mp_edges(D_S, D_T),
        title=f"Singular values of the shared {D_S}→{D_T} projection, fitted on the\n"
              f"optimal mapping {', '.join(f'{s}→{t}' for s, t in mapping)} (student→teacher)",
    )
    written = [out / "student.safetensors", out / "teacher.npz",
               pkd.plots.save_figure(fig, out / "spectrum.png")]
    print("wrote:", ", ".join(str(p) for p in written))


if __name__ == "__main__":
    target = (Path(sys.argv[1]) if len(sys.argv) > 1
              else Path(tempfile.mkdtemp(prefix="pkd-example-")))
    main(target)
