"""ONE decoder-only language model for every LM in the zoo.

The attention kind, the MLP kind and the linear kind are config fields, looked up by name in the
registries of `layers` (`layers.attention.KINDS`, `layers.mlp.KINDS`, `layers.linear.KINDS`);
each kind's options are the matching `*_kwargs` dict, validated by the kind itself. Mixture of
Experts is the MLP kind "moe" with `layers.moe.MoEOptions` as its `mlp_kwargs`.
The model is a `transformers.PreTrainedModel`, so `save_pretrained`, `from_pretrained` and
`generate` (with a KV cache) work as for any Hugging Face causal LM.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig
from transformers import initialization as init
from transformers.cache_utils import DynamicCache
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import can_return_tuple

from layers import attention, linear, mlp, norm
from layers.attention import SelfAttention
from layers.attention.decoding import install_states
from layers.attention.mla import LatentSelfAttention
from layers.attention.random_projection import RandomProjection
from layers.attention.self_attention import BIASES, QK_NORMS
from layers.moe import MoEMLP, moe_layers, set_num_experts_per_tok, set_top_p
from layers.norm import LayerNorm, RMSNorm, UnitOffsetRMSNorm, make_norm
from layers.registry import check_kwargs
from layers.rotary import RotaryEmbedding, default_frequencies
from models.base import ZooPreTrainedModel
from models.versioning import VersionedConfig, fill_missing

LINEAR_TARGETS = ("mlp", "attn", "all")
POSITIONS = ("rope", "learned")  # rotary embeddings of q and k, or a learned table added to the input (GPT-2)
# The scaled RoPE variants (transformers' rope_type and its parameters, in rope_kwargs) whose frequencies are
# fixed at build time; "dynamic" / "longrope" change them with the sequence length and are not supported.
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _check(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"config field {name!r} = {value!r} is invalid: {allowed}")


# The MoE options' names at the top level of a config: where each lives in mlp_kwargs. These are the
# fields of configs before version 1 (read by the upgrade) and aliases that `ZooLMConfig(...)` and
# `zoo.load(name, num_experts_per_tok=4)` accept for an MoE model.
MOE_ALIASES: dict[str, tuple[str, ...]] = {
    "num_local_experts": ("num_experts",),
    "num_experts_per_tok": ("num_experts_per_tok",),
    "num_experts_per_tok_by_layer": ("num_experts_per_tok_by_layer",),
    "moe_router": ("router",),
    "moe_top_p": ("router_kwargs", "top_p"),
    "moe_min_experts_per_tok": ("router_kwargs", "min_experts_per_tok"),
    "moe_bias_update_rate": ("router_kwargs", "bias_update_rate"),
    "norm_topk_prob": ("norm_topk_prob",),
    "routed_scaling_factor": ("routed_scaling_factor",),
    "moe_granularity": ("granularity",),
    "n_shared_experts": ("n_shared_experts",),
    "moe_capacity_factor": ("capacity_factor",),
    "router_jitter_noise": ("router_jitter_noise",),
    "router_aux_loss_coef": ("router_aux_loss_coef",),
    "router_z_loss_coef": ("router_z_loss_coef",),
    "moe_entropy_loss_coef": ("router_entropy_loss_coef",),
}
# Version 0 passed mlp_kwargs to the old MoEMLP keywords: their names today.
_V0_MOE_KEYWORDS = {"expert_width": ("moe_intermediate_size",), "shared_width": ("shared_expert_intermediate_size",),
                    "renormalize": ("norm_topk_prob",), "jitter": ("router_jitter_noise",),
                    "balance_loss_weight": ("router_aux_loss_coef",), "z_loss_weight": ("router_z_loss_coef",),
                    "entropy_loss_weight": ("router_entropy_loss_coef",), "top_p": ("router_kwargs", "top_p"),
                    "min_experts_per_tok": ("router_kwargs", "min_experts_per_tok"),
                    "bias_update_rate": ("router_kwargs", "bias_update_rate"), "router": ("router",)}
# The router options each router of version 0 read (the others were ignored).
_V0_ROUTER_OPTIONS = {"top_p": {"top_p", "min_experts_per_tok"}, "sigmoid_topk": {"bias_update_rate"}}


def _put(options: dict, path: tuple[str, ...], value) -> None:
    """options[path[0]][path[1]]... = value, copying the nested dicts it writes into."""
    for key in path[:-1]:
        options[key] = dict(options.get(key) or {})
        options = options[key]
    options[path[-1]] = value


def move_moe_aliases(fields: dict) -> dict:
    """`fields` with the MoE aliases it holds moved into mlp_kwargs (an error if mlp is not "moe")."""
    found = {name: fields[name] for name in MOE_ALIASES if name in fields}
    if not found:
        return fields
    mlp_kind = fields.get("mlp", "swiglu")
    if mlp_kind != "moe":
        raise ValueError(f"config field(s) {sorted(found)} are options of mlp='moe'; this config has "
                         f"mlp={mlp_kind!r}")
    rest = {k: v for k, v in fields.items() if k not in found}
    options = copy.deepcopy(rest.get("mlp_kwargs") or {})
    if "moe_router" in found and found["moe_router"] != options.get("router", "softmax_topk"):
        options["router_kwargs"] = {}  # another router: the old one's options (e.g. n_group) do not apply
    for name, value in found.items():
        _put(options, MOE_ALIASES[name], value)
    return {**rest, "mlp_kwargs": options}


def _upgrade_v0(raw: dict) -> dict:
    """Version 0 -> 1: the 16 top-level MoE fields move into mlp_kwargs under MoEOptions' names."""
    old = {name: raw.pop(name) for name in list(MOE_ALIASES) if name in raw}
    raw.setdefault("use_cache", True)  # transformers' default, which version 0 did not store
    if raw.get("mlp") != "moe":
        return raw
    old.setdefault("routed_scaling_factor", 1.0)  # added after the first release, 1.0 before
    router = raw.get("mlp_kwargs", {}).get("router", old.get("moe_router", "softmax_topk"))
    options: dict = {}
    for name, value in old.items():
        path = MOE_ALIASES[name]
        if path[0] == "router_kwargs" and path[1] not in _V0_ROUTER_OPTIONS.get(router, ()):
            continue
        _put(options, path, value)
    for name, value in (raw.get("mlp_kwargs") or {}).items():
        path = _V0_MOE_KEYWORDS.get(name, (name,))
        if path[0] == "router_kwargs" and path[1] not in _V0_ROUTER_OPTIONS.get(router, ()):
            continue
        _put(options, path, value)
    return {**raw, "mlp_kwargs": options}


