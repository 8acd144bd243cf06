"""What every sparse / low-rank attention kind promises: causality, KV-cache decoding, GQA, padding, cost, memory."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from layers.attention import KINDS

# Budgets small enough that every kind is sparse / low-rank at these sequence lengths.
CASES = {
    "local": ("local", dict(window=6)),
    "lsh": ("lsh", dict(n_buckets=4, chunk=5)),
    "performer": ("performer", dict(n_features=16, chunk=8)),
    "scatterbrain": ("scatterbrain", dict(n_features=16, window=4, chunk=8)),
    "scatterbrain-lsh": ("scatterbrain", dict(n_features=16, window=3, lsh_chunk=4, n_buckets=4, chunk=8)),
}


def make(case: str, head_dim: int = 16, **override):
    torch.manual_seed(0)
    name, budget = CASES[case]
    return KINDS[name](head_dim=head_dim, **{**budget, **override}).eval()


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def qkv():
    return randn(2, 4, 40, 16, seed=1), randn(2, 4, 40, 16, seed=2), randn(2, 4, 40, 16, seed=3)


@pytest.mark.parametrize("case", CASES)
def test_future_tokens_never_change_past_outputs(case, qkv):
    kind = make(case)
    q, k, v = qkv
    out = kind(q, k, v, causal=True)
    q2, k2, v2 = (x.clone() for x in qkv)
    for x in (q2, k2, v2):
        x[:, :, 25:] = randn(2, 4, 15, 16, seed=9) * 3  # new future tokens (new buckets, new scales)
    torch.testing.assert_close(kind(q2, k2, v2, causal=True)[:, :, :25], out[:, :, :25], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(kind(q2, k2, v2, causal=True)[:, :, 25:], out[:, :, 25:])


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_fewer_queries_than_keys_are_the_last_positions(case, causal, qkv):
    kind = make(case)
    q, k, v = qkv
    full = kind(q, k, v, causal=causal)
    for q_len in (1, 3, 17):
        part = kind(q[:, :, -q_len:], k, v, causal=causal)
        torch.testing.assert_close(part, full[:, :, -q_len:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_token_by_token_decoding_equals_full_recomputation(case, qkv):
    kind = make(case)
    q, k, v = qkv
    full = kind(q, k, v, causal=True)
    steps = [kind(q[:, :, :10], k[:, :, :10], v[:, :, :10], causal=True)]  # prefill, then one token at a time
    steps += [kind(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], causal=True) for t in range(10, 40)]
    torch.testing.assert_close(torch.cat(steps, dim=2), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_grouped_query_attention_equals_repeated_heads(case, qkv):
    kind = make(case)
    q, k, v = qkv
    k2, v2 = k[:, :2], v[:, :2]
    expected = kind(q, k2.repeat_interleave(2, 1), v2.repeat_interleave(2, 1), causal=True)
    torch.testing.assert_close(kind(q, k2, v2, causal=True), expected)


@pytest.mark.parametrize("case", CASES)
def test_padding_keys_never_reach_real_queries(case, qkv):
    kind = make(case)
    q, k, v = qkv
    pad = 7
    keep = torch.ones(2, 40, dtype=torch.bool)
    keep[0, :pad] = False  # row 0 is left-padded
    out = kind(q, k, v, causal=True, key_padding_mask=keep)
    assert torch.isfinite(out).all()
    k2, v2 = k.clone(), v.clone()
    k2[0, :, :pad], v2[0, :, :pad] = 50.0, -50.0  # garbage in the padding
    out2 = kind(q, k2, v2, causal=True, key_padding_mask=keep)
    torch.testing.assert_close(out2[0, :, pad:], out[0, :, pad:], atol=1e-5, rtol=1e-5)
    # the real part equals attention over the unpadded sequence alone
    alone = kind(q[:1, :, pad:], k[:1, :, pad:], v[:1, :, pad:], causal=True)
    torch.testing.assert_close(out[:1, :, pad:], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], kind(q[1:], k[1:], v[1:], causal=True)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_bfloat16_in_bfloat16_out(case, qkv):
    q, k, v = (x.bfloat16() for x in qkv)
    out = make(case)(q, k, v, causal=True)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", ["local", "performer", "scatterbrain"])
def test_flops_per_token_counts_the_products_the_kind_computes(case, causal, monkeypatch):
    # FlopCounterMode does not count torch's CPU flash SDPA op, which `local` runs on its blocks; the reference
    # path computes the same (block, span) products with the same block.
    monkeypatch.setenv("ZOO_FORCE_REFERENCE", "1")
    kind = make(case, head_dim=32)
    n = 100
    q, k, v = randn(1, 2, n, 32), randn(1, 2, n, 32, seed=1), randn(1, 2, n, 32, seed=2)
    counter = FlopCounterMode(display=False)
    with counter:
        kind(q, k, v, causal=causal)
    assert counter.get_total_flops() / (2 * n) == pytest.approx(kind.flops_per_token(n, causal), rel=1e-6)


@pytest.mark.parametrize("case", ["lsh", "scatterbrain-lsh"])
def test_lsh_flops_per_token_match_the_tiles_of_one_bucket(case):
    # With one bucket the tiles are aligned: two tiles of `chunk` keys per block of queries (one for the first).
    kind = make(case, head_dim=32, n_buckets=1)
    n = 200
    q, k, v = randn(1, 2, n, 32), randn(1, 2, n, 32, seed=1), randn(1, 2, n, 32, seed=2)
    counter = FlopCounterMode(display=False)
    with counter:
        kind(q, k, v, causal=True)
    assert counter.get_total_flops() / (2 * n) == pytest.approx(kind.flops_per_token(n, True), rel=0.05)


class LargestAllocation(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_the_allocation_probe_sees_an_n_by_n_matrix():
    n = 2048
    q = randn(1, 1, n, 16)
    with LargestAllocation() as probe:
        (q @ q.transpose(-1, -2) / math.sqrt(16)).softmax(-1) @ q
    assert probe.largest >= n * n


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_no_n_by_n_tensor_forward_or_backward(case, causal):
    n = 2048
    kind = make(case)
    q, k, v = (randn(1, 1, n, 16, seed=s).requires_grad_() for s in range(3))
    with LargestAllocation() as probe:
        kind(q, k, v, causal=causal).sum().backward()
    assert probe.largest < n * n / 16, f"{case} allocated a tensor of {probe.largest} elements at n={n}"
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("name, bad", [("local", dict(window=0)), ("lsh", dict(n_buckets=3)),
                                       ("lsh", dict(chunk=0)), ("performer", dict(n_features=0)),
                                       ("scatterbrain", dict(window=-1)), ("performer", dict(redraw_every=-1))])
def test_a_bad_budget_names_the_argument(name, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        KINDS[name](head_dim=16, **bad)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_local_flash_attn_window_matches_the_pytorch_path(causal):
    from layers import kernels
    from layers.attention.local import local_attention

    if not torch.cuda.is_available() or not kernels.flash_attn_installed():
        pytest.skip("flash-attn cannot run here (needs CUDA and the flash-attn package)")
    q, k, v = (randn(2, 4, 300, 64, seed=s).cuda().half() for s in range(3))
    kind = KINDS["local"](head_dim=64, window=50)
    for q_len in (300, 1):  # prefill, and decoding with a KV cache (bottom-right alignment)
        fast = kind(q[:, :, -q_len:], k, v, causal=causal)
        ref = local_attention(q[:, :, -q_len:].float(), k.float(), v.float(), 50, causal)
        torch.testing.assert_close(fast.float(), ref, atol=2e-3, rtol=2e-3)
