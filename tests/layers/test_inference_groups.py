"""Inference in groups of query rows (issue 18 item 3) gives the one-pass results."""

import torch

from layers.attention import KINDS, performer


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
