"""The run folder's own files besides checkpoints: the lock that keeps one trainer per folder, and metrics.jsonl.

`RunLock` holds ``RUN/.lock`` with ``fcntl.flock`` for the life of a run (the kernel drops it when
the process dies, however it dies); the file says which process on which host holds it, so a second
trainer on the same folder fails at once naming it. `truncate_log` rewrites metrics.jsonl atomically
(temp file, fsync, rename), so a kill during a resume never loses the log, and drops a torn line (a
write cut short by a full disk) with a warning instead of failing on it.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import logging
import os
import socket
import time
import warnings
import weakref
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_FILE, LOG_FILE = ".lock", "metrics.jsonl"


class RunFolderLocked(RuntimeError):
    """Another trainer holds the run folder's lock; the message names its process and host."""


class RunLock:
    """An exclusive lock on a run folder (created if needed), held until `release` or the process ends."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = None
        for attempt in range(2):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                # A Trainer of this very process that nobody uses any more still holds it: collect it.
                if attempt == 0 and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                    gc.collect()
                    continue
                raise RunFolderLocked(_locked_message(self.path.parent, holder)) from None
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            break
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                        "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode() + b"\n", 0)
        self._finalizer = weakref.finalize(self, os.close, self._fd)  # released when the holder is dropped

    def release(self) -> None:
        """Give the lock up (idempotent)."""
        self._finalizer()


def _read_holder(fd: int) -> dict:
    with contextlib.suppress(OSError, ValueError, UnicodeDecodeError):
        holder = json.loads(os.pread(fd, 4096, 0).decode())
        if isinstance(holder, dict):
            return holder
    return {}


def _locked_message(run_dir: Path, holder: dict) -> str:
    who = (f"process {holder.get('pid', '?')} on host {holder.get('host', '?')} (since {holder.get('since', '?')})"
           if holder else "another process")
    return (f"run folder {run_dir} is in use by {who}: one trainer per run folder. Wait for it to finish "
            f"(or stop it), or give this run another --out")


def read_log(path: Path) -> list[dict]:
    """The records of a metrics.jsonl file; a line that is no JSON object (torn by a full disk) is dropped, warned."""
    records, torn = [], []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (UnicodeDecodeError, ValueError):
                record = None
            if isinstance(record, dict):
                records.append(record)
            else:
                torn.append(number)
    if torn:
        message = (f"{path}: dropped {len(torn)} unreadable line(s) (line {', '.join(map(str, torn[:5]))}"
                   f"{', ...' if len(torn) > 5 else ''}): a write cut short, e.g. by a full disk")
        warnings.warn(message, stacklevel=3)
        logger.warning(message)
    return records


def truncate_log(run_dir: Path, step: int) -> None:
    """Keep the log of steps 1..step (what the checkpoint of `step` holds), rewritten atomically.

    Dropped: step records after `step`, the summary of a finished run, and the notes of resumes at or
    after `step` (their steps are the ones being dropped).
    """
    path = Path(run_dir) / LOG_FILE
    if not path.exists():
        return
    keep = [r for r in read_log(path)
            if "summary" not in r and r.get("step", 0) <= step and r.get("resumed_at_step", -1) < step]
    write_atomically(path, "".join(json.dumps(r) + "\n" for r in keep))


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` by `text`: a temp file beside it, fsync'ed, renamed over it; the folder fsync'ed."""
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
