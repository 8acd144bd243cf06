"""Fair budgets (issue 17 item 4): `window` is the number of keys per query, causal or not, in every path."""

import json
import math
from pathlib import Path

import pytest
import torch

from layers.attention import KINDS, local
from layers.attention.scatterbrain import WindowSupport


def window_keys(p: int, k_len: int, window: int, causal: bool) -> list[int]:
    """The oracle, one query at a time: the `window` keys ending at p (causal), or around p moved inside."""
    if causal:
        return list(range(max(0, p - window + 1), p + 1))
    first = min(max(p - window // 2, 0), max(k_len - window, 0))
    return list(range(first, min(first + window, k_len)))


def oracle_mask(q_len: int, k_len: int, window: int, causal: bool) -> torch.Tensor:
    mask = torch.zeros(q_len, k_len, dtype=torch.bool)
    for i in range(q_len):
        mask[i, window_keys(k_len - q_len + i, k_len, window, causal)] = True
    return mask


def masked_softmax(q, k, v, mask):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def qkv(q_len, k_len, heads=(2, 2), d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, heads[0], q_len, d, generator=g), torch.randn(2, heads[1], k_len, d, generator=g),
            torch.randn(2, heads[1], k_len, d, generator=g))


@pytest.mark.parametrize("window", [1, 2, 5, 8, 37, 60])
def test_the_oracle_gives_every_noncausal_query_exactly_window_keys(window):
    counts = oracle_mask(37, 37, window, causal=False).sum(-1)
    assert (counts == min(window, 37)).all()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("q_len", "k_len", "window", "block"), [
    (50, 50, 6, 4), (50, 50, 7, 3), (50, 50, 16, 16), (20, 50, 9, 4), (1, 50, 8, 8), (30, 30, 30, 8),
    (30, 30, 64, 16),
])
def test_every_path_attends_to_exactly_the_window_keys(causal, q_len, k_len, window, block, monkeypatch):
    monkeypatch.setattr(local, "SDPA_GROUP_ROWS", 2 * block)  # several SDPA groups
    q, k, v = qkv(q_len, k_len, heads=(4, 2))
    mask = oracle_mask(q_len, k_len, window, causal)
    ref = masked_softmax(q, k, v, mask)
    for out in (local.local_attention_sdpa(q, k, v, window, causal, block),
                local.local_attention_reference(q, k, v, window, causal, block=block),
                local.local_attention(q, k, v, window, causal),
                KINDS["local"](head_dim=16, window=window)(q, k, v, causal=causal)):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out, weights = KINDS["local"](head_dim=16, window=window)(q, k, v, causal=causal, return_weights=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(weights[0, 0] > 0, mask)  # the weights sit exactly on the oracle's keys


@pytest.mark.parametrize("causal", [True, False])
def test_key_padding_path_keeps_the_window_keys(causal):
    q, k, v = qkv(40, 40)
    keep = torch.ones(2, 40, dtype=torch.bool)
    keep[0, :5] = False
    out = local.local_attention(q, k, v, 9, causal, key_padding_mask=keep)  # the reference path
    mask = oracle_mask(40, 40, 9, causal)
    torch.testing.assert_close(out[1:], masked_softmax(q[1:], k[1:], v[1:], mask), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:1, :, 5:], masked_softmax(q[:1], k[:1], v[:1], mask & keep[0])[:, :, 5:],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_the_window_reads_block_plus_window_minus_one_keys_per_block(causal):
    layout = local.window_layout(100, 100, 16, causal, block=8)
    assert layout.span == 8 + 16 - 1  # the same for causal and non-causal: window keys per query
    assert KINDS["local"](head_dim=32, window=16).flops_per_token(256, causal) == pytest.approx(
        local.local_flops_per_token(32, 256, 16, True))


@pytest.mark.parametrize("window", [4, 7])
def test_scatterbrain_window_support_is_the_local_window(window):
    q, k, _ = qkv(33, 33)
    for causal in (True, False):
        support = WindowSupport(q, k, window, causal, None)
        dense = torch.zeros(33, 33, dtype=torch.bool)
        starts = support.layout.key_starts(q.device)
        finite = torch.isfinite(support.logits[0, 0])  # (n_blocks, block, span)
        for i in range(support.layout.n_blocks):
            for a in range(support.layout.block):
                p = i * support.layout.block + a
                if p < 33:
                    dense[p, (starts[i] + finite[i, a].nonzero().flatten()).tolist()] = True
        assert torch.equal(dense, oracle_mask(33, 33, window, causal))


def test_scatterbrain_whose_noncausal_window_is_the_sequence_is_exact():
    torch.manual_seed(0)
    q, k, v = qkv(37, 37)
    out = KINDS["scatterbrain"](head_dim=16, n_features=16, window=37)(q, k, v, causal=False)
    torch.testing.assert_close(out, masked_softmax(q, k, v, torch.ones(37, 37, dtype=torch.bool)),
                               atol=1e-4, rtol=1e-4)


LEGACY = Path(__file__).parents[1] / "fixtures" / "legacy"


def test_saved_local_checkpoints_run_causal_windows_so_they_keep_their_behaviour():
    # The LM has no field that makes attention non-causal: a saved `local` LM runs its kind with causal=True,
    # whose window (p - window < j <= p) is unchanged; only the non-causal window, which no checkpoint can
    # use, changed its meaning. (tests/zoo/test_legacy_checkpoints.py checks the saved outputs themselves.)
    from zoo import load

    lm = load(str(LEGACY / "lm-local-tiny")).eval()
    assert "causal" not in json.dumps(lm.config.to_dict())
    seen = []
    hooks = [block.attn.kernel.register_forward_hook(lambda m, args, kwargs, out: seen.append(kwargs["causal"]),
                                                     with_kwargs=True) for block in lm.blocks]
    with torch.no_grad():
        lm(input_ids=torch.randint(0, lm.config.vocab_size, (1, 20)))
    for h in hooks:
        h.remove()
    assert seen == [True] * len(lm.blocks)
    q, k, v = qkv(40, 40)
    w = lm.config.attention_kwargs["window"]
    old = torch.tensor([[0 <= p - j < w for j in range(40)] for p in range(40)])
    torch.testing.assert_close(KINDS["local"](head_dim=16, window=w)(q, k, v, causal=True),
                               masked_softmax(q, k, v, old), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("q_len", "k_len", "window"), [(50, 50, 8), (50, 50, 7), (20, 50, 9), (30, 30, 64)])
def test_the_flash_band_with_its_edge_queries_recomputed_is_the_window(q_len, k_len, window):
    # flash-attn's window_size=(left, right) is a plain band: written out here, on the CPU, as flash computes it
    q, k, v = qkv(q_len, k_len, heads=(4, 2))
    left, right = local.window_sides(window, causal=False)
    diff = torch.arange(k_len - q_len, k_len)[:, None] - torch.arange(k_len)[None, :]
    band = masked_softmax(q, k, v, (diff <= left) & (diff >= -right))
    torch.testing.assert_close(local.shift_edge_windows(band, q, k, v, window),
                               masked_softmax(q, k, v, oracle_mask(q_len, k_len, window, False)), atol=1e-5, rtol=1e-5)
