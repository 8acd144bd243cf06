"""transformers architectures <-> the zoo LM: one table per architecture, read in both directions.

An `Architecture` says, for one transformers `model_type`:
- `zoo_fields(hf_config)`: the ZooLMConfig fields that compute what that config computes (a ValueError
  naming the setting when the zoo has no equivalent, e.g. OLMoE's clip_qkv);
- `hf_config(zoo_config)`: the transformers config of a zoo config (a ValueError naming the zoo field
  when the architecture cannot express it, e.g. attention="lsh" or a top-p router);
- `tensors(zoo_config)`: the weight correspondence, a list of `Tensors` rules (zoo names, transformers
  names, and the two transforms between them: renames are the identity, GPT-2's fused Conv1D q/k/v and
  the fused expert matrices are split / concatenated).
Names on both sides are the state-dict names of the live modules (transformers' own loader turns any
on-disk layout it knows, such as Mixtral's per-expert w1/w2/w3, into those).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from layers.mlp import ACTIVATION_ALIASES
from layers.moe import MoEOptions
from models.lm import ZooLMConfig

ZOO_DEFAULTS = ZooLMConfig()
# Fields every architecture expresses (sizes, numerics, bookkeeping) or that do not change the function.
ALWAYS_EXPRESSED = {"vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len",
                    "norm_eps", "init_std", "tie_word_embeddings", "zoo_name", "use_cache", "config_version",
                    "linear_targets"}


def refuse(field: str, value, architecture: str, why: str) -> None:
    """The error of a zoo setting an architecture cannot express."""
    raise ValueError(f"cannot express {field}={value!r} as transformers' {architecture}: {why}")


def unsupported(architecture: str, setting: str, value, why: str = "the zoo LM has no equivalent") -> None:
    """The error of a transformers setting the zoo cannot import."""
    raise ValueError(f"cannot import this {architecture} checkpoint: {setting}={value!r} ({why})")


@dataclass
class Tensors:
    """zoo tensors <-> transformers tensors: `to_zoo(*hf) -> tuple(zoo)`, `to_hf(*zoo) -> tuple(hf)`."""

    zoo: tuple[str, ...]
    hf: tuple[str, ...]
    to_zoo: Callable | None = None  # None: a rename
    to_hf: Callable | None = None


def rename(zoo: str, hf: str) -> Tensors:
    return Tensors((zoo,), (hf,))


def _transposed(zoo: str, hf: str) -> Tensors:
    """A Conv1D weight (in, out) <-> an nn.Linear weight (out, in)."""
    return Tensors((zoo,), (hf,), lambda w: (w.t(),), lambda w: (w.t(),))


def _split(zoo: tuple[str, ...], hf: str, dim: int, transpose: bool = False) -> Tensors:
    """One fused transformers tensor (transposed first if asked) <-> equal parts along `dim`."""
    def to_zoo(fused):
        t = fused.t() if transpose else fused
        return tuple(t.chunk(len(zoo), dim))

    def to_hf(*parts):
        fused = torch.cat(parts, dim)
        return (fused.t() if transpose else fused,)
    return Tensors(zoo, (hf,), to_zoo, to_hf)


def _experts(zoo_prefix: str, hf_prefix: str) -> list[Tensors]:
    """SwiGLU experts: zoo w_gate / w_up / w_down (E, width, d) <-> gate_up_proj (E, 2 width, d) and
    down_proj (E, d, width)."""
    z, h = zoo_prefix, hf_prefix
    return [_split((f"{z}w_gate", f"{z}w_up"), f"{h}gate_up_proj", 1),
            Tensors((f"{z}w_down",), (f"{h}down_proj",), lambda w: (w.transpose(1, 2),),
                    lambda w: (w.transpose(1, 2),))]


def _swiglu(zoo_prefix: str, hf_prefix: str) -> list[Tensors]:
    return [rename(f"{zoo_prefix}{a}.weight", f"{hf_prefix}{b}.weight")
            for a, b in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj"))]


# ---- the Llama family: Llama, Mistral, Qwen2, Qwen3, Gemma and their MoE versions ----------------------------

def _hf_get(hf, name: str, default=None):
    value = getattr(hf, name, default)
    return default if value is None else value


def _rope_fields(hf, architecture: str) -> dict:
    params = dict(getattr(hf, "rope_parameters", None) or {})
    theta = params.pop("rope_theta", None) or getattr(hf, "rope_theta", None) or 10000.0
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        params = {}
    elif rope_type not in ("linear", "llama3", "yarn"):
        unsupported(architecture, "rope_parameters.rope_type", rope_type,
                    "its frequencies change with the sequence length; supported: default, linear, llama3, yarn")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        unsupported(architecture, "partial_rotary_factor", params["partial_rotary_factor"])
    return {"rope_theta": float(theta), "rope_kwargs": params}


def _activation(hf, architecture: str, name: str = "hidden_act") -> str:
    act = _hf_get(hf, name, "silu")
    if act not in ACTIVATION_ALIASES:
        unsupported(architecture, name, act, f"supported: {sorted(ACTIVATION_ALIASES)}")
    return ACTIVATION_ALIASES[act]


def _sliding_window(hf, architecture: str) -> dict:
    """Mistral / Qwen's sliding window as the zoo's `local` attention (window = keys per query, as theirs)."""
    window = getattr(hf, "sliding_window", None)
    if not getattr(hf, "use_sliding_window", True) or not window:  # Qwen: set but switched off
        return {}
    layer_types = getattr(hf, "layer_types", None)
    if window is None or window >= hf.max_position_embeddings:
        return {}  # no position is ever further than the window: dense attention is exact
    if layer_types and len(set(layer_types)) > 1:
        unsupported(architecture, "layer_types", sorted(set(layer_types)),
                    "a sliding window on some layers only; the zoo LM has one attention kind")
    return {"attention": "local", "attention_kwargs": {"window": int(window)}}


def _llama_like_fields(hf, architecture: str, *, bias: str, qk_norm: str = "none") -> dict:
    if _hf_get(hf, "mlp_bias", False):
        unsupported(architecture, "mlp_bias", True)
    if getattr(hf, "pretraining_tp", 1) not in (None, 1):
        unsupported(architecture, "pretraining_tp", hf.pretraining_tp)
    fields = dict(vocab_size=hf.vocab_size, d_model=hf.hidden_size, n_layers=hf.num_hidden_layers,
                  n_heads=hf.num_attention_heads,
                  n_kv_heads=_hf_get(hf, "num_key_value_heads", hf.num_attention_heads),
                  d_ff=hf.intermediate_size, max_seq_len=hf.max_position_embeddings,
                  norm_eps=float(hf.rms_norm_eps), init_std=float(_hf_get(hf, "initializer_range", 0.02)),
                  tie_word_embeddings=bool(hf.tie_word_embeddings), attention_bias=bias, qk_norm=qk_norm,
                  **_rope_fields(hf, architecture), **_sliding_window(hf, architecture))
    head_dim = _hf_get(hf, "head_dim", hf.hidden_size // hf.num_attention_heads)
    if head_dim * hf.num_attention_heads != hf.hidden_size or hf.hidden_size % hf.num_attention_heads:
        fields["head_dim"] = int(head_dim)
    act = _activation(hf, architecture)
    if act != "silu":
        fields["mlp_kwargs"] = {"activation": act}
    return fields


def _attention_bias(hf) -> str:
    return "all" if _hf_get(hf, "attention_bias", False) else "none"


@dataclass
class Architecture:
    """One transformers architecture (see the module docstring)."""

    model_type: str
    config_class: str
    model_class: str
    moe: bool = False
    # zoo fields (besides ALWAYS_EXPRESSED) this architecture can hold, with the values it can hold them at;
    # a callable(value) -> bool, or a tuple of the allowed values.
    expresses: dict = dataclasses.field(default_factory=dict)

    # -- import --------------------------------------------------------------------------------------------
    def zoo_fields(self, hf) -> dict:
        raise NotImplementedError

    # -- export --------------------------------------------------------------------------------------------
    def check_expressible(self, config: ZooLMConfig) -> None:
        """A ValueError naming the first zoo setting this architecture cannot hold."""
        for f in dataclasses.fields(ZooLMConfig):
            name = f.name
            if name in ALWAYS_EXPRESSED or name not in ZooLMConfig.__annotations__:
                continue
            value = getattr(config, name)
            allowed = self.expresses.get(name)
            if allowed is None:
                if value != getattr(ZOO_DEFAULTS, name):
                    refuse(name, value, self.config_class.removesuffix("Config"),
                           f"it has no equivalent (the zoo's default is {getattr(ZOO_DEFAULTS, name)!r})")
            elif callable(allowed):
                why = allowed(value, config)
                if why:
                    refuse(name, value, self.config_class.removesuffix("Config"), why)
            elif value not in allowed:
                refuse(name, value, self.config_class.removesuffix("Config"), f"it holds only {allowed}")

    def hf_config_kwargs(self, config: ZooLMConfig) -> dict:
        raise NotImplementedError

    def hf_config(self, config: ZooLMConfig):
        """The transformers config of a zoo config (refusing what it cannot hold)."""
        import transformers

        self.check_expressible(config)
        return getattr(transformers, self.config_class)(**self.hf_config_kwargs(config))

    def tensors(self, config: ZooLMConfig) -> list[Tensors]:
        raise NotImplementedError


def _moe_check(architecture: str, allowed_routers: tuple[str, ...], *, norm_topk_prob=None, shared=False,
               shared_gate=False, scaling=False, group_options=False) -> Callable:
    """A check of mlp_kwargs for an MoE architecture (returns the reason it cannot hold them, or None)."""
    def check(options: dict, config: ZooLMConfig) -> str | None:
        if config.mlp != "moe":
            return None
        o = MoEOptions.from_kwargs(options)
        if o.router not in allowed_routers:
            return f"its router is {allowed_routers[0]} (mlp_kwargs.router={o.router!r})"
        allowed = {"n_group", "topk_group"} if group_options else set()
        if o.router == "sigmoid_topk":
            allowed.add("bias_update_rate")  # training only
        if set(o.router_kwargs) - allowed:
            return f"mlp_kwargs.router_kwargs={o.router_kwargs!r} has no equivalent"
        if norm_topk_prob is not None and o.norm_topk_prob != norm_topk_prob:
            return f"it {'always' if norm_topk_prob else 'never'} renormalises the top-k weights (norm_topk_prob)"
        if o.num_experts_per_tok_by_layer is not None:
            return "it has one k for every layer (num_experts_per_tok_by_layer)"
        if o.capacity_factor is not None:
            return "it is dropless (capacity_factor)"
        has_shared = bool(o.n_shared_experts or o.shared_expert_intermediate_size)
        if has_shared and not shared:
            return "it has no shared experts"
        if shared and shared_gate and not (has_shared and o.shared_expert_gate):
            return "it always has a shared expert gated by sigmoid(gate(x)) (shared_expert_gate)"
        if shared and not shared_gate and o.shared_expert_gate:
            return "its shared experts are not gated (shared_expert_gate)"
        if o.routed_scaling_factor != 1.0 and not scaling:
            return "it does not scale the routed sum (routed_scaling_factor)"
        return None
    return check


def _mlp_kwargs_check(activations: tuple[str, ...]) -> Callable:
    def check(options: dict, config: ZooLMConfig) -> str | None:
        if config.mlp == "moe":
            return None
        if set(options) - {"activation"}:
            return f"mlp_kwargs {sorted(set(options) - {'activation'})} have no equivalent"
        act = options.get("activation", "silu")
        return None if act in activations else f"its MLP activation is one of {activations}"
    return check


def _local_window_check(attention: str, config: ZooLMConfig) -> str | None:
    """Mistral / Qwen2 / Qwen3 hold dense attention, or `local` as their sliding window."""
    if attention == "dense":
        return None
    if attention == "local" and set(config.attention_kwargs) <= {"window"}:
        return None
    return "its attention is dense or a causal sliding window (attention='local' with only a window)"


def _dense_only(value, config) -> str | None:
    return None if value == "dense" else "its attention is dense"


def _no_kwargs(value, config) -> str | None:
    return None if not value or (config.attention == "local" and set(value) <= {"window"}) else (
        "it has no attention options")


def _anything(value, config) -> str | None:
    return None


class LlamaFamily(Architecture):
    """Llama, Mistral, Qwen2, Qwen3, Gemma (dense) and Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE (MoE)."""

    def __init__(self, model_type, config_class, model_class, *, bias="none", qk_norm="none", moe=False,
                 sliding=False, norm="rms", scaled_embedding=False, activations=("silu",), shared=False,
                 norm_topk_prob=None, dense_layers=False):
        expresses = {"rope_theta": _anything, "rope_kwargs": _anything, "head_dim": _anything,
                     "attention": _local_window_check if sliding else _dense_only, "attention_kwargs": _no_kwargs,
                     "attention_bias": (bias,) if bias != "flag" else ("none", "all"), "qk_norm": (qk_norm,),
                     "norm": (norm,), "mlp": ("moe",) if moe else ("swiglu",),
                     "mlp_kwargs": (_moe_check(config_class, ("softmax_topk",), norm_topk_prob=norm_topk_prob,
                                               shared=shared, shared_gate=shared) if moe
                                    else _mlp_kwargs_check(activations)),
                     "linear": ("dense",), "linear_kwargs": ({},)}
        if scaled_embedding:
            expresses["embedding_scale"] = lambda v, c: (
                None if math.isclose(v, math.sqrt(c.d_model), rel_tol=1e-6) else "its embedding scale is sqrt(d_model)")
        if dense_layers:
            expresses["dense_mlp_layers"] = _anything
        super().__init__(model_type, config_class, model_class, moe, expresses)
        self.bias, self.qk_norm, self.norm, self.scaled_embedding = bias, qk_norm, norm, scaled_embedding
        self.shared, self.dense_layers = shared, dense_layers

    # -- import
    def zoo_fields(self, hf) -> dict:
        name = self.config_class.removesuffix("Config")
        bias = _attention_bias(hf) if self.bias == "flag" else self.bias
        fields = _llama_like_fields(hf, name, bias=bias, qk_norm=self.qk_norm)
        if self.norm != "rms":
            fields["norm"] = self.norm
        if self.scaled_embedding:
            fields["embedding_scale"] = math.sqrt(hf.hidden_size)
        if self.model_type == "olmoe" and getattr(hf, "clip_qkv", None) is not None:
            unsupported(name, "clip_qkv", hf.clip_qkv)
        if self.moe:
            fields.update(self.moe_fields(hf, fields))
        return fields

    def moe_fields(self, hf, fields: dict) -> dict:
        name = self.config_class.removesuffix("Config")
        if fields.get("mlp_kwargs", {}).get("activation", "silu") != "silu":
            unsupported(name, "hidden_act", hf.hidden_act, "the zoo's experts are SwiGLU (silu)")
        num_experts = _hf_get(hf, "num_local_experts", None) or hf.num_experts
        options = {"num_experts": num_experts, "num_experts_per_tok": hf.num_experts_per_tok,
                   "norm_topk_prob": bool(_hf_get(hf, "norm_topk_prob", True)),
                   "router_aux_loss_coef": float(_hf_get(hf, "router_aux_loss_coef", 0.0)),
                   "router_z_loss_coef": 0.0, "router_jitter_noise": float(_hf_get(hf, "router_jitter_noise", 0.0))}
        if getattr(hf, "moe_intermediate_size", None):
            options["moe_intermediate_size"] = hf.moe_intermediate_size
        if self.shared and _hf_get(hf, "shared_expert_intermediate_size", 0):
            options["shared_expert_intermediate_size"] = hf.shared_expert_intermediate_size
            options["shared_expert_gate"] = True
        out = {"mlp": "moe", "mlp_kwargs": options}
        if self.dense_layers:  # Qwen2-MoE / Qwen3-MoE: mlp_only_layers and decoder_sparse_step
            step = _hf_get(hf, "decoder_sparse_step", 1)
            only = set(_hf_get(hf, "mlp_only_layers", []))
            dense = [i for i in range(hf.num_hidden_layers) if i in only or num_experts == 0 or (i + 1) % step]
            if dense:
                out["dense_mlp_layers"] = dense
        return out

    # -- export
    def hf_config_kwargs(self, c: ZooLMConfig) -> dict:
        kw = dict(vocab_size=c.vocab_size, hidden_size=c.d_model, num_hidden_layers=c.n_layers,
                  num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.attention_head_dim(),
                  intermediate_size=c.d_ff, max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
                  tie_word_embeddings=c.tie_word_embeddings, initializer_range=c.init_std,
                  rope_parameters={"rope_type": "default", **c.rope_kwargs, "rope_theta": c.rope_theta},
                  attention_dropout=0.0, bos_token_id=None, eos_token_id=None, pad_token_id=None)
        act = c.mlp_kwargs.get("activation", "silu") if c.mlp != "moe" else "silu"
        kw["hidden_act"] = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "relu": "relu"}[act]
        if self.bias == "flag":
            kw["attention_bias"] = c.attention_bias == "all"
        if self.model_type in ("llama",):
            kw["mlp_bias"] = False
        if self.model_type in ("mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
            window = c.attention_kwargs.get("window") if c.attention == "local" else None
            kw["sliding_window"] = window
            if self.model_type.startswith("qwen"):
                kw["use_sliding_window"] = window is not None
                kw["max_window_layers"] = c.n_layers if window is not None else 0
        if self.moe:
            o = MoEOptions.from_kwargs(c.mlp_kwargs)
            width = o.expert_width(c.d_ff)
            experts = "num_local_experts" if self.model_type == "mixtral" else "num_experts"
            kw.update({experts: o.num_experts, "num_experts_per_tok": o.num_experts_per_tok,
                       "router_aux_loss_coef": o.router_aux_loss_coef, "output_router_logits": False})
            if self.model_type == "mixtral":
                kw["intermediate_size"] = width
                kw["router_jitter_noise"] = o.router_jitter_noise
            elif self.model_type == "olmoe":
                kw["intermediate_size"] = width
                kw["norm_topk_prob"] = o.norm_topk_prob
            else:
                kw["moe_intermediate_size"] = width
                kw["norm_topk_prob"] = o.norm_topk_prob
            if self.shared:
                shared = o.shared_expert_intermediate_size
                kw["shared_expert_intermediate_size"] = shared if shared is not None else o.n_shared_experts * width
            if self.dense_layers:
                kw["decoder_sparse_step"] = 1
                kw["mlp_only_layers"] = list(c.dense_mlp_layers)
        return kw

    # -- weights
    def tensors(self, c: ZooLMConfig) -> list[Tensors]:
        rules = [rename("model.embed.weight", "model.embed_tokens.weight"),
                 rename("model.norm.weight", "model.norm.weight")]
        if not c.tie_word_embeddings:
            rules.append(rename("lm_head.weight", "lm_head.weight"))
        for i in range(c.n_layers):
            z, h = f"model.blocks.{i}.", f"model.layers.{i}."
            rules += [rename(z + "attn_norm.weight", h + "input_layernorm.weight"),
                      rename(z + "mlp_norm.weight", h + "post_attention_layernorm.weight")]
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                rules.append(rename(f"{z}attn.{name}.weight", f"{h}self_attn.{name}.weight"))
                if c.attention_bias == "all" or (c.attention_bias == "qkv" and name != "o_proj"):
                    rules.append(rename(f"{z}attn.{name}.bias", f"{h}self_attn.{name}.bias"))
            if c.qk_norm != "none":
                rules += [rename(f"{z}attn.q_norm.weight", f"{h}self_attn.q_norm.weight"),
                          rename(f"{z}attn.k_norm.weight", f"{h}self_attn.k_norm.weight")]
            if c.mlp == "moe" and i not in c.dense_mlp_layers:
                rules += self.moe_tensors(c, z + "mlp.", h + "mlp.")
            else:
                rules += _swiglu(z + "mlp.", h + "mlp.")
        return rules

    def moe_tensors(self, c: ZooLMConfig, z: str, h: str) -> list[Tensors]:
        rules = [rename(z + "router.proj.weight", h + "gate.weight"), *_experts(z + "experts.", h + "experts.")]
        o = MoEOptions.from_kwargs(c.mlp_kwargs)
        if self.shared and (o.shared_expert_intermediate_size or o.n_shared_experts):
            rules += _swiglu(z + "shared.", h + "shared_expert.")
            rules.append(rename(z + "shared_gate.weight", h + "shared_expert_gate.weight"))
        return rules


class GPT2(Architecture):
    """GPT-2: LayerNorm with bias, learned positions, GELU MLP, fused q/k/v, Conv1D (in, out) weights."""

    def __init__(self):
        super().__init__("gpt2", "GPT2Config", "GPT2LMHeadModel", expresses={
            "attention": _dense_only, "attention_bias": ("all",), "norm": ("layer",), "position": ("learned",),
            "mlp": ("ffn",), "linear": ("dense",), "head_dim": lambda v, c: (
                None if v in (None, c.d_model // c.n_heads) and c.d_model % c.n_heads == 0
                else "its head width is d_model / n_heads"),
            "mlp_kwargs": lambda v, c: (None if v.get("bias", True) and v.get("activation", "gelu_tanh") in
                                        ("gelu_tanh", "gelu", "relu") and set(v) <= {"bias", "activation"}
                                        else "its MLP has biases and a gelu / relu activation")})

    def zoo_fields(self, hf) -> dict:
        for name, ok in (("scale_attn_by_inverse_layer_idx", False), ("scale_attn_weights", True),
                         ("add_cross_attention", False)):
            if bool(getattr(hf, name, ok)) != ok:
                unsupported("GPT2", name, getattr(hf, name))
        act = _activation(hf, "GPT2", "activation_function")
        return dict(vocab_size=hf.vocab_size, d_model=hf.n_embd, n_layers=hf.n_layer, n_heads=hf.n_head,
                    n_kv_heads=hf.n_head, d_ff=hf.n_inner or 4 * hf.n_embd, max_seq_len=hf.n_positions,
                    norm_eps=float(hf.layer_norm_epsilon), init_std=float(hf.initializer_range),
                    tie_word_embeddings=bool(hf.tie_word_embeddings), attention_bias="all", norm="layer",
                    position="learned", mlp="ffn", mlp_kwargs={"activation": act, "bias": True})

    def check_expressible(self, config: ZooLMConfig) -> None:
        if config.n_kv_heads != config.n_heads:
            refuse("n_kv_heads", config.n_kv_heads, "GPT2", "it has no grouped-query attention")
        super().check_expressible(config)

    def hf_config_kwargs(self, c: ZooLMConfig) -> dict:
        act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}[c.mlp_kwargs.get("activation", "gelu_tanh")]
        return dict(vocab_size=c.vocab_size, n_embd=c.d_model, n_layer=c.n_layers, n_head=c.n_heads, n_inner=c.d_ff,
                    n_positions=c.max_seq_len, layer_norm_epsilon=c.norm_eps, initializer_range=c.init_std,
                    tie_word_embeddings=c.tie_word_embeddings, activation_function=act, resid_pdrop=0.0,
                    embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None, pad_token_id=None)

    def tensors(self, c: ZooLMConfig) -> list[Tensors]:
        rules = [rename("model.embed.weight", "transformer.wte.weight"),
                 rename("model.pos_embed.weight", "transformer.wpe.weight"),
                 rename("model.norm.weight", "transformer.ln_f.weight"),
                 rename("model.norm.bias", "transformer.ln_f.bias")]
        if not c.tie_word_embeddings:
            rules.append(rename("lm_head.weight", "lm_head.weight"))
        for i in range(c.n_layers):
            z, h = f"model.blocks.{i}.", f"transformer.h.{i}."
            for zn, hn in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                rules += [rename(f"{z}{zn}.weight", f"{h}{hn}.weight"), rename(f"{z}{zn}.bias", f"{h}{hn}.bias")]
            qkv = tuple(f"{z}attn.{p}_proj" for p in "qkv")
            rules += [_split(tuple(f"{n}.weight" for n in qkv), f"{h}attn.c_attn.weight", 0, transpose=True),
                      _split(tuple(f"{n}.bias" for n in qkv), f"{h}attn.c_attn.bias", 0),
                      _transposed(f"{z}attn.o_proj.weight", f"{h}attn.c_proj.weight"),
                      rename(f"{z}attn.o_proj.bias", f"{h}attn.c_proj.bias"),
                      _transposed(f"{z}mlp.up.weight", f"{h}mlp.c_fc.weight"),
                      rename(f"{z}mlp.up.bias", f"{h}mlp.c_fc.bias"),
                      _transposed(f"{z}mlp.down.weight", f"{h}mlp.c_proj.weight"),
                      rename(f"{z}mlp.down.bias", f"{h}mlp.c_proj.bias")]
        return rules


def _rope_order(rope: int) -> torch.Tensor:
    """DeepSeek's interleaved rotary layout -> rotate-half's: the even dims, then the odd ones."""
    return torch.cat([torch.arange(0, rope, 2), torch.arange(1, rope, 2)])


def _q_transform(heads: int, nope: int, rope: int, scale: float) -> Tensors:
    """DeepSeek's q projection rows per head [nope | rope interleaved], with its softmax scale beyond
    1/sqrt(head_dim) (YaRN's mscale) folded into the weights, <-> the zoo's [nope | rope], unscaled kernels."""
    order = _rope_order(rope)
    inverse = torch.argsort(order)

    def permute(w, idx, factor):
        w = w.reshape(heads, nope + rope, -1)
        w = torch.cat([w[:, :nope], w[:, nope:][:, idx]], dim=1)
        return (w.reshape(heads * (nope + rope), -1) * factor,)
    return lambda zoo, hf: Tensors((zoo,), (hf,), lambda w: permute(w, order, scale),
                                   lambda w: permute(w, inverse, 1.0 / scale))


def _kv_a_transform(lora: int, rope: int) -> Callable:
    order = _rope_order(rope)
    inverse = torch.argsort(order)

    def permute(w, idx):
        return (torch.cat([w[:lora], w[lora:][idx]], dim=0),)
    return lambda zoo, hf: Tensors((zoo,), (hf,), lambda w: permute(w, order), lambda w: permute(w, inverse))


class DeepSeekV3(Architecture):
    """DeepSeek-V3: multi-head latent attention, sigmoid routing with a correction bias and group-limited top-k,
    routed scaling, shared experts, dense first layers. (DeepSeek-V2 below: the same with softmax routing.)"""

    router = "sigmoid_topk"

    def __init__(self, model_type="deepseek_v3", config_class="DeepseekV3Config",
                 model_class="DeepseekV3ForCausalLM", norm_topk_prob=None):
        super().__init__(model_type, config_class, model_class, moe=True, expresses={
            "rope_theta": _anything, "rope_kwargs": _anything, "attention": _dense_only,
            "attention_bias": ("none", "all"), "mlp": ("moe",), "mla": lambda v, c: (
                None if v else "its attention is multi-head latent attention (mla)"),
            "mlp_kwargs": _moe_check(config_class.removesuffix("Config"), (self.router,), shared=True, scaling=True,
                                     norm_topk_prob=norm_topk_prob, group_options=True),
            "dense_mlp_layers": lambda v, c: (None if v == list(range(len(v))) else
                                              "its dense layers are the first ones (first_k_dense_replace)"),
            "linear": ("dense",), "linear_kwargs": ({},)})

    @staticmethod
    def _scale(rope_parameters: dict) -> float:
        """DeepSeek's softmax scale over 1/sqrt(head_dim): YaRN's mscale(factor, mscale_all_dim)^2."""
        if rope_parameters.get("rope_type", "default") == "default" or not rope_parameters.get("mscale_all_dim"):
            return 1.0
        mscale = 0.1 * rope_parameters["mscale_all_dim"] * math.log(rope_parameters["factor"]) + 1.0
        return mscale * mscale if rope_parameters["factor"] > 1 else 1.0

    def zoo_fields(self, hf) -> dict:
        name = self.config_class.removesuffix("Config")
        if _hf_get(hf, "num_key_value_heads", hf.num_attention_heads) != hf.num_attention_heads:
            unsupported(name, "num_key_value_heads", hf.num_key_value_heads,
                        "latent attention with fewer key/value heads than heads")
        if _activation(hf, name) != "silu":
            unsupported(name, "hidden_act", hf.hidden_act)
        if _hf_get(hf, "mlp_bias", False):
            unsupported(name, "mlp_bias", True)
        routing = self.routing(hf)
        return dict(vocab_size=hf.vocab_size, d_model=hf.hidden_size, n_layers=hf.num_hidden_layers,
                    n_heads=hf.num_attention_heads, n_kv_heads=hf.num_attention_heads, d_ff=hf.intermediate_size,
                    max_seq_len=hf.max_position_embeddings, norm_eps=float(hf.rms_norm_eps),
                    init_std=float(_hf_get(hf, "initializer_range", 0.02)),
                    tie_word_embeddings=bool(hf.tie_word_embeddings), attention_bias=_attention_bias(hf),
                    **_rope_fields(hf, name),
                    mla={"q_lora_rank": hf.q_lora_rank, "kv_lora_rank": hf.kv_lora_rank,
                         "qk_nope_head_dim": hf.qk_nope_head_dim, "qk_rope_head_dim": hf.qk_rope_head_dim,
                         "v_head_dim": hf.v_head_dim},
                    mlp="moe", dense_mlp_layers=list(range(min(hf.first_k_dense_replace, hf.num_hidden_layers))),
                    mlp_kwargs={"num_experts": hf.n_routed_experts, "num_experts_per_tok": hf.num_experts_per_tok,
                                "router": self.router, "router_kwargs": routing,
                                "norm_topk_prob": bool(hf.norm_topk_prob) and self.router == "sigmoid_topk",
                                "routed_scaling_factor": float(hf.routed_scaling_factor),
                                "moe_intermediate_size": hf.moe_intermediate_size,
                                "n_shared_experts": int(hf.n_shared_experts or 0),
                                "router_aux_loss_coef": 0.0, "router_z_loss_coef": 0.0})

    @staticmethod
    def routing(hf) -> dict:
        return {"n_group": int(_hf_get(hf, "n_group", 1)), "topk_group": int(_hf_get(hf, "topk_group", 1))}

    def extra_hf_kwargs(self, routing: dict) -> dict:
        return {"rope_interleave": True}

    def hf_config_kwargs(self, c: ZooLMConfig) -> dict:
        o = MoEOptions.from_kwargs(c.mlp_kwargs)
        routing = {k: v for k, v in o.router_kwargs.items() if k in ("n_group", "topk_group")}
        width = o.expert_width(c.d_ff)
        if o.shared_expert_intermediate_size not in (None, o.n_shared_experts * width):
            refuse("mlp_kwargs.shared_expert_intermediate_size", o.shared_expert_intermediate_size,
                   self.config_class.removesuffix("Config"),
                   "its shared experts are n_shared_experts x moe_intermediate_size wide")
        return dict(vocab_size=c.vocab_size, hidden_size=c.d_model, num_hidden_layers=c.n_layers,
                    num_attention_heads=c.n_heads, num_key_value_heads=c.n_heads, intermediate_size=c.d_ff,
                    max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, initializer_range=c.init_std,
                    tie_word_embeddings=c.tie_word_embeddings, attention_bias=c.attention_bias == "all",
                    rope_parameters={"rope_type": "default", **c.rope_kwargs, "rope_theta": c.rope_theta},
                    **self.extra_hf_kwargs(routing), **c.mla, n_routed_experts=o.num_experts,
                    num_experts_per_tok=o.num_experts_per_tok, n_group=routing.get("n_group", 1),
                    topk_group=routing.get("topk_group", 1), norm_topk_prob=o.norm_topk_prob,
                    routed_scaling_factor=o.routed_scaling_factor, moe_intermediate_size=width,
                    n_shared_experts=o.n_shared_experts, first_k_dense_replace=len(c.dense_mlp_layers),
                    attention_dropout=0.0, bos_token_id=None, eos_token_id=None, pad_token_id=None)

    def tensors(self, c: ZooLMConfig) -> list[Tensors]:
        m = c.mla
        nope, rope, lora = m["qk_nope_head_dim"], m["qk_rope_head_dim"], m["kv_lora_rank"]
        q = _q_transform(c.n_heads, nope, rope, self._scale({**c.rope_kwargs}))
        kv_a = _kv_a_transform(lora, rope)
        rules = [rename("model.embed.weight", "model.embed_tokens.weight"),
                 rename("model.norm.weight", "model.norm.weight")]
        if not c.tie_word_embeddings:
            rules.append(rename("lm_head.weight", "lm_head.weight"))
        bias = c.attention_bias == "all"
        for i in range(c.n_layers):
            z, h = f"model.blocks.{i}.", f"model.layers.{i}."
            a, ha = z + "attn.", h + "self_attn."
            rules += [rename(z + "attn_norm.weight", h + "input_layernorm.weight"),
                      rename(z + "mlp_norm.weight", h + "post_attention_layernorm.weight"),
                      kv_a(a + "kv_a_proj.weight", ha + "kv_a_proj_with_mqa.weight"),
                      rename(a + "kv_a_norm.weight", ha + "kv_a_layernorm.weight"),
                      rename(a + "kv_b_proj.weight", ha + "kv_b_proj.weight"),
                      rename(a + "o_proj.weight", ha + "o_proj.weight")]
            if m["q_lora_rank"] is None:
                rules.append(q(a + "q_proj.weight", ha + "q_proj.weight"))
            else:
                rules += [rename(a + "q_a_proj.weight", ha + "q_a_proj.weight"),
                          rename(a + "q_a_norm.weight", ha + "q_a_layernorm.weight"),
                          q(a + "q_b_proj.weight", ha + "q_b_proj.weight")]
            if bias:
                rules += [rename(a + "o_proj.bias", ha + "o_proj.bias"),
                          kv_a(a + "kv_a_proj.bias", ha + "kv_a_proj_with_mqa.bias")]
                if m["q_lora_rank"] is not None:
                    rules.append(rename(a + "q_a_proj.bias", ha + "q_a_proj.bias"))
            if i in c.dense_mlp_layers:
                rules += _swiglu(z + "mlp.", h + "mlp.")
                continue
            rules += [rename(z + "mlp.router.proj.weight", h + "mlp.gate.weight"),
                      *_experts(z + "mlp.experts.", h + "mlp.experts.")]
            if self.router == "sigmoid_topk":
                rules.append(rename(z + "mlp.router.bias", h + "mlp.gate.e_score_correction_bias"))
            if MoEOptions.from_kwargs(c.mlp_kwargs).n_shared_experts:
                rules += _swiglu(z + "mlp.shared.", h + "mlp.shared_experts.")
        return rules


class DeepSeekV2(DeepSeekV3):
    """DeepSeek-V2 / V2-Lite: as V3 with softmax routing (greedy, or group-limited by each group's best expert),
    unnormalised top-k weights and complex-pair (interleaved) RoPE."""

    router = "softmax_topk"

    def __init__(self):
        super().__init__("deepseek_v2", "DeepseekV2Config", "DeepseekV2ForCausalLM", norm_topk_prob=False)

    @staticmethod
    def routing(hf) -> dict:
        method = _hf_get(hf, "topk_method", "greedy")
        if method == "greedy":
            return {}
        if method != "group_limited_greedy":
            unsupported("DeepseekV2", "topk_method", method, "supported: greedy, group_limited_greedy")
        return {"n_group": int(hf.n_group), "topk_group": int(hf.topk_group)}

    def extra_hf_kwargs(self, routing: dict) -> dict:
        if not routing or routing.get("n_group", 1) == 1:
            return {"topk_method": "greedy"}
        return {"topk_method": "group_limited_greedy"}


ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (
    LlamaFamily("llama", "LlamaConfig", "LlamaForCausalLM", bias="flag"),
    LlamaFamily("mistral", "MistralConfig", "MistralForCausalLM", sliding=True),
    LlamaFamily("qwen2", "Qwen2Config", "Qwen2ForCausalLM", bias="qkv", sliding=True),
    LlamaFamily("qwen3", "Qwen3Config", "Qwen3ForCausalLM", bias="flag", qk_norm="head", sliding=True),
    LlamaFamily("gemma", "GemmaConfig", "GemmaForCausalLM", bias="flag", norm="rms_unit_offset",
                scaled_embedding=True, activations=("gelu_tanh", "gelu")),
    GPT2(),
    LlamaFamily("mixtral", "MixtralConfig", "MixtralForCausalLM", moe=True, sliding=True, norm_topk_prob=True),
    LlamaFamily("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM", moe=True, bias="qkv", sliding=True,
                shared=True, dense_layers=True),
    LlamaFamily("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", moe=True, bias="flag", qk_norm="head",
                sliding=True, dense_layers=True),
    LlamaFamily("olmoe", "OlmoeConfig", "OlmoeForCausalLM", moe=True, bias="flag", qk_norm="full"),
    DeepSeekV3(),
    DeepSeekV2(),
)}

# The order `zoo export --to transformers` tries when no architecture is named: the first that holds the model.
EXPORT_ORDER = ("llama", "qwen2", "qwen3", "gemma", "gpt2", "mistral", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe",
                "deepseek_v3", "deepseek_v2")


def architecture(model_type: str) -> Architecture:
    """The Architecture of a transformers model_type (a ValueError naming the supported ones)."""
    if model_type not in ARCHITECTURES:
        raise ValueError(f"transformers architecture {model_type!r} is not supported; supported: "
                         f"{sorted(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]


def export_architecture(config: ZooLMConfig, name: str | None = None) -> Architecture:
    """The architecture a zoo config exports to: `name`, or the first of EXPORT_ORDER that holds it."""
    if name is not None:
        arch = architecture(name)
        arch.check_expressible(config)
        return arch
    reasons = []
    for candidate in EXPORT_ORDER:
        arch = ARCHITECTURES[candidate]
        if arch.moe != (config.mlp == "moe"):
            continue
        try:
            arch.check_expressible(config)
            return arch
        except ValueError as err:
            reasons.append(str(err))
    raise ValueError("no transformers architecture holds this model:\n  " + "\n  ".join(reasons))


def zoo_state(rules: list[Tensors], hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers tensors -> the zoo's (every rule's inputs must be present)."""
    out = {}
    for rule in rules:
        missing = [n for n in rule.hf if n not in hf_state]
        if missing:
            raise ValueError(f"the transformers weights lack {missing}")
        inputs = [hf_state[n] for n in rule.hf]
        outputs = rule.to_zoo(*inputs) if rule.to_zoo else inputs
        out.update(zip(rule.zoo, outputs, strict=True))
    return out


def hf_state(rules: list[Tensors], zoo: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """zoo tensors -> transformers' (contiguous copies, ready to save)."""
    out = {}
    for rule in rules:
        inputs = [zoo[n] for n in rule.zoo]
        outputs = rule.to_hf(*inputs) if rule.to_hf else inputs
        out.update({n: t.detach().contiguous().clone() for n, t in zip(rule.hf, outputs, strict=True)})
    return out
