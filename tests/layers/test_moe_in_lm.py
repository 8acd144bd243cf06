"""The MoE kind inside the zoo LM: config checks, k at load time, cost, aux losses, save/load, decoding."""

import pytest
import torch

from layers.moe import MoEMLP, collect_metrics, set_num_experts_per_tok, set_top_p
from models.lm import ZooLM, ZooLMConfig
from zoo import load

SMALL = dict(d_model=32, n_layers=2, n_heads=2, max_seq_len=32, vocab_size=64)


def tiny_moe(**kw) -> ZooLM:
    torch.manual_seed(0)
    return ZooLM(ZooLMConfig(**{**SMALL, "mlp": "moe", "num_local_experts": 4, **kw})).eval()


@pytest.mark.parametrize("bad, field", [
    ({"num_experts_per_tok": 5}, "num_experts_per_tok"),
    ({"moe_top_p": 0.0}, "moe_top_p"),
    ({"moe_top_p": 1.2}, "moe_top_p"),
    ({"moe_granularity": 5}, "moe_granularity"),
    ({"moe_router": "nope"}, "moe_router"),
    ({"num_experts_per_tok_by_layer": [1]}, "num_experts_per_tok_by_layer"),
    ({"num_experts_per_tok_by_layer": [1, 9]}, "num_experts_per_tok_by_layer"),
    ({"moe_min_experts_per_tok": 3}, "moe_min_experts_per_tok"),
    ({"moe_capacity_factor": 0.0}, "moe_capacity_factor"),
    ({"router_aux_loss_coef": -1.0}, "router_aux_loss_coef"),
    ({"routed_scaling_factor": 0.0}, "routed_scaling_factor"),
    ({"routed_scaling_factor": "2"}, "routed_scaling_factor"),
])
def test_bad_moe_config_names_the_field_and_the_value(bad, field):
    with pytest.raises(Exception, match=field) as err:
        ZooLMConfig(**{**SMALL, "mlp": "moe", "num_local_experts": 4}, **bad)
    assert repr(next(iter(bad.values()))) in str(err.value)


def test_dense_configs_ignore_the_moe_fields():
    torch.manual_seed(0)
    plain = ZooLM(ZooLMConfig(**SMALL))
    torch.manual_seed(0)
    other = ZooLM(ZooLMConfig(**SMALL, num_experts_per_tok=99, moe_granularity=7))
    assert not any(isinstance(m, MoEMLP) for m in other.modules())
    x = torch.randint(0, 64, (1, 8))
    torch.testing.assert_close(plain(x).logits, other(x).logits)


def test_k_at_load_time_changes_active_flops_and_keeps_outputs_finite():
    x = torch.randint(0, 256, (1, 16))
    costs = {}
    for k in (1, 2, 8, 16):
        torch.manual_seed(0)
        model = load("moe-fine-tiny", n_layers=1, num_experts_per_tok=k)
        assert model.config.num_experts_per_tok == k and model.blocks[0].mlp.router.num_experts_per_tok == k
        assert torch.isfinite(model(x).logits).all()
        costs[k] = model.cost(64)
    expert = model.blocks[0].mlp.experts
    per_expert_flops = expert.flops_per_token() + 2 * expert.d_model
    for k in (2, 8, 16):
        assert costs[k]["flops_per_token"] - costs[1]["flops_per_token"] == pytest.approx((k - 1) * per_expert_flops)
        assert costs[k]["active_params"] - costs[1]["active_params"] == (k - 1) * expert.params_per_expert()
        assert costs[k]["total_params"] == costs[1]["total_params"]


def test_set_num_experts_per_tok_on_a_built_model_updates_layers_config_and_cost():
    model = tiny_moe(num_experts_per_tok=2)
    x = torch.randint(0, 64, (1, 10))
    before, cost2 = model(x).logits, model.cost()
    set_num_experts_per_tok(model, 1)
    assert model.config.num_experts_per_tok == 1
    assert model.cost()["flops_per_token"] < cost2["flops_per_token"]
    assert not torch.allclose(model(x).logits, before)
    set_num_experts_per_tok(model, 4, layers=[1])
    assert [b.mlp.router.num_experts_per_tok for b in model.blocks] == [1, 4]
    assert model.config.num_experts_per_tok_by_layer == [1, 4]
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        set_num_experts_per_tok(model, 5)


def test_top_p_model_reports_the_mean_active_experts_of_its_last_forward():
    model = tiny_moe(moe_router="top_p", num_experts_per_tok=4, moe_top_p=0.5)
    worst = model.cost()
    model(torch.randint(0, 64, (2, 16)))
    means = [b.mlp.mean_experts_per_tok() for b in model.blocks]
    assert all(1 <= m <= 4 for m in means)
    expert = model.blocks[0].mlp.experts
    saved = sum(4 - m for m in means) * (expert.flops_per_token() + 2 * expert.d_model)
    assert model.cost()["flops_per_token"] == pytest.approx(worst["flops_per_token"] - saved, abs=2)
    set_top_p(model, 1.0)
    assert model.config.moe_top_p == 1.0
    model(torch.randint(0, 64, (2, 16)))
    assert all(b.mlp.mean_experts_per_tok() == 4 for b in model.blocks)  # all mass needs every allowed expert


def test_aux_losses_are_summed_over_layers_and_train_the_router():
    model = tiny_moe().train()
    out = model(torch.randint(0, 64, (2, 12)), labels=torch.randint(0, 64, (2, 12)))
    per_layer = [b.mlp.last_aux_losses["moe_balance_loss"] for b in model.blocks]
    torch.testing.assert_close(out.aux_losses["moe_balance_loss"], sum(per_layer))
    (out.loss + sum(out.aux_losses.values())).backward()
    assert all(b.mlp.router.proj.weight.grad.abs().sum() > 0 for b in model.blocks)


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_topk", "top_p"])
def test_state_dict_round_trips_through_save_and_load(tmp_path, router):
    model = tiny_moe(moe_router=router, n_shared_experts=1, moe_granularity=2)
    model.train()
    model(torch.randint(0, 64, (2, 16)))  # a training forward moves the sigmoid router's balance bias
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = load(str(tmp_path))
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    if router == "sigmoid_topk":
        assert got["blocks.0.mlp.router.bias"].abs().sum() > 0
    x = torch.randint(0, 64, (1, 12))
    torch.testing.assert_close(loaded(x).logits, model(x).logits)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(hf(x).logits, model(x).logits)
    fewer = load(str(tmp_path), num_experts_per_tok=1)
    assert fewer.cost()["flops_per_token"] < loaded.cost()["flops_per_token"]


def test_kv_cache_decoding_equals_full_forward():
    model = tiny_moe(n_shared_experts=1)
    x = torch.randint(0, 64, (2, 12))
    full = model(x).logits
    out = model(x[:, :5], use_cache=True)
    steps = [out.logits]
    for t in range(5, 12):
        out = model(x[:, t: t + 1], cache=out.cache, use_cache=True)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_collect_metrics_averages_the_load_statistics_over_layers():
    model = tiny_moe(num_experts_per_tok=2)
    model(torch.randint(0, 64, (2, 16)))
    metrics = collect_metrics(model)
    assert metrics["moe_active_experts"] == pytest.approx(2.0) and metrics["moe_dropped_fraction"] == 0.0
    per_layer = [float(b.mlp.last_metrics["moe_load_entropy"]) for b in model.blocks]
    assert metrics["moe_load_entropy"] == pytest.approx(sum(per_layer) / 2)
