"""Hugging Face Hub I/O of the zoo: download a checkpoint repo (cache first), publish a checkpoint folder.

`download` serves a repo already in the local cache without any HTTP request and only asks the Hub
(`HF_ENDPOINT`) on a cache miss or with `force_download=True`; `HF_HUB_OFFLINE=1` is honoured even
when it is set after huggingface_hub was imported. `publish` uploads a folder holding config.json and
model.safetensors, never pickle files, and refuses to replace a checkpoint unless told to.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

# What a model download fetches by default: the checkpoint and its card, not training state.
DEFAULT_MODEL_PATTERNS = ("config.json", "model.safetensors", "*.safetensors", "README.md", "*.json")
# Files that make a folder a checkpoint.
CHECKPOINT_FILES = ("config.json", "model.safetensors")
# Never published: pickles (optimizer/scheduler/RNG state of training checkpoints) can run code on load.
PICKLE_PATTERNS = ("*.pt", "*.pth", "*.bin", "*.pkl", "*.pickle")

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


class HubNotFoundError(FileNotFoundError):
    """A repo, revision or file is not on the Hub (or the Hub cannot be reached) and not in the cache."""


class HubOfflineError(HubNotFoundError):
    """Offline mode (HF_HUB_OFFLINE=1) is on and what was asked for is not in the local cache."""


def is_repo_id(s: str) -> bool:
    """True for an "org/name" Hub repo id that is not also an existing local path."""
    return bool(_REPO_ID.fullmatch(s)) and ".." not in s and "--" not in s and not Path(s).expanduser().exists()


def is_offline() -> bool:
    """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is on, now or when huggingface_hub was imported."""
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.is_offline_mode() or flag.strip().upper() in {"1", "ON", "YES", "TRUE"}


def download(
    repo_id: str,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    force_download: bool = False,
    repo_type: str = "model",
    allow_patterns: list[str] | str | None = None,
) -> Path:
    """Return the local snapshot folder of a Hub repo, downloading it only when the cache lacks it."""
    default_patterns = allow_patterns is None and repo_type == "model"
    if default_patterns:
        allow_patterns = list(DEFAULT_MODEL_PATTERNS)
    where = f"{repo_type} repo '{repo_id}'" + (f" at revision '{revision}'" if revision else "")
    where += f" on {constants.ENDPOINT}"
    kwargs = dict(repo_id=repo_id, repo_type=repo_type, revision=revision, cache_dir=cache_dir,
                  token=token, allow_patterns=allow_patterns)

    if not force_download:  # cache first: a complete cached snapshot costs no request at all
        try:
            return _checked(Path(snapshot_download(**kwargs, local_files_only=True)), where, default_patterns)
        except LocalEntryNotFoundError:  # not cached, or cached but incomplete for these patterns
            pass
    if is_offline():
        why = "force_download=True needs the Hub" if force_download else "it is not in the local cache"
        raise HubOfflineError(f"cannot download {where}: {why} and offline mode is on (HF_HUB_OFFLINE=1); "
                              "unset HF_HUB_OFFLINE to download it")
    try:
        folder = snapshot_download(**kwargs, force_download=force_download)
    except RepositoryNotFoundError as err:
        raise HubNotFoundError(f"{where} does not exist (or is private and no valid token was given)") from err
    except RevisionNotFoundError as err:
        raise HubNotFoundError(f"{where}: revision '{revision}' does not exist") from err
    except EntryNotFoundError as err:  # also the client's "cannot reach the Hub and not cached" error
        raise HubNotFoundError(f"cannot download {where}: {err}") from err
    return _checked(Path(folder), where, default_patterns)


def _checked(folder: Path, where: str, default_patterns: bool) -> Path:
    """The snapshot folder, once it is known to hold what was asked for."""
    if not folder.is_dir() or not any(p.is_file() for p in folder.rglob("*")):
        raise HubNotFoundError(f"{where} has no file matching the requested allow_patterns")
    if default_patterns and not (folder / "config.json").is_file():
        raise HubNotFoundError(f"{where} has no config.json: it is not a zoo checkpoint")
    return folder


def publish(
    folder: str | Path,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool = False,
    overwrite: bool = False,
    token: str | bool | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload a checkpoint folder to a Hub model repo (created if needed) and return the commit URL."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a checkpoint: {', '.join(missing)} missing "
                                f"(a checkpoint holds {' and '.join(CHECKPOINT_FILES)})")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if not overwrite:
        where = f"'{repo_id}' (revision '{revision or constants.DEFAULT_REVISION}', {api.endpoint})"
        try:
            remote = set(api.list_repo_files(repo_id, revision=revision))
        except RevisionNotFoundError as err:
            raise HubNotFoundError(f"{where}: revision does not exist; create the branch first") from err
        clash = [name for name in CHECKPOINT_FILES if name in remote]
        if clash:
            raise FileExistsError(f"{where} already has {', '.join(clash)}; pass overwrite=True "
                                  "(--overwrite on the command line) to replace it")
    info = api.upload_folder(
        folder_path=folder,
        repo_id=repo_id,
        revision=revision,
        commit_message=commit_message or f"Upload {folder.name} with sparse-model-zoo",
        ignore_patterns=list(PICKLE_PATTERNS),
    )
    return info.commit_url
