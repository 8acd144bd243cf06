"""Sliding-window (local) attention, Longformer style: each query sees the keys within `window` positions.

Causal: query p sees keys p - window < j <= p. Non-causal: |p - j| < window. The PyTorch path is
blockwise: queries go in blocks of `block`, and each block reads the `block + window - 1` keys
(`+ window - 1` more when non-causal) it can reach, so time and memory are O(n * window) and no
n x n tensor exists. flash-attn's `window_size` runs instead where it can.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from layers import kernels
from layers.attention.common import check_qkv, repeat_kv_heads


@dataclass(frozen=True)
class WindowLayout:
    """How q_len queries at positions offset..k_len-1 split into blocks that each read `span` keys."""

    q_len: int
    k_len: int
    window: int
    block: int
    causal: bool

    @property
    def offset(self) -> int:
        return self.k_len - self.q_len  # the queries are the last q_len positions

    @property
    def left(self) -> int:
        return self.window - 1

    @property
    def right(self) -> int:
        return 0 if self.causal else self.window - 1

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.q_len / self.block)

    @property
    def span(self) -> int:
        return self.block + self.left + self.right


def window_layout(q_len: int, k_len: int, window: int, causal: bool, block: int | None = None) -> WindowLayout:
    """The block layout for `window`; the block defaults to the window (Longformer's chunks)."""
    block = max(1, min(block or window, q_len))
    return WindowLayout(q_len, k_len, window, block, causal)


def query_windows(x: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
    """Queries (b, h, q_len, D) -> (b, h, n_blocks, block, D), zero-padded at the end."""
    pad = layout.n_blocks * layout.block - layout.q_len
    x = F.pad(x, (0, 0, 0, pad))
    return x.view(*x.shape[:2], layout.n_blocks, layout.block, x.shape[-1])


def key_windows(x: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
    """Keys (b, h, k_len, D) -> (b, h, n_blocks, span, D): the keys each query block can reach."""
    lo = layout.left
    hi = layout.offset + layout.n_blocks * layout.block + layout.right - layout.k_len
    x = F.pad(x, (0, 0, lo, hi))  # padded row t holds key position t - left
    # block i starts at padded row offset + i * block; unfold puts the window last. The copy is
    # O(n * span / block) rows, and matmuls on the overlapping view would take a slow strided path.
    return x[:, :, layout.offset :].unfold(2, layout.span, layout.block).transpose(-1, -2).contiguous()


def window_mask(layout: WindowLayout, key_padding_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """(1 or b, 1, n_blocks, block, span) bool: True where a query may attend to a key of its window."""
    a = torch.arange(layout.block, device=device)[:, None]
    c = torch.arange(layout.span, device=device)[None, :]
    diff = a - c + layout.left  # query position - key position, the same in every block
    allowed = (diff <= layout.left) & (diff >= -layout.right)  # (block, span)
    starts = layout.offset + torch.arange(layout.n_blocks, device=device)[:, None] * layout.block
    key_pos = starts - layout.left + c  # (n_blocks, span)
    allowed = allowed & ((key_pos >= 0) & (key_pos < layout.k_len))[:, None, :]  # (n_blocks, block, span)
    allowed = allowed[None, None]
    if key_padding_mask is not None:
        real = key_windows(key_padding_mask[:, None, :, None].float(), layout)[..., 0] > 0  # (b, 1, n_blocks, span)
        allowed = allowed & real[:, :, :, None, :]
    # Every query may see its own position, so no row is empty (padding queries included; never read).
    return allowed | (diff == 0)


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """Exact softmax attention restricted to a sliding window, blockwise (never an n x n tensor)."""
    check_qkv(q, k, v)
    k, v = repeat_kv_heads(q, k, v)
    layout = window_layout(q.shape[-2], k.shape[-2], window, causal, block)
    qb = query_windows(q, layout)  # (b, h, n_blocks, block, d)
    kb, vb = key_windows(k, layout), key_windows(v, layout)  # (b, h, n_blocks, span, d)
    scores = qb @ kb.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (b, h, n_blocks, block, span)
    scores = scores.masked_fill(~window_mask(layout, key_padding_mask, q.device), float("-inf"))
    out = scores.softmax(-1) @ vb  # (b, h, n_blocks, block, d)
    return out.flatten(2, 3)[:, :, : q.shape[-2]]


def local_flops_per_token(head_dim: int, seq_len: int, window: int, causal: bool) -> float:
    """Forward FLOPs per query and head of `local_attention` at prefill: q.k and p.v over each block's span."""
    layout = window_layout(seq_len, seq_len, window, causal)
    computed = layout.n_blocks * layout.block * layout.span  # score entries, masked ones included
    return 4 * head_dim * computed / seq_len


def local_attention_weights(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, causal: bool = True,
                            key_padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same attention as local_attention written out densely: (output, weights (b, h, q_len, k_len)),
    zero outside each query's window. O(n^2) memory: for inspecting the weights, not for long sequences."""
    from layers.attention.dense import attention_mask

    check_qkv(q, k, v)
    k, v = repeat_kv_heads(q, k, v)
    q_len, k_len = q.shape[-2], k.shape[-2]
    diff = (torch.arange(q_len, device=q.device)[:, None] + (k_len - q_len)) - torch.arange(k_len, device=q.device)
    allowed = (diff < window) & (diff > -window)  # (q_len, k_len): query position - key position
    if causal:
        allowed = allowed & (diff >= 0)
    padding = attention_mask(q_len, k_len, False, key_padding_mask, q.device)
    allowed = allowed if padding is None else allowed & padding
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    weights = scores.masked_fill(~allowed, float("-inf")).float().softmax(-1).to(q.dtype)
    return weights @ v, weights


class LocalAttention(nn.Module):
    """Sliding-window attention of width `window` (flash-attn's window_size where it can run)."""

    OPTIONS_AT_CALL = ("return_weights",)  # keywords a caller may add: see DenseAttention

    def __init__(self, head_dim: int, window: int = 128):
        super().__init__()
        if window < 1:
            raise ValueError(f"local attention: window = {window} is invalid: must be >= 1")
        self.head_dim, self.window = head_dim, window

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool = True,
        key_padding_mask: torch.Tensor | None = None,
        return_weights: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """q: (batch, heads, q_len, head_dim); k, v: (batch, kv_heads, k_len, head_dim); queries are the last q_len.

        return_weights: also the (batch, heads, q_len, k_len) weights (dense, zero outside the window).
        """
        if return_weights:
            return local_attention_weights(q, k, v, self.window, causal, key_padding_mask)
        if key_padding_mask is None and kernels.can_use_flash_attn(q):
            from flash_attn import flash_attn_func

            w = self.window - 1
            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                                  window_size=(w, 0 if causal else w))
            return out.transpose(1, 2)
        return local_attention(q, k, v, self.window, causal, key_padding_mask)

    def flops_per_token(self, seq_len: int, causal: bool = True) -> float:
        """Forward FLOPs per query token and head, as the blockwise path computes them."""
        return local_flops_per_token(self.head_dim, seq_len, self.window, causal)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, window={self.window}"
