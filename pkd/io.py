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
"""

from __future__ import annotations

import contextlib
import json
import numbers
import os
import re
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from pkd._atomic import BackgroundWriter, atomic_open, atomic_path, write_at
from pkd._validation import as_layers, check_float_array, check_mask, check_positive_int

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


def _dumps_inside(directory: Path, shown: int = 10) -> str:
    """Which dump files ``directory`` holds, for the message that refuses the directory."""
    found = sorted(p.name for p in directory.iterdir()
                   if p.suffix.lower() in _FORMATS and p.is_file())
    if not found:
        return "it holds no '.safetensors' or '.npz' file"
    more = f" and {len(found) - shown} more" if len(found) > shown else ""
    return f"pass one of the dump files in it: {', '.join(found[:shown])}{more}"


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

    def __len__(self) -> int:
        """The length of the first axis: B (3-D layers) or N (2-D)."""
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        """Read part of the layer: ints and slices, NumPy's rules (negative indices wrap).

        ``layer[:10]``, ``layer[3]``, ``layer[2:5, :7]``, ``layer[..., 0]``.
        From ``.safetensors`` only the covering rows are read (a strided
        slice reads the range it spans); from ``.npz`` the layer is loaded
        whole first. Index arrays and boolean masks are refused: read the
        layer (``np.asarray(layer)``) or use :meth:`rows`.

        Returns
        -------
        numpy.ndarray
            dtype :attr:`dtype`.
        """
        read, post, shape = self._plan_index(key)
        if 0 in shape:  # safetensors refuses empty slices at the end of an axis
            return np.empty(shape, dtype=self.dtype)
        arr = self._cast(self._source.get(self.key, self._prefix + read))
        return arr[post]

    def _plan_index(self, key) -> tuple[tuple, tuple, tuple[int, ...]]:
        """Split ``key`` into (what to read, what to take from it, the result's shape)."""
        key = key if isinstance(key, tuple) else (key,)
        ellipses = [i for i, k in enumerate(key) if k is Ellipsis]
        if len(ellipses) > 1:
            raise IndexError(f"{self!r}: an index can only have a single ellipsis ('...')")
        if ellipses:
            at = ellipses[0]
            fill = (slice(None),) * (self.ndim - len(key) + 1)
            key = key[:at] + fill + key[at + 1:]
        if len(key) > self.ndim:
            raise IndexError(
                f"{self!r}: too many indices ({len(key)}) for a layer of shape {self.shape}"
            )
        read, post, shape = [], [], []
        for axis, k in enumerate(key):
            n = self.shape[axis]
            if isinstance(k, slice):
                picked = range(*k.indices(n))
                if len(picked) == 0:
                    read.append(slice(0, 0))
                    post.append(slice(None))
                    shape.append(0)
                    continue
                low, high = min(picked), max(picked) + 1
                read.append(slice(low, high))
                post.append(slice(picked[0] - low, None, picked.step))
                shape.append(len(picked))
            elif isinstance(k, numbers.Integral) and not isinstance(k, (bool, np.bool_)):
                if not -n <= k < n:
                    raise IndexError(
                        f"{self!r}: index {int(k)} is out of bounds for axis {axis} of size {n}"
                    )
                read.append(int(k) % n)
            else:
                raise TypeError(
                    f"{self!r}: indices must be ints or slices, got {type(k).__name__}; for "
                    "index arrays or boolean masks read the layer first (np.asarray(layer)) "
                    "or stream it with rows()"
                )
        shape.extend(self.shape[len(key):])
        return tuple(read), tuple(post), tuple(shape)

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

    def __len__(self) -> int:
        """L, the number of layers (``len(dump)``)."""
        return len(self.layers)

    def __getitem__(self, index):
        """``dump[i]`` is ``dump.layers[i]`` (a :class:`LazyLayer`; slices give a tuple)."""
        return self.layers[index]

    def __iter__(self) -> Iterator[LazyLayer]:
        """Iterate over the layers."""
        return iter(self.layers)

    def _metadata_int(self, key: str) -> int | None:
        value = self.metadata.get(key)
        if value is None or value == "none":
            return None
        if not value.isascii() or not value.isdigit():
            raise DumpError(
                f"{self.path}: metadata {key!r} must be a non-negative integer or 'none', "
                f"got {value!r}"
            )
        return int(value)

    @property
    def embeddings_index(self) -> int | None:
        """The layer holding the embedding output, from the metadata.

        ``0`` for a dump of Hugging Face ``hidden_states`` (written by
        ``pkd dump``); ``None`` when the metadata does not say, or says
        ``"none"`` (the dump holds transformer layers only, e.g. a ``--layers``
        subset without 0): :attr:`has_embeddings` tells the two apart.
        """
        index = self._metadata_int("embeddings_index")
        if index is not None and index >= self.n_layers:
            raise DumpError(
                f"{self.path}: metadata 'embeddings_index' is {index} but the dump has "
                f"{self.n_layers} layer(s)"
            )
        return index

    @property
    def has_embeddings(self) -> bool | None:
        """Whether one layer is the embedding output: None when the metadata does not say."""
        if "embeddings_index" not in self.metadata:
            return None
        return self.embeddings_index is not None

    @property
    def texts_sha256(self) -> str | None:
        """SHA-256 of the texts the dump was made from (metadata), or None.

        The hash of the texts themselves (see ``docs/dump-format.md``), not of
        the file: the same texts from a ``.txt`` and a ``.jsonl`` agree.
        """
        return self.metadata.get("texts_sha256")

    @property
    def n_texts(self) -> int | None:
        """Number of texts the dump was made from (metadata), or None."""
        return self._metadata_int("n_texts")

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
        A directory (its dump files are listed); unknown extension; truncated
        or corrupt file; no ``hidden_states`` keys (the keys found are listed);
        stacked and per-layer keys both present; gaps in per-layer keys;
        ragged layers; a dtype other than float16/32/64; an object array
        (never unpickled); a mask of the wrong shape or with values other
        than 0/1. Messages name the file and key.

    Notes
    -----
    Arrays read from a stacked ``.npz`` (``read``, ``rows``, ``np.asarray``)
    are read-only views of the cached stack: copy them (``np.array(layer)``
    does) before modifying in place.
    """
    path = Path(path)
    if path.is_dir():  # before the extension check: a directory's suffix says nothing
        raise DumpError(f"{path} is a directory, not a dump file; {_dumps_inside(path)}")
    fmt = _format_of(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such dump file")
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
    _refuse_torch(layers, "layers")
    for i, x in enumerate(layers if isinstance(layers, (list, tuple)) else ()):
        _refuse_torch(x, f"layers[{i}]")
    _refuse_torch(attention_mask, "attention_mask")
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
# Writing a dump batch by batch.


def _is_torch(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _refuse_torch(x, name: str) -> None:
    if _is_torch(x):
        raise TypeError(
            f"{name} is a torch tensor; dumps take NumPy arrays: pass "
            "[h.float().cpu().numpy() for h in out.hidden_states] (and "
            "attention_mask.cpu().numpy()), or dump a model's hidden states directly with "
            "pkd.hf.dump_hidden_states or `pkd dump`"
        )


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
        Stored in the header (:attr:`Dump.metadata`).
    padding_side : {"right", "left"}
        Where batches shorter than ``seq_len`` get their padding; use the
        tokenizer's, so padding stays on one side.

    Examples
    --------
    Two batches of token states, the second shorter (``seq_len`` 4):

    >>> import tempfile
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
        self.metadata = _check_metadata(metadata)
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
        _refuse_torch(layers, "layers")
        arrays = []
        for i, x in enumerate(as_layers(layers, "layers")):
            _refuse_torch(x, f"layers[{i}]")
            arrays.append(_check_save_layer(x, f"layers[{i}]"))
        batch, where = arrays[0].shape[0], f"batch {self.rows_written}..."
        for i, a in enumerate(arrays):
            if a.shape[:-1] != arrays[0].shape[:-1]:
                raise ValueError(
                    f"{where}: layers[{i}] has shape {a.shape} but layers[0] has "
                    f"{arrays[0].shape}; all layers need the same leading shape"
                )
        mask = None
        if attention_mask is not None:
            _refuse_torch(attention_mask, "attention_mask")
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
