"""`local` attention's sdpa-blocks path (SDPA per query block, layers/kernels.py) against dense masked attention."""

import math

import pytest
import torch

from layers import kernels
from layers.attention import local


def dense_window(q, k, v, window, causal):
    """Softmax attention over all keys with the window as a mask: the oracle, independent of the block code."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    q_len, k_len = q.shape[-2], k.shape[-2]
    diff = torch.arange(q_len)[:, None] + (k_len - q_len) - torch.arange(k_len)[None, :]
    if causal:
        allowed = (diff < window) & (diff >= 0)
    else:  # `window` keys per query: window // 2 before it, the rest after, moved inside the sequence at the ends
        first = (torch.arange(q_len)[:, None] + (k_len - q_len) - window // 2).clamp(0, max(k_len - window, 0))
        allowed = (torch.arange(k_len)[None, :] >= first) & (torch.arange(k_len)[None, :] < first + window)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


def qkv(b, h, kv_h, q_len, k_len, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, q_len, d, generator=g), torch.randn(b, kv_h, k_len, d, generator=g),
            torch.randn(b, kv_h, k_len, d, generator=g))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("q_len", "k_len", "window", "block", "heads"), [
    (100, 100, 16, 8, (2, 2)),  # many interior blocks, one SDPA call per group
    (100, 100, 16, 7, (4, 2)),  # block not dividing n, grouped-query heads
    (37, 100, 20, 8, (2, 1)),  # queries are the last 37 positions (a cache)
    (1, 50, 16, 8, (2, 2)),  # one decoding query
    (30, 30, 64, 16, (2, 2)),  # window longer than the sequence: no interior block
])
def test_sdpa_blocks_equal_dense_masked_attention_values_and_gradients(causal, q_len, k_len, window, block, heads,
                                                                        monkeypatch):
    monkeypatch.setattr(local, "SDPA_GROUP_ROWS", 3 * block)  # several groups of blocks
    q, k, v = (t.requires_grad_() for t in qkv(2, *heads, q_len, k_len))
    out = local.local_attention_sdpa(q, k, v, window, causal, block)
    ref = dense_window(q, k, v, window, causal)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # inference writes each group into the result instead of concatenating
        torch.testing.assert_close(local.local_attention_sdpa(q, k, v, window, causal, block), out)
    torch.testing.assert_close(out, local.local_attention_reference(q, k, v, window, causal, block=block),
                               atol=1e-5, rtol=1e-5)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_the_kernel_choice_takes_the_reference_with_key_padding_or_when_forced(monkeypatch):
    q = torch.randn(1, 2, 8, 16)
    assert kernels.local_attention_path(q, None) == "sdpa-blocks"
    assert kernels.local_attention_path(q, torch.ones(1, 8, dtype=torch.bool)) == "reference"
    monkeypatch.setenv("ZOO_FORCE_REFERENCE", "1")
    assert kernels.local_attention_path(q, None) == "reference"


def test_local_attention_with_key_padding_still_masks_the_padded_keys():
    q, k, v = qkv(2, 2, 2, 40, 40)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[0, :5] = False  # left padding of the first row
    out = local.local_attention(q, k, v, 12, True, key_padding_mask=mask)
    k2, v2 = k.clone(), v.clone()
    k2[0, :, :5], v2[0, :, :5] = 1e3, -1e3  # what padded keys hold must not matter
    again = local.local_attention(q, k2, v2, 12, True, key_padding_mask=mask)
    torch.testing.assert_close(again[:, :, 5:], out[:, :, 5:])


def test_bf16_sdpa_blocks_stay_close_to_fp32():
    q, k, v = qkv(1, 2, 2, 64, 64)
    out = local.local_attention_sdpa(q.bfloat16(), k.bfloat16(), v.bfloat16(), 16, True, 8)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), dense_window(q, k, v, 16, True), atol=3e-2, rtol=3e-2)


def test_decoding_reads_only_the_last_window_of_keys():
    # Keys before the window never matter: garbage there changes nothing, with and without key padding.
    q, k, v = qkv(2, 4, 2, 3, 200)
    mask = torch.ones(2, 200, dtype=torch.bool)
    for m in (None, mask):
        out = local.local_attention(q, k, v, 16, True, key_padding_mask=m)
        k2, v2 = k.clone(), v.clone()
        k2[:, :, :180], v2[:, :, :180] = float("nan"), float("nan")
        torch.testing.assert_close(local.local_attention(q, k2, v2, 16, True, key_padding_mask=m), out)
        torch.testing.assert_close(out, dense_window(q, k, v, 16, True), atol=1e-5, rtol=1e-5)
