"""The fused CPU expert path (layers/moe/experts.py, impl="fused") against the padded bmm path and a per-token loop."""

import pytest
import torch
import torch.nn.functional as F

from layers import kernels
from layers.moe import SwiGLUExperts


def make(num_experts=6, d=16, width=8, seed=0):
    torch.manual_seed(seed)
    m = SwiGLUExperts(num_experts, d, width, impl="fused")
    m.init_weights_(0.3)
    return m


def per_token(m, x, weights, experts, kept=None):
    """sum_j w_j * expert_j(x_t), one token and slot at a time (independent of any dispatch code)."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(experts.shape[1]):
            e = int(experts[t, j])
            if e >= 0 and (kept is None or kept[t, j]):
                out[t] += weights[t, j] * ((F.silu(x[t] @ m.w_gate[e].T) * (x[t] @ m.w_up[e].T)) @ m.w_down[e])
    return out


def routing(t=40, k=3, num_experts=6, seed=1):
    """Distinct experts per token among the first four only (experts 4, 5 get no rows), a few unused slots."""
    g = torch.Generator().manual_seed(seed)
    experts = torch.stack([torch.randperm(4, generator=g)[:k] for _ in range(t)])
    experts[torch.rand(t, k, generator=g) < 0.2] = -1
    weights = torch.rand(t, k, generator=g)
    return weights, experts


@pytest.mark.parametrize("capacity", [None, 9])
def test_fused_values_and_gradients_equal_the_per_token_loop_with_idle_experts(capacity):
    m = make()
    weights, experts = routing()
    x = torch.randn(40, 16, requires_grad=True)
    weights.requires_grad_()
    out, plan = m(x, weights, experts, capacity)
    assert m.last_impl == "fused" and (capacity is None) == bool(plan.kept[experts >= 0].all())
    ref = per_token(m, x, weights, experts, kept=plan.kept)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    params = [x, weights, m.w_gate, m.w_up, m.w_down]
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    got, want = torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert got[2][4:].abs().max() == 0 and got[4][4:].abs().max() == 0  # experts without rows: zero gradient


def test_fused_equals_padded_bmm_and_runs_without_saving_under_no_grad():
    m = make()
    weights, experts = routing(seed=5)
    x = torch.randn(40, 16)
    with torch.no_grad():
        fused, _ = m(x, weights, experts)
        m.impl = "padded"
        padded, _ = m(x, weights, experts)
    torch.testing.assert_close(fused, padded, atol=1e-6, rtol=1e-5)


def test_fused_trains_under_bf16_autocast_with_fp32_gradients():
    m = make()
    weights, experts = routing(seed=7)
    x = torch.randn(40, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = m(x, weights, experts)
    low.float().square().sum().backward()
    grads = [p.grad.clone() for p in (m.w_gate, m.w_up, m.w_down)]
    m.zero_grad()
    m(x, weights, experts)[0].square().sum().backward()
    for got, p in zip(grads, (m.w_gate, m.w_up, m.w_down), strict=True):
        assert got.dtype == torch.float32
        assert float((got - p.grad).norm() / p.grad.norm()) < 0.03


def test_auto_takes_fused_on_cpu_at_training_sizes_only():
    x = torch.randn(4, 512)
    assert kernels.moe_experts_layout(x, "auto", 512, 256, None, rows=4096) == "fused"
    assert kernels.moe_experts_layout(x, "auto", 512, 256, 64, rows=4096) == "fused"  # with a capacity too
    assert kernels.moe_experts_layout(x, "fused", 512, 256, None, rows=8) == "fused"


@pytest.mark.parametrize("capacity", [None, 60])
def test_fused_splits_experts_over_two_threads_with_the_loops_values_and_gradients(two_threads, monkeypatch,
                                                                                  capacity):
    parts_seen = []
    real = kernels.run_split

    def spy(work, parts):
        parts_seen.append([[e for e, _, _ in part] for part in parts])
        return real(work, parts)

    monkeypatch.setattr(kernels, "run_split", spy)
    m = make()
    weights, experts = routing(t=200, seed=11)  # ~120 rows per busy expert: above kernels.CPU_SPLIT_MIN_ROWS
    x = torch.randn(200, 16, requires_grad=True)
    weights.requires_grad_()
    out, plan = m(x, weights, experts, capacity)
    assert (capacity is None) == bool(plan.kept[experts >= 0].all())  # capacity 60 drops slots
    ref = per_token(m, x, weights, experts, kept=plan.kept)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    params = [x, weights, m.w_gate, m.w_up, m.w_down]
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # forward and backward each ran the four busy experts in two parts, every expert exactly once
    assert len(parts_seen) == 2 and all(len(p) == 2 and sorted(sum(p, [])) == [0, 1, 2, 3] for p in parts_seen)
    assert torch.get_num_threads() == 2  # the caller's thread count is restored
    parts_seen.clear()
    m(x[:40], weights[:40], experts[:40])  # ~24 rows per expert: below the threshold, one part
    assert [len(p) for p in parts_seen] == [1]


def test_fused_split_runs_under_inference_mode(two_threads):
    m = make()
    weights, experts = routing(t=200, seed=13)
    x = torch.randn(200, 16)
    with torch.inference_mode():
        out, _ = m(x, weights, experts)
    with torch.no_grad():
        torch.testing.assert_close(out, per_token(m, x, weights, experts), atol=1e-5, rtol=1e-5)


def test_split_bounds_balances_rows_and_keeps_every_expert_once():
    from layers.moe.experts import _split_bounds

    sizes = [90, 10, 40, 40, 30, 30, 5, 60]
    bounds, start = [], 0
    for e, n in enumerate(sizes):
        bounds.append((e, start, start + n))
        start += n
    parts = _split_bounds(bounds, 3)
    assert sorted(b for p in parts for b in p) == bounds
    loads = [sum(t - s for _, s, t in p) for p in parts]
    assert max(loads) - min(loads) <= max(sizes)  # greedy on sorted sizes: within one expert of even
    assert _split_bounds(bounds, 1) == [bounds] and len(_split_bounds(bounds[:2], 4)) == 2


def test_the_scratch_buffer_is_reused_per_shape_and_survives_inference_mode():
    from layers.moe.experts import _scratch

    like = torch.zeros(1)
    with torch.inference_mode():
        a = _scratch(7, 5, like)
    assert not a.is_inference()  # written again outside inference mode below
    assert _scratch(7, 5, like) is a and _scratch(8, 5, like) is not a
    m = make()
    weights, experts = routing(seed=17)
    x = torch.randn(40, 16, requires_grad=True)
    with torch.inference_mode():
        first, _ = m(x.detach(), weights, experts)  # the scratch made under inference mode ...
    out, _ = m(x, weights, experts)  # ... then a training forward and backward of the same shapes
    out.sum().backward()
    torch.testing.assert_close(first, out.detach())
    with torch.no_grad():
        torch.testing.assert_close(out, per_token(m, x, weights, experts), atol=1e-5, rtol=1e-5)
    ref_grad = torch.autograd.grad(per_token(m, x, weights, experts).sum(), x)[0]
    torch.testing.assert_close(x.grad, ref_grad, atol=1e-5, rtol=1e-5)
