"""Multi-head self-attention: projections, rotary embeddings, KV cache, and a pluggable kind."""

from __future__ import annotations

import torch
from torch import nn

from layers.attention import KINDS
from layers.linear import make_linear
from layers.rotary import apply_rotary


def kinds_with_weights() -> list[str]:
    """The attention kinds that can return the attention weights they use."""
    return sorted(name for name, kind in KINDS.items() if "return_weights" in getattr(kind, "OPTIONS_AT_CALL", ()))


class SelfAttention(nn.Module):
    """q/k/v/o projections around an attention kind; grouped-query attention when n_kv_heads < n_heads."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        kind: str = "dense",
        kind_kwargs: dict | None = None,
        linear: str = "dense",
        linear_kwargs: dict | None = None,
        layer_idx: int = 0,
    ):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.layer_idx = layer_idx
        lk = linear_kwargs or {}
        self.q_proj = make_linear(linear, d_model, n_heads * self.head_dim, **lk)
        self.k_proj = make_linear(linear, d_model, n_kv_heads * self.head_dim, **lk)
        self.v_proj = make_linear(linear, d_model, n_kv_heads * self.head_dim, **lk)
        self.o_proj = make_linear(linear, n_heads * self.head_dim, d_model, **lk)
        self.kind = kind
        self.kernel = KINDS[kind](head_dim=self.head_dim, **(kind_kwargs or {}))

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache=None,
        key_padding_mask: torch.Tensor | None = None,
        kv_length: int | None = None,
        implementation: str = "sdpa",
        return_weights: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x: (batch, seq, d_model). `cache` is a transformers Cache (anything with update(k, v, layer_idx)).

        kv_length: the keys that exist after this step (past + current); a static cache returns its whole
        preallocated buffer, of which only these are written. implementation: "sdpa" or "eager" (the
        transformers config's _attn_implementation), for kinds that have both. return_weights: also return
        the (batch, heads, queries, keys) attention weights the kind used (a ValueError for kinds that
        never form them).
        """
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        # (batch, heads, seq, head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # keys/values of every position so far
            if kv_length is not None and k.shape[2] != kv_length:
                if k.shape[2] < kv_length:
                    raise ValueError(f"the cache returned {k.shape[2]} keys but {kv_length} exist: caches that drop "
                                     f"keys (sliding-window caches) are not supported; use the dynamic or static cache")
                k, v = k[:, :, :kv_length], v[:, :, :kv_length]  # a static cache: the written part only
        kw = {} if key_padding_mask is None else {"key_padding_mask": key_padding_mask}
        at_call = getattr(self.kernel, "OPTIONS_AT_CALL", ())
        if implementation != "sdpa" and "implementation" in at_call:
            kw["implementation"] = implementation
        if return_weights:
            if "return_weights" not in at_call:
                raise ValueError(f"attention kind {self.kind!r} never forms attention weights (output_attentions "
                                 f"is supported by: {kinds_with_weights()})")
            kw["return_weights"] = True
        out = self.kernel(q, k, v, causal=True, **kw)
        out, weights = out if return_weights else (out, None)
        out = self.o_proj(out.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim))
        return (out, weights) if return_weights else out

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token: the four projections plus the attention kind over seq_len."""
        proj = sum(m.flops_per_token() for m in (self.q_proj, self.k_proj, self.v_proj, self.o_proj))
        return proj + self.n_heads * self.kernel.flops_per_token(seq_len, causal=True)
