"""Property-based fuzzing of the loaders that read user input: the config (YAML files and
``--set`` overrides) and image folders. The outcome is a valid result or the loader's own
one-line error, never another exception. ``derandomize``: the same examples every run."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mocov3.config import Config, config_from_dict, load_config
from mocov3.data.datasets import load_folder
from mocov3.errors import ConfigError, DatasetError

SECTIONS = list(Config().to_dict())
KNOWN_KEYS = [f"{section}.{key}" for section, keys in Config().to_dict().items() for key in keys]

# strings that YAML or number parsing treat specially (an impossible date raises ValueError
# inside yaml.safe_load; 1e400 overflows a float)
TRICKY = ["1e400", ".nan", "-.inf", "2021-02-30", "0x10", "[", "{a: 1", "yes", "~", "!!binary x"]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(TRICKY),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=6), children, max_size=3),
    ),
    max_leaves=8,
)
keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.sampled_from(SECTIONS), st.text(max_size=15))
FUZZ = settings(max_examples=150, deadline=None, derandomize=True)


def _tree(pairs: list[tuple[str, object]]) -> dict:
    tree: dict = {}
    for key, value in pairs:
        node, parts = tree, key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return tree


def _config_or_error(build) -> None:
    try:
        config = build()
    except ConfigError as error:
        message = str(error)
        assert message and "\n" not in message
    else:
        assert isinstance(config, Config)


@FUZZ
@given(st.lists(st.tuples(keys, values), max_size=5))
def test_config_mapping_gives_a_config_or_a_config_error(pairs):
    _config_or_error(lambda: config_from_dict(_tree(pairs)))


@FUZZ
@given(
    st.lists(
        st.one_of(
            st.tuples(keys, st.one_of(st.text(max_size=20), st.sampled_from(TRICKY))).map(
                "=".join
            ),
            st.text(),
        ),
        max_size=4,
    )
)
def test_overrides_give_a_config_or_a_config_error(overrides):
    _config_or_error(lambda: load_config("configs/tiny.yaml", overrides))


@FUZZ
@given(
    st.one_of(
        st.lists(st.tuples(keys, values), max_size=5).map(lambda p: yaml.safe_dump(_tree(p))),
        st.tuples(st.sampled_from(KNOWN_KEYS), st.sampled_from(TRICKY)).map(
            lambda kv: yaml.safe_dump(_tree([(kv[0], "@")])).replace("'@'", kv[1])
        ),
        st.text(max_size=200),
        st.binary(max_size=64),
    )
)
def test_config_files_give_a_config_or_a_config_error(content):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "preset.yaml"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        _config_or_error(lambda: load_config(path))


# --------------------------------------------------------------------------- image folders


def _encoded(fmt: str, mode: str = "RGB", size: tuple[int, int] = (12, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 120).save(buffer, format=fmt)
    return buffer.getvalue()


REAL = [
    _encoded("PNG"),
    _encoded("PNG", "L"),
    _encoded("JPEG"),
    _encoded("GIF", "P"),
    _encoded("BMP"),
    _encoded("TIFF"),
]


def _mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    mutable = bytearray(data)
    for position, value in edits:
        mutable[position % len(mutable)] = value
    return bytes(mutable)


contents = st.one_of(
    st.binary(max_size=256),  # noise, empty files included
    st.sampled_from(REAL),  # intact
    st.builds(lambda data, cut: data[:cut], st.sampled_from(REAL), st.integers(0, 400)),
    st.builds(lambda data, tail: data[:16] + tail, st.sampled_from(REAL), st.binary(max_size=128)),
    st.builds(
        _mutate,
        st.sampled_from(REAL),
        st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8),
    ),
)
suffixes = st.sampled_from([".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".webp"])


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about corrupt EXIF blocks
@settings(max_examples=80, deadline=None, derandomize=True)
@given(st.lists(st.tuples(suffixes, contents), min_size=1, max_size=6))
def test_folder_of_random_files_loads_or_skips_never_crashes(files):
    with tempfile.TemporaryDirectory() as folder:
        for index, (suffix, data) in enumerate(files):
            (Path(folder) / f"{index}{suffix}").write_bytes(data)
        try:
            dataset = load_folder(folder, "train", image_size=8)
        except DatasetError as error:  # only when no file at all could be read
            assert "could be read" in str(error) and "\n" not in str(error)
        else:
            assert len(dataset) >= 1 and len(dataset) + dataset.skipped == len(files)
            assert dataset.images.shape[1:] in ((1, 8, 8), (3, 8, 8))
