"""Sliding-window (local) attention, Longformer style: each query sees `window` keys around it.

`window` is the number of keys per query, causal or not (issue 17: one budget, one meaning):
- causal: query p sees keys p - window < j <= p (fewer near the start, where there are fewer);
- non-causal: query p sees the `window` keys j with s(p) <= j < s(p) + window, s(p) = p - window // 2
  clamped into [0, k_len - window]: window // 2 keys before it and (window - 1) // 2 after it, the
  window shifted to stay inside the sequence near either end, so every query sees min(window, k_len)
  keys (and a window as long as the sequence is dense attention).

The PyTorch path is blockwise: queries go in blocks of `block`, and each block reads the
`block + window - 1` consecutive keys its queries can reach (moved inside the sequence at the
ends), so time and memory are O(n * window) and no n x n tensor exists. flash-attn's `window_size`
runs instead where it can (non-causal: its band, with the shifted windows of the edge queries
recomputed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from layers import kernels
from layers.attention.common import check_qkv, repeat_kv_heads
from layers.attention.decoding import WindowState


def window_sides(window: int, causal: bool) -> tuple[int, int]:
    """(keys before, keys after) the query in its window away from the ends: they sum to window - 1."""
    return (window - 1, 0) if causal else (window // 2, (window - 1) // 2)


def in_window(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, causal: bool, k_len: int) -> torch.Tensor:
    """Whether key position k_pos is in the window of query position q_pos (broadcast; keys in [0, k_len))."""
    if causal:
        return (k_pos <= q_pos) & (k_pos > q_pos - window)
    first = (q_pos - window // 2).clamp(0, max(k_len - window, 0))  # s(p): the window shifted inside [0, k_len)
    return (k_pos >= first) & (k_pos < first + window)


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
        return window_sides(self.window, self.causal)[0]

    @property
    def right(self) -> int:
        return window_sides(self.window, self.causal)[1]

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.q_len / self.block)

    @property
    def span(self) -> int:
        return min(self.block + self.window - 1, self.k_len)

    def unclamped_start(self, i: int) -> int:
        """The first key a block would read without the ends: its first query's position - left."""
        return self.offset + i * self.block - self.left

    def key_starts(self, device: torch.device) -> torch.Tensor:
        """(n_blocks,): the first key position each block reads, inside [0, k_len - span].

        Every window of the block's queries lies in [start, start + span): away from the ends because the
        block's windows run from its first query's - left to its last query's + right; at an end because
        the windows there are shifted inside too (non-causal) or cut (causal).
        """
        starts = self.offset + torch.arange(self.n_blocks, device=device) * self.block - self.left
        return starts.clamp(0, self.k_len - self.span)


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
    """Keys (b, h, k_len, D) -> (b, h, n_blocks, span, D): the keys each query block reads (a copy, O(n * span))."""
    rows = layout.key_starts(x.device)[:, None] + torch.arange(layout.span, device=x.device)  # (n_blocks, span)
    return x[:, :, rows]


def band_mask(layout: WindowLayout, device: torch.device) -> torch.Tensor:
    """(block, span) bool: the window of each query within its block's keys, for blocks away from the ends
    (`interior_blocks`), where key c of the block is at position - left + c of its first query."""
    a = torch.arange(layout.block, device=device)[:, None]
    c = torch.arange(layout.span, device=device)[None, :]
    diff = a - c + layout.left  # query position - key position, the same in every interior block
    return (diff <= layout.left) & (diff >= -layout.right)


def window_mask(layout: WindowLayout, key_padding_mask: torch.Tensor | None, device: torch.device,
                blocks: tuple[int, int] | None = None) -> torch.Tensor:
    """(1 or b, 1, n_blocks, block, span) bool: True where a query may attend to a key of its block's keys.

    blocks=(i, j): only the rows of blocks i..j-1 (no key padding mask), without building the others.
    """
    first, last = blocks or (0, layout.n_blocks)
    a = torch.arange(layout.block, device=device)
    c = torch.arange(layout.span, device=device)
    q_pos = layout.offset + torch.arange(first, last, device=device)[:, None] * layout.block + a  # (blocks, block)
    q_pos = q_pos.clamp_max(layout.k_len - 1)[:, :, None]  # padding slots copy the last query (never read)
    k_pos = (layout.key_starts(device)[first:last, None] + c)[:, None, :]  # (blocks, 1, span)
    allowed = in_window(q_pos, k_pos, layout.window, layout.causal, layout.k_len)[None, None]
    if key_padding_mask is not None:
        real = key_windows(key_padding_mask[:, None, :, None].float(), layout)[..., 0] > 0  # (b, 1, n_blocks, span)
        allowed = allowed & real[:, :, :, None, :]
    # Every query may see its own position, so no row is empty (padding queries included; never read).
    return allowed | (k_pos == q_pos)


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


