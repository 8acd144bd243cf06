"""Attention kinds, one module each, one call signature.

`KINDS[name](head_dim=..., **budget)` builds a kind; `module(q, k, v, causal=...)` runs it on
(batch, heads, seq, head_dim) tensors. `SelfAttention` wraps a kind with the projections,
rotary embeddings and the KV cache that a decoder layer needs.
"""

from layers.attention.dense import DenseAttention

KINDS: dict[str, type] = {"dense": DenseAttention}

from layers.attention.self_attention import SelfAttention  # noqa: E402  (needs KINDS)

__all__ = ["KINDS", "DenseAttention", "SelfAttention"]
