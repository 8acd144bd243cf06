"""Expert execution: grouped / padded paths against a per-token reference, dropless and with a capacity."""

import pytest
import torch
import torch.nn.functional as F

from layers import kernels
from layers.kernels import HAS_GROUPED_MM
from layers.mlp import SwiGLU
from layers.moe import MoEMLP, SwiGLUExperts, make_plan
from layers.moe.dispatch import tier_sizes

IMPLS = ["padded", "tiered", "grouped", "fused"] if HAS_GROUPED_MM else ["padded", "tiered", "fused"]


def experts_module(num_experts=4, d=16, width=24, impl="padded", seed=0) -> SwiGLUExperts:
    torch.manual_seed(seed)
    m = SwiGLUExperts(num_experts, d, width, impl=impl)
    m.init_weights_(0.2)
    return m


def random_routing(t, k, num_experts, unused=0.0, seed=1):
    """(T, K) distinct experts per token (expert 0 popular), a fraction `unused` of the slots -1, random weights."""
    g = torch.Generator().manual_seed(seed)
    popularity = torch.ones(num_experts)
    popularity[0] = 3.0 * num_experts
    experts = torch.multinomial(popularity.expand(t, -1), k, replacement=False, generator=g)
    experts[torch.rand(t, k, generator=g) < unused] = -1
    weights = torch.rand(t, k, generator=g) * (experts >= 0)
    return weights, experts


def reference(m: SwiGLUExperts, x, weights, experts, kept=None):
    """Per-token loop: sum_j w_j * expert_j(x_t) over the kept slots."""
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t])
        for j in range(experts.shape[1]):
            e = int(experts[t, j])
            if e < 0 or (kept is not None and not kept[t, j]):
                continue
            h = F.silu(x[t] @ m.w_gate[e].T) * (x[t] @ m.w_up[e].T)
            acc = acc + weights[t, j] * (h @ m.w_down[e])
        rows.append(acc)
    return torch.stack(rows)


def grads(out, inputs, seed=2):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device)
    return torch.autograd.grad(out, inputs, g)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("unused", [0.0, 0.3])
