"""MonarchLinear and monarch_project against independent math (the materialised matrix, SVD optimality)."""

import pytest
import torch

from layers.structured import MonarchLinear, monarch_project

# (in_features, out_features, nblocks): square, padded on both sides, wider than tall, many blocks
SHAPES = [(16, 16, 4), (13, 29, 3), (40, 10, 4), (64, 64, 8), (24, 24, 1)]


def monarch(in_f: int, out_f: int, nblocks: int, bias: bool = False, seed: int = 0) -> MonarchLinear:
    torch.manual_seed(seed)
    return MonarchLinear(in_f, out_f, bias=bias, nblocks=nblocks).double()


@pytest.mark.parametrize("in_f, out_f, nblocks", SHAPES)
def test_forward_equals_matmul_by_materialised_matrix_values_and_gradients(in_f, out_f, nblocks):
    layer = monarch(in_f, out_f, nblocks, bias=True)
    x = torch.randn(3, 5, in_f, dtype=torch.double, requires_grad=True)
    grad_out = torch.randn(3, 5, out_f, dtype=torch.double)

    y = layer(x)
    y.backward(grad_out)
    grads = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()

    reference = x @ layer.to_dense().T + layer.bias  # to_dense is an einsum of the factors, not the forward
    reference.backward(grad_out)
    torch.testing.assert_close(y, reference, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, [x.grad] + [p.grad for p in layer.parameters()], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_slabs_of_the_materialised_matrix_are_rank_one():
    layer = monarch(32, 32, 4)
    # input index j*p + t, output index i*q + k: slab (k, j) is M[k::q, j*p:(j+1)*p]
    slabs = layer.to_dense().detach().view(4, 8, 4, 8).permute(1, 2, 0, 3)
    ranks = torch.linalg.matrix_rank(slabs)
    assert ranks.max() == 1 and ranks.min() == 1


@pytest.mark.parametrize("in_f, out_f, nblocks", SHAPES)
def test_projection_of_a_monarch_matrix_recovers_it_exactly(in_f, out_f, nblocks):
    target = monarch(in_f, out_f, nblocks, seed=1).to_dense().detach()
    projected = monarch_project(target, nblocks).to_dense()
    torch.testing.assert_close(projected, target, rtol=1e-9, atol=1e-9)


def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    return float(torch.linalg.norm(weight - approx.detach()) / torch.linalg.norm(weight))


def test_projection_beats_100_random_monarch_matrices_rescaled_optimally():
    torch.manual_seed(2)
    weight = torch.randn(48, 40, dtype=torch.double)
    best = relative_error(weight, monarch_project(weight, 4).to_dense())
    errors = []
    for seed in range(100):
        m = monarch(40, 48, 4, seed=100 + seed).to_dense().detach()
        scale = (weight * m).sum() / (m * m).sum()  # the optimal rescaling of this candidate
        errors.append(relative_error(weight, scale * m))
    assert best <= min(errors)
    assert best < 0.95 * min(errors)  # a margin: the random candidates are not nearly as good


def test_projection_is_a_stationary_point_of_the_error():
    torch.manual_seed(3)
    weight = torch.randn(20, 36, dtype=torch.double)
    layer = monarch_project(weight, 3)
    loss = ((weight - layer.to_dense()) ** 2).sum()
    loss.backward()
    assert layer.r_blocks.grad.abs().max() < 1e-9
    assert layer.l_blocks.grad.abs().max() < 1e-9


def test_parameters_and_flops_come_from_the_structure():
    layer = MonarchLinear(100, 60, bias=True, nblocks=4)  # p = 25, q = 15
    assert layer.r_blocks.shape == (4, 15, 25) and layer.l_blocks.shape == (15, 4, 4)
    weights = 4 * 15 * 25 + 15 * 4 * 4
    assert sum(p.numel() for p in layer.parameters()) == weights + 60
    assert layer.flops_per_token() == 2 * weights + 60
    square = MonarchLinear(1024, 1024, nblocks=4)
    assert 3.9 < 2 * 1024 * 1024 / square.flops_per_token() < 4  # about 4x fewer FLOPs than dense


def test_init_gives_the_scale_of_a_dense_layer_with_that_std():
    torch.manual_seed(4)
    layer = MonarchLinear(512, 512, nblocks=4)
    layer.init_weights_(0.02)
    std = layer.to_dense().detach().std().item()
    assert 0.017 < std < 0.023


def test_bad_nblocks_names_the_field():
    with pytest.raises(ValueError, match="nblocks=0"):
        MonarchLinear(8, 8, nblocks=0)
    with pytest.raises(ValueError, match="nblocks"):
        MonarchLinear(8, 8, nblocks=2.5)


def test_bf16_autocast_runs_in_bf16_and_stays_close():
    torch.manual_seed(5)
    layer = MonarchLinear(64, 48, nblocks=4)
    x = torch.randn(2, 7, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), rtol=5e-2, atol=5e-2)
