"""Resumable training checkpoints: written atomically, verified by a manifest, pruned to the last K.

A checkpoint is a folder ``run_dir/checkpoints/step-000123/`` holding ``model.safetensors``,
``optimizer.pt``, ``scheduler.pt``, ``rng.pt``, ``state.json`` and, written last,
``manifest.json`` with the size and sha256 of every other file. It is built in a
``.tmp-step-000123-<pid>`` folder and renamed into place, so a crash never leaves a
half-written folder under a final name; the manifest catches the rest (bit rot, truncation).
A checkpoint that fails verification is renamed ``step-000123.corrupt`` (kept for inspection,
ignored by the finder), so that a resumed run can save that step again.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import logging
import os
import random
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Files a checkpoint cannot do without; optimizer.pt and scheduler.pt are optional.
REQUIRED_FILES = ("model.safetensors", "rng.pt", "state.json")
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TEMP_DIR = re.compile(r"^\.tmp-.+-(\d+)$")  # .tmp-step-000123-<pid>, .tmp-delete-..., .tmp-final-<pid>
CORRUPT_SUFFIX = ".corrupt"  # step-000123.corrupt, step-000123.corrupt-1, ...: never matched by _STEP_DIR


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, quota, I/O error); the message names the folder and why."""


class NonFiniteWeightsError(ValueError):
    """The weights to save hold NaN or infinite values: such a checkpoint is never written."""


@dataclass(frozen=True)
class TrainState:
    """What a training loop needs, besides the restored objects, to resume."""

    step: int
    data_state: dict
    config: dict
    metrics: dict
    path: Path


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    data_state: dict,
    config: dict,
    metrics: dict,
    keep_last: int = 3,
    tokenizer: Any = None,
) -> Path:
    """Write ``run_dir/checkpoints/step-NNNNNN`` atomically, then prune older checkpoints.

    `tokenizer` (the one the run trains with) is written there too (tokenizer.json, ...), in the manifest.
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"keep_last must be an int >= 1, got {keep_last!r}")
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:06d}"
    exists = f"checkpoint {final} already exists; it is never overwritten"
    weights = _unshared(model.state_dict())
    if bad := nonfinite_tensors(weights):  # before anything is written: it must not count toward keep_last
        raise NonFiniteWeightsError(f"not saving the checkpoint of step {step} in {root}: the weights hold NaN "
                                    f"or infinite values ({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''})")
    if final.exists():
        problem = _problem(final)
        if problem is None:
            raise FileExistsError(exists)
        _set_aside(final, problem)  # a corrupt folder under this name must not stop the run
    # What to write, gathered first: the RNG before anything else could draw from it.
    contents: dict[str, Any] = {"rng.pt": _rng_state(), "model.safetensors": weights}
    if optimizer is not None:
        contents["optimizer.pt"] = optimizer.state_dict()
    if scheduler is not None:
        contents["scheduler.pt"] = scheduler.state_dict()
    contents["state.json"] = {"zoo_format_version": FORMAT_VERSION, "step": step, "time": time.time(),
                              "data_state": data_state, "config": config, "metrics": metrics}
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    writing = str(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # our own leftover from an earlier failed attempt
        tmp.mkdir()
        for writing, obj in contents.items():
            _write(tmp / writing, obj)
        if tokenizer is not None:
            from zoo.tokenizer import save_tokenizer

            writing = "the tokenizer files"
            save_tokenizer(tokenizer, tmp)
        writing = MANIFEST
        files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
        _write(tmp / MANIFEST, {"zoo_format_version": FORMAT_VERSION, "files": files})
        _fsync(tmp)
        if final.exists():  # another writer got there while we were writing
            raise FileExistsError(exists)
        writing = f"the rename to {final.name}"
        try:
            os.rename(tmp, final)  # atomic; fails on a non-empty existing folder
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise FileExistsError(exists) from e
            raise
        _fsync(root)
    except FileExistsError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except (OSError, RuntimeError, SafetensorError) as e:  # a full disk shows as any of these
        error = write_error(e, root, writing, f"the checkpoint of step {step}")
        shutil.rmtree(tmp, ignore_errors=True)
        raise error from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(root, keep=final, keep_last=keep_last)
    return final


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """Return the highest-step checkpoint folder that verifies; each newer corrupt one is moved aside (warned).

    Temp folders that crashed saves left behind are deleted first (`clean_stale_temp`).
    """
    clean_stale_temp(run_dir)
    for path in _step_dirs(Path(run_dir) / "checkpoints"):
        problem = _problem(path)
        if problem is None:
            return path
        _set_aside(path, problem)
    return None


def saved_train_settings(run_dir: str | os.PathLike) -> dict | None:
    """The train settings recorded by the newest checkpoint of a run folder whose state.json reads, without
    verifying or moving anything (the trainer reads them before it locks the folder); None when there is none."""
    for path in _step_dirs(Path(run_dir) / "checkpoints"):
        try:
            train = json.loads((path / "state.json").read_text())["config"]["train"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(train, dict):
            return train
    return None


def clean_stale_temp(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the temp folders of saves whose process is gone, and return them.

    A save builds its folder as ``.tmp-<name>-<pid>``, in ``run_dir/checkpoints`` (checkpoints, and
    checkpoints being pruned) or in ``run_dir`` itself (the trainer's final checkpoint, and the temp file
    of a metrics.jsonl rewrite); one whose process no longer runs was left by a crash (SIGKILL, full disk)
    and is never renamed into place.
    """
    run_dir = Path(run_dir)
    removed = []
    for parent in (run_dir / "checkpoints", run_dir):
        if not parent.is_dir():
            continue
        for path in sorted(parent.iterdir()):
            match = _TEMP_DIR.match(path.name)
            if match and not path.is_symlink() and not _is_running(int(match.group(1))):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                logger.warning("removed %s, left by an interrupted save (process %s is gone)", path, match.group(1))
                removed.append(path)
    return removed


