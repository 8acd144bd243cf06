"""Scatterbrain attention: a low-rank (Performer) estimate everywhere, exact on a sparse support.

For query i, with phi the FAVOR+ features and S_i its sparse support (a sliding window and/or
its LSH bucket chunk, never counting a pair twice):

    a_ij = exp(q_i.k_j / sqrt(d))   if j in S_i       (exact)
    a_ij = phi(q_i).phi(k_j)        otherwise         (low-rank estimate)
    out_i = sum_j a_ij v_j / sum_j a_ij               (one shared normaliser)

computed as the low-rank sums over every visible key plus, on S_i only, the correction
exp(q_i.k_j / sqrt(d)) - phi(q_i).phi(k_j): the low-rank term is replaced, not added. All terms
of a query share one scale exp(-M_i), M_i the largest of its feature and exact log-weights.
Time and memory O(n * (m + |S|)); a support that covers every pair gives exact attention.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from layers.attention.common import check_qkv, normalise, repeat_kv_heads, with_ones
from layers.attention.decoding import WindowAndSumState
from layers.attention.local import in_window, key_windows, query_windows, window_layout, window_mask
from layers.attention.lsh import (
    BucketTiles,
    check_hashing,
    hash_flops_per_token,
    hash_rounds,
    lsh_support,
    make_projection,
    round_max,
    tiles_per_block,
)
from layers.attention.performer import favor_features, linear_attention, performer_flops_per_token
from layers.attention.random_projection import RandomProjection

# Causal prefill without autograd (window support only) runs this many positions at a time.
INFERENCE_GROUP_ROWS = 512


class ScatterbrainAttention(nn.Module):
    """Performer with `n_features` features + exact attention on a `window` and/or `lsh_chunk` LSH support.

    hashing / n_hashes: the LSH support's hashing, as the `lsh` kind's ("smyrf": asymmetric transform for inner
    products, balanced when non-causal; n_hashes rounds united, every pair counted once).
    """

    def __init__(
        self,
        head_dim: int,
        n_features: int = 128,
        window: int = 64,
        lsh_chunk: int = 0,
        n_buckets: int = 8,
        chunk: int = 64,
        redraw_every: int = 1000,
        hashing: str = "angular",
        n_hashes: int = 1,
    ):
        super().__init__()
        for name, value, low in (("n_features", n_features, 1), ("window", window, 0), ("lsh_chunk", lsh_chunk, 0),
                                 ("chunk", chunk, 1)):
            if value < low:
                raise ValueError(f"scatterbrain: {name} = {value} is invalid: must be >= {low}")
        if n_buckets < 1 or (n_buckets > 1 and n_buckets % 2):
            raise ValueError(f"scatterbrain: n_buckets = {n_buckets} is invalid: must be 1 or an even number >= 2")
        check_hashing("scatterbrain", hashing, n_hashes)
        self.head_dim, self.n_features, self.chunk = head_dim, n_features, chunk
        self.window, self.lsh_chunk, self.n_buckets = window, lsh_chunk, n_buckets
        self.hashing, self.n_hashes = hashing, n_hashes
        self.features = RandomProjection(n_features, head_dim, redraw_every)
        self.rotations = make_projection(hashing, n_buckets, n_hashes, head_dim, redraw_every) if lsh_chunk else None

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool = True,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q: (batch, heads, q_len, head_dim); k, v: (batch, kv_heads, k_len, head_dim); queries are the last q_len."""
        check_qkv(q, k, v)
        k, v = repeat_kv_heads(q, k, v)
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        with torch.autocast(q.device.type, enabled=False):  # exp features need float32
            if causal and not grad and not self.lsh_chunk and self.window and q.shape[-2] == k.shape[-2]:
                return self._causal_window_in_groups(q, k, v, key_padding_mask)
            out = self._attend(q.float(), k.float(), v.float(), causal, key_padding_mask)
        return out.to(q.dtype)

    def _causal_window_in_groups(self, q, k, v, key_padding_mask):
        """Causal prefill of a window support without autograd, INFERENCE_GROUP_ROWS positions at a time: the same
        sums as `_attend`, with a running (m, d + 1) feature state between groups and each group's window keys
        (the window - 1 keys before it, then its own); only one group's features and scores are alive (issue 18)."""
        n = q.shape[-2]
        group = max(self.chunk, INFERENCE_GROUP_ROWS // self.chunk * self.chunk)
        out = q.new_empty(q.shape)
        state = None  # sum over the keys before the group of phi(k) [v, 1]^T: (b, h, m, d + 1)
        for start in range(0, n, group):
            end, first = min(start + group, n), max(0, start - self.window + 1)
            qg, kg, vg = q[:, :, start:end].float(), k[:, :, first:end].float(), v[:, :, first:end].float()
            mask = None if key_padding_mask is None else key_padding_mask[:, first:end]
            phi_q, stab = favor_features(qg, self.features.weight, is_query=True)
            phi_k, _ = favor_features(kg, self.features.weight, is_query=False)
            if mask is not None:
                phi_k = phi_k * mask[:, None, :, None]
            v1 = with_ones(vg)
            support = WindowSupport(qg, kg, self.window, True, mask)  # the queries are the last end - start keys
            top = torch.maximum(stab, support.top())
            lr_scale = torch.exp(stab - top)
            own_k, own_v1 = phi_k[:, :, start - first:], v1[:, :, start - first:]  # the group's own positions
            acc = linear_attention(phi_q, own_k, own_v1, True, self.chunk, state) * lr_scale
            acc = acc + support.correction(phi_q * lr_scale, phi_k, v1, top)
            out[:, :, start:end] = normalise(acc).to(q.dtype)
            if end < n:  # the later groups' past
                step = own_k.transpose(-1, -2) @ own_v1
                state = step if state is None else state + step
        return out

    def _attend(self, q, k, v, causal, key_padding_mask):
        phi_q, stab = favor_features(q, self.features.weight, is_query=True)  # (b, h, q_len, m), (b, h, q_len, 1)
        phi_k, _ = favor_features(k, self.features.weight, is_query=False)  # (b, h, k_len, m)
        if key_padding_mask is not None:
            phi_k = phi_k * key_padding_mask[:, None, :, None]
        v1 = with_ones(v)  # (b, h, k_len, d + 1)
        supports = []
        if self.window:
            supports.append(WindowSupport(q, k, self.window, causal, key_padding_mask))
        if self.lsh_chunk:  # one support per hash round, each pair in one round only
            rotations = None if self.rotations is None else self.rotations.weight
            rounds = hash_rounds(q, k, rotations, self.lsh_chunk, causal, key_padding_mask, self.hashing,
                                 self.n_hashes)
            for r, tiles in enumerate(rounds):
                supports.append(BucketSupport(q, k, tiles, exclude_window=self.window, causal=causal, own=r == 0))
        # The shared scale exp(-M_i): M_i the largest log-weight of query i, low-rank or exact.
        top = stab
        for support in supports:
            top = torch.maximum(top, support.top())
        top = top.detach()  # any shared scale gives the same output
        lr_scale = torch.exp(stab - top)  # (b, h, q_len, 1), <= 1
        acc = linear_attention(phi_q, phi_k, v1, causal, self.chunk) * lr_scale  # (b, h, q_len, d + 1)
        phi_q = phi_q * lr_scale  # now phi(q_i).phi(k_j) is the low-rank weight at the scale exp(-M_i)
        for support in supports:
            acc = acc + support.correction(phi_q, phi_k, v1, top)
        return normalise(acc)

    def decode_state(self) -> WindowAndSumState | None:
        """A window support decodes from the window's keys plus the feature sum of the older ones; an LSH support
        keeps every key (None)."""
        if self.lsh_chunk or self.window < 1:
            return None
        return WindowAndSumState(self.window, self.features, self.chunk)

    def flops_per_token(self, seq_len: int, causal: bool = True) -> float:
        """Forward matmul FLOPs per query token and head: Performer, plus three products per support entry."""
        d, m, e = self.head_dim, self.n_features, self.head_dim + 1
        flops = performer_flops_per_token(d, m, seq_len, causal, self.chunk)
        per_entry = 2 * d + 2 * m + 2 * e  # exact logit, low-rank weight, correction times v1
        if self.window:
            layout = window_layout(seq_len, seq_len, self.window, causal)
            flops += per_entry * layout.n_blocks * layout.block * layout.span / seq_len
        if self.lsh_chunk:
            balanced = self.hashing == "smyrf" and not causal
            tiles = 3.0 if balanced else tiles_per_block(self.n_buckets)
            entries = tiles * min(self.lsh_chunk, seq_len)  # estimated, see lsh.py
            own = 2 * d if self.window else per_entry  # the own position's logit (and correction without a window)
            per_round = hash_flops_per_token(d, self.n_buckets, self.hashing, causal) + per_entry * entries + 2 * d
            flops += self.n_hashes * per_round - 2 * d + own  # rounds after the first compute the own logit too
        return flops

    def support(self, q: torch.Tensor, k: torch.Tensor, causal: bool = True) -> torch.Tensor:
        """(batch, heads, q_len, k_len) bool: the pairs it computes exactly (window, LSH rounds, own position)."""
        from layers.attention.local import in_window

        q_len, k_len = q.shape[-2], k.shape[-2]
        q_pos = torch.arange(k_len - q_len, k_len, device=q.device)[:, None]
        k_pos = torch.arange(k_len, device=q.device)[None, :]
        window = in_window(q_pos, k_pos, self.window, causal, k_len) if self.window else q_pos == k_pos
        if not self.lsh_chunk:
            return window.expand(q.shape[0], q.shape[1], q_len, k_len)
        rotations = None if self.rotations is None else self.rotations.weight
        return window | lsh_support(q, k, rotations, self.lsh_chunk, causal, self.hashing, self.n_hashes)

    def extra_repr(self) -> str:
        extra = "" if self.hashing == "angular" and self.n_hashes == 1 else (
            f", hashing={self.hashing}, n_hashes={self.n_hashes}")
        return (f"head_dim={self.head_dim}, n_features={self.n_features}, window={self.window}, "
                f"lsh_chunk={self.lsh_chunk}, n_buckets={self.n_buckets}{extra}")


class WindowSupport:
    """The sliding window as a Scatterbrain support: exact logits per query block, then the corrections."""

    def __init__(self, q, k, window: int, causal: bool, key_padding_mask):
        self.q_len = q.shape[-2]
        self.layout = window_layout(self.q_len, k.shape[-2], window, causal)
        self.mask = window_mask(self.layout, key_padding_mask, q.device)  # (., 1, n_blocks, block, span)
        scores = query_windows(q, self.layout) @ key_windows(k, self.layout).transpose(-1, -2)
        self.logits = (scores / math.sqrt(q.shape[-1])).masked_fill(~self.mask, float("-inf"))

    def top(self) -> torch.Tensor:
        """(b, h, q_len, 1): each query's largest exact logit in its window."""
        return self.logits.amax(-1).flatten(2)[:, :, : self.q_len, None]

    def correction(self, phi_q, phi_k, v1, top) -> torch.Tensor:
        """(b, h, q_len, d + 1): sum over the window of (exact - low-rank weight) [v, 1], at the scale exp(-top)."""
        layout = self.layout
        low_rank = query_windows(phi_q, layout) @ key_windows(phi_k, layout).transpose(-1, -2)
        exact = torch.exp(self.logits - query_windows(top, layout))
        weights = torch.where(self.mask, exact - low_rank, 0.0)  # (b, h, n_blocks, block, span)
        return (weights @ key_windows(v1, layout)).flatten(2, 3)[:, :, : self.q_len]


class BucketSupport:
    """The LSH chunks as a Scatterbrain support, minus the window's pairs when there is a window."""

    def __init__(self, q, k, tiles: BucketTiles, exclude_window: int, causal: bool, own: bool = True):
        self.shape = q.shape  # (b, h, q_len, d)
        self.tiles = tiles
        if exclude_window:  # pairs inside the window are the window's (and so is the own position)
            tiles.allowed &= ~in_window(tiles.q_pos[tiles.pair_block][:, :, None], tiles.k_pos[:, None, :],
                                        exclude_window, causal, k.shape[-2])  # (P, B, T)
        d = q.shape[-1]
        qf, kf = q.reshape(-1, d), k.reshape(-1, d)  # rows of (b * h * len, d)
        qs = qf[tiles.q_rows]  # (NB, B, d): the queries in bucket order
        scores = qs[tiles.pair_block] @ kf[tiles.k_rows].transpose(-1, -2) / math.sqrt(d)  # (P, B, T)
        self.logits = scores.masked_fill(~tiles.allowed, float("-inf"))
        self.own = (qs * kf[tiles.own_rows]).sum(-1) / math.sqrt(d)  # (NB, B)
        if exclude_window or not own:  # the window, or the first hash round, holds the own position
            self.own = torch.full_like(self.own, float("-inf"))

    def top(self) -> torch.Tensor:
        """(b, h, q_len, 1): each query's largest exact logit in its chunk (and at its own position)."""
        b, h, q_len, _ = self.shape
        own = self.own.flatten()[self.tiles.unsort]
        return torch.maximum(own, round_max(self.tiles, self.logits)).view(b, h, q_len, 1)

    def correction(self, phi_q, phi_k, v1, top) -> torch.Tensor:
        """(b, h, q_len, d + 1): sum over the chunk of (exact - low-rank weight) [v, 1], at the scale exp(-top)."""
        t = self.tiles
        b, h, q_len, d = self.shape
        m = phi_q.shape[-1]
        pf, pkf, vf = phi_q.reshape(-1, m), phi_k.reshape(-1, m), v1.reshape(-1, d + 1)
        ps, top_s = pf[t.q_rows], top.reshape(-1)[t.q_rows]  # (NB, B, m), (NB, B)
        low_rank = ps[t.pair_block] @ pkf[t.k_rows].transpose(-1, -2)  # (P, B, T)
        exact = torch.exp(self.logits - top_s[t.pair_block][..., None])
        weights = torch.where(t.allowed, exact - low_rank, 0.0)
        own = torch.where(torch.isfinite(self.own), torch.exp(self.own - top_s) - (ps * pkf[t.own_rows]).sum(-1), 0.0)
        fix = own[..., None] * vf[t.own_rows]  # (NB, B, d + 1)
        fix = fix.index_add(0, t.pair_block, weights @ vf[t.k_rows])
        return fix.flatten(0, 1)[t.unsort].view(b, h, q_len, d + 1)
