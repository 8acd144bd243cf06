"""Runs that can finish: corrupt checkpoints are moved aside, a full disk is a clear error, temp folders go."""

import errno
import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from train import checkpoint
from train.checkpoint import CheckpointWriteError, clean_stale_temp, latest_checkpoint, save_checkpoint


def save(run_dir: Path, step: int, model: torch.nn.Module | None = None) -> Path:
    model = model or torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    return save_checkpoint(run_dir, step, model=model, optimizer=optimizer, scheduler=None,
                           data_state={"next_step": step}, config={}, metrics={})


def corrupt(path: Path) -> None:
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))


def names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


# ---- item 6: a corrupt checkpoint is moved aside so that its step can be saved again ------------------------

def test_a_corrupt_newest_checkpoint_is_moved_aside_and_its_step_saved_again(tmp_path):
    good, bad = save(tmp_path, 1), save(tmp_path, 2)
    corrupt(bad)
    with pytest.warns(UserWarning, match=r"step-000002.*sha256.*moved it to .*step-000002\.corrupt"):
        assert latest_checkpoint(tmp_path) == good
    assert names(tmp_path) == ["step-000001", "step-000002.corrupt"]
    again = save(tmp_path, 2)  # the resumed run reaches step 2 again
    assert latest_checkpoint(tmp_path) == again


def test_when_every_checkpoint_is_corrupt_all_are_moved_aside(tmp_path):
    for step in (1, 2):
        corrupt(save(tmp_path, step))
    with pytest.warns(UserWarning, match="corrupt"):
        assert latest_checkpoint(tmp_path) is None
    assert names(tmp_path) == ["step-000001.corrupt", "step-000002.corrupt"]
    save(tmp_path, 1)
    save(tmp_path, 2)


def test_a_second_corruption_of_the_same_step_keeps_the_first_evidence(tmp_path):
    for _ in range(2):
        corrupt(save(tmp_path, 3))
        with pytest.warns(UserWarning, match="corrupt"):
            latest_checkpoint(tmp_path)
    assert names(tmp_path) == ["step-000003.corrupt", "step-000003.corrupt-1"]


def test_saving_over_a_corrupt_folder_moves_it_aside_but_a_valid_one_is_never_overwritten(tmp_path):
    corrupt(save(tmp_path, 4))
    with pytest.warns(UserWarning, match=r"step-000004.*moved it to"):
        save(tmp_path, 4)
    assert names(tmp_path) == ["step-000004", "step-000004.corrupt"]
    with pytest.raises(FileExistsError, match="never overwritten"):
        save(tmp_path, 4)


def test_a_resumed_run_whose_newest_checkpoint_is_corrupt_finishes(tmp_path):
    from test_trainer import tiny_config

    from train.trainer import Trainer

    Trainer(tiny_config(tmp_path, steps=4, checkpoint_every=2)).run()
    corrupt(tmp_path / "run" / "checkpoints" / "step-000004")
    with pytest.warns(UserWarning, match="moved it to"):
        summary = Trainer(tiny_config(tmp_path, steps=4, checkpoint_every=2, resume=tmp_path / "run")).run()
    assert summary["steps"] == 4
    assert latest_checkpoint(tmp_path / "run").name == "step-000004"


# ---- item 9: a full disk is a clear error naming the folder; leftovers are cleaned at the next start --------

def test_no_space_left_is_a_checkpoint_write_error_naming_the_folder(tmp_path, monkeypatch):
    good = save(tmp_path, 1)
    real = checkpoint.save_file

    def full_disk(tensors, path, *args, **kwargs):
        real(tensors, path, *args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(CheckpointWriteError) as info:
        save(tmp_path, 2)
    message = str(info.value)
    assert str(tmp_path / "checkpoints") in message and "no space left" in message.lower()
    assert "--resume" in message and "Traceback" not in message
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert names(tmp_path) == ["step-000001"]  # no temp folder left behind
    assert latest_checkpoint(tmp_path) == good


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (needs root); skipped where it cannot be mounted."""
    mount = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_real_full_disk_is_a_clear_error_and_leaves_no_temp_folder(small_disk):
    good = save(small_disk, 1)
    with pytest.raises(CheckpointWriteError, match=rf"{small_disk / 'checkpoints'}.*no space left"):
        save(small_disk, 2, model=torch.nn.Linear(512, 512))  # 1 MiB of weights, 3 MiB with AdamW moments
    assert names(small_disk) == ["step-000001"]
    assert latest_checkpoint(small_disk) == good


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_temp_folders_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    root = tmp_path / "checkpoints"
    dead, live = dead_pid(), os.getpid()
    leftovers = [root / f".tmp-step-000005-{dead}", root / f".tmp-delete-step-000001-{dead}",
                 tmp_path / f".tmp-final-{dead}"]
    kept = [root / f".tmp-step-000006-{live}", root / "step-000002.corrupt"]
    for folder in leftovers + kept:
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"half")
    assert sorted(clean_stale_temp(tmp_path)) == sorted(leftovers)
    assert all(not p.exists() for p in leftovers) and all(p.exists() for p in kept)


def test_latest_checkpoint_cleans_up_a_crashed_save(tmp_path):
    good = save(tmp_path, 1)
    leftover = tmp_path / "checkpoints" / f".tmp-step-000002-{dead_pid()}"
    leftover.mkdir()
    (leftover / "optimizer.pt").write_bytes(bytes(1000))
    assert latest_checkpoint(tmp_path) == good
    assert not leftover.exists()
    assert json.loads((good / "state.json").read_text())["step"] == 1
