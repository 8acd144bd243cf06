"""LSH attention (Reformer / SMYRF style): hash queries and keys by random rotations, attend within buckets.

Bucket of x: argmax over [xR, -xR] for a random rotation R (angular LSH, Reformer), so a query and
a key land together when their directions are close. Keys are sorted by (bucket, position); each
query attends to a chunk of `chunk` keys of its own bucket next to it in that order (causal: the
`chunk` most recent earlier ones), plus its own position. O(n * chunk) time and memory.

Reformer cuts the sorted sequence into equal chunks, so which keys share a chunk depends on how
many tokens (future ones included) sort before them. Here a query's keys depend only on the keys
it may see, so future tokens never change past outputs and decoding equals a full forward.

Computation: the queries, sorted by (bucket, position), go in blocks of `chunk`; their chunks are
contiguous, monotone ranges of the sorted keys, so each block needs a few key tiles of `chunk`
sorted keys. Every (query block, key tile) pair is one dense chunk x chunk product; the pairs'
partial softmax sums are merged per query (one shared max), as in flash attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from layers.attention.common import check_qkv, normalise, repeat_kv_heads, with_ones
from layers.attention.random_projection import RandomProjection


def hash_buckets(x: torch.Tensor, rotations: torch.Tensor | None) -> torch.Tensor:
    """Angular LSH bucket (b, h, n) of x (b, h, n, d): argmax of [xR, -xR]; every x in bucket 0 without R."""
    if rotations is None:
        return torch.zeros(x.shape[:-1], dtype=torch.long, device=x.device)
    rotated = x.float() @ rotations.float().T  # (b, h, n, n_buckets / 2)
    return torch.cat([rotated, -rotated], dim=-1).argmax(-1)


@dataclass
class BucketTiles:
    """Which (query block, key tile) products cover every query's bucket chunk, over G = batch * heads groups.

    Rows index the flattened (G * q_len) queries and (G * k_len) keys. Query slots are the
    queries sorted by (group, bucket, position), in NB blocks of B (the last block padded).
    """

    q_rows: torch.Tensor  # (NB, B): query row of each slot (padding slots repeat a real row)
    q_pos: torch.Tensor  # (NB, B): its position
    own_rows: torch.Tensor  # (NB, B): the key row at the query's own position
    unsort: torch.Tensor  # (G * q_len,): the slot (into NB * B) of each query row
    pair_block: torch.Tensor  # (P,): the query block of each pair
    k_rows: torch.Tensor  # (P, T): key rows of each pair's tile
    k_pos: torch.Tensor  # (P, T): their positions
    allowed: torch.Tensor  # (P, B, T): key in the query's chunk, same bucket, not its own position, real


@torch.no_grad()
def bucket_tiles(q_buckets: torch.Tensor, k_buckets: torch.Tensor, chunk: int, causal: bool,
                 key_padding_mask: torch.Tensor | None = None) -> BucketTiles:
    """The tiles for buckets q (b, h, q_len), k (b, h, k_len); the queries are the last q_len positions.

    A query at position p in bucket u takes the `chunk` keys of bucket u sorted just before (u, p)
    when causal, or around it (shifted to stay inside the bucket) otherwise.
    """
    b, h, q_len = q_buckets.shape
    k_len = k_buckets.shape[-1]
    dev = k_buckets.device
    groups = b * h
    q_buckets, k_buckets = q_buckets.reshape(groups, q_len), k_buckets.reshape(groups, k_len)

    # Keys sorted by (bucket, position); queries too. A query's chunk is [first, first + chunk) in key order.
    key_code, key_order = (k_buckets * k_len + torch.arange(k_len, device=dev)).sort(-1)  # (G, k_len)
    q_code, q_order = (q_buckets * k_len + torch.arange(k_len - q_len, k_len, device=dev)).sort(-1)  # (G, q_len)
    insert = torch.searchsorted(key_code, q_code)  # keys sorted before the query
    if causal:
        first = insert - chunk
    else:
        lo = torch.searchsorted(key_code, q_code // k_len * k_len)  # its bucket's first key
        hi = torch.searchsorted(key_code, (q_code // k_len + 1) * k_len)
        first = torch.maximum(torch.minimum(insert - chunk // 2, hi - chunk).clamp_min(0), lo)

    # Query blocks of B sorted queries; padding slots repeat the block's last real query.
    block = max(1, min(chunk, q_len))
    n_blocks = math.ceil(q_len / block)
    pad = n_blocks * block - q_len

    def blocks(x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x, x[:, -1:].expand(groups, pad)], dim=1)
        return x.reshape(groups * n_blocks, block)  # (NB, B)

    q_local = blocks(q_order)  # query index within its group
    slot_first, slot_code = blocks(first), blocks(q_code)
    group_of_block = torch.arange(groups, device=dev).repeat_interleave(n_blocks)  # (NB,)
    q_rows = group_of_block[:, None] * q_len + q_local
    q_pos = q_local + (k_len - q_len)
    own_rows = group_of_block[:, None] * k_len + q_pos

    # Key tiles of `chunk` sorted keys that each query block reaches (monotone chunks: a contiguous range).
    tile = max(1, min(chunk, k_len))
    reach_lo = slot_first[:, 0].clamp(0, k_len - 1)
    reach_hi = (slot_first[:, -1] + chunk).clamp(1, k_len)
    tile_lo = reach_lo // tile
    n_tiles = (torch.maximum((reach_hi - 1) // tile, tile_lo) - tile_lo + 1)  # (NB,)
    pair_block = torch.arange(groups * n_blocks, device=dev).repeat_interleave(n_tiles)  # (P,)
    starts = torch.cumsum(n_tiles, 0) - n_tiles
    tile_idx = tile_lo[pair_block] + torch.arange(pair_block.numel(), device=dev) - starts[pair_block]
    k_slot = tile_idx[:, None] * tile + torch.arange(tile, device=dev)  # (P, T) into the sorted keys
    inside = k_slot < k_len
    k_slot = k_slot.clamp_max(k_len - 1)
    pair_group = group_of_block[pair_block][:, None]
    k_pos = key_order.flatten()[pair_group * k_len + k_slot]  # (P, T)
    k_bucket = key_code.flatten()[pair_group * k_len + k_slot] // k_len

    pq_first = slot_first[pair_block][:, :, None]  # (P, B, 1)
    allowed = (inside[:, None, :] & (k_slot[:, None, :] >= pq_first) & (k_slot[:, None, :] < pq_first + chunk)
               & (k_bucket[:, None, :] == (slot_code[pair_block] // k_len)[:, :, None])
               & (k_pos[:, None, :] != q_pos[pair_block][:, :, None]))
    real_slot = (torch.arange(n_blocks * block, device=dev) < q_len).view(n_blocks, block).repeat(groups, 1)
    allowed &= real_slot[pair_block][:, :, None]
    if key_padding_mask is not None:
        real = key_padding_mask.bool()[:, None, :].expand(b, h, k_len).reshape(groups * k_len)
        allowed &= real[pair_group * k_len + k_pos][:, None, :]

    slot_of = torch.empty(groups * q_len, dtype=torch.long, device=dev)
    slot_ids = torch.arange(groups * n_blocks * block, device=dev).view(-1, block)
    real_rows = q_rows[real_slot]
    slot_of[real_rows] = slot_ids[real_slot]
    return BucketTiles(q_rows, q_pos, own_rows, slot_of, pair_block,
                       pair_group * k_len + k_pos, k_pos, allowed)


def merge_max(tiles: BucketTiles, own: torch.Tensor, pair_logits: torch.Tensor) -> torch.Tensor:
    """(NB, B): the largest of each query's own logit (NB, B) and its pairs' logits (P, B, T)."""
    top = pair_logits.amax(-1)  # (P, B)
    index = tiles.pair_block[:, None].expand_as(top)
    return own.scatter_reduce(0, index, top, reduce="amax").detach()


def lsh_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rotations: torch.Tensor | None,
    chunk: int,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    return_weights: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over each query's bucket chunk plus itself (queries are the last q_len positions).

    return_weights: also the weights it used, as a dense (b, h, q_len, k_len) matrix (zero off its support).
    """
    check_qkv(q, k, v)
    k, v = repeat_kv_heads(q, k, v)
    b, h, q_len, d = q.shape
    tiles = bucket_tiles(hash_buckets(q, rotations), hash_buckets(k, rotations), chunk, causal, key_padding_mask)
    qf, kf, vf = q.reshape(-1, d), k.reshape(-1, d), with_ones(v).reshape(-1, d + 1)  # rows
    scale = 1 / math.sqrt(d)
    qs = qf[tiles.q_rows]  # (NB, B, d)
    own = (qs * kf[tiles.own_rows]).sum(-1) * scale  # (NB, B): every query sees itself
    logits = (qs[tiles.pair_block] @ kf[tiles.k_rows].transpose(-1, -2)) * scale  # (P, B, T)
    logits = logits.masked_fill(~tiles.allowed, float("-inf"))
    top = merge_max(tiles, own, logits)
    acc = torch.exp(own - top)[..., None] * vf[tiles.own_rows]  # (NB, B, d + 1)
    weights = torch.exp(logits - top[tiles.pair_block][..., None])  # (P, B, T)
    acc = acc.index_add(0, tiles.pair_block, weights @ vf[tiles.k_rows])
    out = normalise(acc).flatten(0, 1)[tiles.unsort]  # (b * h * q_len, d) in position order
    out = out.view(b, h, q_len, d)
    if not return_weights:
        return out
    k_len = k.shape[-2]
    z = acc[..., -1]  # (NB, B): each slot's softmax denominator (v was extended by a column of ones)
    dense = torch.zeros(b * h * q_len, k_len, dtype=acc.dtype, device=q.device)
    rows = torch.arange(b * h * q_len, device=q.device)
    slot = tiles.unsort  # each query row's slot in the flattened (NB, B)
    own_weight = (torch.exp(own - top) / z).flatten()[slot]
    dense.index_put_((rows, tiles.own_rows.flatten()[slot] % k_len), own_weight, accumulate=True)
    pair_rows = tiles.q_rows[tiles.pair_block][..., None].expand_as(weights)  # (P, B, T); padding slots add 0
    pair_cols = tiles.k_pos[:, None, :].expand_as(weights)
    dense.index_put_((pair_rows, pair_cols), weights / z[tiles.pair_block][..., None], accumulate=True)
    return out, dense.view(b, h, q_len, k_len).to(q.dtype)


