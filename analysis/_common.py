"""Helpers shared by the analysis scripts: where results go, and atomic writes.

Every script writes into ``analysis/results/<name>/`` (``<name>-quick/`` for a
``--quick`` smoke run, so that a quick run never overwrites the figures the
README embeds), or into the directory given with ``--out``. Every file is
written atomically (temporary file + rename), through :mod:`pkd._atomic` or
:func:`pkd.plots.save_figure`.
"""

from __future__ import annotations

import json
from pathlib import Path

from pkd._atomic import atomic_open

ANALYSIS = Path(__file__).resolve().parent
RESULTS = ANALYSIS / "results"


def output_dir(name: str, out: str | None, quick: bool) -> Path:
    """The directory a script writes into (created if missing).

    Parameters
    ----------
    name : str
        The script's name, e.g. ``"mapping_study"``.
    out : str or None
        ``--out`` from the command line; ``None`` for the default
        ``analysis/results/<name>`` (``<name>-quick`` when ``quick``).
    quick : bool
        Whether this is a ``--quick`` smoke run.
    """
    path = Path(out) if out is not None else RESULTS / (f"{name}-quick" if quick else name)
    if path.exists() and not path.is_dir():
        raise SystemExit(f"--out {path} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def write_json(path: Path, payload) -> Path:
    """Write ``payload`` as indented JSON to ``path`` atomically."""
    return write_text(path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