def test_sorted_execution_equals_per_token_reference_values_and_gradients(impl, unused):
    m = experts_module(impl=impl)
    x = torch.randn(60, 16, requires_grad=True)
    weights, experts = random_routing(60, 2, 4, unused=unused)
    weights.requires_grad_()
    out, plan = m(x, weights, experts)
    assert m.last_impl == {"tiered": "tiered(2)"}.get(impl, impl)  # expert 0's extra tokens form tier 1
    ref = reference(m, x, weights, experts)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    params = [x, weights, m.w_gate, m.w_up, m.w_down]
    for a, b in zip(grads(out, params), grads(ref, params), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_padded_layout_pads_each_expert_to_the_largest_load():
    experts = torch.tensor([[0, 1], [0, 2], [0, 1]])
    plan = make_plan(experts, 3, layout="padded")
    assert plan.layout == "padded" and plan.tiers[0].rows_per_expert == 3 and plan.num_rows == 9
    assert plan.tokens_per_expert.tolist() == [3, 2, 1]
    # Expert e's rows are e * 3 ... e * 3 + 2, filled in token order.
    assert plan.slot_row.tolist() == [[0, 3], [1, 6], [2, 4]]
    grouped = make_plan(experts, 3, layout="grouped")
    assert grouped.num_rows == 6 and grouped.offsets.tolist() == [3, 5, 6]
    assert grouped.slot_row.tolist() == [[0, 3], [1, 5], [2, 4]]


def test_tiers_pad_every_expert_to_a_common_load_then_add_the_overloaded_experts():
    experts = torch.tensor([0] * 50 + [1] * 5 + [2] * 5).view(60, 1)  # loads 50, 5, 5
    plan = make_plan(experts, 3, layout="tiered")
    assert [(t.experts, t.rows_per_expert, t.start) for t in plan.tiers][0] == (None, 5, 0)
    assert plan.tiers[1].experts.tolist() == [0] and plan.tiers[1].rows_per_expert == 45
    assert plan.num_rows == 60  # no padding at all
    rows = plan.slot_row.flatten().tolist()
    assert rows[:5] == [0, 1, 2, 3, 4] and rows[5:50] == list(range(15, 60))
    assert rows[50:55] == [5, 6, 7, 8, 9] and rows[55:] == [10, 11, 12, 13, 14]


def test_tier_sizes_bound_the_padding():
    assert tier_sizes([10, 10, 10, 10], "tiered") == [(None, 10)]  # balanced: one bmm, no weight copy
    assert tier_sizes([12, 10, 10, 10], "tiered") == [(None, 12)]  # 2 padding rows of 42 are cheap
    assert tier_sizes([100, 5, 5, 5], "tiered") == [(None, 5), ([0], 95)]
    assert tier_sizes([100, 0, 0, 0], "tiered") == [([0], 100)]  # empty experts are not padded
    loads = [1000, 700, 400, 200, 100, 50, 20, 10, 5]
    sizes = tier_sizes(loads, "tiered", max_tiers=3)
    assert len(sizes) == 3 and sum(c for _, c in sizes) == 1000
    assert tier_sizes([100, 5], "padded") == [(None, 100)]


@pytest.mark.parametrize("impl", IMPLS)
def test_capacity_drops_the_last_tokens_of_an_overloaded_expert_and_reports_them(impl):
    m = experts_module(impl=impl)
    x = torch.randn(6, 16)
    experts = torch.tensor([[0, 1], [0, 2], [0, 3], [0, 1], [1, 2], [3, 2]])
    weights = torch.full((6, 2), 0.5)
    out, plan = m(x, weights, experts, capacity=2)
    # Each expert keeps its first two tokens in token order: expert 0 (tokens 0-3) drops tokens 2, 3,
    # expert 1 (tokens 0, 3, 4) drops token 4, expert 2 (tokens 1, 4, 5) drops token 5.
    kept = torch.ones(6, 2, dtype=torch.bool)
    kept[2, 0] = kept[3, 0] = kept[4, 0] = kept[5, 1] = False
    assert torch.equal(plan.kept, kept)
    assert plan.tokens_per_expert.tolist() == [4, 3, 3, 2]
    assert plan.kept_per_expert.tolist() == [2, 2, 2, 2]
    torch.testing.assert_close(out, reference(m, x, weights, experts, kept=kept), atol=1e-5, rtol=1e-5)


def test_moe_layer_reports_dropped_fraction_in_capacity_mode():
    torch.manual_seed(0)
    layer = MoEMLP(16, 32, num_experts=4, num_experts_per_tok=2, capacity_factor=0.5)
    layer.experts.init_weights_(0.1)
    _, report = layer(torch.randn(40, 16))
    dropped = float(report.metrics["moe_dropped_fraction"])
    capacity = 10  # ceil(0.5 * 40 * 2 / 4)
    expected = 1 - report.stats["tokens_per_expert"].clamp(max=capacity).sum().item() / 80
    assert dropped == pytest.approx(expected) and dropped > 0


def test_one_expert_moe_equals_its_mlp():
    torch.manual_seed(0)
    mlp = SwiGLU(16, 24)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.2)
    moe = MoEMLP(16, 24, num_experts=1, num_experts_per_tok=1)
    with torch.no_grad():
        moe.experts.w_gate[0].copy_(mlp.gate.weight)
        moe.experts.w_up[0].copy_(mlp.up.weight)
        moe.experts.w_down[0].copy_(mlp.down.weight.T)
    x = torch.randn(2, 5, 16)
    for impl in IMPLS:
        moe.experts.impl = impl
        torch.testing.assert_close(moe(x)[0], mlp(x), atol=1e-6, rtol=1e-5)


def test_all_experts_with_uniform_weights_equal_the_mean_of_all_experts():
    torch.manual_seed(0)
    moe = MoEMLP(16, 24, num_experts=4, num_experts_per_tok=4)
    moe.experts.init_weights_(0.2)
    torch.nn.init.zeros_(moe.router.proj.weight)  # uniform probabilities 1/4
    x = torch.randn(7, 16)
    e = moe.experts
    each = [(F.silu(x @ e.w_gate[i].T) * (x @ e.w_up[i].T)) @ e.w_down[i] for i in range(4)]
    torch.testing.assert_close(moe(x)[0], torch.stack(each).mean(0), atol=1e-6, rtol=1e-5)


