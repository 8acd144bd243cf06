"""Adding a kind is one class and one registry line: a toy attention kind and a toy router defined here
(no edit anywhere else) work from a config, through the trainer and checkpoints, and in `zoo info`.
(The SAE family's toy kind is in tests/models/test_sae_kinds.py.)"""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zoo
from layers.attention import KINDS
from layers.moe import ROUTERS, Router, Routing
from models.lm import ZooLM, ZooLMConfig
from train.config import parse_args
from train.trainer import Trainer
from zoo.cli import main as zoo_main

SMALL = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=32)


class SDPAToyAttention(nn.Module):
    """Exact causal attention through SDPA, with a `temperature` option: a kind whose oracle is `dense`."""

    def __init__(self, head_dim: int, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, q, k, v, causal=True, key_padding_mask=None):
        scale = q.shape[-1] ** -0.5 / self.temperature
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)

    def flops_per_token(self, seq_len, causal=True):
        return 4 * seq_len * 16


class FirstExpertsRouter(Router):
    """Every token goes to experts 0..k-1 with equal weights (its option `weight_scale` scales them)."""

    OPTIONS = {"weight_scale": (lambda v: isinstance(v, float) and v > 0, "must be a float > 0")}

    def __init__(self, d_model, num_experts, num_experts_per_tok, *, norm_topk_prob=True, jitter=0.0,
                 weight_scale=1.0):
        super().__init__(d_model, num_experts, num_experts_per_tok, norm_topk_prob=norm_topk_prob, jitter=jitter)
        self.weight_scale = weight_scale

    def forward(self, x):
        logits = self.logits(x)
        k = self.num_experts_per_tok
        experts = torch.arange(k, device=x.device).expand(x.shape[0], k)
        weights = torch.full((x.shape[0], k), self.weight_scale / k, device=x.device)
        return Routing(weights, experts, logits, logits.softmax(-1))


@pytest.fixture
def toy_kinds():
    KINDS.register("sdpa_toy", SDPAToyAttention)
    ROUTERS.register("first_experts", FirstExpertsRouter)
    yield
    dict.pop(KINDS, "sdpa_toy")
    dict.pop(ROUTERS, "first_experts")


def test_a_toy_attention_kind_is_usable_from_a_config_and_equals_its_oracle(toy_kinds):
    torch.manual_seed(0)
    dense = ZooLM(ZooLMConfig(**SMALL)).eval()
    toy = ZooLM(ZooLMConfig(**SMALL, attention="sdpa_toy", attention_kwargs={"temperature": 1.0})).eval()
    toy.load_state_dict(dense.state_dict())
    x = torch.randint(0, 64, (2, 12))
    torch.testing.assert_close(toy(x).logits, dense(x).logits, atol=1e-5, rtol=1e-5)
    hot = ZooLM(ZooLMConfig(**SMALL, attention="sdpa_toy", attention_kwargs={"temperature": 3.0})).eval()
    hot.load_state_dict(dense.state_dict())
    assert not torch.allclose(hot(x).logits, dense(x).logits)  # its option reaches it
    with pytest.raises(Exception, match="attention_kwargs.*unknown option.*'window'"):
        ZooLMConfig(**SMALL, attention="sdpa_toy", attention_kwargs={"window": 4})


def test_a_toy_router_is_usable_from_a_config_and_its_options_are_checked(toy_kinds):
    torch.manual_seed(0)
    config = ZooLMConfig(**SMALL, mlp="moe", d_ff=64, mlp_kwargs={
        "num_experts": 4, "num_experts_per_tok": 1, "router": "first_experts", "router_kwargs": {"weight_scale": 2.0}})
    moe = ZooLM(config).eval().blocks[0].mlp
    x = torch.randn(5, 32)
    e = moe.experts  # the oracle: expert 0 alone, times the router's weight 2.0
    expected = 2.0 * ((F.silu(x @ e.w_gate[0].T) * (x @ e.w_up[0].T)) @ e.w_down[0])
    torch.testing.assert_close(moe(x)[0], expected, atol=1e-6, rtol=1e-5)
    with pytest.raises(Exception, match="router_kwargs.weight_scale"):
        ZooLMConfig(**SMALL, mlp="moe", mlp_kwargs={"router": "first_experts", "router_kwargs": {"weight_scale": -1.0}})


def test_toy_kinds_train_save_load_and_show_in_zoo_info(toy_kinds, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = parse_args(["lm-dense-tiny", "--set", "d_model=32", "--set", "n_layers=1", "--set", "n_heads=2",
                      "--set", "attention=sdpa_toy", "--set", "mlp=moe", "--set", "d_ff=64",
                      "--set", 'mlp_kwargs={"num_experts": 4, "num_experts_per_tok": 2, "router": "first_experts"}',
                      "--seq-len", "32", "--batch-size", "4", "--steps", "3", "--eval-every", "3",
                      "--eval-batches", "1", "--warmup-steps", "1", "--out", str(run)])
    summary = Trainer(cfg).run()
    final = summary["final"]
    model = zoo.load(final)
    assert model.config.attention == "sdpa_toy" and model.config.mlp_kwargs["router"] == "first_experts"
    capsys.readouterr()  # the training log
    assert zoo_main(["info", final]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["attention"] == "sdpa_toy"
    assert info["cost"]["active_params"] < info["cost"]["total_params"]  # 2 of 4 experts


def test_an_unknown_kind_names_the_known_ones():
    with pytest.raises(Exception, match=r"unknown attention kind.*\['dense'"):
        ZooLMConfig(**SMALL, attention="nope")
    with pytest.raises(ValueError, match="unknown router 'nope'; known: "):
        ROUTERS["nope"]
