"""Attention kinds, one module each, one call signature.

`KINDS[name](head_dim=..., **budget)` builds a kind; `module(q, k, v, causal=..., key_padding_mask=None)`
runs it on (batch, heads, seq, head_dim) tensors (k, v may have fewer heads, and more positions
than q: the queries are then the last ones, as when decoding with a KV cache). Every kind
reports `flops_per_token(seq_len, causal)` per head. `SelfAttention` wraps a kind with the
projections, rotary embeddings and the KV cache that a decoder layer needs.

- dense: exact softmax attention (flash-attn or SDPA), the reference.
- local: sliding window, O(n * window).
- lsh: angular-LSH buckets (Reformer / SMYRF), O(n * chunk).
- performer: FAVOR+ random features, O(n * n_features).
- scatterbrain: Performer everywhere, exact on a local and/or LSH support, O(n * (n_features + support)).
"""

from layers.attention.dense import DenseAttention
from layers.attention.local import LocalAttention
from layers.attention.lsh import LSHAttention
from layers.attention.performer import PerformerAttention
from layers.attention.scatterbrain import ScatterbrainAttention
from layers.registry import Registry

KINDS = Registry("attention kind", {
    "dense": DenseAttention,
    "local": LocalAttention,
    "lsh": LSHAttention,
    "performer": PerformerAttention,
    "scatterbrain": ScatterbrainAttention,
})

from layers.attention.self_attention import SelfAttention  # noqa: E402  (needs KINDS)

__all__ = ["KINDS", "DenseAttention", "LSHAttention", "LocalAttention", "PerformerAttention",
           "ScatterbrainAttention", "SelfAttention"]
