"""Brace expansion of shard patterns, as WebDataset writes them: ``train-{000000..001281}.tar``
(a numeric range, zero-padded to the width of its ends) and ``{train,val}-{0..3}.tar`` (lists),
groups nested or several in one pattern, expanded left to right like the shell. Shard names
use neither letter ranges (``{a..c}``: refused in one line) nor backslash-escaped braces
(not supported: a ``\\{`` opens a group like any other).

webdataset expands patterns with the ``braceexpand`` package; this is the part of it shard
names use, written here so that reading ``wds:`` data needs no package beyond the core
install (tests/data/test_braces.py checks it against ``braceexpand``).
"""

from __future__ import annotations

import re

from mocov3.errors import DatasetError

RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?$")


def expand_braces(pattern: str) -> list[str]:
    """Every string ``pattern`` names, in order; a lone or unbalanced brace is literal text
    only when it cannot open a group (``DatasetError`` for an unclosed ``{``)."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    end = _closing(pattern, start)
    head, body, tail = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    tails = expand_braces(tail)
    return [head + part + rest for part in _alternatives(body) for rest in tails]


def _closing(text: str, start: int) -> int:
    depth = 0
    for index in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return index
    raise DatasetError(f"unclosed '{{' in pattern {text!r}: close the brace group")


def _alternatives(body: str) -> list[str]:
    """What one group stands for: a range ``a..b[..step]`` or a comma list (each item
    expanded in turn, so groups nest)."""
    if (match := RANGE.match(body)) is not None:
        return _range(*match.groups())
    if ".." in body and "," not in body and "{" not in body:
        raise DatasetError(
            f"range {{{body}}} is not numeric: shard patterns take numeric ranges such as "
            "{000000..000099} and lists such as {train,val}"
        )
    items, depth, begun = [], 0, 0
    for index, char in enumerate(body):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(body[begun:index])
            begun = index + 1
    items.append(body[begun:])
    if len(items) == 1:  # not a group: the braces are text, as in the shell
        return [f"{{{part}}}" for part in expand_braces(body)]
    return [part for item in items for part in expand_braces(item)]


def _range(first: str, last: str, step: str | None) -> list[str]:
    low, high = int(first), int(last)
    stride = abs(int(step)) if step else 1
    if stride == 0:
        raise DatasetError(f"range {first}..{last}..{step} has step 0: use a positive step")
    padded = any(
        len(end.lstrip("-")) > 1 and end.lstrip("-").startswith("0") for end in (first, last)
    )
    width = max(len(first), len(last)) if padded else 0
    values = range(low, high + 1, stride) if low <= high else range(low, high - 1, -stride)
    return [str(value).zfill(width) for value in values]
