"""The trainer under failure (issue 16): full disks, stale temp folders, NaN updates, resumes with other
settings, the metrics log, two trainers on one folder, SIGTERM and Ctrl-C."""

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from train import checkpoint
from train.config import parse_args
from train.trainer import Trainer
from zoo.cli import main

TINY = ["--set", "d_model=32", "--set", "n_layers=1", "--set", "n_heads=2", "--seq-len", "32",
        "--batch-size", "4", "--eval-batches", "2", "--warmup-steps", "3", "--eval-every", "1000"]


def args(run: Path, *extra: str) -> list[str]:
    return ["lm-dense-tiny", *TINY, "--out", str(run), *extra]


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def full_disk(monkeypatch) -> None:
    """Every checkpoint weights file fails to write as on a full disk."""
    def write(tensors, path, *a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(checkpoint, "save_file", write)


# ---- a failed save is one line and exit code 4 --------------------------------------------------------

def test_a_full_disk_during_a_checkpoint_is_one_line_and_exit_code_4(tmp_path, monkeypatch, capsys):
    full_disk(monkeypatch)
    assert main(["train", *args(tmp_path / "run", "--steps", "2", "--checkpoint-every", "1")]) == 4
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("zoo train")]
    assert len(lines) == 1 and "no space left on device" in lines[0] and str(tmp_path / "run") in lines[0]
    assert "Traceback" not in err


def test_a_full_disk_while_writing_the_final_checkpoint_is_one_line(tmp_path, monkeypatch, capsys):
    from transformers import PreTrainedModel

    def no_space(self, folder, *a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", no_space)
    assert main(["train", *args(tmp_path / "run", "--steps", "2")]) == 4
    err = capsys.readouterr().err
    assert "could not save the final checkpoint" in err and "Traceback" not in err
    assert not list((tmp_path / "run").glob(".tmp-*")), "the temp folder is removed"
    assert checkpoint.latest_checkpoint(tmp_path / "run").name == "step-000002", "the resumable one is intact"


def test_temp_folders_of_crashed_saves_are_removed_at_every_start(tmp_path):
    run = tmp_path / "run"
    stale = [run / "checkpoints" / f".tmp-step-000003-{dead_pid()}", run / f".tmp-final-{dead_pid()}"]
    for folder in stale:
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"half")
    Trainer(parse_args(args(run, "--steps", "1")))  # a fresh run, not a resume
    assert not any(folder.exists() for folder in stale)


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
def test_a_failed_save_on_rank_0_stops_every_rank_instead_of_hanging(tmp_path):
    script = tmp_path / "full_disk_on_rank_0.py"
    script.write_text(textwrap.dedent("""
        import errno, os, sys
        from train import checkpoint
        from train.pretrain import main

        def write(tensors, path, *a, **kw):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        if os.environ["RANK"] == "0":
            checkpoint.save_file = write
        sys.exit(main(sys.argv[1:]))
    """))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run([*torchrun, str(script), *args(tmp_path / "run", "--steps", "4", "--checkpoint-every", "2")],
                          capture_output=True, text=True, timeout=240, cwd=Path(__file__).parents[2],
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])})
    assert done.returncode != 0
    assert "no space left on device" in done.stderr and "rank 0 could not save" in done.stderr


# ---- item 3: no non-finite update is applied, no non-finite checkpoint written ---------------------------

class NaNGradient(torch.autograd.Function):
    """The identity whose backward pass returns NaN: a finite loss with a NaN gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def poison_from_call(monkeypatch, first: int) -> None:
    import train.tasks as tasks

    real, calls = tasks.lm_loss, {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        out = real(model, batch)
        if calls["n"] >= first:
            out.loss = NaNGradient.apply(out.loss)
        return out

    monkeypatch.setattr(tasks, "lm_loss", poisoned)


def finite(path: Path) -> bool:
    from safetensors.torch import load_file

    return all(torch.isfinite(t).all() for t in load_file(path / "model.safetensors").values())


def test_a_nan_gradient_with_a_finite_loss_stops_before_the_update(tmp_path, monkeypatch):
    from train.trainer import TrainingDiverged

    poison_from_call(monkeypatch, first=6)  # step 6 has a NaN gradient; step 6 is also a checkpoint step
    trainer = Trainer(parse_args(args(tmp_path / "run", "--steps", "20", "--checkpoint-every", "3",
                                      "--keep-last", "1")))
    with pytest.raises(TrainingDiverged, match=r"gradient norm is nan .*at step 6;.*step-000003"):
        trainer.run()
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert saved == ["step-000003"], "the good checkpoint was not pruned by a bad one"
    assert finite(tmp_path / "run" / "checkpoints" / "step-000003")
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters()), "the update was not applied"


def test_weights_made_non_finite_by_the_step_hook_are_never_saved(tmp_path, monkeypatch):
    from train.tasks import LMTask
    from train.trainer import TrainingDiverged

    real = LMTask.after_step

    def breaks_a_weight(self, model, optimizer, stats, step):
        if step == 4:
            with torch.no_grad():
                next(model.parameters())[0, 0] = float("inf")
        return real(self, model, optimizer, stats, step)

    monkeypatch.setattr(LMTask, "after_step", breaks_a_weight)
    with pytest.raises(TrainingDiverged, match=r"weights became non-finite.*at step 4.*step-000002"):
        Trainer(parse_args(args(tmp_path / "run", "--steps", "20", "--checkpoint-every", "2",
                                "--keep-last", "1"))).run()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000002"]


def test_save_checkpoint_refuses_non_finite_weights_and_writes_nothing(tmp_path):
    model = torch.nn.Linear(3, 3)
    with torch.no_grad():
        model.weight[1, 2] = float("nan")
    with pytest.raises(checkpoint.NonFiniteWeightsError, match="weight"):
        checkpoint.save_checkpoint(tmp_path, 1, model=model, optimizer=None, scheduler=None, data_state={},
                                   config={}, metrics={})
    assert not (tmp_path / "checkpoints").exists()
