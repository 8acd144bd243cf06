"""The trainer under failure (issue 16): full disks, stale temp folders, NaN updates, resumes with other
settings, the metrics log, two trainers on one folder, SIGTERM and Ctrl-C."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from test_trainer import wait_for  # tests/train is on sys.path (pytest prepends a test's folder)

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


# ---- item 5: metrics.jsonl on resume ---------------------------------------------------------------------

def steps_logged(run: Path) -> list[int]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if "step" in r]


def test_a_torn_last_log_line_is_dropped_with_a_warning_on_resume(tmp_path):
    run = tmp_path / "run"
    Trainer(parse_args(args(run, "--steps", "4", "--checkpoint-every", "2"))).run()
    shutil.rmtree(run / "checkpoints" / "step-000004")  # as if killed before the last checkpoint
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 5.1, "lr"')  # a write cut short by a full disk
    with pytest.warns(UserWarning, match="dropped 1 unreadable line"):
        Trainer(parse_args(args(run, "--steps", "5", "--checkpoint-every", "2", "--resume", str(run)))).run()
    assert steps_logged(run) == [1, 2, 3, 4, 5]


def test_a_resume_that_finds_no_checkpoint_logs_each_step_once(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5.0}) + "\n" for s in (1, 2, 3)))
    Trainer(parse_args(args(run, "--steps", "4", "--resume", str(run)))).run()
    assert steps_logged(run) == [1, 2, 3, 4]


def test_the_log_rewrite_is_atomic(tmp_path, monkeypatch):
    from train import run_folder

    log = tmp_path / "metrics.jsonl"
    text = "".join(json.dumps({"step": s}) + "\n" for s in range(1, 101))
    log.write_text(text)

    def killed(fd):
        raise KeyboardInterrupt  # the process dies after writing the new log, before the rename

    monkeypatch.setattr(run_folder.os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        run_folder.truncate_log(tmp_path, 50)
    assert log.read_text() == text and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    monkeypatch.undo()
    run_folder.truncate_log(tmp_path, 50)
    assert steps_logged(tmp_path) == list(range(1, 51))


# ---- item 7: one trainer per run folder ------------------------------------------------------------------

def test_a_second_trainer_on_a_run_folder_fails_at_once_naming_the_holder(tmp_path, capsys):
    import socket

    from train.run_folder import RunFolderLocked

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from train.run_folder import RunLock
        lock = RunLock({str(run)!r})
        print("locked", flush=True)
        time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderLocked, match=rf"process {holder.pid} on host {socket.gethostname()}"):
            Trainer(parse_args(args(run, "--steps", "1")))
        assert main(["train", *args(run, "--steps", "1")]) == 2
        assert f"in use by process {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    Trainer(parse_args(args(run, "--steps", "1"))).run()  # the kernel dropped the dead holder's lock


def test_the_lock_is_held_by_a_live_trainer_and_released_by_its_run(tmp_path):
    from train.run_folder import RunFolderLocked

    first = Trainer(parse_args(args(tmp_path / "run", "--steps", "1")))
    with pytest.raises(RunFolderLocked, match=f"process {os.getpid()}"):
        Trainer(parse_args(args(tmp_path / "run", "--steps", "1")))
    first.run()
    Trainer(parse_args(args(tmp_path / "run", "--steps", "2", "--resume", str(tmp_path / "run")))).run()


# ---- item 8: SIGTERM and Ctrl-C ------------------------------------------------------------------------

def _ctrl_c_as_in_a_terminal() -> None:
    """In the child: Ctrl-C's default disposition. A job a non-interactive shell starts in the background
    (`cmd &`, e.g. CI launched that way) inherits SIGINT ignored, and the trainer keeps an ignored signal
    ignored (nohup semantics), so without this the Ctrl-C tests would test the shell, not the trainer."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def train_process(run: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "train.pretrain", *args(run, *extra)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2],
                            preexec_fn=_ctrl_c_as_in_a_terminal)


