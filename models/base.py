"""What every zoo model shares on top of transformers' PreTrainedModel: a model card on save, and the
step contract with the trainer.

The step contract (DESIGN.md "Forward is pure"): a training forward changes no module state. What
a per-step update needs leaves the forward in `output.step_stats`, a dict of detached tensors that
the trainer sums over micro-batches and data-parallel ranks (keys ending in "_min" / "_max" are
reduced by minimum / maximum instead); after the optimizer step it calls
`model.after_optimizer_step(stats, step)` once, which makes the update (router balance bias,
projection redraws, SAE decoder renormalisation and dead-latent counts) and returns metrics to log.
`output.metrics` holds 0-d tensors to log (averaged over micro-batches and ranks).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel

from models.card import render_model_card


def stat_reduction(key: str) -> str:
    """How step statistic `key` combines across micro-batches and ranks: "sum", "min" or "max"."""
    return "min" if key.endswith("_min") else "max" if key.endswith("_max") else "sum"


def merge_step_stats(into: dict[str, torch.Tensor], new: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Combine the step statistics of one more micro-batch into `into` (in place; also returned)."""
    for key, value in (new or {}).items():
        value = value.detach()
        if key not in into:
            into[key] = value.clone()
            continue
        how = stat_reduction(key)
        into[key] = into[key] + value if how == "sum" else (torch.minimum if how == "min" else torch.maximum)(
            into[key], value)
    return into


class ZooPreTrainedModel(PreTrainedModel):
    """PreTrainedModel whose save_pretrained also writes README.md, the model card."""

    def cost(self, seq_len: int | None = None) -> dict:
        """total_params, active_params (per token), flops_per_token (forward), seq_len."""
        raise NotImplementedError

    @torch.no_grad()
    def after_optimizer_step(self, stats: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        """The per-step updates, from the global `stats` of optimizer step `step` (1-based); returns metrics."""
        return {}

    def save_pretrained(self, save_directory, *args, training: dict | None = None, **kwargs):
        """Write config.json + model.safetensors (never pickle) + README.md with `training` facts."""
        kwargs.setdefault("safe_serialization", True)
        super().save_pretrained(save_directory, *args, **kwargs)
        card = render_model_card(self.config, self.cost(), training)
        (Path(save_directory) / "README.md").write_text(card, encoding="utf-8")
