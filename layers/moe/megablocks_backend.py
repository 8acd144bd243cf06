"""The megablocks path of SwiGLUExperts: megablocks' dMoE kernels (sort, gather, grouped GEMM, scatter).

It runs on the experts' own parameters: megablocks' GLU keeps w1, v1, w2 as (E * width, d), which is
our (E, width, d) `w_gate`, `w_up`, `w_down` viewed flat, so state dicts are the same on both paths.
Only imported when `layers.kernels.can_use_megablocks` says megablocks can run (CUDA, installed).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megablocks import ops
from megablocks.grouped_gemm_util import ops as gg_ops


def _dmoe(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, w_gate: torch.Tensor,
          w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """megablocks' grouped dMoE forward for (T, K) assignments that are all routed -> (T, d)."""
    num_experts, top_k = w_gate.shape[0], experts.shape[1]
    top_experts = experts.flatten().int()
    with torch.no_grad():
        bin_ids, indices = ops.sort(top_experts, max(1, math.ceil(math.log2(num_experts))))
        tokens_per_expert = ops.histogram(top_experts, num_experts)
        bins = ops.inclusive_cumsum(tokens_per_expert, 0)
        bins = bins.view(1) if bins.dim() == 0 else bins
    batch_sizes = tokens_per_expert.cpu().to(torch.long)
    rows = ops.gather(x, indices, bin_ids, bins, top_k)  # (T * K, d), sorted by expert
    gate = gg_ops.gmm(rows, w_gate, batch_sizes, trans_b=True)
    up = gg_ops.gmm(rows, w_up, batch_sizes, trans_b=True)
    out_rows = gg_ops.gmm(F.silu(gate) * up, w_down, batch_sizes)
    return ops.scatter(out_rows, indices, bin_ids, weights.flatten().to(x.dtype), bins, top_k)


def megablocks_experts(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, w_gate: torch.Tensor,
                       w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """x (T, d), weights / experts (T, K) with -1 for unused slots -> (T, d), dropless."""
    if bool((experts < 0).any()):
        # Variable k (top-p): run every routed assignment as its own one-slot token, then sum per token.
        token, slot = (experts >= 0).nonzero(as_tuple=True)
        out = _dmoe(x.index_select(0, token), weights[token, slot].unsqueeze(1), experts[token, slot].unsqueeze(1),
                    w_gate, w_up, w_down)
        return x.new_zeros(x.shape).index_add(0, token, out)
    return _dmoe(x, weights, experts, w_gate, w_up, w_down)
