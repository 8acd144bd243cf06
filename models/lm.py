"""ONE decoder-only language model for every LM in the zoo.

The attention kind, the MLP kind and the linear kind are config fields, looked up by name in the
registries of `layers` (`layers.attention.KINDS`, `layers.mlp.KINDS`, `layers.linear.KINDS`).
The model is a `transformers.PreTrainedModel`, so `save_pretrained`, `from_pretrained` and
`generate` (with a KV cache) work as for any Hugging Face causal LM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig
from transformers import initialization as init
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from layers import attention, linear, mlp
from layers.attention import SelfAttention
from layers.norm import RMSNorm
from layers.rotary import RotaryEmbedding
from models.base import ZooPreTrainedModel

LINEAR_TARGETS = ("mlp", "attn", "all")


def _check(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"config field {name!r} = {value!r} is invalid: {allowed}")


@strict
class ZooLMConfig(PreTrainedConfig):
    """Config of the zoo's decoder LM: sizes plus the names of its attention, MLP and linear kinds."""

    model_type = "zoo_lm"
    # Fields that checkpoints written before they existed lack, with the value that reproduces those checkpoints.
    FIELDS_ADDED_LATER = {"routed_scaling_factor": 1.0}
    # transformers' generic names for our fields (used by its caches, pipelines and tools).
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "intermediate_size": "d_ff",
        "max_position_embeddings": "max_seq_len",
    }

    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: as many as n_heads (plain multi-head attention)
    d_ff: int | None = None  # None: ~8/3 d_model rounded up to a multiple of 64 (SwiGLU convention)
    max_seq_len: int = 512
    attention: str = "dense"
    attention_kwargs: dict = field(default_factory=dict)
    mlp: str = "swiglu"
    mlp_kwargs: dict = field(default_factory=dict)
    linear: str = "dense"
    linear_kwargs: dict = field(default_factory=dict)
    linear_targets: str = "all"  # which projections use the linear kind: "mlp", "attn" or "all"
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_word_embeddings: bool = True
    zoo_name: str | None = None  # the catalog entry this config came from, if any
    # ---- Mixture of Experts: read only when mlp == "moe" (transformers' names where it has one) ----
    num_local_experts: int = 8  # routed experts per MoE layer
    num_experts_per_tok: int = 2  # k of top-k routing; for moe_router="top_p", the most experts a token may use
    num_experts_per_tok_by_layer: list[int] | None = None  # per-layer k, overriding num_experts_per_tok
    moe_router: str = "softmax_topk"  # "softmax_topk" (Mixtral), "sigmoid_topk" (DeepSeek-V3), "top_p"
    moe_top_p: float = 0.5  # top_p router: the smallest expert set whose probability mass reaches this
    moe_min_experts_per_tok: int = 1  # top_p router: at least this many experts per token
    norm_topk_prob: bool = True  # renormalise the chosen experts' weights to sum to 1
    routed_scaling_factor: float = 1.0  # the routed experts' weighted sum is multiplied by this (DeepSeek-V2/V3)
    moe_granularity: int = 1  # fine-grained experts: expert width = d_ff / moe_granularity
    n_shared_experts: int = 0  # always-on experts of the expert width (DeepSeek-MoE)
    moe_capacity_factor: float | None = None  # None: dropless; else each expert takes <= factor * tokens * k / E
    router_jitter_noise: float = 0.0  # training: router input scaled by U(1 - noise, 1 + noise)
    router_aux_loss_coef: float = 0.01  # weight of the switch load-balancing loss, per MoE layer
    router_z_loss_coef: float = 0.001  # weight of the router z-loss, per MoE layer
    moe_entropy_loss_coef: float = 0.0  # weight of the router-entropy loss (keeps top-p routing sparse)
    moe_bias_update_rate: float = 0.001  # sigmoid_topk router: step of the balance bias per training step

    def __post_init__(self, **kwargs):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_ff is None:
            self.d_ff = 64 * -(-8 * self.d_model // (3 * 64))
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Checks every field; the error names the field, the value and what is allowed."""
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool), name, value, "must be an integer")
            _check(value >= 1, name, value, "must be >= 1")
        for name in ("rope_theta", "norm_eps", "init_std"):
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and not isinstance(value, bool), name, value, "must be a number")
        for name in ("attention", "mlp", "linear"):
            _check(isinstance(getattr(self, name), str), name, getattr(self, name), "must be a kind name (a string)")
        for name in ("attention_kwargs", "mlp_kwargs", "linear_kwargs"):
            value = getattr(self, name)
            _check(isinstance(value, dict), name, value, "must be a dict of keyword arguments")
        _check(isinstance(self.tie_word_embeddings, bool), "tie_word_embeddings", self.tie_word_embeddings,
               "must be true or false")
        _check(self.zoo_name is None or isinstance(self.zoo_name, str), "zoo_name", self.zoo_name,
               "must be a catalog name (a string) or None")
        _check(self.d_model % self.n_heads == 0, "d_model", self.d_model,
               f"must be divisible by n_heads={self.n_heads}")
        _check((self.d_model // self.n_heads) % 2 == 0, "n_heads", self.n_heads,
               f"head_dim = d_model / n_heads = {self.d_model / self.n_heads:g} must be even (rotary embeddings)")
        _check(self.n_heads % self.n_kv_heads == 0, "n_kv_heads", self.n_kv_heads,
               f"must divide n_heads={self.n_heads}")
        _check(self.linear_targets in LINEAR_TARGETS, "linear_targets", self.linear_targets,
               f"one of {LINEAR_TARGETS}")
        for name, registry in (("attention", attention.KINDS), ("mlp", mlp.KINDS), ("linear", linear.KINDS)):
            _check(getattr(self, name) in registry, name, getattr(self, name), f"known kinds: {sorted(registry)}")
        for name in ("rope_theta", "norm_eps", "init_std"):
            _check(getattr(self, name) > 0, name, getattr(self, name), "must be > 0")
        if self.mlp == "moe":
            self._validate_moe()

    def _validate_moe(self):
        """Checks the Mixture-of-Experts fields (only when mlp == "moe")."""
        from layers.moe import ROUTERS

        for name in ("num_local_experts", "num_experts_per_tok", "moe_min_experts_per_tok", "moe_granularity",
                     "n_shared_experts"):
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool), name, value, "must be an integer")
        e, k = self.num_local_experts, self.num_experts_per_tok
        _check(e >= 1, "num_local_experts", e, "must be >= 1")
        _check(1 <= k <= e, "num_experts_per_tok", k, f"must be in [1, num_local_experts={e}]")
        _check(self.moe_router in ROUTERS, "moe_router", self.moe_router, f"known routers: {sorted(ROUTERS)}")
        if self.num_experts_per_tok_by_layer is not None:
            by_layer = self.num_experts_per_tok_by_layer
            _check(len(by_layer) == self.n_layers, "num_experts_per_tok_by_layer", by_layer,
                   f"must list one k per layer (n_layers={self.n_layers})")
            for value in by_layer:
                _check(isinstance(value, int) and 1 <= value <= e, "num_experts_per_tok_by_layer", by_layer,
                       f"every k must be an integer in [1, num_local_experts={e}]")
        top_p = self.moe_top_p
        _check(isinstance(top_p, (int, float)) and 0 < top_p <= 1, "moe_top_p", top_p, "must be in (0, 1]")
        min_k = self.moe_min_experts_per_tok
        _check(1 <= min_k <= min([k, *(self.num_experts_per_tok_by_layer or [])]), "moe_min_experts_per_tok",
               min_k, "must be in [1, num_experts_per_tok] (top_p routing uses between these many experts)")
        g = self.moe_granularity
        _check(g >= 1 and self.d_ff % g == 0, "moe_granularity", g,
               f"must be >= 1 and divide d_ff={self.d_ff} (expert width = d_ff / moe_granularity)")
        _check(isinstance(self.norm_topk_prob, bool), "norm_topk_prob", self.norm_topk_prob, "must be true or false")
        _check(self.n_shared_experts >= 0, "n_shared_experts", self.n_shared_experts, "must be >= 0")
        cf = self.moe_capacity_factor
        _check(cf is None or (isinstance(cf, (int, float)) and cf > 0), "moe_capacity_factor", cf,
               "must be None (dropless) or > 0")
        _check(0 <= self.router_jitter_noise < 1, "router_jitter_noise", self.router_jitter_noise, "must be in [0, 1)")
        for name in ("router_aux_loss_coef", "router_z_loss_coef", "moe_entropy_loss_coef", "moe_bias_update_rate"):
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and value >= 0, name, value, "must be a number >= 0")
        rsf = self.routed_scaling_factor
        _check(isinstance(rsf, (int, float)) and not isinstance(rsf, bool) and rsf > 0, "routed_scaling_factor", rsf,
               "must be a number > 0")

    def moe_layer_kwargs(self, layer_idx: int) -> dict:
        """The MoE fields as keyword arguments of layers.moe.MoEMLP for layer `layer_idx`."""
        k = self.num_experts_per_tok
        if self.num_experts_per_tok_by_layer is not None:
            k = self.num_experts_per_tok_by_layer[layer_idx]
        return dict(num_experts=self.num_local_experts, num_experts_per_tok=k, router=self.moe_router,
                    top_p=self.moe_top_p, min_experts_per_tok=self.moe_min_experts_per_tok,
                    renormalize=self.norm_topk_prob, granularity=self.moe_granularity,
                    n_shared_experts=self.n_shared_experts, capacity_factor=self.moe_capacity_factor,
                    jitter=self.router_jitter_noise, balance_loss_weight=self.router_aux_loss_coef,
                    z_loss_weight=self.router_z_loss_coef, entropy_loss_weight=self.moe_entropy_loss_coef,
                    bias_update_rate=self.moe_bias_update_rate, routed_scaling_factor=self.routed_scaling_factor)


class DecoderBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ZooLMConfig, layer_idx: int):
        super().__init__()
        c = config
        # The linear kind replaces nn.Linear in the projections that linear_targets names.
        attn_linear = (c.linear, c.linear_kwargs) if c.linear_targets in ("attn", "all") else ("dense", {})
        mlp_linear = (c.linear, c.linear_kwargs) if c.linear_targets in ("mlp", "all") else ("dense", {})
        self.attn_norm = RMSNorm(c.d_model, c.norm_eps)
        self.attn = SelfAttention(c.d_model, c.n_heads, c.n_kv_heads, c.attention, c.attention_kwargs,
                                  *attn_linear, layer_idx=layer_idx)
        self.mlp_norm = RMSNorm(c.d_model, c.norm_eps)
        mlp_kwargs = {**c.moe_layer_kwargs(layer_idx), **c.mlp_kwargs} if c.mlp == "moe" else c.mlp_kwargs
        self.mlp = mlp.KINDS[c.mlp](c.d_model, c.d_ff, linear=mlp_linear[0], linear_kwargs=mlp_linear[1],
                                    **mlp_kwargs)

    def forward(self, x, cos, sin, cache=None, key_padding_mask=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache=cache, key_padding_mask=key_padding_mask)
        return x + self.mlp(self.mlp_norm(x))


@dataclass
class ZooLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus the auxiliary losses that layers report (MoE balance, z-loss...)."""

    aux_losses: dict[str, torch.Tensor] | None = None


class ZooLM(ZooPreTrainedModel, GenerationMixin):
    """Decoder-only LM: embedding, n_layers DecoderBlocks, final RMSNorm, LM head (optionally tied)."""

    config_class = ZooLMConfig
    base_model_prefix = "zoo_lm"
    _no_split_modules = ["DecoderBlock"]
    _tied_weights_keys = {"lm_head.weight": "embed.weight"}
    _supports_sdpa = True

    def __init__(self, config: ZooLMConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(DecoderBlock(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config.d_model // config.n_heads, config.rope_theta)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, RotaryEmbedding):
            hd = module.inv_freq.numel() * 2
            theta = self.config.rope_theta
            init.copy_(module.inv_freq, 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        elif hasattr(module, "init_weights_"):  # layers with their own structure (Monarch, experts...)
            module.init_weights_(std)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> ZooLMOutput:
        """HF causal-LM forward. `labels` are the input ids themselves (shifted inside), -100 ignored."""
        cache = kwargs.pop("past_key_values", cache)  # the pre-5.x name of `cache`
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (batch, seq, d_model)
        b, s, _ = x.shape
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        if past + s > self.config.max_seq_len:
            raise ValueError(f"sequence length {past + s} exceeds the model's max_seq_len={self.config.max_seq_len}")
        if position_ids is None:
            position_ids = (torch.arange(s, device=x.device) + past).expand(b, s)
        cos, sin = self.rotary(position_ids, x.dtype)
        # A 2-D padding mask over (past + current) keys; all-ones means no padding.
        key_padding_mask = None
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            key_padding_mask = attention_mask.bool()
        for block in self.blocks:
            x = block(x, cos, sin, cache=cache, key_padding_mask=key_padding_mask)
        x = self.norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return ZooLMOutput(loss=loss, logits=logits, cache=cache if use_cache else None,
                           aux_losses=self.aux_losses())

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """Auxiliary losses the layers reported in the last forward (summed over layers, by name)."""
        total: dict[str, torch.Tensor] = {}
        for module in self.modules():
            for name, value in getattr(module, "last_aux_losses", {}).items():
                total[name] = total[name] + value if name in total else value
        return total

    def cost(self, seq_len: int | None = None) -> dict[str, float]:
        """total_params, active_params (per token) and forward flops_per_token at seq_len."""
        seq_len = seq_len or self.config.max_seq_len
        total = sum(p.numel() for p in self.parameters())
        # Parameters that a token does not touch (unused experts) are reported by their layer.
        inactive = sum(getattr(m, "inactive_params_per_token", lambda: 0)() for m in self.modules())
        flops = sum(blk.attn.flops_per_token(seq_len) + blk.mlp.flops_per_token() for blk in self.blocks)
        flops += 2 * self.config.d_model * self.config.vocab_size  # LM head; the embedding is a lookup
        return {"total_params": total, "active_params": total - inactive, "flops_per_token": flops,
                "seq_len": seq_len}


# `import models.lm` (and so `import zoo`) makes AutoConfig / AutoModelForCausalLM know our folders.
AutoConfig.register(ZooLMConfig.model_type, ZooLMConfig, exist_ok=True)
AutoModelForCausalLM.register(ZooLMConfig, ZooLM, exist_ok=True)
