"""The SAE training recipe against EleutherAI sparsify's (issue 18 item 1).

At the same settings (Adam, one constant learning rate, no clipping, no weight decay) and the same start, our
Trainer's SAE step is sparsify's training step: the same weights after every step. So an FVU gap after the
same steps between the two is a gap in the settings or the start, not in the step (the start was the gap:
BENCHMARKS.md, issue 18 item 1); the start itself is tested here too.
"""

import pytest
import torch

from tests.train.test_sae_task import D, sae_args
from train.config import parse_args
from train.trainer import Trainer

SAME_AS_SPARSIFY = ["--warmup-steps", "0", "--min-lr-ratio", "1", "--grad-clip", "0", "--weight-decay", "0",
                    "--betas", "0.9", "0.999", "--lr", "1e-3"]


def _sparsify_like(sae):
    """A sparsify SparseCoder with the weights of our fresh `sae`, for inputs in our units (x * act_scale)."""
    sparsify = pytest.importorskip("sparsify")
    sp = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(num_latents=sae.config.d_sae, k=sae.config.k))
    with torch.no_grad():
        sp.encoder.weight.copy_(sae.W_enc.t())
        sp.encoder.bias.copy_(sae.b_enc)
        sp.W_dec.copy_(sae.W_dec)
        sp.b_dec.copy_(sae.b_dec)
    return sp


def test_our_sae_step_is_sparsifys_step_at_the_same_settings(source_lm, tmp_path):
    # k 8 of 128 latents: every selected pre-activation is positive (sparsify passes gradient to a selected
    # entry the ReLU zeroed, ours does not; with k 32 of 128 that moved one latent's encoder by 1e-4)
    trainer = Trainer(parse_args(sae_args(source_lm, tmp_path / "sae", "sae-topk-tiny", *SAME_AS_SPARSIFY,
                                          "--set", "k=8", "--steps", "6")))
    sae = trainer.model
    sp = _sparsify_like(sae)
    opt = torch.optim.Adam(sp.parameters(), lr=1e-3)
    for step in range(6):
        # sparsify's step (its Trainer.fit around one SparseCoder) on the inputs in our units, x * act_scale
        # (Adam's steps are in the units of the weights: the biases would move act_scale times further in
        # ours otherwise), with its loss in our units: ours is the squared error summed over features,
        # averaged over rows; sparsify's is that error over the batch's total variance.
        x = trainer.task.batch(step, 0, 1) * sae.scale
        sp.set_decoder_norm_to_unit_norm()
        out = sp(x)
        (out.fvu * (x - x.mean(0)).pow(2).sum() / len(x)).backward()
        sp.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        trainer.step()
        trainer.step_done += 1
    sp.set_decoder_norm_to_unit_norm()
    torch.testing.assert_close(sae.W_dec.detach(), sp.W_dec.detach(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(sae.W_enc.detach(), sp.encoder.weight.detach().t(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(sae.b_enc.detach(), sp.encoder.bias.detach(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(sae.b_dec.detach(), sp.b_dec.detach(), atol=1e-5, rtol=1e-4)



def _fresh(kind: str, **fields):
    from models.sae import SAE, SAEConfig

    torch.manual_seed(0)
    return SAE(SAEConfig(kind=kind, d_in=D, d_sae=256, k=8, act_scale=0.5, **fields))


def _data(rows: int = 2048) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(rows, D, generator=g) * 2 + torch.linspace(-3, 3, D)  # raw units, off-centre


@pytest.mark.parametrize("kind,fields", [("topk", {}), ("batchtopk", {}), ("hierarchical_topk", {"k_min": 2}),
                                         ("matryoshka", {"matryoshka_widths": [64, 256]})])
def test_a_fresh_sae_starts_at_the_least_squares_encoder_scale(kind, fields):
    sae, x = _fresh(kind, **fields), _data()
    w_enc = sae.W_enc.detach().clone()
    c = sae.start_from_data(x)
    torch.testing.assert_close(sae.b_dec.detach(), x.mean(0) * 0.5, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.W_enc.detach(), w_enc * c)
    assert 0 < c < 1  # the transposed decoder overshoots: the selected latents' decodings add up

    def error(scale: float) -> float:
        with torch.no_grad():
            sae.W_enc.copy_(w_enc * scale)
            return float((sae.reconstruct(x)[0] - x).square().sum())

    best = error(c)
    assert best < error(1.0)  # better than the unscaled start
    assert best <= min(error(c * 0.9), error(c * 1.1)) * (1 + 1e-6)  # the minimum along the scale
    with torch.no_grad():  # and it selected the same latents as the unscaled encoder (b_enc is 0)
        sae.W_enc.copy_(w_enc * c)
        scaled = sae.reconstruct(x)[1]
        sae.W_enc.copy_(w_enc)
        unscaled = sae.reconstruct(x)[1]
    assert torch.equal(scaled.cols, unscaled.cols) and torch.equal(scaled.rows, unscaled.rows)


def test_relu_keeps_its_init_and_only_starts_its_decoder_bias():
    sae, x = _fresh("relu"), _data()
    w_enc = sae.W_enc.detach().clone()
    assert sae.start_from_data(x) == 1.0
    assert torch.equal(sae.W_enc.detach(), w_enc)
    torch.testing.assert_close(sae.b_dec.detach(), x.mean(0) * 0.5, atol=1e-5, rtol=1e-5)
