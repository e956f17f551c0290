"""README.md's snippets run as written, its commands exist, and it stays a short guide.

How the snippets run:

- Every ```python block runs on its own, in a fresh namespace as ``__main__``,
  in a fresh temporary working directory: blocks share no names, so each must
  be complete (a reader copies one block, not the page).
- A first line ``# needs: torch, transformers`` names the optional modules a
  block imports; the block is skipped when one of them is missing (the
  extras), and only then. A missing pkd API is a failure, never a skip.
- ``runs after the commands above`` on that line means the block uses files
  that the ```bash block just above it writes: the test builds what those
  commands read (two tiny Hugging Face BERT models from configs, nothing
  downloaded, and a texts file, under the names the block uses), runs every
  ``pkd`` command of that block in the same directory, then the Python block.

Every ``pkd`` command line of a ```bash block must parse with
``pkd.cli.build_parser()`` (subcommand and options), every ``make`` target must
exist, and every `pkd NAME` quoted in the text must be a subcommand. The README
stays within 250 lines; its links, and those of docs/*.md, point at files of the
repository only, and every Markdown file they name is one of the repository's.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_LINES = 250
AFTER_COMMANDS = "runs after the commands above"


def _blocks() -> list[tuple[str, str, int]]:
    """(language, code, first line number of the code) for every fenced block."""
    blocks, language, start, lines = [], None, 0, []
    for number, line in enumerate(README.read_text(encoding="utf-8").splitlines(), 1):
        fence = re.match(r"^```(\S*)\s*$", line)
        if fence and language is None:
            language, start, lines = fence.group(1), number + 1, []
        elif fence:
            blocks.append((language, "\n".join(lines) + "\n", start))
            language = None
        elif language is not None:
            lines.append(line)
    assert language is None, f"README.md: the code block opened at line {start - 1} is not closed"
    return blocks


BLOCKS = _blocks()
PYTHON = [(code, line) for language, code, line in BLOCKS if language == "python"]


def _needs(code: str) -> tuple[list[str], bool]:
    """Modules named on a first-line ``# needs:`` comment, and whether the block runs after
    the commands above it."""
    first = code.lstrip().splitlines()[0] if code.strip() else ""
    match = re.match(r"#\s*needs:\s*(.*)", first)
    if not match:
        return [], False
    text = match.group(1)
    after = AFTER_COMMANDS in text
    names = text.split(";")[0]
    return [name.strip() for name in names.split(",") if name.strip()], after


def _commands(code: str) -> list[list[str]]:
    """The command lines of a bash block as argument lists (continuations joined,
    comments dropped)."""
    joined = re.sub(r"\\\n", " ", code)
    commands = []
    for line in joined.splitlines():
        tokens = shlex.split(line, comments=True)
        if tokens:
            commands.append(tokens)
    return commands


def _bash_before(line: int) -> str:
    """The code of the last ```bash block that starts before ``line``."""
    before = [code for language, code, start in BLOCKS if language == "bash" and start < line]
    assert before, f"README.md:{line}: '{AFTER_COMMANDS}' but no bash block precedes it"
    return before[-1]


@contextlib.contextmanager
def _working_directory(path: Path):
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


# --- the files the "your own model" commands read ------------------------------------------

_WORDS = ("the a cat dog bird sat ran flew on under mat tree fast slow big small red blue "
          "green old young").split()


def _tiny_bert(path: Path, n_layers: int, width: int, seed: int) -> None:
    """A randomly initialised BERT with a WordPiece tokenizer, saved like a real checkpoint."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_WORDS]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    config = BertConfig(vocab_size=len(vocab), hidden_size=width, num_hidden_layers=n_layers,
                        num_attention_heads=2, intermediate_size=2 * width,
                        max_position_embeddings=64)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(path)


def _texts(path: Path, n: int = 48) -> None:
    """Sentences of 3 to 11 words from the tiny vocabulary: batches need padding."""
    import numpy as np

    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(_WORDS, size=int(rng.integers(3, 12)))) for _ in range(n)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _prepare_inputs(commands: list[list[str]], where: Path) -> None:
    """Create the model directories and texts file the ``pkd dump`` commands name."""
    sizes = {"teacher": (4, 64), "student": (2, 32)}
    for tokens in commands:
        if tokens[:2] != ["pkd", "dump"]:
            continue
        model_dir = tokens[2]
        role = "teacher" if "teacher" in model_dir else "student"
        if not (where / model_dir).exists():
            _tiny_bert(where / model_dir, *sizes[role], seed=len(role))
        texts = tokens[tokens.index("--texts") + 1]
        if not (where / texts).exists():
            _texts(where / texts)


def _run_pkd(tokens: list[str], where: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run([sys.executable, "-m", "pkd.cli", *tokens[1:]], cwd=where, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (
        f"README command {shlex.join(tokens)!r} failed with status {done.returncode}:\n"
        f"{done.stderr[-3000:]}")


# --- the tests -----------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "line"), PYTHON, ids=[f"README.md:{line}" for _, line in PYTHON])
def test_python_snippet_runs(code, line, tmp_path):
    modules, after_commands = _needs(code)
    for module in modules:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"README.md:{line} needs {module}, which is not installed")
    if after_commands:
        commands = _commands(_bash_before(line))
        _prepare_inputs(commands, tmp_path)
        for tokens in commands:
            if tokens[0] == "pkd":
                _run_pkd(tokens, tmp_path)
    program = compile(code, f"README.md:{line}", "exec")
    with _working_directory(tmp_path):
        exec(program, {"__name__": "__main__"})


def test_readme_has_snippets():
    assert len(PYTHON) >= 3, "the README's Python snippets were not found"


def _subcommands() -> set[str]:
    import argparse

    from pkd.cli import build_parser

    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    raise AssertionError("pkd.cli.build_parser() has no subcommands")


def test_bash_commands_are_real():
    from pkd.cli import build_parser

    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([A-Za-z][\w-]*):", makefile, flags=re.MULTILINE))
    checked = 0
    for language, code, line in BLOCKS:
        if language != "bash":
            continue
        for tokens in _commands(code):
            if tokens[0] == "pkd":
                try:
                    build_parser().parse_args(tokens[1:])
                except SystemExit as exit_:
                    raise AssertionError(
                        f"README.md:{line}: {shlex.join(tokens)!r} is not a valid pkd command "
                        f"(argparse exited with {exit_.code})") from None
                checked += 1
            elif tokens[0] == "make":
                missing = [t for t in tokens[1:] if not t.startswith("-") and t not in targets]
                assert not missing, f"README.md:{line}: make target(s) {missing} not in Makefile"
    assert checked, "no pkd command found in the README's bash blocks"


def test_quoted_subcommands_exist():
    text = README.read_text(encoding="utf-8")
    quoted = set(re.findall(r"`pkd ([a-z][a-z-]*)", text))
    assert quoted, "no `pkd COMMAND` quoted in the README"
    unknown = quoted - _subcommands()
    assert not unknown, f"README quotes pkd subcommands that do not exist: {sorted(unknown)}"


