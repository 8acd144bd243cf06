"""MoE conversions: transformers sparse-MoE blocks -> MoEMLP, and dense -> MoE upcycling (`zoo convert --to moe`)."""

import json

import pytest
import torch
from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

import zoo.convert
from layers.moe import MoEMLP
from zoo import load
from zoo.convert import CONVERTERS, moe_from_transformers

BLOCKS = {
    "mixtral": (MixtralSparseMoeBlock, lambda: MixtralConfig(hidden_size=32, intermediate_size=48,
                                                             num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": (Qwen2MoeSparseMoeBlock, lambda: Qwen2MoeConfig(
        hidden_size=32, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=6,
        num_experts_per_tok=2, norm_topk_prob=False)),
    "olmoe": (OlmoeSparseMoeBlock, lambda: OlmoeConfig(hidden_size=32, intermediate_size=24, num_experts=6,
                                                       num_experts_per_tok=3)),
}


def random_block(name: str):
    cls, make_config = BLOCKS[name]
    config = make_config()
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    block = cls(config).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return block


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_transformers_block_and_ours_give_the_same_outputs_and_gradients(name):
    block = random_block(name)
    ours = moe_from_transformers(block)
    assert isinstance(ours, MoEMLP) and ours.num_experts == block.gate.weight.shape[0]
    x = torch.randn(2, 9, 32, requires_grad=True)
    want = block(x)
    got, _ = ours(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(want)
    (grad_want,) = torch.autograd.grad(want, x, g)
    (grad_got,) = torch.autograd.grad(got, x, g)
    torch.testing.assert_close(grad_got, grad_want, atol=1e-5, rtol=1e-5)


def test_qwen_shared_expert_and_its_gate_are_carried_over():
    ours = moe_from_transformers(random_block("qwen2_moe"))
    assert ours.shared.up.out_features == 40 and ours.shared_gate is not None
    assert not ours.router.norm_topk_prob


def test_a_block_without_a_router_is_a_clear_error():
    with pytest.raises(ValueError, match="sparse-MoE block"):
        moe_from_transformers(torch.nn.Linear(4, 4))


def test_moe_from_transformers_is_exported_by_zoo_convert():
    assert zoo.convert.moe_from_transformers is moe_from_transformers and "moe" in CONVERTERS


@pytest.mark.parametrize("k", [1, 2])
def test_upcycled_model_reproduces_the_dense_logits(k):
    torch.manual_seed(0)
    dense = load("lm-dense-tiny", n_layers=2, d_model=64, max_seq_len=64)
    for p in dense.parameters():  # away from the init, so that a wrong copy would show
        p.data.add_(torch.randn_like(p) * 0.05)
    moe, report = CONVERTERS["moe"](dense, num_experts=4, num_experts_per_tok=k)
    assert moe.config.mlp == "moe" and moe.config.mlp_kwargs["num_experts"] == 4
    assert moe.config.mlp_kwargs["num_experts_per_tok"] == k
    x = torch.randint(0, 256, (2, 40))
    torch.testing.assert_close(moe(x).logits, dense(x).logits, atol=1e-5, rtol=1e-5)
    assert report["max_abs_logit_diff"] < 1e-4
    assert report["total_params_after"] > report["total_params_before"]
    extra_per_layer = (k - 1) * moe.blocks[0].mlp.experts.params_per_expert() + 64 * 4  # experts beyond 1, router
    assert report["active_params_after"] - report["active_params_before"] == 2 * extra_per_layer


def test_upcycling_rejects_what_it_cannot_reproduce():
    dense = load("lm-dense-tiny", n_layers=1)
    with pytest.raises(ValueError, match="top_p"):
        CONVERTERS["moe"](dense, moe_router="top_p")
    with pytest.raises(ValueError, match="unknown moe conversion option"):
        CONVERTERS["moe"](dense, nblocks=4)
    with pytest.raises(ValueError, match="dense SwiGLU"):
        CONVERTERS["moe"](load("moe-tiny", n_layers=1))


def test_zoo_convert_command_upcycles_a_checkpoint(tmp_path, capsys):
    from train.convert import main

    torch.manual_seed(0)
    dense = load("lm-dense-tiny", n_layers=1, d_model=64, max_seq_len=64)
    dense.save_pretrained(tmp_path / "dense")
    assert main([str(tmp_path / "dense"), "--to", "moe", "--experts", "4", "--eval-batches", "1",
                 "--seq-len", "32", "--out", str(tmp_path / "moe")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["val_loss_after"] == pytest.approx(result["val_loss_before"], abs=1e-4)
    converted = load(str(tmp_path / "moe"))
    assert converted.config.mlp == "moe" and converted.config.mlp_kwargs["num_experts"] == 4
