"""Which layers the ``pkd`` commands map, and the mappings they take.

Each dump's embeddings index (its metadata, ``--embeddings-index``, or none,
said on stderr), ``--mapping`` by name (uniform, skip, last) or as explicit
pairs, and the optimal mapping by a per-pair measure.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._cli_common import CommandError, Console

FIXED_MAPPINGS = ("uniform", "skip", "last")


def _parse_embeddings_option(text: str | None):
    """``--embeddings-index``: None (not given), "none" or an int >= 0."""
    if text is None:
        return None
    if text.strip().lower() == "none":
        return "none"
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise CommandError(
            f'--embeddings-index must be a layer index >= 0 or "none", got {text!r}'
        )
    return value


@dataclass
class Layers:
    """The layer convention of one dump: which index (if any) holds the embeddings."""

    count: int
    embeddings: int | None
    source: str  # where the convention comes from, for summary.json

    def mappable(self, include_embeddings: bool) -> list[int]:
        """The dump indices the mapping strategies pair: transformer layers, or all."""
        if include_embeddings or self.embeddings is None:
            return list(range(self.count))
        return [i for i in range(self.count) if i != self.embeddings]


def _layer_conventions(student, teacher, args, console: Console) -> tuple[Layers, Layers]:
    """Both dumps' layer conventions; one note on stderr for the dumps that do not say."""
    option = _parse_embeddings_option(args.embeddings_index)
    silent = [path for dump, path in ((student, args.student), (teacher, args.teacher))
              if option is None and dump.has_embeddings is None]
    if silent:
        console.warn(
            f"no embeddings_index in {' or '.join(map(str, silent))}: treating every layer "
            "as a transformer layer; pass --embeddings-index 0 if index 0 holds the "
            "embeddings (as in Hugging Face hidden_states), or --embeddings-index none to "
            "say there are none"
        )
    return (_layer_convention(student, args.student, option),
            _layer_convention(teacher, args.teacher, option))


def _layer_convention(dump, path: str, option) -> Layers:
    """The embeddings' index of ``dump``: its metadata, ``--embeddings-index``, or none."""
    recorded = dump.has_embeddings is not None
    own = dump.embeddings_index
    if option is None:
        if not recorded:
            return Layers(dump.n_layers, None, "assumed: no embeddings (no metadata)")
        index, source = own, f"metadata of {path}"
    else:
        index = None if option == "none" else option
        if recorded and own != index:
            raise CommandError(
                f"--embeddings-index {option} contradicts {path}, whose metadata says "
                f"embeddings_index={own if own is not None else 'none'}: drop the option "
                "(it is for dumps that do not say)"
            )
        source = f"--embeddings-index {option}"
    if index is not None and index >= dump.n_layers:
        raise CommandError(
            f"embeddings index {index} ({source}) is out of range: {path} has "
            f"{dump.n_layers} layer(s)"
        )
    return Layers(dump.n_layers, index, source)


def _fixed_strategies(student: Layers, teacher: Layers, include_embeddings: bool) -> dict:
    """uniform / PKD-Skip / PKD-Last in dump indices, where they exist for these sizes."""
    from . import mapping

    s_layers = student.mappable(include_embeddings)
    t_layers = teacher.mappable(include_embeddings)
    found = {}
    for name in FIXED_MAPPINGS:
        try:
            pairs = mapping.MAPPINGS[name](len(s_layers), len(t_layers))
        except ValueError:
            continue
        found[name] = [(s_layers[s], t_layers[t]) for s, t in pairs]
    return found


def _parse_mapping_arg(text: str, student: Layers, teacher: Layers, include_embeddings: bool):
    """A fixed strategy by name (in dump indices) or explicit pairs, as the CLI spells them."""
    from . import mapping

    name = text.strip().lower()
    if name in FIXED_MAPPINGS:
        strategies = _fixed_strategies(student, teacher, include_embeddings)
        if name not in strategies:  # say why, with the counts the strategy saw
            s_layers = student.mappable(include_embeddings)
            t_layers = teacher.mappable(include_embeddings)
            left_out = len(s_layers) < student.count or len(t_layers) < teacher.count
            try:
                mapping.MAPPINGS[name](len(s_layers), len(t_layers))
            except ValueError as error:
                note = (" (counted in transformer layers: the embeddings are left out unless "
                        "--include-embeddings)" if left_out else "")
                raise CommandError(f"--mapping {text}: {error}{note}") from None
        return strategies[name]
    if ":" not in name:
        raise CommandError(
            f"--mapping {text!r} is not a mapping: choose from uniform, skip, last, optimal, "
            'or give explicit student:teacher pairs such as "0:2,1:5"'
        )
    try:
        return mapping.parse_mapping(text, student.count, teacher.count)
    except (ValueError, TypeError) as error:
        raise CommandError(f"--mapping {text!r}: {error}") from None


def _optimal(matrix, maximize: bool, rows: list[int], cols: list[int], hint: str = ""):
    """``mapping.optimal`` over the mappable layers, or a CommandError saying why none exists."""
    from . import mapping

    n_s, n_t = len(rows), len(cols)
    _check_optimal_exists(n_s, n_t, hint)
    values = np.asarray(matrix)[np.ix_(rows, cols)]
    undefined = np.isnan(values)
    dead_rows = [rows[i] for i in np.flatnonzero(undefined.all(axis=1))]
    if undefined.all():
        raise CommandError(f"no optimal mapping: the measure is undefined (NaN) for every "
                           f"layer pair: constant layers, named in the warnings{hint}")
    if dead_rows:
        raise CommandError(
            f"no optimal mapping: student layer(s) {dead_rows} are constant over the rows "
            f"used (no variance, so the measure is undefined for every pair with them), and "
            f"an optimal mapping maps every student layer{hint}"
        )
    try:
        pairs = mapping.optimal(np.where(undefined, -np.inf if maximize else np.inf, values),
                                maximize=maximize)
    except ValueError as error:
        constant = [cols[j] for j in np.flatnonzero(undefined.all(axis=0))]
        if not constant:
            raise CommandError(f"no optimal mapping: {error}{hint}") from None
        raise CommandError(
            f"no optimal mapping: teacher layer(s) {constant} are constant over the rows "
            f"used (no variance, so the measure is undefined), which leaves fewer "
            f"teacher layers than the {n_s} student layers{hint}"
        ) from None
    return [(rows[s], cols[t]) for s, t in pairs]


# Appended to the reason there is no optimal mapping when --mapping optimal was asked for.
_EXPLICIT_HINT = "; give explicit pairs to --mapping"


def _check_optimal_exists(n_s: int, n_t: int, hint: str = "") -> None:
    if n_s > n_t:
        raise CommandError(
            f"no increasing mapping exists: the student has more layers ({n_s}) than the "
            f"teacher ({n_t}), and a mapping gives each student layer its own, deeper "
            f"teacher layer{hint}"
        )