# Version 1 -> 2: the fields that let the LM hold imported architectures; their defaults are what version 1 did.
_V2_FIELDS = {"head_dim": None, "attention_bias": "none", "qk_norm": "none", "norm": "rms", "position": "rope",
              "rope_kwargs": {}, "embedding_scale": 1.0, "dense_mlp_layers": [], "mla": {}}
# The options of multi-head latent attention (layers/attention/mla.py), `mla`'s keys; q_lora_rank may be null.
MLA_OPTIONS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


@strict
class ZooLMConfig(VersionedConfig, PreTrainedConfig):
    """Config of the zoo's decoder LM: sizes plus the names and options of its attention, MLP and linear kinds."""

    model_type = "zoo_lm"
    UPGRADES = (_upgrade_v0, fill_missing(_V2_FIELDS))
    ALIASES = MOE_ALIASES  # accepted as keywords (and load() overrides), stored in mlp_kwargs
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
    mlp_kwargs: dict = field(default_factory=dict)  # for mlp="moe": layers.moe.MoEOptions fields
    linear: str = "dense"
    linear_kwargs: dict = field(default_factory=dict)
    linear_targets: str = "all"  # which projections use the linear kind: "mlp", "attn" or "all"
    rope_theta: float = 10000.0
    # The building blocks of other architectures (version 2; defaults = the zoo's own LM):
    head_dim: int | None = None  # None: d_model / n_heads
    attention_bias: str = "none"  # projections with a bias: "none", "qkv" (Qwen2), "all" (GPT-2)
    qk_norm: str = "none"  # RMSNorm of q and k: "none", "head" (per head, Qwen3), "full" (whole projection, OLMoE)
    norm: str = "rms"  # a name in layers.norm.KINDS: "rms", "rms_unit_offset" (Gemma's 1 + w), "layer" (GPT-2)
    position: str = "rope"  # "rope" or "learned" (a table of max_seq_len positions added to the input, GPT-2)
    rope_kwargs: dict = field(default_factory=dict)  # scaled RoPE: transformers' rope_type and its parameters
    embedding_scale: float = 1.0  # the input embedding is multiplied by this (Gemma: sqrt(d_model))
    dense_mlp_layers: list = field(default_factory=list)  # with mlp="moe": blocks with a dense SwiGLU of d_ff
    mla: dict = field(default_factory=dict)  # non-empty: multi-head latent attention projections (MLA_OPTIONS)
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_word_embeddings: bool = True
    zoo_name: str | None = None  # the catalog entry this config came from, if any
    use_cache: bool = True  # forward returns a KV cache unless told otherwise (transformers' field)
    config_version: int = 2  # the layout of this config (models/versioning.py); older dicts are upgraded

    def __post_init__(self, **kwargs):
        # The MoE aliases (num_experts_per_tok=...) arrive here as unknown keywords: into mlp_kwargs.
        aliases = {name: kwargs.pop(name) for name in MOE_ALIASES if name in kwargs}
        if aliases:
            fields = {"mlp": self.mlp, "mlp_kwargs": self.mlp_kwargs, **aliases}
            self.mlp_kwargs = move_moe_aliases(fields)["mlp_kwargs"]
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
        for name in ("rope_theta", "norm_eps", "init_std", "embedding_scale"):
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and not isinstance(value, bool), name, value, "must be a number")
        for name in ("attention", "mlp", "linear", "norm"):
            _check(isinstance(getattr(self, name), str), name, getattr(self, name), "must be a kind name (a string)")
        for name in ("attention_kwargs", "mlp_kwargs", "linear_kwargs", "rope_kwargs", "mla"):
            value = getattr(self, name)
            _check(isinstance(value, dict), name, value, "must be a dict of keyword arguments")
        _check(isinstance(self.tie_word_embeddings, bool), "tie_word_embeddings", self.tie_word_embeddings,
               "must be true or false")
        _check(self.zoo_name is None or isinstance(self.zoo_name, str), "zoo_name", self.zoo_name,
               "must be a catalog name (a string) or None")
        if self.head_dim is None:
            _check(self.d_model % self.n_heads == 0, "d_model", self.d_model,
                   f"must be divisible by n_heads={self.n_heads} (or set head_dim)")
        else:
            _check(isinstance(self.head_dim, int) and not isinstance(self.head_dim, bool) and self.head_dim >= 1,
                   "head_dim", self.head_dim, "must be null (d_model / n_heads) or an integer >= 1")
        _check(self.position in POSITIONS, "position", self.position, f"one of {POSITIONS}")
        if self.mla:
            _check(set(self.mla) == set(MLA_OPTIONS) and all(
                (v is None and k == "q_lora_rank") or (isinstance(v, int) and not isinstance(v, bool) and v >= 1)
                for k, v in self.mla.items()), "mla", self.mla,
                f"must be empty or give {list(MLA_OPTIONS)} (positive integers; q_lora_rank may be null)")
            _check(self.n_kv_heads == self.n_heads, "n_kv_heads", self.n_kv_heads,
                   "must equal n_heads with latent attention (mla)")
            _check(self.attention_bias in ("none", "all"), "attention_bias", self.attention_bias,
                   "must be 'none' or 'all' with latent attention (mla)")
            _check(self.qk_norm == "none", "qk_norm", self.qk_norm, "must be 'none' with latent attention (mla)")
        if self.position == "rope":
            _check(self.rotary_dim() % 2 == 0, "head_dim", self.rotary_dim(), "must be even (rotary embeddings)")
            rope_type = self.rope_kwargs.get("rope_type", "default")
            _check(rope_type in ROPE_TYPES, "rope_kwargs.rope_type", rope_type, f"one of {ROPE_TYPES}")
        _check(self.attention_bias in BIASES, "attention_bias", self.attention_bias, f"one of {BIASES}")
        _check(self.qk_norm in QK_NORMS, "qk_norm", self.qk_norm, f"one of {QK_NORMS}")
        _check(isinstance(self.dense_mlp_layers, list) and all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.n_layers for i in self.dense_mlp_layers),
            "dense_mlp_layers", self.dense_mlp_layers, f"must be a list of block indices in [0, {self.n_layers})")
        _check(not self.dense_mlp_layers or self.mlp != "swiglu", "dense_mlp_layers", self.dense_mlp_layers,
               "names blocks that use a dense SwiGLU instead of the mlp kind; with mlp='swiglu' every block does")
        _check(self.n_heads % self.n_kv_heads == 0, "n_kv_heads", self.n_kv_heads,
               f"must divide n_heads={self.n_heads}")
        _check(self.linear_targets in LINEAR_TARGETS, "linear_targets", self.linear_targets,
               f"one of {LINEAR_TARGETS}")
        for name, registry in (("attention", attention.KINDS), ("mlp", mlp.KINDS), ("linear", linear.KINDS),
                               ("norm", norm.KINDS)):
            registry.check(getattr(self, name), name)
        for name in ("rope_theta", "norm_eps", "init_std", "embedding_scale"):
            _check(getattr(self, name) > 0, name, getattr(self, name), "must be > 0")
        self._validate_kind_options()

    def attention_head_dim(self) -> int:
        """The width of one attention head (head_dim, or d_model / n_heads)."""
        return self.head_dim or self.d_model // self.n_heads

    def rotary_dim(self) -> int:
        """The width rotary embeddings rotate: a head's, or its qk_rope_head_dim part with latent attention."""
        return self.mla["qk_rope_head_dim"] if self.mla else self.attention_head_dim()

    def mlp_linear(self) -> tuple[str, dict]:
        """The linear kind (and its kwargs) of the MLP projections."""
        return (self.linear, self.linear_kwargs) if self.linear_targets in ("mlp", "all") else ("dense", {})

    def attn_linear(self) -> tuple[str, dict]:
        """The linear kind (and its kwargs) of the attention projections."""
        return (self.linear, self.linear_kwargs) if self.linear_targets in ("attn", "all") else ("dense", {})

    def _validate_kind_options(self) -> None:
        """Each kind checks its own options (and their combination with the model) at config time."""
        mlp_kind = mlp.KINDS[self.mlp]
        if hasattr(mlp_kind, "check_config"):
            mlp_kind.check_config(self.mlp_kwargs, d_ff=self.d_ff, n_layers=self.n_layers,
                                  mlp_linear=self.mlp_linear()[0])
        else:
            check_kwargs(mlp_kind, self.mlp_kwargs, "mlp_kwargs",
                         reserved=("d_model", "d_ff", "linear", "linear_kwargs", "layer_idx"))
        check_kwargs(attention.KINDS[self.attention], self.attention_kwargs, "attention_kwargs",
                     reserved=("head_dim",))


