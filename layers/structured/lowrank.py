"""Low-rank linear layers: W = U V with U (out, rank) and V (rank, in)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from layers.structured.checks import check_int


def init_low_rank_(u: torch.Tensor, v: torch.Tensor, std: float) -> None:
    """Random U, V whose product has entries of variance std**2 (V keeps norms, U carries the scale)."""
    rank, in_features = v.shape
    nn.init.normal_(v, std=in_features ** -0.5)
    nn.init.normal_(u, std=std * (in_features / rank) ** 0.5)


class LowRankLinear(nn.Module):
    """Drop-in nn.Linear with a rank-`rank` weight U V: x -> (x V^T) U^T."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, rank: int = 64):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features), ("rank", rank)):
            check_int(name, value, "LowRankLinear")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.u = nn.Parameter(torch.empty(out_features, rank))
        self.v = nn.Parameter(torch.empty(rank, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.init_weights_(in_features ** -0.5)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}")

    def init_weights_(self, std: float) -> None:
        """Random factors whose product has entries of variance std**2, like a dense layer with that std."""
        init_low_rank_(self.u, self.v, std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features) through the rank-`rank` bottleneck."""
        return F.linear(F.linear(x, self.v), self.u, self.bias)

    def to_dense(self) -> torch.Tensor:
        """The (out_features, in_features) matrix U V."""
        return self.u @ self.v

    def flops_per_token(self) -> int:
        """Forward FLOPs per input row: the two thin matmuls (a multiply-add counts 2), plus the bias."""
        return 2 * self.rank * (self.in_features + self.out_features) + (
            self.out_features if self.bias is not None else 0)


@torch.no_grad()
def lowrank_project(weight: torch.Tensor, rank: int, bias: torch.Tensor | None = None) -> LowRankLinear:
    """The LowRankLinear nearest to a dense (out, in) `weight` in Frobenius norm: its truncated SVD."""
    if weight.dim() != 2:
        raise ValueError(f"lowrank_project: weight must be a 2-D (out, in) matrix, got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    layer = LowRankLinear(in_features, out_features, bias=bias is not None, rank=rank)
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    u, s, vh = torch.linalg.svd(weight.to(work), full_matrices=False)
    keep = min(rank, s.numel())  # a rank above min(out, in) keeps every direction; the rest stay zero
    root = s[:keep].sqrt()
    layer = layer.to(device=weight.device, dtype=weight.dtype)
    layer.u.zero_()
    layer.v.zero_()
    layer.u[:, :keep] = u[:, :keep] * root
    layer.v[:keep] = root[:, None] * vh[:keep]
    if bias is not None:
        layer.bias.copy_(bias)
    return layer
