"""MoEMLP, the `mlp="moe"` kind: a router, routed SwiGLU experts and optional always-on shared experts.

After each forward the layer exposes what the trainer and the cost accounting need:
- `last_aux_losses`: the router losses, already weighted (the model sums them over layers);
- `last_metrics`: load entropy, max load, dropped fraction, mean active experts (0-d tensors);
- `last_tokens_per_expert`: (E,) routed assignments per expert.
The k used at inference can be changed on a built model with `set_num_experts_per_tok` (or the
top-p threshold with `set_top_p`); `flops_per_token` and `inactive_params_per_token` follow it.
"""

from __future__ import annotations

import torch
from torch import nn

from layers.mlp import SwiGLU
from layers.moe.experts import SwiGLUExperts, capacity_for
from layers.moe.losses import load_balancing_loss, load_statistics, router_entropy_loss, router_z_loss
from layers.moe.routers import ROUTERS, TopPRouter, make_router


class MoEMLP(nn.Module):
    """Mixture-of-Experts SwiGLU MLP: (..., d_model) -> (..., d_model), dropless unless capacity_factor is set."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        *,
        linear: str = "dense",
        linear_kwargs: dict | None = None,
        num_experts: int = 8,
        num_experts_per_tok: int = 2,
        router: str = "softmax_topk",
        granularity: int = 1,
        expert_width: int | None = None,
        n_shared_experts: int = 0,
        shared_width: int | None = None,
        shared_expert_gate: bool = False,
        renormalize: bool = True,
        top_p: float = 0.5,
        min_experts_per_tok: int = 1,
        jitter: float = 0.0,
        bias_update_rate: float = 1e-3,
        capacity_factor: float | None = None,
        balance_loss_weight: float = 0.01,
        z_loss_weight: float = 0.001,
        entropy_loss_weight: float = 0.0,
        routed_scaling_factor: float = 1.0,
        impl: str = "auto",
    ):
        super().__init__()
        if router not in ROUTERS:
            raise ValueError(f"unknown router kind {router!r}; known kinds: {sorted(ROUTERS)}")
        if not 1 <= num_experts_per_tok <= num_experts:
            raise ValueError(f"num_experts_per_tok={num_experts_per_tok} must be in [1, num_experts={num_experts}]")
        if expert_width is None:
            if d_ff % granularity:
                raise ValueError(f"granularity={granularity} must divide d_ff={d_ff} "
                                 f"(expert width = d_ff / granularity)")
            expert_width = d_ff // granularity
        if not routed_scaling_factor > 0:
            raise ValueError(f"routed_scaling_factor={routed_scaling_factor} must be > 0")
        self.d_model = d_model
        self.routed_scaling_factor = routed_scaling_factor
        self.capacity_factor = capacity_factor
        self.balance_loss_weight = balance_loss_weight
        self.z_loss_weight = z_loss_weight
        self.entropy_loss_weight = entropy_loss_weight
        self.router = make_router(router, d_model, num_experts, num_experts_per_tok, renormalize=renormalize,
                                  jitter=jitter, top_p=top_p, min_experts_per_tok=min_experts_per_tok,
                                  bias_update_rate=bias_update_rate)
        self.experts = SwiGLUExperts(num_experts, d_model, expert_width, impl=impl)
        shared_width = shared_width if shared_width is not None else n_shared_experts * expert_width
        # Shared experts are always on, so they are one SwiGLU of their summed width (DeepSeek-MoE).
        self.shared = SwiGLU(d_model, shared_width, linear, linear_kwargs) if shared_width else None
        # Qwen-MoE scales the shared output by sigmoid(gate(x)) per token.
        gated = self.shared is not None and shared_expert_gate
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if gated else None
        self.last_aux_losses: dict[str, torch.Tensor] = {}
        self.last_metrics: dict[str, torch.Tensor] = {}
        self.last_tokens_per_expert: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        """Routed experts."""
        return self.experts.num_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Route every token of (..., d) to its experts; returns (..., d)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (T, d)
        routing = self.router(x)
        capacity = None
        if self.capacity_factor is not None:
            capacity = capacity_for(self.capacity_factor, x.shape[0], self.router.num_experts_per_tok, self.num_experts)
        out, plan = self.experts(x, routing.weights, routing.experts, capacity)
        if self.routed_scaling_factor != 1.0:
            out = out * self.routed_scaling_factor
        if self.shared is not None:
            shared = self.shared(x)
            if self.shared_gate is not None:
                shared = shared * torch.sigmoid(self.shared_gate(x))
            out = out + shared
        self._record(routing, plan, x.shape[0])
        return out.view(shape)

    def _record(self, routing, plan, num_tokens: int) -> None:
        """Set last_aux_losses (weighted), last_metrics and last_tokens_per_expert from this forward."""
        if plan is not None:
            per_expert, kept = plan.tokens_per_expert, plan.kept_per_expert.sum()
        else:
            routed = routing.experts[routing.experts >= 0]
            per_expert = torch.bincount(routed, minlength=self.num_experts)
            kept = per_expert.sum()
        losses = {}
        if self.balance_loss_weight:
            losses["moe_balance_loss"] = self.balance_loss_weight * load_balancing_loss(routing.probs, per_expert)
        if self.z_loss_weight:
            losses["moe_z_loss"] = self.z_loss_weight * router_z_loss(routing.logits)
        if self.entropy_loss_weight:
            losses["moe_entropy_loss"] = self.entropy_loss_weight * router_entropy_loss(routing.probs)
        self.last_aux_losses = losses
        self.last_tokens_per_expert = per_expert.detach()
        self.last_metrics = load_statistics(per_expert, kept, num_tokens)

    # ---- cost --------------------------------------------------------------------------------
    def mean_experts_per_tok(self) -> float:
        """Routed experts per token at the current setting (for top-p: measured in the last forward)."""
        return self.router.mean_experts_per_tok()

    def flops_per_token(self) -> int:
        """Forward FLOPs per token: router, the active routed experts, their weighted sum, shared experts."""
        d = self.d_model
        k = self.mean_experts_per_tok()
        flops = 2 * d * self.num_experts + k * (self.experts.flops_per_token() + 2 * d)
        flops += d if self.routed_scaling_factor != 1.0 else 0
        if self.shared is not None:
            flops += self.shared.flops_per_token() + (2 * d + d if self.shared_gate is not None else 0)
        return round(flops)

    def inactive_params_per_token(self) -> int:
        """Parameters of the routed experts that a token does not use (on average, for top-p)."""
        return round((self.num_experts - self.mean_experts_per_tok()) * self.experts.params_per_expert())


def moe_layers(model: nn.Module) -> list[MoEMLP]:
    """Every MoEMLP in `model`, in module order (layer order for the zoo's LM)."""
    return [m for m in model.modules() if isinstance(m, MoEMLP)]


def set_num_experts_per_tok(model: nn.Module, k: int, layers: list[int] | None = None) -> None:
    """Route with k experts per token from now on (the largest k for top-p), in all MoE layers or `layers`.

    The model's config (`num_experts_per_tok`, or `num_experts_per_tok_by_layer` for some layers) is kept
    in step, so that `cost()` and a later `save_pretrained` record the new k.
    """
    found = moe_layers(model)
    chosen = range(len(found)) if layers is None else layers
    for i in chosen:
        if not 0 <= i < len(found):
            raise ValueError(f"layer {i} does not exist: the model has {len(found)} MoE layers")
        router = found[i].router
        if not 1 <= k <= router.num_experts:
            raise ValueError(f"num_experts_per_tok={k} must be in [1, num_local_experts={router.num_experts}]")
        if isinstance(router, TopPRouter) and k < router.min_experts_per_tok:
            raise ValueError(f"num_experts_per_tok={k} must be >= the top-p router's minimum "
                             f"{router.min_experts_per_tok} (moe_min_experts_per_tok)")
    for i in chosen:
        found[i].router.num_experts_per_tok = k
        if isinstance(found[i].router, TopPRouter):
            found[i].router.last_mean_experts = None
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_experts_per_tok"):
        per_layer = [m.router.num_experts_per_tok for m in found]
        if len(set(per_layer)) == 1:
            config.num_experts_per_tok, config.num_experts_per_tok_by_layer = per_layer[0], None
        else:
            config.num_experts_per_tok_by_layer = per_layer


def set_top_p(model: nn.Module, top_p: float) -> None:
    """Use probability mass `top_p` in every top-p router of `model` (and its config's moe_top_p)."""
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    routers = [m.router for m in moe_layers(model) if isinstance(m.router, TopPRouter)]
    if not routers:
        raise ValueError("the model has no top-p router (moe_router='top_p')")
    for router in routers:
        router.top_p, router.last_mean_experts = top_p, None
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "moe_top_p"):
        config.moe_top_p = top_p


def collect_metrics(model: nn.Module) -> dict[str, float]:
    """The MoE layers' last_metrics averaged over layers, as floats (for a training log)."""
    found = [m.last_metrics for m in moe_layers(model) if m.last_metrics]
    if not found:
        return {}
    return {name: sum(float(m[name]) for m in found) / len(found) for name in found[0]}
