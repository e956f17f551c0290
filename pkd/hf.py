"""Hidden states of a Hugging Face model, dumped to disk batch by batch (``pkd dump``).

:func:`dump_hidden_states` runs a ``transformers`` model on texts with
``output_hidden_states=True`` under ``torch.inference_mode()`` and streams
every batch to a ``.safetensors`` dump through :class:`pkd.io.DumpWriter`:
memory stays bounded by one batch whatever the number of texts, and an error
or an interrupt leaves no file. :func:`load_model` opens a local model
directory (never the network), :func:`read_texts` reads ``.txt``, ``.jsonl``,
``.csv`` and ``.tsv`` files. The layout and the metadata are described in
``docs/dump-format.md``.

Needs the ``pkd[hf]`` extra (``transformers``, ``torch``); imported lazily.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ._validation import check_positive_int
from .io import DumpWriter

__all__ = ["POOLS", "dump_hidden_states", "load_model", "read_texts", "texts_sha256"]

POOLS = ("none", "cls", "mean")
DTYPES = ("float32", "float16")
TEXT_FORMATS = (".txt", ".jsonl", ".csv", ".tsv")


# ---------------------------------------------------------------------------
# Texts.


def texts_sha256(texts: Sequence[str]) -> str:
    """SHA-256 of a list of texts: that of its compact JSON encoding in UTF-8.

    ``hashlib.sha256(json.dumps(texts, ensure_ascii=False,
    separators=(",", ":")).encode("utf-8")).hexdigest()``: unambiguous for
    texts holding newlines, and the same whichever file format they came from.
    """
    encoded = json.dumps(list(texts), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(encoded.encode("utf-8")).hexdigest()


def _decode(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ValueError(
            f"--texts {path}: not UTF-8 text: byte {exc.start} (line {line}) is "
            f"{raw[exc.start:exc.start + 1]!r}; convert the file to UTF-8 "
            "(e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _blank(path: Path, line: int, what: str) -> ValueError:
    return ValueError(
        f"--texts {path}: {what} on line {line} is blank; remove it (every text becomes one "
        "row of the dump, and pkd pairs the rows of two dumps one to one: a blank text "
        "would be a meaningless row)"
    )


def read_texts(path: str | os.PathLike, *, field: str | None = None,
               column: str | None = None) -> list[str]:
    """Read the texts to dump, one per row, in file order.

    Parameters
    ----------
    path : str or os.PathLike
        ``.txt``: one text per line. ``.jsonl``: one JSON object per line,
        the text under ``field``. ``.csv`` / ``.tsv``: a header row, the text
        in ``column``. UTF-8 (a byte-order mark is skipped).
    field : str, optional
        The JSON key of the text (``.jsonl`` only; required there).
    column : str, optional
        The column holding the text (``.csv`` / ``.tsv`` only; required there).

    Returns
    -------
    list of str

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        An unknown extension, an empty file, bytes that are not UTF-8, a blank
        line or text (refused, with its line number: skipping it would shift
        rows), a missing ``field``/``column`` or one absent from a record,
        malformed JSON, a text that is not a string, ``field``/``column``
        given for the wrong format.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TEXT_FORMATS:
        raise ValueError(f"--texts {path}: unknown extension {path.suffix!r}; give a "
                         f"{', '.join(TEXT_FORMATS)} file")
    if not path.is_file():
        raise FileNotFoundError(f"--texts {path}: no such file")
    if field is not None and suffix != ".jsonl":
        raise ValueError(f"--field is for .jsonl files; {path} is {suffix}")
    if column is not None and suffix not in (".csv", ".tsv"):
        raise ValueError(f"--column is for .csv and .tsv files; {path} is {suffix}")
    text = _decode(path, path.read_bytes())
    if not text.strip():
        raise ValueError(f"--texts {path} is empty: there is nothing to dump")
    if suffix == ".txt":
        lines = text.splitlines()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                raise _blank(path, number, "the text")
        return lines
    if suffix == ".jsonl":
        return _read_jsonl(path, text, field)
    return _read_table(path, text, column, "\t" if suffix == ".tsv" else ",")


def _read_jsonl(path: Path, text: str, field: str | None) -> list[str]:
    if field is None:
        raise ValueError(f"--texts {path} is .jsonl: say which key holds the text with --field")
    texts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            raise _blank(path, number, "the record")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--texts {path}: line {number} is not valid JSON: {exc}") from None
        if not isinstance(record, dict):
            raise ValueError(f"--texts {path}: line {number} is not a JSON object")
        if field not in record:
            keys = ", ".join(map(repr, list(record)[:8])) or "none"
            raise ValueError(f"--field {field!r} is missing from line {number} of {path} "
                             f"(its keys: {keys})")
        value = record[field]
        if not isinstance(value, str):
            raise ValueError(f"--texts {path}: line {number}: {field!r} is "
                             f"{type(value).__name__}, not a string")
        if not value.strip():
            raise _blank(path, number, f"the text in {field!r}")
        texts.append(value)
    return texts


