"""Router losses and load statistics against hand-computed values."""

import math

import pytest
import torch

from layers.moe import MoEMLP, load_balancing_loss, load_statistics, router_entropy_loss, router_z_loss


def test_balance_loss_hand_computed_top1():
    # Two tokens, two experts, both routed to expert 0: f = [1, 0], P = [0.7, 0.3] -> 2 * 0.7 = 1.4.
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4]])
    assert load_balancing_loss(probs, torch.tensor([2, 0])).item() == pytest.approx(1.4)


def test_balance_loss_hand_computed_top2():
    # Four experts, top-2 of 2 tokens: assignments {0, 1} and {0, 2}: f = [2, 1, 1, 0] / 4.
    # P = mean probabilities = [0.45, 0.2, 0.25, 0.1].
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.5, 0.1, 0.3, 0.1]])
    expected = 4 * (0.5 * 0.45 + 0.25 * 0.2 + 0.25 * 0.25 + 0 * 0.1)
    assert load_balancing_loss(probs, torch.tensor([2, 1, 1, 0])).item() == pytest.approx(expected)


def test_balance_loss_is_one_when_balanced_and_differentiable_in_probs():
    probs = torch.full((8, 4), 0.25, requires_grad=True)
    loss = load_balancing_loss(probs, torch.tensor([4, 4, 4, 4]))
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    torch.testing.assert_close(probs.grad, torch.full((8, 4), 4 * 0.25 / 8))


def test_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected)


def test_entropy_loss_hand_computed():
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    assert router_entropy_loss(probs).item() == pytest.approx(math.log(2.0) / 2)


def test_load_statistics():
    stats = load_statistics(torch.tensor([3, 3, 3, 3]), kept=torch.tensor(9), num_tokens=6)
    assert stats["moe_load_entropy"].item() == pytest.approx(1.0)
    assert stats["moe_max_load"].item() == pytest.approx(1.0)
    assert stats["moe_dropped_fraction"].item() == pytest.approx(0.25)
    assert stats["moe_active_experts"].item() == pytest.approx(1.5)
    skewed = load_statistics(torch.tensor([12, 0, 0, 0]), kept=torch.tensor(12), num_tokens=6)
    assert skewed["moe_load_entropy"].item() == pytest.approx(0.0, abs=1e-6)
    assert skewed["moe_max_load"].item() == pytest.approx(4.0)


def test_layer_reports_weighted_losses_that_reach_the_router():
    torch.manual_seed(0)
    layer = MoEMLP(16, 32, num_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.5, router_z_loss_coef=0.25)
    x = torch.randn(30, 16)
    _, report = layer(x)
    routing = layer.router(x)
    counts = torch.bincount(routing.experts.flatten(), minlength=4)
    losses = report.aux_losses
    assert set(losses) == {"moe_balance_loss", "moe_z_loss"}
    torch.testing.assert_close(losses["moe_balance_loss"], 0.5 * load_balancing_loss(routing.probs, counts))
    torch.testing.assert_close(losses["moe_z_loss"], 0.25 * router_z_loss(routing.logits))
    sum(losses.values()).backward()
    assert layer.router.proj.weight.grad.abs().sum() > 0
    assert torch.equal(report.stats["tokens_per_expert"], counts)


def test_zero_weights_report_no_loss():
    layer = MoEMLP(16, 32, num_experts=4, router_aux_loss_coef=0.0, router_z_loss_coef=0.0)
    _, report = layer(torch.randn(5, 16))
    assert report.aux_losses == {}
