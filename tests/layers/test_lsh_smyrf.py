"""SMYRF-style hashing of the `lsh` kind and of Scatterbrain's LSH support (issue 17 item 4)."""

import math

import pytest
import torch

from layers.attention import KINDS
from layers.attention.lsh import asymmetric_transform
from layers.attention.performer import favor_features


def qkv(n=40, d=8, heads=2, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, heads, n, d, generator=g) for _ in range(3))
    return q * scale, k * scale, v


def transformed(q, k):
    """The oracle's transform, written out: keys [k, sqrt(M^2 - |k|^2)] / M, queries [q / |q|, 0] (non-causal)."""
    m = k.norm(dim=-1).amax(-1, keepdim=True)[..., None]  # (b, h, 1, 1)
    k_t = torch.cat([k / m, (1 - (k / m).pow(2).sum(-1, keepdim=True)).clamp_min(0).sqrt()], -1)
    q_t = torch.cat([q / q.norm(dim=-1, keepdim=True), torch.zeros_like(q[..., :1])], -1)
    return q_t, k_t


def balanced_support(kind, q, k, chunk):
    """Each round: keys sorted by (angular bucket, projection) of their transform, the `chunk` keys around the
    query's own (bucket, projection) (moved inside the sequence); the union over rounds, and the query itself."""
    q_t, k_t = transformed(q, k)
    b, h, n, _ = q.shape
    rows = kind.rotations.weight.shape[0] // kind.n_hashes
    support = torch.zeros(b, h, n, n, dtype=torch.bool)

    def bucket(x, rotations):  # argmax of [xR, -xR]
        return torch.cat([x @ rotations.T, -(x @ rotations.T)], -1).argmax(-1)

    for r in range(kind.n_hashes):
        a = kind.rotations.weight[r * rows]
        rotations = kind.rotations.weight[r * rows + 1 : (r + 1) * rows]
        for i in range(b):
            for j in range(h):
                kb, qb = bucket(k_t[i, j], rotations), bucket(q_t[i, j], rotations)
                kc, qc = k_t[i, j] @ a, q_t[i, j] @ a
                order = sorted(range(n), key=lambda t: (int(kb[t]), float(kc[t])))
                order = torch.tensor(order)
                for p in range(n):
                    insert = sum(1 for t in range(n) if (int(kb[t]), float(kc[t])) < (int(qb[p]), float(qc[p])))
                    first = min(max(insert - chunk // 2, 0), n - chunk)
                    support[i, j, p, order[first : first + chunk]] = True
    return support | torch.eye(n, dtype=torch.bool)


def softmax_on(q, k, v, support):
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~support, float("-inf"))
    return scores.softmax(-1) @ v


def test_the_transform_turns_inner_products_into_cosines():
    q, k, _ = qkv()
    q_t, k_t = asymmetric_transform(q, k, causal=False)
    torch.testing.assert_close(q_t.norm(dim=-1), torch.ones(2, 2, 40))
    torch.testing.assert_close(k_t.norm(dim=-1), torch.ones(2, 2, 40))
    m = k.norm(dim=-1).amax(-1)[..., None, None]
    torch.testing.assert_close(q_t @ k_t.transpose(-1, -2), (q @ k.transpose(-1, -2)) / (q.norm(dim=-1)[..., None] * m))
    causal_q, causal_k = asymmetric_transform(q, k, causal=True)
    prefix = asymmetric_transform(q[:, :, :10], k[:, :, :10], causal=True)[1]
    torch.testing.assert_close(causal_k[:, :, :10], prefix)  # a key's transform never sees later keys


@pytest.mark.parametrize("n_hashes, chunk", [(1, 6), (3, 4), (2, 40)])
def test_smyrf_noncausal_attends_to_the_balanced_chunks_of_every_round_once(n_hashes, chunk):
    torch.manual_seed(0)
    q, k, v = qkv()
    kind = KINDS["lsh"](head_dim=8, n_buckets=4, chunk=chunk, hashing="smyrf", n_hashes=n_hashes)
    support = balanced_support(kind, q, k, chunk)
    assert torch.equal(kind.support(q, k, causal=False), support)
    out, weights = kind(q, k, v, causal=False, return_weights=True)
    torch.testing.assert_close(out, softmax_on(q, k, v, support), atol=1e-5, rtol=1e-5)
    # each key once: the weights are the softmax over the union (a key of two rounds is not counted twice)
    expected = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~support, float("-inf")).softmax(-1)
    torch.testing.assert_close(weights, expected, atol=1e-5, rtol=1e-5)


