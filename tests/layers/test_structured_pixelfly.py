"""PixelflyLinear: the flat block butterfly pattern, its nonzero count, and blockwise = masked dense compute."""

import math

import pytest
import torch

from layers.structured import PixelflyLinear, flat_butterfly_layout, flat_butterfly_nnz_blocks


def butterfly_mask(features: int, block: int, butterfly_size: int) -> torch.Tensor:
    """Square flat-butterfly mask written from the definition: blocks i, j with i XOR j in {0, 1, 2, 4, ...} < size."""
    idx = torch.arange(features) // block
    d = idx[:, None] ^ idx[None, :]
    is_power = (d & (d - 1)) == 0  # true for 0 and for the powers of two
    return is_power & (d < butterfly_size)


@pytest.mark.parametrize("out_blocks, in_blocks, butterfly_size",
                         [(8, 8, 1), (8, 8, 2), (8, 8, 8), (16, 16, 4), (22, 8, 4), (8, 44, 4), (12, 32, 4)])
def test_pattern_has_the_nonzero_count_the_formula_gives(out_blocks, in_blocks, butterfly_size):
    layout = flat_butterfly_layout(out_blocks, in_blocks, butterfly_size)
    per_line = 1 + int(math.log2(butterfly_size))
    assert len(layout) == max(out_blocks, in_blocks) * per_line
    assert len(layout) == flat_butterfly_nnz_blocks(out_blocks, in_blocks, butterfly_size)
    # the larger side holds exactly 1 + log2(butterfly_size) blocks per line
    side = 0 if out_blocks >= in_blocks else 1
    counts = torch.bincount(torch.tensor([rc[side] for rc in layout]))
    assert counts.tolist() == [per_line] * max(out_blocks, in_blocks)


def test_square_pattern_is_symmetric_with_the_diagonal():
    layout = set(flat_butterfly_layout(16, 16, 8))
    assert all((c, r) in layout for r, c in layout)
    assert all((i, i) in layout for i in range(16))
    assert (0, 4) in layout and (0, 3) not in layout and (0, 8) not in layout  # 0^3 = 3, 0^8 = 8 >= size


def test_layer_nonzeros_match_the_formula_and_the_definition():
    layer = PixelflyLinear(128, 128, block_size=16, butterfly_size=4, rank=0)
    nnz = flat_butterfly_nnz_blocks(8, 8, 4) * 16 * 16
    assert layer.mask().sum() == nnz == layer.blocks.numel()
    assert torch.equal(layer.mask(), butterfly_mask(128, 16, 4))
    dense = layer.to_dense().detach()
    assert (dense[~layer.mask()] == 0).all() and (dense[layer.mask()] != 0).all()


@pytest.mark.parametrize("in_f, out_f, block, size", [(64, 64, 8, 4), (30, 84, 8, 4), (128, 48, 8, 2)])
def test_blockwise_forward_equals_masked_dense_matmul_values_and_gradients(in_f, out_f, block, size):
    """(30, 84): padded, computed by block-rows; (128, 48): more input than output blocks, by block-columns."""
    torch.manual_seed(0)
    layer = PixelflyLinear(in_f, out_f, bias=True, block_size=block, butterfly_size=size, rank=3).double()
    weight = torch.randn(out_f, in_f, dtype=torch.double)
    mask = layer.mask()
    if in_f == out_f:
        assert torch.equal(mask, butterfly_mask(in_f, block, size))
    # put the masked dense weight into the blocks
    padded = torch.zeros(layer.out_blocks * block, layer.in_blocks * block, dtype=torch.double)
    padded[:out_f, :in_f] = weight
    grid = padded.view(layer.out_blocks, block, layer.in_blocks, block)
    with torch.no_grad():
        for n, (r, c) in enumerate(layer.layout):
            layer.blocks[n] = grid[r, :, c, :]
        layer.bias.normal_()

    x = torch.randn(4, 3, in_f, dtype=torch.double, requires_grad=True)
    grad_out = torch.randn(4, 3, out_f, dtype=torch.double)
    y = layer(x)
    y.backward(grad_out)
    got_x = x.grad.clone()
    x.grad = None

    masked = (weight * mask).requires_grad_()
    u, v = layer.lowrank_u.detach().clone().requires_grad_(), layer.lowrank_v.detach().clone().requires_grad_()
    reference = x @ (masked + u @ v).T + layer.bias.detach()
    reference.backward(grad_out)
    torch.testing.assert_close(y, reference, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_x, x.grad, rtol=1e-10, atol=1e-10)
    # gradient of each stored block = that block of the masked dense gradient
    grad_grid = torch.zeros_like(padded)
    grad_grid[:out_f, :in_f] = masked.grad
    grad_grid = grad_grid.view(layer.out_blocks, block, layer.in_blocks, block)
    for n, (r, c) in enumerate(layer.layout):
        torch.testing.assert_close(layer.blocks.grad[n], grad_grid[r, :, c, :], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.lowrank_u.grad, u.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.lowrank_v.grad, v.grad, rtol=1e-10, atol=1e-10)


def test_parameters_and_flops_come_from_the_structure():
    layer = PixelflyLinear(256, 704, block_size=16, butterfly_size=4, rank=8)
    blocks = 44 * 3  # max(44, 16) block-rows, 1 + log2(4) blocks each
    assert layer.nnz_blocks == blocks
    lowrank = 8 * (256 + 704)
    assert sum(p.numel() for p in layer.parameters()) == blocks * 256 + lowrank
    assert layer.flops_per_token() == 2 * (blocks * 256 + lowrank) + 704  # + the sum of the two terms


def test_init_gives_the_scale_of_a_dense_layer_with_that_std():
    torch.manual_seed(1)
    layer = PixelflyLinear(512, 512, block_size=32, butterfly_size=4, rank=16)
    layer.init_weights_(0.02)
    x = torch.randn(256, 512)
    dense_out_std = 0.02 * 512 ** 0.5  # std of x @ W.T for a dense W with entries of std 0.02
    assert 0.85 < layer(x).std().item() / dense_out_std < 1.15


def test_butterfly_size_that_does_not_divide_the_blocks_names_the_field():
    with pytest.raises(ValueError, match="butterfly_size=4"):
        PixelflyLinear(48, 48, block_size=8, butterfly_size=4)  # 6 blocks
    with pytest.raises(ValueError, match="butterfly_size=3"):
        PixelflyLinear(64, 64, block_size=8, butterfly_size=3)


@pytest.mark.parametrize("in_f, out_f", [(64, 128), (128, 64)])
def test_bf16_autocast_forward_and_backward_run_on_both_paths(in_f, out_f):
    torch.manual_seed(2)
    layer = PixelflyLinear(in_f, out_f, block_size=16, butterfly_size=2, rank=4)
    x = torch.randn(5, in_f, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.blocks.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    torch.testing.assert_close(y.float(), layer(x), rtol=5e-2, atol=5e-2)
