"""Multi-head self-attention: projections, rotary embeddings, KV cache, and a pluggable kind."""

from __future__ import annotations

import torch
from torch import nn

from layers.attention import KINDS
from layers.attention.decoding import DecodingState
from layers.linear import make_linear
from layers.norm import RMSNorm
from layers.rotary import apply_rotary

BIASES = ("none", "qkv", "all")  # which projections have a bias: Llama none, Qwen2 q/k/v, GPT-2 all four
QK_NORMS = ("none", "head", "full")  # RMSNorm of q and k: per head (Qwen3) or over all heads (OLMoE)


def kinds_with_weights() -> list[str]:
    """The attention kinds that can return the attention weights they use."""
    return sorted(name for name, kind in KINDS.items() if "return_weights" in getattr(kind, "OPTIONS_AT_CALL", ()))


def _layer_of(cache, layer_idx: int):
    """The cache's layer `layer_idx` (None without a cache, or before a lazily grown cache has it)."""
    layers = getattr(cache, "layers", None)
    return layers[layer_idx] if layers is not None and layer_idx < len(layers) else None


class SelfAttention(nn.Module):
    """q/k/v/o projections around an attention kind; grouped-query attention when n_kv_heads < n_heads.

    head_dim defaults to d_model / n_heads. bias: which projections have a bias (BIASES). qk_norm: an
    RMSNorm (eps norm_eps) of the queries and keys before the rotary embedding, per head of head_dim
    ("head", Qwen3) or over the whole projection ("full", OLMoE).
    """

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
        head_dim: int | None = None,
        bias: str = "none",
        qk_norm: str = "none",
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        if bias not in BIASES or qk_norm not in QK_NORMS:
            raise ValueError(f"bias={bias!r} must be one of {BIASES} and qk_norm={qk_norm!r} one of {QK_NORMS}")
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = head_dim or d_model // n_heads
        self.layer_idx = layer_idx
        lk = linear_kwargs or {}
        qkv_bias = bias != "none"
        self.q_proj = make_linear(linear, d_model, n_heads * self.head_dim, bias=qkv_bias, **lk)
        self.k_proj = make_linear(linear, d_model, n_kv_heads * self.head_dim, bias=qkv_bias, **lk)
        self.v_proj = make_linear(linear, d_model, n_kv_heads * self.head_dim, bias=qkv_bias, **lk)
        self.o_proj = make_linear(linear, n_heads * self.head_dim, d_model, bias=bias == "all", **lk)
        self.qk_norm = qk_norm
        if qk_norm != "none":
            per_head = qk_norm == "head"
            self.q_norm = RMSNorm(self.head_dim if per_head else n_heads * self.head_dim, norm_eps)
            self.k_norm = RMSNorm(self.head_dim if per_head else n_kv_heads * self.head_dim, norm_eps)
        self.kind = kind
        self.kernel = KINDS[kind](head_dim=self.head_dim, **(kind_kwargs or {}))

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        cache=None,
        key_padding_mask: torch.Tensor | None = None,
        kv_length: int | None = None,
        implementation: str = "sdpa",
        return_weights: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x: (batch, seq, d_model); cos/sin: the rotary angles (None: no rotary, positions are elsewhere).
        `cache` is a transformers Cache (anything with update(k, v, layer_idx)).

        kv_length: the keys that exist after this step (past + current); a static cache returns its whole
        preallocated buffer, of which only these are written. implementation: "sdpa" or "eager" (the
        transformers config's _attn_implementation), for kinds that have both. return_weights: also return
        the (batch, heads, queries, keys) attention weights the kind used (a ValueError for kinds that
        never form them).
        """
        b, s, _ = x.shape
        q, k, v = self.project(x, cos, sin)  # (batch, heads, seq, head_dim)
        state = _layer_of(cache, self.layer_idx)
        if isinstance(state, DecodingState):  # the kind's own decoding state (layers/attention/decoding.py)
            return self._finish(self._attend_with_state(state, q, k, v, key_padding_mask, kv_length, implementation,
                                                        return_weights), b, s, return_weights)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # keys/values of every position so far
            if kv_length is not None and k.shape[2] != kv_length:
                if k.shape[2] < kv_length:
                    raise ValueError(f"the cache returned {k.shape[2]} keys but {kv_length} exist: caches that drop "
                                     f"keys (sliding-window caches) are not supported; use the dynamic or static cache")
                k, v = k[:, :, :kv_length], v[:, :, :kv_length]  # a static cache: the written part only
        kw = self._call_options(implementation, return_weights)
        if key_padding_mask is not None:
            kw["key_padding_mask"] = key_padding_mask
        return self._finish(self.kernel(q, k, v, causal=True, **kw), b, s, return_weights)

    def _call_options(self, implementation: str, return_weights: bool) -> dict:
        """The optional keywords of the kind's call (only those it takes; return_weights refused by kinds without)."""
        kw = {}
        at_call = getattr(self.kernel, "OPTIONS_AT_CALL", ())
        if implementation != "sdpa" and "implementation" in at_call:
            kw["implementation"] = implementation
        if return_weights:
            if "return_weights" not in at_call:
                raise ValueError(f"attention kind {self.kind!r} never forms attention weights (output_attentions "
                                 f"is supported by: {kinds_with_weights()})")
            kw["return_weights"] = True
        return kw

    def _attend_with_state(self, state, q, k, v, key_padding_mask, kv_length, implementation, return_weights):
        """The kind attends through its decoding state, which then holds this step's keys too."""
        if kv_length is None:
            kv_length = state.get_seq_length() + q.shape[-2]
        return state.attend(self.kernel, q, k, v, key_padding_mask, kv_length,
                            **self._call_options(implementation, return_weights))

    def _finish(self, out, b: int, s: int, return_weights: bool):
        """The output projection of the kind's (b, heads, s, head_dim) output (and the weights, if asked for)."""
        out, weights = out if return_weights else (out, None)
        out = out[..., : self.v_head_dim]  # (a narrower value head is zero-padded to head_dim: see project)
        out = self.o_proj(out.transpose(1, 2).reshape(b, s, self.n_heads * self.v_head_dim))
        return (out, weights) if return_weights else out

    v_head_dim = property(lambda self: self.head_dim, doc="The width of one value head (that of q and k here).")

    def project(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None):
        """q (b, heads, s, head_dim), k and v (b, kv_heads, s, head_dim) of x (b, s, d_model), rotated."""
        b, s, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if cos is not None:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return q, k, v

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token: the four projections plus the attention kind over seq_len."""
        proj = sum(m.flops_per_token() for m in (self.q_proj, self.k_proj, self.v_proj, self.o_proj))
        if self.qk_norm != "none":  # a square, a mean, a scale and a product per element (an estimate)
            proj += 4 * (self.n_heads + self.n_kv_heads) * self.head_dim
        return proj + self.n_heads * self.kernel.flops_per_token(seq_len, causal=True)
