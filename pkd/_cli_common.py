"""Plumbing every ``pkd`` command shares.

The user-facing error (:class:`CommandError`, exit status 2), the console that
says warnings on stderr and keeps them for the summary, the checks of output
paths and options made before any work, and opening a student and a teacher
dump as a pair (the same texts, the same mask).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._atomic import check_output_dir


class CommandError(Exception):
    """A user-facing error: printed as ``pkd <command>: error: ...``, exit status 2."""


class Console:
    """stderr notes of one command, also collected for its summary."""

    def __init__(self, command: str):
        self.command = command
        self.warnings: list[str] = []

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        print(f"pkd {self.command}: warning: {text}", file=sys.stderr)


def _on_terminal() -> bool:
    """Progress bars only where a person watches: never into pipes or logs."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def _out_dir(path: str, names=()) -> Path:
    """Check that ``path`` is (or can be created as) a writable directory; create nothing.

    ``names`` are the files the command will write there; one that is a
    directory is refused now rather than after the computation.
    """
    try:
        out = check_output_dir(path, "--out")
    except ValueError as error:
        raise CommandError(str(error)) from None
    for name in names:
        if (out / name).is_dir():
            raise CommandError(f"cannot write {out / name}: it is a directory")
    return out


def _out_file(path: str, flag: str) -> Path:
    """Check that the file ``path`` can be written: its directory exists and is writable."""
    import os

    target = Path(path)
    if target.is_dir():
        raise CommandError(f"{flag} {target} is a directory; give a file name")
    if not target.parent.is_dir():
        raise CommandError(
            f"{flag} {target}: directory {target.parent} does not exist (create it first)"
        )
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise CommandError(f"{flag} {target}: directory {target.parent} is not writable")
    return target


def _check_option(check, value, flag: str):
    """``check(value, flag)`` from pkd._validation, its error as a CommandError."""
    try:
        return check(value, flag)
    except (TypeError, ValueError) as error:
        raise CommandError(str(error)) from None


def _positive_int(value, name):
    from ._validation import check_positive_int

    return check_positive_int(value, name)


def _check_ridge(ridge: float) -> float:
    from ._validation import check_nonnegative

    return _check_option(check_nonnegative, ridge, "--ridge")


def _check_dump_path(path: str, role: str) -> None:
    """A directory given as a dump is named as such, with the dump files it holds."""
    given = Path(path)
    if given.is_dir():
        found = sorted(p.name for p in given.iterdir()
                       if p.suffix.lower() in (".safetensors", ".npz"))
        inside = (f"; it holds {', '.join(found)}" if found else
                  "; it holds no .safetensors or .npz file")
        raise CommandError(
            f"{role} dump {given} is a directory, not a dump file: give the .safetensors or "
            f".npz file itself{inside}"
        )


@dataclass
class MaskUse:
    """The mask a command applies, and where it came from (said on the console and kept)."""

    mask: np.ndarray | None
    description: str  # "no mask", or the key and the file(s) it came from


def _load_pair(args, console: Console):
    """Open both dumps and check they describe the same rows; return (s, t, MaskUse)."""
    from .io import MASK_KEY, check_same_texts, load_dump

    mask_key = args.mask_key
    _check_dump_path(args.student, "student")
    _check_dump_path(args.teacher, "teacher")
    try:
        student = load_dump(args.student, mask_key=mask_key)
        teacher = load_dump(args.teacher, mask_key=mask_key)
    except FileNotFoundError as error:
        raise CommandError(str(error)) from None
    check_same_texts(student, teacher)  # the same texts (where recorded) and rows
    owners = [d for d in (student, teacher) if d.attention_mask is not None]
    if not owners and mask_key != MASK_KEY:
        # A dump may lack the default mask, but a key asked for by name that no dump
        # has is a typo: ignoring it would silently count the padding.
        found = sorted(set(student.extra_keys) | set(teacher.extra_keys))
        raise CommandError(
            f"--mask-key {mask_key!r}: neither {args.student} nor {args.teacher} has that "
            f"key (other keys found: {', '.join(map(repr, found)) or 'none'})"
        )
    if len(owners) == 2 and not np.array_equal(student.attention_mask, teacher.attention_mask):
        n_diff = int((student.attention_mask != teacher.attention_mask).sum())
        raise CommandError(
            f"the dumps' {mask_key!r} masks differ at {n_diff} position(s): "
            f"{args.student} and {args.teacher} must come from the same batch"
        )
    if len(owners) == 2:
        use = MaskUse(student.attention_mask,
                      f"{mask_key!r} of {args.student} and {args.teacher} (identical)")
    elif owners:
        other = args.teacher if owners[0] is student else args.student
        use = MaskUse(owners[0].attention_mask,
                      f"{mask_key!r} of {owners[0].path} ({other} has none)")
    else:
        use = MaskUse(None, "no mask")
        if len(student.lead_shape) == 2:
            console.warn(
                f"neither {args.student} nor {args.teacher} has a {mask_key!r} mask: every "
                f"one of the {student.n_rows} (batch, position) rows counts, padding included "
                "(save the attention mask with the dumps, or name its key with --mask-key)"
            )
    return student, teacher, use
