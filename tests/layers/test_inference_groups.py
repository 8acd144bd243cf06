"""Inference in groups of query rows (issue 18 item 3) gives the one-pass results."""

import json

import pytest
import torch
import torch.nn.functional as F

from layers.attention import KINDS, lsh, performer, scatterbrain


def test_performer_causal_prefill_in_groups_equals_the_one_pass_form(monkeypatch):
    torch.manual_seed(0)
    kind = KINDS["performer"](head_dim=16, n_features=32, chunk=8).eval()
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 100, 16, generator=g) for _ in range(3))
    one_pass = kind(q, k, v, causal=True)  # autograd on: the one-pass form
    monkeypatch.setattr(performer, "INFERENCE_GROUP_ROWS", 24)  # 100 rows = 4 groups of 24 and one of 4
    with torch.no_grad():
        grouped = kind(q, k, v, causal=True)
    torch.testing.assert_close(grouped, one_pass.detach(), atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # a cache (q shorter than k) and non-causal keep the one-pass form
        torch.testing.assert_close(kind(q[:, :, -3:], k, v, causal=True), one_pass[:, :, -3:].detach(),
                                   atol=1e-5, rtol=1e-4)


def dense_softmax_on(q, k, v, support):
    """The oracle: exact softmax attention restricted to a boolean (b, h, q_len, k_len) support."""
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return torch.softmax(scores.masked_fill(~support, float("-inf")), -1) @ v


@pytest.mark.parametrize("hashing,n_hashes,causal", [("angular", 1, True), ("angular", 1, False),
                                                     ("angular", 3, True), ("smyrf", 2, False),
                                                     ("smyrf", 2, True)])
def test_lsh_inference_in_groups_is_softmax_over_its_support(monkeypatch, hashing, n_hashes, causal):
    torch.manual_seed(0)
    kind = KINDS["lsh"](head_dim=16, n_buckets=4, chunk=8, hashing=hashing, n_hashes=n_hashes).eval()
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, 90, 16, generator=g) for _ in range(3))
    oracle = dense_softmax_on(q, k, v, kind.support(q, k, causal))  # SMYRF codes of all 90 positions at once
    monkeypatch.setattr(lsh, "SMYRF_CODE_ROWS", 16)  # from here, SMYRF codes 16 positions at a time
    for rows in (8, 24, 1 << 20):  # one block per group, three blocks, one group
        monkeypatch.setattr(lsh, "INFERENCE_GROUP_ROWS", rows)
        with torch.no_grad():
            torch.testing.assert_close(kind(q, k, v, causal=causal), oracle, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # queries as the last positions of a longer key sequence (a cache)
        torch.testing.assert_close(kind(q[:, :, -5:], k, v, causal=causal), oracle[:, :, -5:], atol=1e-5, rtol=1e-4)


def test_lsh_inference_in_groups_ignores_padding_keys_as_the_autograd_form_does(monkeypatch):
    torch.manual_seed(0)
    kind = KINDS["lsh"](head_dim=16, n_buckets=4, chunk=8).eval()
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 60, 16, generator=g) for _ in range(3))
    mask = torch.ones(2, 60)
    mask[1, 50:] = 0
    reference = kind(q.clone().requires_grad_(), k, v, causal=False, key_padding_mask=mask).detach()
    monkeypatch.setattr(lsh, "INFERENCE_GROUP_ROWS", 16)
    with torch.no_grad():
        grouped = kind(q, k, v, causal=False, key_padding_mask=mask)
    torch.testing.assert_close(grouped, reference, atol=1e-5, rtol=1e-4)
    v_changed = v.clone()
    v_changed[1, :, 50:] = 1e3  # a padding key's value may not reach a real query's output
    with torch.no_grad():
        changed = kind(q, k, v_changed, causal=False, key_padding_mask=mask)
    torch.testing.assert_close(changed[0], grouped[0])
    torch.testing.assert_close(changed[1, :, :50], grouped[1, :, :50])


def test_scatterbrain_window_prefill_in_groups_equals_the_one_pass_form(monkeypatch):
    torch.manual_seed(0)
    kind = KINDS["scatterbrain"](head_dim=16, n_features=16, window=7, chunk=4).eval()
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 70, 16, generator=g) * 1.5 for _ in range(3))
    mask = torch.ones(2, 70)
    mask[0, :5] = 0  # left padding
    for key_padding_mask in (None, mask):
        one_pass = kind(q.clone().requires_grad_(), k, v, causal=True, key_padding_mask=key_padding_mask).detach()
        for rows in (4, 12, 1 << 20):  # groups shorter than the window, longer, one group
            monkeypatch.setattr(scatterbrain, "INFERENCE_GROUP_ROWS", rows)
            with torch.no_grad():
                grouped = kind(q, k, v, causal=True, key_padding_mask=key_padding_mask)
            torch.testing.assert_close(grouped, one_pass, atol=1e-5, rtol=1e-4)


def test_scatterbrain_window_over_every_pair_in_groups_is_exact_attention(monkeypatch):
    torch.manual_seed(0)
    kind = KINDS["scatterbrain"](head_dim=16, n_features=8, window=64, chunk=4).eval()
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=g) for _ in range(3))
    monkeypatch.setattr(scatterbrain, "INFERENCE_GROUP_ROWS", 8)
    with torch.no_grad():
        out = kind(q, k, v, causal=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5, rtol=1e-4)


def peak_allocated(fn, tmp_path) -> int:
    """Largest CPU-allocator total during fn() above the total before it (torch.profiler memory events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    trace = tmp_path / "trace.json"
    prof.export_chrome_trace(str(trace))
    events = [e["args"] for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    assert events, "the profiler recorded no allocation"
    before = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - before


@pytest.mark.parametrize("name,kwargs", [("lsh", dict(n_buckets=8, chunk=128)),
                                         ("scatterbrain", dict(n_features=128, window=128))])
def test_long_prefill_without_autograd_keeps_memory_within_twice_fused_sdpa(name, kwargs, tmp_path):
    """Issue 18's target at n = 16384: peak memory above the inputs <= 2x fused SDPA's (one-pass forms: 15-25x)."""
    torch.manual_seed(0)
    kind = KINDS[name](head_dim=64, **kwargs).eval()
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 16384, 64, generator=g) for _ in range(3))
    with torch.no_grad():
        sdpa = peak_allocated(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), tmp_path)
        peak = peak_allocated(lambda: kind(q, k, v, causal=True), tmp_path)
    assert q.numel() * q.element_size() <= peak <= 2 * sdpa
