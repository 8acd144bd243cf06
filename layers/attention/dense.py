"""Exact softmax attention: flash-attn when it can run, else PyTorch's scaled_dot_product_attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from layers import kernels


class DenseAttention(nn.Module):
    """Exact attention; the reference every other kind is measured against."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.head_dim = head_dim

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool = True,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q: (batch, heads, q_len, head_dim); k, v: (batch, kv_heads, k_len, head_dim).

        With q_len < k_len (decoding with a KV cache) the queries are the LAST q_len positions,
        so causality is aligned bottom-right, as in flash-attn. key_padding_mask: (batch, k_len),
        True where a key may be attended to.
        """
        if key_padding_mask is None and kernels.can_use_flash_attn(q):
            from flash_attn import flash_attn_func

            # flash-attn wants (batch, seq, heads, head_dim) and handles GQA itself.
            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
            return out.transpose(1, 2)
        return sdpa_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask)

    def flops_per_token(self, seq_len: int, causal: bool = True) -> float:
        """Forward FLOPs per query token and head: q.k and p.v over the keys it sees."""
        keys = (seq_len + 1) / 2 if causal else seq_len
        return 4 * self.head_dim * keys


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference path: torch's scaled_dot_product_attention with bottom-right causal alignment."""
    q_len, k_len = q.shape[-2], k.shape[-2]
    gqa = k.shape[1] != q.shape[1]
    mask = None
    is_causal = False
    if causal and q_len == k_len and key_padding_mask is None:
        is_causal = True  # the fused kernels' fast path
    elif causal and q_len > 1:
        offset = k_len - q_len
        rows = torch.arange(q_len, device=q.device)[:, None] + offset
        mask = rows >= torch.arange(k_len, device=q.device)[None, :]  # (q_len, k_len)
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, :].bool()  # (batch, 1, 1, k_len)
        mask = pad if mask is None else mask & pad
        # A padding query would see no key at all (a NaN row): let every query see itself.
        # Its output is never read, and real queries still never see padding keys.
        own = torch.arange(q_len, device=q.device)[:, None] + (k_len - q_len)
        mask = mask | (own == torch.arange(k_len, device=q.device)[None, :])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
