"""The common trainer: resume after SIGKILL, Ctrl-C, DDP parity, bad input, NaN stop, eval."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train.config import TrainConfig, parse_args
from train.trainer import Trainer, TrainingDiverged, lr_factor, param_groups

# A model and run small enough for a test: a few ms a step.
TINY = ["--set", "d_model=32", "--set", "n_layers=1", "--set", "n_heads=2", "--seq-len", "32",
        "--batch-size", "4", "--eval-batches", "2", "--warmup-steps", "3"]


def tiny_config(tmp_path, **kw) -> TrainConfig:
    return parse_args(["lm-dense-tiny", *TINY, "--out", str(tmp_path / "run"), *sum(
        ([f"--{k.replace('_', '-')}", str(v)] for k, v in kw.items()), [])])


def losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "step" in record:
            out[record["step"]] = record["loss"]
    return out


def train_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "train.pretrain", "lm-dense-tiny", *TINY, *args]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    start = time.time()
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path} appeared: {proc.stderr.read()}"
        assert time.time() - start < timeout, f"{path} did not appear"
        time.sleep(0.05)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(55, cfg) == pytest.approx(0.55)  # half-way down the cosine
    assert lr_factor(100, cfg) == pytest.approx(0.1)


def test_no_weight_decay_on_norms_biases_and_embeddings():
    from zoo import load

    model = load("lm-dense-tiny", n_layers=1)
    decay, no_decay = param_groups(model, 0.1)
    decayed = {id(p) for p in decay["params"]}
    assert id(model.embed.weight) not in decayed
    assert all(id(p) not in decayed for n, p in model.named_parameters() if "norm" in n)
    assert id(model.blocks[0].attn.q_proj.weight) in decayed
    assert no_decay["weight_decay"] == 0.0


def test_training_lowers_the_loss_and_writes_a_loadable_final_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    from zoo import load

    summary = Trainer(tiny_config(tmp_path, steps=40, lr=0.01)).run()
    curve = losses(tmp_path / "run")
    assert sorted(curve) == list(range(1, 41))
    assert sum(list(curve.values())[-5:]) / 5 < curve[1] - 1.0  # byte-level loss starts near ln 256
    final = Path(summary["final"])
    card = (final / "README.md").read_text()
    assert "steps: 40" in card and "val_loss" in card
    x = torch.randint(0, 256, (1, 16))
    ours, theirs = load(final), AutoModelForCausalLM.from_pretrained(final)
    torch.testing.assert_close(ours(x).logits, theirs(x).logits)
    assert summary["tokens"] == 40 * 4 * 32 and 0 < summary["mfu"] < 1


def test_grad_accumulation_gives_the_same_step_as_one_big_batch(tmp_path):
    a = Trainer(tiny_config(tmp_path / "a", steps=3))
    b = Trainer(tiny_config(tmp_path / "b", steps=3, grad_accum=2))
    for _ in range(3):
        ra, rb = a.step(), b.step()
        a.step_done += 1
        b.step_done += 1
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6)
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=False):
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-5)


def test_resume_after_sigkill_reproduces_the_uninterrupted_loss_curve(tmp_path):
    steps = ["--steps", "60", "--checkpoint-every", "5", "--eval-every", "1000"]
    subprocess.run(train_cmd(*steps, "--out", str(tmp_path / "full")), check=True, capture_output=True)
    run = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(*steps, "--out", str(run)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_for(run / "checkpoints" / "step-000015", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "final").exists(), "the kill should land before the run ends"
    done = subprocess.run(train_cmd(*steps, "--out", str(run), "--resume", str(run)), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stderr
    full, resumed = losses(tmp_path / "full"), losses(run)
    assert sorted(resumed) == sorted(full) == list(range(1, 61))
    for step in full:
        assert resumed[step] == pytest.approx(full[step], abs=1e-6), step


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(train_cmd("--steps", "100000", "--checkpoint-every", "10", "--out", str(run)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(run / "checkpoints" / "step-000010", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    from train.checkpoint import latest_checkpoint

    last = latest_checkpoint(run)
    assert last is not None and f"saved {last}" in err
    stopped_at = int(last.name.split("-")[1])
    assert max(losses(run)) == stopped_at  # the checkpoint holds the last step that was logged


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp2"])
def test_two_rank_data_parallel_equals_one_process(tmp_path, sharding):
    steps = ["--steps", "8", "--eval-every", "4", "--checkpoint-every", "4", *sharding]
    subprocess.run(train_cmd(*steps, "--out", str(tmp_path / "one")), check=True, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    two = subprocess.run([*torchrun, "-m", "train.pretrain", "lm-dense-tiny", *TINY, *steps,
                          "--out", str(tmp_path / "two")], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)  # a hang fails, not blocks CI
    assert two.returncode == 0, two.stderr[-3000:]
    one, ddp = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(ddp) == list(range(1, 9))
    for step in one:
        assert ddp[step] == pytest.approx(one[step], abs=1e-5), step
    from zoo import load

    x = torch.randint(0, 256, (1, 16))
    torch.testing.assert_close(load(tmp_path / "one" / "final")(x).logits, load(tmp_path / "two" / "final")(x).logits,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--data", "no/such/file.txt"], "no/such/file.txt"),
        (["--seq-len", "300"], "max_seq_len"),
        (["--batch-size", "4", "--grad-accum", "3"], "grad-accum"),
        (["--steps", "0"], "--steps"),
        (["--set", "n_layers=two"], "n_layers"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, flags, message):
    from zoo.cli import main

    with pytest.raises((ValueError, FileNotFoundError), match=message):
        Trainer(parse_args(["lm-dense-tiny", *TINY, "--out", str(tmp_path), *flags]))
    assert main(["train", "lm-dense-tiny", *TINY, "--out", str(tmp_path), *flags]) == 2


def test_empty_corpus_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        Trainer(tiny_config(tmp_path, data=str(empty)))


def test_nan_loss_stops_and_names_the_last_good_checkpoint(tmp_path, monkeypatch):
    import train.tasks as trainer_module

    real = trainer_module.lm_loss
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        out = real(model, batch)
        if calls["n"] > 6:
            out.loss = out.loss * math.nan
        return out

    monkeypatch.setattr(trainer_module, "lm_loss", poisoned)
    with pytest.raises(TrainingDiverged, match=r"step 7.*step-000006"):
        Trainer(tiny_config(tmp_path, steps=20, checkpoint_every=3)).run()
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert saved[-1] == "step-000006" and not (tmp_path / "run" / "final").exists()


def test_eval_command_reports_the_trainers_validation_loss(tmp_path, capsys):
    from train.evaluate import main as eval_main

    summary = Trainer(tiny_config(tmp_path, steps=5, eval_batches=0)).run()
    capsys.readouterr()
    assert eval_main([summary["final"], "--seq-len", "32", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{"):])
    assert result["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-5)
    assert result["val_ppl"] == pytest.approx(math.exp(summary["val_loss"]), rel=1e-5)


def test_config_file_supplies_flags_and_the_command_line_wins(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("steps: 7\nlr: 0.01\nmodel_overrides: {n_layers: 1}\n")
    cfg = parse_args(["lm-dense-tiny", "--config", str(file), "--lr", "0.02"])
    assert (cfg.steps, cfg.lr, cfg.model_overrides) == (7, 0.02, {"n_layers": 1})
    file.write_text("stepz: 7\n")
    with pytest.raises(ValueError, match="stepz"):
        parse_args(["--config", str(file)])


def test_wandb_logs_offline_without_a_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    Trainer(tiny_config(tmp_path, steps=3, wandb_project="zoo-test")).run()
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_moe_load_statistics_reach_the_metrics_log(tmp_path):
    cfg = parse_args(["moe-tiny", *TINY, "--set", "d_ff=64", "--steps", "2", "--eval-every", "100",
                      "--out", str(tmp_path / "run")])
    Trainer(cfg).run()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in records if r.get("step") == 2)
    assert 0 < step["moe_load_entropy"] <= 1 and step["moe_active_experts"] == pytest.approx(2.0)
    loads = step["moe_tokens_per_expert"]  # per layer, over the whole global batch: 4 x 32 tokens, k = 2
    assert len(loads) == 1 and len(loads[0]) == 8 and sum(loads[0]) == 4 * 32 * 2


def test_a_cpu_trainer_flushes_subnormal_floats_while_it_trains_and_restores_the_setting(tmp_path, monkeypatch):
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush subnormals (no SSE3)")
    tiny = torch.tensor([1e-39], dtype=torch.float32)
    assert float(tiny * 1.0) != 0  # subnormals are kept by default
    seen = []
    trainer = Trainer(tiny_config(tmp_path, steps=2))
    step = trainer.step
    monkeypatch.setattr(trainer, "step", lambda: (seen.append(float(tiny * 1.0)), step())[1])
    trainer.run()
    assert seen == [0.0, 0.0]  # flushed during the steps
    assert float(tiny * 1.0) != 0  # and the process's setting back after the run
