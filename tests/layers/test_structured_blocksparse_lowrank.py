"""BlockSparseLinear (fixed block mask) and LowRankLinear (U V, truncated-SVD projection)."""

import pytest
import torch

from layers.linear import KINDS, make_linear
from layers.structured import BlockSparseLinear, LowRankLinear, lowrank_project, random_block_layout


@pytest.mark.parametrize("in_f, out_f", [(64, 64), (50, 30)])
def test_blocksparse_forward_equals_masked_dense_matmul_values_and_gradients(in_f, out_f):
    torch.manual_seed(0)
    layer = BlockSparseLinear(in_f, out_f, bias=True, block_size=8, density=0.4).double()
    x = torch.randn(6, in_f, dtype=torch.double, requires_grad=True)
    grad_out = torch.randn(6, out_f, dtype=torch.double)
    y = layer(x)
    y.backward(grad_out)
    got = x.grad.clone()
    x.grad = None
    weight = layer.to_dense().detach().requires_grad_()
    reference = x @ weight.T + layer.bias.detach()
    reference.backward(grad_out)
    torch.testing.assert_close(y, reference, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got, x.grad, rtol=1e-10, atol=1e-10)
    mask = layer.mask()
    assert (weight.detach()[~mask] == 0).all()
    assert torch.equal(layer.to_dense().detach() != 0, mask)


def test_blocksparse_layout_keeps_density_per_row_and_is_fixed_by_the_seed():
    layout = random_block_layout(6, 10, density=0.3, seed=7)
    assert [sum(1 for r, _ in layout if r == row) for row in range(6)] == [3] * 6
    assert layout == random_block_layout(6, 10, density=0.3, seed=7)
    assert layout != random_block_layout(6, 10, density=0.3, seed=8)
    a, b = BlockSparseLinear(80, 48, block_size=8, seed=1), BlockSparseLinear(80, 48, block_size=8, seed=1)
    assert a.layout == b.layout and a.nnz_blocks == 6 * round(0.25 * 10)


def test_blocksparse_bad_density_names_the_field():
    with pytest.raises(ValueError, match="density=0"):
        BlockSparseLinear(16, 16, block_size=4, density=0)


def test_lowrank_forward_equals_u_times_v():
    torch.manual_seed(1)
    layer = LowRankLinear(20, 12, bias=True, rank=4).double()
    x = torch.randn(3, 2, 20, dtype=torch.double)
    torch.testing.assert_close(layer(x), x @ (layer.u @ layer.v).T + layer.bias, rtol=1e-10, atol=1e-10)
    assert torch.linalg.matrix_rank(layer.to_dense().detach()) == 4


def test_lowrank_projection_error_is_the_discarded_singular_values():
    torch.manual_seed(2)
    weight = torch.randn(30, 18, dtype=torch.double)
    s = torch.linalg.svdvals(weight)
    error = torch.linalg.norm(weight - lowrank_project(weight, 5).to_dense())
    torch.testing.assert_close(error, s[5:].square().sum().sqrt(), rtol=1e-9, atol=1e-9)  # Eckart-Young
    full = lowrank_project(weight, 40).to_dense()  # rank above min(out, in): exact
    torch.testing.assert_close(full, weight, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind, kwargs", [("monarch", {"nblocks": 4}),
                                          ("pixelfly", {"block_size": 16, "butterfly_size": 2, "rank": 4}),
                                          ("blocksparse", {"block_size": 16, "density": 0.5}),
                                          ("lowrank", {"rank": 8})])
def test_every_kind_is_registered_and_its_flops_are_two_per_weight(kind, kwargs):
    assert kind in KINDS
    layer = make_linear(kind, 64, 96, bias=True, **kwargs)
    weights = sum(p.numel() for name, p in layer.named_parameters() if name != "bias")
    extra = 96 if kind == "pixelfly" else 0  # adding the low-rank term to the block product
    assert layer.flops_per_token() == 2 * weights + extra + 96
    assert layer.to_dense().shape == (96, 64)