class DecoderBlock(GradientCheckpointingLayer):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ZooLMConfig, layer_idx: int):
        super().__init__()
        c = config
        # The linear kind replaces nn.Linear in the projections that linear_targets names.
        self.attn_norm = make_norm(c.norm, c.d_model, c.norm_eps)
        if c.mla:  # DeepSeek's multi-head latent attention
            self.attn = LatentSelfAttention(c.d_model, c.n_heads, c.attention, c.attention_kwargs, *c.attn_linear(),
                                            layer_idx=layer_idx, bias=c.attention_bias, **c.mla)
        else:
            self.attn = SelfAttention(c.d_model, c.n_heads, c.n_kv_heads, c.attention, c.attention_kwargs,
                                      *c.attn_linear(), layer_idx=layer_idx, head_dim=c.attention_head_dim(),
                                      bias=c.attention_bias, qk_norm=c.qk_norm, norm_eps=c.norm_eps)
        self.mlp_norm = make_norm(c.norm, c.d_model, c.norm_eps)
        mlp_linear, mlp_linear_kwargs = c.mlp_linear()
        if layer_idx in c.dense_mlp_layers:  # DeepSeek's first dense layers, Qwen2-MoE's mlp_only_layers
            self.mlp = mlp.SwiGLU(c.d_model, c.d_ff, linear=mlp_linear, linear_kwargs=mlp_linear_kwargs)
        else:
            self.mlp = mlp.KINDS[c.mlp](c.d_model, c.d_ff, linear=mlp_linear, linear_kwargs=mlp_linear_kwargs,
                                        layer_idx=layer_idx, **c.mlp_kwargs)

    def forward(self, x, cos, sin, cache=None, key_padding_mask=None, reports: list | None = None,
                kv_length: int | None = None, implementation: str = "sdpa") -> torch.Tensor:
        """x (batch, seq, d_model) -> the block's output (a plain tensor, so hooks see the residual stream).

        What its layers report goes into `reports` (a list the model passes): the MLP's LayerReport if it makes
        one, and ("attention_weights", tensor) when asked for with reports=[..., "attention_weights"].
        """
        want_weights = reports is not None and "attention_weights" in reports
        attn = self.attn(self.attn_norm(x), cos, sin, cache=cache, key_padding_mask=key_padding_mask,
                         kv_length=kv_length, implementation=implementation, return_weights=want_weights)
        if want_weights:
            attn, weights = attn
            reports.append(("attention_weights", weights))
        x = x + attn
        out = self.mlp(self.mlp_norm(x))
        if isinstance(out, tuple):  # MLP kinds with losses / metrics / step statistics return both
            out, report = out
            if reports is not None:
                reports.append(report)
        return x + out


