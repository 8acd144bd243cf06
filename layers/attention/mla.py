"""Multi-head latent attention (MLA, DeepSeek-V2 / V3): low-rank queries and a shared compressed key/value latent.

    q      = q_b(norm(q_a(x)))            (or q_proj(x) without a query rank), per head [nope | rope]
    latent, k_rope = kv_a(x)              the compressed key/value and one rotary key shared by all heads
    k, v   = kv_b(norm(latent))           per head [k_nope | v]
    k      = [k_nope | rotate(k_rope)],   q = [q_nope | rotate(q_rope)]

Any attention kind then runs on (q, k, v): the value head, narrower than the query/key head, is
zero-padded to its width (the output's padded columns are dropped), so the kinds' one-width contract
holds. Rotary embeddings cover the qk_rope_head_dim part only; the KV cache holds the expanded keys
and values (simple, not the latent: memory is that of a plain multi-head cache).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from layers.attention.self_attention import SelfAttention
from layers.linear import make_linear
from layers.norm import RMSNorm
from layers.rotary import apply_rotary

LATENT_NORM_EPS = 1e-6  # DeepSeek's latent norms use this eps, not the model's


class LatentSelfAttention(SelfAttention):
    """MLA projections around an attention kind (see the module docstring); n_kv_heads = n_heads."""

    def __init__(self, d_model: int, n_heads: int, kind: str = "dense", kind_kwargs: dict | None = None,
                 linear: str = "dense", linear_kwargs: dict | None = None, layer_idx: int = 0, *,
                 kv_lora_rank: int, qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int,
                 q_lora_rank: int | None = None, bias: str = "none"):
        nn.Module.__init__(self)
        if bias not in ("none", "all"):
            raise ValueError(f"latent attention: bias={bias!r} must be 'none' or 'all'")
        if v_head_dim > qk_nope_head_dim + qk_rope_head_dim:
            raise ValueError(f"latent attention: v_head_dim={v_head_dim} must be <= qk_nope_head_dim + "
                             f"qk_rope_head_dim = {qk_nope_head_dim + qk_rope_head_dim}")
        from layers.attention import KINDS

        lk, has_bias = linear_kwargs or {}, bias == "all"
        self.n_heads = self.n_kv_heads = n_heads
        self.nope, self.rope, self._v_head_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.kv_lora_rank, self.q_lora_rank = kv_lora_rank, q_lora_rank
        self.layer_idx, self.qk_norm, self.kind = layer_idx, "none", kind
        if q_lora_rank is None:
            self.q_proj = make_linear(linear, d_model, n_heads * self.head_dim, **lk)
        else:
            self.q_a_proj = make_linear(linear, d_model, q_lora_rank, bias=has_bias, **lk)
            self.q_a_norm = RMSNorm(q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = make_linear(linear, q_lora_rank, n_heads * self.head_dim, **lk)
        self.kv_a_proj = make_linear(linear, d_model, kv_lora_rank + qk_rope_head_dim, bias=has_bias, **lk)
        self.kv_a_norm = RMSNorm(kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = make_linear(linear, kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim), **lk)
        self.o_proj = make_linear(linear, n_heads * v_head_dim, d_model, bias=has_bias, **lk)
        self.kernel = KINDS[kind](head_dim=self.head_dim, **(kind_kwargs or {}))

    v_head_dim = property(lambda self: self._v_head_dim, doc="The width of one value head.")

    def project(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None):
        b, s, _ = x.shape
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        q = q.view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        latent, k_rope = self.kv_a_proj(x).split([self.kv_lora_rank, self.rope], dim=-1)
        kv = self.kv_b_proj(self.kv_a_norm(latent)).view(b, s, self.n_heads, self.nope + self.v_head_dim)
        k_nope, v = kv.transpose(1, 2).split([self.nope, self.v_head_dim], dim=-1)
        k_rope = k_rope.view(b, 1, s, self.rope)
        if cos is not None:
            q_rope, k_rope = apply_rotary(q_rope, cos, sin), apply_rotary(k_rope, cos, sin)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(-1, self.n_heads, -1, -1)], dim=-1)
        v = F.pad(v, (0, self.head_dim - self.v_head_dim))  # the kinds take one width: zeros, dropped after
        return q, k, v

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token: the projections plus the attention kind over seq_len."""
        projs = [self.kv_a_proj, self.kv_b_proj, self.o_proj]
        projs += [self.q_proj] if self.q_lora_rank is None else [self.q_a_proj, self.q_b_proj]
        return sum(m.flops_per_token() for m in projs) + self.n_heads * self.kernel.flops_per_token(seq_len,
                                                                                                  causal=True)