def test_every_noncausal_query_gets_exactly_chunk_keys_per_round():
    torch.manual_seed(0)
    q, k, _ = qkv(n=64, scale=3.0)
    kind = KINDS["lsh"](head_dim=8, n_buckets=8, chunk=8, hashing="smyrf")
    own = torch.eye(64, dtype=torch.bool)
    chosen = kind.support(q, k, causal=False) & ~own
    counts = chosen.sum(-1) + (kind.support(q, k, causal=False) & own).sum(-1) * 0
    assert ((counts == 8) | (counts == 7)).all()  # 8 keys, one of them maybe the query's own position
    angular = KINDS["lsh"](head_dim=8, n_buckets=8, chunk=8).support(q, k, causal=False) & ~own
    assert (angular.sum(-1) < 7).any()  # the angular buckets are not balanced: some queries get fewer keys


@pytest.mark.parametrize("n_hashes", [1, 3])
def test_smyrf_causal_future_tokens_never_change_past_outputs_and_decoding_equals_full(n_hashes):
    torch.manual_seed(0)
    kind = KINDS["lsh"](head_dim=8, n_buckets=4, chunk=4, hashing="smyrf", n_hashes=n_hashes)
    q, k, v = qkv()
    full = kind(q, k, v, causal=True)
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, 25:] = torch.randn(2, 2, 15, 8) * 5  # larger future keys: a larger max norm
    torch.testing.assert_close(kind(q2, k2, v2, causal=True)[:, :, :25], full[:, :, :25], atol=1e-6, rtol=1e-6)
    steps = [kind(q[:, :, :10], k[:, :, :10], v[:, :, :10], causal=True)]
    steps += [kind(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], causal=True) for t in range(10, 40)]
    torch.testing.assert_close(torch.cat(steps, 2), full, atol=1e-5, rtol=1e-5)
    support = kind.support(q, k, causal=True)
    assert not support.triu(1).any()  # never a later key
    torch.testing.assert_close(full, softmax_on(q, k, v, support), atol=1e-5, rtol=1e-5)


def test_smyrf_with_padding_ignores_the_padded_keys():
    torch.manual_seed(0)
    kind = KINDS["lsh"](head_dim=8, n_buckets=4, chunk=4, hashing="smyrf", n_hashes=2)
    q, k, v = qkv()
    keep = torch.ones(2, 40, dtype=torch.bool)
    keep[0, :7] = False
    out = kind(q, k, v, causal=True, key_padding_mask=keep)
    k2, v2 = k.clone(), v.clone()
    k2[0, :, :7], v2[0, :, :7] = 50.0, -50.0
    torch.testing.assert_close(kind(q, k2, v2, causal=True, key_padding_mask=keep)[0, :, 7:], out[0, :, 7:])
    alone = kind(q[:1, :, 7:], k[:1, :, 7:], v[:1, :, 7:], causal=True)
    torch.testing.assert_close(out[:1, :, 7:], alone, atol=1e-5, rtol=1e-5)


def heavy_hitters(n=512, d=32, clusters=8, per_cluster=2, seed=0):
    """Queries in clusters; a few keys of large norm along the cluster directions, the rest N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(clusters, d, generator=g), dim=-1)
    q = centres[torch.randint(0, clusters, (n,), generator=g)] * 3 + 0.5 * torch.randn(n, d, generator=g)
    k = torch.randn(n, d, generator=g)
    heavy = torch.randperm(n, generator=g)[: clusters * per_cluster]
    k[heavy] = centres.repeat(per_cluster, 1) * 4 * math.sqrt(d) + 0.5 * torch.randn(len(heavy), d, generator=g)
    return q[None, None], k[None, None]


def recall_of_top(support, q, k, m):
    """The fraction of each query's m largest q.k (the oracle: exact top-m of the dense scores) in its support."""
    top = (q @ k.transpose(-1, -2)).topk(m, dim=-1).indices
    return support.gather(-1, top).float().mean().item()


