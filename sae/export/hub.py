"""Hugging Face Hub transfer of exported folders: upload (``sae-export --push-to-hub``) and download.

Uses ``huggingface_hub`` as documented: the endpoint comes from ``HF_ENDPOINT`` (or ``endpoint=``),
the token from ``HF_TOKEN`` or the credential store written by ``hf auth login``
(``huggingface_hub.get_token``). Uploading creates the repo if needed (``exist_ok``), the branch
if a revision other than ``main`` is asked for, and commits the folder with ``upload_folder``;
files whose content the Hub already has are skipped, so re-uploading an unchanged export makes no
commit.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


class MissingTokenError(RuntimeError):
    """No Hugging Face token was found for an upload."""


def resolve_token(token: str | None = None) -> str:
    """The token to upload with: ``token``, else ``HF_TOKEN``, else the stored login.

    Raises:
        MissingTokenError: none found (the message says how to provide one).
    """
    if token:
        return token
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise MissingTokenError(
            "no Hugging Face token: set HF_TOKEN=<a write token from https://huggingface.co/settings/tokens> or run "
            "`hf auth login` (stores it under HF_HOME), then re-run the upload")
    return found


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                token: str | None = None, endpoint: str | None = None, commit_message: str | None = None) -> str:
    """Upload ``folder`` to the model repo ``repo_id``; return the commit URL ("" if nothing changed).

    Args:
        private: create the repo private (an existing repo keeps its visibility).
        revision: branch to commit to; created from the default branch when missing.
        endpoint: Hub URL; default ``HF_ENDPOINT`` or https://huggingface.co.

    Raises:
        MissingTokenError: no token. ``huggingface_hub`` HTTP errors pass through.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"nothing to upload: {folder} is not a folder")
    api = HfApi(endpoint=endpoint, token=resolve_token(token))
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", revision=revision,
                             commit_message=commit_message or f"Upload SAEs with sae-forge ({folder.name})")
    url = getattr(info, "commit_url", "") or ""
    log.info("uploaded %s to %s (%s)", folder, repo_id, url or "no change")
    return url


def download(repo_id: str, hookpoint: str | None = None, *, revision: str | None = None,
             endpoint: str | None = None) -> Path:
    """Download a repo (only ``hookpoint``'s folder and top-level files when given); return its local path."""
    from huggingface_hub import snapshot_download

    patterns = [f"{hookpoint}/*", "*.json", "*.md"] if hookpoint else None
    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, endpoint=endpoint))
