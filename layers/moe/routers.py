"""Routers: a token's hidden state -> which experts it uses and with what weights.

Every router returns a `Routing` of fixed width K: `experts[t, j] = -1` marks an unused slot
(top-p routing uses fewer than K experts for some tokens), and its weight is 0. The router
always computes in fp32 (ST-MoE: router logits in low precision destabilise training).

A router is one class and one line in ROUTERS. Its own options (beyond the shared
`norm_topk_prob` and `jitter`) are listed in `OPTIONS` as name -> (check, what is allowed); they
arrive from the config as `mlp_kwargs.router_kwargs` and are validated at config time by
`check_options`.

- softmax_topk: softmax over experts, keep the k largest (Mixtral; optional renormalisation).
- sigmoid_topk: sigmoid affinities, select the top k of affinity + a per-expert bias that a
  no-gradient rule moves towards balance (DeepSeek-V3's auxiliary-loss-free balancing); the
  weights are the selected affinities (normalised), the bias only affects the selection. The
  bias moves once per optimizer step, from the step's global load (`update_balance`), never
  inside forward.
- top_p: softmax, then the smallest set of experts whose probability mass reaches p, between
  min_k and k experts ("Harder Tasks Need More Experts: Dynamic Routing in MoE Models").
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from layers.registry import Registry


@dataclass
class Routing:
    """One router decision for T tokens, K slots each."""

    weights: torch.Tensor  # (T, K) fp32 combine weights, 0 in unused slots
    experts: torch.Tensor  # (T, K) int64 expert ids, -1 in unused slots
    logits: torch.Tensor  # (T, E) fp32 router logits (z-loss)
    probs: torch.Tensor  # (T, E) fp32 router probabilities (load-balancing loss)


def _fraction(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 < value <= 1


def _positive_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _rate(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value >= 0


class Router(nn.Module):
    """Linear scores over experts, computed in fp32, with optional multiplicative input jitter in training."""

    OPTIONS: dict = {}  # the router's own options: name -> (check(value) -> bool, what is allowed)

    def __init__(self, d_model: int, num_experts: int, num_experts_per_tok: int, *, norm_topk_prob: bool = True,
                 jitter: float = 0.0):
        super().__init__()
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.norm_topk_prob = norm_topk_prob
        self.jitter = jitter
        self.proj = nn.Linear(d_model, num_experts, bias=False)

    @classmethod
    def check_options(cls, options: dict, num_experts_per_tok: int) -> None:
        """A ValueError naming the first unknown or invalid option in `options` (mlp_kwargs.router_kwargs)."""
        for name, value in options.items():
            if name not in cls.OPTIONS:
                raise ValueError(f"config field 'mlp_kwargs.router_kwargs' has unknown option {name!r} for "
                                 f"{cls.__name__}; known: {sorted(cls.OPTIONS)}")
            ok, allowed = cls.OPTIONS[name]
            if not ok(value):
                raise ValueError(f"config field 'mlp_kwargs.router_kwargs.{name}' = {value!r} is invalid: {allowed}")

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(T, d) -> (T, E) fp32 logits; in training the input is scaled by U(1 - jitter, 1 + jitter) (Switch)."""
        x = x.float()
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x, self.proj.weight.float())

    def normalize(self, weights: torch.Tensor) -> torch.Tensor:
        """The chosen experts' weights, renormalised to sum to 1 when norm_topk_prob is set."""
        return weights / weights.sum(-1, keepdim=True) if self.norm_topk_prob else weights

    @property
    def max_experts_per_tok(self) -> int:
        """K, the width of the Routing this router returns."""
        return self.num_experts_per_tok

    def update_balance(self, tokens_per_expert: torch.Tensor) -> None:
        """Once per optimizer step, with the step's global routed assignments per expert (E,): nothing here."""

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, num_experts_per_tok={self.num_experts_per_tok}, jitter={self.jitter}"


def _group_options(num_experts: int, n_group: int, topk_group: int) -> None:
    if num_experts % n_group or not 1 <= topk_group <= n_group:
        raise ValueError(f"config field 'mlp_kwargs.router_kwargs': n_group={n_group} must divide "
                         f"num_experts={num_experts} and topk_group={topk_group} be in [1, n_group]")


def limit_to_groups(choice: torch.Tensor, n_group: int, topk_group: int, group_score: str) -> torch.Tensor:
    """Group-limited routing (DeepSeek): the experts form n_group equal groups, each group is scored by its
    best expert ("max", V2) or the sum of its two best ("top2", V3), and only the topk_group best groups of a
    token stay selectable; the others' scores become -inf. (T, E) -> (T, E)."""
    if n_group <= 1 or topk_group >= n_group:
        return choice
    grouped = choice.view(choice.shape[0], n_group, -1)  # (T, groups, E / groups)
    if group_score == "max":
        scores = grouped.max(-1).values
    else:
        scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(topk_group, -1).indices, True)
    return grouped.masked_fill(~keep[..., None], float("-inf")).view_as(choice)


_GROUP_OPTIONS = {"n_group": (_positive_int, "must be an integer >= 1 dividing num_experts"),
                  "topk_group": (_positive_int, "must be an integer in [1, n_group]")}


