"""Routers: top-k, sigmoid with balance bias, dynamic top-p, jitter."""

import itertools

import pytest
import torch

from layers.moe import ROUTERS, SigmoidTopKRouter, SoftmaxTopKRouter, TopPRouter


def router_with_probs(router, probs: torch.Tensor):
    """Route T one-hot tokens through a router whose logits are log(probs) (router d_model must be T)."""
    with torch.no_grad():
        router.proj.weight.copy_(probs.log().T)  # (E, d = T): logits of token t are row t of log(probs)
    return router(torch.eye(probs.shape[0]))


def test_softmax_topk_keeps_the_k_largest_and_renormalises():
    probs = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.4, 0.05, 0.05, 0.5]])
    routing = router_with_probs(SoftmaxTopKRouter(2, 4, 2), probs)
    assert routing.experts.tolist() == [[1, 2], [3, 0]]
    torch.testing.assert_close(routing.weights, torch.tensor([[0.625, 0.375], [5 / 9, 4 / 9]]))
    raw = router_with_probs(SoftmaxTopKRouter(2, 4, 2, norm_topk_prob=False), probs)
    torch.testing.assert_close(raw.weights, torch.tensor([[0.5, 0.3], [0.5, 0.4]]))


def smallest_set_reaching(p_row: torch.Tensor, p: float) -> int:
    """Brute force: the size of the smallest subset of experts whose probability mass is >= p."""
    e = p_row.numel()
    for size in range(1, e + 1):
        if any(p_row[list(s)].sum() >= p - 1e-6 for s in itertools.combinations(range(e), size)):
            return size
    return e


@pytest.mark.parametrize("p", [0.3, 0.5, 0.8, 1.0])
def test_top_p_picks_the_smallest_expert_set_reaching_p(p):
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(20, 5) * 1.5, -1)
    routing = router_with_probs(TopPRouter(20, 5, 5, top_p=p), probs)
    for t in range(20):
        used = routing.experts[t][routing.experts[t] >= 0]
        assert len(used) == smallest_set_reaching(probs[t], p)
        assert probs[t, used].sum() >= p - 1e-5  # the set reaches p ...
        # ... and it is the most probable experts, in order
        assert used.tolist() == probs[t].argsort(descending=True)[: len(used)].tolist()
        torch.testing.assert_close(routing.weights[t].sum(), torch.tensor(1.0))
        assert (routing.weights[t][routing.experts[t] < 0] == 0).all()


def test_top_p_respects_min_and_max_experts():
    probs = torch.tensor([[0.9, 0.04, 0.03, 0.03], [0.25, 0.25, 0.25, 0.25]])
    routing = router_with_probs(TopPRouter(2, 4, 3, top_p=0.95, min_experts_per_tok=2), probs)
    counts = (routing.experts >= 0).sum(-1).tolist()
    assert counts == [3, 3]  # 0.9 needs 3 experts for 0.95 (0.97); the flat token is capped at k = 3
    routing = router_with_probs(TopPRouter(2, 4, 3, top_p=0.5, min_experts_per_tok=2), probs)
    assert (routing.experts >= 0).sum(-1).tolist() == [2, 2]  # 0.9 alone reaches 0.5 but the minimum is 2


def test_sigmoid_router_bias_moves_towards_balance_without_gradients():
    torch.manual_seed(0)
    router = SigmoidTopKRouter(4, 4, 1, bias_update_rate=0.1)
    with torch.no_grad():
        router.proj.weight.zero_()
        router.proj.weight[0, 0] = 5.0  # expert 0 wins every token whose first feature is positive
    x = torch.randn(64, 4).abs()
    router.train()
    first = router(x)
    assert (first.experts == 0).all()
    assert torch.equal(router.bias, torch.zeros(4))  # forward is pure: the bias moves in update_balance
    router.update_balance(torch.bincount(first.experts.flatten(), minlength=4))
    assert router.bias[0] < 0 and (router.bias[1:] > 0).all()
    assert not router.bias.requires_grad
    # The weights are the affinities, not affected by the bias.
    torch.testing.assert_close(first.weights.squeeze(1), torch.ones(64))  # renormalised k = 1


def test_jitter_only_in_training():
    torch.manual_seed(0)
    router = ROUTERS["softmax_topk"](8, 4, 2, jitter=0.1)
    x = torch.randn(10, 8)
    router.eval()
    assert torch.equal(router.logits(x), router.logits(x))
    router.train()
    assert not torch.equal(router.logits(x), router.logits(x))


def test_unknown_router_names_the_known_ones():
    with pytest.raises(ValueError, match="softmax_topk"):
        ROUTERS["nope"]


@pytest.mark.parametrize("kwargs, match", [({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
                                           ({"min_experts_per_tok": 3}, "min_experts_per_tok")])
def test_top_p_router_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TopPRouter(8, 4, 2, **kwargs)
