"""Mixture-of-Experts conversions.

- `moe_from_transformers(block)`: a transformers sparse-MoE block (Mixtral, Qwen2-MoE / Qwen-MoE,
  OLMoE, and others built the same way: a softmax top-k router `gate` and fused `experts`) as our
  `layers.moe.MoEMLP`, with the same weights and routing, so that both give the same outputs.
- `upcycle_to_moe` (`zoo convert CKPT --to moe --experts 8`): sparse upcycling of a dense zoo LM.
  Every expert starts as a copy of the dense MLP and the top-k weights are renormalised to sum to 1,
  so the MoE computes exactly the dense function at conversion time whatever the (fresh) router
  picks; fine-tuning then lets the experts diverge.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from layers.moe import MoEMLP
from models.lm import MOE_ALIASES, ZooLM, ZooLMConfig, move_moe_aliases
from zoo.convert import register_converter


# ---- transformers -> MoEMLP -------------------------------------------------------------------
def _check_block(block: nn.Module) -> None:
    """Raise a ValueError naming what makes `block` unlike a softmax top-k, fused-SwiGLU MoE block."""
    name = type(block).__name__
    gate, experts = getattr(block, "gate", None), getattr(block, "experts", None)
    if gate is None or experts is None or not hasattr(gate, "weight") or not hasattr(gate, "top_k"):
        raise ValueError(f"{name} is not a transformers sparse-MoE block with a top-k router `gate` and `experts`")
    if not hasattr(experts, "gate_up_proj") or not hasattr(experts, "down_proj"):
        raise ValueError(f"{name}.experts has no fused gate_up_proj / down_proj expert weights")
    if hasattr(gate, "e_score_correction_bias") or hasattr(gate, "n_group"):
        raise ValueError(f"{name}: grouped / biased sigmoid routers (DeepSeek-V3 style) are not converted yet")
    if getattr(experts, "has_bias", False) or getattr(experts, "is_transposed", False):
        raise ValueError(f"{name}.experts: biased or transposed expert weights are not supported")
    if not getattr(experts, "is_concatenated", True):
        raise ValueError(f"{name}.experts: interleaved gate/up weights are not supported")
    act = getattr(getattr(experts, "config", None), "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{name}: expert activation {act!r} is not SwiGLU's silu")


def moe_from_transformers(block: nn.Module) -> MoEMLP:
    """Our MoEMLP with the weights and routing of a transformers sparse-MoE block (Mixtral, Qwen2-MoE, OLMoE).

    Outputs match in eval mode. In training, Mixtral's jitter also scales the experts' input; ours scales
    only the router's input (Switch Transformer), so jittered training steps differ. This converts one
    block; a layer spliced into a model does not change that model's config (a save would not record it).
    To bring a whole transformers model in, `zoo.load(folder_or_repo)` imports it (zoo/interop).
    """
    _check_block(block)
    gate, experts = block.gate, block.experts
    num_experts, d_model = gate.weight.shape
    width = experts.down_proj.shape[-1]
    config = getattr(experts, "config", None)
    shared = getattr(block, "shared_expert", None)
    shared_width = shared.down_proj.in_features if shared is not None else 0
    layer = MoEMLP(
        d_model, width, num_experts=num_experts, num_experts_per_tok=gate.top_k,
        norm_topk_prob=getattr(gate, "norm_topk_prob", True),  # Mixtral's router always renormalises
        router_jitter_noise=getattr(block, "jitter_noise", 0.0),
        shared_expert_intermediate_size=shared_width,
        shared_expert_gate=getattr(block, "shared_expert_gate", None) is not None,
        router_aux_loss_coef=getattr(config, "router_aux_loss_coef", 0.01),
        router_z_loss_coef=getattr(config, "router_z_loss_coef", 0.0),
    ).to(device=gate.weight.device, dtype=gate.weight.dtype)
    with torch.no_grad():
        layer.router.proj.weight.copy_(gate.weight)
        gate_up = experts.gate_up_proj  # (E, 2 * width, d): [gate; up]
        layer.experts.w_gate.copy_(gate_up[:, :width])
        layer.experts.w_up.copy_(gate_up[:, width:])
        layer.experts.w_down.copy_(experts.down_proj.transpose(1, 2))  # (E, d, width) -> (E, width, d)
        if shared is not None:
            layer.shared.gate.weight.copy_(shared.gate_proj.weight)
            layer.shared.up.weight.copy_(shared.up_proj.weight)
            layer.shared.down.weight.copy_(shared.down_proj.weight)
            if layer.shared_gate is not None:
                layer.shared_gate.weight.copy_(block.shared_expert_gate.weight)
    return layer.train(block.training)


# ---- dense zoo LM -> MoE zoo LM (sparse upcycling) ---------------------------------------------
# MoE options the upcycling accepts (MoEOptions' names; the old top-level aliases work too).
UPCYCLE_OPTIONS = ("router_aux_loss_coef", "router_z_loss_coef", "router_jitter_noise", "capacity_factor",
                   "router", "router_kwargs")


def _config_fields(config: ZooLMConfig) -> dict:
    """The fields ZooLMConfig declares, with this config's values."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(ZooLMConfig)
            if f.name in ZooLMConfig.__annotations__}


