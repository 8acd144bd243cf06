"""`zoo train` on an SAE catalog entry end to end: harvest, train, exact resume, checkpoint, `zoo eval`."""

import json
from pathlib import Path

import pytest
import torch

from train.config import parse_args
from train.trainer import Trainer
from zoo import load
from zoo.cli import main

D = 32  # the width of the `source_lm` fixture (tests/train/conftest.py)


def sae_args(source: Path, out: Path, entry: str = "sae-topk-tiny", *extra: str) -> list[str]:
    return [entry, "--set", f"source_model={source}", "--set", f"d_in={D}", "--set", "d_sae=128",
            "--set", "hook_point=blocks.1", "--seq-len", "32", "--batch-size", "8", "--eval-batches", "2",
            "--warmup-steps", "2", "--out", str(out), *extra]


def kill_after(args: list[str], steps: int, checkpoint_every: int) -> Path:
    """Trains `steps` steps with checkpoints every `checkpoint_every`, then stops as a kill would; its run folder."""
    killed = Trainer(parse_args(args))
    for _ in range(steps):
        killed.step()
        killed.step_done += 1
        if killed.step_done % checkpoint_every == 0:
            killed.checkpoint()
    return killed.run_dir


def records(run: Path) -> dict[int, dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "step" in r}


def test_zoo_train_on_an_sae_entry_writes_a_checkpoint_that_zoo_load_reads(source_lm, tmp_path, capsys):
    run = tmp_path / "sae"
    code = main(["train", *sae_args(source_lm, run, "sae-topk-tiny", "--set", "k=4", "--steps", "40",
                                    "--lr", "1e-2", "--eval-every", "40")])
    assert code == 0
    curve = records(run)
    assert sorted(curve) == list(range(1, 41))
    first, last = curve[1]["loss"], sum(curve[s]["loss"] for s in range(36, 41)) / 5
    assert last < 0.8 * first, (first, last)
    # TopK keeps k latents, then ReLU: a kept latent whose pre-activation is <= 0 is off (rare once the decoder
    # bias starts at the data mean and inputs are centred), so L0 is at most k and close to it
    assert curve[40]["val_fvu"] < 0.6 and 3.9 <= curve[40]["val_l0"] <= 4.0
    sae = load(str(run / "final"))
    assert type(sae).__name__ == "SAE" and sae.config.kind == "topk" and sae.config.k == 4
    assert sae.config.act_scale is not None and sae.config.context_size == 32
    assert "activations of" in (run / "final" / "README.md").read_text()
    x = torch.randn(5, D)
    assert sae.decode(sae.encode(x)).shape == (5, D)


def test_a_resumed_sae_run_continues_exactly(source_lm, tmp_path):
    # BatchTopK with a short dead window: the threshold and dead-latent buffers and AuxK all matter.
    args = ["--set", "dead_tokens=512", "--set", "auxk_coeff=0.5", "--steps", "12", "--eval-every", "100",
            "--checkpoint-every", "4", "--lr", "1e-2"]
    full = Trainer(parse_args(sae_args(source_lm, tmp_path / "full", "sae-batchtopk-tiny", *args))).run()
    # dies after step 6; its last checkpoint is step 4
    run = kill_after(sae_args(source_lm, tmp_path / "killed", "sae-batchtopk-tiny", *args), 6, 4)
    resumed = Trainer(parse_args(sae_args(source_lm, run, "sae-batchtopk-tiny", *args, "--resume", str(run))))
    assert resumed.step_done == 4
    resumed.run()
    a, b = records(tmp_path / "full"), records(run)
    assert [s for s in b] == list(range(5, 13))
    assert any(a[s]["auxk"] > 0 for s in a), "AuxK was active"
    for step in range(5, 13):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], abs=1e-6), step
        assert b[step]["auxk"] == pytest.approx(a[step]["auxk"], abs=1e-6), step
    torch.testing.assert_close(load(str(run / "final")).threshold, load(full["final"]).threshold)