@dataclass
class ZooLMModelOutput(BaseModelOutputWithPast):
    """BaseModelOutputWithPast plus what the layers report: weighted auxiliary losses (MoE balance, z-loss...),
    metrics to log (averaged over layers), step statistics for the trainer's step hook (models/base.py) and,
    on request, each MoE layer's router logits."""

    aux_losses: dict[str, torch.Tensor] | None = None
    metrics: dict[str, torch.Tensor] | None = None
    step_stats: dict[str, torch.Tensor] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


@dataclass
class ZooLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus the backbone's reports (see ZooLMModelOutput). With labels, `loss` is the
    next-token loss plus the weighted auxiliary losses (what fine-tuning should minimise)."""

    aux_losses: dict[str, torch.Tensor] | None = None
    metrics: dict[str, torch.Tensor] | None = None
    step_stats: dict[str, torch.Tensor] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


class ZooLMPreTrainedModel(ZooPreTrainedModel):
    """What the backbone and the causal LM share: config class, initialisation, transformers capabilities."""

    config_class = ZooLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderBlock"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, UnitOffsetRMSNorm):  # scale 1 + w: w = 0 is the identity
            init.zeros_(module.weight)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, RotaryEmbedding):
            init.copy_(module.inv_freq, rope_frequencies(self.config)[0])
        elif hasattr(module, "init_weights_"):  # layers with their own structure (Monarch, experts...)
            module.init_weights_(std)


class ZooLMModel(ZooLMPreTrainedModel):
    """The backbone: embedding, n_layers DecoderBlocks, final norm (`AutoModel` gives this)."""

    def __init__(self, config: ZooLMConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        # Learned positions (GPT-2) are a table added to the input; rotary ones rotate q and k in attention.
        self.pos_embed = nn.Embedding(config.max_seq_len, config.d_model) if config.position == "learned" else None
        self.blocks = nn.ModuleList(DecoderBlock(config, i) for i in range(config.n_layers))
        self.norm = make_norm(config.norm, config.d_model, config.norm_eps)
        if config.position == "rope":
            inv_freq, scaling = rope_frequencies(config)
            self.rotary = RotaryEmbedding(config.rotary_dim(), config.rope_theta, inv_freq, scaling)
        else:
            self.rotary = None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        output_router_logits: bool | None = None,
        past_key_values=None,
        **kwargs,
    ) -> ZooLMModelOutput:
        """Hidden states of input_ids (or inputs_embeds); a transformers Cache continues a sequence."""
        cache = _one_cache(cache, past_key_values)
        c = self.config
        use_cache = c.use_cache if use_cache is None else use_cache
        output_hidden_states = c.output_hidden_states if output_hidden_states is None else output_hidden_states
        output_attentions = c.output_attentions if output_attentions is None else output_attentions
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (batch, seq, d_model)
        if c.embedding_scale != 1.0:  # Gemma: the scale in the activations' dtype, as transformers applies it
            x = x * torch.tensor(c.embedding_scale, dtype=x.dtype)
        b, s, _ = x.shape
        if use_cache and cache is None:
            cache = DynamicCache(config=c)
        past = int(cache.get_seq_length()) if cache is not None else 0  # a static cache's is a live tensor
        if cache is not None and past == 0:  # a fresh cache: each attention kind's own decoding state, if it has one
            install_states(cache, [block.attn for block in self.blocks])
        if past + s > c.max_seq_len:
            raise ValueError(f"sequence length {past + s} exceeds the model's max_seq_len={c.max_seq_len}")
        if position_ids is None:
            position_ids = (torch.arange(s, device=x.device) + past).expand(b, s)
        if self.pos_embed is not None:
            x = x + self.pos_embed(position_ids)
            cos = sin = None
        else:
            cos, sin = self.rotary(position_ids, x.dtype)
        key_padding_mask = _key_padding_mask(attention_mask, s, past + s)
        implementation = c._attn_implementation or "sdpa"
        aux: dict[str, torch.Tensor] = {}
        metrics: dict[str, list[torch.Tensor]] = {}
        stats: dict[str, torch.Tensor] = {}
        hidden_states, attentions, router_logits = [], [], []
        for i, block in enumerate(self.blocks):
            if output_hidden_states:
                hidden_states.append(x)
            reports: list = ["attention_weights"] if output_attentions else []
            x = block(x, cos, sin, cache, key_padding_mask, reports, past + s, implementation)
            for report in reports[1:] if output_attentions else reports:
                if isinstance(report, tuple):  # ("attention_weights", (batch, heads, q, k))
                    attentions.append(report[1])
                    continue
                for name, value in report.aux_losses.items():
                    aux[name] = aux[name] + value if name in aux else value
                for name, value in report.metrics.items():
                    metrics.setdefault(name, []).append(value)
                stats.update({f"blocks.{i}.mlp.{name}": value for name, value in report.stats.items()})
                if output_router_logits and "router_logits" in report.outputs:
                    router_logits.append(report.outputs["router_logits"])
        x = self.norm(x)
        if output_hidden_states:
            hidden_states.append(x)
        # Empty reports are None, so that return_dict=False gives the tuple a transformers model gives.
        return ZooLMModelOutput(
            last_hidden_state=x, cache=cache if use_cache else None,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None, aux_losses=aux or None,
            metrics={name: torch.stack(v).float().mean() for name, v in metrics.items()} or None,
            step_stats=stats or None, router_logits=tuple(router_logits) if output_router_logits else None)

    @torch.no_grad()
    def after_optimizer_step(self, stats: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        """The per-step updates: each layer with `on_optimizer_step` gets the statistics under its module path."""
        for path, module in self.named_modules():
            hook = getattr(module, "on_optimizer_step", None)
            if hook is not None:
                prefix = f"{path}."
                hook({k[len(prefix):]: v for k, v in stats.items() if k.startswith(prefix)}, step)
        return {}

    def cost(self, seq_len: int | None = None, sample: torch.Tensor | None = None) -> dict[str, float]:
        """As ZooLMForCausalLM.cost, without the LM head."""
        return _cost(self, seq_len, sample, head_flops=0)


def rope_frequencies(config: ZooLMConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention_scaling) of the config's RoPE: plain, or a scaled variant (rope_kwargs) computed by
    transformers' own function for that rope_type, so that imported checkpoints rotate as they were trained."""
    head_dim = config.rotary_dim()
    rope_type = config.rope_kwargs.get("rope_type", "default")
    if rope_type == "default":
        return default_frequencies(head_dim, config.rope_theta), 1.0
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {**config.rope_kwargs, "rope_theta": config.rope_theta}
    hf = LlamaConfig(hidden_size=config.d_model, num_attention_heads=config.n_heads, head_dim=head_dim,
                     max_position_embeddings=config.max_seq_len, rope_parameters=params)
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf, None)
    return inv_freq.float(), float(scaling)


