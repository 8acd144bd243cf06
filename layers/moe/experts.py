"""Routed SwiGLU experts, run dropless on tokens sorted by expert: one grouped (or batched) matmul per projection.

Weights use megablocks' layout, so that its kernels run on the very same tensors:
`w_gate`, `w_up`, `w_down` are (E, width, d); expert e computes
`(silu(x @ w_gate[e].T) * (x @ w_up[e].T)) @ w_down[e]`.

Execution (`impl`; the row layouts are described in layers/moe/dispatch.py):
- "padded": every expert gets as many rows as the largest load and each projection is ONE
  `torch.bmm` over (E, rows, d), at dense-matmul speed; the price is the padding.
- "grouped": exactly one row per assignment, ONE `torch.nn.functional.grouped_mm` with offsets
  (CUDA bf16 and CPU; the fast path on GPUs).
- "tiered": padded rows in a few tiers, one bmm each (see layers/moe/dispatch.py): padding stays small
  when a few experts are overloaded, at the price of copying those experts' weights.
- "fused": the grouped rows, one expert at a time, each expert's gather, three GEMMs, SwiGLU and
  outputs kept in cache (the gathered inputs are written only to be saved for the backward), and the
  weighted sums over a token's slots are one embedding_bag (the CPU path at training sizes). With N intra-op threads the
  experts are split in N parts of about equal rows, run at once on one thread each
  (`layers.kernels.run_split`).
- "auto" (default): megablocks' dMoE kernels (gather, grouped GEMM, scatter) on CUDA bf16/fp16 tensors
  when installed; grouped on other CUDA bf16 tensors and on CPU for decoding sizes; else fused on CPU
  (tiered on CUDA). The choice is made in `layers.kernels.moe_experts_layout`, the one place that picks
  kernels.
The backward is written out (one autograd function for the three projections), so that only the
expert inputs and the two hidden pre-activations are kept, and the SwiGLU product is recomputed.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

from layers import kernels
from layers.moe.dispatch import DispatchPlan, combine, dispatch, make_plan, sum_slots

IMPLS = kernels.MOE_IMPLS


def _group_mm(a: torch.Tensor, w: torch.Tensor, plan: DispatchPlan, transpose_w: bool,
              out: torch.Tensor | None = None, accumulate: bool = False) -> torch.Tensor:
    """(R, i) rows @ w[e] (or w[e].T) for each row's expert -> (R, o); into / added to `out` if given."""
    w = w.transpose(1, 2) if transpose_w else w  # (E, i, o)
    if plan.offsets is not None:  # grouped layout
        result = F.grouped_mm(a, w, offs=plan.offsets)
        return result if out is None else (out.add_(result) if accumulate else out.copy_(result))
    if out is None:
        out = a.new_empty(a.shape[0], w.shape[2])
    for tier in plan.tiers:  # one bmm per tier (1 to MAX_TIERS), never per expert
        w_tier = w if tier.experts is None else w.index_select(0, tier.experts)
        a3 = a[tier.start:tier.end].view(tier.num_experts, tier.rows_per_expert, -1)  # (E_i, C_i, i)
        out3 = out[tier.start:tier.end].view(tier.num_experts, tier.rows_per_expert, -1)  # (E_i, C_i, o)
        out3.baddbmm_(a3, w_tier) if accumulate else torch.bmm(a3, w_tier, out=out3)
    return out


def _group_wgrad(a: torch.Tensor, g: torch.Tensor, plan: DispatchPlan, num_experts: int) -> torch.Tensor:
    """Per expert the sum over its rows of a[row].T @ g[row]: (R, i), (R, o) -> (E, i, o)."""
    if plan.offsets is not None:
        return F.grouped_mm(a.t(), g, offs=plan.offsets)
    total = None
    for tier in plan.tiers:
        a3 = a[tier.start:tier.end].view(tier.num_experts, tier.rows_per_expert, -1)
        g3 = g[tier.start:tier.end].view(tier.num_experts, tier.rows_per_expert, -1)
        part = torch.bmm(a3.transpose(1, 2), g3)  # (E_i, i, o)
        if tier.experts is None:
            total = part if total is None else total.add_(part)
        else:
            if total is None:
                total = part.new_zeros(num_experts, *part.shape[1:])
            total.index_add_(0, tier.experts, part)
    return total