def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path):
    run = tmp_path / "run"
    proc = train_process(run, "--steps", "100000", "--checkpoint-every", "10")
    wait_for(run / "checkpoints" / "step-000010", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    last = checkpoint.latest_checkpoint(run)
    assert f"SIGTERM: saved {last}" in err and "exiting with code 143" in err
    assert steps_logged(run)[-1] == int(last.name.split("-")[1])  # it holds the last step logged


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_during_startup_exits_with_one_line_and_no_traceback(tmp_path, signum):
    proc = train_process(tmp_path / "run", "--steps", "100000")
    time.sleep(1.0)  # still importing torch or building the trainer
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err


def test_ctrl_c_before_the_first_step_is_exit_130_and_one_line(tmp_path, monkeypatch, capsys):
    def interrupted(self, cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "__init__", interrupted)
    assert main(["train", *args(tmp_path / "run", "--steps", "1")]) == 130
    err = capsys.readouterr().err.strip()
    assert err == "zoo train: Ctrl-C before the first step: stopped, nothing was saved"


# ---- item 4: --resume with other settings ----------------------------------------------------------------

def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def stopped_run(tmp_path) -> Path:
    """A run of 4 steps with checkpoints at 2 and 4 (and its final checkpoint)."""
    run = tmp_path / "run"
    Trainer(parse_args(args(run, "--steps", "4", "--checkpoint-every", "2"))).run()
    return run


@pytest.mark.parametrize("change, message", [
    (["--lr", "0.01"], r"--lr 0.003 -> 0.01"),
    (["--seed", "1"], r"--seed 0 -> 1"),
    (["--batch-size", "8"], r"--batch-size 4 -> 8"),
    (["--seq-len", "16"], r"--seq-len 32 -> 16"),
    (["--grad-accum", "2"], r"--grad-accum 1 -> 2"),
    (["--warmup-steps", "5"], r"--warmup-steps 3 -> 5"),
    (["--set", "init_std=0.01"], r"model field init_std 0.02 -> 0.01"),
    (["--set", "d_ff=64"], r"model field d_ff 128 -> 64"),
])
def test_a_resume_with_a_change_that_breaks_exactness_is_refused(stopped_run, change, message, capsys):
    before = (stopped_run / "train_config.json").read_text()
    with pytest.raises(ValueError, match=message + r".*--allow-change"):
        Trainer(parse_args(args(stopped_run, "--steps", "6", "--resume", str(stopped_run), *change)))
    assert main(["train", *args(stopped_run, "--steps", "6", "--resume", str(stopped_run), *change)]) == 2
    assert "--allow-change" in capsys.readouterr().err
    assert (stopped_run / "train_config.json").read_text() == before, "nothing recorded that did not happen"


def test_allow_change_applies_the_new_lr_and_records_old_and_new(stopped_run):
    from train.trainer import lr_factor

    cfg = parse_args(args(stopped_run, "--steps", "6", "--checkpoint-every", "2", "--resume", str(stopped_run),
                          "--lr", "0.01", "--allow-change", "lr"))
    trainer = Trainer(cfg)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * lr_factor(4, cfg))
    trainer.run()
    logged = {r["step"]: r["lr"] for r in records(stopped_run) if "step" in r}
    assert logged[5] == pytest.approx(0.01 * lr_factor(4, cfg)) and logged[6] == pytest.approx(0.01 * lr_factor(5, cfg))
    note = next(r for r in records(stopped_run) if "resumed_at_step" in r)
    assert note["resumed_at_step"] == 4 and note["changed"]["lr"] == {"old": 0.003, "new": 0.01}
    saved = json.loads((stopped_run / "train_config.json").read_text())
    assert saved["lr"] == 0.01 and saved["changes_on_resume"] == [
        {"step": 4, "checkpoint": "step-000004", "changed": {"lr": {"old": 0.003, "new": 0.01},
                                                             "steps": {"old": 4, "new": 6}}}]
    state = json.loads((stopped_run / "checkpoints" / "step-000006" / "state.json").read_text())
    assert state["config"]["changes"] == saved["changes_on_resume"], "the history travels with the checkpoint"


def test_more_steps_need_no_flag_and_the_card_counts_the_tokens_of_each_batch_size(stopped_run):
    Trainer(parse_args(args(stopped_run, "--steps", "6", "--resume", str(stopped_run), "--batch-size", "8",
                            "--allow-change", "batch_size"))).run()
    card = (stopped_run / "final" / "README.md").read_text()
    assert f"tokens: {4 * 4 * 32 + 2 * 8 * 32}" in card
    assert "changed on resume" in card and '"batch_size": "4 -> 8"' in card


def test_allow_change_of_an_unknown_name_is_refused(stopped_run):
    with pytest.raises(ValueError, match="--allow-change lrr: not a setting or a model config field"):
        Trainer(parse_args(args(stopped_run, "--steps", "6", "--resume", str(stopped_run), "--allow-change", "lrr")))


@pytest.mark.parametrize("flag", [["--lr", "nan"], ["--lr", "inf"], ["--weight-decay", "inf"],
                                  ["--betas", "0.9", "nan"], ["--grad-clip", "inf"]])
def test_non_finite_numbers_on_the_command_line_are_refused(flag):
    with pytest.raises(ValueError, match=rf"{flag[0]} = .* must be a finite number"):
        parse_args(["lm-dense-tiny", *flag])


@pytest.mark.parametrize("signum, stops_with", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, SystemExit)])
def test_a_second_signal_stops_at_once(tmp_path, signum, stops_with):
    trainer = Trainer(parse_args(args(tmp_path / "run", "--steps", "1")))
    trainer._on_signal(signum, None)
    assert trainer.stop_requested == signum  # the first one only asks the loop to save and stop
    with pytest.raises(stops_with) as info:
        trainer._on_signal(signum, None)
    assert stops_with is KeyboardInterrupt or info.value.code == 143
