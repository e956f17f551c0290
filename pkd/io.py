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
* ``.safetensors`` is read lazily: :meth:`LazyLayer.rows` and
  :meth:`Dump.iter_chunks` read only the requested rows from the memory-mapped
  file, so a dump larger than memory streams with a peak of one chunk per
  layer. **Use safetensors for large dumps.**
* ``.npz`` members are zip entries that can only be read whole: each access to
  a per-layer key loads that layer, :meth:`Dump.iter_chunks` loads each
  requested layer once, and a stacked ``hidden_states`` is loaded whole on
  first access and kept (read-only) until :meth:`Dump.close`.
* Loading never modifies the file; :func:`save_dump` writes atomically (temp
  file + rename), so an interrupted save never leaves a partial dump.

Writing a dump from Hugging Face transformers (index 0 of ``hidden_states``
is the embedding output, index ``i`` the output of transformer layer ``i``)::

    import torch, pkd.io
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    pkd.io.save_dump("teacher.safetensors", [h.numpy() for h in out.hidden_states],
                     attention_mask=batch["attention_mask"].numpy())

(For a bfloat16 model write ``h.float().numpy()``.)
"""

from __future__ import annotations

import json
import numbers
import os
import re
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pkd._atomic import atomic_open, atomic_path
from pkd._validation import as_layers, check_float_array, check_mask, check_positive_int

__all__ = ["Dump", "DumpError", "LazyLayer", "load_dump", "save_dump"]

STACKED_KEY = "hidden_states"
MASK_KEY = "attention_mask"
NPZ_METADATA_KEY = "__metadata__"
_LAYER_KEY = re.compile(r"hidden_states\.(.*)")
_FORMATS = {".npz": "npz", ".safetensors": "safetensors"}
# safetensors dtype codes of the floats we read; everything else is refused.
_ST_FLOATS = {"F16": np.dtype(np.float16), "F32": np.dtype(np.float32),
              "F64": np.dtype(np.float64)}
_ST_MASK = {"BOOL": np.dtype(bool), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
            "U16": np.dtype(np.uint16), "I16": np.dtype(np.int16),
            "U32": np.dtype(np.uint32), "I32": np.dtype(np.int32),
            "U64": np.dtype(np.uint64), "I64": np.dtype(np.int64),
            "F16": np.dtype(np.float16), "F32": np.dtype(np.float32),
            "F64": np.dtype(np.float64)}
# What a damaged file can raise from the zip / npy / safetensors readers.
_NPZ_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError)


class DumpError(ValueError):
    """A dump file is malformed, unsafe or unsupported (the message names file and key)."""


def _format_of(path: Path) -> str:
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DumpError(
            f"{path}: unknown dump extension {path.suffix!r}; a dump must be a "
            "'.safetensors' or '.npz' file"
        )
    return fmt


def _read_dtype(path: Path, key: str, dtype: Any) -> np.dtype:
    """The dtype a layer is *returned* in (float16 → float32), or raise."""
    if isinstance(dtype, str):  # a safetensors code
        if dtype == "BF16":
            raise DumpError(
                f"{path}: key {key!r} is bfloat16, which NumPy cannot read; save the "
                "layers as float32 (torch: h.float().numpy()) or float16"
            )
        if dtype not in _ST_FLOATS:
            raise DumpError(
                f"{path}: key {key!r} has dtype {dtype}; hidden states must be float16, "
                "float32 or float64"
            )
        dtype = _ST_FLOATS[dtype]
    if dtype.hasobject:
        raise DumpError(
            f"{path}: key {key!r} is an object array; refusing to unpickle: loading a "
            "dump must never run code. Save plain float arrays"
        )
    if dtype.kind != "f" or dtype.itemsize not in (2, 4, 8):
        raise DumpError(
            f"{path}: key {key!r} has dtype {dtype}; hidden states must be float16, "
            "float32 or float64"
        )
    return np.dtype(np.float32) if dtype.itemsize == 2 else np.dtype(f"f{dtype.itemsize}")


# ---------------------------------------------------------------------------
# Readers: the only code that touches a file's bytes.


class _SafetensorsSource:
    """Lazy reads from a memory-mapped safetensors file."""

    format = "safetensors"

    def __init__(self, path: Path):
        from safetensors import SafetensorError, safe_open

        self.path = path
        self._errors = (SafetensorError, OSError, TypeError, ValueError)
        self._file = None
        try:
            self._file = safe_open(str(path), framework="numpy")
            self.entries = {}
            for key in self._file.keys():
                sl = self._file.get_slice(key)
                self.entries[key] = (tuple(int(n) for n in sl.get_shape()), sl.get_dtype())
            self.metadata = dict(self._file.metadata() or {})
        except self._errors as exc:
            if self._file is not None:
                self._file.__exit__(None, None, None)
            raise DumpError(
                f"{path}: not a valid safetensors file (truncated or corrupt?): {exc}"
            ) from exc
        self._slices: dict[str, Any] = {}
        self.closed = False

    def get(self, key: str, index: tuple) -> np.ndarray:
        if self.closed:
            raise DumpError(f"{self.path}: the dump is closed; load it again")
        try:
            sl = self._slices.get(key)
            if sl is None:
                sl = self._slices[key] = self._file.get_slice(key)
            return sl[index] if index else sl[:]
        except self._errors as exc:
            raise DumpError(f"{self.path}: cannot read key {key!r}{list(index)}: {exc}") from exc

    def close(self) -> None:
        if not self.closed:
            self._slices.clear()
            self._file.__exit__(None, None, None)
            self.closed = True


class _NpzSource:
    """Reads from a .npz archive: headers up front, data only on request."""

    format = "npz"

    def __init__(self, path: Path):
        self.path = path
        self.entries = {}
        self.metadata: dict[str, str] = {}
        try:
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    if not info.filename.endswith(".npy"):
                        continue  # not an array; np.load would hand back raw bytes
                    key = info.filename[:-4]
                    with zf.open(info) as fp:
                        self.entries[key] = _npy_header(path, key, fp)
            self._npz = np.load(path, allow_pickle=False, mmap_mode=None)
        except DumpError:
            raise
        except _NPZ_READ_ERRORS as exc:
            raise DumpError(
                f"{path}: not a valid .npz file (truncated or corrupt?): {exc}"
            ) from exc
        if not isinstance(self._npz, np.lib.npyio.NpzFile):  # pragma: no cover - zip checked
            raise DumpError(f"{path}: not a .npz archive")
        self._cache: dict[str, np.ndarray] = {}
        self.closed = False
        if NPZ_METADATA_KEY in self.entries:
            try:
                self.metadata = self._read_metadata()
            except BaseException:
                self.close()
                raise

    def _read_metadata(self) -> dict[str, str]:
        raw = self.load(NPZ_METADATA_KEY)
        try:
            if raw.dtype.kind != "U" or raw.ndim != 0:
                raise TypeError(f"a 0-d unicode array, got dtype {raw.dtype} shape {raw.shape}")
            meta = json.loads(str(raw))
            if not isinstance(meta, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
            ):
                raise TypeError("a JSON object of string to string")
        except (TypeError, ValueError) as exc:
            raise DumpError(
                f"{self.path}: key {NPZ_METADATA_KEY!r} must hold a JSON object of string "
                f"to string: {exc}"
            ) from exc
        return meta

    def load(self, key: str, *, keep: bool = False) -> np.ndarray:
        """The whole array ``key``; ``keep`` caches it (read-only) until close."""
        if self.closed:
            raise DumpError(f"{self.path}: the dump is closed; load it again")
        if key in self._cache:
            return self._cache[key]
        try:
            arr = self._npz[key]
        except ValueError as exc:
            if "pickle" in str(exc).lower() or "object" in str(exc).lower():
                raise DumpError(
                    f"{self.path}: key {key!r} is an object array; refusing to unpickle: "
                    "loading a dump must never run code"
                ) from exc
            raise DumpError(f"{self.path}: cannot read key {key!r}: {exc}") from exc
        except _NPZ_READ_ERRORS as exc:
            raise DumpError(
                f"{self.path}: cannot read key {key!r} (truncated or corrupt?): {exc}"
            ) from exc
        if keep:
            arr.flags.writeable = False
            self._cache[key] = arr
        return arr

    def get(self, key: str, index: tuple) -> np.ndarray:
        # A stacked array would be decompressed once per layer per call: keep it
        # (callers get read-only views). A per-layer key is loaded for this call
        # only; copy a part so it does not pin the whole layer in memory.
        if key == STACKED_KEY:
            arr = self.load(key, keep=True)
            return arr[index] if index else arr
        arr = self.load(key)
        return arr[index].copy() if index else arr

    def close(self) -> None:
        if not self.closed:
            self._cache.clear()
            self._npz.close()
            self.closed = True


def _npy_header(path: Path, key: str, fp) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one ``.npy`` member, read without loading or unpickling."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fp)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, _, dtype = fmt.read_array_header_2_0(fp)
        else:  # 3.0 only serves structured dtypes with non-latin-1 field names
            raise DumpError(
                f"{path}: key {key!r} uses .npy format version {version}, which pkd does "
                "not read (it only serves structured arrays); save plain float arrays"
            )
    except DumpError:
        raise
    except _NPZ_READ_ERRORS as exc:
        raise DumpError(f"{path}: key {key!r} has no valid .npy header: {exc}") from exc
    return tuple(int(n) for n in shape), dtype


# ---------------------------------------------------------------------------
# Public objects.


def _check_range(start, stop, n: int, what: str) -> tuple[int, int]:
    for name, v in (("start", start), ("stop", stop)):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{what}: {name} must be an int, got {v!r}")
    start, stop = int(start), int(stop)
    if not 0 <= start <= stop <= n:
        raise ValueError(
            f"{what}: row range [{start}, {stop}) is not within [0, {n}] "
            "(need 0 <= start <= stop <= N; negative indices do not wrap)"
        )
    return start, stop


class LazyLayer:
    """One layer of a dump, read from the file on demand.

    Attributes
    ----------
    key : str
        The file key: ``"hidden_states"`` (stacked) or ``"hidden_states.{index}"``.
    index : int
        The layer's index in the dump.
    shape : tuple of int
        ``(N, d)`` or ``(B, T, d)``.
    dtype : numpy.dtype
        The dtype arrays are returned in: float32 or float64 (float16 files
        are upcast to float32).
    stored_dtype : numpy.dtype
        The dtype in the file.
    """

    def __init__(self, source, key: str, index: int, stacked: bool,
                 shape: tuple[int, ...], stored_dtype: np.dtype, dtype: np.dtype):
        self._source = source
        self.key = key
        self.index = index
        self._prefix = (index,) if stacked else ()
        self.shape = shape
        self.stored_dtype = stored_dtype
        self.dtype = dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def n_rows(self) -> int:
        """N: rows of the flattened ``(N, d)`` view (``B·T`` for 3-D layers)."""
        return int(np.prod(self.shape[:-1]))

    @property
    def width(self) -> int:
        """d, the hidden width."""
        return self.shape[-1]

    def _cast(self, arr: np.ndarray) -> np.ndarray:
        return arr.astype(self.dtype, copy=False)

    def read(self) -> np.ndarray:
        """The whole layer, shape :attr:`shape`, dtype :attr:`dtype`."""
        return self._cast(self._source.get(self.key, self._prefix))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """The whole layer, for ``np.asarray`` / ``np.array`` (NumPy 2 protocol).

        ``copy=True`` (``np.array``'s default) always gives a writable array
        of its own; ``copy=None`` may give a read-only view of a stacked
        ``.npz``'s cache; ``copy=False`` is refused (the data is read from disk).
        """
        if copy is False:
            raise ValueError(f"{self!r} is read from disk: a copy cannot be avoided")
        arr = self.read()
        if dtype is not None:
            arr = arr.astype(dtype, copy=False)
        # Only a view of the stacked .npz cache is read-only; everything else is fresh.
        return arr.copy() if copy and not arr.flags.writeable else arr

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of the flattened ``(N, d)`` view.

        For ``.safetensors`` only those rows are read from the file (for a
        ``(B, T, d)`` layer: a partial first sequence, whole middle sequences,
        a partial last one). For ``.npz`` the layer is loaded whole first.

        Returns
        -------
        numpy.ndarray
            ``(stop - start, d)``, dtype :attr:`dtype`.
        """
        start, stop = _check_range(start, stop, self.n_rows, f"{self!r}.rows")
        d = self.width
        if start == stop:  # safetensors refuses empty slices at the end of an axis
            return np.empty((0, d), dtype=self.dtype)
        get, key, pre = self._source.get, self.key, self._prefix
        if self.ndim == 2:
            return self._cast(get(key, pre + (slice(start, stop),)))
        seq_len = self.shape[1]
        b0, t0 = divmod(start, seq_len)
        b1, t1 = divmod(stop, seq_len)
        if b0 == b1:
            return self._cast(get(key, pre + (b0, slice(t0, t1))))
        parts = []
        if t0:
            parts.append(get(key, pre + (b0, slice(t0, seq_len))))
            b0 += 1
        if b1 > b0:
            parts.append(get(key, pre + (slice(b0, b1),)).reshape(-1, d))
        if t1:
            parts.append(get(key, pre + (b1, slice(0, t1))))
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return self._cast(out)

    def __repr__(self) -> str:
        return (f"LazyLayer({str(self._source.path)!r}, key={self.key!r}, index={self.index}, "
                f"shape={self.shape}, dtype={self.dtype})")


class Dump:
    """Hidden states of one model read from a dump file (see the module docstring).

    Use :func:`load_dump` to create one; close it (or use it as a context
    manager) to release the file.

    Attributes
    ----------
    path : pathlib.Path
        The file.
    format : {"safetensors", "npz"}
    layers : tuple of LazyLayer
        One per layer, in order; each accepted wherever pkd takes an array
        (it implements ``__array__``).
    lead_shape : tuple of int
        ``(B, T)`` or ``(N,)``: every dimension of a layer but the width.
    attention_mask : numpy.ndarray of bool or None
        Shape :attr:`lead_shape`.
    metadata : dict of str to str
    stacked : bool
        The file stores one ``hidden_states`` array rather than per-layer keys.
    extra_keys : tuple of str
        Keys in the file that are not part of the dump format (ignored).
    mask_key : str
        The key the mask was read from (the ``mask_key`` of :func:`load_dump`).
    """

    def __init__(self, source, layers: tuple[LazyLayer, ...], lead_shape: tuple[int, ...],
                 attention_mask: np.ndarray | None, stacked: bool, extra_keys: tuple[str, ...],
                 mask_key: str = MASK_KEY):
        self._source = source
        self.path = source.path
        self.format = source.format
        self.layers = layers
        self.lead_shape = lead_shape
        self.attention_mask = attention_mask
        self.metadata = dict(source.metadata)
        self.stacked = stacked
        self.extra_keys = extra_keys
        self.mask_key = mask_key

    @property
    def n_layers(self) -> int:
        """L, the number of layers."""
        return len(self.layers)

    @property
    def n_rows(self) -> int:
        """N, rows of the flattened view (``B·T`` for 3-D layers)."""
        return int(np.prod(self.lead_shape))

    def _layer_index(self, layer, what: str) -> int:
        if isinstance(layer, (bool, np.bool_)) or not isinstance(layer, numbers.Integral):
            raise TypeError(f"{what} must be an int layer index, got {layer!r}")
        if not 0 <= layer < self.n_layers:
            raise ValueError(
                f"{what}={layer} is out of range: {self.path} has {self.n_layers} layer(s) "
                f"(valid indices 0..{self.n_layers - 1}; negative indices do not wrap)"
            )
        return int(layer)

    def width(self, layer: int) -> int:
        """Hidden width d of ``layer``."""
        return self.layers[self._layer_index(layer, "layer")].width

    def mask_rows(self, start: int, stop: int) -> np.ndarray | None:
        """The flattened mask for rows ``[start, stop)``: bool ``(stop - start,)``, or None."""
        start, stop = _check_range(start, stop, self.n_rows, "Dump.mask_rows")
        if self.attention_mask is None:
            return None
        return self.attention_mask.reshape(-1)[start:stop]

    def iter_chunks(
        self, chunk_rows: int, layers: Sequence[int] | None = None
    ) -> Iterator[tuple[int, int, list[np.ndarray]]]:
        """Stream the rows of some layers in chunks, in order, each row once.

        Parameters
        ----------
        chunk_rows : int
            Rows per chunk (the last chunk may be shorter).
        layers : sequence of int, optional
            Layer indices to read (default: all), in the order wanted.

        Yields
        ------
        start, stop : int
            The rows ``[start, stop)`` of the flattened ``(N, d)`` view.
        arrays : list of numpy.ndarray
            One ``(stop - start, d_l)`` array per requested layer. From a
            ``.safetensors`` file only these rows are read, so peak memory is
            one chunk per layer whatever N; from ``.npz`` each requested layer
            is loaded whole once and the arrays are read-only views of it.
        """
        chunk_rows = check_positive_int(chunk_rows, "chunk_rows")
        if layers is None:
            wanted = list(range(self.n_layers))
        else:
            if isinstance(layers, (str, bytes)) or not isinstance(layers, (Sequence, np.ndarray)):
                raise TypeError(f"layers must be a sequence of layer indices, got {layers!r}")
            wanted = [self._layer_index(i, f"layers[{k}]") for k, i in enumerate(layers)]
        return self._chunks(chunk_rows, wanted)

    def _chunks(self, chunk_rows: int, wanted: list[int]):
        if self.format == "safetensors":
            readers = [self.layers[i].rows for i in wanted]
        else:
            readers = []
            for i in wanted:
                flat = self.layers[i].read().reshape(self.n_rows, -1)
                flat.flags.writeable = False
                readers.append(lambda a, b, flat=flat: flat[a:b])
        n = self.n_rows
        for start in range(0, n, chunk_rows):
            stop = min(start + chunk_rows, n)
            yield start, stop, [read(start, stop) for read in readers]

    def close(self) -> None:
        """Release the file (reads afterwards raise)."""
        self._source.close()

    def __enter__(self) -> Dump:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __reduce__(self):
        # An open file cannot be pickled; a worker reopens the dump by path (and mask key).
        return _reopen, (str(self.path), self.mask_key)

    def __repr__(self) -> str:
        mask = "with" if self.attention_mask is not None else "no"
        return (f"Dump({str(self.path)!r}, {self.n_layers} layers, lead_shape={self.lead_shape}, "
                f"{mask} attention_mask)")


# ---------------------------------------------------------------------------
# Loading.


def _layer_keys(path: Path, entries: Mapping[str, tuple],
                mask_key: str = MASK_KEY) -> tuple[bool, list[str], list[str]]:
    """Decide stacked vs per-layer; return (stacked, layer keys in order, extra keys)."""
    per_layer: dict[int, str] = {}
    extra = []
    for key in entries:
        m = _LAYER_KEY.fullmatch(key)
        if m is None:
            if key not in (STACKED_KEY, mask_key, NPZ_METADATA_KEY):
                extra.append(key)
            continue
        suffix = m.group(1)
        if not suffix.isdigit() or not suffix.isascii() or str(int(suffix)) != suffix:
            raise DumpError(
                f"{path}: unexpected key {key!r}; per-layer keys must be "
                "'hidden_states.0', 'hidden_states.1', ... (decimal, no leading zeros)"
            )
        per_layer[int(suffix)] = key
    has_stacked = STACKED_KEY in entries
    if has_stacked and per_layer:
        raise DumpError(
            f"{path}: ambiguous dump: it has both a stacked {STACKED_KEY!r} key and "
            f"per-layer keys ({', '.join(sorted(per_layer.values())[:3])}, ...); keep one form"
        )
    if has_stacked:
        return True, [STACKED_KEY], extra
    if not per_layer:
        found = ", ".join(repr(k) for k in sorted(entries)) or "none"
        raise DumpError(
            f"{path}: no hidden states: expected a key {STACKED_KEY!r} (stacked, "
            f"(L, B, T, d) or (L, N, d)) or keys 'hidden_states.0' ... "
            f"'hidden_states.{{L-1}}'; keys found: {found}"
        )
    missing = sorted(set(range(max(per_layer) + 1)) - set(per_layer))
    if missing:
        shown = ", ".join(f"'hidden_states.{i}'" for i in missing[:5])
        raise DumpError(
            f"{path}: per-layer keys have gaps: {shown}{' ...' if len(missing) > 5 else ''} "
            f"missing (found {len(per_layer)} of 'hidden_states.0' ... "
            f"'hidden_states.{max(per_layer)}')"
        )
    return False, [per_layer[i] for i in range(len(per_layer))], extra


def _build_layers(source, stacked: bool, keys: list[str]):
    path, entries = source.path, source.entries
    layers = []
    if stacked:
        shape, stored = entries[STACKED_KEY]
        dtype = _read_dtype(path, STACKED_KEY, stored)
        if len(shape) not in (3, 4):
            raise DumpError(
                f"{path}: key {STACKED_KEY!r} has shape {shape}; a stacked dump must be "
                "(L, N, d) or (L, B, T, d)"
            )
        if 0 in shape:
            raise DumpError(f"{path}: key {STACKED_KEY!r} is empty (shape {shape})")
        stored = stored if isinstance(stored, np.dtype) else _ST_FLOATS[stored]
        for i in range(shape[0]):
            layers.append(LazyLayer(source, STACKED_KEY, i, True, shape[1:], stored, dtype))
        return tuple(layers), shape[1:-1]
    lead = None
    for i, key in enumerate(keys):
        shape, stored = entries[key]
        dtype = _read_dtype(path, key, stored)
        if len(shape) not in (2, 3):
            raise DumpError(
                f"{path}: key {key!r} has shape {shape}; a layer must be (N, d) or (B, T, d)"
            )
        if 0 in shape:
            raise DumpError(f"{path}: key {key!r} is empty (shape {shape})")
        if lead is None:
            lead = shape[:-1]
        elif shape[:-1] != lead:
            raise DumpError(
                f"{path}: ragged layers: key {key!r} has shape {shape} but "
                f"{keys[0]!r} has shape {entries[keys[0]][0]}; every layer must have the "
                f"same leading shape {lead} (only the width d may differ)"
            )
        stored = stored if isinstance(stored, np.dtype) else _ST_FLOATS[stored]
        layers.append(LazyLayer(source, key, i, False, shape, stored, dtype))
    return tuple(layers), lead


def _read_mask(source, lead: tuple[int, ...], mask_key: str = MASK_KEY) -> np.ndarray | None:
    if mask_key not in source.entries:
        return None
    path = source.path
    shape, stored = source.entries[mask_key]
    if isinstance(stored, str):
        if stored not in _ST_MASK:
            raise DumpError(f"{path}: key {mask_key!r} has dtype {stored}; it must hold 0/1")
    elif stored.hasobject:
        raise DumpError(
            f"{path}: key {mask_key!r} is an object array; refusing to unpickle: loading a "
            "dump must never run code"
        )
    if shape != tuple(lead):  # check before reading: the mask could be anything
        raise DumpError(
            f"{path}: key {mask_key!r} has shape {shape} but the hidden states have leading "
            f"shape {tuple(lead)}: one entry per (batch, position) for (B, T, d) layers, "
            "per row for (N, d) layers"
        )
    raw = source.get(mask_key, ()) if source.format == "safetensors" else source.load(mask_key)
    try:
        return check_mask(raw, lead, f"{path}: key {mask_key!r}")
    except (TypeError, ValueError) as exc:
        raise DumpError(str(exc)) from exc


def load_dump(path: str | os.PathLike, *, mask_key: str = MASK_KEY) -> Dump:
    """Open a hidden-state dump (``.safetensors`` or ``.npz``) and validate its layout.

    Only headers and the mask are read here; layer data is read on demand
    through :attr:`Dump.layers` and :meth:`Dump.iter_chunks`.

    Parameters
    ----------
    path : str or os.PathLike
    mask_key : str
        The key holding the attention mask (default ``"attention_mask"``); a
        dump without that key has no mask.

    Returns
    -------
    Dump

    Raises
    ------
    FileNotFoundError
        No such file.
    DumpError (a ValueError)
        Unknown extension; truncated or corrupt file; no ``hidden_states`` keys
        (the keys found are listed); stacked and per-layer keys both present;
        gaps in per-layer keys; ragged layers; a dtype other than
        float16/32/64; an object array (never unpickled); a mask of the wrong
        shape or with values other than 0/1. Messages name the file and key.

    Notes
    -----
    Arrays read from a stacked ``.npz`` (``read``, ``rows``, ``np.asarray``)
    are read-only views of the cached stack: copy them (``np.array(layer)``
    does) before modifying in place.
    """
    path = Path(path)
    fmt = _format_of(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such dump file")
    if path.is_dir():
        raise DumpError(f"{path} is a directory, not a dump file")
    source = _SafetensorsSource(path) if fmt == "safetensors" else _NpzSource(path)
    try:
        stacked, keys, extra = _layer_keys(path, source.entries, mask_key)
        layers, lead = _build_layers(source, stacked, keys)
        mask = _read_mask(source, lead, mask_key)
    except BaseException:
        source.close()
        raise
    return Dump(source, layers, tuple(lead), mask, stacked, tuple(sorted(extra)), mask_key)


def _reopen(path: str, mask_key: str) -> Dump:
    """Unpickle a :class:`Dump` (``load_dump`` takes ``mask_key`` by keyword only)."""
    return load_dump(path, mask_key=mask_key)


# ---------------------------------------------------------------------------
# Saving.


def _check_save_layer(x, name: str) -> np.ndarray:
    arr = x if isinstance(x, np.ndarray) else None
    if arr is None and not type(x).__module__.startswith("torch"):
        try:
            arr = np.asarray(x)
        except (TypeError, ValueError):
            arr = None
    if arr is not None and arr.dtype == np.float16:  # stored as is, upcast on read
        if arr.ndim not in (2, 3) or arr.size == 0:
            raise ValueError(f"{name} must be a non-empty 2-D or 3-D array, got shape {arr.shape}")
        return arr
    return check_float_array(x if arr is None else arr, name, ndims=(2, 3), check_finite=False)


def _check_metadata(metadata) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise TypeError(f"metadata must be a dict of str to str, got {metadata!r}")
    if NPZ_METADATA_KEY in metadata:
        raise ValueError(f"metadata may not use the reserved key {NPZ_METADATA_KEY!r}")
    return dict(metadata)


def save_dump(
    path: str | os.PathLike,
    layers,
    attention_mask=None,
    *,
    stacked: bool | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write hidden states to a dump file, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Ends in ``.safetensors`` or ``.npz``, which chooses the format.
    layers : sequence of array_like, or array_like
        Per-layer arrays, each ``(N, d)`` or ``(B, T, d)`` with one leading
        shape for all, float16/32/64 (widths may differ in the per-layer
        form); or one stacked array ``(L, N, d)`` / ``(L, B, T, d)``.
        :attr:`Dump.layers` is accepted (to convert a dump).
    attention_mask : array_like, optional
        0/1 (bool, int or float) of the leading shape ``(B, T)`` / ``(N,)``;
        stored as ``uint8``.
    stacked : bool, optional
        Store one ``hidden_states`` array (needs one width and dtype) rather
        than keys ``hidden_states.{i}``. Default: stacked iff ``layers`` is
        one array.
    metadata : dict of str to str, optional
        Free text stored with the dump (the safetensors header's metadata; a
        JSON string under ``__metadata__`` in .npz) and returned as
        :attr:`Dump.metadata`.

    Returns
    -------
    pathlib.Path
        ``path``. The file is written to a temporary file in the same
        directory and renamed into place: a failed save leaves no file.

    Notes
    -----
    Values are stored exactly (no cast); NaN/Inf are not checked here.
    """
    path = Path(path)
    fmt = _format_of(path)
    given_stacked = not isinstance(layers, (list, tuple))
    arrays = [
        _check_save_layer(x, f"layers[{i}]") for i, x in enumerate(as_layers(layers, "layers"))
    ]
    lead = arrays[0].shape[:-1]
    for i, a in enumerate(arrays[1:], start=1):
        if a.shape[:-1] != lead:
            raise ValueError(
                f"layers disagree on rows: layers[0] has shape {arrays[0].shape}, layers[{i}] "
                f"has shape {a.shape}; all layers need the same leading shape (only the "
                "width d may differ)"
            )
    stacked = given_stacked if stacked is None else bool(stacked)
    if stacked:
        shapes, dtypes = {a.shape for a in arrays}, {a.dtype for a in arrays}
        if len(shapes) > 1 or len(dtypes) > 1:
            raise ValueError(
                "stacked=True needs layers of one shape and dtype, got shapes "
                f"{sorted(shapes)} and dtypes {sorted(map(str, dtypes))}; save per-layer "
                "keys (stacked=False) or cast/pad the layers"
            )
        # A stacked input is written as given (no second copy of a big array).
        whole = layers if given_stacked and isinstance(layers, np.ndarray) else np.stack(arrays)
        tensors = {STACKED_KEY: np.ascontiguousarray(whole)}
    else:
        tensors = {f"hidden_states.{i}": np.ascontiguousarray(a) for i, a in enumerate(arrays)}
    if attention_mask is not None:
        tensors[MASK_KEY] = check_mask(attention_mask, lead, "attention_mask").astype(np.uint8)
    meta = _check_metadata(metadata)
    if fmt == "safetensors":
        from safetensors.numpy import save_file

        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta or None)
    else:
        if meta:
            tensors[NPZ_METADATA_KEY] = np.array(json.dumps(meta, sort_keys=True))
        with atomic_open(path, "wb") as f:
            np.savez(f, **tensors)
    return path
