"""Monarch matrices (Dao et al., 2022): two block-diagonal factors around the Monarch permutation.

With b = nblocks, p = ceil(in / b) and q = ceil(out / b), a `MonarchLinear` holds

- R, the first factor: b dense blocks R[j] of shape (q, p), block-diagonal over the input;
- L, the second factor: q dense blocks L[k] of shape (b, b).

Output k of every block j of R feeds block k of L, and output i of every block k of L becomes
output i*q + k (the Monarch permutation P before and after L: M = P L P^T R). With input index
j*p + t and output index i*q + k,

    M[i*q + k, j*p + t] = L[k, i, j] * R[j, k, t].

For a fixed (k, j) the (b, p) slab M[k::q, j*p:(j+1)*p] is the rank-1 outer product L[k, :, j] R[j, k, :];
that is why projecting a dense matrix onto Monarch matrices is one rank-1 SVD per slab
(`monarch_project`). Cost: b*q*p + q*b*b parameters, about in*out/b + out*b; with 4 blocks a square
layer has about a quarter of the dense parameters and FLOPs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from layers.structured.checks import check_int

# The second factor's (b, b) blocks are applied `group` at a time, as one (group*b)-square matrix per
# group (block-diagonal up to a permutation): a 4x4 matmul is far below what a GEMM kernel runs
# well, and the permutations then move runs of `group` contiguous numbers instead of single ones.
_MIX_WIDTH = 64


def _group_size(q: int, b: int) -> int:
    """Largest divisor g of q with g*b <= max(b, _MIX_WIDTH)."""
    limit = max(1, _MIX_WIDTH // b)
    return max(g for g in range(1, min(q, limit) + 1) if q % g == 0)


class MonarchLinear(nn.Module):
    """Drop-in nn.Linear whose (out, in) matrix is a Monarch matrix P L P^T R with `nblocks` blocks in R."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, nblocks: int = 4):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features), ("nblocks", nblocks)):
            check_int(name, value, "MonarchLinear")
        self.in_features, self.out_features, self.nblocks = in_features, out_features, nblocks
        b = nblocks
        self.in_block = math.ceil(in_features / b)  # p: inputs per block of R (zero-padded to b*p)
        self.out_block = math.ceil(out_features / b)  # q: outputs per block of R = number of blocks of L
        self.r_blocks = nn.Parameter(torch.empty(b, self.out_block, self.in_block))  # (b, q, p)
        self.l_blocks = nn.Parameter(torch.empty(self.out_block, b, b))  # (q, b, b)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self._group = _group_size(self.out_block, b)
        self.init_weights_(in_features ** -0.5)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nblocks={self.nblocks}, "
                f"bias={self.bias is not None}")

    def init_weights_(self, std: float) -> None:
        """Random factors whose product has entries of variance std**2, like a dense layer with that std."""
        # L ~ N(0, 1/b) keeps norms (each output of L sums b terms); R carries the scale: b * std**2.
        nn.init.normal_(self.l_blocks, std=self.nblocks ** -0.5)
        nn.init.normal_(self.r_blocks, std=std * self.nblocks ** 0.5)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features), two batched matmuls; M is never formed."""
        lead = x.shape[:-1]
        b, q, p, g = self.nblocks, self.out_block, self.in_block, self._group
        r, mix = self.r_blocks, self.l_blocks
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, r, mix = x.to(dtype), r.to(dtype), mix.to(dtype)
        x = x.reshape(-1, self.in_features)
        if b * p != self.in_features:
            x = F.pad(x, (0, b * p - self.in_features))
        n = x.shape[0]
        y = torch.bmm(x.view(n, b, p).transpose(0, 1), r.transpose(1, 2))  # (b, n, q): R, block j
        # P^T: output k of every block j goes to block k of L. Blocks of L are taken g at a time,
        # k = G*g + x: (q/g, n, b*g) with the last axis ordered (j, x).
        y = y.view(b, n, q // g, g).permute(2, 1, 0, 3).reshape(q // g, n, b * g)
        z = torch.bmm(y, _grouped_mix(mix, g).transpose(1, 2))  # (q/g, n, b*g): (i, x)
        # P: output i of block k is output i*q + k.
        out = z.view(q // g, n, b, g).permute(1, 2, 0, 3).reshape(n, b * q)
        if q * b != self.out_features:
            out = out[:, : self.out_features]
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*lead, self.out_features)

    def to_dense(self) -> torch.Tensor:
        """The (out_features, in_features) matrix this layer multiplies by."""
        b, q, p = self.nblocks, self.out_block, self.in_block
        full = torch.einsum("kij,jkt->ikjt", self.l_blocks, self.r_blocks).reshape(b * q, b * p)
        return full[: self.out_features, : self.in_features]

    def flops_per_token(self) -> int:
        """Forward FLOPs per input row from the two factors (a multiply-add counts 2), plus the bias."""
        b, q, p = self.nblocks, self.out_block, self.in_block
        return 2 * b * q * p + 2 * q * b * b + (self.out_features if self.bias is not None else 0)


def _grouped_mix(blocks: torch.Tensor, group: int) -> torch.Tensor:
    """(q, b, b) blocks -> (q/group, b*group, b*group): W[G, (i, x), (j, y)] = blocks[G*group + x, i, j] if x == y."""
    q, b, _ = blocks.shape
    eye = torch.eye(group, dtype=blocks.dtype, device=blocks.device)
    grouped = blocks.view(q // group, group, b, b)  # (G, x, i, j)
    return torch.einsum("Gxij,xy->Gixjy", grouped, eye).reshape(q // group, b * group, b * group)


@torch.no_grad()
def monarch_project(weight: torch.Tensor, nblocks: int, bias: torch.Tensor | None = None) -> MonarchLinear:
    """The MonarchLinear nearest to a dense (out, in) `weight` in Frobenius norm (closed form).

    Each (b, p) slab of the zero-padded weight is replaced by its best rank-1 approximation (its top
    singular triple), which is exactly what one (k, j) pair of Monarch factors can express; the slabs
    share no parameters, so this is the global optimum. Padding rows and columns lie outside the
    returned matrix and do not change the optimum.
    """
    if weight.dim() != 2:
        raise ValueError(f"monarch_project: weight must be a 2-D (out, in) matrix, got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    layer = MonarchLinear(in_features, out_features, bias=bias is not None, nblocks=nblocks)
    b, q, p = nblocks, layer.out_block, layer.in_block
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    padded = F.pad(weight.to(work), (0, b * p - in_features, 0, b * q - out_features))
    slabs = padded.reshape(b, q, b, p).permute(1, 2, 0, 3)  # (k, j, i, t): slab (k, j) is (b, p)
    u, s, vh = torch.linalg.svd(slabs, full_matrices=False)  # u (q, b, b, r), s (q, b, r), vh (q, b, r, p)
    root = s[..., 0].sqrt()  # split the singular value evenly between the two factors
    l_col = u[..., :, 0] * root[..., None]  # (k, j, i)
    r_row = vh[..., 0, :] * root[..., None]  # (k, j, t)
    layer = layer.to(device=weight.device, dtype=weight.dtype)
    layer.l_blocks.copy_(l_col.permute(0, 2, 1))  # (k, i, j)
    layer.r_blocks.copy_(r_row.permute(1, 0, 2))  # (j, k, t)
    if bias is not None:
        layer.bias.copy_(bias)
    return layer
