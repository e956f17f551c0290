"""Writing a ``.safetensors`` dump batch by batch: :class:`DumpWriter`.

The header is written from the first batch and every batch goes straight to
its place in a temporary file (through :class:`pkd._atomic.BackgroundWriter`),
renamed into place when all rows are written.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from pkd._atomic import BackgroundWriter, atomic_path, write_at
from pkd._dump_format import MASK_KEY, DumpError
from pkd._dump_save import check_metadata, check_save_layer, refuse_torch
from pkd._validation import as_layers, check_mask, check_positive_int


class _Slot(NamedTuple):
    """Where one tensor of a :class:`DumpWriter` lives in the file."""

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype  # stored, little-endian
    offset: int  # of its first byte in the file
    row_bytes: int  # bytes per leading-axis entry


_NP_TO_ST = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32",
             np.dtype(np.float64): "F64", np.dtype(np.uint8): "U8"}


class DumpWriter:
    """Write a ``.safetensors`` dump batch by batch, holding one batch at a time.

    The file's size is known from ``n_rows`` (and ``seq_len``), so the header
    is written at the first :meth:`append` and every batch goes straight to
    its place in a temporary file next to ``path``; :meth:`close` renames it
    into place once all ``n_rows`` rows are written. An error, an interrupt,
    or a writer closed early leaves no file (and an existing ``path``
    untouched). Memory: one batch (plus a copy of one layer of it when it is
    padded to ``seq_len`` or cast to the stored dtype; with ``wait=False``,
    the batch being written and its copies as well). Each layer of a batch is
    one write (its rows are contiguous in the file), made by a thread with
    ``wait=False``, and another thread flushes what was written to disk while
    the caller computes the next batch (:class:`pkd._atomic.BackgroundWriter`),
    so :meth:`close` (which still calls ``fsync`` before the rename) finds
    little left to flush.

    Token-level batches may be shorter than ``seq_len``: each is padded to
    ``seq_len`` on ``padding_side`` with zeros, and the stored
    ``attention_mask`` marks the real tokens (0 on the padding).

    Parameters
    ----------
    path : str or os.PathLike
        Ends in ``.safetensors``.
    n_rows : int
        Examples in the whole dump (the sum of the batch sizes), N or B.
    seq_len : int, optional
        T, the stored sequence length of token-level ``(B, T, d)`` layers.
        Default: the first batch's length (then every batch must have it).
        Give the longest tokenised length to pad shorter batches to it.
    metadata : dict of str to str, optional
        Stored in the header (:attr:`pkd.io.Dump.metadata`).
    padding_side : {"right", "left"}
        Where batches shorter than ``seq_len`` get their padding; use the
        tokenizer's, so padding stays on one side.

    Examples
    --------
    Two batches of token states, the second shorter (``seq_len`` 4):

    >>> import tempfile
    >>> from pkd.io import load_dump
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = Path(tmp.name) / "t.safetensors"
    >>> with DumpWriter(path, n_rows=3, seq_len=4) as writer:
    ...     writer.append([np.ones((2, 4, 8), np.float32)], attention_mask=np.ones((2, 4)))
    ...     writer.append([np.ones((1, 2, 8), np.float32)], attention_mask=np.ones((1, 2)))
    >>> with load_dump(path) as dump:
    ...     print(dump.lead_shape, dump.attention_mask.sum(axis=1), dump[0][2, :, 0])
    (3, 4) [4 4 2] [1. 1. 0. 0.]
    >>> tmp.cleanup()

    From a model, batch by batch (``T``: the longest tokenised text)::

        with DumpWriter("t.safetensors", n_rows=len(texts), seq_len=T) as writer:
            for batch in batches:
                out = model(**batch, output_hidden_states=True)
                writer.append([h.float().numpy() for h in out.hidden_states],
                              attention_mask=batch["attention_mask"].numpy())

    Notes
    -----
    Layers are stored per key (``hidden_states.0`` ...): widths may differ.
    Each layer keeps the dtype of the first batch (float16, float32 or
    float64); later batches are cast to it (float16 → exact, wider → rounded).
    """

    def __init__(self, path: str | os.PathLike, n_rows: int, *, seq_len: int | None = None,
                 metadata: Mapping[str, str] | None = None, padding_side: str = "right"):
        self.path = Path(path)
        if self.path.suffix.lower() != ".safetensors":
            raise DumpError(
                f"{self.path}: DumpWriter writes .safetensors only (a .npz cannot be written "
                "batch by batch); give a path ending in .safetensors"
            )
        self.n_rows = check_positive_int(n_rows, "n_rows")
        self.seq_len = None if seq_len is None else check_positive_int(seq_len, "seq_len")
        if padding_side not in ("right", "left"):
            raise ValueError(f'padding_side must be "right" or "left", got {padding_side!r}')
        self.padding_side = padding_side
        self.metadata = check_metadata(metadata)
        self.rows_written = 0
        self._layout: list[_Slot] | None = None
        self._file = None
        self._io: BackgroundWriter | None = None
        self._stack = contextlib.ExitStack()
        self._tmp = self._stack.enter_context(atomic_path(self.path))
        self.closed = False

    # -- layout ------------------------------------------------------------

    def _start(self, arrays: list[np.ndarray], mask: np.ndarray | None) -> None:
        """Write the header from the first batch's layers and open the data region."""
        token_level = arrays[0].ndim == 3
        if token_level and self.seq_len is None:
            self.seq_len = arrays[0].shape[1]
        lead = (self.n_rows, self.seq_len) if token_level else (self.n_rows,)
        tensors = [(f"hidden_states.{i}", lead + a.shape[-1:], a.dtype)
                   for i, a in enumerate(arrays)]
        if mask is not None:
            tensors.append((MASK_KEY, lead, np.dtype(np.uint8)))
        header: dict[str, Any] = {}
        layout, offset = [], 0
        for key, shape, dtype in tensors:
            size = int(np.prod(shape)) * dtype.itemsize
            header[key] = {"dtype": _NP_TO_ST[dtype], "shape": list(shape),
                           "data_offsets": [offset, offset + size]}
            layout.append((key, shape, dtype, offset))
            offset += size
        if self.metadata:
            header["__metadata__"] = self.metadata
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the format allows space padding; 8-byte aligned data
        start = 8 + len(raw)
        self._file = open(self._tmp, "r+b", buffering=0)  # noqa: SIM115 - closed in close()
        write_at(self._file.fileno(), 0, len(raw).to_bytes(8, "little") + raw)
        self._file.truncate(start + offset)  # the whole size at once; the batches fill it
        self._io = BackgroundWriter(self._file.fileno(), str(self.path))
        self._layout = [_Slot(k, s, d.newbyteorder("<"), start + o,
                              int(np.prod(s[1:])) * d.itemsize) for k, s, d, o in layout]

    def _check_batch(self, layers, attention_mask):
        refuse_torch(layers, "layers")
        arrays = []
        for i, x in enumerate(as_layers(layers, "layers")):
            refuse_torch(x, f"layers[{i}]")
            arrays.append(check_save_layer(x, f"layers[{i}]"))
        batch, where = arrays[0].shape[0], f"batch {self.rows_written}..."
        for i, a in enumerate(arrays):
            if a.shape[:-1] != arrays[0].shape[:-1]:
                raise ValueError(
                    f"{where}: layers[{i}] has shape {a.shape} but layers[0] has "
                    f"{arrays[0].shape}; all layers need the same leading shape"
                )
        mask = None
        if attention_mask is not None:
            refuse_torch(attention_mask, "attention_mask")
            mask = check_mask(attention_mask, arrays[0].shape[:-1], "attention_mask")
        if self._layout is None:
            return arrays, mask, batch
        expected = [(slot.shape[1:], slot.dtype) for slot in self._layout
                    if slot.key != MASK_KEY]
        if len(arrays) != len(expected):
            raise ValueError(f"{where}: {len(arrays)} layers, but the first batch had "
                             f"{len(expected)}")
        for i, (a, (shape, _)) in enumerate(zip(arrays, expected, strict=True)):
            if a.ndim - 1 != len(shape) or a.shape[-1] != shape[-1]:
                raise ValueError(
                    f"{where}: layers[{i}] has shape {a.shape}; the dump stores rows of shape "
                    f"{shape} (from the first batch)"
                )
            if a.ndim == 3 and a.shape[1] > self.seq_len:
                raise ValueError(
                    f"{where}: layers[{i}] has sequence length {a.shape[1]}, longer than "
                    f"seq_len={self.seq_len}; give DumpWriter the longest length as seq_len"
                )
        has_mask = self._layout[-1].key == MASK_KEY
        if has_mask != (mask is not None):
            raise ValueError(
                f"{where}: attention_mask is {'missing' if has_mask else 'given'}, but the "
                f"first batch {'had' if has_mask else 'had none'}; give one for every batch "
                "or for none"
            )
        return arrays, mask, batch

    def append(self, layers, attention_mask=None, *, wait: bool = True) -> None:
        """Write the next batch of rows.

        Parameters
        ----------
        layers : sequence of array_like
            One array per layer: ``(b, d_l)`` (pooled) or ``(b, t, d_l)``
            (token states, ``t <= seq_len``), float16/32/64, NumPy (not torch).
        attention_mask : array_like, optional
            0/1 of shape ``(b, t)`` (or ``(b,)``); needed when ``t < seq_len``.
            Give it for every batch or for none.
        wait : bool
            Return once the batch is written (the default). ``False``: return
            at once, a thread writing it while the caller computes the next
            batch; the arrays must then stay unmodified until the next
            :meth:`append` or :meth:`close` (which wait for it). At most one
            batch is in flight.

        Raises
        ------
        ValueError, TypeError
            Shapes, dtypes or mask inconsistent with the first batch, more rows
            than ``n_rows``, a shorter batch without a mask. The batch is not
            written; the writer stays usable.
        OSError
            Writing, or flushing earlier batches to disk, failed. The writer
            will not produce a file: :meth:`close` raises too.
        """
        if self.closed:
            raise DumpError(f"{self.path}: the writer is closed")
        arrays, mask, batch = self._check_batch(layers, attention_mask)
        if self.rows_written + batch > self.n_rows:
            raise ValueError(
                f"batch of {batch} rows after {self.rows_written} would exceed "
                f"n_rows={self.n_rows}"
            )
        seq = arrays[0].shape[1] if arrays[0].ndim == 3 else None
        if seq is not None and mask is None and seq != (self.seq_len or seq):
            raise ValueError(
                f"a batch of length {seq} is padded to seq_len={self.seq_len} and needs an "
                "attention_mask (to mark the padding)"
            )
        if self._layout is None:
            self._start(arrays, mask)
        self._io.wait()  # the previous batch is written (and released): one at a time in flight
        values = arrays + ([mask.astype(np.uint8)] if mask is not None else [])
        parts = []
        for slot, value in zip(self._layout, values, strict=True):
            if seq is not None and seq < self.seq_len:  # padded to seq_len: one block, one write
                block = np.zeros((batch, *slot.shape[1:]), dtype=slot.dtype)
                at = slice(0, seq) if self.padding_side == "right" else slice(-seq, None)
                block[:, at] = value
            else:
                block = np.ascontiguousarray(value, dtype=slot.dtype)
            offset = slot.offset + self.rows_written * slot.row_bytes
            if wait:  # one layer's copy at a time, as memory goes
                self._io.write_now(offset, block)
            else:
                parts.append((offset, block))
        if parts:
            self._io.write(parts)
        self.rows_written += batch

    # -- finishing ---------------------------------------------------------

    def close(self) -> Path:
        """Finish the file and rename it into place.

        Raises
        ------
        DumpError
            Fewer than ``n_rows`` rows were appended (nothing is written).
        OSError
            Writing or flushing to disk failed (nothing is written).
        """
        if self.closed:
            return self.path
        if self.rows_written != self.n_rows:
            error = DumpError(
                f"{self.path}: {self.rows_written} of n_rows={self.n_rows} rows were "
                "appended; nothing written"
            )
            self.abort(error)
            raise error
        try:
            self._io.stop()
        except OSError as error:
            self.abort(error)
            raise
        self._file.close()
        self.closed = True
        self._stack.close()  # fsync (the tail the thread did not flush) and rename
        return self.path

    def abort(self, error: BaseException | None = None) -> None:
        """Drop the temporary file; ``path`` is left as it was."""
        if self.closed:
            return
        self.closed = True
        if self._io is not None:
            self._io.stop(check=False)
        if self._file is not None:
            self._file.close()
        error = error or DumpError(f"{self.path}: writing aborted")
        self._stack.__exit__(type(error), error, error.__traceback__)

    def __enter__(self) -> DumpWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self.abort(exc)
        else:
            self.close()

    def __del__(self):
        # A writer dropped without close() leaves no temporary file behind.
        if not getattr(self, "closed", True):
            with contextlib.suppress(Exception):  # at interpreter exit modules may be gone
                self.abort()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.rows_written}/{self.n_rows} rows"
        return f"DumpWriter({str(self.path)!r}, {state})"