def test_version_option_exists_if_quoted():
    if "pkd --version" not in README.read_text(encoding="utf-8"):
        pytest.skip("the README does not mention pkd --version")
    from pkd.cli import build_parser

    with pytest.raises(SystemExit) as exit_, contextlib.redirect_stdout(io.StringIO()):
        build_parser().parse_args(["--version"])
    assert exit_.value.code == 0


def test_readme_is_short():
    n_lines = len(README.read_text(encoding="utf-8").splitlines())
    assert n_lines <= MAX_LINES, f"README.md has {n_lines} lines; the limit is {MAX_LINES}"


def _foreign_md_names(text: str) -> list[str]:
    """Markdown files named in ``text`` that the repository does not have (a brief elsewhere)."""
    ours = {p.name for p in ROOT.rglob("*.md") if ".venv" not in p.parts}
    return sorted({m for m in re.findall(r"[\w.-]+\.md\b", text)
                   if m.rsplit("/", 1)[-1] not in ours})


def test_readme_cites_only_repository_files():
    text = README.read_text(encoding="utf-8")
    assert not _foreign_md_names(text), f"README.md names {_foreign_md_names(text)}"
    assert "../" not in text, "README.md points outside the repository (../)"
    missing = _missing_links(README)
    assert not missing, f"README.md links to files the repository does not have: {missing}"


def _missing_links(document: Path) -> list[str]:
    """Relative links of a Markdown file whose targets the repository does not have."""
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", document.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor
        path = (document.parent / target.split("#")[0]).resolve()
        if not path.is_relative_to(ROOT) or not path.exists():
            missing.append(target)
    return missing


@pytest.mark.parametrize("document", sorted((ROOT / "docs").glob("*.md")),
                         ids=lambda path: f"docs/{path.name}")
def test_docs_cite_only_repository_files(document):
    text = document.read_text(encoding="utf-8")
    name = f"docs/{document.name}"
    assert not _foreign_md_names(text), f"{name} names {_foreign_md_names(text)}"
    missing = _missing_links(document)
    assert not missing, f"{name} links to files the repository does not have: {missing}"