class _SwiGLUExpertsFn(torch.autograd.Function):
    """rows (R, d) -> (R, d) through each row's expert; saves rows and the gate/up pre-activations only."""

    @staticmethod
    def forward(ctx, rows, w_gate, w_up, w_down, plan: DispatchPlan):
        gate = _group_mm(rows, w_gate, plan, transpose_w=True)  # (R, width)
        up = _group_mm(rows, w_up, plan, transpose_w=True)  # (R, width)
        ctx.plan = plan
        ctx.save_for_backward(rows, w_gate, w_up, w_down, gate, up)
        return _group_mm(F.silu(gate).mul_(up), w_down, plan, transpose_w=False)

    @staticmethod
    def backward(ctx, grad_out):
        rows, w_gate, w_up, w_down, gate, up = ctx.saved_tensors
        plan, e = ctx.plan, w_gate.shape[0]
        grad_out = grad_out.contiguous()
        silu = F.silu(gate)
        act = silu * up  # recomputed SwiGLU product (R, width)
        grad_w_down = _group_wgrad(act, grad_out, plan, e)  # (E, width, d)
        grad_act = _group_mm(grad_out, w_down, plan, transpose_w=True)  # (R, width)
        # Buffers are reused as soon as their values are dead (as megablocks does): fewer large allocations.
        grad_up = torch.mul(grad_act, silu, out=act)
        grad_gate = torch.ops.aten.silu_backward.grad_input(grad_act.mul_(up), gate, grad_input=silu)
        grad_w_gate = _group_wgrad(grad_gate, rows, plan, e)  # (E, width, d)
        grad_w_up = _group_wgrad(grad_up, rows, plan, e)
        grad_rows = _group_mm(grad_gate, w_gate, plan, transpose_w=False, out=grad_out)  # (R, d), over grad_out
        _group_mm(grad_up, w_up, plan, transpose_w=False, out=grad_rows, accumulate=True)
        return grad_rows, grad_w_gate, grad_w_up, grad_w_down, None


def _expert_bounds(plan: DispatchPlan) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) of every expert with rows, in the grouped layout (one host sync)."""
    ends = plan.offsets.tolist()
    return [(e, s, t) for e, (s, t) in enumerate(zip([0, *ends[:-1]], ends, strict=True)) if t > s]


_SCRATCH = threading.local()


def _scratch(n_rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised (n_rows, cols) buffer of this thread, the same one while the shape repeats.

    For the fused path's expert outputs (forward) and row gradients (backward), which are dead when the function
    returns, so the two share it: a fresh 64 MiB buffer costs ~16,000 page faults (4 KiB pages) a step, and this
    machine's kernel time on fresh pages drifts (BENCHMARKS.md, issue 18 item 4). One buffer per thread is kept.
    """
    key = (n_rows, cols, like.dtype, like.device)
    if getattr(_SCRATCH, "key", None) != key:
        _SCRATCH.buf = None  # free the old one first
        with torch.inference_mode(False):  # a normal tensor: writable in and out of inference mode
            _SCRATCH.buf = torch.empty(n_rows, cols, dtype=like.dtype, device=like.device)
        _SCRATCH.key = key
    return _SCRATCH.buf


def _split_bounds(bounds: list[tuple[int, int, int]], n: int) -> list[list[tuple[int, int, int]]]:
    """The experts in n parts of about equal rows (largest first, each to the lightest part), for n threads."""
    if n <= 1:
        return [bounds]
    parts: list[list[tuple[int, int, int]]] = [[] for _ in range(n)]
    rows = [0] * n
    for b in sorted(bounds, key=lambda b: b[1] - b[2]):
        i = rows.index(min(rows))
        parts[i].append(b)
        rows[i] += b[2] - b[1]
    return [p for p in parts if p]


