"""Norm kinds, chosen by name in a model config (`norm="rms"`): RMSNorm, Gemma's (1 + w) RMSNorm, LayerNorm."""

from __future__ import annotations

import torch
from torch import nn

from layers.registry import Registry


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned scale (no bias, no mean subtraction): x / rms(x) * w."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def scale(self) -> torch.Tensor:
        """The factor the normalised input is multiplied by (float32)."""
        return self.weight.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 so bf16 activations keep their precision.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.scale()).to(x.dtype)


class UnitOffsetRMSNorm(RMSNorm):
    """Gemma's RMSNorm: x / rms(x) * (1 + w), so that w = 0 (its initialisation) is the identity."""

    def scale(self) -> torch.Tensor:
        return 1.0 + self.weight.float()


class LayerNorm(nn.LayerNorm):
    """LayerNorm with weight and bias (GPT-2), computed in float32 for low-precision activations."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                                        self.eps).to(x.dtype)


KINDS = Registry("norm kind", {"rms": RMSNorm, "rms_unit_offset": UnitOffsetRMSNorm, "layer": LayerNorm})


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """Build the norm kind `kind` (a name in KINDS) over the last `dim` features."""
    return KINDS[kind](dim, eps)
