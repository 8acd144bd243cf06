"""Performer attention: FAVOR+ positive orthogonal random features, O(n * m) time and memory.

exp(q.k / sqrt(d)) is estimated without bias by phi(q).phi(k), with phi(x)_r = exp(w_r.x - |x|^2 / 2) / sqrt(m)
on x = input / d^(1/4) and w_r the rows of a random orthogonal-Gaussian matrix. Numerically:
- a key feature is at most exp(|w_r|^2 / 2); a constant per feature, exp(-s_r) with s_r = max(0, |w_r|^2 / 2
  - 40), keeps it under exp(40) and moves to the query side. No key statistic couples positions
  (Performer's usual stabiliser, the max over all keys, would): a future token never changes a past
  output and decoding with a KV cache equals a full forward;
- each query's features are divided by their own maximum, which cancels in its normalised output.
The causal form runs chunk by chunk: prefix sums of phi(k) v^T between chunks (one state per
chunk), a masked C x C product inside each chunk.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from layers.attention.common import check_qkv, normalise, repeat_kv_heads, with_ones
from layers.attention.decoding import FeatureSumState
from layers.attention.random_projection import RandomProjection

# Causal prefill without autograd runs this many positions at a time (a running state between groups).
INFERENCE_GROUP_ROWS = 512  # 1.8x fused SDPA's peak at n = 16k (1024: 2.7x); still faster than one pass
KEY_LOG_BOUND = 40.0  # key features stay under exp(40): sums over a long sequence stay finite in float32


def favor_features(x: torch.Tensor, proj: torch.Tensor, is_query: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """FAVOR+ features (b, h, n, m) of x (b, h, n, d), in float32.

    Query features come with their per-row log-scale `stab` (b, h, n, 1): phi(q).phi(k) equals the
    estimate of exp(q.k / sqrt(d)) times exp(-stab). Key features come with None.
    """
    x = x.float() * x.shape[-1] ** -0.25
    w = proj.float()
    logits = x @ w.T - (x * x).sum(-1, keepdim=True) / 2  # (b, h, n, m): w.x - |x|^2 / 2, at most |w|^2 / 2
    shift = ((w * w).sum(-1) / 2 - KEY_LOG_BOUND).clamp_min(0)  # (m,): a constant per feature
    if not is_query:
        return torch.exp(logits - shift), None  # at most exp(KEY_LOG_BOUND)
    logits = logits + shift
    stab = logits.amax(-1, keepdim=True).detach()
    return torch.exp(logits - stab) / w.shape[0], stab


def linear_attention(phi_q: torch.Tensor, phi_k: torch.Tensor, v1: torch.Tensor, causal: bool,
                     chunk: int, state: torch.Tensor | None = None) -> torch.Tensor:
    """sum_j phi(q_i).phi(k_j) v1_j over the keys query i sees: (b, h, q_len, e) for v1 (b, h, k_len, e).

    The queries are the last q_len positions. Causal: a prefix state over the keys before the
    first query (plus `state` (b, h, m, e), the sum over keys before phi_k's first, if given), then
    chunks of `chunk` positions.
    """
    if not causal:
        return phi_q @ (phi_k.transpose(-1, -2) @ v1)  # (b, h, q_len, m) @ (b, h, m, e)
    q_len = phi_q.shape[-2]
    offset = phi_k.shape[-2] - q_len
    if offset:  # keys before the first query (decoding): one (m, e) state for all
        prefix = phi_k[:, :, :offset].transpose(-1, -2) @ v1[:, :, :offset]  # (b, h, m, e)
        state = prefix if state is None else state + prefix
        phi_k, v1 = phi_k[:, :, offset:], v1[:, :, offset:]
    chunk = max(1, min(chunk, q_len))
    n_chunks = math.ceil(q_len / chunk)
    pad = n_chunks * chunk - q_len

    def chunks(x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 0, 0, pad))
        return x.view(*x.shape[:2], n_chunks, chunk, x.shape[-1])  # (b, h, n_chunks, chunk, .)

    qc, kc, vc = chunks(phi_q), chunks(phi_k), chunks(v1)
    kv = kc.transpose(-1, -2) @ vc  # (b, h, n_chunks, m, e): each chunk's sum of phi(k) v1^T
    # The keys of all earlier chunks: an exclusive prefix sum. (cumsum - kv would cancel catastrophically
    # when feature magnitudes span many orders, leaving negative normalisers.)
    before = F.pad(kv.cumsum(2)[:, :, :-1], (0, 0, 0, 0, 1, 0))
    if state is not None:
        before = before + state[:, :, None]
    inter = qc @ before  # (b, h, n_chunks, chunk, e)
    scores = (qc @ kc.transpose(-1, -2)).tril()  # (b, h, n_chunks, chunk, chunk), causal inside the chunk
    out = inter + scores @ vc
    return out.flatten(2, 3)[:, :, :q_len]


def performer_flops_per_token(head_dim: int, n_features: int, seq_len: int, causal: bool, chunk: int) -> float:
    """Forward matmul FLOPs per query and head at prefill: features of q and k, then the linear attention."""
    d, m, e = head_dim, n_features, head_dim + 1
    features = 2 * (2 * d * m)
    if not causal:
        return features + 2 * m * e + 2 * m * e  # phi(k)^T v1 per key, phi(q) @ kv per query
    chunk = max(1, min(chunk, seq_len))
    padded = math.ceil(seq_len / chunk) * chunk
    per_row = 2 * m * e + 2 * m * e + 2 * chunk * m + 2 * chunk * e  # chunk state, inter, intra scores, intra p.v
    return features + per_row * padded / seq_len


class PerformerAttention(nn.Module):
    """FAVOR+ attention with `n_features` positive orthogonal random features (causal by prefix sums)."""

    def __init__(self, head_dim: int, n_features: int = 256, chunk: int = 64, redraw_every: int = 1000):
        super().__init__()
        if n_features < 1 or chunk < 1:
            raise ValueError(f"performer: n_features = {n_features} and chunk = {chunk} must both be >= 1")
        self.head_dim, self.n_features, self.chunk = head_dim, n_features, chunk
        self.features = RandomProjection(n_features, head_dim, redraw_every)

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
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, self.features.weight))
        if causal and key_padding_mask is None and not grad and k.shape[-2] == q.shape[-2] > INFERENCE_GROUP_ROWS:
            return self._causal_in_groups(q, k, v)
        with torch.autocast(q.device.type, enabled=False):  # exp features need float32
            phi_q, _ = favor_features(q, self.features.weight, is_query=True)
            phi_k, _ = favor_features(k, self.features.weight, is_query=False)
            if key_padding_mask is not None:
                phi_k = phi_k * key_padding_mask[:, None, :, None]
            acc = linear_attention(phi_q, phi_k, with_ones(v.float()), causal, self.chunk)
        return normalise(acc).to(q.dtype)

    def _causal_in_groups(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal prefill without autograd, INFERENCE_GROUP_ROWS positions at a time with a running (m, e) state:
        the same sums as the one-pass form, but only one group's features and chunk states are alive
        (peak memory: the output plus one group's scratch, issue 18)."""
        return self._causal_from(q, k, v, None, None)[0]

    def _causal_from(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor | None,
                     key_padding_mask: torch.Tensor | None, keep_features: bool = False):
        """Causal attention of q over `state` (the past's sum of phi(k) [v, 1]^T, or None) and the keys k, v of q's
        own positions (as many heads as q), a group of rows at a time without autograd (one group with it).

        Returns (output, the sum after these keys, (phi(k) with padding keys zeroed, [v, 1]) in float32 if
        keep_features else None).
        """
        n = q.shape[-2]
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, self.features.weight))
        group = n if grad else max(self.chunk, INFERENCE_GROUP_ROWS // self.chunk * self.chunk)
        outs, kept = [], []
        out = None if n <= group else q.new_empty(q.shape)  # a long prefill is written in place
        with torch.autocast(q.device.type, enabled=False):
            for start in range(0, n, group):
                rows = slice(start, min(start + group, n))
                phi_q, _ = favor_features(q[:, :, rows], self.features.weight, is_query=True)
                phi_k, _ = favor_features(k[:, :, rows], self.features.weight, is_query=False)
                if key_padding_mask is not None:
                    phi_k = phi_k * key_padding_mask[:, None, rows, None]
                v1 = with_ones(v[:, :, rows].float())
                piece = normalise(linear_attention(phi_q, phi_k, v1, True, self.chunk, state)).to(q.dtype)
                if out is None:
                    outs.append(piece)
                else:
                    out[:, :, rows] = piece
                if keep_features:
                    kept.append((phi_k, v1))
                step = phi_k.transpose(-1, -2) @ v1  # (b, h, m, e): this group's keys, for the later groups
                state = step if state is None else state + step
        out = out if out is not None else outs[0]
        features = (torch.cat([p for p, _ in kept], 2), torch.cat([x for _, x in kept], 2)) if keep_features else None
        return out, state, features

    # ---- decoding: a running sum instead of the keys (layers/attention/decoding.py) ----------------------------
    def decode_state(self) -> FeatureSumState:
        """Performer decodes from the running sum of phi(k) [v, 1]^T: O(n_features x head_dim) per token, whatever
        the position (the prefill builds it)."""
        return FeatureSumState()

    def attend_with_state(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor | None,
                          key_padding_mask: torch.Tensor | None = None, keep_features: bool = False):
        """Causal attention of q over the past summed in `state` ((b, heads, m, head_dim + 1) float32, None: no past)
        and the new keys k, v of q's own positions; key_padding_mask (b, q_len) covers the new keys.

        Returns (output, the sum after the new keys, their (phi(k), [v, 1]) if keep_features else None). The same sums
        as forward() over the whole sequence: no key statistic couples positions.
        """
        check_qkv(q, k, v)
        if k.shape[-2] != q.shape[-2]:
            raise ValueError(f"attend_with_state takes the keys of the queries' own positions: q_len={q.shape[-2]}, "
                             f"k_len={k.shape[-2]}")
        k, v = repeat_kv_heads(q, k, v)
        return self._causal_from(q, k, v, state, key_padding_mask, keep_features)

    def flops_per_token(self, seq_len: int, causal: bool = True) -> float:
        """Forward FLOPs per query token and head."""
        return performer_flops_per_token(self.head_dim, self.n_features, seq_len, causal, self.chunk)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, n_features={self.n_features}, chunk={self.chunk}"