def test_routed_scaling_factor_multiplies_the_routed_sum_only():
    torch.manual_seed(0)
    moe = MoEMLP(16, 32, num_experts=4, num_experts_per_tok=2, n_shared_experts=1, granularity=2,
                 routed_scaling_factor=2.5)
    x = torch.randn(5, 16)
    routing = moe.router(x)
    routed, _ = moe.experts(x, routing.weights, routing.experts)
    torch.testing.assert_close(moe(x)[0], 2.5 * routed + moe.shared(x))
    plain = MoEMLP(16, 32, num_experts=4, num_experts_per_tok=2, n_shared_experts=1, granularity=2)
    assert moe.flops_per_token() == plain.flops_per_token() + 16  # one multiply per output feature


def test_shared_experts_are_added_to_every_token():
    torch.manual_seed(0)
    moe = MoEMLP(16, 32, num_experts=4, num_experts_per_tok=1, granularity=2, n_shared_experts=2)
    assert moe.experts.width == 16 and moe.shared.up.out_features == 32
    x = torch.randn(5, 16)
    routing = moe.router(x)
    routed, _ = moe.experts(x, routing.weights, routing.experts)
    torch.testing.assert_close(moe(x)[0], routed + moe.shared(x))


def _compare_on_cuda(impl: str, unused: float) -> None:
    """Experts on CUDA bf16 through `impl` against the padded path: outputs and gradients."""
    torch.manual_seed(0)
    m = SwiGLUExperts(8, 128, 256, impl=impl).cuda().to(torch.bfloat16)
    m.init_weights_(0.05)
    x = torch.randn(512, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weights, experts = random_routing(512, 2, 8, unused=unused)
    weights, experts = weights.cuda().requires_grad_(), experts.cuda()
    out, _ = m(x, weights, experts)
    assert m.last_impl == ("megablocks" if impl == "auto" else impl)
    params = [x, weights, m.w_gate, m.w_up, m.w_down]
    got = grads(out.float(), params)
    m.impl = "padded"
    ref, _ = m(x, weights, experts)
    want = grads(ref.float(), params)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_GROUPED_MM or torch.cuda.get_device_capability() < (8, 0),
                    reason="needs CUDA sm80+ and grouped_mm")
def test_cuda_grouped_mm_path_matches_the_padded_path():
    _compare_on_cuda("grouped", unused=0.3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not kernels.megablocks_installed(),
                    reason="needs CUDA, megablocks and grouped_gemm")
@pytest.mark.parametrize("unused", [0.0, 0.3])
def test_megablocks_path_matches_the_pytorch_path(unused):
    _compare_on_cuda("auto", unused)  # "auto" takes megablocks on CUDA bf16 when it is installed


def test_experts_train_under_bf16_autocast_as_the_trainer_runs_them_on_gpus():
    """Autocast (fp32 weights, bf16 compute) reaches the hand-written backward in one dtype: fp32 weight
    gradients close to the fp32 computation (it failed with a dtype error before)."""
    torch.manual_seed(0)
    moe = MoEMLP(32, 64, num_experts=4, num_experts_per_tok=2)
    moe.experts.init_weights_(0.1)
    x = torch.randn(24, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = moe(x)
    out.float().square().sum().backward()
    low = [p.grad.clone() for p in (moe.experts.w_gate, moe.experts.w_up, moe.experts.w_down)]
    moe.zero_grad()
    out32, _ = moe(x)
    out32.square().sum().backward()
    for got, param in zip(low, (moe.experts.w_gate, moe.experts.w_up, moe.experts.w_down), strict=True):
        assert got.dtype == torch.float32
        assert float((got - param.grad).norm() / param.grad.norm()) < 0.03


@pytest.mark.skipif(not HAS_GROUPED_MM, reason="needs torch.nn.functional.grouped_mm")
def test_auto_takes_grouped_mm_on_cpu_for_decoding_sizes_and_fused_for_training_sizes():
    from layers.kernels import CPU_GROUPED_MAX_ROWS

    torch.manual_seed(0)
    m = SwiGLUExperts(4, 16, 32)
    for tokens, expected in ((8, "grouped"), (CPU_GROUPED_MAX_ROWS, "fused")):  # 16 and 512 routed rows
        weights, experts = random_routing(tokens, 2, 4)
        x = torch.randn(tokens, 16)
        out, _ = m(x, weights, experts)
        assert m.last_impl.split("(")[0] == expected, tokens
        m.impl = "padded"
        torch.testing.assert_close(out, m(x, weights, experts)[0], atol=1e-6, rtol=1e-5)
        m.impl = "auto"