def drawn_buffers(model: nn.Module) -> set[str]:
    """The state-dict names of random-projection buffers (lsh / performer / scatterbrain): drawn when a model
    is built, held by no checkpoint of another attention kind."""
    return {f"{path}.{name}" for path, m in model.named_modules() if isinstance(m, RandomProjection)
            for name, _ in m.named_buffers(recurse=False)}


def _one_cache(cache, past_key_values):
    """The cache, passed as `cache` (transformers 5) or `past_key_values` (its older name), never both."""
    if past_key_values is not None and cache is not None and past_key_values is not cache:
        raise ValueError("pass the KV cache as `cache` or as `past_key_values` (its older name), not both")
    return cache if cache is not None else past_key_values


def _key_padding_mask(attention_mask: torch.Tensor | None, q_len: int, kv_length: int) -> torch.Tensor | None:
    """A (batch, past + current) bool mask of the keys to attend to, or None when nothing is padded.

    A 2-D mask is the usual (batch, keys) padding mask (1 = attend). A 4-D (batch, 1, queries, keys) mask
    (what generate builds for a static cache) is honoured when it is a causal mask with key padding, which
    every attention kind implements; any other 4-D mask is refused rather than ignored.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 4:
        attention_mask = _padding_of_causal_mask(attention_mask, q_len, kv_length)
    elif attention_mask.dim() != 2:
        raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)} is not supported: pass a 2-D "
                         f"(batch, keys) padding mask (1 = attend, 0 = padding)")
    if attention_mask.shape[1] != kv_length:
        raise ValueError(f"attention_mask covers {attention_mask.shape[1]} positions but the cache and the input "
                         f"hold {kv_length}: it must cover the past and the current tokens")
    return None if bool(attention_mask.all()) else attention_mask.bool()


def _padding_of_causal_mask(mask: torch.Tensor, q_len: int, kv_length: int) -> torch.Tensor:
    """The (batch, kv_length) key padding of a 4-D causal mask; a ValueError if the mask is anything else."""
    allowed = mask.bool() if not mask.is_floating_point() else mask == 0  # additive masks: 0 = attend
    if allowed.shape[1] != 1 or allowed.shape[2] != q_len or allowed.shape[3] < kv_length:
        raise ValueError(f"a 4-D attention_mask must be (batch, 1, {q_len}, >= {kv_length}); got {tuple(mask.shape)}")
    allowed = allowed[:, 0, :, :kv_length]  # (batch, queries, keys); a static cache's unwritten keys dropped
    keys = allowed[:, -1]  # the last query sees every real key
    rows = torch.arange(q_len, device=mask.device)[:, None] + (kv_length - q_len)
    causal = rows >= torch.arange(kv_length, device=mask.device)[None, :]
    real_query = keys[:, kv_length - q_len:, None]  # padding queries' rows are never read
    if not bool(((allowed == (causal & keys[:, None, :])) | ~real_query).all()):
        raise ValueError("this 4-D attention_mask is not a causal mask with key padding: the zoo's attention kinds "
                         "take only that (other 4-D masks are refused rather than ignored)")
    return keys


class ZooLMForCausalLM(ZooLMPreTrainedModel, GenerationMixin):
    """Decoder-only LM: the ZooLMModel backbone (`.model`) and an LM head (optionally tied to the embedding)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed.weight"}

    def __init__(self, config: ZooLMConfig):
        super().__init__(config)
        self.model = ZooLMModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    # The backbone's parts by their short names (code and hook points written before the split use them).
    embed = property(lambda self: self.model.embed, doc="The token embedding (the backbone's).")
    blocks = property(lambda self: self.model.blocks, doc="The decoder blocks (the backbone's).")
    norm = property(lambda self: self.model.norm, doc="The final norm (the backbone's).")
    rotary = property(lambda self: self.model.rotary, doc="The rotary embedding (the backbone's).")

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @can_return_tuple
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
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        output_router_logits: bool | None = None,
        past_key_values=None,
        **kwargs,
    ) -> ZooLMOutput:
        """HF causal-LM forward. `labels` are the input ids themselves (shifted inside, -100 ignored; or pass
        `shift_labels`); `num_items_in_batch` normalises the loss over gradient-accumulation steps."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=_one_cache(cache, past_key_values), inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                         output_router_logits=output_router_logits, return_dict=True)
        x = out.last_hidden_state
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)
        loss = None
        if labels is not None:
            loss_kwargs = {k: kwargs[k] for k in ("shift_labels", "num_items_in_batch", "ignore_index") if k in kwargs}
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs)
            if out.aux_losses:  # balance / z losses, weighted: fine-tuning keeps the router balanced
                loss = loss + sum(out.aux_losses.values())
        return ZooLMOutput(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states,
                           attentions=out.attentions, aux_losses=out.aux_losses, metrics=out.metrics,
                           step_stats=out.step_stats, router_logits=out.router_logits)

    def after_optimizer_step(self, stats: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        """The backbone's per-step updates (statistics are keyed by block path, as the backbone reports them)."""
        return self.model.after_optimizer_step(stats, step)

    @staticmethod
    def module_key(stored_key: str) -> str:
        """The state-dict name of a tensor stored under `stored_key` (checkpoints keep the pre-split names)."""
        return module_key(stored_key)

    # ---- sparsity knobs ----------------------------------------------------------------------
    def set_num_experts_per_tok(self, k: int, layers: list[int] | None = None) -> None:
        """Route with k experts per token from now on (the largest k for top-p), in every MoE layer or `layers`.

        The config's mlp_kwargs (num_experts_per_tok, or num_experts_per_tok_by_layer when layers differ)
        follow, so that cost() and a later save_pretrained record the new k.
        """
        moe = {i: block.mlp for i, block in enumerate(self.blocks) if isinstance(block.mlp, MoEMLP)}
        if not moe:
            raise ValueError("the model has no MoE layer (mlp='moe')")
        chosen = sorted(moe) if layers is None else list(layers)
        for i in chosen:
            if i not in moe:
                raise ValueError(f"block {i} is not an MoE layer: the MoE layers are blocks {sorted(moe)}")
        set_num_experts_per_tok([moe[i] for i in chosen], k)
        options = dict(self.config.mlp_kwargs)
        ks = {m.router.num_experts_per_tok for m in moe.values()}
        if len(ks) == 1:
            options["num_experts_per_tok"] = ks.pop()
            options.pop("num_experts_per_tok_by_layer", None)
        else:  # one k per block (a dense block's entry is unused)
            default = options.get("num_experts_per_tok", 2)
            options["num_experts_per_tok_by_layer"] = [
                moe[i].router.num_experts_per_tok if i in moe else default for i in range(len(self.blocks))]
        self.config.mlp_kwargs = options

    def set_top_p(self, top_p: float) -> None:
        """Use probability mass `top_p` in every top-p router (and the config's router_kwargs.top_p)."""
        set_top_p(moe_layers(self), top_p)
        options = copy.deepcopy(self.config.mlp_kwargs)
        _put(options, ("router_kwargs", "top_p"), top_p)
        self.config.mlp_kwargs = options

    # ---- cost --------------------------------------------------------------------------------
    def cost(self, seq_len: int | None = None, sample: torch.Tensor | None = None) -> dict[str, float]:
        """total_params, active_params (per token) and forward flops_per_token at seq_len.

        A function of the weights' structure and settings only. Top-p routing's k varies per token: by default
        its largest k counts (worst case); pass `sample` (token ids) to count the mean k measured on them.
        """
        return _cost(self, seq_len, sample, head_flops=2 * self.config.d_model * self.config.vocab_size)


