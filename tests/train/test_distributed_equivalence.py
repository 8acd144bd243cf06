"""The step hook makes training independent of how a global batch is split: two gloo DDP ranks equal one
process, and --grad-accum 2 equals the same global batch in one piece, for every family with per-step
state (the sigmoid router's balance bias, Performer's projection redraws, SAE dead-latent counts,
decoder renormalisation and the BatchTopK threshold), not only for the dense LM."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train.config import parse_args
from train.trainer import Trainer

LM_TINY = ["--set", "d_model=32", "--set", "n_layers=1", "--set", "n_heads=2", "--seq-len", "32",
           "--batch-size", "4", "--eval-batches", "1", "--warmup-steps", "2", "--eval-every", "100"]
LM_CASES = {
    # DeepSeek-V3's auxiliary-loss-free balancing: the bias moves every step, fast enough to change the
    # routing within the run. The Switch balance loss is off: it multiplies two statistics of the batch it
    # sees, so (as in transformers and Megatron's micro-batch balancing) it depends on the split by design.
    "moe-tiny-sigmoid": ["moe-tiny", "--set", "moe_router=sigmoid_topk", "--set", "moe_bias_update_rate=0.05",
                         "--set", "router_aux_loss_coef=0", "--set", "d_ff=64"],
    # projections redrawn every 2 optimizer steps
    "lm-performer-tiny": ["lm-performer-tiny", "--set", 'attention_kwargs={"n_features": 16, "redraw_every": 2}'],
}
SAE_D = 32  # the width of the `source_lm` fixture (tests/train/conftest.py)
SAE_CASES = {"sae-topk-tiny": ["sae-topk-tiny"], "sae-batchtopk-tiny": ["sae-batchtopk-tiny"]}
STEPS = 6


def args_for(case: str, source: Path | None) -> list[str]:
    if case in LM_CASES:
        return [*LM_CASES[case], *LM_TINY]
    # dead_tokens small enough that latents die within the run: AuxK and the dead counts matter
    return [*SAE_CASES[case], "--set", f"source_model={source}", "--set", f"d_in={SAE_D}", "--set", "d_sae=128",
            "--set", "hook_point=blocks.1", "--set", "dead_tokens=64", "--seq-len", "32", "--batch-size", "4",
            "--eval-batches", "1", "--warmup-steps", "2", "--eval-every", "100"]


def step_losses(run: Path) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "step" in r}


def final_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def assert_same_run(a: Path, b: Path) -> None:
    la, lb = step_losses(a), step_losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, STEPS + 1))
    for step in la:
        assert lb[step] == pytest.approx(la[step], abs=1e-5), step
    ta, tb = final_tensors(a), final_tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:  # weights and buffers: router bias, projections, dead counts, threshold
        torch.testing.assert_close(tb[name].float(), ta[name].float(), atol=1e-5, rtol=1e-5, msg=name)


def needs_source(case: str, request) -> Path | None:
    return request.getfixturevalue("source_lm") if case in SAE_CASES else None


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
@pytest.mark.parametrize("case", [*LM_CASES, *SAE_CASES])
def test_two_rank_ddp_equals_one_process(case, tmp_path, request):
    args = [*args_for(case, needs_source(case, request)), "--steps", str(STEPS), "--checkpoint-every", "100"]
    one = subprocess.run([sys.executable, "-m", "train.pretrain", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    two = subprocess.run([*torchrun, "-m", "train.pretrain", *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         timeout=600)  # a hung collective fails the test instead of hanging CI
    assert two.returncode == 0, two.stderr[-3000:]
    assert_same_run(tmp_path / "one", tmp_path / "two")


@pytest.mark.parametrize("case", [*LM_CASES, *SAE_CASES])
def test_grad_accumulation_equals_one_big_batch(case, tmp_path, request):
    base = [*args_for(case, needs_source(case, request)), "--steps", str(STEPS), "--checkpoint-every", "100"]
    Trainer(parse_args([*base, "--out", str(tmp_path / "whole")])).run()
    Trainer(parse_args([*base, "--grad-accum", "2", "--out", str(tmp_path / "accum")])).run()
    assert_same_run(tmp_path / "whole", tmp_path / "accum")


def test_the_state_that_the_step_hook_moves_did_move(tmp_path):
    """Guards the tests above: in these runs the per-step state really changes (else they prove nothing)."""
    steps = ["--steps", str(STEPS)]
    Trainer(parse_args([*args_for("moe-tiny-sigmoid", None), *steps, "--out", str(tmp_path / "m")])).run()
    bias = final_tensors(tmp_path / "m")["blocks.0.mlp.router.bias"]
    assert bias.abs().sum() > 0
    Trainer(parse_args([*args_for("lm-performer-tiny", None), *steps, "--out", str(tmp_path / "p")])).run()
    calls = final_tensors(tmp_path / "p")["blocks.0.attn.kernel.features.training_calls"]
    assert int(calls) == STEPS  # one count per optimizer step, not per forward
