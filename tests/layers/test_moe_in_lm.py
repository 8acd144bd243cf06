"""The MoE kind inside the zoo LM: config checks, k at load time, cost, aux losses, save/load, decoding."""

import pytest
import torch

from models.lm import ZooLM, ZooLMConfig
from zoo import load

SMALL = dict(d_model=32, n_layers=2, n_heads=2, max_seq_len=32, vocab_size=64)


def tiny_moe(**kw) -> ZooLM:
    torch.manual_seed(0)
    return ZooLM(ZooLMConfig(**{**SMALL, "mlp": "moe", "num_local_experts": 4, **kw})).eval()


@pytest.mark.parametrize("bad, field", [
    ({"num_experts_per_tok": 5}, "mlp_kwargs.num_experts_per_tok"),
    ({"moe_router": "top_p", "moe_top_p": 0.0}, "router_kwargs.top_p"),
    ({"moe_router": "top_p", "moe_top_p": 1.2}, "router_kwargs.top_p"),
    ({"moe_granularity": 5}, "mlp_kwargs.granularity"),
    ({"moe_router": "nope"}, "mlp_kwargs.router"),
    ({"num_experts_per_tok_by_layer": [1]}, "mlp_kwargs.num_experts_per_tok_by_layer"),
    ({"num_experts_per_tok_by_layer": [1, 9]}, "mlp_kwargs.num_experts_per_tok_by_layer"),
    ({"moe_router": "top_p", "moe_min_experts_per_tok": 3}, "router_kwargs.min_experts_per_tok"),
    ({"moe_capacity_factor": 0.0}, "mlp_kwargs.capacity_factor"),
    ({"router_aux_loss_coef": -1.0}, "mlp_kwargs.router_aux_loss_coef"),
    ({"routed_scaling_factor": 0.0}, "mlp_kwargs.routed_scaling_factor"),
    ({"routed_scaling_factor": "2"}, "mlp_kwargs.routed_scaling_factor"),
    ({"mlp_kwargs": {"num_expert": 4}}, "unknown MoE option"),
    ({"mlp_kwargs": {"router_kwargs": {"top_p": 0.5}}}, "router_kwargs"),  # softmax_topk has no top_p
])
def test_bad_moe_config_names_the_field_and_the_value(bad, field):
    with pytest.raises(Exception, match=field) as err:  # transformers wraps it in its validation error
        ZooLMConfig(**{**SMALL, "mlp": "moe", "num_local_experts": 4}, **bad)
    assert repr(list(bad.values())[-1]) in str(err.value) or "unknown" in str(err.value)


def test_moe_options_on_a_dense_config_are_refused():
    with pytest.raises(ValueError, match="options of mlp='moe'.*mlp='swiglu'"):
        ZooLMConfig(**SMALL, num_experts_per_tok=2)
    with pytest.raises(Exception, match="mlp_kwargs.*unknown option"):
        ZooLMConfig(**SMALL, mlp_kwargs={"num_experts": 4})
    with pytest.raises(ValueError, match="not a field|options of mlp='moe'"):
        load("lm-dense-tiny", num_experts_per_tok=2)


@pytest.mark.parametrize("targets", ["mlp", "all"])
def test_structured_linear_on_moe_experts_is_refused_at_config_time(targets):
    with pytest.raises(Exception, match="'linear'.*routed experts.*dense"):
        ZooLMConfig(**SMALL, mlp="moe", linear="monarch", linear_kwargs={"nblocks": 2}, linear_targets=targets)
    ZooLMConfig(**SMALL, mlp="moe", linear="monarch", linear_kwargs={"nblocks": 2}, linear_targets="attn")


def test_moe_fields_live_in_mlp_kwargs_as_attention_options_live_in_attention_kwargs():
    config = ZooLMConfig(**SMALL, mlp="moe", num_local_experts=4, moe_router="top_p", moe_top_p=0.3)
    assert config.mlp_kwargs == {"num_experts": 4, "router": "top_p", "router_kwargs": {"top_p": 0.3}}
    assert not hasattr(config, "num_local_experts") and not hasattr(config, "moe_top_p")


def test_k_at_load_time_changes_active_flops_and_keeps_outputs_finite():
    x = torch.randint(0, 256, (1, 16))
    costs = {}
    for k in (1, 2, 8, 16):
        torch.manual_seed(0)
        model = load("moe-fine-tiny", n_layers=1, num_experts_per_tok=k)
        assert model.config.mlp_kwargs["num_experts_per_tok"] == k
        assert model.blocks[0].mlp.router.num_experts_per_tok == k
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
    model.set_num_experts_per_tok(1)
    assert model.config.mlp_kwargs["num_experts_per_tok"] == 1
    assert model.cost()["flops_per_token"] < cost2["flops_per_token"]
    assert not torch.allclose(model(x).logits, before)
    model.set_num_experts_per_tok(4, layers=[1])
    assert [b.mlp.router.num_experts_per_tok for b in model.blocks] == [1, 4]
    assert model.config.mlp_kwargs["num_experts_per_tok_by_layer"] == [1, 4]
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        model.set_num_experts_per_tok(5)
    with pytest.raises(ValueError, match="block 7 is not an MoE layer"):
        model.set_num_experts_per_tok(1, layers=[7])