@torch.no_grad()
def _cost(model, seq_len: int | None, sample: torch.Tensor | None, head_flops: int) -> dict[str, float]:
    """The cost of a backbone or causal LM (see ZooLMForCausalLM.cost)."""
    seq_len = seq_len or model.config.max_seq_len
    mean_k: list[float | None] = [None] * len(model.blocks)
    if sample is not None:
        was_training = model.training
        model.eval()
        stats = model(input_ids=sample.to(model.embed.weight.device), use_cache=False).step_stats or {}
        model.train(was_training)
        per_expert = [stats.get(f"blocks.{i}.mlp.tokens_per_expert") for i in range(len(model.blocks))]
        mean_k = [None if n is None else float(n.sum()) / sample.numel() for n in per_expert]
    total = sum(p.numel() for p in model.parameters())
    flops = head_flops  # the LM head; the embedding is a lookup
    inactive = 0  # parameters that a token does not touch (unused experts), as their layer reports
    for block, k in zip(model.blocks, mean_k, strict=True):
        extra = {} if k is None else {"mean_experts_per_tok": k}
        flops += block.attn.flops_per_token(seq_len) + block.mlp.flops_per_token(**extra)
        inactive += getattr(block.mlp, "inactive_params_per_token", lambda **_: 0)(**extra)
    return {"total_params": total, "active_params": total - inactive, "flops_per_token": flops,
            "seq_len": seq_len}