def test_smyrf_recalls_the_heavy_keys_better_than_one_round_of_angular_lsh_at_the_same_budget():
    recalls = {"angular": [], "smyrf": []}
    for seed in range(3):
        q, k = heavy_hitters(seed=seed)
        torch.manual_seed(seed)
        angular = KINDS["lsh"](head_dim=32, n_buckets=16, chunk=32)
        smyrf = KINDS["lsh"](head_dim=32, n_buckets=16, chunk=8, hashing="smyrf", n_hashes=4)
        recalls["angular"].append(recall_of_top(angular.support(q, k, causal=False), q, k, 2))
        recalls["smyrf"].append(recall_of_top(smyrf.support(q, k, causal=False), q, k, 2))
        assert smyrf.support(q, k, causal=False).sum(-1).float().mean() <= 4 * 8 + 1  # the same budget, or less
    mean = {name: sum(r) / len(r) for name, r in recalls.items()}
    assert mean["smyrf"] > mean["angular"] + 0.1, mean


def scatterbrain_on(kind, q, k, v, support, causal):
    """The Scatterbrain matrix written out: phi(q).phi(k) everywhere, exp(q.k / sqrt d) on `support`, normalised."""
    phi_q, stab = favor_features(q, kind.features.weight, is_query=True)
    phi_k, _ = favor_features(k, kind.features.weight, is_query=False)
    weights = torch.where(support, torch.exp(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])),
                          (phi_q @ phi_k.transpose(-1, -2)) * torch.exp(stab))
    if causal:
        weights = weights.tril()
    return (weights @ v) / weights.sum(-1, keepdim=True)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [0, 3])
def test_scatterbrain_with_smyrf_rounds_is_exact_on_its_support_and_low_rank_elsewhere(causal, window):
    torch.manual_seed(0)
    q, k, v = qkv(n=30, scale=0.7)
    kind = KINDS["scatterbrain"](head_dim=8, n_features=8, window=window, lsh_chunk=4, n_buckets=4,
                                 hashing="smyrf", n_hashes=3)
    support = kind.support(q, k, causal)
    if not causal:  # the window and the rounds overlap: a pair counted twice would break the equality below
        pos = torch.arange(30)
        first = (pos[:, None] - window // 2).clamp(0, 30 - window)
        band = (pos[None, :] >= first) & (pos[None, :] < first + window)
        assert torch.equal(support, balanced_support(kind, q, k, chunk=4) | band)
    torch.testing.assert_close(kind(q, k, v, causal=causal), scatterbrain_on(kind, q, k, v, support, causal),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_scatterbrain_whose_smyrf_support_covers_every_pair_is_exact(causal):
    torch.manual_seed(0)
    q, k, v = qkv(n=24)
    kind = KINDS["scatterbrain"](head_dim=8, n_features=8, window=2, lsh_chunk=24, n_buckets=2,
                                 hashing="smyrf", n_hashes=2)
    mask = torch.ones(24, 24, dtype=torch.bool).tril() if causal else torch.ones(24, 24, dtype=torch.bool)
    if causal:  # a causal round covers the query's bucket only: one bucket (n_buckets=1) covers everything
        kind = KINDS["scatterbrain"](head_dim=8, n_features=8, window=2, lsh_chunk=24, n_buckets=1,
                                     hashing="smyrf", n_hashes=2)
    torch.testing.assert_close(kind(q, k, v, causal=causal), softmax_on(q, k, v, mask), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["lsh", "scatterbrain"])
@pytest.mark.parametrize("bad", [dict(hashing="cosine"), dict(n_hashes=0)])
def test_a_bad_hashing_option_names_itself(name, bad):
    extra = dict(lsh_chunk=4) if name == "scatterbrain" else {}
    with pytest.raises(ValueError, match=next(iter(bad))):
        KINDS[name](head_dim=8, **extra, **bad)


def test_the_default_hashing_keeps_the_saved_buffers():
    # Existing checkpoints hold rotations of (n_buckets / 2, head_dim): the defaults build exactly those.
    lsh = KINDS["lsh"](head_dim=16, n_buckets=8, chunk=4)
    assert {k: tuple(v.shape) for k, v in lsh.state_dict().items()} == {
        "rotations.seed": (), "rotations.training_calls": (), "rotations.weight": (4, 16)}
    sb = KINDS["scatterbrain"](head_dim=16, n_features=8, window=2, lsh_chunk=4, n_buckets=8)
    assert tuple(sb.state_dict()["rotations.weight"].shape) == (4, 16)
    assert "hashing" not in repr(lsh) and "hashing" not in repr(sb)