def hash_flops_per_token(head_dim: int, n_buckets: int) -> float:
    """Matmul FLOPs per token and head of hashing its query and its key (nothing with one bucket)."""
    return 2 * (2 * head_dim * (n_buckets // 2)) if n_buckets > 1 else 0


def tiles_per_block(n_buckets: int) -> float:
    """Key tiles a block of sorted queries reads: 2 with one bucket (aligned), ~3 with several (measured)."""
    return 2.0 if n_buckets == 1 else 3.0


def lsh_flops_per_token(head_dim: int, n_buckets: int, chunk: int) -> float:
    """Forward matmul FLOPs per query and head: hashing, then q.k and p.v1 over the key tiles of its block."""
    entries = chunk * tiles_per_block(n_buckets)
    return hash_flops_per_token(head_dim, n_buckets) + (2 * head_dim + 2 * (head_dim + 1)) * entries


class LSHAttention(nn.Module):
    """Hash-bucketed sparse attention: `n_buckets` angular-LSH buckets, `chunk` keys of its bucket per query."""

    OPTIONS_AT_CALL = ("return_weights",)  # keywords a caller may add: see DenseAttention

    def __init__(self, head_dim: int, n_buckets: int = 8, chunk: int = 64, redraw_every: int = 1000):
        super().__init__()
        if n_buckets < 1 or (n_buckets > 1 and n_buckets % 2):
            raise ValueError(f"lsh: n_buckets = {n_buckets} is invalid: must be 1 or an even number >= 2")
        if chunk < 1:
            raise ValueError(f"lsh: chunk = {chunk} is invalid: must be >= 1")
        self.head_dim, self.n_buckets, self.chunk = head_dim, n_buckets, chunk
        self.rotations = RandomProjection(n_buckets // 2, head_dim, redraw_every) if n_buckets > 1 else None

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

        return_weights: also the (batch, heads, q_len, k_len) weights it used (dense, zero off its support).
        """
        rotations = None if self.rotations is None else self.rotations.weight
        return lsh_attention(q, k, v, rotations, self.chunk, causal, key_padding_mask, return_weights)

    def flops_per_token(self, seq_len: int, causal: bool = True) -> float:
        """Forward FLOPs per query token and head (tiles per query block estimated: see tiles_per_block)."""
        return lsh_flops_per_token(self.head_dim, self.n_buckets, min(self.chunk, seq_len))

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, n_buckets={self.n_buckets}, chunk={self.chunk}"
