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

hashing="smyrf" (SMYRF, Daras et al. 2020) hashes for inner products instead of angles, in
`n_hashes` rounds:
- asymmetric transform (XBOX / simple LSH): keys -> [k, sqrt(M^2 - |k|^2)] / M, queries ->
  [q / |q|, 0], so that for each query the cosine of the transformed pair orders its keys by q.k
  (angular LSH alone misses large-norm keys at moderate angles). M is the largest key norm: of all
  keys, or (causal) of the keys up to each key, so a key's hash never depends on later tokens;
- balanced clusters (non-causal): keys sorted by the angular bucket of their transform, then by a
  random projection of it within the bucket; each query takes the `chunk` keys nearest to its own
  code in that order, so every query gets exactly min(chunk, k_len) keys (a small bucket is filled
  from its neighbours in the order). SMYRF sorts by one projection and cuts the sorted queries and
  the sorted keys into aligned clusters; taking them around the query's own code keeps its keys
  independent of the other queries, and bucket-then-projection recalled more of the largest keys
  than one projection (heavy hitters, n = 1024, 4 rounds of 15 keys: 0.83 of each query's top 2
  against 0.69; 0.25 for one round of angular LSH). Causal attention cannot sort by future keys,
  so causal rounds take the `chunk` most recent keys of the query's angular bucket of the transform;
- several rounds: the union of the rounds' keys, each key counted once per query (a pair an earlier
  round holds is masked out of the later ones).
The default, hashing="angular" with n_hashes=1, is the original single-round angular LSH.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from layers.attention.common import MIN_NORMALISER, check_qkv, normalise, repeat_kv_heads, with_ones
from layers.attention.decoding import BucketState
from layers.attention.random_projection import RandomProjection

HASHINGS = ("angular", "smyrf")
# Without autograd, attention runs this many sorted queries at a time (see attend_in_groups).
INFERENCE_GROUP_ROWS = 512  # 1.6x fused SDPA's peak at n = 16k for one round (1024: 1.9x)


def hash_buckets(x: torch.Tensor, rotations: torch.Tensor | None) -> torch.Tensor:
    """Angular LSH bucket (b, h, n) of x (b, h, n, d): argmax of [xR, -xR]; every x in bucket 0 without R."""
    if rotations is None:
        return torch.zeros(x.shape[:-1], dtype=torch.long, device=x.device)
    rotated = x.float() @ rotations.float().T  # (b, h, n, n_buckets / 2)
    return torch.cat([rotated, -rotated], dim=-1).argmax(-1)