def _is_running(pid: int) -> bool:
    """Whether a process with this id runs on this machine (this process counts)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    except (OverflowError, ValueError):
        return False
    return True


def _set_aside(path: Path, problem: str) -> None:
    """Rename a corrupt checkpoint folder to a free ``<name>.corrupt[-N]``, warning with both names."""
    for n in itertools.count():
        target = path.with_name(f"{path.name}{CORRUPT_SUFFIX}" + (f"-{n}" if n else ""))
        if target.exists():
            continue
        try:
            os.rename(path, target)
        except FileNotFoundError:  # another process (a DDP rank) moved it first
            _warn(f"skipping corrupt checkpoint {path}: {problem}; another process moved it aside")
            return
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):  # the target name was taken meanwhile
                continue
            raise
        _warn(f"skipping corrupt checkpoint {path}: {problem}; moved it to {target} so that the run can "
              "save this step again (inspect or delete it)")
        return


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    map_location: str | torch.device = "cpu",
    restore_rng: bool = True,
) -> TrainState:
    """Verify a checkpoint folder, restore model/optimizer/scheduler (and RNG) in place, return its state."""
    path = Path(path)
    problem = _problem(path)
    if problem is not None:
        raise ValueError(f"checkpoint {path} is corrupt: {problem}")
    state = json.loads((path / "state.json").read_text())
    if state.get("zoo_format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path / 'state.json'}: zoo_format_version {state.get('zoo_format_version')} "
                         f"is newer than the supported {FORMAT_VERSION}")
    tensors = load_file(path / "model.safetensors", device=str(torch.device(map_location)))
    _check_keys(tensors, model.state_dict(), path / "model.safetensors")
    model.load_state_dict(tensors, strict=True)
    for obj, name in ((optimizer, "optimizer.pt"), (scheduler, "scheduler.pt")):
        if obj is None:
            continue
        if not (path / name).exists():
            raise ValueError(f"{path / name} is missing, but a {type(obj).__name__} was given to restore")
        obj.load_state_dict(torch.load(path / name, map_location=map_location, weights_only=True))
    if restore_rng:
        _set_rng_state(torch.load(path / "rng.pt", map_location="cpu", weights_only=True))
    return TrainState(step=state["step"], data_state=state["data_state"], config=state["config"],
                      metrics=state["metrics"], path=path)


def _step_dirs(root: Path) -> list[Path]:
    """Final checkpoint folders under ``root``, highest step first (``.tmp-*`` never match)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def _problem(path: Path) -> str | None:
    """Why the checkpoint folder at ``path`` fails verification, or None when it is intact."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        entries = {name: (int(e["bytes"]), str(e["sha256"])) for name, e in files.items()}
    except FileNotFoundError:
        return f"{MANIFEST} is missing"
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__}: {e})"
    missing = [name for name in REQUIRED_FILES if name not in entries]
    if missing:
        return f"{MANIFEST} does not list {missing}"
    for name, (size, digest) in entries.items():
        file = path / name
        if Path(name).name != name or not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, manifest says {size}"
        if _sha256(file) != digest:
            return f"{name} sha256 does not match the manifest"
    return None


def _prune(root: Path, *, keep: Path, keep_last: int) -> None:
    """Delete valid checkpoints beyond the newest ``keep_last`` (never ``keep``) and stale temp folders."""
    valid = 0
    for path in _step_dirs(root):
        if path == keep:
            valid += 1
            continue
        problem = _problem(path)
        if problem is not None:
            logger.warning("leaving corrupt checkpoint %s in place: %s", path, problem)
            continue
        valid += 1
        if valid > keep_last:
            # Rename first so a crash mid-delete leaves a .tmp-* folder, never a broken step-*.
            doomed = root / f".tmp-delete-{path.name}-{os.getpid()}"
            os.rename(path, doomed)
            shutil.rmtree(doomed)
    newest = (keep / MANIFEST).stat().st_mtime
    for path in root.glob(".tmp-*"):
        if path.is_dir() and path.stat().st_mtime < newest:
            shutil.rmtree(path, ignore_errors=True)


def _unshared(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, cloning any that share storage with an earlier one (tied weights)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach()
        ptr = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone().contiguous() if ptr in seen and tensor.numel() else tensor.contiguous()
        seen.add(ptr)
    return out


def _check_keys(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], file: Path) -> None:
    """Raise a ValueError naming every missing, unexpected or wrongly shaped key."""
    errors = []
    if missing := sorted(expected.keys() - tensors.keys()):
        errors.append(f"missing keys {missing}")
    if unexpected := sorted(tensors.keys() - expected.keys()):
        errors.append(f"unexpected keys {unexpected}")
    errors += [f"{k}: file has shape {tuple(tensors[k].shape)}, model expects {tuple(v.shape)}"
               for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    if errors:
        raise ValueError(f"{file} does not match the model: " + "; ".join(errors))


def _rng_state() -> dict[str, Any]:
    """Every global RNG state, as types that ``torch.load(weights_only=True)`` accepts."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    """Restore the global RNG states saved by ``_rng_state``."""
    random.setstate(state["python"])
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if devices == len(state["cuda"]):
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            _warn(f"checkpoint holds {len(state['cuda'])} CUDA RNG states but this machine has "
                  f"{devices} CUDA devices; CUDA RNG not restored")


def _write(path: Path, obj: Any) -> None:
    """Write one checkpoint file (*.safetensors tensors, *.pt torch.save, *.json JSON) and fsync it."""
    if path.suffix == ".safetensors":
        save_file(obj, path)
    elif path.suffix == ".pt":
        with open(path, "wb") as f:  # a file object: a full disk then shows as the OSError it is
            torch.save(obj, f)
    else:
        path.write_text(json.dumps(obj, indent=2))
    _fsync(path)


def nonfinite_tensors(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an infinity."""
    return [name for name, t in state_dict.items()
            if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all())]


