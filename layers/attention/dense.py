"""Exact softmax attention: flash-attn when it can run, else PyTorch's scaled_dot_product_attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from layers import kernels


class DenseAttention(nn.Module):
    """Exact attention; the reference every other kind is measured against."""

    # Keywords a caller may add (SelfAttention passes them only when set): transformers' "eager" path, and
    # returning the attention weights (which only the eager path forms).
    OPTIONS_AT_CALL = ("implementation", "return_weights")
    IMPLEMENTATIONS = ("sdpa", "eager")

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
        implementation: str = "sdpa",
        return_weights: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """q: (batch, heads, q_len, head_dim); k, v: (batch, kv_heads, k_len, head_dim).

        With q_len < k_len (decoding with a KV cache) the queries are the LAST q_len positions,
        so causality is aligned bottom-right, as in flash-attn. key_padding_mask: (batch, k_len),
        True where a key may be attended to. implementation "eager" computes softmax(q k^T) explicitly
        (also when return_weights asks for the (batch, heads, q_len, k_len) weights).
        """
        if implementation not in self.IMPLEMENTATIONS:
            raise ValueError(f"attention implementation {implementation!r} is not supported by the dense kind; "
                             f"one of {self.IMPLEMENTATIONS}")
        if implementation == "eager" or return_weights:
            out, weights = eager_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask)
            return (out, weights) if return_weights else out
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


def attention_mask(q_len: int, k_len: int, causal: bool, key_padding_mask: torch.Tensor | None,
                   device: torch.device) -> torch.Tensor | None:
    """(batch or 1, 1, q_len, k_len) bool, True where a query may attend to a key; None when all may.

    Causality is aligned bottom-right (the queries are the last q_len positions).
    """
    mask = None
    if causal and q_len > 1:
        rows = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
        mask = rows >= torch.arange(k_len, device=device)[None, :]  # (q_len, k_len)
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, :].bool()  # (batch, 1, 1, k_len)
        mask = pad if mask is None else mask & pad
        # A padding query would see no key at all (a NaN row): let every query see itself.
        # Its output is never read, and real queries still never see padding keys.
        own = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
        mask = mask | (own == torch.arange(k_len, device=device)[None, :])
    return mask


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    key_padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(d)) v written out: (output, weights (batch, heads, q_len, k_len))."""
    if k.shape[1] != q.shape[1]:  # grouped-query attention: each key head serves n_heads / kv_heads queries
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (batch, heads, q_len, k_len)
    mask = attention_mask(q.shape[-2], k.shape[-2], causal, key_padding_mask, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.float().softmax(-1).to(q.dtype)
    return weights @ v, weights


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
    else:
        mask = attention_mask(q_len, k_len, causal, key_padding_mask, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