class SoftmaxTopKRouter(Router):
    """Softmax over experts, keep the top k; renormalise the k weights to sum to 1 if asked (Mixtral).

    Group-limited (DeepSeek-V2's group_limited_greedy): n_group groups scored by their best expert, the k
    experts come from the topk_group best groups.
    """

    OPTIONS = dict(_GROUP_OPTIONS)

    def __init__(self, d_model: int, num_experts: int, num_experts_per_tok: int, *, norm_topk_prob: bool = True,
                 jitter: float = 0.0, n_group: int = 1, topk_group: int = 1):
        super().__init__(d_model, num_experts, num_experts_per_tok, norm_topk_prob=norm_topk_prob, jitter=jitter)
        _group_options(num_experts, n_group, topk_group)
        self.n_group, self.topk_group = n_group, topk_group

    def forward(self, x: torch.Tensor) -> Routing:
        """Route (T, d) tokens."""
        logits = self.logits(x)
        probs = logits.softmax(-1)
        choice = limit_to_groups(probs, self.n_group, self.topk_group, "max")
        experts = choice.topk(self.num_experts_per_tok, dim=-1).indices  # (T, k)
        return Routing(self.normalize(probs.gather(1, experts)), experts, logits, probs)


class SigmoidTopKRouter(Router):
    """Sigmoid affinities; top k of affinity + balance bias; the bias moves by `bias_update_rate` per optimizer step.

    Group-limited routing (DeepSeek-V3): with n_group > 1 the experts form n_group equal groups, a group scores
    the sum of its two best (affinity + bias), and a token's k experts come from its topk_group best groups.
    """

    OPTIONS = {"bias_update_rate": (_rate, "must be a number >= 0"), **_GROUP_OPTIONS}

    def __init__(self, d_model: int, num_experts: int, num_experts_per_tok: int, *, norm_topk_prob: bool = True,
                 jitter: float = 0.0, bias_update_rate: float = 1e-3, n_group: int = 1, topk_group: int = 1):
        super().__init__(d_model, num_experts, num_experts_per_tok, norm_topk_prob=norm_topk_prob, jitter=jitter)
        _group_options(num_experts, n_group, topk_group)
        self.bias_update_rate = bias_update_rate
        self.n_group, self.topk_group = n_group, topk_group
        # Selection bias (DeepSeek-V3): part of the state dict, never trained by gradients.
        self.register_buffer("bias", torch.zeros(num_experts))

    def init_weights_(self, std: float) -> None:
        """Zero the balance bias (the projection is an nn.Linear, initialised by the model)."""
        if not getattr(self.bias, "_is_hf_initialized", False):
            with torch.no_grad():
                self.bias.zero_()

    def forward(self, x: torch.Tensor) -> Routing:
        """Route (T, d) tokens (pure: the bias moves in update_balance)."""
        logits = self.logits(x)
        scores = torch.sigmoid(logits)  # (T, E)
        choice = limit_to_groups(scores + self.bias, self.n_group, self.topk_group, "top2")
        experts = choice.topk(self.num_experts_per_tok, dim=-1).indices  # (T, k)
        weights = self.normalize(scores.gather(1, experts))
        probs = scores / scores.sum(-1, keepdim=True)  # normalised affinities, for the balance loss
        return Routing(weights, experts, logits, probs)

    @torch.no_grad()
    def update_balance(self, tokens_per_expert: torch.Tensor) -> None:
        """Move the bias towards a balanced load: + rate for under-loaded experts, - rate for over-loaded ones."""
        if self.bias_update_rate > 0:
            load = tokens_per_expert.to(self.bias.device).float()
            self.bias += self.bias_update_rate * torch.sign(load.mean() - load)


class TopPRouter(Router):
    """Softmax; the smallest set of experts whose mass reaches top_p, at least min_k and at most k experts."""

    OPTIONS = {"top_p": (_fraction, "must be in (0, 1]"),
               "min_experts_per_tok": (_positive_int, "must be an integer >= 1 and <= num_experts_per_tok")}

    @classmethod
    def check_options(cls, options: dict, num_experts_per_tok: int) -> None:
        """As Router.check_options, and min_experts_per_tok <= every layer's k."""
        super().check_options(options, num_experts_per_tok)
        min_k = options.get("min_experts_per_tok", 1)
        if min_k > num_experts_per_tok:
            raise ValueError(f"config field 'mlp_kwargs.router_kwargs.min_experts_per_tok' = {min_k!r} is invalid: "
                             f"must be <= num_experts_per_tok={num_experts_per_tok} (top_p routing uses between "
                             f"these many experts)")

    def __init__(self, d_model: int, num_experts: int, num_experts_per_tok: int, *, norm_topk_prob: bool = True,
                 jitter: float = 0.0, top_p: float = 0.5, min_experts_per_tok: int = 1):
        super().__init__(d_model, num_experts, num_experts_per_tok, norm_topk_prob=norm_topk_prob, jitter=jitter)
        self.check_options({"top_p": top_p, "min_experts_per_tok": min_experts_per_tok}, num_experts_per_tok)
        self.top_p = top_p
        self.min_experts_per_tok = min_experts_per_tok

    def forward(self, x: torch.Tensor) -> Routing:
        """Route (T, d) tokens to between min_k and k experts each."""
        logits = self.logits(x)
        probs = logits.softmax(-1)
        top, experts = probs.topk(self.num_experts_per_tok, dim=-1)  # (T, K), sorted descending
        mass_before = top.cumsum(-1) - top  # probability mass of the experts ranked above each slot
        n = (mass_before < self.top_p).sum(-1).clamp(self.min_experts_per_tok, self.num_experts_per_tok)  # (T,)
        used = torch.arange(top.shape[1], device=x.device) < n.unsqueeze(1)  # (T, K)
        return Routing(self.normalize(top * used), experts.masked_fill(~used, -1), logits, probs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, top_p={self.top_p}, min_experts_per_tok={self.min_experts_per_tok}"


ROUTERS = Registry("router", {
    "softmax_topk": SoftmaxTopKRouter,
    "sigmoid_topk": SigmoidTopKRouter,
    "top_p": TopPRouter,
})
