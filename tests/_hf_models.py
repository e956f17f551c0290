"""Tiny Hugging Face models built from configs, for tests (nothing is downloaded).

A BERT teacher (4 layers, width 64) and student (2 layers, width 32), randomly
initialised with a fixed seed and saved with ``save_pretrained`` next to a
WordPiece tokenizer whose small vocabulary is written here. Import the
fixtures into a test module (``from _hf_models import hf_models``) or call
:func:`save_tiny_bert` directly.
"""

from __future__ import annotations

from pathlib import Path

import pytest

WORDS = ("the a an cat dog bird fish sat ran flew swam on under over mat tree river big small "
         "red blue green old young quick slow and or but is was very not".split())
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "##s", "##ed", "##ing"]

TEXTS = [
    "the cat sat on the mat",
    "a big dog ran",
    "the small red bird flew over the old tree and the river",
    "fish swam",
    "a quick young cat ran under the big blue tree",
    "the dog was not slow",
    "an old fish swam very slow",
    "birds flew over the green river but the cats sat",
    "dogs ran",
    "the mat was red",
    "a very very old tree",
    "cat",
]


def write_vocab(directory: Path) -> Path:
    """Write the WordPiece vocabulary file; return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return path


def save_tiny_bert(directory: Path, *, layers: int, width: int, seed: int,
                   tokenizer: bool = True, weights: bool = True) -> Path:
    """Save a random BertModel (``layers`` layers of width ``width``) and its tokenizer."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=width, num_hidden_layers=layers,
                        num_attention_heads=4, intermediate_size=2 * width,
                        max_position_embeddings=64)
    torch.manual_seed(seed)
    model = BertModel(config).eval()
    if weights:
        model.save_pretrained(directory)
    else:
        config.save_pretrained(directory)
    if tokenizer:
        vocab = write_vocab(directory.with_name(directory.name + "_vocab"))
        BertTokenizer(vocab=str(vocab)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory) -> dict[str, Path]:
    """``{"teacher": dir, "student": dir}``: tiny BERTs saved once per session."""
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf_models")
    return {"teacher": save_tiny_bert(root / "teacher", layers=4, width=64, seed=0),
            "student": save_tiny_bert(root / "student", layers=2, width=32, seed=1)}


@pytest.fixture
def texts_file(tmp_path) -> Path:
    """The test texts, one per line."""
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    return path
