"""The errors every layer raises for problems the user can fix.

Each carries ONE line that names the problem and the fix; the command line prints it as
``error: ...`` with exit status 2 instead of a traceback (:mod:`mocov3.cli`).
"""

from __future__ import annotations

import importlib.util


class ConfigError(ValueError):
    """A configuration problem: an unknown key, a value of the wrong type or out of range.
    Line breaks in the values it quotes are escaped, so the message stays one line."""

    def __init__(self, message: object) -> None:
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


class DatasetError(RuntimeError):
    """A data problem: a missing dataset, an empty or unreadable folder, a corrupt file."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, truncated, unsafe, or of another model."""


class ExportError(CheckpointError):
    """A backbone or export directory that cannot be exported or read back."""


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, an unusable device, a budget that cannot
    be added to a resumed run)."""


class MissingPackageError(RuntimeError):
    """An optional package that a feature needs is not installed (the core install is
    torch, torchvision, numpy, pyyaml, safetensors and pillow; the rest are extras)."""


def has_package(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (a bare folder of that
    name, such as the ``wandb/`` W&B leaves in a working directory, does not count)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return False
    return spec is not None and spec.origin is not None


def require_package(module: str, extra: str, needed_for: str) -> None:
    """Raise :class:`MissingPackageError` naming the extra that installs ``module``."""
    if not has_package(module):
        raise MissingPackageError(
            f"{needed_for} needs {module}, which is not installed: pip install 'mocov3[{extra}]'"
        )


def one_line(text: object) -> str:
    """Collapse whitespace so third-party error text cannot break the one-line contract."""
    return " ".join(str(text).split())


USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    DatasetError,
    CheckpointError,
    TrainingError,
    MissingPackageError,
)
