"""MLP kinds, chosen by name in a model config (`mlp="swiglu"`; MoE registers `moe`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from layers.linear import make_linear
from layers.registry import Registry


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), the LLaMA-style gated MLP."""

    def __init__(self, d_model: int, d_ff: int, linear: str = "dense", linear_kwargs: dict | None = None,
                 layer_idx: int | None = None):
        super().__init__()
        kw = linear_kwargs or {}
        self.gate = make_linear(linear, d_model, d_ff, **kw)
        self.up = make_linear(linear, d_model, d_ff, **kw)
        self.down = make_linear(linear, d_ff, d_model, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))

    def flops_per_token(self) -> int:
        """Forward FLOPs per token: the three projections plus the gate's elementwise product."""
        d_ff = self.up.out_features
        return self.gate.flops_per_token() + self.up.flops_per_token() + self.down.flops_per_token() + d_ff


KINDS = Registry("MLP kind", {"swiglu": SwiGLU})
