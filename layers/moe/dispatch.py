"""Token <-> expert-row permutation: the plan, and the gather / weighted-combine autograd functions.

The experts run on "rows": the (token, expert) assignments sorted by expert. Two row layouts:

- grouped: one row per assignment, expert after expert, delimited by `offsets`, for ONE
  `torch.nn.functional.grouped_mm` per projection (the GPU path);
- tiers of padded rows, for batched matmuls (`torch.bmm`) over (experts, rows, d): tier 0 gives every
  expert its first C0 assignments (padding where it has fewer), tier 1 the next C1 assignments of the
  experts that have more, and so on. One tier with C0 = the largest load is the plain padded layout
  (one bmm, no weight copy); later tiers copy the weights of their few experts. On CPU one bmm runs at
  dense-matmul speed where grouped_mm runs one small matmul per expert (2-4x slower, benchmarks/moe.md),
  and tiers keep the padding small when a few experts are overloaded (common early in training).

Both directions are gathers, never scatter-adds: the backward of `dispatch` sums, for each token,
the gradients of its K rows; the backward of `combine` reads, for each row, its token's gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_PADDING = 0.25  # a tier pads at most this fraction of its rows ...
MAX_TIERS = 8  # ... except the last one, which takes every remaining assignment


@dataclass
class Tier:
    """Rows [start, start + len(experts) * rows_per_expert) of the padded layout: C rows for each of its experts."""

    experts: torch.Tensor | None  # (E_i,) int64 expert ids in this tier; None: all experts, in order
    num_experts: int
    rows_per_expert: int
    start: int

    @property
    def end(self) -> int:
        """One past the tier's last row."""
        return self.start + self.num_experts * self.rows_per_expert


@dataclass
class DispatchPlan:
    """Where every (token, slot) assignment goes among the expert rows; built without gradients."""

    num_tokens: int
    num_slots: int  # K
    slot_row: torch.Tensor  # (T, K) int64 row of each assignment (0 where not kept: masked by `kept`)
    kept: torch.Tensor  # (T, K) bool: the assignment is routed and within capacity
    row_token: torch.Tensor  # (R,) int64 token each row reads (padding rows read token 0, weight 0)
    row_assignment: torch.Tensor  # (R,) int64 flat assignment t * K + j of each row; T * K for padding
    tokens_per_expert: torch.Tensor  # (E,) int64 routed assignments per expert, before any capacity drop
    kept_per_expert: torch.Tensor  # (E,) int64 rows per expert that hold a token
    tiers: list[Tier]  # the padded layout (empty in the grouped layout)
    offsets: torch.Tensor | None  # (E,) int32 end row of each expert in the grouped layout, else None
    all_kept: bool  # no slot is unused or dropped (then the masks can be skipped)

    @property
    def num_rows(self) -> int:
        """R, the rows the experts compute (padding included)."""
        return self.row_token.numel()

    @property
    def layout(self) -> str:
        """"grouped", "padded" (one tier of every expert) or "tiered(n)"."""
        if self.offsets is not None or not self.tiers:
            return "grouped"
        return "padded" if len(self.tiers) == 1 and self.tiers[0].experts is None else f"tiered({len(self.tiers)})"


def _largest_cheap_rows(loads: list[int], max_padding: float) -> int:
    """The largest C (one of the loads) with which len(loads) experts of C rows pad <= max_padding of their rows."""
    ordered = sorted(loads)
    n, best, below = len(ordered), 0, 0  # below: sum of the loads smaller than the candidate
    for j, c in enumerate(ordered):
        real = below + c * (n - j)  # rows holding an assignment when every expert gets c rows
        if n * c - real <= max_padding * real:
            best = c
        below += c
    return best


def tier_sizes(loads: list[int], layout: str, max_padding: float = MAX_PADDING,
               max_tiers: int = MAX_TIERS) -> list[tuple[list[int] | None, int]]:
    """[(experts or None for all, rows per expert)] for these per-expert loads; "padded" gives one tier."""
    if layout == "padded" or max(loads, default=0) == 0:
        return [(None, max(max(loads, default=0), 1))]
    tiers, done = [], 0  # done: assignments per expert already placed
    first = _largest_cheap_rows(loads, max_padding)  # tier 0 holds every expert, so it needs no weight copy
    if first:
        tiers.append((None, first))
        done = first
    while max(loads) > done:
        ids = [e for e, n in enumerate(loads) if n > done]
        rest = [loads[e] - done for e in ids]
        last = len(tiers) == max_tiers - 1
        c = max(rest) if last else max(_largest_cheap_rows(rest, max_padding), min(rest))
        tiers.append((None if len(ids) == len(loads) else ids, c))
        done += c
    return tiers


