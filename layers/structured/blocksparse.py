"""Block-sparse linear layers: a fixed set of nonzero (block_size, block_size) blocks, computed blockwise.

The weight is stored as its nonzero blocks only, `blocks` (nnz, block_size, block_size), each block
in nn.Linear's (out, in) orientation. A layout has the same number k of blocks in every block-row
(then each output block-row is one matmul of k gathered input blocks) or in every block-column
(then each input block is one matmul whose k outputs are added into their rows); either way the
whole layer is one batched matmul, never a dense matmul with a masked weight.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from layers.structured.checks import check_int

Layout = list[tuple[int, int]]  # (block row, block column) of every nonzero block


def random_block_layout(out_blocks: int, in_blocks: int, density: float, seed: int = 0) -> Layout:
    """round(density * in_blocks) (at least 1) distinct random blocks in every block-row, fixed by `seed`."""
    rng = random.Random(seed)
    k = max(1, round(density * in_blocks))
    return [(row, col) for row in range(out_blocks) for col in sorted(rng.sample(range(in_blocks), k))]


class BlockSparse(nn.Module):
    """Base of the block-sparse kinds: padding, the nonzero blocks and their batched-matmul product."""

    def __init__(self, in_features: int, out_features: int, bias: bool, block_size: int, layout: Layout,
                 what: str):
        super().__init__()
        self.in_features, self.out_features, self.block_size = in_features, out_features, block_size
        self.in_blocks = math.ceil(in_features / block_size)  # inputs are zero-padded to in_blocks * block_size
        self.out_blocks = math.ceil(out_features / block_size)
        if not layout or len(set(layout)) != len(layout):
            raise ValueError(f"{what}: the block layout must be non-empty and without repeated blocks")
        if any(not (0 <= r < self.out_blocks and 0 <= c < self.in_blocks) for r, c in layout):
            raise ValueError(f"{what}: a block lies outside the ({self.out_blocks}, {self.in_blocks}) block grid")
        per_row, per_col = Counter(r for r, _ in layout), Counter(c for _, c in layout)
        if len(per_row) == self.out_blocks and len(set(per_row.values())) == 1:
            self._by_rows, self._k = True, len(layout) // self.out_blocks
            layout = sorted(layout)  # row-major: block-row r holds blocks r*k ... r*k + k-1
        elif len(per_col) == self.in_blocks and len(set(per_col.values())) == 1:
            self._by_rows, self._k = False, len(layout) // self.in_blocks
            layout = sorted(layout, key=lambda rc: (rc[1], rc[0]))  # column-major
        else:
            raise ValueError(f"{what}: the block layout must have the same number of blocks in every block-row "
                             f"or in every block-column")
        self.layout: Layout = layout
        self.blocks = nn.Parameter(torch.empty(len(layout), block_size, block_size))  # (nnz, out, in)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self._indices: dict[torch.device, torch.Tensor] = {}  # built on first use, per device

    @property
    def nnz_blocks(self) -> int:
        """Number of nonzero blocks."""
        return len(self.layout)

    def _index(self, device: torch.device) -> torch.Tensor:
        """By rows: the column of every block; by columns: the row of every block (nnz,)."""
        if device not in self._indices:
            if self._by_rows:
                index = torch.tensor([c for _, c in self.layout], dtype=torch.long, device=device)
            else:
                index = torch.tensor([r for r, _ in self.layout], dtype=torch.long, device=device)
            self._indices[device] = index
        return self._indices[device]

    def init_blocks_(self, std: float, share: float = 1.0) -> None:
        """Blocks whose layer output has `share` of the variance a dense layer with entries of `std` gives."""
        fan_in = self.nnz_blocks * self.block_size / self.out_blocks  # mean nonzeros per output row
        nn.init.normal_(self.blocks, std=std * (share * self.in_features / fan_in) ** 0.5)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def sparse_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """(n, in_features) -> (n, out_features): x times the block-sparse matrix, blockwise."""
        s, k, n = self.block_size, self._k, x.shape[0]
        nb_in, nb_out = self.in_blocks, self.out_blocks
        blocks = self.blocks
        if torch.is_autocast_enabled(x.device.type):  # the custom backward passes need one dtype throughout
            dtype = torch.get_autocast_dtype(x.device.type)
            x, blocks = x.to(dtype), blocks.to(dtype)
        if nb_in * s != self.in_features:
            x = F.pad(x, (0, nb_in * s - self.in_features))
        index = self._index(x.device)
        if self._by_rows:
            weight = blocks.view(nb_out, k, s, s).transpose(2, 3).reshape(nb_out, k * s, s)  # (nb_out, k*s, s)
            out = _GatheredBlockMatmul.apply(x.view(n, nb_in, s), weight, index)  # (nb_out, n, s)
            out = out.transpose(0, 1).reshape(n, nb_out * s)
        else:
            weight = blocks.view(nb_in, k, s, s).permute(0, 3, 1, 2).reshape(nb_in, s, k * s)  # (nb_in, s, k*s)
            out = _ScatteredBlockMatmul.apply(x.view(n, nb_in, s), weight, index.flatten(), nb_out)
            out = out.view(n, nb_out * s)
        return out[:, : self.out_features] if nb_out * s != self.out_features else out

    def sparse_dense(self) -> torch.Tensor:
        """The (out_features, in_features) matrix of the blocks alone."""
        s = self.block_size
        rows = torch.tensor([r for r, _ in self.layout], device=self.blocks.device)
        cols = torch.tensor([c for _, c in self.layout], device=self.blocks.device)
        full = self.blocks.new_zeros(self.out_blocks, s, self.in_blocks, s)
        full[rows, :, cols, :] = self.blocks  # advanced indices first: (nnz, s, s)
        return full.reshape(self.out_blocks * s, self.in_blocks * s)[: self.out_features, : self.in_features]

    def mask(self) -> torch.Tensor:
        """Boolean (out_features, in_features) support of the blocks."""
        grid = torch.zeros(self.out_blocks, self.in_blocks, dtype=torch.bool)
        for r, c in self.layout:
            grid[r, c] = True
        s = self.block_size
        full = grid.repeat_interleave(s, 0).repeat_interleave(s, 1)
        return full[: self.out_features, : self.in_features]

    def block_flops(self) -> int:
        """Forward FLOPs per input row of the nonzero blocks (a multiply-add counts 2)."""
        return 2 * self.nnz_blocks * self.block_size ** 2


class BlockSparseLinear(BlockSparse):
    """Drop-in nn.Linear with a fixed random block mask: `density` of the blocks of every block-row."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, block_size: int = 32,
                 density: float = 0.25, seed: int = 0):
        what = "BlockSparseLinear"
        for name, value in (("in_features", in_features), ("out_features", out_features),
                            ("block_size", block_size)):
            check_int(name, value, what)
        check_int("seed", seed, what, minimum=0)
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ValueError(f"{what}: density={density!r} is invalid: must be a number in (0, 1]")
        nb_out, nb_in = math.ceil(out_features / block_size), math.ceil(in_features / block_size)
        super().__init__(in_features, out_features, bias, block_size,
                         random_block_layout(nb_out, nb_in, density, seed), what)
        self.density, self.seed = density, seed
        self.init_weights_(in_features ** -0.5)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}, "
                f"blocks={self.nnz_blocks}/{self.out_blocks * self.in_blocks}, bias={self.bias is not None}")

    def init_weights_(self, std: float) -> None:
        """Blocks scaled so the output has the variance of a dense layer with entries of that std."""
        self.init_blocks_(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        out = self.sparse_matmul(x.reshape(-1, self.in_features))
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def to_dense(self) -> torch.Tensor:
        """The (out_features, in_features) matrix this layer multiplies by."""
        return self.sparse_dense()

    def flops_per_token(self) -> int:
        """Forward FLOPs per input row of the nonzero blocks, plus the bias."""
        return self.block_flops() + (self.out_features if self.bias is not None else 0)


class _GatheredBlockMatmul(torch.autograd.Function):
    """Block-row r of the output = its k gathered input blocks (n, k*s) times weight[r] (k*s, s): one bmm.

    Only the input is kept for the backward pass (the gathered copy is k times its size and is rebuilt
    there), and the input gradient is summed back over the blocks with index_add_ on the leading
    dimension, far faster than autograd's scatter into the middle one.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        # x (n, nb_in, s); weight (nb_out, k*s, s); cols (nb_out*k,): input block of every nonzero block
        ctx.save_for_backward(x, weight, cols)
        return torch.bmm(_gather(x, cols, weight.shape[0]), weight)  # (nb_out, n, s)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, cols = ctx.saved_tensors
        n, nb_in, s = x.shape
        grad_x = grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = torch.bmm(_gather(x, cols, weight.shape[0]).transpose(1, 2), grad)  # (nb_out, k*s, s)
        if ctx.needs_input_grad[0]:
            per_block = torch.bmm(grad, weight.transpose(1, 2))  # (nb_out, n, k*s)
            per_block = per_block.view(-1, n, cols.numel() // weight.shape[0], s).transpose(1, 2).reshape(-1, n, s)
            grad_x = per_block.new_zeros(nb_in, n, s).index_add_(0, cols, per_block).transpose(0, 1)
        return grad_x, grad_weight, None


class _ScatteredBlockMatmul(torch.autograd.Function):
    """Input block c times weight[c] (s, k*s) gives its k blocks' outputs (one bmm); each is added to its row.

    Works in the (n, blocks, s) layout of the activations: the backward gathers the output gradient
    along the middle dimension of a contiguous tensor, never from a transposed view.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, out_blocks: int) -> torch.Tensor:
        # x (n, nb_in, s); weight (nb_in, s, k*s); rows (nb_in*k,): output block of every nonzero block
        n, nb_in, s = x.shape
        ctx.save_for_backward(x, weight, rows)
        parts = torch.bmm(x.transpose(0, 1), weight)  # (nb_in, n, k*s)
        parts = parts.view(nb_in, n, -1, s).transpose(1, 2).reshape(-1, n, s)  # (nnz, n, s): one per block
        out = parts.new_zeros(out_blocks, n, s).index_add_(0, rows, parts)  # (nb_out, n, s)
        return out.transpose(0, 1).contiguous()  # (n, nb_out, s)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rows = ctx.saved_tensors
        n, nb_in, s = x.shape
        # (n, nnz, s) -> (nb_in, n, k*s): the output gradient of every block, grouped by input block
        per_block = grad.contiguous().index_select(1, rows).view(n, nb_in, -1).transpose(0, 1)
        grad_x = torch.bmm(per_block, weight.transpose(1, 2)).transpose(0, 1) if ctx.needs_input_grad[0] else None
        grad_weight = torch.bmm(x.transpose(0, 1).transpose(1, 2), per_block) if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight, None, None


def _gather(x: torch.Tensor, cols: torch.Tensor, out_blocks: int) -> torch.Tensor:
    """(n, nb_in, s) -> (nb_out, n, k*s): the k input blocks of every block-row, side by side."""
    n, _, s = x.shape
    return x.index_select(1, cols).view(n, out_blocks, -1).transpose(0, 1)
