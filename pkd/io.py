"""Hidden-state dumps: ``.safetensors`` (streamed) and ``.npz`` (never unpickled).

A *dump* holds the hidden states of one model on one set of inputs: one array
per layer, plus an optional attention mask. ``pkd analyze`` and
:class:`~pkd.alignment.AlignmentStats` read teacher and student dumps of the
same inputs and pair their rows.

Format
------
The format is chosen by the file extension, ``.safetensors`` or ``.npz``
(case-insensitive). Either file holds:

``hidden_states`` *or* ``hidden_states.0`` ... ``hidden_states.{L-1}``
    The layers, either as one stacked array of shape ``(L, B, T, d)`` (token
    states: batch, position, width) or ``(L, N, d)`` (one row per example,
    e.g. pooled), or as one key per layer of shape ``(B, T, d)`` or ``(N, d)``.
    Per-layer keys are numbered from 0 with no gap and no leading zero. All
    layers share the leading shape ``(B, T)`` / ``(N,)``; their widths ``d``
    may differ (per-layer form only). A file with both forms is refused as
    ambiguous. Rows are the flattened ``(N, d)`` view, ``N = B·T``, row
    ``b·T + t`` being position ``t`` of example ``b``.
``attention_mask`` (optional)
    0/1 of the leading shape ``(B, T)`` (or ``(N,)``); 1 marks a row that
    counts. Any integer, bool or float dtype holding only 0 and 1 is read;
    :func:`save_dump` writes ``uint8``. :attr:`Dump.attention_mask` is a
    ``bool`` array.
``__metadata__`` (``.npz`` only, optional)
    A 0-d unicode array holding a JSON object of string → string (it is not
    pickled). In ``.safetensors`` the same dict is the header's metadata.

Other keys (``input_ids``, logits, ...) are allowed and ignored; they are
listed in :attr:`Dump.extra_keys`.

Dtypes: float32 and float64 are read as stored; float16 is stored as is and
upcast to float32 on read (half the disk, exact conversion). bfloat16 (which
NumPy cannot represent), integers, bools, complex and object arrays are
refused: save ``h.float()`` from torch instead.

Safety and memory
-----------------
* ``.npz`` is always read with ``allow_pickle=False``: an object array is
  refused, loading a dump never runs code. Array headers are read first, so a
  malformed file is refused before any data is loaded.
* ``.safetensors`` is read lazily: :meth:`LazyLayer.rows`, indexing
  (``dump[0][:10]``) and :meth:`Dump.iter_chunks` read only the requested
  rows from the memory-mapped file, so a dump larger than memory streams with
  a peak of one chunk per layer. **Use safetensors for large dumps.**
* ``.npz`` members are zip entries that can only be read whole: each access to
  a per-layer key loads that layer, :meth:`Dump.iter_chunks` loads each
  requested layer once, and a stacked ``hidden_states`` is loaded whole on
  first access and kept (read-only) until :meth:`Dump.close`.
* Loading never modifies the file; :func:`save_dump` and :class:`DumpWriter`
  write atomically (temp file + rename), so an interrupted save never leaves
  a partial dump.

A :class:`Dump` is a sequence of its layers (``len(dump)``, ``dump[i]``,
``for layer in dump``); a :class:`LazyLayer` takes NumPy's int and slice
indices and ``len()``.

Metadata
--------
:attr:`Dump.metadata` is free text (string → string). Dumps written by
:func:`pkd.hf.dump_hidden_states` (``pkd dump``) record the model, the layers,
the pooling and the texts; :attr:`Dump.embeddings_index`,
:attr:`Dump.texts_sha256` and :attr:`Dump.n_texts` read the keys the rest of
pkd relies on, and :func:`check_same_texts` refuses two dumps made from
different texts. ``docs/dump-format.md`` lists every key.

Writing a dump
--------------
* From a Hugging Face model: ``pkd dump MODEL_DIR --texts FILE --out
  PATH.safetensors``, or :func:`pkd.hf.dump_hidden_states`.
* Batch by batch from your own loop: :class:`DumpWriter` (memory bounded by
  one batch).
* Arrays already in memory: :func:`save_dump`. With transformers, index 0 of
  ``hidden_states`` is the embedding output and index ``i`` the output of
  transformer layer ``i``; pass NumPy arrays::

      with torch.inference_mode():
          out = model(**batch, output_hidden_states=True)
      pkd.io.save_dump("teacher.safetensors",
                       [h.float().cpu().numpy() for h in out.hidden_states],
                       attention_mask=batch["attention_mask"].cpu().numpy(),
                       metadata={"embeddings_index": "0"})

Where the code lives
--------------------
This module is the public API: it re-exports the names of ``__all__`` and the
key names (``STACKED_KEY``, ``MASK_KEY``, ``NPZ_METADATA_KEY``), and holds
:func:`check_same_texts` and :func:`load_projection`. The rest is in private
modules, one job each:

* ``pkd/_dump_format.py``: the key names, the extension → format rule,
  :class:`DumpError`.
* ``pkd/_dump_sources.py``: the readers of ``.safetensors`` and ``.npz`` (the
  only code that touches a file's bytes) and the dtype rules.
* ``pkd/_dump_read.py``: :func:`load_dump` (layout checks), :class:`Dump`,
  :class:`LazyLayer`.
* ``pkd/_dump_save.py``: :func:`save_dump` and the checks of what is written.
* ``pkd/_dump_writer.py``: :class:`DumpWriter`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pkd._dump_format import MASK_KEY as MASK_KEY
from pkd._dump_format import NPZ_METADATA_KEY as NPZ_METADATA_KEY
from pkd._dump_format import STACKED_KEY as STACKED_KEY
from pkd._dump_format import DumpError
from pkd._dump_read import Dump, LazyLayer, load_dump
from pkd._dump_save import save_dump
from pkd._dump_writer import DumpWriter

__all__ = [
    "Dump",
    "DumpError",
    "DumpWriter",
    "LazyLayer",
    "LoadedProjection",
    "check_same_texts",
    "load_dump",
    "load_projection",
    "save_dump",
]


# ---------------------------------------------------------------------------
# Checking a pair of dumps.


def check_same_texts(student: Dump, teacher: Dump) -> bool:
    """Refuse two dumps that were not made from the same texts.

    Parameters
    ----------
    student, teacher : Dump

    Returns
    -------
    bool
        True when both dumps carry ``texts_sha256`` (and they agree); False
        when at least one does not say, so only the row counts were compared.

    Raises
    ------
    DumpError
        The dumps hold different numbers of rows (leading shapes differ), or
        both record a text hash and the hashes differ, or both record
        ``n_texts`` and the counts differ. The message names both files.
    """
    for name, dump in (("student", student), ("teacher", teacher)):
        if not isinstance(dump, Dump):
            raise TypeError(f"{name} must be a pkd.io.Dump (load_dump), got {type(dump).__name__}")

    def said(dump: Dump) -> str:
        file = dump.metadata.get("texts_file")
        return (f"{dump.path} ({dump.n_texts if dump.n_texts is not None else '?'} texts"
                + (f" from {file}" if file else "") + f", rows of shape {dump.lead_shape})")

    if student.n_texts is not None and teacher.n_texts is not None \
            and student.n_texts != teacher.n_texts:
        raise DumpError(
            f"the dumps were made from different texts: {said(student)} and {said(teacher)}; "
            "dump both models from the same texts file"
        )
    if student.texts_sha256 is not None and teacher.texts_sha256 is not None \
            and student.texts_sha256 != teacher.texts_sha256:
        raise DumpError(
            f"the dumps were made from different texts (their texts_sha256 differ): "
            f"{said(student)} and {said(teacher)}; dump both models from the same texts file"
        )
    if student.lead_shape != teacher.lead_shape:
        raise DumpError(
            f"the dumps hold different rows: {said(student)} and {said(teacher)}; pkd pairs "
            "rows one to one, so both must hold the same inputs (token-level dumps: the same "
            "tokenizer, padding and --max-length)"
        )
    return student.texts_sha256 is not None and teacher.texts_sha256 is not None


# ---------------------------------------------------------------------------
# Projections written by `pkd fit`.


class LoadedProjection(NamedTuple):
    """What :func:`load_projection` returns.

    Attributes
    ----------
    projection : numpy.ndarray or dict
        A shared ``(d_s, d_t)`` array, or ``{(s, t): (d_s, d_t) array}`` per
        mapped pair: what ``ProgressiveDistillation(mapping, projection=...)``
        takes.
    mapping : list of (int, int) or None
        The layer mapping the projection was fitted on (None if the file does
        not say, which only a shared projection written elsewhere can be).
    shared : bool
    """

    projection: np.ndarray | dict
    mapping: list | None
    shared: bool


_PAIR_KEY = re.compile(r"projection\.(\d+)_(\d+)")


def load_projection(path: str | os.PathLike) -> LoadedProjection:
    """Read ``projection.safetensors`` as written by ``pkd fit``.

    Parameters
    ----------
    path : str or os.PathLike
        A ``.safetensors`` file with one key ``projection`` (shared) or keys
        ``projection.{s}_{t}`` (per pair), and the mapping as JSON in the
        metadata key ``mapping``.

    Returns
    -------
    LoadedProjection
        ``(projection, mapping, shared)``; ``ProgressiveDistillation(mapping,
        projection=projection)`` (or ``pkd.torch.PKDHiddenLoss`` of it) starts
        from the fitted projection(s). float16 is returned as float32.

    Raises
    ------
    FileNotFoundError, DumpError
        No file; not safetensors; no projection key, or both forms; keys that
        disagree with the recorded mapping; an array that is not a 2-D float.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such projection file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise DumpError(f"{path}: not a valid safetensors file: {exc}") from exc
    pairs = {}
    for key in tensors:
        m = _PAIR_KEY.fullmatch(key)
        if m:
            pairs[(int(m.group(1)), int(m.group(2)))] = key
        elif key != "projection":
            raise DumpError(f"{path}: unexpected key {key!r}; a projection file holds "
                            "'projection' or 'projection.{s}_{t}' keys (from `pkd fit`)")
    shared = "projection" in tensors
    if shared == bool(pairs):
        raise DumpError(
            f"{path}: expected one key 'projection' (shared) or keys 'projection.{{s}}_{{t}}' "
            f"(per pair), found {sorted(tensors) or 'none'}"
        )
    for key, value in tensors.items():
        if value.ndim != 2 or value.dtype.kind != "f":
            raise DumpError(f"{path}: key {key!r} must be a 2-D float array, got "
                            f"{value.dtype} of shape {value.shape}")
        if value.dtype == np.float16:
            tensors[key] = value.astype(np.float32)
    mapping = None
    if "mapping" in metadata:
        try:
            mapping = [tuple(int(i) for i in pair) for pair in json.loads(metadata["mapping"])]
            if not all(len(pair) == 2 for pair in mapping):
                raise ValueError("pairs of two layer indices")
        except (ValueError, TypeError) as exc:
            raise DumpError(f"{path}: metadata 'mapping' must be a JSON list of [s, t] pairs, "
                            f"got {metadata['mapping']!r} ({exc})") from exc
    if shared:
        return LoadedProjection(tensors["projection"], mapping, True)
    if mapping is None:
        mapping = sorted(pairs)
    elif set(mapping) != set(pairs):
        raise DumpError(
            f"{path}: the per-pair keys {sorted(pairs)} do not match the recorded mapping "
            f"{mapping}"
        )
    return LoadedProjection({pair: tensors[pairs[pair]] for pair in mapping}, mapping, False)
