"""LayerReport: what a layer's forward hands back besides its output (no module attribute is written).

- aux_losses: weighted auxiliary losses (the model sums them over layers and adds them to its loss);
- metrics: 0-d tensors to log (the model averages them over layers);
- stats: step statistics, keyed locally (the model prefixes the layer's module path); the trainer
  sums them over micro-batches and ranks (models.base.merge_step_stats) and hands them back to
  the layer's `on_optimizer_step(stats, step)` once per optimizer step;
- outputs: tensors a caller may ask the model for (an MoE layer's "router_logits").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerReport:
    """Auxiliary losses, metrics and step statistics of one layer's forward."""

    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
