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


def band_mask(layout: WindowLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """((block, span) bool: the window of each query within its block's keys, (block, span) position differences).

    The same in every block; blocks whose keys run past either end of the sequence also need `window_mask`.
    """
    a = torch.arange(layout.block, device=device)[:, None]
    c = torch.arange(layout.span, device=device)[None, :]
    diff = a - c + layout.left  # query position - key position, the same in every block
    return (diff <= layout.left) & (diff >= -layout.right), diff


def window_mask(layout: WindowLayout, key_padding_mask: torch.Tensor | None, device: torch.device,
                blocks: tuple[int, int] | None = None) -> torch.Tensor:
    """(1 or b, 1, n_blocks, block, span) bool: True where a query may attend to a key of its window.

    blocks=(i, j): only the rows of blocks i..j-1 (no key padding mask), without building the others.
    """
    allowed, diff = band_mask(layout, device)
    c = torch.arange(layout.span, device=device)[None, :]
    first, last = blocks or (0, layout.n_blocks)
    starts = layout.offset + torch.arange(first, last, device=device)[:, None] * layout.block
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
    """Exact softmax attention restricted to a sliding window, blockwise (never an n x n tensor).

    Where `layers.kernels.local_attention_path` says so, each query block runs torch's fused SDPA over its
    key window with one shared (block, span) mask (`local_attention_sdpa`), a few blocks at a time;
    else the scores of all blocks are written out (`local_attention_reference`, the semantics).
    """
    check_qkv(q, k, v)
    start = max(0, k.shape[-2] - q.shape[-2] - (window - 1))  # keys before it are outside every query's window
    if start:  # decoding: O(window) work and copies whatever the position (GQA heads repeated after the cut)
        k, v = k[:, :, start:], v[:, :, start:]
        key_padding_mask = None if key_padding_mask is None else key_padding_mask[:, start:]
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    block = block or kernels.local_attention_block(window, training)
    if kernels.local_attention_path(q, key_padding_mask) == "sdpa-blocks":
        return local_attention_sdpa(q, k, v, window, causal, block)
    return local_attention_reference(q, k, v, window, causal, key_padding_mask, block)


def local_attention_reference(q, k, v, window: int, causal: bool = True,
                              key_padding_mask: torch.Tensor | None = None, block: int | None = None) -> torch.Tensor:
    """The pure-PyTorch local attention: all blocks' (block, span) scores, masked, softmax, @ values."""
    check_qkv(q, k, v)
    k, v = repeat_kv_heads(q, k, v)
    layout = window_layout(q.shape[-2], k.shape[-2], window, causal, block)
    qb = query_windows(q, layout)  # (b, h, n_blocks, block, d)
    kb, vb = key_windows(k, layout), key_windows(v, layout)  # (b, h, n_blocks, span, d)
    scores = qb @ kb.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (b, h, n_blocks, block, span)
    scores = scores.masked_fill(~window_mask(layout, key_padding_mask, q.device), float("-inf"))
    out = scores.softmax(-1) @ vb  # (b, h, n_blocks, block, d)
    return out.flatten(2, 3)[:, :, : q.shape[-2]]


def _edge_blocks(layout: WindowLayout) -> tuple[int, int]:
    """[first, last) blocks whose whole key window lies inside [0, k_len): they all share one mask."""
    starts = [layout.offset + i * layout.block - layout.left for i in range(layout.n_blocks)]
    inside = [i for i, s in enumerate(starts) if s >= 0 and s + layout.span <= layout.k_len]
    return (inside[0], inside[-1] + 1) if inside else (0, 0)


# Query rows per SDPA call: bounds the key-window copies alive at once (2 * span / block key rows per query row)
# to about the output's size at n = 16k, so inference peaks under 2x fused SDPA's (BENCHMARKS.md, issue 18).
SDPA_GROUP_ROWS = 2048


def local_attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, causal: bool = True,
                         block: int = 128) -> torch.Tensor:
    """local_attention through torch's fused SDPA on each query block and its key window (no key padding).

    Blocks whose window lies inside the sequence share one (block, span) mask; the few at the ends get
    their own rows of `window_mask`. Blocks go to SDPA about `SDPA_GROUP_ROWS` query rows at a time, so
    only their key windows are copied at once; no scores are ever written out (SDPA's CPU flash kernel).
    Without autograd each group's output is written into the result (peak: the output and one group).
    """
    k, v = repeat_kv_heads(q, k, v)
    b, h, q_len, d = q.shape
    layout = window_layout(q_len, k.shape[-2], window, causal, block)
    lo, hi = _edge_blocks(layout)
    group = max(1, SDPA_GROUP_ROWS // layout.block)
    keep_graph = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    out = None if keep_graph else q.new_empty(b, h, q_len, d)
    pieces = []
    i = 0
    while i < layout.n_blocks:
        interior = lo <= i < hi
        j = min(hi if interior else (lo if i < lo else layout.n_blocks), i + group)
        r0, r1 = i * layout.block, min(j * layout.block, q_len)
        qg = q[:, :, r0:r1]
        if r1 - r0 < (j - i) * layout.block:  # the last block is short
            qg = F.pad(qg, (0, 0, 0, (j - i) * layout.block - (r1 - r0)))
        qg = qg.reshape(b * h, j - i, layout.block, d)
        kb, vb = (_key_windows_of(x, layout, i, j).flatten(0, 1) for x in (k, v))  # (b*h, j - i, span, d)
        if interior:
            mask = band_mask(layout, q.device)[0]  # (block, span)
        else:
            mask = window_mask(layout, None, q.device, blocks=(i, j))[0]  # (1, j - i, block, span)
        piece = F.scaled_dot_product_attention(qg, kb, vb, attn_mask=mask).view(b, h, -1, d)[:, :, : r1 - r0]
        if out is None:
            pieces.append(piece)
        else:
            out[:, :, r0:r1] = piece
        i = j
    if out is not None:
        return out
    return torch.cat(pieces, 2) if len(pieces) > 1 else pieces[0]


def _key_windows_of(x: torch.Tensor, layout: WindowLayout, i: int, j: int) -> torch.Tensor:
    """key_windows(x, layout)[:, :, i:j] without copying the windows of the other blocks."""
    first = layout.offset + i * layout.block - layout.left  # key position of row 0 of block i's window
    last = layout.offset + (j - 1) * layout.block - layout.left + layout.span  # one past block j-1's last
    pad_lo, pad_hi = max(0, -first), max(0, last - layout.k_len)
    part = x[:, :, max(0, first):min(last, layout.k_len)]
    if pad_lo or pad_hi:
        part = F.pad(part, (0, 0, pad_lo, pad_hi))
    return part.unfold(2, layout.span, layout.block).transpose(-1, -2)  # overlapping view: SDPA reads strides


def local_flops_per_token(head_dim: int, seq_len: int, window: int, causal: bool) -> float:
    """Forward FLOPs per query and head of `local_attention` at prefill: q.k and p.v over each block's span."""
    layout = window_layout(seq_len, seq_len, window, causal, kernels.local_attention_block(window))  # inference
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
