"""Hugging Face Hub I/O of the zoo: download a checkpoint repo (cache first), publish a checkpoint folder.

`download` serves a repo already in the local cache without any HTTP request and only asks the Hub
(`HF_ENDPOINT`) on a cache miss or with `force_download=True`; `HF_HUB_OFFLINE=1` is honoured even
when it is set after huggingface_hub was imported. A model download fetches what a checkpoint needs and
nothing else: config.json first, then model.safetensors (or its index and the shards the index names),
the model card and the tokenizer files.

`publish` uploads files from an allow-list (`is_checkpoint_file`) that sit directly in the folder, never
follows a symbolic link, logs what it left out, and refuses to change or leave stale any file already in
the repo unless told to overwrite.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils.sha import git_hash, sha_fileobj

logger = logging.getLogger(__name__)

CONFIG_FILE, WEIGHTS_FILE, CARD_FILE = "config.json", "model.safetensors", "README.md"
WEIGHTS_INDEX = "model.safetensors.index.json"  # sharded weights: {"weight_map": {tensor: shard file}}
WEIGHTS_SUFFIX = ".safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                   "tokenizer.model")  # SentencePiece's model (a protobuf, not a pickle): Llama / Gemma repos
# What a checkpoint carries besides config and weights: fetched when present, uploaded when present.
CHECKPOINT_EXTRAS = (CARD_FILE, "generation_config.json", *TOKENIZER_FILES)
# Every name `publish` uploads (besides *.safetensors): all parsed as JSON or read as text by their loaders,
# none a pickle. cfg.json is the config of a SAELens export (whose weights are sae_weights.safetensors).
PUBLISHED_NAMES = frozenset({CONFIG_FILE, WEIGHTS_INDEX, "cfg.json", *CHECKPOINT_EXTRAS})
# Never uploaded or deleted by publish, whatever the allow-list says: the repo's own git settings.
REPO_SETTINGS = (".gitattributes",)
REDOWNLOAD_HINT = ("if a cached download is damaged, fetch it again with --force-download "
                   "(force_download=True in Python)")

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_SHARD_NAME = re.compile(r"[\w.-]+\.safetensors")  # a plain file name: no folder, no glob character


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


def is_checkpoint_file(path_in_repo: str) -> bool:
    """Whether a repo path is a file of a published checkpoint: an allow-listed name or *.safetensors, at the top."""
    return "/" not in path_in_repo and (path_in_repo in PUBLISHED_NAMES or path_in_repo.endswith(WEIGHTS_SUFFIX))


# ---- download ------------------------------------------------------------------------------------------

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
    """Return the local snapshot folder of a Hub repo, downloading it only when the cache lacks it.

    A model repo without allow_patterns gets the checkpoint's files only (see the module docstring).
    """
    where = f"{repo_type} repo '{repo_id}'" + (f" at revision '{revision}'" if revision else "")
    where += f" on {constants.ENDPOINT}"
    fetch = dict(repo_id=repo_id, repo_type=repo_type, cache_dir=cache_dir, token=token,
                 force_download=force_download, where=where)
    if allow_patterns is not None or repo_type != "model":
        return _nonempty(_snapshot(revision=revision, allow_patterns=allow_patterns, **fetch), where)
    # config.json first: a repo that is not a checkpoint costs no weights download.
    folder = _snapshot(revision=revision, allow_patterns=[CONFIG_FILE], has=[CONFIG_FILE], **fetch)
    if not (folder / CONFIG_FILE).is_file():
        raise HubNotFoundError(f"{where} has no {CONFIG_FILE}: it is not a zoo checkpoint")
    commit = folder.name  # later fetches name the commit: the revision cannot move under them
    folder = _snapshot(revision=commit, allow_patterns=[WEIGHTS_FILE, WEIGHTS_INDEX, *CHECKPOINT_EXTRAS],
                       has=[WEIGHTS_FILE, WEIGHTS_INDEX], **fetch)
    if not (folder / WEIGHTS_FILE).is_file() and (folder / WEIGHTS_INDEX).is_file():
        shards = shard_names(folder / WEIGHTS_INDEX)
        folder = _snapshot(revision=commit, allow_patterns=shards, has=shards, every=True, **fetch)
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise HubNotFoundError(f"{where}: {WEIGHTS_INDEX} names shards the repo lacks: {missing[:8]}")
    return folder


def shard_names(index_file: Path) -> list[str]:
    """The weight files a model.safetensors.index.json names, checked to be plain *.safetensors file names."""
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{index_file} is not a weights index (a JSON object whose 'weight_map' maps "
                         f"tensor names to shard files): {type(err).__name__}: {err}; {REDOWNLOAD_HINT}") from err
    bad = [name for name in names if not isinstance(name, str) or not _SHARD_NAME.fullmatch(name)]
    if bad or not names:
        raise ValueError(f"{index_file}: 'weight_map' must name shard files like 'model-00001-of-00002"
                         f".safetensors' in the same folder, got {bad[:5] or 'none'}")
    return names


def _snapshot(*, repo_id: str, revision: str | None, repo_type: str, cache_dir, token, force_download: bool,
              allow_patterns, where: str, has: list[str] = (), every: bool = False) -> Path:
    """snapshot_download of these patterns, from the cache when it holds them all, else from the Hub.

    A cached snapshot must also hold one of the files `has` names (all of them with every=True): a cache
    filled file by file (transformers' AutoConfig, say) keeps no file listing that would tell it is partial.
    """
    kwargs = dict(repo_id=repo_id, repo_type=repo_type, revision=revision, cache_dir=cache_dir,
                  token=token, allow_patterns=allow_patterns)
    if not force_download:  # cache first: a complete cached snapshot costs no request at all
        try:
            folder = Path(snapshot_download(**kwargs, local_files_only=True))
            present = [(folder / name).is_file() for name in has]
            if not has or (all(present) if every else any(present)):
                return folder
        except LocalEntryNotFoundError:  # not cached, or cached but incomplete for these patterns
            pass
    if is_offline():
        why = "force_download=True needs the Hub" if force_download else "it is not in the local cache"
        raise HubOfflineError(f"cannot download {where}: {why} and offline mode is on (HF_HUB_OFFLINE=1); "
                              "unset HF_HUB_OFFLINE to download it")
    try:
        return Path(snapshot_download(**kwargs, force_download=force_download))
    except RepositoryNotFoundError as err:
        raise HubNotFoundError(f"{where} does not exist (or is private and no valid token was given)") from err
    except RevisionNotFoundError as err:
        raise HubNotFoundError(f"{where}: revision '{revision}' does not exist") from err
    except EntryNotFoundError as err:  # also the client's "cannot reach the Hub and not cached" error
        raise HubNotFoundError(f"cannot download {where}: {err}") from err


def _nonempty(folder: Path, where: str) -> Path:
    """The snapshot folder, once it is known to hold at least one file."""
    if not folder.is_dir() or not any(p.is_file() for p in folder.rglob("*")):
        raise HubNotFoundError(f"{where} has no file matching the requested allow_patterns")
    return folder


# ---- publish -------------------------------------------------------------------------------------------

@dataclass
class PublishPlan:
    """What `publish` would upload from a folder (file names) and what it leaves out (name -> why)."""

    folder: Path
    upload: list[str] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)


def publish_plan(folder: str | Path) -> PublishPlan:
    """Sort a checkpoint folder's entries into uploaded and left out; refuse a folder that is no checkpoint."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    plan = PublishPlan(folder)
    for path in sorted(folder.iterdir()):
        name = path.name
        if path.is_symlink():
            plan.left_out[name] = f"a symbolic link (to {os.readlink(path)}); links are never followed"
        elif path.is_dir():
            plan.left_out[name] = "a folder; only files directly in the checkpoint folder are published"
        elif not path.is_file():
            plan.left_out[name] = "not a regular file"
        elif not is_checkpoint_file(name):
            plan.left_out[name] = "not a checkpoint file (config, *.safetensors, model card, tokenizer)"
        else:
            plan.upload.append(name)
    weights = [WEIGHTS_FILE] if WEIGHTS_FILE in plan.upload or WEIGHTS_INDEX not in plan.upload else [WEIGHTS_INDEX]
    if WEIGHTS_INDEX in weights:
        weights += shard_names(folder / WEIGHTS_INDEX)
    for name in (CONFIG_FILE, *weights):
        if name in plan.upload:
            continue
        if (folder / name).is_symlink():
            raise ValueError(f"{folder / name} is a symbolic link (to {os.readlink(folder / name)}); publish "
                             "never follows links: put the file itself in the folder (e.g. cp --remove-destination)")
        raise FileNotFoundError(f"{folder} is not a checkpoint: {name} missing (a checkpoint holds "
                                f"{CONFIG_FILE} and {WEIGHTS_FILE}, or {WEIGHTS_INDEX} and the shards it names)")
    return plan


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
    """Upload a checkpoint folder to a Hub model repo (created if needed) and return the commit URL.

    Without overwrite, a repo file that the upload would change, or a checkpoint file it would leave stale
    beside the new one, is an error naming them; with overwrite, stale checkpoint files are deleted in the
    same commit. Files of the repo that are no checkpoint files (a LICENSE, .gitattributes) stay as they are.
    """
    plan = publish_plan(folder)  # every local check before the first request
    if plan.left_out:
        logger.warning("publish %s: left out %d file(s):\n%s", plan.folder, len(plan.left_out),
                       "\n".join(f"  {name}: {why}" for name, why in plan.left_out.items()))
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    where = f"'{repo_id}' (revision '{revision or constants.DEFAULT_REVISION}', {api.endpoint})"
    try:
        head = api.repo_info(repo_id, revision=revision).sha
        remote = {f.path: f for f in api.list_repo_tree(repo_id, revision=head, recursive=True)
                  if isinstance(f, RepoFile)}
    except RevisionNotFoundError as err:
        raise HubNotFoundError(f"{where}: revision does not exist; create the branch first") from err
    changed = [name for name in plan.upload if name in remote and not _same_file(plan.folder / name, remote[name])]
    stale = sorted(path for path in remote
                   if is_checkpoint_file(path) and path not in plan.upload and path not in REPO_SETTINGS)
    if (changed or stale) and not overwrite:
        problems = ([f"files this upload would change: {', '.join(changed)}"] if changed else []) + (
            [f"checkpoint files this upload would leave stale (not in {plan.folder}): {', '.join(stale)}"]
            if stale else [])
        raise FileExistsError(f"{where} already has {'; and '.join(problems)}. Pass overwrite=True (--overwrite "
                              "on the command line) to replace the repo's checkpoint with this folder's")
    with contextlib.ExitStack() as files:
        operations = [CommitOperationAdd(name, files.enter_context(_open_no_follow(plan.folder / name)))
                      for name in plan.upload]
        operations += [CommitOperationDelete(path) for path in stale]
        info = api.create_commit(
            repo_id, operations, revision=revision, parent_commit=head,
            commit_message=commit_message or f"Upload {plan.folder.name} with sparse-model-zoo")
    return info.commit_url


def _open_no_follow(path: Path):
    """The file opened for reading, refusing a symbolic link put there since the plan was made."""
    return os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)), "rb")


def _same_file(local: Path, remote: RepoFile) -> bool:
    """Whether a local file has the content of a repo file (sha256 for LFS files, the git blob id otherwise)."""
    if local.stat().st_size != remote.size:
        return False
    if remote.lfs is not None:
        with open(local, "rb") as f:
            return sha_fileobj(f).hex() == remote.lfs.sha256
    return git_hash(local.read_bytes()) == remote.blob_id