def _read_table(path: Path, text: str, column: str | None, delimiter: str) -> list[str]:
    if column is None:
        raise ValueError(f"--texts {path} is a table: say which column holds the text with "
                         "--column")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
        if column not in header:
            raise ValueError(f"--column {column!r} is not in the header of {path} (columns: "
                             f"{', '.join(map(repr, header))})")
        at = header.index(column)
        texts = []
        for row in reader:
            number = reader.line_num
            if not row:
                raise _blank(path, number, "the row")
            if at >= len(row) or not row[at].strip():
                raise _blank(path, number, f"the text in column {column!r}")
            texts.append(row[at])
    except csv.Error as exc:
        raise ValueError(f"--texts {path}: malformed table near line {reader.line_num}: "
                         f"{exc}") from None
    if not texts:
        raise ValueError(f"--texts {path} has a header but no rows: there is nothing to dump")
    return texts


# ---------------------------------------------------------------------------
# The model.


def load_model(model_dir: str | os.PathLike):
    """Load a local Hugging Face model and its tokenizer (``local_files_only=True``).

    Parameters
    ----------
    model_dir : str or os.PathLike
        A directory written by ``save_pretrained``: ``config.json``, weights
        (``model.safetensors`` or ``pytorch_model.bin``) and the tokenizer's
        files.

    Returns
    -------
    model, tokenizer
        ``AutoModel`` (in eval mode) and ``AutoTokenizer`` instances.

    Raises
    ------
    FileNotFoundError
        No such directory, or no ``config.json`` in it.
    ValueError
        No weights, or no tokenizer files (transformers would otherwise build a
        tokenizer with an empty vocabulary without a word).
    ImportError
        transformers is not installed (``pip install 'pkd[hf]'``).
    """
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:
        raise ImportError(f"pkd dump needs transformers and torch: pip install 'pkd[hf]' "
                          f"({exc})") from exc
    directory = Path(model_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"MODEL_DIR {directory}: no such directory (pkd dump reads a "
                                "local model saved with save_pretrained; it never downloads)")
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"MODEL_DIR {directory} has no config.json: save the model "
                                "there with model.save_pretrained(MODEL_DIR)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"MODEL_DIR {directory}: cannot load a tokenizer: {exc}") from None
    names = set(getattr(tokenizer, "vocab_files_names", {}).values()) | {"tokenizer.json"}
    if not any((directory / name).is_file() for name in names):
        raise ValueError(
            f"MODEL_DIR {directory} has no tokenizer files (none of {', '.join(sorted(names))}): "
            "save the tokenizer there with tokenizer.save_pretrained(MODEL_DIR)"
        )
    from transformers.utils import logging as hf_logging

    quiet = not sys.stderr.isatty() and hf_logging.is_progress_bar_enabled()
    if quiet:  # transformers' weight-loading bar would land in logs
        hf_logging.disable_progress_bar()
    try:
        model = AutoModel.from_pretrained(str(directory), local_files_only=True)
    except OSError as exc:
        raise ValueError(f"MODEL_DIR {directory}: cannot load the model's weights: {exc} "
                         "(save them with model.save_pretrained(MODEL_DIR))") from None
    finally:
        if quiet:
            hf_logging.enable_progress_bar()
    return model.eval(), tokenizer