def key_norm_bound(k: torch.Tensor, causal: bool, key_padding_mask: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(key norms (b, h, k_len), M (b, h, k_len or 1)): M the largest key norm (causal: up to each key; padding
    keys ignored), the bound of SMYRF's asymmetric transform."""
    norms = k.float().norm(dim=-1)  # (b, h, k_len)
    if key_padding_mask is not None:
        norms = norms * key_padding_mask[:, None, :]
    top = norms.cummax(-1).values if causal else norms.amax(-1, keepdim=True)
    return norms, top.clamp_min(1e-12)


def transform_keys(k: torch.Tensor, norms: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Keys (b, h, n, d) -> [k, sqrt(M^2 - |k|^2)] / M on the unit sphere of dimension d + 1 (norms and M: of
    these keys)."""
    extra = (1 - (norms / top) ** 2).clamp_min(0).sqrt()  # padding keys (norm set to 0): whatever, never read
    return torch.cat([k.float() / top[..., None], extra[..., None]], dim=-1)


def transform_queries(q: torch.Tensor) -> torch.Tensor:
    """Queries (b, h, n, d) -> [q / |q|, 0]."""
    q = q.float()
    return torch.cat([q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12), q.new_zeros(*q.shape[:-1], 1)], dim=-1)


def asymmetric_transform(q: torch.Tensor, k: torch.Tensor, causal: bool,
                         key_padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_t, k_t) on the unit sphere of dimension d + 1 with q_t . k_t = q.k / (|q| M_k): maximum inner
    product search as nearest neighbours. M_k: the largest key norm (causal: up to key k; padding keys ignored)."""
    norms, top = key_norm_bound(k, causal, key_padding_mask)
    return transform_queries(q), transform_keys(k, norms, top.expand_as(norms))


SMYRF_CODE_ROWS = 4096  # positions transformed at a time when SMYRF codes are computed (only codes are kept)


def smyrf_codes(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor | None, causal: bool,
                key_padding_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One SMYRF round's codes of the queries and keys (b, h, len): balanced codes (non-causal) or angular buckets
    of the transform (causal), SMYRF_CODE_ROWS positions at a time (the (len, d + 1) transforms are never whole)."""
    norms, top = key_norm_bound(k, causal, key_padding_mask)
    top = top.expand_as(norms)

    def code(x: torch.Tensor) -> torch.Tensor:
        if not causal:
            return balanced_code(x, rows)
        return hash_buckets(x, rows[1:] if rows.shape[0] > 1 else None)

    step = SMYRF_CODE_ROWS
    q_code = torch.cat([code(transform_queries(q[:, :, i:i + step])) for i in range(0, q.shape[-2], step)], -1)
    k_code = torch.cat([code(transform_keys(k[:, :, i:i + step], norms[..., i:i + step], top[..., i:i + step]))
                        for i in range(0, k.shape[-2], step)], -1)
    return q_code, k_code


def round_projection(projection: torch.Tensor | None, round_: int, n_hashes: int) -> torch.Tensor | None:
    """The rows of the (n_hashes * rows, dim) projection that hash round `round_` uses."""
    if projection is None:
        return None
    rows = projection.shape[0] // n_hashes
    return projection[round_ * rows : (round_ + 1) * rows]


def balanced_code(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(b, h, n) real sort code of transformed vectors x (b, h, n, d + 1) for a balanced round: the angular
    bucket by rows[1:], then the projection on rows[0] within it (keys sorted by it, each query taking the
    `chunk` keys around its own code, fall in its bucket first and in its neighbours' when it is small)."""
    direction = rows[0].float()
    projection = x @ direction  # |projection| <= |direction|: x is on the unit sphere
    buckets = hash_buckets(x, rows[1:]) if rows.shape[0] > 1 else torch.zeros_like(projection, dtype=torch.long)
    return buckets * (2 * direction.norm() + 1) + projection


def sorted_rounds(q: torch.Tensor, k: torch.Tensor, projection: torch.Tensor | None, chunk: int, causal: bool,
                  key_padding_mask: torch.Tensor | None, hashing: str = "angular",
                  n_hashes: int = 1) -> list[SortedRound]:
    """Every hash round's order (O(n) indices; `SortedRound.tiles` builds the products)."""
    rounds = []
    for r in range(n_hashes):
        rows = round_projection(projection, r, n_hashes)
        if hashing == "smyrf":
            q_code, k_code = smyrf_codes(q, k, rows, causal, key_padding_mask)
            if not causal:  # balanced: exactly `chunk` keys per query, across bucket edges
                rounds.append(sorted_round(q_code, k_code, None, None, chunk, causal, key_padding_mask))
            else:  # causal: the angular buckets of the transform (the rows after the balanced one)
                rounds.append(bucket_round(q_code, k_code, chunk, causal, key_padding_mask))
        else:
            rounds.append(bucket_round(hash_buckets(q, rows), hash_buckets(k, rows), chunk, causal,
                                       key_padding_mask))
    return rounds


def round_tiles(rounds: list[SortedRound], r: int, lo: int = 0, hi: int | None = None) -> BucketTiles:
    """Round r's tiles of blocks [lo, hi), each pair in one round only (the earliest that holds it)."""
    tiles = rounds[r].tiles(lo, hi)
    for earlier in rounds[:r]:
        tiles.allowed &= ~earlier.holds(tiles)
    return tiles


def hash_rounds(q: torch.Tensor, k: torch.Tensor, projection: torch.Tensor | None, chunk: int, causal: bool,
                key_padding_mask: torch.Tensor | None, hashing: str = "angular",
                n_hashes: int = 1) -> list[BucketTiles]:
    """The tiles of every hash round (all blocks), each pair in one round only (the earliest that holds it)."""
    rounds = sorted_rounds(q, k, projection, chunk, causal, key_padding_mask, hashing, n_hashes)
    return [round_tiles(rounds, r) for r in range(len(rounds))]


@dataclass
class BucketTiles:
    """Which (query block, key tile) products cover the bucket chunks of some blocks of sorted queries.

    Rows index the flattened (G * q_len) queries and (G * k_len) keys, over G = batch * heads groups.
    Query slots are the queries sorted by (group, bucket, position), in blocks of B (the last block of a
    group padded); these tiles cover the round's blocks [lo, hi) (`SortedRound.tiles`).
    """

    q_rows: torch.Tensor  # (NB, B): query row of each slot (padding slots repeat a real row)
    q_pos: torch.Tensor  # (NB, B): its position
    own_rows: torch.Tensor  # (NB, B): the key row at the query's own position
    real: torch.Tensor  # (NB, B): a real query, not padding
    pair_block: torch.Tensor  # (P,): the query block of each pair (0 = block lo)
    k_rows: torch.Tensor  # (P, T): key rows of each pair's tile
    k_pos: torch.Tensor  # (P, T): their positions
    allowed: torch.Tensor  # (P, B, T): key in the query's chunk, same bucket, not its own position, real
    round: SortedRound

    @property
    def unsort(self) -> torch.Tensor:
        """(G * q_len,): the slot of each query row (tiles of all the round's blocks only)."""
        return self.round.unsort

    def holds(self, other: BucketTiles) -> torch.Tensor:
        """(P', B', T') bool: which pairs of `other`'s tiles (same queries and keys) this round's support holds."""
        return self.round.holds(other)


@dataclass
class SortedRound:
    """One hash round's order, O(n) indices: the keys and queries sorted by code, each query's chunk
    [first, first + chunk) of sorted keys; `tiles(lo, hi)` gives the products for blocks [lo, hi)."""

    groups: int
    q_len: int
    k_len: int
    chunk: int
    block: int  # B: sorted queries per block
    n_blocks: int  # per group
    q_rows: torch.Tensor  # (NB, B), NB = groups * n_blocks
    real_slot: torch.Tensor  # (NB, B)
    slot_first: torch.Tensor  # (NB, B): the first sorted key slot of each slot's chunk
    key_order: torch.Tensor  # (G * k_len,): the key (within its group) at each sorted slot
    k_bucket_sorted: torch.Tensor  # (G * k_len,)
    key_real: torch.Tensor | None  # (G * k_len,) bool: not a padding key (None: no padding)
    # To ask whether a (query, key) pair is in this round's support (rounds count each pair once):
    first_of: torch.Tensor  # (G * q_len,): the first sorted key slot of each query row's chunk
    slot_of_key: torch.Tensor  # (G * k_len,): each key row's slot in the sorted keys
    q_label: torch.Tensor  # (G * q_len,): each query row's bucket (0 for balanced rounds)
    k_label: torch.Tensor  # (G * k_len,): each key row's bucket

    @property
    def total_blocks(self) -> int:
        return self.q_rows.shape[0]

    @cached_property
    def unsort(self) -> torch.Tensor:
        """(G * q_len,): the slot (into NB * B) of each query row."""
        slot_of = torch.empty(self.groups * self.q_len, dtype=torch.long, device=self.q_rows.device)
        slot_ids = torch.arange(self.q_rows.numel(), device=self.q_rows.device).view_as(self.q_rows)
        slot_of[self.q_rows[self.real_slot]] = slot_ids[self.real_slot]
        return slot_of

    def holds(self, other: BucketTiles) -> torch.Tensor:
        """(P', B', T') bool: which pairs of `other`'s tiles (same queries and keys) this round's support holds."""
        q_rows = other.q_rows[other.pair_block][:, :, None]  # (P', B', 1)
        k_rows = other.k_rows[:, None, :]  # (P', 1, T')
        first, slot = self.first_of[q_rows], self.slot_of_key[k_rows]
        return ((slot >= first) & (slot < first + self.chunk) & (self.q_label[q_rows] == self.k_label[k_rows])
                & (other.k_pos[:, None, :] != other.q_pos[other.pair_block][:, :, None]))

    @torch.no_grad()
    def tiles(self, lo: int = 0, hi: int | None = None) -> BucketTiles:
        """The (query block, key tile) products of blocks [lo, hi) (all by default)."""
        hi = self.total_blocks if hi is None else hi
        k_len, chunk, dev = self.k_len, self.chunk, self.q_rows.device
        slot_first = self.slot_first[lo:hi]
        group_of_block = torch.arange(lo, hi, device=dev) // self.n_blocks  # (nb,)
        # Key tiles of `chunk` sorted keys that each query block reaches (monotone chunks: a contiguous range).
        tile = max(1, min(chunk, k_len))
        reach_lo = slot_first[:, 0].clamp(0, k_len - 1)
        reach_hi = (slot_first[:, -1] + chunk).clamp(1, k_len)
        tile_lo = reach_lo // tile
        n_tiles = (torch.maximum((reach_hi - 1) // tile, tile_lo) - tile_lo + 1)  # (nb,)
        pair_block = torch.arange(hi - lo, device=dev).repeat_interleave(n_tiles)  # (P,)
        starts = torch.cumsum(n_tiles, 0) - n_tiles
        tile_idx = tile_lo[pair_block] + torch.arange(pair_block.numel(), device=dev) - starts[pair_block]
        k_slot = tile_idx[:, None] * tile + torch.arange(tile, device=dev)  # (P, T) into the sorted keys
        inside = k_slot < k_len
        k_slot = k_slot.clamp_max(k_len - 1)
        sorted_at = group_of_block[pair_block][:, None] * k_len + k_slot
        k_pos = self.key_order[sorted_at]  # (P, T)
        k_bucket = self.k_bucket_sorted[sorted_at]
        q_rows, real = self.q_rows[lo:hi], self.real_slot[lo:hi]
        q_pos = q_rows % self.q_len + (k_len - self.q_len)  # the queries are the last q_len positions

        pq_first = slot_first[pair_block][:, :, None]  # (P, B, 1)
        allowed = (inside[:, None, :] & (k_slot[:, None, :] >= pq_first) & (k_slot[:, None, :] < pq_first + chunk)
                   & (k_bucket[:, None, :] == self.q_label[q_rows][pair_block][:, :, None])
                   & (k_pos[:, None, :] != q_pos[pair_block][:, :, None]) & real[pair_block][:, :, None])
        k_rows = group_of_block[pair_block][:, None] * k_len + k_pos
        if self.key_real is not None:
            allowed &= self.key_real[k_rows][:, None, :]
        own_rows = group_of_block[:, None] * k_len + q_pos
        return BucketTiles(q_rows, q_pos, own_rows, real, pair_block, k_rows, k_pos, allowed, self)


@torch.no_grad()
def bucket_tiles(q_buckets: torch.Tensor, k_buckets: torch.Tensor, chunk: int, causal: bool,
                 key_padding_mask: torch.Tensor | None = None) -> BucketTiles:
    """The tiles for buckets q (b, h, q_len), k (b, h, k_len); the queries are the last q_len positions."""
    return bucket_round(q_buckets, k_buckets, chunk, causal, key_padding_mask).tiles()


@torch.no_grad()
def bucket_round(q_buckets: torch.Tensor, k_buckets: torch.Tensor, chunk: int, causal: bool,
                 key_padding_mask: torch.Tensor | None = None) -> SortedRound:
    """The round for buckets q (b, h, q_len), k (b, h, k_len); the queries are the last q_len positions.

    A query at position p in bucket u takes the `chunk` keys of bucket u sorted just before (u, p)
    when causal, or around it (shifted to stay inside the bucket) otherwise.
    """
    k_len = k_buckets.shape[-1]
    dev = k_buckets.device
    q_code = q_buckets * k_len + torch.arange(k_len - q_buckets.shape[-1], k_len, device=dev)
    k_code = k_buckets * k_len + torch.arange(k_len, device=dev)
    return sorted_round(q_code, k_code, q_buckets, k_buckets, chunk, causal, key_padding_mask)


@torch.no_grad()
def sorted_tiles(q_code: torch.Tensor, k_code: torch.Tensor, q_buckets: torch.Tensor | None,
                 k_buckets: torch.Tensor | None, chunk: int, causal: bool,
                 key_padding_mask: torch.Tensor | None = None) -> BucketTiles:
    """All the tiles of `sorted_round` (one product per pair of every block)."""
    return sorted_round(q_code, k_code, q_buckets, k_buckets, chunk, causal, key_padding_mask).tiles()


@torch.no_grad()
def sorted_round(q_code: torch.Tensor, k_code: torch.Tensor, q_buckets: torch.Tensor | None,
                 k_buckets: torch.Tensor | None, chunk: int, causal: bool,
                 key_padding_mask: torch.Tensor | None = None) -> SortedRound:
    """The round where keys and queries are sorted by a code (b, h, len) and a query's chunk is `chunk` keys
    next to its own code: of its bucket (buckets given: code = bucket * k_len + position) or of all keys
    (buckets None: a balanced round, non-causal, exactly min(chunk, k_len) keys per query)."""
    b, h, q_len = q_code.shape
    k_len = k_code.shape[-1]
    dev = k_code.device
    groups = b * h
    q_code, k_code = q_code.reshape(groups, q_len), k_code.reshape(groups, k_len)
    if q_buckets is None:
        q_buckets = torch.zeros(groups, q_len, dtype=torch.long, device=dev)
        k_buckets = torch.zeros(groups, k_len, dtype=torch.long, device=dev)
    q_buckets, k_buckets = q_buckets.reshape(groups, q_len), k_buckets.reshape(groups, k_len)

    # Keys sorted by code; queries too. A query's chunk is [first, first + chunk) in key order.
    key_code, key_order = k_code.sort(-1)  # (G, k_len)
    q_code, q_order = q_code.sort(-1)  # (G, q_len)
    k_bucket_sorted = k_buckets.gather(1, key_order)
    insert = torch.searchsorted(key_code, q_code)  # keys sorted before the query
    del key_code, q_code
    if causal:
        first = insert - chunk
    else:  # around the query, shifted to stay inside its bucket's run of sorted keys
        q_bucket_sorted = q_buckets.gather(1, q_order)
        lo = torch.searchsorted(k_bucket_sorted, q_bucket_sorted)  # its bucket's first key
        hi = torch.searchsorted(k_bucket_sorted, q_bucket_sorted, right=True)
        first = torch.maximum(torch.minimum(insert - chunk // 2, hi - chunk).clamp_min(0), lo)
        del lo, hi
    del insert

    # Query blocks of B sorted queries; padding slots repeat the block's last real query.
    block = max(1, min(chunk, q_len))
    n_blocks = math.ceil(q_len / block)
    pad = n_blocks * block - q_len

    def blocks(x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x, x[:, -1:].expand(groups, pad)], dim=1)
        return x.reshape(groups * n_blocks, block)  # (NB, B)

    q_local = blocks(q_order)  # query index within its group
    group_of_block = torch.arange(groups, device=dev).repeat_interleave(n_blocks)  # (NB,)
    q_rows = group_of_block[:, None] * q_len + q_local
    real_slot = (torch.arange(n_blocks * block, device=dev) < q_len).view(n_blocks, block).repeat(groups, 1)
    key_real = None
    if key_padding_mask is not None:
        key_real = key_padding_mask.bool()[:, None, :].expand(b, h, k_len).reshape(groups * k_len)

    row_offsets = torch.arange(groups, device=dev)[:, None]
    first_of = torch.empty(groups * q_len, dtype=torch.long, device=dev)
    first_of[(row_offsets * q_len + q_order).flatten()] = first.flatten()
    slot_of_key = torch.empty(groups * k_len, dtype=torch.long, device=dev)
    slot_of_key[(row_offsets * k_len + key_order).flatten()] = torch.arange(k_len, device=dev).repeat(groups)
    return SortedRound(groups, q_len, k_len, chunk, block, n_blocks, q_rows, real_slot, blocks(first),
                       key_order.flatten(), k_bucket_sorted.flatten(), key_real, first_of,
                       slot_of_key, q_buckets.flatten(), k_buckets.flatten())


def round_max(tiles: BucketTiles, pair_logits: torch.Tensor) -> torch.Tensor:
    """(rows,): the largest of each query row's pair logits (P, B, T) in this round (-inf where it has none)."""
    top = pair_logits.amax(-1)  # (P, B)
    slots = torch.full((tiles.q_rows.numel(),), float("-inf"), dtype=top.dtype, device=top.device)
    slots = slots.scatter_reduce(0, (tiles.pair_block[:, None] * tiles.q_rows.shape[1]
                                     + torch.arange(tiles.q_rows.shape[1], device=top.device)).flatten(),
                                 top.flatten(), reduce="amax")
    return slots[tiles.unsort]


def attend_in_groups(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rounds: list[SortedRound],
                     rows: int | None = None) -> torch.Tensor:
    """Softmax attention over the rounds' chunks plus each query's own position, without autograd, a group of
    about `rows` sorted queries (INFERENCE_GROUP_ROWS) at a time: only one group's products are alive, merged
    into each query's running (max, weighted sum, normaliser) as in flash attention; the sum becomes the output
    in place (peak memory: the output plus the rounds' O(n) indices plus one group's scratch, issue 18)."""
    b, h, q_len, d = q.shape
    with torch.autocast(q.device.type, enabled=False):
        qf, kf, vf = (x.float().reshape(-1, d) for x in (q, k, v))
        scale = 1 / math.sqrt(d)
        top = torch.full((b * h * q_len,), float("-inf"), device=q.device)  # (rows,): each query's running max
        acc = torch.zeros(b * h * q_len, d, device=q.device)  # its weighted sum of values: then the output
        den = torch.zeros_like(top)  # its sum of weights
        for r, round_ in enumerate(rounds):
            per_group = max(1, (rows or INFERENCE_GROUP_ROWS) // round_.block)
            for lo in range(0, round_.total_blocks, per_group):
                tiles = round_tiles(rounds, r, lo, min(lo + per_group, round_.total_blocks))
                qs = qf[tiles.q_rows]  # (nb, B, d)
                logits = (qs[tiles.pair_block] @ kf[tiles.k_rows].transpose(-1, -2)) * scale  # (P, B, T)
                logits.masked_fill_(~tiles.allowed, float("-inf"))
                slot_rows = tiles.q_rows
                slot_ids = (tiles.pair_block[:, None] * slot_rows.shape[1]
                            + torch.arange(slot_rows.shape[1], device=q.device)).flatten()
                block_top = torch.full((slot_rows.numel(),), float("-inf"), device=q.device).scatter_reduce_(
                    0, slot_ids, logits.amax(-1).flatten(), "amax").view(slot_rows.shape)
                new_top = torch.maximum(top[slot_rows], block_top)  # (nb, B)
                if r == 0:  # the first round also reads each query's own position (every query is in it once)
                    own = (qs * kf[tiles.own_rows]).sum(-1) * scale  # (nb, B)
                    new_top = torch.maximum(new_top, own)
                logits.sub_(new_top[tiles.pair_block][..., None]).exp_()  # the weights, at the new scale
                sums = torch.zeros(*slot_rows.shape, d, device=q.device)
                sums.index_add_(0, tiles.pair_block, logits @ vf[tiles.k_rows])
                mass = torch.zeros(slot_rows.shape, device=q.device).index_add_(0, tiles.pair_block, logits.sum(-1))
                if r == 0:
                    own = torch.exp(own - new_top)
                    sums += own[..., None] * vf[tiles.own_rows]
                    mass += own
                real = tiles.real
                rows_ = slot_rows[real]  # each query once per round: no duplicate writes
                new = new_top[real]
                keep = torch.exp(top[rows_] - new)  # 0 where top was -inf (the first round)
                acc[rows_] = acc[rows_] * keep[:, None] + sums[real]
                den[rows_] = den[rows_] * keep + mass[real]
                top[rows_] = new
        acc.div_(den.clamp_min(MIN_NORMALISER)[:, None])
    return acc.view(b, h, q_len, d).to(q.dtype)


def lsh_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rotations: torch.Tensor | None,
    chunk: int,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    return_weights: bool = False,
    hashing: str = "angular",
    n_hashes: int = 1,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over each query's bucket chunks (one per hash round, each key once) plus itself.

    The queries are the last q_len positions. rotations: the (n_hashes * rows, d or d + 1) projection.
    return_weights: also the weights it used, as a dense (b, h, q_len, k_len) matrix (zero off its support).
    """
    check_qkv(q, k, v)
    k, v = repeat_kv_heads(q, k, v)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if not grad and not return_weights and INFERENCE_GROUP_ROWS:  # 0: the one-pass form below (benchmarks)
        rounds = sorted_rounds(q, k, rotations, chunk, causal, key_padding_mask, hashing, n_hashes)
        return attend_in_groups(q, k, v, rounds)
    b, h, q_len, d = q.shape
    k_len = k.shape[-2]
    rounds = hash_rounds(q, k, rotations, chunk, causal, key_padding_mask, hashing, n_hashes)
    qf, kf, vf = q.reshape(-1, d), k.reshape(-1, d), with_ones(v).reshape(-1, d + 1)  # rows
    scale = 1 / math.sqrt(d)
    own_rows = (torch.arange(b * h, device=q.device)[:, None] * k_len
                + torch.arange(k_len - q_len, k_len, device=q.device)).flatten()  # (b * h * q_len,)
    own = (qf * kf[own_rows]).sum(-1) * scale  # every query sees itself
    logits = []
    for tiles in rounds:
        qs = qf[tiles.q_rows]  # (NB, B, d): the queries in this round's order
        pair = (qs[tiles.pair_block] @ kf[tiles.k_rows].transpose(-1, -2)) * scale  # (P, B, T)
        logits.append(pair.masked_fill(~tiles.allowed, float("-inf")))
    top = own
    for tiles, pair in zip(rounds, logits, strict=True):
        top = torch.maximum(top, round_max(tiles, pair))
    top = top.detach()  # one shared scale per query, over every round
    acc = torch.exp(own - top)[:, None] * vf[own_rows]  # (rows, d + 1)
    pair_weights = []
    for tiles, pair in zip(rounds, logits, strict=True):
        weights = torch.exp(pair - top[tiles.q_rows][tiles.pair_block][..., None])  # (P, B, T)
        slots = torch.zeros(*tiles.q_rows.shape, d + 1, dtype=acc.dtype, device=q.device)
        slots = slots.index_add(0, tiles.pair_block, weights @ vf[tiles.k_rows])  # (NB, B, d + 1)
        acc = acc + slots.flatten(0, 1)[tiles.unsort]
        pair_weights.append(weights)
    out = normalise(acc).view(b, h, q_len, d)
    if not return_weights:
        return out
    z = acc[:, -1]  # each query row's softmax denominator (v was extended by a column of ones)
    dense = torch.zeros(b * h * q_len, k_len, dtype=acc.dtype, device=q.device)
    rows = torch.arange(b * h * q_len, device=q.device)
    dense.index_put_((rows, own_rows % k_len), torch.exp(own - top) / z, accumulate=True)
    for tiles, weights in zip(rounds, pair_weights, strict=True):
        pair_rows = tiles.q_rows[tiles.pair_block][..., None].expand_as(weights)  # (P, B, T); padding slots add 0
        pair_cols = tiles.k_pos[:, None, :].expand_as(weights)
        dense.index_put_((pair_rows, pair_cols), weights / z[pair_rows], accumulate=True)
    return out, dense.view(b, h, q_len, k_len).to(q.dtype)


@torch.no_grad()
def lsh_support(q: torch.Tensor, k: torch.Tensor, rotations: torch.Tensor | None, chunk: int, causal: bool,
                hashing: str = "angular", n_hashes: int = 1, exclude_window: int = 0) -> torch.Tensor:
    """(b, h, q_len, k_len) bool: the keys each query's softmax reads exactly (its chunks, and itself unless a
    window holds it): dense, for measuring recall, not for long sequences."""
    from layers.attention.local import in_window

    k = repeat_kv_heads(q, k, k)[0]
    b, h, q_len, _ = q.shape
    k_len = k.shape[-2]
    dense = torch.zeros(b * h * q_len, k_len, dtype=torch.bool, device=q.device)
    for tiles in hash_rounds(q, k, rotations, chunk, causal, None, hashing, n_hashes):
        allowed = tiles.allowed
        rows = tiles.q_rows[tiles.pair_block][..., None].expand_as(allowed)
        cols = tiles.k_pos[:, None, :].expand_as(allowed)
        dense[rows[allowed], cols[allowed]] = True
    dense = dense.view(b, h, q_len, k_len)
    q_pos = torch.arange(k_len - q_len, k_len, device=q.device)[:, None]
    k_pos = torch.arange(k_len, device=q.device)[None, :]
    if exclude_window:
        return dense | in_window(q_pos, k_pos, exclude_window, causal, k_len)
    return dense | (q_pos == k_pos)


def hash_flops_per_token(head_dim: int, n_buckets: int, hashing: str = "angular", causal: bool = True) -> float:
    """Matmul FLOPs per token and head of hashing its query and its key in one round (nothing with one bucket)."""
    if hashing == "smyrf":
        dim = head_dim + 1  # the transformed vectors
        return 2 * (2 * dim * (1 if not causal else n_buckets // 2))
    return 2 * (2 * head_dim * (n_buckets // 2)) if n_buckets > 1 else 0


def tiles_per_block(n_buckets: int) -> float:
    """Key tiles a block of sorted queries reads: 2 with one bucket (aligned), ~3 with several (measured)."""
    return 2.0 if n_buckets == 1 else 3.0


def lsh_flops_per_token(head_dim: int, n_buckets: int, chunk: int, hashing: str = "angular", n_hashes: int = 1,
                        causal: bool = True) -> float:
    """Forward matmul FLOPs per query and head: per round, hashing, then q.k and p.v1 over the key tiles of
    its block (a balanced round reads ~3 tiles too: its block's chunks span about three tiles)."""
    balanced = hashing == "smyrf" and not causal
    entries = chunk * (3.0 if balanced else tiles_per_block(n_buckets))
    products = (2 * head_dim + 2 * (head_dim + 1)) * entries
    per_round = hash_flops_per_token(head_dim, n_buckets, hashing, causal) + products
    return n_hashes * per_round


def check_hashing(kind: str, hashing: str, n_hashes: int) -> None:
    """A ValueError naming the option unless hashing is known and n_hashes >= 1."""
    if hashing not in HASHINGS:
        raise ValueError(f"{kind}: hashing = {hashing!r} is invalid: must be one of {HASHINGS}")
    if n_hashes < 1:
        raise ValueError(f"{kind}: n_hashes = {n_hashes} is invalid: must be >= 1")


def make_projection(hashing: str, n_buckets: int, n_hashes: int, head_dim: int,
                    redraw_every: int) -> RandomProjection | None:
    """The hash rounds' random rotations: n_buckets / 2 rows per round (angular; none with one bucket); for smyrf,
    of the transformed (head_dim + 1) vectors, 1 + n_buckets / 2 rows per round: the balanced rounds' direction
    (non-causal), then the rotations of the causal rounds' buckets."""
    if hashing == "angular":
        return RandomProjection(n_hashes * (n_buckets // 2), head_dim, redraw_every) if n_buckets > 1 else None
    return RandomProjection(n_hashes * (1 + n_buckets // 2), head_dim + 1, redraw_every)


class LSHAttention(nn.Module):
    """Hash-bucketed sparse attention: `n_buckets` LSH buckets, `chunk` keys of its bucket per query and round.

    hashing: "angular" (Reformer: angular LSH of q and k) or "smyrf" (asymmetric transform for inner
    products, balanced clusters when non-causal); n_hashes: hash rounds, their keys united (each key once).
    """

    OPTIONS_AT_CALL = ("return_weights",)  # keywords a caller may add: see DenseAttention

    def __init__(self, head_dim: int, n_buckets: int = 8, chunk: int = 64, redraw_every: int = 1000,
                 hashing: str = "angular", n_hashes: int = 1):
        super().__init__()
        if n_buckets < 1 or (n_buckets > 1 and n_buckets % 2):
            raise ValueError(f"lsh: n_buckets = {n_buckets} is invalid: must be 1 or an even number >= 2")
        if chunk < 1:
            raise ValueError(f"lsh: chunk = {chunk} is invalid: must be >= 1")
        check_hashing("lsh", hashing, n_hashes)
        self.head_dim, self.n_buckets, self.chunk = head_dim, n_buckets, chunk
        self.hashing, self.n_hashes = hashing, n_hashes
        self.rotations = make_projection(hashing, n_buckets, n_hashes, head_dim, redraw_every)

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
        return lsh_attention(q, k, v, rotations, self.chunk, causal, key_padding_mask, return_weights,
                             self.hashing, self.n_hashes)

    def support(self, q: torch.Tensor, k: torch.Tensor, causal: bool = True) -> torch.Tensor:
        """(batch, heads, q_len, k_len) bool: the keys each query reads (dense; for measuring recall)."""
        rotations = None if self.rotations is None else self.rotations.weight
        return lsh_support(q, k, rotations, self.chunk, causal, self.hashing, self.n_hashes)

    def decode_state(self) -> BucketState | None:
        """Angular hashing decodes from the last `chunk` keys of each bucket of each round (all a causal query can
        read); SMYRF keeps every key (None: its causal transform divides by the largest key norm so far)."""
        if self.hashing != "angular":
            return None
        return BucketState(self.chunk, self.n_buckets, self.rotations, self.n_hashes)

    def flops_per_token(self, seq_len: int, causal: bool = True) -> float:
        """Forward FLOPs per query token and head (tiles per query block estimated: see tiles_per_block)."""
        return lsh_flops_per_token(self.head_dim, self.n_buckets, min(self.chunk, seq_len), self.hashing,
                                   self.n_hashes, causal)

    def extra_repr(self) -> str:
        extra = "" if self.hashing == "angular" and self.n_hashes == 1 else (
            f", hashing={self.hashing}, n_hashes={self.n_hashes}")
        return f"head_dim={self.head_dim}, n_buckets={self.n_buckets}, chunk={self.chunk}{extra}"
