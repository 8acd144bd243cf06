"""Sparse activations of sparse autoencoders, and the sparse products that consume them.

A sparse code is kept in coordinate form (`SparseCode`): entry e says that latent `cols[e]` of
row `rows[e]` is active with value `values[e]`, rows ascending. The selection functions (TopK,
BatchTopK, a threshold (JumpReLU), the AuxK choice among dead latents) rank dense
pre-activations that were computed without autograd and return such a code. `gather_linear`
then makes the selected pre-activations differentiable with respect to the encoder, and
`sparse_decode` multiplies a code by the decoder. Both backward passes touch only the selected
entries, so a training step costs one dense matmul (the encoder's forward, which must rank every
latent) plus O(nnz * d) work, where the textbook dense formulation costs five dense matmuls.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SparseCode:
    """Active latents of `num_rows` rows in coordinate form; `rows` is ascending."""

    values: torch.Tensor  # (nnz,)
    rows: torch.Tensor  # (nnz,) int64, ascending
    cols: torch.Tensor  # (nnz,) int64, latent ids
    num_rows: int
    num_latents: int

    def offsets(self) -> torch.Tensor:
        """Start of each row's entries: (num_rows,) int64 (the `offsets` of F.embedding_bag)."""
        counts = torch.bincount(self.rows, minlength=self.num_rows)
        return torch.cumsum(counts, 0) - counts

    def with_values(self, values: torch.Tensor) -> SparseCode:
        """The same support with other values (e.g. differentiable ones)."""
        return SparseCode(values, self.rows, self.cols, self.num_rows, self.num_latents)

    def select(self, keep: torch.Tensor) -> SparseCode:
        """The entries where the (nnz,) bool mask `keep` is true (rows stay ascending)."""
        return SparseCode(self.values[keep], self.rows[keep], self.cols[keep], self.num_rows, self.num_latents)

    def to_dense(self) -> torch.Tensor:
        """(num_rows, num_latents) tensor, differentiable with respect to `values`."""
        dense = self.values.new_zeros(self.num_rows, self.num_latents)
        return dense.index_put((self.rows, self.cols), self.values)

    def l0(self) -> torch.Tensor:
        """Mean number of nonzero latents per row."""
        return (self.values != 0).sum() / max(self.num_rows, 1)

    def fire_counts(self) -> torch.Tensor:
        """(num_latents,) int64: in how many rows each latent is nonzero."""
        return torch.bincount(self.cols[self.values != 0], minlength=self.num_latents)


def _code(rows: torch.Tensor, cols: torch.Tensor, pre: torch.Tensor) -> SparseCode:
    return SparseCode(pre[rows, cols], rows, cols, pre.shape[0], pre.shape[1])


@torch.no_grad()
def topk_code(pre: torch.Tensor, k: int, sorted: bool = False) -> SparseCode:
    """The k largest pre-activations of every row of (rows, latents) `pre`; sorted=True orders each row's
    entries by decreasing value (the nested prefixes of HierarchicalTopK)."""
    k = min(k, pre.shape[1])
    idx = pre.topk(k, dim=1, sorted=sorted).indices  # (rows, k)
    rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(k)
    return _code(rows, idx.flatten(), pre)


