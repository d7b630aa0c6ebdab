"""The package's layers import one way (docs/architecture.md):

    errors, config (with model_config), presets  <-  runtime, optim  <-  data, models
                    <-  train, eval, interop  <-  tools, api  <-  cli  <-  __main__

A module may import its own package and any lower layer; across one layer only train may
import eval (the kNN evaluation it runs while training). Every import counts, those inside
functions too: this walks the source, it does not run it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mocov3"
LAYERS = {
    "mocov3": 0,  # the package itself: __version__ (and the lazy public API, below)
    "mocov3.errors": 0,
    "mocov3.config": 0,
    "mocov3.model_config": 0,
    "mocov3.presets": 0,
    "mocov3.runtime": 1,
    "mocov3.optim": 1,
    "mocov3.data": 2,
    "mocov3.models": 2,
    "mocov3.train": 3,
    "mocov3.eval": 3,
    "mocov3.interop": 3,
    "mocov3.tools": 4,
    "mocov3.api": 4,
    "mocov3.cli": 5,
    "mocov3.__main__": 6,
}
SIDEWAYS = {
    ("mocov3.train", "mocov3.eval"),
    ("mocov3.config", "mocov3.errors"),
    ("mocov3.config", "mocov3.presets"),
    ("mocov3.config", "mocov3.model_config"),
    ("mocov3.model_config", "mocov3.errors"),
    ("mocov3.presets", "mocov3.errors"),
}
# ``import mocov3`` stays light: the public API is imported on first attribute access
LAZY = {("mocov3", "mocov3.api")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = PACKAGE.parent / Path(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported(path: Path) -> set[str]:
    """Every mocov3 module ``path`` imports, at any depth of its code."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                names.add(full if is_module(full) else node.module)
    return {name for name in names if name == "mocov3" or name.startswith("mocov3.")}


def layer_of(name: str) -> str:
    return max((key for key in LAYERS if name == key or name.startswith(key + ".")), key=len)


GRAPH = {module_name(path): imported(path) for path in sorted(PACKAGE.rglob("*.py"))}


def edges(source_layer: str, target_layers: tuple[str, ...]) -> list[str]:
    return [
        f"{source} -> {target}"
        for source, targets in GRAPH.items()
        if layer_of(source) == source_layer
        for target in sorted(targets)
        if layer_of(target) in target_layers
    ]


def test_the_graph_sees_every_module_and_its_imports():
    assert {"mocov3.train.trainer", "mocov3.cli", "mocov3.data.decode"} <= set(GRAPH)
    assert "mocov3.train.step" in GRAPH["mocov3.train.trainer"]
    assert "mocov3.cli.bench" in GRAPH["mocov3.cli"]  # from mocov3.cli import bench, ...
    assert "mocov3.tools.bench" in GRAPH["mocov3.cli.bench"]
    assert all(layer_of(name) in LAYERS for name in GRAPH)


def test_every_import_goes_down_the_layers():
    wrong = []
    for source, targets in GRAPH.items():
        here = layer_of(source)
        for target in targets:
            there = layer_of(target)
            if here == there or (here, there) in SIDEWAYS | LAZY:
                continue
            if LAYERS[there] >= LAYERS[here]:
                wrong.append(f"{source} -> {target}")
    assert not wrong, "imports against the layers: " + ", ".join(sorted(wrong))


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        ("mocov3.models", ("mocov3.train", "mocov3.eval", "mocov3.tools", "mocov3.cli")),
        ("mocov3.data", ("mocov3.models", "mocov3.train", "mocov3.eval", "mocov3.tools")),
        ("mocov3.eval", ("mocov3.train", "mocov3.tools", "mocov3.cli")),
        ("mocov3.train", ("mocov3.tools", "mocov3.cli")),
        ("mocov3.runtime", ("mocov3.data", "mocov3.models", "mocov3.train", "mocov3.eval")),
    ],
)
def test_named_rules(layer: str, forbidden: tuple[str, ...]):
    assert edges(layer, forbidden) == []


def test_only_main_imports_the_command_line():
    importers = [
        source
        for source, targets in GRAPH.items()
        if layer_of(source) != "mocov3.cli" and any(layer_of(t) == "mocov3.cli" for t in targets)
    ]
    assert importers == ["mocov3.__main__"]


def test_argparse_lives_only_in_the_command_line():
    users = [name for name in GRAPH if "argparse" in _stdlib_imports(name)]
    assert users and all(layer_of(name) == "mocov3.cli" for name in users), users


def _stdlib_imports(module: str) -> set[str]:
    parts = module.split(".")
    path = PACKAGE.parent / Path(*parts)
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_module_is_over_600_lines():
    long = {
        module_name(path): n
        for path in PACKAGE.rglob("*.py")
        if (n := len(path.read_text().splitlines())) > 600
    }
    assert not long, long
