"""Writing arrays in memory to a dump (:func:`save_dump`), and the checks of what is written.

The checks (:func:`check_save_layer`, :func:`check_metadata`,
:func:`refuse_torch`) also serve the batch-by-batch writer,
:class:`pkd._dump_writer.DumpWriter`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from pkd._atomic import atomic_open, atomic_path
from pkd._dump_format import MASK_KEY, NPZ_METADATA_KEY, STACKED_KEY, format_of
from pkd._validation import as_layers, check_float_array, check_mask


def _is_torch(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def refuse_torch(x, name: str) -> None:
    if _is_torch(x):
        raise TypeError(
            f"{name} is a torch tensor; dumps take NumPy arrays: pass "
            "[h.float().cpu().numpy() for h in out.hidden_states] (and "
            "attention_mask.cpu().numpy()), or dump a model's hidden states directly with "
            "pkd.hf.dump_hidden_states or `pkd dump`"
        )


def check_save_layer(x, name: str) -> np.ndarray:
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


def check_metadata(metadata) -> dict[str, str]:
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
        :attr:`pkd.io.Dump.layers` is accepted (to convert a dump).
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
        :attr:`pkd.io.Dump.metadata`.

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
    fmt = format_of(path)
    given_stacked = not isinstance(layers, (list, tuple))
    refuse_torch(layers, "layers")
    for i, x in enumerate(layers if isinstance(layers, (list, tuple)) else ()):
        refuse_torch(x, f"layers[{i}]")
    refuse_torch(attention_mask, "attention_mask")
    arrays = [
        check_save_layer(x, f"layers[{i}]") for i, x in enumerate(as_layers(layers, "layers"))
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
    meta = check_metadata(metadata)
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