def test_top_p_cost_counts_the_worst_case_or_the_mean_k_measured_on_a_sample():
    model = tiny_moe(moe_router="top_p", num_experts_per_tok=4, moe_top_p=0.5)
    worst = model.cost()
    sample = torch.randint(0, 64, (2, 16))
    model(torch.randint(0, 64, (2, 16)))
    assert model.cost() == worst  # a forward does not change the cost
    # The oracle: count each token's experts from the routers themselves.
    means = []
    hidden = model.embed(sample)
    cos, sin = model.rotary(torch.arange(16).expand(2, 16), hidden.dtype)
    with torch.no_grad():
        for block in model.blocks:
            h = hidden + block.attn(block.attn_norm(hidden), cos, sin)
            routing = block.mlp.router(block.mlp_norm(h).reshape(-1, h.shape[-1]))
            means.append(float((routing.experts >= 0).sum(1).float().mean()))
            hidden = block(hidden, cos, sin)
    assert all(1 <= m <= 4 for m in means)
    expert = model.blocks[0].mlp.experts
    saved = sum(4 - m for m in means) * (expert.flops_per_token() + 2 * expert.d_model)
    assert model.cost(sample=sample)["flops_per_token"] == pytest.approx(worst["flops_per_token"] - saved, abs=2)
    model.set_top_p(1.0)
    assert model.config.mlp_kwargs["router_kwargs"]["top_p"] == 1.0
    assert model.cost(sample=sample) == worst  # all mass needs every allowed expert


def test_aux_losses_are_summed_over_layers_and_train_the_router():
    model = tiny_moe().train()
    x = torch.randint(0, 64, (2, 12))
    out = model(x, labels=torch.randint(0, 64, (2, 12)))
    hidden = model.embed(x)
    cos, sin = model.rotary(torch.arange(12).expand(2, 12), hidden.dtype)
    per_layer = []
    for block in model.blocks:
        reports = []
        hidden = block(hidden, cos, sin, reports=reports)
        per_layer.append(reports[0].aux_losses["moe_balance_loss"])
    torch.testing.assert_close(out.aux_losses["moe_balance_loss"], sum(per_layer))
    (out.loss + sum(out.aux_losses.values())).backward()
    assert all(b.mlp.router.proj.weight.grad.abs().sum() > 0 for b in model.blocks)


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_topk", "top_p"])
def test_state_dict_round_trips_through_save_and_load(tmp_path, router):
    model = tiny_moe(moe_router=router, n_shared_experts=1, moe_granularity=2)
    model.train()
    out = model(torch.randint(0, 64, (2, 16)))
    model.after_optimizer_step(out.step_stats, 1)  # the step hook moves the sigmoid router's balance bias
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = load(str(tmp_path))
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    if router == "sigmoid_topk":
        assert got["model.blocks.0.mlp.router.bias"].abs().sum() > 0
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


def test_load_metrics_are_averaged_over_layers_in_the_output():
    model = tiny_moe(num_experts_per_tok=2)
    x = torch.randint(0, 64, (2, 16))
    out = model(x)
    assert float(out.metrics["moe_active_experts"]) == pytest.approx(2.0)
    assert float(out.metrics["moe_dropped_fraction"]) == 0.0
    counts = [out.step_stats[f"blocks.{i}.mlp.tokens_per_expert"] for i in range(2)]
    assert all(int(c.sum()) == 2 * 16 * 2 for c in counts)  # every token's two experts
    loads = [c.float() / c.sum() for c in counts]
    entropy = [float(-(p[p > 0] * p[p > 0].log()).sum() / torch.log(torch.tensor(4.0))) for p in loads]
    assert float(out.metrics["moe_load_entropy"]) == pytest.approx(sum(entropy) / 2, rel=1e-4)


def test_sigmoid_router_bias_moves_only_in_the_step_hook_and_towards_balance():
    model = tiny_moe(moe_router="sigmoid_topk", moe_bias_update_rate=0.01).train()
    x = torch.randint(0, 64, (2, 16))
    for _ in range(3):  # forwards alone never move it (pure forward)
        out = model(x)
    assert all(float(b.mlp.router.bias.abs().sum()) == 0 for b in model.blocks)
    model.after_optimizer_step(out.step_stats, 1)
    for i, block in enumerate(model.blocks):
        load = out.step_stats[f"blocks.{i}.mlp.tokens_per_expert"].float()
        expected = 0.01 * torch.sign(load.mean() - load)
        torch.testing.assert_close(block.mlp.router.bias, expected)
