"""Helpers the attention kinds share: input checks, grouped-query heads, the [v, 1] normaliser trick."""

from __future__ import annotations

import torch


def repeat_kv_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v with as many heads as q (grouped-query attention shares each kv head among n_heads / kv_heads)."""
    if k.shape[1] == q.shape[1]:
        return k, v
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads cannot share {k.shape[1]} key/value heads evenly")
    group = q.shape[1] // k.shape[1]
    return k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Shapes every kind expects: q (b, h, q_len, d), k/v (b, kv_h, k_len, d) with q_len <= k_len."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"expected q (b, h, q_len, d) and k, v of one shape (b, kv_h, k_len, d); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-2] > k.shape[-2]:
        raise ValueError(f"q_len={q.shape[-2]} > k_len={k.shape[-2]}: the queries must be the last k_len positions")


def with_ones(v: torch.Tensor) -> torch.Tensor:
    """v with a column of ones appended, so one product gives the weighted sum and the normaliser."""
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)  # (..., d + 1)


MIN_NORMALISER = 1e-12  # below it a row is numerically empty; the floor keeps 1 / den^2 (backward) finite


def normalise(acc: torch.Tensor) -> torch.Tensor:
    """acc = [sum_j a_ij v_j, sum_j a_ij] -> the weighted mean; a row with (next to) no mass gives ~0, not NaN."""
    return acc[..., :-1] / acc[..., -1:].clamp_min(MIN_NORMALISER)
