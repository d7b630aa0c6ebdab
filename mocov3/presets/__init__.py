"""The presets that ship with the package, found by name as well as by path.

Pretraining presets are ``mocov3/presets/NAME.yaml`` (``--config demo``); evaluation
protocols are ``mocov3/presets/eval/NAME.yaml`` (``--recipe linear_reference``). Each
file's first line is a one-line comment that ``mocov3 presets`` lists; the comment block
after it says where the preset departs from the paper's recipe, and why. In a clone,
``configs/`` is a link to this folder, so ``configs/demo.yaml`` names the same file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mocov3.errors import ConfigError

PRESET_DIR = Path(__file__).resolve().parent
KINDS = {"config": PRESET_DIR, "recipe": PRESET_DIR / "eval"}


@dataclass(frozen=True)
class Preset:
    """A packaged YAML file: its name (``demo``), path and one-line summary."""

    name: str
    path: Path
    summary: str


def _summary(path: Path) -> str:
    first = path.read_text(encoding="utf-8").split("\n", 1)[0]
    return first.lstrip("#").strip() if first.startswith("#") else ""


def catalogue(kind: str = "config") -> list[Preset]:
    """Every packaged preset of ``kind`` (``config``: pretraining, ``recipe``: evaluation)."""
    return [Preset(p.stem, p, _summary(p)) for p in sorted(KINDS[kind].glob("*.yaml"))]


def names(kind: str = "config") -> list[str]:
    return [preset.name for preset in catalogue(kind)]


def resolve(name_or_path: str | Path, kind: str = "config") -> Path:
    """A YAML file for ``--config``/``--recipe``: an existing path as given, else the
    packaged preset of that name (``demo``, ``demo.yaml``); anything else is a one-line
    :class:`ConfigError` listing the names."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.parent == Path(".") and path.suffix in ("", ".yaml"):
        packaged = KINDS[kind] / f"{path.stem}.yaml"
        if packaged.is_file():
            return packaged
    what = "preset" if kind == "config" else "evaluation recipe"
    listing = "mocov3 presets" if kind == "config" else "mocov3 presets --recipes"
    known = f"{', '.join(names(kind))} ({listing} says what each is)"
    if path.parent != Path(".") or path.suffix not in ("", ".yaml"):
        raise ConfigError(f"{kind} file {path} not found; packaged {what}s by name: {known}")
    raise ConfigError(
        f"{kind} '{name_or_path}' not found: neither a file nor a packaged {what}; {known}"
    )
