"""Evaluation protocols as files: the packaged ``mocov3/presets/eval/NAME.yaml``, named by
``NAME``, or any YAML file (``mocov3 linear --recipe``, ``mocov3 finetune --recipe``).

A recipe is a YAML mapping::

    command: linear            # the command it is for
    protocol: reference        # what it reproduces (linear: fast | reference)
    settings:                  # field names of the command's settings dataclass
      epochs: 90
      batch_size: 1024

A command's settings are its dataclass defaults, then the recipe's, then the flags given
on the command line (a flag left out is None and changes nothing).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from mocov3 import presets
from mocov3.errors import ConfigError

RECIPE_KEYS = ("command", "protocol", "settings")


def read_recipe(path: str | Path, command: str, settings_type: type) -> dict[str, Any]:
    """The recipe at ``path`` for ``command``: ``{"protocol": ..., **settings}``, every
    settings key a field of ``settings_type``; ConfigError in one line otherwise."""
    path = presets.resolve(Path(path).expanduser(), "recipe")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ConfigError(
            f"recipe {path} cannot be read as YAML ({type(error).__name__})"
        ) from None
    if not isinstance(values, dict) or set(values) - set(RECIPE_KEYS):
        raise ConfigError(f"recipe {path} must be a mapping of {', '.join(RECIPE_KEYS)}")
    if values.get("command") != command:
        raise ConfigError(
            f"recipe {path} is for 'mocov3 {values.get('command')}', not 'mocov3 {command}'"
        )
    settings = values.get("settings") or {}
    if not isinstance(settings, dict):
        raise ConfigError(f"recipe {path}: settings must be a mapping")
    fields = {field.name for field in dataclasses.fields(settings_type)}
    unknown = sorted(set(settings) - fields)
    if unknown:
        raise ConfigError(
            f"recipe {path}: unknown setting {unknown[0]!r} (valid: {', '.join(sorted(fields))})"
        )
    result = dict(settings)
    if "protocol" in values:
        result["protocol"] = values["protocol"]
    return result


def merged_settings(
    settings_type: type, recipe: Mapping[str, Any], flags: Mapping[str, Any]
) -> Any:
    """``settings_type`` with its defaults, then ``recipe``'s values, then every flag that
    is not None; lists become tuples (settings hold tuples)."""
    defaults = settings_type()
    fields = {field.name for field in dataclasses.fields(settings_type)}
    for name, value in recipe.items():
        if name in fields:
            _check_type(name, value, getattr(defaults, name))
    values = {k: v for k, v in recipe.items() if k in fields}
    values.update({k: v for k, v in flags.items() if v is not None and k in fields})
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return settings_type(**values)


def _check_type(name: str, value: Any, default: Any) -> None:
    """ConfigError in one line unless a recipe's ``value`` has its default's kind (the
    settings' own checks then judge the value): an integer for an integer, a number for a
    float, a string for a string, a boolean for a boolean, a list of numbers as long as a
    tuple default (any length for a list of lrs), a scalar or a list of numbers for an unset
    default."""

    def number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    if value is None or default is None:
        numbers = isinstance(value, list | tuple) and all(map(number, value))
        ok = value is None or number(value) or isinstance(value, str) or numbers
    elif isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = number(value)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, tuple):
        length_ok = len(value) == len(default) or name.endswith("lrs")
        ok = isinstance(value, list | tuple) and length_ok and all(map(number, value))
    else:
        ok = True
    if not ok:
        raise ConfigError(f"recipe setting {name}: {value!r} is not valid (like {default!r})")
