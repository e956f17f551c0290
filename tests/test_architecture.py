"""docs/architecture.md names every module of pkd, and only files that exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCUMENT = ROOT / "docs" / "architecture.md"
# A repository path as the document writes it: pkd/_moments.py, tests/naive.py (also inside
# a relative link such as ../pkd/_moments.py).
PATH = re.compile(r"\b(?:pkd|tests)/[\w/]+\.py\b")


def _modules() -> list[str]:
    """Every module file under pkd/, recursively, except the packages' __init__.py."""
    return sorted(path.relative_to(ROOT).as_posix() for path in (ROOT / "pkd").rglob("*.py")
                  if path.name != "__init__.py" and "__pycache__" not in path.parts)


def _named(text: str) -> set[str]:
    return set(PATH.findall(text))


def test_the_path_pattern_finds_plain_and_linked_paths():
    text = "see `pkd/_moments.py` and [x](../pkd/kernels/_jit.py), not pkd.alignment"
    assert _named(text) == {"pkd/_moments.py", "pkd/kernels/_jit.py"}


def test_every_module_is_named():
    assert len(_modules()) > 40  # the walk found the package
    named = _named(DOCUMENT.read_text(encoding="utf-8"))
    missing = [module for module in _modules() if module not in named]
    assert not missing, (
        f"docs/architecture.md does not name {missing}: add a line for each to its module map"
    )


def test_every_named_file_exists():
    named = _named(DOCUMENT.read_text(encoding="utf-8"))
    absent = sorted(path for path in named if not (ROOT / path).is_file())
    assert not absent, f"docs/architecture.md names files the repository does not have: {absent}"
