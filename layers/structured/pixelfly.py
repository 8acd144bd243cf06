"""Pixelated Butterfly (Chen et al., 2022): a flat block butterfly sparsity pattern plus a low-rank term.

The flat butterfly of size n (in blocks) is the support of I + B_1 + B_2 + ... + B_{n/2}, where the
butterfly factor B_s joins block i to block i XOR s. `butterfly_size` (a power of two) bounds the
largest stride: block (i, j) is nonzero when i XOR j is 0 or a power of two below butterfly_size,
so the pattern is a block-diagonal of flat butterflies of butterfly_size blocks, each block-row
holding 1 + log2(butterfly_size) blocks. A rectangular grid stretches the pattern of the smaller
side along the larger one, so the larger side keeps that count: the layer has exactly
max(out_blocks, in_blocks) * (1 + log2(butterfly_size)) nonzero blocks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from layers.structured.blocksparse import BlockSparse, Layout
from layers.structured.checks import check_int
from layers.structured.lowrank import init_low_rank_


def _in_butterfly(i: int, j: int, butterfly_size: int) -> bool:
    d = i ^ j
    return d == 0 or (d & (d - 1) == 0 and d < butterfly_size)


def flat_butterfly_layout(out_blocks: int, in_blocks: int, butterfly_size: int) -> Layout:
    """The nonzero blocks of the flat block butterfly pattern on an (out_blocks, in_blocks) grid."""
    small = min(out_blocks, in_blocks)
    if butterfly_size < 1 or butterfly_size & (butterfly_size - 1) or small % butterfly_size:
        raise ValueError(f"butterfly_size={butterfly_size} is invalid: must be a power of two that divides "
                         f"the smaller number of blocks, min({out_blocks}, {in_blocks}) = {small}")
    if out_blocks >= in_blocks:  # stretch the square pattern of the inputs along the rows
        return [(r, c) for r in range(out_blocks) for c in range(in_blocks)
                if _in_butterfly(r * small // out_blocks, c, butterfly_size)]
    return [(r, c) for r in range(out_blocks) for c in range(in_blocks)
            if _in_butterfly(r, c * small // in_blocks, butterfly_size)]


def flat_butterfly_nnz_blocks(out_blocks: int, in_blocks: int, butterfly_size: int) -> int:
    """Nonzero blocks of the flat butterfly pattern: max(out_blocks, in_blocks) * (1 + log2(butterfly_size))."""
    return max(out_blocks, in_blocks) * (1 + int(math.log2(butterfly_size)))


class PixelflyLinear(BlockSparse):
    """Drop-in nn.Linear: flat block butterfly blocks plus a rank-`rank` term U V."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, block_size: int = 32,
                 butterfly_size: int = 4, rank: int = 16):
        what = "PixelflyLinear"
        for name, value in (("in_features", in_features), ("out_features", out_features),
                            ("block_size", block_size), ("butterfly_size", butterfly_size)):
            check_int(name, value, what)
        check_int("rank", rank, what, minimum=0)
        nb_out, nb_in = math.ceil(out_features / block_size), math.ceil(in_features / block_size)
        try:
            layout = flat_butterfly_layout(nb_out, nb_in, butterfly_size)
        except ValueError as err:
            raise ValueError(f"{what} ({in_features} -> {out_features}, block_size={block_size}): {err}") from None
        super().__init__(in_features, out_features, bias, block_size, layout, what)
        self.butterfly_size, self.rank = butterfly_size, rank
        self.lowrank_u = nn.Parameter(torch.empty(out_features, rank))  # (out, rank)
        self.lowrank_v = nn.Parameter(torch.empty(rank, in_features))  # (rank, in)
        self.init_weights_(in_features ** -0.5)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}, "
                f"butterfly_size={self.butterfly_size}, rank={self.rank}, "
                f"blocks={self.nnz_blocks}/{self.out_blocks * self.in_blocks}, bias={self.bias is not None}")

    def init_weights_(self, std: float) -> None:
        """Butterfly blocks and low-rank term each give half the output variance of a dense layer with that std."""
        share = 0.5 if self.rank else 1.0
        self.init_blocks_(std, share)
        if self.rank:
            init_low_rank_(self.lowrank_u, self.lowrank_v, std * (1 - share) ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features): blockwise sparse product plus the low-rank term."""
        flat = x.reshape(-1, self.in_features)
        out = self.sparse_matmul(flat)
        if self.rank:
            out = torch.addmm(out, F.linear(flat, self.lowrank_v), self.lowrank_u.t())  # + (x V^T) U^T
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def to_dense(self) -> torch.Tensor:
        """The (out_features, in_features) matrix: butterfly blocks plus U V."""
        return self.sparse_dense() + self.lowrank_u @ self.lowrank_v

    def flops_per_token(self) -> int:
        """Forward FLOPs per input row: the nonzero blocks, the low-rank term, the sum and the bias."""
        lowrank = 2 * self.rank * (self.in_features + self.out_features) + self.out_features if self.rank else 0
        return self.block_flops() + lowrank + (self.out_features if self.bias is not None else 0)
