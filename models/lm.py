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
from dataclasses import dataclass, field

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig
from transformers import initialization as init
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from layers import attention, linear, mlp
from layers.attention import SelfAttention
from layers.moe import moe_layers, set_num_experts_per_tok, set_top_p
from layers.norm import RMSNorm
from layers.registry import check_kwargs
from layers.report import LayerReport
from layers.rotary import RotaryEmbedding
from models.base import ZooPreTrainedModel
from models.losses import next_token_loss
from models.versioning import VersionedConfig

LINEAR_TARGETS = ("mlp", "attn", "all")


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
    for name, value in found.items():
        _put(options, MOE_ALIASES[name], value)
    return {**rest, "mlp_kwargs": options}


def _upgrade_v0(raw: dict) -> dict:
    """Version 0 -> 1: the 16 top-level MoE fields move into mlp_kwargs under MoEOptions' names."""
    old = {name: raw.pop(name) for name in list(MOE_ALIASES) if name in raw}
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


@strict
class ZooLMConfig(VersionedConfig, PreTrainedConfig):
    """Config of the zoo's decoder LM: sizes plus the names and options of its attention, MLP and linear kinds."""

    model_type = "zoo_lm"
    UPGRADES = (_upgrade_v0,)
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
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_word_embeddings: bool = True
    zoo_name: str | None = None  # the catalog entry this config came from, if any
    config_version: int = 1  # the layout of this config (models/versioning.py); older dicts are upgraded

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
            registry.check(getattr(self, name), name)
        for name in ("rope_theta", "norm_eps", "init_std"):
            _check(getattr(self, name) > 0, name, getattr(self, name), "must be > 0")
        self._validate_kind_options()

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


class DecoderBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ZooLMConfig, layer_idx: int):
        super().__init__()
        c = config
        # The linear kind replaces nn.Linear in the projections that linear_targets names.
        self.attn_norm = RMSNorm(c.d_model, c.norm_eps)
        self.attn = SelfAttention(c.d_model, c.n_heads, c.n_kv_heads, c.attention, c.attention_kwargs,
                                  *c.attn_linear(), layer_idx=layer_idx)
        self.mlp_norm = RMSNorm(c.d_model, c.norm_eps)
        mlp_linear, mlp_linear_kwargs = c.mlp_linear()
        self.mlp = mlp.KINDS[c.mlp](c.d_model, c.d_ff, linear=mlp_linear, linear_kwargs=mlp_linear_kwargs,
                                    layer_idx=layer_idx, **c.mlp_kwargs)

    def forward(self, x, cos, sin, cache=None, key_padding_mask=None,
                reports: list[LayerReport] | None = None) -> torch.Tensor:
        """x (batch, seq, d_model) -> the block's output; its MLP's report (if it makes one) goes into `reports`.

        The output stays a plain tensor, so hooks on a block (SAE harvesting, probes) see the residual stream.
        """
        x = x + self.attn(self.attn_norm(x), cos, sin, cache=cache, key_padding_mask=key_padding_mask)
        out = self.mlp(self.mlp_norm(x))
        if isinstance(out, tuple):  # MLP kinds with losses / metrics / step statistics return both
            out, report = out
            if reports is not None:
                reports.append(report)
        return x + out