def interior_blocks(layout: WindowLayout) -> tuple[int, int]:
    """[first, last) blocks whose full key window lies inside [0, k_len) unmoved: they all share `band_mask`."""
    full = layout.block + layout.window - 1
    inside = [i for i in range(layout.n_blocks)
              if layout.unclamped_start(i) >= 0 and layout.unclamped_start(i) + full <= layout.k_len]
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
    lo, hi = interior_blocks(layout)
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
        kb, vb = (_key_windows_of(x, layout, i, j, interior).flatten(0, 1) for x in (k, v))  # (b*h, j - i, span, d)
        if interior:
            mask = band_mask(layout, q.device)  # (block, span)
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


def _key_windows_of(x: torch.Tensor, layout: WindowLayout, i: int, j: int, interior: bool) -> torch.Tensor:
    """key_windows(x, layout)[:, :, i:j] without copying the windows of the other blocks.

    Interior blocks start `block` keys apart: an overlapping view (SDPA reads strides); the few blocks at
    the ends (moved inside the sequence) are gathered.
    """
    if not interior:
        rows = layout.key_starts(x.device)[i:j, None] + torch.arange(layout.span, device=x.device)
        return x[:, :, rows]
    first = layout.unclamped_start(i)
    part = x[:, :, first : first + (j - 1 - i) * layout.block + layout.span]
    return part.unfold(2, layout.span, layout.block).transpose(-1, -2)


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
    q_pos = torch.arange(k_len - q_len, k_len, device=q.device)[:, None]
    allowed = in_window(q_pos, torch.arange(k_len, device=q.device)[None, :], window, causal, k_len)  # (q_len, k_len)
    padding = attention_mask(q_len, k_len, False, key_padding_mask, q.device)
    allowed = allowed if padding is None else allowed & padding
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    weights = scores.masked_fill(~allowed, float("-inf")).float().softmax(-1).to(q.dtype)
    return weights @ v, weights


def shift_edge_windows(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       window: int) -> torch.Tensor:
    """Non-causal `out` of a plain band (window // 2 keys before, (window - 1) // 2 after) with the queries
    near either end recomputed over their shifted windows: the first or the last min(window, k_len) keys."""
    k, v = repeat_kv_heads(q, k, v)
    q_len, k_len = q.shape[-2], k.shape[-2]
    left, right = window_sides(window, causal=False)
    pos = torch.arange(k_len - q_len, k_len)
    out = out.clone()
    for rows, keys in ((pos < left, slice(0, window)), (pos > k_len - 1 - right, slice(max(k_len - window, 0), k_len))):
        rows = rows.nonzero().flatten().tolist()
        if rows:
            r0, r1 = rows[0], rows[-1] + 1  # a contiguous run of queries at one end
            out[:, :, r0:r1] = F.scaled_dot_product_attention(q[:, :, r0:r1], k[:, :, keys], v[:, :, keys])
    return out


class LocalAttention(nn.Module):
    """Sliding-window attention, `window` keys per query (flash-attn's window_size where it can run)."""

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

            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                                  window_size=window_sides(self.window, causal)).transpose(1, 2)
            return out if causal else shift_edge_windows(out, q, k, v, self.window)
        return local_attention(q, k, v, self.window, causal, key_padding_mask)

    def decode_state(self) -> WindowState:
        """Decoding keeps the last window - 1 keys and values (layers/attention/decoding.py): O(window) per token."""
        return WindowState(self.window)

    def flops_per_token(self, seq_len: int, causal: bool = True) -> float:
        """Forward FLOPs per query token and head, as the blockwise path computes them."""
        return local_flops_per_token(self.head_dim, seq_len, self.window, causal)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, window={self.window}"
