"""Runs that can finish: corrupt checkpoints are moved aside."""

from pathlib import Path

import pytest
import torch

from train.checkpoint import latest_checkpoint, save_checkpoint


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
