"""Hugging Face Hub ids as model locations: ``owner/name`` -> a local snapshot folder in the Hub's cache.

Only the files that loading needs are downloaded (the checkpoint's weights in one format, its configs, the
tokenizer and the image-processor config). Offline mode (``HF_HUB_OFFLINE=1``) reads the cache only, and says what
is not cached. The cache is the Hub's usual one: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
``~/.cache/huggingface/hub``.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from .errors import QScorerError

logger = logging.getLogger(__name__)

PUBLISHED_MODEL = "2kxx/Qscorer_lora_5_1"
"""The published Q-Scorer LoRA checkpoint (five score tokens, trained on KonIQ)."""
PUBLISHED_BASE = "MAGAer13/mplug-owl2-llama2-7b"
"""The base model the published LoRA was trained on."""

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_TRUE = ("1", "true", "yes", "on")


def is_repo_id(location: str | os.PathLike) -> bool:
    """True for ``owner/name`` strings that are not an existing local path."""
    text = str(location)
    return bool(_REPO_ID.fullmatch(text)) and not Path(text).exists() and ".." not in text.split("/")


def cache_dir() -> Path:
    """The Hub cache folder, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home) / "hub"


def offline() -> bool:
    """Offline mode, from ``HF_HUB_OFFLINE`` (read at call time) or huggingface_hub's own setting."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE:
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def locate(location: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder as it is; a Hub id as its snapshot folder (downloaded unless offline).

    ``revision`` (a branch, tag or commit) applies to Hub ids only.
    """
    if Path(location).exists():
        if revision is not None:
            raise QScorerError(f"--revision {revision} applies to Hub ids, but {location} is a local folder")
        return Path(location)
    if not is_repo_id(location):
        raise QScorerError(f"model folder {location} does not exist (and it is not a Hub id of the form owner/name)")
    return fetch(str(location), revision)


def fetch(repo_id: str, revision: str | None = None) -> Path:
    """The snapshot folder of ``repo_id`` at ``revision`` with the files loading needs."""
    import huggingface_hub
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from .checkpoints import checkpoint_kind, files_to_fetch

    where = f"{repo_id}" + (f" (revision {revision})" if revision else "")
    if offline():
        try:
            folder = huggingface_hub.snapshot_download(
                repo_id, revision=revision, cache_dir=cache_dir(), local_files_only=True
            )
        except LocalEntryNotFoundError:
            raise QScorerError(
                f"{where} is not in the Hugging Face cache ({cache_dir()}) and offline mode is on (HF_HUB_OFFLINE): "
                f"download it once with network access (huggingface-cli download {repo_id})"
            ) from None
        logger.info("%s: using the cached snapshot %s (offline)", where, folder)
        try:
            checkpoint_kind(folder)
        except QScorerError as error:
            raise QScorerError(f"{where} is only partly cached and offline mode is on: {error}") from None
        return Path(folder)
    try:
        names = huggingface_hub.HfApi().list_repo_files(repo_id, revision=revision)
        folder = huggingface_hub.snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir(), allow_patterns=files_to_fetch(names)
        )
    except RepositoryNotFoundError:
        raise QScorerError(f"Hub repository {repo_id} does not exist (or is private: huggingface-cli login)") from None
    except RevisionNotFoundError:
        raise QScorerError(f"Hub repository {repo_id} has no revision {revision}") from None
    except (HfHubHTTPError, OSError) as error:
        raise QScorerError(f"cannot download {where} from the Hub: {error}") from None
    return Path(folder)