# ZooLM: the name of the causal LM before the backbone / head split.
ZooLM = ZooLMForCausalLM

# Checkpoints keep the names they had before the split ("embed.weight", "blocks.0...", "norm.weight"):
# transformers renames them on load (and back on save); zoo.load does the same with `module_key`.
LEGACY_PREFIXES = ("embed.", "blocks.", "norm.", "rotary.", "pos_embed.")


def module_key(checkpoint_key: str) -> str:
    """The causal LM's state-dict name of a tensor stored under `checkpoint_key`."""
    return f"model.{checkpoint_key}" if checkpoint_key.startswith(LEGACY_PREFIXES) else checkpoint_key


def checkpoint_key(module_key: str) -> str:
    """The name under which the causal LM's tensor `module_key` is stored."""
    return module_key.removeprefix("model.")


register_checkpoint_conversion_mapping(ZooLMConfig.model_type, [
    WeightRenaming(source_patterns=rf"^{re.escape(prefix)}", target_patterns=f"model.{prefix}")
    for prefix in LEGACY_PREFIXES], overwrite=True)

# `import models.lm` (and so `import zoo`) makes AutoConfig / AutoModelForCausalLM know our folders.
AutoConfig.register(ZooLMConfig.model_type, ZooLMConfig, exist_ok=True)
AutoModelForCausalLM.register(ZooLMConfig, ZooLMForCausalLM, exist_ok=True)
AutoModel.register(ZooLMConfig, ZooLMModel, exist_ok=True)
