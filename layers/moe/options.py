"""MoEOptions: every option of the `mlp="moe"` kind, in one self-validating object.

The LM config holds `mlp="moe"` and `mlp_kwargs={...}` (these fields) exactly as it holds
`attention` + `attention_kwargs`; nothing else in the zoo knows them. Names are transformers'
where it has one (Mixtral / Qwen-MoE / DeepSeek). The router's own options (`top_p`,
`bias_update_rate`, ...) are `router_kwargs`, validated by the router class itself.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field

from layers.moe.routers import ROUTERS


def _check(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"config field 'mlp_kwargs.{name}' = {value!r} is invalid: {allowed}")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value == value  # not NaN


@dataclass
class MoEOptions:
    """The options of one Mixture-of-Experts MLP (see the field comments); invalid values raise ValueError."""

    num_experts: int = 8  # routed experts per layer (Mixtral: num_local_experts)
    num_experts_per_tok: int = 2  # k of top-k routing; for the top_p router the most experts a token may use
    num_experts_per_tok_by_layer: list[int] | None = None  # per-layer k, overriding num_experts_per_tok
    router: str = "softmax_topk"  # a name in layers.moe.ROUTERS
    router_kwargs: dict = field(default_factory=dict)  # the router's own options, e.g. {"top_p": 0.4}
    norm_topk_prob: bool = True  # renormalise the chosen experts' weights to sum to 1
    routed_scaling_factor: float = 1.0  # the routed experts' weighted sum is multiplied by this (DeepSeek)
    granularity: int = 1  # fine-grained experts: expert width = d_ff / granularity
    moe_intermediate_size: int | None = None  # expert width; None: d_ff / granularity
    n_shared_experts: int = 0  # always-on experts of the expert width (DeepSeek-MoE)
    shared_expert_intermediate_size: int | None = None  # shared experts' summed width; None: n_shared x width
    shared_expert_gate: bool = False  # Qwen-MoE: scale the shared output by sigmoid(gate(x))
    capacity_factor: float | None = None  # None: dropless; else each expert takes <= factor * tokens * k / E
    router_jitter_noise: float = 0.0  # training: router input scaled by U(1 - noise, 1 + noise)
    router_aux_loss_coef: float = 0.01  # weight of the switch load-balancing loss, per layer
    router_z_loss_coef: float = 0.001  # weight of the router z-loss, per layer
    router_entropy_loss_coef: float = 0.0  # weight of the router-entropy loss (keeps top-p routing sparse)
    impl: str = "auto"  # expert execution: see layers/moe/experts.py

    def __post_init__(self):
        e = self.num_experts
        _check(_is_int(e) and e >= 1, "num_experts", e, "must be an integer >= 1")
        k = self.num_experts_per_tok
        _check(_is_int(k) and 1 <= k <= e, "num_experts_per_tok", k, f"must be an integer in [1, num_experts={e}]")
        by_layer = self.num_experts_per_tok_by_layer
        if by_layer is not None:
            _check(isinstance(by_layer, list) and len(by_layer) > 0
                   and all(_is_int(v) and 1 <= v <= e for v in by_layer), "num_experts_per_tok_by_layer", by_layer,
                   f"must be null or a list of integers in [1, num_experts={e}], one per layer")
        ROUTERS.check(self.router, "mlp_kwargs.router")
        _check(isinstance(self.router_kwargs, dict), "router_kwargs", self.router_kwargs, "must be a dict")
        ROUTERS[self.router].check_options(self.router_kwargs, min(self.layer_ks()))
        for name in ("norm_topk_prob", "shared_expert_gate"):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name), "must be true or false")
        rsf = self.routed_scaling_factor
        _check(_is_number(rsf) and rsf > 0, "routed_scaling_factor", rsf, "must be a number > 0")
        _check(_is_int(self.granularity) and self.granularity >= 1, "granularity", self.granularity,
               "must be an integer >= 1")
        for name in ("moe_intermediate_size", "shared_expert_intermediate_size"):
            value = getattr(self, name)
            _check(value is None or (_is_int(value) and value >= (1 if name == "moe_intermediate_size" else 0)),
                   name, value, "must be null or a positive integer")
        _check(_is_int(self.n_shared_experts) and self.n_shared_experts >= 0, "n_shared_experts",
               self.n_shared_experts, "must be an integer >= 0")
        cf = self.capacity_factor
        _check(cf is None or (_is_number(cf) and cf > 0), "capacity_factor", cf, "must be null (dropless) or > 0")
        jitter = self.router_jitter_noise
        _check(_is_number(jitter) and 0 <= jitter < 1, "router_jitter_noise", jitter, "must be in [0, 1)")
        for name in ("router_aux_loss_coef", "router_z_loss_coef", "router_entropy_loss_coef"):
            value = getattr(self, name)
            _check(_is_number(value) and value >= 0, name, value, "must be a number >= 0")
        from layers.moe.experts import IMPLS

        _check(self.impl in IMPLS, "impl", self.impl, f"one of {IMPLS}")

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> MoEOptions:
        """MoEOptions(**kwargs), with an unknown key named in the error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"config field 'mlp_kwargs' has unknown MoE option(s) {unknown}; known: {sorted(known)}")
        return cls(**kwargs)

    def layer_ks(self) -> list[int]:
        """The k of every layer that lists one (or [num_experts_per_tok])."""
        return list(self.num_experts_per_tok_by_layer or [self.num_experts_per_tok])

    def k_for_layer(self, layer_idx: int | None) -> int:
        """k of layer `layer_idx`."""
        if self.num_experts_per_tok_by_layer is None or layer_idx is None:
            return self.num_experts_per_tok
        return self.num_experts_per_tok_by_layer[layer_idx]

    def expert_width(self, d_ff: int) -> int:
        """The routed experts' width for an MLP of width d_ff."""
        if self.moe_intermediate_size is not None:
            return self.moe_intermediate_size
        _check(d_ff % self.granularity == 0, "granularity", self.granularity,
               f"must divide d_ff={d_ff} (expert width = d_ff / granularity)")
        return d_ff // self.granularity

    def check_model(self, *, d_ff: int, n_layers: int, mlp_linear: str) -> None:
        """Refuse combinations with the LM's other fields (the error names the field)."""
        self.expert_width(d_ff)
        by_layer = self.num_experts_per_tok_by_layer
        _check(by_layer is None or len(by_layer) == n_layers, "num_experts_per_tok_by_layer", by_layer,
               f"must list one k per layer (n_layers={n_layers})")
        if mlp_linear != "dense":
            raise ValueError(f"config field 'linear' = {mlp_linear!r} with linear_targets covering the MLP is "
                             f"invalid for mlp='moe': the routed experts are dense SwiGLU experts and would stay "
                             f"dense; use linear_targets='attn' or linear='dense'")
