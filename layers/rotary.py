"""Rotary position embeddings (RoPE), rotate-half convention."""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Returns (cos, sin) for given positions; `apply_rotary` rotates queries and keys with them."""

    def __init__(self, head_dim: int, theta: float = 10000.0, inv_freq: torch.Tensor | None = None,
                 attention_scaling: float = 1.0):
        """The frequencies are theta^(-2i / head_dim), or `inv_freq` (head_dim / 2,) when given (scaled RoPE
        variants); `attention_scaling` multiplies cos and sin (YaRN's factor)."""
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        if inv_freq is None:
            inv_freq = default_frequencies(head_dim, theta)
        if inv_freq.shape != (head_dim // 2,):
            raise ValueError(f"inv_freq must have head_dim / 2 = {head_dim // 2} entries, got {tuple(inv_freq.shape)}")
        self.attention_scaling = attention_scaling
        # Not a parameter and not saved: it is a function of the config.
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: (batch, seq) -> cos, sin: (batch, 1, seq, head_dim)
        freqs = positions.float()[..., None] * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]
        cos, sin = emb.cos(), emb.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def default_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """RoPE's inverse frequencies theta^(-2i / head_dim), i < head_dim / 2 (float32)."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x: (batch, heads, seq, head_dim) by the angles in cos/sin: (batch, 1, seq, head_dim)."""
    return x * cos + _rotate_half(x) * sin