def _position_limit(model, tokenizer) -> int | None:
    """The longest input the model takes, from its config (or the tokenizer)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit < 1_000_000:
        limit = tok_limit if limit is None else min(limit, tok_limit)
    return limit


class _Tokens(NamedTuple):
    """Every text tokenised once, unpadded: what a batch's model input is padded from.

    ``ids[key]`` holds the tokenizer's output ``key`` (``input_ids``,
    ``token_type_ids``, ...) for all texts end to end, ``(total_tokens,)``
    int32; text ``i`` is ``[offsets[i], offsets[i + 1])``, ``offsets`` being
    ``(N + 1,)`` int64. A few bytes per token, far less than its hidden states.
    """

    ids: dict[str, np.ndarray]
    offsets: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        """Token count of every text, ``(N,)`` int64."""
        return np.diff(self.offsets)


def _tokenise(tokenizer, texts, max_length: int | None, chunk_size: int = 1024) -> _Tokens:
    """Tokenise ``texts`` unpadded (truncated to ``max_length``), in chunks, into a _Tokens."""
    lengths, parts = [], []
    for start in range(0, len(texts), chunk_size):
        enc = tokenizer(list(texts[start:start + chunk_size]), truncation=max_length is not None,
                        max_length=max_length, padding=False, return_attention_mask=False,
                        verbose=False)
        counts = np.fromiter(map(len, enc["input_ids"]), dtype=np.int64,
                             count=len(enc["input_ids"]))
        total = int(counts.sum())
        lengths.append(counts)
        parts.append({key: np.fromiter(itertools.chain.from_iterable(values), dtype=np.int32,
                                       count=total)
                      for key, values in enc.items()})
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(np.concatenate(lengths), out=offsets[1:])
    return _Tokens({key: np.concatenate([part[key] for part in parts]) for key in parts[0]},
                   offsets)


# What each tokenizer output is padded with, as transformers pads it (its ``_pad`` and the
# fast tokenizers' backend): the main input gets the pad token, ``token_type_ids`` the pad
# type id, ``special_tokens_mask`` 1 (padding is special).
_PADDED_KEYS = ("token_type_ids", "special_tokens_mask")


def _pad_values(tokenizer, keys) -> dict[str, int]:
    """The value padding takes in each of ``keys`` (a tokenizer's outputs), as it pads them.

    Raises
    ------
    ValueError
        The tokenizer has no padding token (it refuses ``padding=True`` too), or
        returns an output it does not pad (a batch of it could not be a tensor).
    """
    main = tokenizer.model_input_names[0]
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if getattr(tokenizer, "pad_token", None) is None or pad_id is None or pad_id < 0:
        raise ValueError(
            f"{type(tokenizer).__name__} has no padding token, and a token-level dump pads "
            "every batch: set one (e.g. tokenizer.pad_token = tokenizer.eos_token, then "
            "tokenizer.save_pretrained(MODEL_DIR))"
        )
    values = {}
    for key in keys:
        if key == main:
            values[key] = int(pad_id)
        elif key == "token_type_ids":
            values[key] = int(tokenizer.pad_token_type_id)
        elif key == "special_tokens_mask":
            values[key] = 1
        else:
            raise ValueError(
                f"{type(tokenizer).__name__} returns {key!r}, which it does not pad (it pads "
                f"{main!r} and {', '.join(map(repr, _PADDED_KEYS))}): pkd cannot batch it"
            )
    return values


def _padded_batch(tokenizer, tokens: _Tokens, start: int, stop: int):
    """Texts ``start:stop`` as model input, padded in NumPy to their longest.

    The same tensors as ``tokenizer(texts[start:stop], padding=True,
    return_tensors="pt")`` (on the tokenizer's ``padding_side``, with its pad
    token and pad token type id, an ``attention_mask`` when the model takes
    one), without tokenising again or building Python lists.

    Returns
    -------
    batch : dict of str to torch.Tensor
        ``input_ids`` etc. ``(B, T_batch)`` int64, and ``attention_mask``
        when ``"attention_mask"`` is one of ``tokenizer.model_input_names``.
    real : numpy.ndarray
        ``(B, T_batch)`` bool, True on the texts' own tokens.
    """
    import torch

    lengths = tokens.offsets[start + 1:stop + 1] - tokens.offsets[start:stop]
    width = int(lengths.max())
    positions = np.arange(width)
    if getattr(tokenizer, "padding_side", "right") == "left":
        real = positions >= (width - lengths)[:, None]
    else:
        real = positions < lengths[:, None]
    # Row-major order of the True cells is the texts' tokens end to end, for either side.
    first, last = tokens.offsets[start], tokens.offsets[stop]
    batch = {}
    for key, value in _pad_values(tokenizer, tokens.ids).items():
        padded = np.full(real.shape, value, dtype=np.int64)
        padded[real] = tokens.ids[key][first:last]
        batch[key] = torch.from_numpy(padded)
    if "attention_mask" in tokenizer.model_input_names:
        batch["attention_mask"] = torch.from_numpy(real.astype(np.int64))
    return batch, real


def _check_lengths(lengths: np.ndarray, limit: int | None, first: int) -> None:
    """Refuse texts longer than the model takes; ``first`` is the index of lengths[0]."""
    if limit is None or lengths.max() <= limit:
        return
    others = int(np.count_nonzero(lengths > limit)) - 1
    raise ValueError(
        f"text {first + int(lengths.argmax())} (0-based) has {int(lengths.max())} tokens, more "
        f"than the model takes ({limit})" + (f", and so do {others} more" if others else "")
        + f"; pass max_length (--max-length {limit}) to truncate"
    )


def _pooled(hidden: np.ndarray, mask: np.ndarray, pool: str, dtype: np.dtype) -> np.ndarray:
    """Pool one ``(B, T, d)`` batch with its ``(B, T)`` bool mask; ``(B, d)`` or ``(B, T, d)``.

    NumPy rather than torch: on small batches torch's intra-op thread pool
    costs more than the arithmetic. ``hidden`` may be modified (its padding
    zeroed).
    """
    if pool == "none":  # padding holds zeros, whatever the batch it was padded in
        if not mask.all():
            hidden[~mask] = 0
        return hidden.astype(dtype, copy=False)
    if pool == "cls":  # the first position the mask keeps: right for left padding too
        return hidden[np.arange(len(hidden)), mask.argmax(axis=1)].astype(dtype, copy=False)
    if not mask.all():
        hidden[~mask] = 0
    counts = mask.sum(axis=1, keepdims=True)
    return (hidden.sum(axis=1, dtype=np.float64) / counts).astype(dtype)


def dump_hidden_states(
    model,
    tokenizer,
    texts: Sequence[str],
    path: str | os.PathLike,
    *,
    batch_size: int = 32,
    max_length: int | None = None,
    pool: str = "none",
    dtype: str = "float32",
    layers: Sequence[int] | None = None,
    progress: bool | None = None,
    metadata: Mapping[str, str] | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Run ``model`` on ``texts`` and write its hidden states to a ``.safetensors`` dump.

    Every batch is tokenised (padded to its longest text on the tokenizer's
    ``padding_side``; each text is tokenised once), run with
    ``output_hidden_states=True`` under ``torch.inference_mode()``, pooled,
    converted and written; memory stays bounded by one batch.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        Returns ``hidden_states`` (embeddings at index 0, transformer layer
        ``i`` at index ``i``). Put in eval mode for the run (restored after).
    tokenizer : transformers tokenizer
        Called on lists of texts; its ``padding_side`` is respected.
    texts : sequence of str
        One row (pooled) or one sequence (``pool="none"``) of the dump each.
    path : str or os.PathLike
        The dump to write, ``.safetensors``; written atomically.
    batch_size : int
        Texts per forward pass.
    max_length : int, optional
        Truncate texts to this many tokens. Default: no truncation, and a text
        longer than the model takes is an error naming it.
    pool : {"none", "cls", "mean"}
        ``"none"``: token states ``(N, T, d)`` with ``attention_mask``
        ``(N, T)``; all sequences are padded to T, the longest tokenised
        text (all texts are tokenised before the model runs, and each batch
        is padded from those token ids, a few bytes per token), on the
        tokenizer's padding side, and every padding position holds zeros.
        ``"cls"``: the first real token of each text (the first position its
        attention mask keeps, so left padding is handled), ``(N, d)``.
        ``"mean"``: the mean over real tokens, ``(N, d)``. Pooled dumps store
        no mask (every row counts).
    dtype : {"float32", "float16"}
        Stored dtype (the mean is accumulated in float64; float16 halves the
        disk, and pkd reads it back as float32).
    layers : sequence of int, optional
        ``hidden_states`` indices to keep, in order (default all,
        ``0..num_hidden_layers``). Stored as ``hidden_states.0``, ... in that
        order; the metadata key ``layers`` records the original indices.
    progress : bool, optional
        A tqdm bar on stderr; default: only when stderr is a terminal.
    metadata : dict of str to str, optional
        Extra metadata (e.g. the texts file's name); overrides nothing pkd
        records itself (a clash is an error).
    log : callable(str), optional
        Receives one-line notes on what was assumed (e.g. the padding length).

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    ValueError
        Empty ``texts`` or a text that is not a string; ``batch_size`` or
        ``max_length`` not a positive int; an unknown ``pool`` or ``dtype``;
        ``layers`` out of range or repeated; a text longer than the model
        takes without ``max_length``; a model that returns no
        ``hidden_states``. Nothing is written.
    """
    import torch

    from . import __version__

    if isinstance(texts, str) or not isinstance(texts, Sequence) or len(texts) == 0:
        raise ValueError("texts must be a non-empty list of strings")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"texts[{i}] is {type(text).__name__}, not a string")
    batch_size = check_positive_int(batch_size, "batch_size (--batch-size)")
    if max_length is not None:
        max_length = check_positive_int(max_length, "max_length (--max-length)")
    if pool not in POOLS:
        raise ValueError(f"pool (--pool) must be one of {', '.join(POOLS)}, got {pool!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype (--dtype) must be one of {', '.join(DTYPES)}, got {dtype!r}")
    n_hidden = getattr(model.config, "num_hidden_layers", None)
    if n_hidden is None:
        raise ValueError(f"{type(model).__name__}'s config has no num_hidden_layers: cannot "
                         "tell its hidden_states apart")
    if layers is None:
        layers = list(range(n_hidden + 1))
    else:
        layers = [int(i) for i in layers]
        bad = [i for i in layers if not 0 <= i <= n_hidden]
        if bad or not layers or len(set(layers)) != len(layers):
            raise ValueError(
                f"layers (--layers) must be distinct hidden_states indices 0..{n_hidden} "
                f"(0 the embeddings, {n_hidden} the last layer), got {layers}"
            )
    limit = _position_limit(model, tokenizer)
    tokens = longest = None
    if pool == "none":  # T, the stored length, is needed first; pooled dumps check each batch
        tokens = _tokenise(tokenizer, texts, max_length)
        _pad_values(tokenizer, tokens.ids)  # refuse a tokenizer that cannot pad, before the model
        lengths = tokens.lengths
        longest = int(lengths.max())
        _check_lengths(lengths, limit, 0)
    stored = np.dtype(dtype)
    side = getattr(tokenizer, "padding_side", "right")
    config = model.config
    info = {
        "pkd_version": __version__,
        "model": Path(str(getattr(config, "_name_or_path", "") or "")).name or "unknown",
        "model_class": type(model).__name__,
        "model_type": str(getattr(config, "model_type", "unknown")),
        "tokenizer_class": type(tokenizer).__name__,
        "num_hidden_layers": str(n_hidden),
        "layers": json.dumps(layers),
        "n_layers": str(len(layers)),
        "embeddings_index": str(layers.index(0)) if 0 in layers else "none",
        "pooling": pool,
        "max_length": "none" if max_length is None else str(max_length),
        "seq_len": str(longest) if pool == "none" else "none",
        "padding_side": side,
        "dtype": dtype,
        "n_texts": str(len(texts)),
        "texts_sha256": texts_sha256(texts),
    }
    for key, value in (metadata or {}).items():
        if key in info:
            raise ValueError(f"metadata key {key!r} is recorded by pkd itself")
        info[key] = value
    if pool == "none" and log is not None:
        log(f"token-level dump: every sequence padded to {longest} tokens (the longest text) "
            f"on the {side}; attention_mask marks the real tokens")
    show = sys.stderr.isatty() if progress is None else bool(progress)
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    writer = None
    try:
        with torch.inference_mode(), tqdm(total=len(texts), unit="text", desc="pkd dump",
                                          disable=not show, file=sys.stderr) as bar:
            for start in range(0, len(texts), batch_size):
                stop = min(start + batch_size, len(texts))
                if tokens is not None:  # each text is tokenised once
                    batch, mask = _padded_batch(tokenizer, tokens, start, stop)
                else:
                    batch = tokenizer(list(texts[start:stop]), padding=True,
                                      truncation=max_length is not None, max_length=max_length,
                                      return_tensors="pt")
                    mask = batch["attention_mask"].numpy().astype(bool)
                if tokens is None and limit is not None and batch["input_ids"].shape[1] > limit:
                    _check_lengths(batch["attention_mask"].sum(dim=1).numpy(), limit, start)
                batch = {k: v.to(device) for k, v in batch.items()}
                out = model(**batch, output_hidden_states=True)
                hidden = getattr(out, "hidden_states", None)
                if hidden is None:
                    raise ValueError(f"{type(model).__name__} returned no hidden_states")
                if writer is None:
                    widths = [int(hidden[i].shape[-1]) for i in layers]
                    info["widths"] = json.dumps(widths)
                    writer = DumpWriter(path, len(texts),
                                        seq_len=longest if pool == "none" else None,
                                        metadata=info, padding_side=side)
                arrays = []
                for i in layers:
                    h = hidden[i]
                    h = h.float() if h.dtype not in (torch.float32, torch.float64) else h
                    arrays.append(_pooled(h.cpu().numpy(), mask, pool, stored))
                # The arrays are this batch's own: written while the next batch runs.
                writer.append(arrays, mask if pool == "none" else None, wait=False)
                bar.update(stop - start)
        return writer.close()
    except BaseException as exc:
        if writer is not None:
            writer.abort(exc)
        raise
    finally:
        model.train(was_training)