@torch.no_grad()
def make_plan(experts: torch.Tensor, num_experts: int, *, layout: str = "tiered",
              capacity: int | None = None) -> DispatchPlan:
    """Sort the (T, K) assignments (-1: unused slot) by expert; drop those past `capacity` per expert, if given.

    layout: "padded" (one bmm), "tiered" (bmms over tiers of padded rows) or "grouped" (one grouped_mm).
    """
    t, k = experts.shape
    device = experts.device
    flat = experts.flatten()  # (T*K,)
    key = torch.where(flat >= 0, flat, num_experts)  # unused slots sort last, into a bin of their own
    order = torch.argsort(key, stable=True)  # assignments by expert, in token order within an expert
    key_sorted = key[order]
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts]  # (E,)
    starts = torch.cumsum(counts, 0) - counts
    n_routed = int(counts.sum())
    order, key_sorted = order[:n_routed], key_sorted[:n_routed]
    position = torch.arange(n_routed, device=device) - starts[key_sorted]  # rank within its expert
    kept_counts = counts
    if capacity is not None:  # token dropping (Switch): the first `capacity` tokens of each expert stay
        keep = position < capacity
        order, key_sorted, position = order[keep], key_sorted[keep], position[keep]
        kept_counts = counts.clamp(max=capacity)
    n_kept = order.numel()
    tiers: list[Tier] = []
    offsets = None
    if layout == "grouped":
        rows = torch.arange(n_kept, device=device)
        n_rows, offsets = n_kept, torch.cumsum(kept_counts, 0).to(torch.int32)
    else:
        rows, tiers = _tiered_rows(kept_counts, key_sorted, position, layout)
        n_rows = tiers[-1].end
    row_assignment = torch.full((n_rows,), t * k, dtype=torch.long, device=device)
    row_assignment[rows] = order
    row_token = torch.where(row_assignment < t * k, row_assignment // k, 0)
    slot_row = torch.zeros(t * k, dtype=torch.long, device=device)
    slot_row[order] = rows
    kept = torch.zeros(t * k, dtype=torch.bool, device=device)
    kept[order] = True
    return DispatchPlan(t, k, slot_row.view(t, k), kept.view(t, k), row_token, row_assignment, counts,
                        kept_counts, tiers, offsets, all_kept=n_kept == t * k)


def _tiered_rows(loads: torch.Tensor, expert: torch.Tensor, position: torch.Tensor,
                 layout: str) -> tuple[torch.Tensor, list[Tier]]:
    """Row of each sorted assignment (its expert, its rank within the expert) in the tiers for these loads."""
    device, num_experts = loads.device, loads.numel()
    sizes = tier_sizes(loads.tolist(), layout)
    tiers, first_position, start = [], [], 0
    rank = torch.zeros(len(sizes), num_experts, dtype=torch.long, device=device)  # slot of expert e in tier i
    done = 0
    for i, (ids, c) in enumerate(sizes):
        members = torch.arange(num_experts, device=device) if ids is None else torch.tensor(ids, device=device)
        rank[i, members] = torch.arange(members.numel(), device=device)
        tiers.append(Tier(None if ids is None else members, members.numel(), c, start))
        first_position.append(done)
        start, done = tiers[-1].end, done + c
    bounds = torch.tensor(first_position[1:], device=device)
    tier = torch.searchsorted(bounds, position, right=True)  # (n,) tier of each assignment
    tier_start = torch.tensor([tr.start for tr in tiers], device=device)
    tier_rows = torch.tensor([tr.rows_per_expert for tr in tiers], device=device)
    tier_first = torch.tensor(first_position, device=device)
    rows = tier_start[tier] + rank[tier, expert] * tier_rows[tier] + position - tier_first[tier]
    return rows, tiers


def sum_slots(rows: torch.Tensor, plan: DispatchPlan, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(R, d) row values -> (T, d): each token's sum over its kept rows, weighted by (T, K) `weights` if given.

    One embedding_bag (a fused, parallel gather-and-sum: 5x faster on CPU than gathering the (T, K, d) rows
    and summing them); unkept slots point at row 0 and get weight 0.
    """
    if not plan.all_kept:
        kept = plan.kept.to(rows.dtype)
        weights = kept if weights is None else weights * kept
    return torch.nn.functional.embedding_bag(plan.slot_row, rows, per_sample_weights=weights, mode="sum")


def _sum_token_rows(grad_rows: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """(R, d) row values -> (T, d): each token's sum over its kept rows."""
    return sum_slots(grad_rows, plan)


class _Dispatch(torch.autograd.Function):
    """(T, d) tokens -> (R, d) expert rows; backward sums each token's row gradients (a gather)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        ctx.plan = plan
        return x.index_select(0, plan.row_token)

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        return _sum_token_rows(grad_rows, ctx.plan), None


class _Combine(torch.autograd.Function):
    """(R, d) expert outputs and (T, K) weights -> (T, d): out[t] = sum_j w[t, j] * rows[slot_row[t, j]]."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        if not plan.all_kept:
            weights = weights * plan.kept.to(weights.dtype)
        ctx.plan = plan
        ctx.save_for_backward(rows, weights)
        return sum_slots(rows, plan, weights)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        rows, weights = ctx.saved_tensors
        plan = ctx.plan
        # Row r holds assignment a(r) of token t(r): d rows[r] = w[a(r)] * g[t(r)], d w[a(r)] = <rows[r], g[t(r)]>.
        grad_at_rows = grad_out.contiguous().index_select(0, plan.row_token)  # (R, d)
        grad_weights = None
        if ctx.needs_input_grad[1]:
            per_row = torch.einsum("rd,rd->r", rows, grad_at_rows)  # (R,)
            grad_weights = weights.new_zeros(plan.num_tokens * plan.num_slots + 1)
            grad_weights[plan.row_assignment] = per_row  # padding rows all land on the extra last entry
            grad_weights = grad_weights[:-1].view(plan.num_tokens, plan.num_slots)
            if not plan.all_kept:
                grad_weights = grad_weights * plan.kept.to(grad_weights.dtype)
        w_at_rows = torch.cat([weights.flatten(), weights.new_zeros(1)])[plan.row_assignment]  # padding: 0
        return grad_at_rows.mul_(w_at_rows.unsqueeze(1)), grad_weights, None


def dispatch(x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """(T, d) -> (R, d): each expert row gets its token's hidden state."""
    return _Dispatch.apply(x, plan)


def combine(rows: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """(R, d) expert outputs -> (T, d) weighted sum over each token's kept assignments."""
    return _Combine.apply(rows, weights.to(rows.dtype), plan)
