"""zoo LM -> transformers Llama (dense) / Mixtral (MoE), same weights, same function."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM, PreTrainedModel

from layers.moe import MoEOptions


def _refuse(field: str, value, why: str) -> None:
    raise ValueError(f"cannot express {field}={value!r} as a transformers architecture: {why}")


def _moe_options(config) -> MoEOptions:
    """The zoo MoE options, checked against what Mixtral can express."""
    o = MoEOptions.from_kwargs(config.mlp_kwargs)
    checks = {
        "router": (o.router == "softmax_topk", "Mixtral routes by softmax top-k"),
        "norm_topk_prob": (o.norm_topk_prob, "Mixtral renormalises the top-k weights"),
        "num_experts_per_tok_by_layer": (o.num_experts_per_tok_by_layer is None, "Mixtral has one k"),
        "n_shared_experts": (o.n_shared_experts == 0 and not o.shared_expert_intermediate_size,
                             "Mixtral has no shared experts"),
        "routed_scaling_factor": (o.routed_scaling_factor == 1.0, "Mixtral does not scale the routed sum"),
        "capacity_factor": (o.capacity_factor is None, "Mixtral is dropless"),
    }
    for field, (ok, why) in checks.items():
        if not ok:
            _refuse(f"mlp_kwargs.{field}", getattr(o, field), why)
    return o


def transformers_config(config):
    """The LlamaConfig / MixtralConfig of a zoo LM config (a ValueError for kinds transformers lacks)."""
    c = config
    if c.attention != "dense":
        _refuse("attention", c.attention, "transformers' Llama and Mixtral attend densely")
    if c.linear != "dense":
        _refuse("linear", c.linear, "transformers' projections are dense nn.Linear layers")
    common = dict(vocab_size=c.vocab_size, hidden_size=c.d_model, num_hidden_layers=c.n_layers,
                  num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.d_model // c.n_heads,
                  max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, hidden_act="silu",
                  tie_word_embeddings=c.tie_word_embeddings, initializer_range=c.init_std,
                  rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta}, attention_dropout=0.0,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if c.mlp == "swiglu":
        return LlamaConfig(**common, intermediate_size=c.d_ff, attention_bias=False, mlp_bias=False)
    if c.mlp == "moe":
        o = _moe_options(c)
        return MixtralConfig(**common, intermediate_size=o.expert_width(c.d_ff), num_local_experts=o.num_experts,
                             num_experts_per_tok=o.num_experts_per_tok, router_aux_loss_coef=o.router_aux_loss_coef,
                             router_jitter_noise=o.router_jitter_noise, sliding_window=None)
    _refuse("mlp", c.mlp, "only swiglu (Llama) and moe (Mixtral) map")


def transformers_state_dict(model) -> dict[str, torch.Tensor]:
    """The zoo LM's weights under the transformers model's names (copies)."""
    state = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight,
             "lm_head.weight": model.lm_head.weight}
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = block.attn_norm.weight
        state[p + "post_attention_layernorm.weight"] = block.mlp_norm.weight
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[p + f"self_attn.{name}.weight"] = getattr(block.attn, name).weight
        mlp = block.mlp
        if model.config.mlp == "swiglu":
            state[p + "mlp.gate_proj.weight"] = mlp.gate.weight
            state[p + "mlp.up_proj.weight"] = mlp.up.weight
            state[p + "mlp.down_proj.weight"] = mlp.down.weight
        else:  # (E, width, d) x 3 -> gate_up (E, 2 width, d), down (E, d, width)
            e = mlp.experts
            state[p + "mlp.gate.weight"] = mlp.router.proj.weight
            state[p + "mlp.experts.gate_up_proj"] = torch.cat([e.w_gate, e.w_up], dim=1)
            state[p + "mlp.experts.down_proj"] = e.w_down.transpose(1, 2)
    return {k: v.detach().clone() for k, v in state.items()}


@torch.no_grad()
def to_transformers(model, attn_implementation: str = "sdpa") -> PreTrainedModel:
    """A LlamaForCausalLM / MixtralForCausalLM with the zoo LM's weights (same logits), in eval mode."""
    config = transformers_config(model.config)
    config._attn_implementation = attn_implementation
    cls = MixtralForCausalLM if isinstance(config, MixtralConfig) else LlamaForCausalLM
    target = cls(config).to(dtype=model.embed.weight.dtype)
    state = transformers_state_dict(model)
    missing, unexpected = target.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"weight mapping to {cls.__name__} is incomplete: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        target.tie_weights()
    return target.to(model.embed.weight.device).eval()