def test_zoo_eval_on_sae_checkpoints_reports_every_budget_and_plots(source_lm, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    # The hierarchical SAE is trained (20 steps): only then must a larger budget reconstruct better.
    hier_args = sae_args(source_lm, tmp_path / "hier-run", "sae-hier-topk-tiny", "--set", "k=8", "--set", "k_min=1",
                         "--steps", "20", "--eval-every", "20", "--lr", "1e-2")
    folders = {"hier": Path(Trainer(parse_args(hier_args)).run()["final"])}
    capsys.readouterr()  # the training log
    for name, fields in {"topk2": dict(kind="topk", k=2), "topk8": dict(kind="topk", k=8)}.items():
        torch.manual_seed(0)
        sae = load("sae-topk-tiny", d_in=D, d_sae=64, hook_point="blocks.1", source_model=str(source_lm),
                   context_size=32, **fields)
        folders[name] = tmp_path / name
        sae.save_pretrained(folders[name])
    plot = tmp_path / "fvu_l0.png"
    code = main(["eval", str(folders["hier"]), "--max-batches", "2", "--batch-size", "4", "--plot", str(plot),
                 "--compare", str(folders["topk2"]), str(folders["topk8"])])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert [row["k"] for row in result["budgets"]] == [1, 2, 4, 8]
    assert [round(row["l0"]) for row in result["budgets"]] == [1, 2, 4, 8]
    fvus = [row["fvu"] for row in result["budgets"]]
    assert fvus == sorted(fvus, reverse=True), "a larger budget reconstructs better"
    for row in result["budgets"]:
        assert {"ce_clean", "ce_sae", "ce_zero", "ce_loss_recovered", "dead_frac", "dense_frac"} <= set(row)
    assert set(result["compare"]) == {str(folders["topk2"]), str(folders["topk8"])}
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_resampling_runs_every_n_steps_and_a_resumed_run_resamples_the_same(source_lm, tmp_path):
    # k=1 over 128 latents leaves most latents silent for a whole batch (256 activations): dead at once.
    args = ["--set", "k=1", "--set", "dead_tokens=256", "--set", "resample_every=3", "--set", "auxk_coeff=0",
            "--steps", "9", "--eval-every", "100", "--checkpoint-every", "4", "--lr", "1e-2"]
    full = Trainer(parse_args(sae_args(source_lm, tmp_path / "full", "sae-topk-tiny", *args))).run()
    a = records(tmp_path / "full")
    assert [s for s in a if "resampled" in a[s]] == [3, 6], "every 3 steps, not in the last 3"
    assert a[3]["resampled"] > 0
    run = kill_after(sae_args(source_lm, tmp_path / "killed", "sae-topk-tiny", *args), 5, 4)  # resumes at step 4
    Trainer(parse_args(sae_args(source_lm, run, "sae-topk-tiny", *args, "--resume", str(run)))).run()
    b = records(run)
    assert b[6]["resampled"] == a[6]["resampled"]
    for step in range(5, 10):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], abs=1e-6), step
    torch.testing.assert_close(load(str(run / "final")).W_dec, load(full["final"]).W_dec)


def test_resampling_refuses_fsdp_with_a_clear_error(source_lm, tmp_path):
    args = ["--set", "resample_every=3", "--fsdp", "--steps", "2"]
    with pytest.raises(ValueError, match="resample_every.*--fsdp"):
        Trainer(parse_args(sae_args(source_lm, tmp_path / "run", "sae-topk-tiny", *args)))


@pytest.mark.parametrize("kind", ["batchtopk", "matryoshka"])
def test_micro_batches_with_the_global_threshold_select_the_code_of_the_whole_batch(kind):
    from models.base import merge_step_stats
    from models.sae import SAE, SAEConfig
    from train.sae_task import global_batch_threshold

    torch.manual_seed(0)
    extra = {"matryoshka_widths": [16, 64]} if kind == "matryoshka" else {}
    sae = SAE(SAEConfig(kind=kind, d_in=D, d_sae=64, k=4, dead_tokens=1, **extra)).train()
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(1))
    whole = sae(x)
    (whole.loss + sum(whole.aux_losses.values())).backward()
    grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()
    assert global_batch_threshold(sae, x, micro_rows=64) is None, "one process, one micro-batch: nothing to do"
    threshold = global_batch_threshold(sae, x, micro_rows=32)
    stats, x_hat = {}, []
    for half in x.split(32):  # what --grad-accum 2 does with the same global batch
        out = sae(half, batch_threshold=threshold)
        ((out.loss + sum(out.aux_losses.values())) / 2).backward()
        merge_step_stats(stats, out.step_stats)
        x_hat.append(out.x_hat)
    assert torch.equal(stats["fire_counts"], whole.step_stats["fire_counts"]), "the same latents fire"
    assert int(stats["rows"]) == 64 and torch.equal(stats["threshold_min"], whole.step_stats["threshold_min"])
    torch.testing.assert_close(torch.cat(x_hat), whole.x_hat, rtol=0, atol=1e-6)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-6, msg=name)
    alone = [sae(half).step_stats["fire_counts"] for half in x.split(32)]  # each half ranking only itself
    assert not torch.equal(alone[0] + alone[1], whole.step_stats["fire_counts"]), "the threshold mattered"
