import torch

from layers.norm import RMSNorm
from layers.rotary import RotaryEmbedding, apply_rotary


def test_rmsnorm_gives_unit_root_mean_square():
    x = torch.randn(4, 7, 32) * 5 + 3
    y = RMSNorm(32, eps=1e-8)(x)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(4, 7), atol=1e-4, rtol=1e-4)


def test_rotary_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(16)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq, pk):
        cq, sq = rope(torch.tensor([[pq]]), torch.float32)
        ck, sk = rope(torch.tensor([[pk]]), torch.float32)
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum()

    torch.testing.assert_close(score(5, 2), score(105, 102), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_rotary_preserves_norms():
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 3, 5, 8)
    cos, sin = rope(torch.arange(5).expand(2, 5), torch.float32)
    torch.testing.assert_close(apply_rotary(x, cos, sin).norm(dim=-1), x.norm(dim=-1))
