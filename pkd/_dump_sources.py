"""Readers of the two dump formats: the only code that touches a dump file's bytes.

:class:`SafetensorsSource` reads a memory-mapped ``.safetensors`` file lazily;
:class:`NpzSource` reads a ``.npz`` archive's headers up front (never
unpickling) and its arrays on request. Both expose ``entries`` (key → (shape,
stored dtype)), ``metadata``, ``get(key, index)`` and ``close()``; the lazy
view over them is in :mod:`pkd._dump_read`.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from pkd._dump_format import NPZ_METADATA_KEY, STACKED_KEY, DumpError

# safetensors dtype codes of the floats we read; everything else is refused.
ST_FLOATS = {"F16": np.dtype(np.float16), "F32": np.dtype(np.float32),
             "F64": np.dtype(np.float64)}
ST_MASK = {"BOOL": np.dtype(bool), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
           "U16": np.dtype(np.uint16), "I16": np.dtype(np.int16),
           "U32": np.dtype(np.uint32), "I32": np.dtype(np.int32),
           "U64": np.dtype(np.uint64), "I64": np.dtype(np.int64),
           "F16": np.dtype(np.float16), "F32": np.dtype(np.float32),
           "F64": np.dtype(np.float64)}
# What a damaged file can raise from the zip / npy / safetensors readers.
_NPZ_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError)


def read_dtype(path: Path, key: str, dtype: Any) -> np.dtype:
    """The dtype a layer is *returned* in (float16 → float32), or raise."""
    if isinstance(dtype, str):  # a safetensors code
        if dtype == "BF16":
            raise DumpError(
                f"{path}: key {key!r} is bfloat16, which NumPy cannot read; save the "
                "layers as float32 (torch: h.float().numpy()) or float16"
            )
        if dtype not in ST_FLOATS:
            raise DumpError(
                f"{path}: key {key!r} has dtype {dtype}; hidden states must be float16, "
                "float32 or float64"
            )
        dtype = ST_FLOATS[dtype]
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


class SafetensorsSource:
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


class NpzSource:
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
