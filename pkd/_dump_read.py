"""The lazy view of a dump: :func:`load_dump`, :class:`Dump` and :class:`LazyLayer`.

:func:`load_dump` opens a file through a reader of :mod:`pkd._dump_sources`,
checks its layout (layer keys, shapes, dtypes, mask) from the headers alone,
and returns a :class:`Dump` whose layers read rows on demand. The format and
the user-facing description are in :mod:`pkd.io` and ``docs/dump-format.md``.
"""

from __future__ import annotations

import numbers
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from pkd._dump_format import (
    FORMATS,
    MASK_KEY,
    NPZ_METADATA_KEY,
    STACKED_KEY,
    DumpError,
    format_of,
)
from pkd._dump_sources import ST_FLOATS, ST_MASK, NpzSource, SafetensorsSource, read_dtype
from pkd._validation import check_mask, check_positive_int

_LAYER_KEY = re.compile(r"hidden_states\.(.*)")


def _dumps_inside(directory: Path, shown: int = 10) -> str:
    """Which dump files ``directory`` holds, for the message that refuses the directory."""
    found = sorted(p.name for p in directory.iterdir()
                   if p.suffix.lower() in FORMATS and p.is_file())
    if not found:
        return "it holds no '.safetensors' or '.npz' file"
    more = f" and {len(found) - shown} more" if len(found) > shown else ""
    return f"pass one of the dump files in it: {', '.join(found[:shown])}{more}"


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
        dtype = read_dtype(path, STACKED_KEY, stored)
        if len(shape) not in (3, 4):
            raise DumpError(
                f"{path}: key {STACKED_KEY!r} has shape {shape}; a stacked dump must be "
                "(L, N, d) or (L, B, T, d)"
            )
        if 0 in shape:
            raise DumpError(f"{path}: key {STACKED_KEY!r} is empty (shape {shape})")
        stored = stored if isinstance(stored, np.dtype) else ST_FLOATS[stored]
        for i in range(shape[0]):
            layers.append(LazyLayer(source, STACKED_KEY, i, True, shape[1:], stored, dtype))
        return tuple(layers), shape[1:-1]
    lead = None
    for i, key in enumerate(keys):
        shape, stored = entries[key]
        dtype = read_dtype(path, key, stored)
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
        stored = stored if isinstance(stored, np.dtype) else ST_FLOATS[stored]
        layers.append(LazyLayer(source, key, i, False, shape, stored, dtype))
    return tuple(layers), lead


def _read_mask(source, lead: tuple[int, ...], mask_key: str = MASK_KEY) -> np.ndarray | None:
    if mask_key not in source.entries:
        return None
    path = source.path
    shape, stored = source.entries[mask_key]
    if isinstance(stored, str):
        if stored not in ST_MASK:
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
    fmt = format_of(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such dump file")
    source = SafetensorsSource(path) if fmt == "safetensors" else NpzSource(path)
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
