"""Publishing an export directory on the Hugging Face Hub.

The directory is uploaded as it is: its config.json is already timm's own Hub config, so
``timm.create_model('hf-hub:USER/REPO', pretrained=True)`` loads it with no mocov3 code,
and its README.md carries the Hub's metadata. ``huggingface_hub`` is optional
(``pip install 'mocov3[hub]'``); the failures a user can fix (not installed, not logged
in, no network) become one-line :class:`~mocov3.errors.ExportError` messages.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

from mocov3 import __version__
from mocov3.errors import ExportError, one_line
from mocov3.interop.pretrained import CARD_NAME, WEIGHTS_NAME, read_pretrained_config

HUB_ID_IN_CARD = re.compile(r"hf-hub:[^'\"\s)]+")
LOGIN_HINT = "run huggingface-cli login or set HF_TOKEN"


def push_to_hub(
    export_dir: str | Path,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
) -> str:
    """Upload ``export_dir`` to the model repo ``repo_id`` (created when missing; the
    branch ``revision`` too); returns the repo's URL."""
    directory = Path(export_dir)
    read_pretrained_config(directory)  # refuses anything that is not an export directory
    if not (directory / WEIGHTS_NAME).is_file():
        raise ExportError(f"{directory} has no {WEIGHTS_NAME}: export it again")
    hub = _import_hub()
    api = hub.HfApi(token=token)
    with _hub_errors(repo_id):
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        repo_id = getattr(url, "repo_id", None) or repo_id  # "name" becomes "user/name"
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        _name_repo_in_card(directory, repo_id)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(directory),
            revision=revision,
            commit_message=f"Upload MoCo v3 backbone (mocov3 {__version__})",
        )
    url = str(url).rstrip("/")
    return f"{url}/tree/{revision}" if revision else url


def _import_hub() -> ModuleType:
    try:
        return importlib.import_module("huggingface_hub")
    except ImportError:
        raise ExportError(
            "pushing to the Hugging Face Hub needs huggingface_hub: pip install 'mocov3[hub]'"
        ) from None


def _name_repo_in_card(directory: Path, repo_id: str) -> None:
    """The card's ``hf-hub:USER/REPO`` usage line names the repo it is pushed to."""
    card = directory / CARD_NAME
    if card.is_file():
        text = card.read_text()
        card.write_text(HUB_ID_IN_CARD.sub(f"hf-hub:{repo_id}", text))


@contextmanager
def _hub_errors(repo_id: str) -> Iterator[None]:
    """Turns the Hub's failures into one line: a missing or read-only token says how to
    log in, anything else (no network, a bad repo id) says what the Hub answered."""
    utils = importlib.import_module("huggingface_hub.utils")
    no_token = getattr(utils, "LocalTokenNotFoundError", ())
    try:
        yield
    except (OSError, ValueError, *_transport_errors()) as error:
        if isinstance(error, no_token) or _status(error) == 401:
            raise ExportError(f"not logged in to the Hugging Face Hub: {LOGIN_HINT}") from None
        if _status(error) == 403:
            raise ExportError(
                f"the Hugging Face token cannot write to {repo_id}: {LOGIN_HINT} with a token "
                "that has write access"
            ) from None
        text = str(error).strip() or type(error).__name__
        raise ExportError(f"pushing to {repo_id} failed: {one_line(text)[:240]}") from None


def _status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """httpx's errors (huggingface_hub 1.x and later) are no OSError; requests' are."""
    try:
        import httpx
    except ImportError:
        return ()
    return (httpx.HTTPError,)
