"""Each sparse / low-rank kind against independent math: where its budget covers everything it is exact."""

import math

import pytest
import torch

from layers.attention import KINDS
from layers.attention.lsh import hash_buckets
from layers.attention.performer import favor_features


def exact_attention(q, k, v, causal, allowed=None):
    """softmax(q k^T / sqrt(d)) v written out, queries the last rows; `allowed` (q_len, k_len) restricts keys."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    q_len, k_len = q.shape[-2], k.shape[-2]
    visible = torch.ones(q_len, k_len, dtype=torch.bool)
    if causal:
        visible = (torch.arange(q_len)[:, None] + k_len - q_len) >= torch.arange(k_len)[None, :]
    if allowed is not None:
        visible = visible & allowed
    return scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v


def qkv(n=37, d=16, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, n, d, generator=g) for _ in range(3))
    return q * scale, k * scale, v


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [37, 100])
def test_local_with_window_at_least_n_equals_dense(causal, window):
    q, k, v = qkv()
    out = KINDS["local"](head_dim=16, window=window)(q, k, v, causal=causal)
    torch.testing.assert_close(out, exact_attention(q, k, v, causal), atol=1e-5, rtol=1e-5)


def window_band(n, w, causal):
    """(n, n): the `w` keys of each query, written out: the w up to it (causal), or w // 2 before it and
    (w - 1) // 2 after it, moved inside the sequence at the ends (non-causal; issue 17: window = keys per query)."""
    pos = torch.arange(n)
    if causal:
        return (pos[:, None] - pos[None, :]).abs() < w
    first = (pos[:, None] - w // 2).clamp(0, n - w)
    return (pos[None, :] >= first) & (pos[None, :] < first + w)


@pytest.mark.parametrize("causal", [True, False])
def test_local_equals_a_written_out_band(causal):
    q, k, v = qkv()
    w = 5
    band = window_band(37, w, causal)
    out = KINDS["local"](head_dim=16, window=w)(q, k, v, causal=causal)
    torch.testing.assert_close(out, exact_attention(q, k, v, causal, band), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_lsh_with_one_bucket_equals_dense(causal):
    q, k, v = qkv()
    out = KINDS["lsh"](head_dim=16, n_buckets=1, chunk=37)(q, k, v, causal=causal)
    torch.testing.assert_close(out, exact_attention(q, k, v, causal), atol=1e-5, rtol=1e-5)


def test_lsh_with_one_bucket_and_a_short_chunk_is_a_sliding_window():
    q, k, v = qkv()
    lsh = KINDS["lsh"](head_dim=16, n_buckets=1, chunk=4)(q, k, v, causal=True)  # 4 earlier keys + itself
    torch.testing.assert_close(lsh, KINDS["local"](head_dim=16, window=5)(q, k, v, causal=True), atol=1e-5, rtol=1e-5)


def lsh_reference(q, k, v, rotations, chunk, causal):
    """Each query's keys picked one by one: the `chunk` nearest keys of its bucket (by position order), and itself."""
    qb, kb = hash_buckets(q, rotations), hash_buckets(k, rotations)
    out = torch.empty_like(q)
    n = k.shape[-2]
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for p in range(n):
                same = [j for j in range(n) if kb[b, h, j] == qb[b, h, p]]
                earlier = [j for j in same if j < p]
                if causal:
                    chosen = earlier[-chunk:] if chunk else []
                else:
                    start = max(min(len(earlier) - chunk // 2, len(same) - chunk), 0)
                    chosen = same[start : start + chunk]
                keys = [j for j in chosen if j != p] + [p]
                scores = k[b, h, keys] @ q[b, h, p] / math.sqrt(q.shape[-1])
                out[b, h, p] = scores.softmax(-1) @ v[b, h, keys]
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n_buckets, chunk", [(4, 5), (8, 3), (2, 16)])
def test_lsh_attends_to_the_chunk_of_its_bucket(causal, n_buckets, chunk):
    torch.manual_seed(0)
    q, k, v = qkv(n=29, d=8)
    kind = KINDS["lsh"](head_dim=8, n_buckets=n_buckets, chunk=chunk)
    expected = lsh_reference(q, k, v, kind.rotations.weight, chunk, causal)
    torch.testing.assert_close(kind(q, k, v, causal=causal), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("support", [dict(window=37), dict(window=0, lsh_chunk=37, n_buckets=1),
                                     dict(window=5, lsh_chunk=37, n_buckets=1)], ids=["local", "lsh", "local+lsh"])
def test_scatterbrain_whose_support_covers_every_pair_is_exact(causal, support):
    torch.manual_seed(0)
    q, k, v = qkv()
    out = KINDS["scatterbrain"](head_dim=16, n_features=16, **support)(q, k, v, causal=causal)
    # local+lsh: the window and the bucket overlap; a pair counted twice would break the equality
    torch.testing.assert_close(out, exact_attention(q, k, v, causal), atol=1e-4, rtol=1e-4)


def scatterbrain_reference(kind, q, k, v, support, causal):
    """The Scatterbrain matrix written out: phi(q).phi(k) everywhere, exp(q.k / sqrt d) on `support`, normalised."""
    phi_q, stab = favor_features(q, kind.features.weight, is_query=True)
    phi_k, _ = favor_features(k, kind.features.weight, is_query=False)
    low_rank = (phi_q @ phi_k.transpose(-1, -2)) * torch.exp(stab)  # the unscaled estimate of exp(q.k / sqrt d)
    exact = torch.exp(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]))
    weights = torch.where(support, exact, low_rank)
    if causal:
        weights = weights.tril()
    return (weights @ v) / weights.sum(-1, keepdim=True)


@pytest.mark.parametrize("causal", [True, False])
def test_scatterbrain_replaces_the_low_rank_term_by_the_exact_one_on_the_window(causal):
    torch.manual_seed(0)
    q, k, v = qkv(scale=0.7)
    kind = KINDS["scatterbrain"](head_dim=16, n_features=8, window=4)
    band = window_band(37, 4, causal)
    expected = scatterbrain_reference(kind, q, k, v, band, causal)
    torch.testing.assert_close(kind(q, k, v, causal=causal), expected, atol=1e-4, rtol=1e-4)


def test_scatterbrain_replaces_the_low_rank_term_on_the_lsh_support():
    torch.manual_seed(0)
    q, k, v = qkv(n=24, d=8, scale=0.7)
    kind = KINDS["scatterbrain"](head_dim=8, n_features=8, window=0, lsh_chunk=3, n_buckets=4)
    rot = kind.rotations.weight
    qb, kb = hash_buckets(q, rot), hash_buckets(k, rot)
    support = torch.zeros(2, 3, 24, 24, dtype=torch.bool)
    for b in range(2):
        for h in range(3):
            for p in range(24):
                earlier = [j for j in range(p) if kb[b, h, j] == qb[b, h, p]]
                support[b, h, p, earlier[-3:] + [p]] = True
    expected = scatterbrain_reference(kind, q, k, v, support, causal=True)
    torch.testing.assert_close(kind(q, k, v, causal=True), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_scatterbrain_without_a_support_is_the_performer(causal):
    torch.manual_seed(0)
    q, k, v = qkv(scale=0.7)
    performer = KINDS["performer"](head_dim=16, n_features=32, chunk=8)
    scatterbrain = KINDS["scatterbrain"](head_dim=16, n_features=32, window=0, chunk=8)
    scatterbrain.features.load_state_dict(performer.features.state_dict())
    torch.testing.assert_close(scatterbrain(q, k, v, causal=causal), performer(q, k, v, causal=causal),
                               atol=1e-5, rtol=1e-5)
