"""FAVOR+ features: an unbiased estimate that converges to exact attention; random projections fixed at inference."""

import math

import pytest
import torch

from layers.attention import KINDS
from layers.attention.performer import favor_features
from layers.attention.random_projection import RandomProjection, gaussian_orthogonal


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def exact(q, k, v):
    return (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1) @ v


def test_feature_products_are_an_unbiased_estimate_of_the_softmax_kernel():
    d = 16
    q, k = randn(1, 1, 6, d) * 0.3, randn(1, 1, 6, d, seed=1) * 0.3
    target = torch.exp(q @ k.transpose(-1, -2) / math.sqrt(d))
    draws = []
    for seed in range(300):  # independent draws of 16 features
        w = gaussian_orthogonal(16, d, torch.Generator().manual_seed(seed))
        phi_q, stab = favor_features(q, w, is_query=True)
        phi_k, _ = favor_features(k, w, is_query=False)
        draws.append(phi_q @ phi_k.transpose(-1, -2) * torch.exp(stab))
    mean = torch.stack(draws).mean(0)
    # the relative standard deviation of one draw is ~0.26 here, of the mean of 300 draws ~0.015
    assert ((mean - target).abs() / target).mean() < 0.04
    assert ((draws[0] - target).abs() / target).mean() > 0.1


def test_performer_converges_to_exact_attention_as_features_grow():
    d = 16
    # FAVOR+'s variance grows like exp(|q + k|^2 / sqrt(d)): a moderate temperature keeps the test fast
    q, k, v = randn(4, 2, 64, d) * 0.3, randn(4, 2, 64, d, seed=1) * 0.3, randn(4, 2, 64, d, seed=2)
    ref = exact(q, k, v)
    errors = {}
    for m in (8, 32, 128, 512):
        runs = []
        for seed in range(3):
            torch.manual_seed(seed)
            out = KINDS["performer"](head_dim=d, n_features=m)(q, k, v, causal=False)
            runs.append(((out - ref).norm() / ref.norm()).item())
        errors[m] = sum(runs) / len(runs)
    # Monte Carlo error ~ 1/sqrt(m): 64x the features, ~8x less error; demand 3x with a margin
    assert errors[512] < errors[8] / 3, errors
    assert errors[8] > errors[32] > errors[128] > errors[512], errors
    assert errors[512] < 0.08, errors


def test_causal_performer_equals_its_written_out_masked_estimate():
    d = 16
    q, k, v = randn(1, 2, 30, d) * 0.7, randn(1, 2, 30, d, seed=1) * 0.7, randn(1, 2, 30, d, seed=2)
    kind = KINDS["performer"](head_dim=d, n_features=24, chunk=7)
    phi_q, _ = favor_features(q, kind.features.weight, is_query=True)
    phi_k, _ = favor_features(k, kind.features.weight, is_query=False)
    weights = (phi_q @ phi_k.transpose(-1, -2)).tril()
    expected = weights @ v / weights.sum(-1, keepdim=True)
    torch.testing.assert_close(kind(q, k, v, causal=True), expected, atol=1e-5, rtol=1e-5)


def test_orthogonal_features_are_orthogonal_within_a_block():
    w = gaussian_orthogonal(40, 16, torch.Generator().manual_seed(0))
    block = w[:16] / w[:16].norm(dim=1, keepdim=True)
    torch.testing.assert_close(block @ block.T, torch.eye(16), atol=1e-5, rtol=0)
    assert w.shape == (40, 16)


@pytest.mark.parametrize("name, budget", [("performer", {}), ("lsh", {}), ("scatterbrain", {"lsh_chunk": 8})])
def test_projections_never_change_at_inference(name, budget):
    torch.manual_seed(0)
    kind = KINDS[name](head_dim=16, redraw_every=2, **budget).eval()
    before = {k: t.clone() for k, t in kind.state_dict().items()}
    q = randn(1, 2, 20, 16)
    for _ in range(5):
        kind(q, q, q, causal=True)
    for key, tensor in kind.state_dict().items():
        assert torch.equal(tensor, before[key]), key


def test_projections_are_redrawn_on_schedule_in_training_from_the_seed():
    torch.manual_seed(0)
    proj = RandomProjection(8, 16, redraw_every=3).train()
    first = proj.weight.clone()
    proj.on_optimizer_step({}, 1)
    proj.on_optimizer_step({}, 2)
    assert torch.equal(proj.weight, first)
    proj.on_optimizer_step({}, 3)  # the third optimizer step redraws
    assert not torch.equal(proj.weight, first)
    assert torch.equal(proj.weight, proj.draw(1))
    # a copy (a resumed run, another data-parallel rank) redraws exactly the same matrices
    twin = RandomProjection(8, 16, redraw_every=3).train()
    twin.load_state_dict(proj.state_dict())
    for step in range(4, 7):
        proj.on_optimizer_step({}, step)
        twin.on_optimizer_step({}, step)
    assert torch.equal(proj.weight, twin.weight) and torch.equal(proj.weight, proj.draw(2))


def test_different_layers_draw_different_projections():
    torch.manual_seed(0)
    a, b = RandomProjection(8, 16), RandomProjection(8, 16)
    assert not torch.equal(a.weight, b.weight)
    torch.manual_seed(0)
    assert torch.equal(RandomProjection(8, 16).weight, a.weight)  # fresh models follow torch.manual_seed


def test_causal_prefix_sums_keep_tiny_weights_next_to_large_ones():
    # Chunk 1 holds a tiny own key (1e-30) then a large one: an exclusive prefix taken as cumsum - chunk
    # would round the 2e-9 of chunk 0 away and return v_2 = 5 for query 2 instead of ~1.
    from layers.attention.common import normalise, with_ones
    from layers.attention.performer import linear_attention

    phi_q = torch.ones(1, 1, 4, 1)
    phi_k = torch.tensor([1e-9, 1e-9, 1e-30, 1.0]).view(1, 1, 4, 1)
    v = torch.tensor([1.0, 1.0, 5.0, -7.0]).view(1, 1, 4, 1)
    out = normalise(linear_attention(phi_q, phi_k, with_ones(v), causal=True, chunk=2))
    weights = (phi_q @ phi_k.transpose(-1, -2)).tril()
    torch.testing.assert_close(out, weights @ v / weights.sum(-1, keepdim=True))


@pytest.mark.parametrize("name", ["performer", "scatterbrain"])
def test_gradients_stay_finite_for_keys_far_from_every_feature(name):
    # Large-norm keys have tiny feature products; the normaliser's floor keeps backward's 1 / den^2 finite.
    q = (randn(1, 2, 64, 16) * 6).requires_grad_()
    k = (randn(1, 2, 64, 16, seed=1) * 6).requires_grad_()
    v = randn(1, 2, 64, 16, seed=2).requires_grad_()
    torch.manual_seed(0)
    kind = KINDS[name](head_dim=16, n_features=16, chunk=8, **({"window": 4} if name == "scatterbrain" else {}))
    kind(q, k, v, causal=True).square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