@register_converter("moe")
def upcycle_to_moe(model: ZooLM, num_experts: int = 8, num_experts_per_tok: int = 2, seed: int = 0,
                   **fields) -> tuple[ZooLM, dict]:
    """Dense zoo LM -> MoE zoo LM whose `num_experts` experts are copies of each layer's MLP (same logits)."""
    c = model.config
    if c.mlp != "swiglu":
        raise ValueError(f"upcycling needs a dense SwiGLU LM; this model has mlp={c.mlp!r}")
    if c.linear != "dense" and c.linear_targets in ("mlp", "all"):
        raise ValueError(f"upcycling copies dense MLP weights into experts; this model's MLP uses linear={c.linear!r}")
    named = {k: v for k, v in fields.items() if k not in MOE_ALIASES}
    aliases = {k: v for k, v in fields.items() if k in MOE_ALIASES}
    options = move_moe_aliases({"mlp": "moe", "mlp_kwargs": named, **aliases})["mlp_kwargs"]
    unknown = sorted(set(options) - set(UPCYCLE_OPTIONS))
    if unknown:
        raise ValueError(f"unknown moe conversion option(s) {unknown}; known: num_experts, num_experts_per_tok, "
                         f"seed, {', '.join(UPCYCLE_OPTIONS)}")
    if options.get("router", "softmax_topk") == "top_p":
        raise ValueError("router='top_p' cannot reproduce the dense model (its k varies); use softmax_topk")
    mlp_kwargs = {**options, "num_experts": num_experts, "num_experts_per_tok": num_experts_per_tok}
    config = ZooLMConfig(**{**_config_fields(c), "mlp": "moe", "zoo_name": None, "mlp_kwargs": mlp_kwargs})
    device, dtype = model.embed.weight.device, model.embed.weight.dtype
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the fresh routers
        moe = ZooLM(config)
    state = model.state_dict()
    with torch.no_grad():
        for name, tensor in moe.state_dict().items():
            if name in state and state[name].shape == tensor.shape:
                tensor.copy_(state[name])
        for dense_block, moe_block in zip(model.blocks, moe.blocks, strict=True):
            dense, experts = dense_block.mlp, moe_block.mlp.experts
            experts.w_gate.copy_(dense.gate.weight.expand_as(experts.w_gate))  # (width, d) in every expert
            experts.w_up.copy_(dense.up.weight.expand_as(experts.w_up))
            experts.w_down.copy_(dense.down.weight.t().expand_as(experts.w_down))  # (d, width) -> (width, d)
    moe.tie_weights()
    moe = moe.to(device=device, dtype=dtype).train(model.training)
    before, after = model.cost(), moe.cost()
    report = {"num_experts": num_experts, "num_experts_per_tok": num_experts_per_tok,
              "total_params_before": before["total_params"], "total_params_after": after["total_params"],
              "active_params_before": before["active_params"], "active_params_after": after["active_params"],
              "max_abs_logit_diff": _max_logit_diff(model, moe)}
    return moe, report


@torch.no_grad()
def _max_logit_diff(a: nn.Module, b: nn.Module, seq_len: int = 32) -> float:
    """Largest |logit| difference between two LMs on a fixed random batch (a conversion sanity check)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, a.config.vocab_size, (2, min(seq_len, a.config.max_seq_len)), generator=generator)
    ids = ids.to(a.embed.weight.device)
    modes = a.training, b.training
    a.eval(), b.eval()
    diff = (a(ids).logits.float() - b(ids).logits.float()).abs().max().item()
    a.train(modes[0]), b.train(modes[1])
    return diff