class _FusedSwiGLUExpertsFn(torch.autograd.Function):
    """x (T, d), weights (T, K) -> (T, d): gather, the three projections, SwiGLU and the weighted sum, per expert.

    The CPU fast path ("fused"): one expert at a time, so that its rows (about 1 MiB at the fine-grained
    sizes), hidden activations and outputs stay in cache between the gather, the GEMMs, the elementwise
    SwiGLU and the weighted sum. Each of torch's intra-op threads takes a share of the experts
    (kernels.cpu_expert_workers) and runs them one-threaded, which spares ~30 OpenMP fork / joins per
    expert. Saved: the gathered expert inputs and the gate / up pre-activations (the routing weights'
    gradient comes from the hidden activations, so the expert outputs are not kept). Same semantics as
    dispatch -> _SwiGLUExpertsFn -> combine.
    """

    @staticmethod
    def forward(ctx, x, weights, w_gate, w_up, w_down, plan: DispatchPlan, save: bool):
        bounds = _expert_bounds(plan)
        parts = _split_bounds(bounds, kernels.cpu_expert_workers(x, len(bounds), plan.num_rows))
        n_rows, width = plan.num_rows, w_gate.shape[1]
        rows = x.new_empty(n_rows, x.shape[1]) if save else None  # the expert inputs, for the weight gradients
        gate = x.new_empty(n_rows, width) if save else None
        up = x.new_empty(n_rows, width) if save else None
        y = _scratch(n_rows, x.shape[1], x)  # expert outputs, before the routing weights (dead on return)

        def experts_forward(part):
            for e, s, t in part:
                tok = plan.row_token[s:t]
                xe = torch.index_select(x, 0, tok, out=rows[s:t]) if save else x.index_select(0, tok)
                g_e = torch.mm(xe, w_gate[e].t(), out=gate[s:t]) if save else xe @ w_gate[e].t()
                u_e = torch.mm(xe, w_up[e].t(), out=up[s:t]) if save else xe @ w_up[e].t()
                torch.mm(F.silu(g_e).mul_(u_e), w_down[e], out=y[s:t])

        kernels.run_split(experts_forward, parts)
        if save:
            ctx.plan, ctx.parts = plan, parts
            ctx.save_for_backward(weights, w_gate, w_up, w_down, rows, gate, up)
        return sum_slots(y, plan, weights)

    @staticmethod
    def backward(ctx, grad_out):
        weights, w_gate, w_up, w_down, rows, gate, up = ctx.saved_tensors
        plan = ctx.plan
        grad_out = grad_out.contiguous()
        grad_w_gate, grad_w_up, grad_w_down = grads_w = [torch.empty_like(w) for w in (w_gate, w_up, w_down)]
        idle = sorted(set(range(w_gate.shape[0])) - {e for part in ctx.parts for e, _, _ in part})
        for g in grads_w if idle else ():
            g[idle] = 0  # experts without rows
        w_rows = torch.cat([weights.flatten(), weights.new_zeros(1)])[plan.row_assignment]  # (R,)
        grad_w_rows = w_rows.new_empty(w_rows.shape)  # d loss / d routing weight of each row
        grad_rows = _scratch(*rows.shape, rows)  # d loss / d expert input of each row (dead on return)

        def experts_backward(part):
            for e, s, t in part:
                g_e = grad_out.index_select(0, plan.row_token[s:t])  # (rows, d): d loss / d out at each row's token
                w_e, gate_e, up_e, xe = w_rows[s:t, None], gate[s:t], up[s:t], rows[s:t]
                silu = F.silu(gate_e)
                act = silu * up_e  # recomputed SwiGLU product h
                grad_act = g_e @ w_down[e].t()  # (rows, width): d loss / d h, before the routing weight
                # d loss / d routing weight = <g, h @ w_down> = <g @ w_down.T, h>: width-long dots, y never kept
                torch.linalg.vecdot(grad_act, act, out=grad_w_rows[s:t])
                torch.mm(act.mul_(w_e).t(), g_e, out=grad_w_down[e])
                grad_act.mul_(w_e)
                grad_up = torch.mul(grad_act, silu, out=act)
                grad_gate = torch.ops.aten.silu_backward.grad_input(grad_act.mul_(up_e), gate_e, grad_input=silu)
                torch.mm(grad_gate.t(), xe, out=grad_w_gate[e])
                torch.mm(grad_up.t(), xe, out=grad_w_up[e])
                torch.mm(grad_gate, w_gate[e], out=grad_rows[s:t]).addmm_(grad_up, w_up[e])

        kernels.run_split(experts_backward, ctx.parts)
        grad_x = sum_slots(grad_rows, plan)
        grad_weights = w_rows.new_zeros(plan.num_tokens * plan.num_slots)  # dropped / unused slots: 0
        grad_weights[plan.row_assignment] = grad_w_rows
        return grad_x, grad_weights.view(weights.shape), grad_w_gate, grad_w_up, grad_w_down, None, None


