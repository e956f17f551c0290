"""Your own model, end to end: dump, analyze, fit, then train from the fitted projection.

The commands a user runs on a teacher and a student checkpoint, here on two
tiny BERTs built from configs (a 4-layer teacher of width 64 and a 2-layer
student of width 32, randomly initialised: nothing is downloaded):

1. ``pkd dump`` each model's hidden states on the same texts (token states,
   with the attention mask; index 0 is the embedding output);
2. ``pkd analyze`` the pair (alignment of every layer pair, heatmaps);
3. ``pkd fit --mapping optimal``: the mapping and its least-squares projection,
   written to ``projection.safetensors``;
4. ``pkd.io.load_projection`` reads it back, and ``pkd.torch.PKDHiddenLoss``
   trains the student from that projection, next to the same training from a
   Xavier projection (the usual initialisation).

Run:  python examples/fit_then_train.py [OUTPUT_DIR]   (needs pkd[hf]; ~20 s)
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import pkd
import pkd.io
import pkd.torch

WORDS = ("the a cat dog bird fish sat ran flew swam on under over mat tree river big small "
         "red blue old young quick slow and but very not".split())
STEPS, BATCH = 20, 32


def save_models(root: Path) -> dict[str, Path]:
    """A random BERT teacher and student with a WordPiece tokenizer, via save_pretrained."""
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizer(vocab=str(vocab))
    dirs = {}
    for name, layers, width, seed in (("teacher", 4, 64, 0), ("student", 2, 32, 1)):
        config = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=width,
                            num_hidden_layers=layers, num_attention_heads=4,
                            intermediate_size=2 * width, max_position_embeddings=64,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        torch.manual_seed(seed)
        dirs[name] = root / name
        BertModel(config).save_pretrained(dirs[name])
        tokenizer.save_pretrained(dirs[name])
    return dirs


def sentences(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) for _ in range(n)]


def pkd_command(*args) -> None:
    """Run ``pkd ARGS`` (as typed in a shell) and show what it prints."""
    print("$ pkd", " ".join(map(str, args)))
    done = subprocess.run([sys.executable, "-m", "pkd.cli", *map(str, args)],
                          capture_output=True, text=True)
    print(done.stdout, end="")
    if done.returncode != 0:
        raise SystemExit(f"pkd {args[0]} failed:\n{done.stderr}")


def train(student, teacher, tokenizer, config, texts, held_out) -> tuple[float, float]:
    """``STEPS`` Adam steps of the hidden loss; the held-out loss before and after."""
    criterion = pkd.torch.PKDHiddenLoss(config)
    optimizer = torch.optim.Adam([*student.parameters(), *criterion.parameters()], lr=1e-3)
    held = tokenizer(held_out, padding=True, return_tensors="pt")
    with torch.no_grad():
        held_teacher = teacher(**held, output_hidden_states=True).hidden_states

    def evaluate() -> float:
        with torch.no_grad():
            student_hidden = student(**held, output_hidden_states=True).hidden_states
            return criterion(student_hidden, held_teacher, held["attention_mask"]).item()

    before = evaluate()
    for step in range(STEPS):
        batch = tokenizer(texts[step * BATCH % len(texts):][:BATCH], padding=True,
                          return_tensors="pt")
        with torch.no_grad():  # the teacher is frozen
            teacher_hidden = teacher(**batch, output_hidden_states=True).hidden_states
        student_hidden = student(**batch, output_hidden_states=True).hidden_states
        loss = criterion(student_hidden, teacher_hidden, batch["attention_mask"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return before, evaluate()


def main(out: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    models = save_models(out)
    texts, held_out = sentences(256, seed=0), sentences(64, seed=1)
    (out / "texts.txt").write_text("\n".join(texts) + "\n")

    for name in ("teacher", "student"):
        pkd_command("dump", models[name], "--texts", out / "texts.txt",
                    "--out", out / f"{name}.safetensors")
    student_dump, teacher_dump = out / "student.safetensors", out / "teacher.safetensors"
    pkd_command("analyze", student_dump, teacher_dump, "--out", out / "analysis")
    pkd_command("fit", student_dump, teacher_dump, "--mapping", "optimal", "--out", out / "fit")

    fitted = pkd.io.load_projection(out / "fit" / "projection.safetensors")
    print(f"loaded a {'shared' if fitted.shared else 'per-pair'} projection for the mapping "
          f"{fitted.mapping}")

    # The fitted projection's loss on the dumped rows, through pkd.torch (checked by the test).
    with pkd.io.load_dump(student_dump) as s, pkd.io.load_dump(teacher_dump) as t:
        config = pkd.ProgressiveDistillation(fitted.mapping, projection=fitted.projection,
                                             project="always")
        loss = pkd.torch.PKDHiddenLoss(config)(
            [torch.from_numpy(np.asarray(layer)) for layer in s],
            [torch.from_numpy(np.asarray(layer)) for layer in t],
            torch.from_numpy(s.attention_mask))
    print(f"fitted projection on the dumped texts: L_hidden = {loss.item():.6f}")

    tokenizer = AutoTokenizer.from_pretrained(models["student"], local_files_only=True)
    teacher = AutoModel.from_pretrained(models["teacher"], local_files_only=True).eval()
    xavier = pkd.ProgressiveDistillation(fitted.mapping, project="always").with_projection(
        32, 64, seed=0)
    for name, start in (("fitted", config), ("xavier", xavier)):
        torch.manual_seed(0)
        student = AutoModel.from_pretrained(models["student"], local_files_only=True).eval()
        before, after = train(student, teacher, tokenizer, start, texts, held_out)
        print(f"{name} init: held-out L_hidden {before:.4f} -> {after:.4f} after {STEPS} steps")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="pkd-")))
