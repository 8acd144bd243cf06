"""Router losses and expert-load statistics.

- load_balancing_loss (Switch Transformer): E * sum_i f_i * P_i, where f_i is the fraction of the
  routed assignments that went to expert i and P_i the mean router probability of expert i.
  It is 1 for a perfectly balanced router and E when every token goes to one expert.
- router_z_loss (ST-MoE): mean over tokens of logsumexp(logits)^2; keeps the logits small.
- router_entropy_loss ("Harder Tasks Need More Experts"): mean entropy of the router distribution;
  with top-p routing a flat distribution means many experts, so this keeps k small.
"""

from __future__ import annotations

import math

import torch


def load_balancing_loss(probs: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Switch balance loss from (T, E) router probabilities and (E,) routed assignments per expert."""
    num_experts = probs.shape[-1]
    fraction = tokens_per_expert.to(probs.dtype) / tokens_per_expert.sum().clamp(min=1)  # f_i, no gradient
    return num_experts * torch.dot(fraction, probs.mean(0))


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean over the (T, E) logits' tokens of logsumexp^2."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def router_entropy_loss(probs: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the (T, E) router distributions."""
    return -(probs * probs.clamp(min=1e-12).log()).sum(-1).mean()


@torch.no_grad()
def load_statistics(tokens_per_expert: torch.Tensor, kept: torch.Tensor, num_tokens: int) -> dict[str, torch.Tensor]:
    """Load statistics to log: normalised load entropy (1 = balanced), max / mean load, dropped fraction, mean k.

    tokens_per_expert (E,) counts the routed assignments, `kept` those that were computed (no capacity drop).
    """
    load = tokens_per_expert.float()
    total = load.sum().clamp(min=1)
    p = load / total
    entropy = -(p * p.clamp(min=1e-12).log()).sum()
    num_experts = load.numel()
    return {
        "moe_load_entropy": entropy / math.log(num_experts) if num_experts > 1 else entropy + 1,
        "moe_max_load": load.max() / (total / num_experts),
        "moe_dropped_fraction": 1.0 - kept.float() / total,
        "moe_active_experts": kept.float() / max(num_tokens, 1),
    }