class SwiGLUExperts(nn.Module):
    """E SwiGLU experts of the same width, computed dropless (or with a token capacity) on sorted tokens."""

    def __init__(self, num_experts: int, d_model: int, width: int, impl: str = "auto"):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"experts impl {impl!r} is invalid: one of {IMPLS}")
        self.num_experts, self.d_model, self.width = num_experts, d_model, width
        self.impl = impl
        self.w_gate = nn.Parameter(torch.empty(num_experts, width, d_model))
        self.w_up = nn.Parameter(torch.empty(num_experts, width, d_model))
        self.w_down = nn.Parameter(torch.empty(num_experts, width, d_model))
        self.init_weights_(0.02)  # the zoo LM re-initialises with its config's init_std
        self.last_impl: str | None = None  # the path the last forward took

    def init_weights_(self, std: float) -> None:
        """Normal(0, std) weights, as nn.Linear layers get in the zoo's models (skips loaded tensors)."""
        with torch.no_grad():
            for p in (self.w_gate, self.w_up, self.w_down):
                if not getattr(p, "_is_hf_initialized", False):
                    nn.init.normal_(p, mean=0.0, std=std)

    def params_per_expert(self) -> int:
        """Parameters of one expert (three width x d matrices)."""
        return 3 * self.width * self.d_model

    def flops_per_token(self) -> int:
        """Forward FLOPs of one expert on one token: three projections plus the gate's elementwise product."""
        return 6 * self.d_model * self.width + self.width

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                capacity: int | None = None) -> tuple[torch.Tensor, DispatchPlan | None]:
        """x (T, d), weights / experts (T, K) (-1: unused) -> ((T, d) output, plan; None on megablocks).

        Under autocast the experts run in the autocast dtype: inputs and weights are cast once here (the casts
        are differentiable, so fp32 master weights get fp32 gradients) and the hand-written autograd
        functions below see one dtype in forward and backward.
        """
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            x = x.to(dtype)
            w_gate, w_up, w_down = (w.to(dtype) for w in (self.w_gate, self.w_up, self.w_down))
            rows = experts.numel()  # routed slots (a bound on the rows; no device sync)
            layout = kernels.moe_experts_layout(x, self.impl, self.d_model, self.width, capacity, rows)
            if layout == "megablocks":
                from layers.moe.megablocks_backend import megablocks_experts

                self.last_impl = layout
                return megablocks_experts(x, weights.to(dtype), experts, w_gate, w_up, w_down), None
            plan = make_plan(experts, self.num_experts, layout="grouped" if layout == "fused" else layout,
                             capacity=capacity)
            self.last_impl = "fused" if layout == "fused" else plan.layout
            if plan.num_rows == 0:
                return x.new_zeros(x.shape) + 0 * weights.sum(), plan  # nothing routed: keep the graph connected
            if layout == "fused":
                save = torch.is_grad_enabled() and any(t.requires_grad for t in (x, weights, w_gate, w_up, w_down))
                return _FusedSwiGLUExpertsFn.apply(x, weights.to(dtype), w_gate, w_up, w_down, plan, save), plan
            rows = dispatch(x, plan)  # (R, d)
            rows = _SwiGLUExpertsFn.apply(rows, w_gate, w_up, w_down, plan)
            return combine(rows, weights, plan), plan

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, width={self.width}, impl={self.impl!r}"


def capacity_for(capacity_factor: float, num_tokens: int, num_experts_per_tok: int, num_experts: int) -> int:
    """Switch's expert capacity: ceil(capacity_factor * tokens * k / experts)."""
    return max(1, math.ceil(capacity_factor * num_tokens * num_experts_per_tok / num_experts))