def write_error(error: BaseException, root: Path, writing: str, what: str) -> CheckpointWriteError:
    """The CheckpointWriteError for an error raised while writing `what` into `root`: disk full or not, and where."""
    codes = {errno.ENOSPC, errno.EDQUOT}
    chain, e = [], error
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    code = next((e.errno for e in chain if isinstance(e, OSError) and e.errno), None)
    full = code in codes or any("No space left on device" in str(e) or "os error 28" in str(e) for e in chain)
    if not full and not isinstance(error, OSError):  # torch's zip writer hides the cause: look at the disk
        with contextlib.suppress(OSError):
            full = shutil.disk_usage(root).free < 1 << 20
    why = "no space left on device" if full else f"{type(error).__name__}"
    run_dir = root.parent if root.name == "checkpoints" else root
    message = (f"could not save {what} in {root}: {why} (writing {writing}: {error}). "
               f"Nothing of it was kept; earlier checkpoints are untouched. "
               + ("Free some space" if full else "Fix the cause")
               + f", then continue with --resume {run_dir}")
    result = CheckpointWriteError(message)
    result.errno = errno.ENOSPC if full and code not in codes else code
    return result


def _sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file or a directory entry list to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _warn(message: str) -> None:
    """Report a problem both as a Python warning and in the log."""
    warnings.warn(message, stacklevel=3)
    logger.warning(message)
