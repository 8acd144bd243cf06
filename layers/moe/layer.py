"""MoEMLP, the `mlp="moe"` kind: a router, routed SwiGLU experts and optional always-on shared experts.

Its options are `layers.moe.MoEOptions` (the LM config's `mlp_kwargs`). The forward is pure: it
returns the output and a `LayerReport` with the weighted router losses, the load metrics (entropy,
max load, dropped fraction, mean active experts) and the step statistic `tokens_per_expert`,
which the trainer sums over micro-batches and ranks and hands to `on_optimizer_step` once per
optimizer step (the sigmoid router's balance bias moves there). The k used at inference can be
changed on a built model with `set_num_experts_per_tok` (or the top-p threshold with `set_top_p`),
methods of the zoo LM that keep its config in step.
"""

from __future__ import annotations

import torch
from torch import nn

from layers.mlp import SwiGLU
from layers.moe.experts import SwiGLUExperts, capacity_for
from layers.moe.losses import load_balancing_loss, load_statistics, router_entropy_loss, router_z_loss
from layers.moe.options import MoEOptions
from layers.moe.routers import ROUTERS, TopPRouter
from layers.report import LayerReport


class MoEMLP(nn.Module):
    """Mixture-of-Experts SwiGLU MLP: (..., d_model) -> (..., d_model), dropless unless capacity_factor is set."""

    options_class = MoEOptions

    def __init__(self, d_model: int, d_ff: int, *, linear: str = "dense", linear_kwargs: dict | None = None,
                 layer_idx: int | None = None, **options):
        super().__init__()
        o = MoEOptions.from_kwargs(options)
        self.options = o
        self.d_model = d_model
        width = o.expert_width(d_ff)
        self.router = ROUTERS[o.router](d_model, o.num_experts, o.k_for_layer(layer_idx),
                                        norm_topk_prob=o.norm_topk_prob, jitter=o.router_jitter_noise,
                                        **o.router_kwargs)
        self.experts = SwiGLUExperts(o.num_experts, d_model, width, impl=o.impl)
        shared_width = o.shared_expert_intermediate_size
        shared_width = shared_width if shared_width is not None else o.n_shared_experts * width
        # Shared experts are always on, so they are one SwiGLU of their summed width (DeepSeek-MoE).
        self.shared = SwiGLU(d_model, shared_width, linear, linear_kwargs) if shared_width else None
        # Qwen-MoE scales the shared output by sigmoid(gate(x)) per token.
        gated = self.shared is not None and o.shared_expert_gate
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if gated else None

    @classmethod
    def check_config(cls, kwargs: dict, *, d_ff: int, n_layers: int, mlp_linear: str) -> None:
        """Validate `mlp_kwargs` and their combination with the LM's fields (config time)."""
        MoEOptions.from_kwargs(kwargs).check_model(d_ff=d_ff, n_layers=n_layers, mlp_linear=mlp_linear)

    @property
    def num_experts(self) -> int:
        """Routed experts."""
        return self.experts.num_experts

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, LayerReport]:
        """Route every token of (..., d) to its experts; returns (..., d) and the layer's report."""
        o = self.options
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (T, d)
        routing = self.router(x)
        capacity = None
        if o.capacity_factor is not None:
            capacity = capacity_for(o.capacity_factor, x.shape[0], self.router.num_experts_per_tok, self.num_experts)
        out, plan = self.experts(x, routing.weights, routing.experts, capacity)
        if o.routed_scaling_factor != 1.0:
            out = out * o.routed_scaling_factor
        if self.shared is not None:
            shared = self.shared(x)
            if self.shared_gate is not None:
                shared = shared * torch.sigmoid(self.shared_gate(x))
            out = out + shared
        return out.view(shape), self._report(routing, plan, x.shape[0])

    def _report(self, routing, plan, num_tokens: int) -> LayerReport:
        """The weighted router losses, load metrics and routed assignments per expert of this forward."""
        o = self.options
        if plan is not None:
            per_expert, kept = plan.tokens_per_expert, plan.kept_per_expert.sum()
        else:
            routed = routing.experts[routing.experts >= 0]
            per_expert = torch.bincount(routed, minlength=self.num_experts)
            kept = per_expert.sum()
        losses = {}
        if o.router_aux_loss_coef:
            losses["moe_balance_loss"] = o.router_aux_loss_coef * load_balancing_loss(routing.probs, per_expert)
        if o.router_z_loss_coef:
            losses["moe_z_loss"] = o.router_z_loss_coef * router_z_loss(routing.logits)
        if o.router_entropy_loss_coef:
            losses["moe_entropy_loss"] = o.router_entropy_loss_coef * router_entropy_loss(routing.probs)
        return LayerReport(aux_losses=losses, metrics=load_statistics(per_expert, kept, num_tokens),
                           stats={"tokens_per_expert": per_expert.detach()}, outputs={"router_logits": routing.logits})

    @torch.no_grad()
    def on_optimizer_step(self, stats: dict[str, torch.Tensor], step: int) -> None:
        """Once per optimizer step, with the step's global routed assignments: the router's balance update."""
        if "tokens_per_expert" in stats:
            self.router.update_balance(stats["tokens_per_expert"])

    # ---- cost --------------------------------------------------------------------------------
    def flops_per_token(self, mean_experts_per_tok: float | None = None) -> int:
        """Forward FLOPs per token: router, the active routed experts, their weighted sum, shared experts.

        A top-p router's k varies per token: pass the mean measured on data (`moe_active_experts`), else
        its largest k counts (the worst case).
        """
        d = self.d_model
        k = self.router.num_experts_per_tok if mean_experts_per_tok is None else mean_experts_per_tok
        flops = 2 * d * self.num_experts + k * (self.experts.flops_per_token() + 2 * d)
        flops += d if self.options.routed_scaling_factor != 1.0 else 0
        if self.shared is not None:
            flops += self.shared.flops_per_token() + (2 * d + d if self.shared_gate is not None else 0)
        return round(flops)

    def inactive_params_per_token(self, mean_experts_per_tok: float | None = None) -> int:
        """Parameters of the routed experts that a token does not use (see flops_per_token for top-p)."""
        k = self.router.num_experts_per_tok if mean_experts_per_tok is None else mean_experts_per_tok
        return round((self.num_experts - k) * self.experts.params_per_expert())


def moe_layers(model: nn.Module) -> list[MoEMLP]:
    """Every MoEMLP in `model`, in module order (layer order for the zoo's LM)."""
    return [m for m in model.modules() if isinstance(m, MoEMLP)]


def set_num_experts_per_tok(layers: list[MoEMLP], k: int) -> None:
    """Route with k experts per token (the largest k for top-p) in these layers; the caller keeps its config."""
    for layer in layers:
        router = layer.router
        if not 1 <= k <= router.num_experts:
            raise ValueError(f"num_experts_per_tok={k} must be in [1, num_experts={router.num_experts}]")
        if isinstance(router, TopPRouter) and k < router.min_experts_per_tok:
            raise ValueError(f"num_experts_per_tok={k} must be >= the top-p router's minimum "
                             f"{router.min_experts_per_tok} (router_kwargs.min_experts_per_tok)")
    for layer in layers:
        layer.router.num_experts_per_tok = k


def set_top_p(layers: list[MoEMLP], top_p: float) -> None:
    """Use probability mass `top_p` in the top-p routers of these layers; the caller keeps its config."""
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} must be in (0, 1]")
    routers = [m.router for m in layers if isinstance(m.router, TopPRouter)]
    if not routers:
        raise ValueError("the model has no top-p router (mlp_kwargs.router='top_p')")
    for router in routers:
        router.top_p = top_p
