import math

import pytest
import torch

from layers.attention import KINDS
from layers.attention.dense import sdpa_attention


def naive_attention(q, k, v, causal):
    """softmax(q k^T / sqrt(d) + causal mask) v, written out; queries are the last rows."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        q_len, k_len = q.shape[-2], k.shape[-2]
        pos_q = torch.arange(q_len)[:, None] + (k_len - q_len)
        scores = scores.masked_fill(pos_q < torch.arange(k_len)[None, :], float("-inf"))
    return scores.softmax(-1) @ v


@pytest.fixture
def qkv():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, 10, 8, generator=g) for _ in range(3)]


@pytest.mark.parametrize("causal", [True, False])
def test_dense_kind_matches_written_out_softmax(qkv, causal):
    q, k, v = qkv
    out = KINDS["dense"](head_dim=8)(q, k, v, causal=causal)
    torch.testing.assert_close(out, naive_attention(q, k, v, causal), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("q_len", [1, 3])
def test_fewer_queries_than_keys_are_the_last_positions(qkv, q_len):
    q, k, v = qkv
    full = naive_attention(q, k, v, causal=True)
    part = sdpa_attention(q[:, :, -q_len:], k, v, causal=True)
    torch.testing.assert_close(part, full[:, :, -q_len:], atol=1e-5, rtol=1e-5)


def test_padding_keys_never_reach_real_queries(qkv):
    q, k, v = qkv
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[0, :4] = False  # row 0 is left-padded by 4
    out = sdpa_attention(q, k, v, causal=True, key_padding_mask=keep)
    k2, v2 = k.clone(), v.clone()
    k2[0, :, :4] = 100.0  # garbage in the padding
    v2[0, :, :4] = -100.0
    out2 = sdpa_attention(q, k2, v2, causal=True, key_padding_mask=keep)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, :, 4:], out2[0, :, 4:])
    # and the real part equals attention over the unpadded sequence alone
    torch.testing.assert_close(out[0, :, 4:], naive_attention(q[:1, :, 4:], k[:1, :, 4:], v[:1, :, 4:], True)[0],
                               atol=1e-5, rtol=1e-5)


def test_grouped_query_attention_equals_repeated_heads():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 6, 8, generator=g)
    k, v = torch.randn(1, 2, 6, 8, generator=g), torch.randn(1, 2, 6, 8, generator=g)
    out = sdpa_attention(q, k, v, causal=True)
    ref = naive_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), causal=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_causal_flops_count_the_keys_each_query_sees():
    n, d = 16, 8
    visible_pairs = n * (n + 1) // 2  # query i sees keys 0..i
    per_token = KINDS["dense"](head_dim=d).flops_per_token(n, causal=True)
    assert per_token * n == pytest.approx(visible_pairs * 4 * d)
