"""Random projections (Performer features, LSH rotations): fixed at inference, redrawn on a schedule in training.

The matrix is a persistent buffer, so a saved model reloads with exactly the projection it was
saved with, and decoding with a KV cache sees the same projection as a full forward. In training
it is redrawn every `redraw_every` optimizer steps (the trainer's step hook calls
`on_optimizer_step`; forward never changes it) from a generator seeded by (seed, count): every
data-parallel rank, every micro-batch of a step and every resumed run sees the same matrices.
The buffer `training_calls` counts those steps (its name is kept so that checkpoints load).
"""

from __future__ import annotations

import torch
from torch import nn

_SEED_STRIDE = 1_000_003  # spaces the seeds of successive redraws


def gaussian_orthogonal(rows: int, dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(rows, dim): blocks of orthogonal rows, each row's norm drawn like a Gaussian vector's (Performer's ORF)."""
    blocks = []
    for start in range(0, rows, dim):  # float32 whatever the default dtype: QR has no CPU half kernel
        gauss = torch.randn(dim, dim, generator=generator, dtype=torch.float32)
        ortho, r = torch.linalg.qr(gauss)  # (dim, dim), orthonormal columns
        ortho = ortho * torch.sign(torch.diagonal(r))  # sign fix: uniformly (Haar) distributed rotations
        blocks.append(ortho.T[: min(dim, rows - start)])
    norms = torch.randn(rows, dim, generator=generator, dtype=torch.float32).norm(dim=1, keepdim=True)  # chi(dim)
    return torch.cat(blocks) * norms


class RandomProjection(nn.Module):
    """A (rows, dim) random orthogonal-Gaussian matrix with a seeded redraw schedule for training."""

    def __init__(self, rows: int, dim: int, redraw_every: int = 1000):
        super().__init__()
        if rows < 1 or dim < 1:
            raise ValueError(f"a random projection needs rows >= 1 and dim >= 1, got rows={rows}, dim={dim}")
        if redraw_every < 0:
            raise ValueError(f"redraw_every = {redraw_every} is invalid: must be >= 0 (0 never redraws)")
        self.rows, self.dim, self.redraw_every = rows, dim, redraw_every
        # The seed comes from the global RNG, like the weights: torch.manual_seed fixes a fresh model.
        self.register_buffer("seed", torch.randint(0, 2**31 - 1, (), dtype=torch.long))
        self.register_buffer("training_calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("weight", torch.empty(rows, dim))
        if not self.weight.is_meta:  # under from_pretrained's meta init the checkpoint (or init_weights_) fills it
            self.weight.copy_(self.draw(0))

    def init_weights_(self, std: float) -> None:
        """The model's initialisation: a buffer the checkpoint did not hold is drawn afresh (a new seed unless
        the seed was loaded, then the matrix of that seed), never left as uninitialised memory."""
        if getattr(self.weight, "_is_hf_initialized", False):
            return  # loaded from the checkpoint
        with torch.no_grad():
            if not getattr(self.seed, "_is_hf_initialized", False):
                self.seed.copy_(torch.randint(0, 2**31 - 1, ()))
                self.training_calls.zero_()
            self.weight.copy_(self.draw(int(self.training_calls) // max(self.redraw_every, 1)))

    def draw(self, count: int) -> torch.Tensor:
        """The matrix of redraw number `count`, a pure function of (seed, count)."""
        generator = torch.Generator().manual_seed(int(self.seed) + _SEED_STRIDE * count)
        return gaussian_orthogonal(self.rows, self.dim, generator).to(self.weight.dtype)

    @torch.no_grad()
    def on_optimizer_step(self, stats: dict, step: int) -> None:
        """Count one optimizer step; redraw the matrix every `redraw_every` of them."""
        if self.redraw_every == 0:
            return
        self.training_calls += 1
        calls = int(self.training_calls)
        if calls % self.redraw_every == 0:
            self.weight.copy_(self.draw(calls // self.redraw_every))

    def extra_repr(self) -> str:
        return f"rows={self.rows}, dim={self.dim}, redraw_every={self.redraw_every}"
