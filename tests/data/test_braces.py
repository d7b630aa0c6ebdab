"""Shard-pattern brace expansion (mocov3/data/braces.py), against the braceexpand package
that webdataset uses."""

from __future__ import annotations

import pytest
from braceexpand import braceexpand

from mocov3.data.braces import expand_braces
from mocov3.errors import DatasetError

PATTERNS = [
    "train-{000000..000012}.tar",
    "/data/in1k/train-{000000..001281}.tar",
    "{train,val}-{0..3}.tar",
    "a{b,c{d,e}}f",
    "shard-{9..11}.tar",
    "shard-{10..7}.tar",
    "x-{0..10..5}.tar",
    "plain.tar",
    "{a}",
    "dir/{x,y}/part-{00..02}.tar",
]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_expands_as_braceexpand_does(pattern):
    assert expand_braces(pattern) == list(braceexpand(pattern))


def test_hand_computed_cases():
    assert expand_braces("t-{008..011}.tar") == ["t-008.tar", "t-009.tar", "t-010.tar", "t-011.tar"]
    assert expand_braces("{a,b}{1..2}") == ["a1", "a2", "b1", "b2"]


def test_unclosed_brace_and_letter_range_are_one_line_errors():
    with pytest.raises(DatasetError, match="unclosed"):
        expand_braces("train-{000..009.tar")
    with pytest.raises(DatasetError, match="not numeric"):
        expand_braces("shard-{a..c}.tar")