@torch.no_grad()
def batch_topk_code(pre: torch.Tensor, k: int, candidates_per_row: int | None = None) -> SparseCode:
    """The k * rows largest pre-activations of the whole batch (BatchTopK): k per row on average.

    Exact, computed in two stages because one top-k over every entry of the batch is slow: each row's
    `candidates_per_row` (default 4k) largest, then the batch's k * rows largest among those. If some row
    has all its candidates selected it might own more, and the one-stage top-k decides instead.
    """
    rows, latents = pre.shape
    n = min(k * rows, pre.numel())
    m = min(latents, candidates_per_row or 4 * k)
    if m < latents:
        cand = pre.topk(m, dim=1, sorted=False)  # (rows, m)
        pick = cand.values.flatten().topk(n, sorted=False)
        if not bool((cand.values.min(dim=1).values >= pick.values.min()).any()):  # no row may hold more than m
            flat = _ascending(pick.indices, rows * m)
            return _code(flat // m, cand.indices.flatten()[flat], pre)
    flat = _ascending(pre.flatten().topk(n, sorted=False).indices, pre.numel())
    return _code(flat // latents, flat % latents, pre)


def _ascending(indices: torch.Tensor, size: int) -> torch.Tensor:
    """Distinct indices in [0, size) sorted ascending (through a mask: torch.sort is slow on CPU)."""
    mask = torch.zeros(size, dtype=torch.bool, device=indices.device)
    mask[indices] = True
    return mask.nonzero().squeeze(1)


@torch.no_grad()
def threshold_code(pre: torch.Tensor, threshold: torch.Tensor | float) -> SparseCode:
    """Every pre-activation above `threshold` (a scalar or one per latent): the JumpReLU support."""
    rows, cols = (pre > threshold).nonzero(as_tuple=True)  # row-major order
    return _code(rows, cols, pre)


@torch.no_grad()
def masked_topk_code(pre: torch.Tensor, allowed: torch.Tensor, k: int) -> SparseCode:
    """The k largest pre-activations of every row among the latents where (latents,) `allowed` is true (AuxK)."""
    k = min(k, int(allowed.sum()))
    if k == 0:
        empty = torch.zeros(0, dtype=torch.long, device=pre.device)
        return _code(empty, empty, pre)
    masked = pre.masked_fill(~allowed, float("-inf"))
    return topk_code(masked, k)


class _GatherLinear(torch.autograd.Function):
    """values[e] = (x @ weight + bias)[rows[e], cols[e]], with a backward over the selected entries only."""

    @staticmethod
    def forward(ctx, x, weight, bias, rows, cols, offsets, selected):
        ctx.save_for_backward(x, weight, rows, cols, offsets)
        return selected.clone()

    @staticmethod
    def backward(ctx, grad):
        x, weight, rows, cols, offsets = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:  # (rows, d_in): each entry adds grad[e] * weight[:, cols[e]]
            grad_x = F.embedding_bag(cols, weight.t().contiguous(), offsets, mode="sum", per_sample_weights=grad)
        if ctx.needs_input_grad[1]:  # (d_in, latents) = x^T @ G with G sparse: computed as (G^T @ x)^T
            g_t = torch.sparse_coo_tensor(torch.stack([cols, rows]), grad, (weight.shape[1], x.shape[0]),
                                          check_invariants=False)
            grad_weight = torch.sparse.mm(g_t, x).t()
        if ctx.needs_input_grad[2]:
            grad_bias = torch.zeros(weight.shape[1], dtype=grad.dtype, device=grad.device).index_add_(0, cols, grad)
        return grad_x, grad_weight, grad_bias, None, None, None, None


def gather_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, code: SparseCode) -> torch.Tensor:
    """The code's values, made differentiable as entries of x @ weight + bias ((rows, d_in) @ (d_in, latents)).

    The code must have been selected from exactly those pre-activations (its values are reused, not recomputed).
    """
    return _GatherLinear.apply(x, weight, bias, code.rows, code.cols, code.offsets(), code.values)


class _SparseDecode(torch.autograd.Function):
    """out[r] = sum over row r's entries of values[e] * weight[cols[e]]; backward touches the entries only."""

    @staticmethod
    def forward(ctx, values, weight, rows, cols, offsets):
        ctx.save_for_backward(values, weight, rows, cols, offsets)
        return F.embedding_bag(cols, weight, offsets, mode="sum", per_sample_weights=values)

    @staticmethod
    def backward(ctx, grad):
        values, weight, rows, cols, offsets = ctx.saved_tensors
        grad_values = grad_weight = None
        if ctx.needs_input_grad[0]:  # grad_values[e] = <grad[rows[e]], weight[cols[e]]>, a sampled matmul
            grad_values = _sampled(grad, weight, cols, offsets)
        if ctx.needs_input_grad[1]:  # (latents, d_out) = Z^T @ grad with Z the sparse code
            z_t = torch.sparse_coo_tensor(torch.stack([cols, rows]), values, (weight.shape[0], grad.shape[0]),
                                          check_invariants=False)
            grad_weight = torch.sparse.mm(z_t, grad.contiguous())
        return grad_values, grad_weight, None, None, None


def sparse_decode(code: SparseCode, weight: torch.Tensor) -> torch.Tensor:
    """(num_rows, d_out) = dense(code) @ weight for (latents, d_out) `weight`, without the dense code."""
    return _SparseDecode.apply(code.values, weight, code.rows, code.cols, code.offsets())


def _sampled(x: torch.Tensor, weight: torch.Tensor, cols: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(nnz,) dot products <x[row of e], weight[cols[e]]> through torch.sparse.sampled_addmm."""
    if cols.numel() == 0:
        return x.new_zeros(0)
    crow = torch.cat([offsets, offsets.new_tensor([cols.numel()])])
    with warnings.catch_warnings():  # "sparse CSR support is in beta": sampled_addmm is what we need
        warnings.simplefilter("ignore", UserWarning)
        mask = torch.sparse_csr_tensor(crow, cols, x.new_zeros(cols.numel()), (x.shape[0], weight.shape[0]),
                                       check_invariants=False)
        return torch.sparse.sampled_addmm(mask, x.contiguous(), weight.t()).values()


class _PrefixLoss(torch.autograd.Function):
    """sum_j w_j * mean_rows |r - sum_{i<=j} v_i d_i|^2 with d_i = weight[c_i], through each row's Gram matrix.

    With T_i = sum_{j>=i} w_j the loss of a row is T_1 |r|^2 - 2 sum_i T_i v_i <r, d_i>
    + sum_{i,i'} T_max(i,i') v_i v_i' <d_i, d_i'>: batched matmuls over row chunks, and nothing of size
    (rows, k, d) is kept for backward (each chunk's atoms are gathered again there), only (rows, k, k).
    """

    @staticmethod
    def forward(ctx, r, values, weight, cols, budget_weights, chunk):
        tail, tail_max = _tails(budget_weights)
        dots = r.new_empty(values.shape)  # (rows, k): <r, d_i>
        gram = r.new_empty(*values.shape, values.shape[1])  # (rows, k, k): <d_i, d_i'>
        for rs in _chunks(r.shape[0], chunk):
            atoms = _atoms(weight, cols[rs])
            dots[rs] = torch.bmm(atoms, r[rs].unsqueeze(2)).squeeze(2)
            gram[rs] = torch.bmm(atoms, atoms.transpose(1, 2))
        pairs = (values.unsqueeze(2) * values.unsqueeze(1) * gram * tail_max).sum()
        total = tail[0] * r.square().sum() - 2 * (tail * values * dots).sum() + pairs
        ctx.save_for_backward(r, values, weight, cols, budget_weights, dots, gram)
        ctx.chunk = chunk
        return total / r.shape[0]

    @staticmethod
    def backward(ctx, grad):
        r, values, weight, cols, budget_weights, dots, gram = ctx.saved_tensors
        tail, tail_max = _tails(budget_weights)
        s = grad / r.shape[0]
        grad_values = 2 * s * (torch.bmm(gram * tail_max, values.unsqueeze(2)).squeeze(2) - tail * dots)
        grad_dots = -2 * s * tail * values  # (rows, k)
        grad_r = torch.empty_like(r)
        grad_weight = torch.zeros_like(weight)
        for rs in _chunks(r.shape[0], ctx.chunk):
            x, v, atoms = r[rs], values[rs], _atoms(weight, cols[rs])
            grad_r[rs] = 2 * s * tail[0] * x + torch.bmm(grad_dots[rs].unsqueeze(1), atoms).squeeze(1)
            pair_weights = 2 * s * tail_max * v.unsqueeze(2) * v.unsqueeze(1)  # (b, k, k), symmetric
            grad_atoms = torch.baddbmm(grad_dots[rs].unsqueeze(2) * x.unsqueeze(1), pair_weights, atoms)
            grad_weight.index_add_(0, cols[rs].flatten(), grad_atoms.flatten(0, 1))
        return grad_r, grad_values, grad_weight, None, None, None


def _tails(budget_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """T_i = sum_{j>=i} w_j (k,) and T_max(i,i') (k, k)."""
    tail = budget_weights.flip(0).cumsum(0).flip(0)
    i = torch.arange(len(tail), device=tail.device)
    return tail, tail[torch.maximum(i.unsqueeze(1), i.unsqueeze(0))]


def _atoms(weight: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(b, k, d): the dictionary rows of (b, k) latent ids."""
    return weight.index_select(0, cols.flatten()).view(*cols.shape, weight.shape[1])


def _chunks(n: int, size: int):
    return (slice(i, min(i + size, n)) for i in range(0, n, size))


DENSE_GRAM_MAX_LATENTS = 8192  # up to here the dictionary's Gram matrix (latents^2 floats) is the fast path


def prefix_loss(r: torch.Tensor, values: torch.Tensor, cols: torch.Tensor, weight: torch.Tensor,
                budget_weights: torch.Tensor, chunk: int = 512, dense_gram: bool | None = None) -> torch.Tensor:
    """sum_j budget_weights[j] * mean over rows of |r - sum_{i<=j} values[:, i] weight[cols[:, i]]|^2.

    r (rows, d), values and cols (rows, k) (each row's latents in the order their prefixes grow),
    weight (latents, d), budget_weights (k,): the nested-prefix loss of HierarchicalTopK.

    Two exact ways to the same number: with the dictionary's Gram matrix W W^T (one matmul, a gather of
    (rows, k, k)) and one sparse decode, the default up to DENSE_GRAM_MAX_LATENTS latents (faster on CPU
    in a profile of sae-hier-topk-tiny); or row chunks that gather each row's atoms (rows, k, d),
    whose memory does not grow with latents^2.
    """
    if dense_gram is None:
        dense_gram = weight.shape[0] <= DENSE_GRAM_MAX_LATENTS
    if not dense_gram:
        return _PrefixLoss.apply(r, values, weight, cols, budget_weights, chunk)
    tail, tail_max = _tails(budget_weights)
    pair_ids = (cols.unsqueeze(2) * weight.shape[0] + cols.unsqueeze(1)).flatten()  # into the flat Gram matrix
    gram = (weight @ weight.t()).flatten().index_select(0, pair_ids).view(*cols.shape, cols.shape[1])  # <d_i, d_i'>
    pairs = torch.einsum("bi,bij,bj->", values, gram * tail_max, values)
    n, k = cols.shape
    rows = torch.arange(n, device=cols.device).repeat_interleave(k)
    # sum_i T_i v_i <r, d_i> = <r, sum_i T_i v_i d_i>: one sparse decode, O(rows * k * d)
    tailed = sparse_decode(SparseCode((values * tail).flatten(), rows, cols.flatten(), n, weight.shape[0]), weight)
    total = tail[0] * r.square().sum() - 2 * (r * tailed).sum() + pairs
    return total / r.shape[0]


@torch.no_grad()
def prefix_errors(r: torch.Tensor, values: torch.Tensor, cols: torch.Tensor, weight: torch.Tensor,
                  max_elements: int = 1 << 22) -> torch.Tensor:
    """(k,) mean over rows of |r - sum_{i<=j} values[:, i] weight[cols[:, i]]|^2 for every prefix j (no grad).

    Same arguments as prefix_loss; each row chunk's prefix sums (chunk, k, d) hold at most max_elements.
    """
    rows, k = cols.shape
    out = r.new_zeros(k)
    for rs in _chunks(rows, max(1, max_elements // max(k * r.shape[1], 1))):
        partial = (_atoms(weight, cols[rs]) * values[rs].unsqueeze(2)).cumsum(1)  # (b, k, d)
        out += partial.neg_().add_(r[rs].unsqueeze(1)).square_().sum((0, 2))
    return out / max(rows, 1)


def log_area_loss(r: torch.Tensor, values: torch.Tensor, cols: torch.Tensor, weight: torch.Tensor,
                  budget_weights: torch.Tensor, floor: float = 1e-6) -> torch.Tensor:
    """exp(sum_j c_j log E_j): the c-weighted geometric mean of the prefix errors E_j of prefix_loss.

    budget_weights c (k,) must sum to 1. With c_j proportional to 1/j on [k_min, k], minimising it
    minimises the area under the curve of log error against log budget, so every budget's *relative*
    error counts, where an arithmetic mean of the E_j is dominated by the smallest budgets' large errors.
    The value comes from prefix_errors; the gradient, G * sum_j (c_j / E_j) grad E_j (G the value), from
    prefix_loss with weights c_j / E_j. Each E_j is floored at `floor` times the mean |r|^2.
    """
    errors = prefix_errors(r, values, cols, weight)  # no grad
    errors = errors.clamp_min(floor * r.detach().square().sum(-1).mean() + 1e-30)
    used = budget_weights > 0
    geometric = torch.exp((budget_weights[used] * errors[used].log()).sum())
    surrogate = prefix_loss(r, values, cols, weight, torch.where(used, budget_weights / errors, 0.0))
    return geometric * (1 + surrogate - surrogate.detach())


def topk_dense(latents: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest entries of every row of dense latents (..., latents), zero the rest."""
    k = min(k, latents.shape[-1])
    top = latents.topk(k, dim=-1)
    return torch.zeros_like(latents).scatter(-1, top.indices, top.values)
