"""The README and the user guides say what the tool does: every ``mocov3`` command they show
parses with the real command line (nothing runs), and every relative link resolves."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from mocov3 import presets
from mocov3.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
GUIDES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ALL_DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.S | re.M)
SHELL = ("", "bash", "sh", "shell", "console")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def shell_lines(text: str) -> list[str]:
    """The lines of the shell blocks, ``\\`` continuations joined, comments dropped."""
    lines = []
    for language, block in FENCE.findall(text):
        if language.strip() not in SHELL:
            continue
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def mocov3_arguments(line: str) -> list[str] | None:
    """The arguments after ``mocov3`` (or ``python -m mocov3``, ``torchrun ... -m mocov3``)."""
    try:
        tokens = shlex.split(line)
    except ValueError:
        return None
    for index, token in enumerate(tokens):
        if token == "mocov3" or (token == "-m" and tokens[index + 1 : index + 2] == ["mocov3"]):
            start = index + 1 if token == "mocov3" else index + 2
            return tokens[start:]
    return None


COMMANDS = [
    pytest.param(args, id=f"{path.name}: {' '.join(args)[:60]}")
    for path in GUIDES
    for line in shell_lines(path.read_text())
    if (args := mocov3_arguments(line))
]


def test_the_readme_shows_the_commands_it_promises():
    readme = shell_lines((ROOT / "README.md").read_text())
    shown = {args[0] for line in readme if (args := mocov3_arguments(line))}
    assert {"pretrain", "knn", "linear", "finetune", "embed", "export", "report"} <= shown


@pytest.mark.parametrize("args", COMMANDS)
def test_every_command_shown_parses(args: list[str]):
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            parsed = build_parser().parse_args(args)
    except SystemExit as stop:
        assert stop.code == 0, stderr.getvalue().strip().splitlines()[-1]
        return
    # a preset or recipe shown by name (or by its path in a clone) is one that ships
    for flag, kind in (("config", "config"), ("recipe", "recipe")):
        value = getattr(parsed, flag, None)
        if value and value.isidentifier() or (value or "").startswith("configs/"):
            presets.resolve(ROOT / value if "/" in value else value, kind)


@pytest.mark.parametrize("path", ALL_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path: Path):
    text = FENCE.sub("", path.read_text())
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # a web address, or an anchor in the same page
        file = target.split("#")[0]
        if not (path.parent / file).exists():
            broken.append(target)
    assert not broken, f"{path.name}: {broken}"


def test_the_readme_is_a_product_page():
    assert len((ROOT / "README.md").read_bytes()) <= 20_000
