"""The names of the dump format, shared by its readers and writers (see :mod:`pkd.io`)."""

from __future__ import annotations

from pathlib import Path

STACKED_KEY = "hidden_states"
MASK_KEY = "attention_mask"
NPZ_METADATA_KEY = "__metadata__"
FORMATS = {".npz": "npz", ".safetensors": "safetensors"}


class DumpError(ValueError):
    """A dump file is malformed, unsafe or unsupported (the message names file and key)."""


def format_of(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DumpError(
            f"{path}: unknown dump extension {path.suffix!r}; a dump must be a "
            "'.safetensors' or '.npz' file"
        )
    return fmt
