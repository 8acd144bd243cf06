"""Sparse activations and products (layers.sparse_activations) against dense reference math."""

import pytest
import torch

from layers.sparse_activations import (
    batch_topk_code,
    gather_linear,
    log_area_loss,
    masked_topk_code,
    prefix_errors,
    prefix_loss,
    sparse_decode,
    threshold_code,
    topk_code,
)

ROWS, LATENTS, D = 9, 40, 6


def pre_activations(seed: int = 0) -> torch.Tensor:
    return torch.randn(ROWS, LATENTS, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_topk_code_holds_the_k_largest_of_each_row_sorted_on_request():
    pre = pre_activations()
    code = topk_code(pre, 5, sorted=True)
    assert torch.equal(code.rows, torch.arange(ROWS).repeat_interleave(5))
    torch.testing.assert_close(code.values.view(ROWS, 5), pre.topk(5, dim=1).values)


def test_batch_topk_code_holds_the_k_times_rows_largest_of_the_batch():
    pre = pre_activations()
    code = batch_topk_code(pre, 3)
    assert code.values.numel() == 3 * ROWS
    assert torch.all(code.rows[1:] >= code.rows[:-1]), "rows ascending"
    assert code.values.min() >= pre.flatten().topk(3 * ROWS).values.min()


def test_batch_topk_two_stage_selection_equals_one_top_k_over_the_batch():
    pre = pre_activations()
    for skewed in (False, True):
        if skewed:
            pre[3] += 10  # row 3 owns more of the batch's top entries than its candidates: the exact fallback
        fast, exact = batch_topk_code(pre, 3, candidates_per_row=6), batch_topk_code(pre, 3, candidates_per_row=LATENTS)
        assert torch.equal(fast.to_dense(), exact.to_dense())
    assert int((fast.rows == 3).sum()) > 6


def test_threshold_and_masked_topk_codes():
    pre = pre_activations()
    code = threshold_code(pre, 0.5)
    assert torch.equal(code.to_dense() != 0, pre > 0.5)
    allowed = torch.arange(LATENTS) % 3 == 0
    code = masked_topk_code(pre, allowed, 2)
    assert allowed[code.cols].all() and code.values.numel() == 2 * ROWS
    assert masked_topk_code(pre, torch.zeros(LATENTS, dtype=torch.bool), 2).values.numel() == 0


@pytest.mark.parametrize("select", ["topk", "batchtopk", "threshold"])
def test_sparse_encode_decode_matches_dense_autograd(select):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(ROWS, D, dtype=torch.float64, generator=g, requires_grad=True)
    w_enc = torch.randn(D, LATENTS, dtype=torch.float64, generator=g, requires_grad=True)
    b_enc = torch.randn(LATENTS, dtype=torch.float64, generator=g, requires_grad=True)
    w_dec = torch.randn(LATENTS, D, dtype=torch.float64, generator=g, requires_grad=True)
    with torch.no_grad():
        pre = x @ w_enc + b_enc
    code = {"topk": lambda: topk_code(pre, 4), "batchtopk": lambda: batch_topk_code(pre, 4),
            "threshold": lambda: threshold_code(pre, 0.3)}[select]()
    ours = sparse_decode(code.with_values(gather_linear(x, w_enc, b_enc, code).relu()), w_dec)
    support = torch.zeros(ROWS, LATENTS, dtype=torch.bool)
    support[code.rows, code.cols] = True
    dense = ((x @ w_enc + b_enc).relu() * support) @ w_dec  # the textbook dense formulation
    torch.testing.assert_close(ours, dense)
    grad = torch.randn_like(dense)
    inputs = (x, w_enc, b_enc, w_dec)
    for a, b in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(dense, inputs, grad), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dense_gram", [False, True])
def test_prefix_loss_and_its_gradients_match_the_prefix_reconstructions(dense_gram):
    g = torch.Generator().manual_seed(2)
    r = torch.randn(ROWS, D, dtype=torch.float64, generator=g, requires_grad=True)
    values = torch.rand(ROWS, 5, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(LATENTS, D, dtype=torch.float64, generator=g, requires_grad=True)
    cols = torch.randint(0, LATENTS, (ROWS, 5), generator=g)
    budgets = torch.tensor([0.0, 0.25, 0.25, 0.25, 0.25], dtype=torch.float64)  # the mean over j = 2..5
    ours = prefix_loss(r, values, cols, weight, budgets, chunk=4, dense_gram=dense_gram)  # chunk 4: rows % 4 != 0
    prefixes = (values.unsqueeze(2) * weight[cols]).cumsum(1)  # (rows, 5, d): x_hat - b of each top-j
    reference = ((r.unsqueeze(1) - prefixes).square().sum(-1).mean(0) * budgets).sum()
    torch.testing.assert_close(ours, reference)
    inputs = (r, values, weight)
    for a, b in zip(torch.autograd.grad(ours, inputs), torch.autograd.grad(reference, inputs), strict=True):
        torch.testing.assert_close(a, b)


def test_prefix_errors_and_the_log_area_loss_match_the_prefix_reconstructions():
    g = torch.Generator().manual_seed(3)
    r = torch.randn(ROWS, D, dtype=torch.float64, generator=g, requires_grad=True)
    values = torch.rand(ROWS, 5, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(LATENTS, D, dtype=torch.float64, generator=g, requires_grad=True)
    cols = torch.randint(0, LATENTS, (ROWS, 5), generator=g)
    prefixes = (values.unsqueeze(2) * weight[cols]).cumsum(1)
    errors = (r.unsqueeze(1) - prefixes).square().sum(-1).mean(0)  # (5,) the error of each top-j prefix
    # max_elements 3 * 5 * D: row chunks of 3, and ROWS is not a multiple of 3
    torch.testing.assert_close(prefix_errors(r, values, cols, weight, max_elements=3 * 5 * D), errors.detach())
    budgets = torch.tensor([0.0, 1 / 2, 1 / 3, 1 / 4, 1 / 5], dtype=torch.float64)
    budgets = budgets / budgets.sum()  # 1/j on j = 2..5
    ours = log_area_loss(r, values, cols, weight, budgets)
    reference = torch.exp((budgets[1:] * errors[1:].log()).sum())
    torch.testing.assert_close(ours, reference)
    inputs = (r, values, weight)
    for a, b in zip(torch.autograd.grad(ours, inputs), torch.autograd.grad(reference, inputs), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sparse_ops_on_cuda_match_the_cpu():
    from models.sae import SAE, SAEConfig

    torch.manual_seed(0)
    cpu = SAE(SAEConfig(kind="hierarchical_topk", d_in=D, d_sae=LATENTS, k=4, dead_tokens=1)).train()
    gpu = SAE(cpu.config).cuda().train()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(64, D)
    for model, data in ((cpu, x), (gpu, x.cuda())):
        model.after_optimizer_step(model(data).step_stats, 1)  # unfired latents now dead: AuxK runs
        out = model(data)
        (out.loss + sum(out.aux_losses.values())).backward()
    torch.testing.assert_close(gpu.W_enc.grad.cpu(), cpu.W_enc.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gpu.W_dec.grad.cpu(), cpu.W_dec.grad, rtol=1e-4, atol=1e-5)
