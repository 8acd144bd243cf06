"""Routers: a token's hidden state -> which experts it uses and with what weights.

Every router returns a `Routing` of fixed width K: `experts[t, j] = -1` marks an unused slot
(top-p routing uses fewer than K experts for some tokens), and its weight is 0. The router
always computes in fp32 (ST-MoE: router logits in low precision destabilise training).

- softmax_topk: softmax over experts, keep the k largest (Mixtral; optional renormalisation).
- sigmoid_topk: sigmoid affinities, select the top k of affinity + a per-expert bias that a
  no-gradient rule moves towards balance (DeepSeek-V3's auxiliary-loss-free balancing); the
  weights are the selected affinities (normalised), the bias only affects the selection.
- top_p: softmax, then the smallest set of experts whose probability mass reaches p, between
  min_k and k experts ("Harder Tasks Need More Experts: Dynamic Routing in MoE Models").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    """One router decision for T tokens, K slots each."""

    weights: torch.Tensor  # (T, K) fp32 combine weights, 0 in unused slots
    experts: torch.Tensor  # (T, K) int64 expert ids, -1 in unused slots
    logits: torch.Tensor  # (T, E) fp32 router logits (z-loss)
    probs: torch.Tensor  # (T, E) fp32 router probabilities (load-balancing loss)


class Router(nn.Module):
    """Linear scores over experts, computed in fp32, with optional multiplicative input jitter in training."""

    def __init__(self, d_model: int, num_experts: int, num_experts_per_tok: int, jitter: float = 0.0):
        super().__init__()
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.jitter = jitter
        self.proj = nn.Linear(d_model, num_experts, bias=False)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(T, d) -> (T, E) fp32 logits; in training the input is scaled by U(1 - jitter, 1 + jitter) (Switch)."""
        x = x.float()
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x, self.proj.weight.float())

    @property
    def max_experts_per_tok(self) -> int:
        """K, the width of the Routing this router returns."""
        return self.num_experts_per_tok

    def mean_experts_per_tok(self) -> float:
        """Experts a token uses on average (k for the fixed-k routers)."""
        return float(self.num_experts_per_tok)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, num_experts_per_tok={self.num_experts_per_tok}, jitter={self.jitter}"


class SoftmaxTopKRouter(Router):
    """Softmax over experts, keep the top k; renormalise the k weights to sum to 1 if asked (Mixtral)."""

    def __init__(self, d_model: int, num_experts: int, num_experts_per_tok: int, *, renormalize: bool = True,
                 jitter: float = 0.0):
        super().__init__(d_model, num_experts, num_experts_per_tok, jitter)
        self.renormalize = renormalize

    def forward(self, x: torch.Tensor) -> Routing:
        """Route (T, d) tokens."""
        logits = self.logits(x)
        probs = logits.softmax(-1)
        weights, experts = probs.topk(self.num_experts_per_tok, dim=-1)  # (T, k)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return Routing(weights, experts, logits, probs)


class SigmoidTopKRouter(Router):
    """Sigmoid affinities; top k of affinity + balance bias; bias nudged by `bias_update_rate` each training step."""

    def __init__(self, d_model: int, num_experts: int, num_experts_per_tok: int, *, renormalize: bool = True,
                 jitter: float = 0.0, bias_update_rate: float = 1e-3):
        super().__init__(d_model, num_experts, num_experts_per_tok, jitter)
        self.renormalize = renormalize
        self.bias_update_rate = bias_update_rate
        # Selection bias (DeepSeek-V3): part of the state dict, never trained by gradients.
        self.register_buffer("bias", torch.zeros(num_experts))

    def init_weights_(self, std: float) -> None:
        """Zero the balance bias (the projection is an nn.Linear, initialised by the model)."""
        if not getattr(self.bias, "_is_hf_initialized", False):
            with torch.no_grad():
                self.bias.zero_()

    def forward(self, x: torch.Tensor) -> Routing:
        """Route (T, d) tokens; in training, move the bias towards a balanced load."""
        logits = self.logits(x)
        scores = torch.sigmoid(logits)  # (T, E)
        experts = (scores + self.bias).topk(self.num_experts_per_tok, dim=-1).indices  # (T, k)
        weights = scores.gather(1, experts)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        if self.training and self.bias_update_rate > 0:
            with torch.no_grad():
                load = torch.bincount(experts.flatten(), minlength=self.num_experts).float()
                self.bias += self.bias_update_rate * torch.sign(load.mean() - load)
        probs = scores / scores.sum(-1, keepdim=True)  # normalised affinities, for the balance loss
        return Routing(weights, experts, logits, probs)


class TopPRouter(Router):
    """Softmax; the smallest set of experts whose mass reaches top_p, at least min_k and at most k experts."""

    def __init__(self, d_model: int, num_experts: int, num_experts_per_tok: int, *, top_p: float = 0.5,
                 min_experts_per_tok: int = 1, renormalize: bool = True, jitter: float = 0.0):
        super().__init__(d_model, num_experts, num_experts_per_tok, jitter)
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p={top_p} must be in (0, 1]")
        if not 1 <= min_experts_per_tok <= num_experts_per_tok:
            raise ValueError(f"min_experts_per_tok={min_experts_per_tok} must be in [1, num_experts_per_tok="
                             f"{num_experts_per_tok}]")
        self.top_p = top_p
        self.min_experts_per_tok = min_experts_per_tok
        self.renormalize = renormalize
        self.last_mean_experts: float | None = None  # measured in the last forward

    def forward(self, x: torch.Tensor) -> Routing:
        """Route (T, d) tokens to between min_k and k experts each."""
        logits = self.logits(x)
        probs = logits.softmax(-1)
        top, experts = probs.topk(self.num_experts_per_tok, dim=-1)  # (T, K), sorted descending
        mass_before = top.cumsum(-1) - top  # probability mass of the experts ranked above each slot
        n = (mass_before < self.top_p).sum(-1).clamp(self.min_experts_per_tok, self.num_experts_per_tok)  # (T,)
        used = torch.arange(top.shape[1], device=x.device) < n.unsqueeze(1)  # (T, K)
        weights = top * used
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        self.last_mean_experts = float(n.float().mean()) if n.numel() else None
        return Routing(weights, experts.masked_fill(~used, -1), logits, probs)

    def mean_experts_per_tok(self) -> float:
        """Mean experts per token in the last forward; before any forward, the largest k (worst case)."""
        return self.last_mean_experts if self.last_mean_experts is not None else float(self.num_experts_per_tok)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, top_p={self.top_p}, min_experts_per_tok={self.min_experts_per_tok}"


ROUTERS: dict[str, type[Router]] = {
    "softmax_topk": SoftmaxTopKRouter,
    "sigmoid_topk": SigmoidTopKRouter,
    "top_p": TopPRouter,
}


def make_router(kind: str, d_model: int, num_experts: int, num_experts_per_tok: int, *, renormalize: bool = True,
                jitter: float = 0.0, top_p: float = 0.5, min_experts_per_tok: int = 1,
                bias_update_rate: float = 1e-3) -> Router:
    """Build the router `kind` with the options it uses."""
    if kind not in ROUTERS:
        raise ValueError(f"unknown router kind {kind!r}; known kinds: {sorted(ROUTERS)}")
    options: dict = {"renormalize": renormalize, "jitter": jitter}
    if kind == "sigmoid_topk":
        options["bias_update_rate"] = bias_update_rate
    if kind == "top_p":
        options.update(top_p=top_p, min_experts_per_tok=min_experts_per_tok)
    return ROUTERS[kind](d_model, num_experts, num_experts_per_tok, **options)