@dataclass
class ZooLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus what the layers report: weighted auxiliary losses (MoE balance, z-loss...),
    metrics to log (averaged over layers) and step statistics for the trainer's step hook (models/base.py)."""

    aux_losses: dict[str, torch.Tensor] | None = None
    metrics: dict[str, torch.Tensor] | None = None
    step_stats: dict[str, torch.Tensor] | None = None


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
        aux: dict[str, torch.Tensor] = {}
        metrics: dict[str, list[torch.Tensor]] = {}
        stats: dict[str, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            reports: list[LayerReport] = []
            x = block(x, cos, sin, cache=cache, key_padding_mask=key_padding_mask, reports=reports)
            for report in reports:
                for name, value in report.aux_losses.items():
                    aux[name] = aux[name] + value if name in aux else value
                for name, value in report.metrics.items():
                    metrics.setdefault(name, []).append(value)
                stats.update({f"blocks.{i}.mlp.{name}": value for name, value in report.stats.items()})
        x = self.norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)
        loss = None if labels is None else next_token_loss(logits, labels)
        return ZooLMOutput(loss=loss, logits=logits, cache=cache if use_cache else None, aux_losses=aux,
                           metrics={name: torch.stack(v).float().mean() for name, v in metrics.items()},
                           step_stats=stats)

    @torch.no_grad()
    def after_optimizer_step(self, stats: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        """The per-step updates: each layer with `on_optimizer_step` gets the statistics under its module path."""
        for path, module in self.named_modules():
            hook = getattr(module, "on_optimizer_step", None)
            if hook is not None:
                prefix = f"{path}."
                hook({k[len(prefix):]: v for k, v in stats.items() if k.startswith(prefix)}, step)
        return {}

    # ---- sparsity knobs ----------------------------------------------------------------------
    def set_num_experts_per_tok(self, k: int, layers: list[int] | None = None) -> None:
        """Route with k experts per token from now on (the largest k for top-p), in every MoE layer or `layers`.

        The config's mlp_kwargs (num_experts_per_tok, or num_experts_per_tok_by_layer when layers differ)
        follow, so that cost() and a later save_pretrained record the new k.
        """
        found = moe_layers(self)
        chosen = list(range(len(found))) if layers is None else list(layers)
        for i in chosen:
            if not 0 <= i < len(found):
                raise ValueError(f"layer {i} does not exist: the model has {len(found)} MoE layers")
        set_num_experts_per_tok([found[i] for i in chosen], k)
        per_layer = [m.router.num_experts_per_tok for m in found]
        options = dict(self.config.mlp_kwargs)
        if len(set(per_layer)) == 1:
            options["num_experts_per_tok"] = per_layer[0]
            options.pop("num_experts_per_tok_by_layer", None)
        else:
            options["num_experts_per_tok_by_layer"] = per_layer
        self.config.mlp_kwargs = options

    def set_top_p(self, top_p: float) -> None:
        """Use probability mass `top_p` in every top-p router (and the config's router_kwargs.top_p)."""
        set_top_p(moe_layers(self), top_p)
        options = copy.deepcopy(self.config.mlp_kwargs)
        _put(options, ("router_kwargs", "top_p"), top_p)
        self.config.mlp_kwargs = options

    # ---- cost --------------------------------------------------------------------------------
    @torch.no_grad()
    def cost(self, seq_len: int | None = None, sample: torch.Tensor | None = None) -> dict[str, float]:
        """total_params, active_params (per token) and forward flops_per_token at seq_len.

        A function of the weights' structure and settings only. Top-p routing's k varies per token: by default
        its largest k counts (worst case); pass `sample` (token ids) to count the mean k measured on them.
        """
        seq_len = seq_len or self.config.max_seq_len
        mean_k: list[float | None] = [None] * len(self.blocks)
        if sample is not None:
            was_training = self.training
            self.eval()
            stats = self(input_ids=sample.to(self.embed.weight.device)).step_stats
            self.train(was_training)
            per_expert = [stats.get(f"blocks.{i}.mlp.tokens_per_expert") for i in range(len(self.blocks))]
            mean_k = [None if n is None else float(n.sum()) / sample.numel() for n in per_expert]
        total = sum(p.numel() for p in self.parameters())
        flops = 2 * self.config.d_model * self.config.vocab_size  # LM head; the embedding is a lookup
        inactive = 0  # parameters that a token does not touch (unused experts), as their layer reports
        for block, k in zip(self.blocks, mean_k, strict=True):
            extra = {} if k is None else {"mean_experts_per_tok": k}
            flops += block.attn.flops_per_token(seq_len) + block.mlp.flops_per_token(**extra)
            inactive += getattr(block.mlp, "inactive_params_per_token", lambda **_: 0)(**extra)
        return {"total_params": total, "active_params": total - inactive, "flops_per_token": flops,
                "seq_len": seq_len}


# `import models.lm` (and so `import zoo`) makes AutoConfig / AutoModelForCausalLM know our folders.
AutoConfig.register(ZooLMConfig.model_type, ZooLMConfig, exist_ok=True)
AutoModelForCausalLM.register(ZooLMConfig, ZooLM, exist_ok=True)
