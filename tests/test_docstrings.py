"""The examples in pkd's docstrings run and print what they show."""

import doctest
import importlib
import pathlib

import pytest

import pkd

PACKAGE = pathlib.Path(pkd.__file__).parent
# Every module with an example, so that a new one cannot be forgotten.
MODULES = sorted(
    "pkd." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    for path in PACKAGE.rglob("*.py") if ">>>" in path.read_text(encoding="utf-8")
)


def test_modules_with_examples_are_found():
    assert {"pkd.distillation", "pkd.alignment", "pkd.objective"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    if name == "pkd.torch":
        pytest.importorskip("torch")
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    assert result.attempted > 0 or name == "pkd._atomic"  # its one example (a file) is skipped
