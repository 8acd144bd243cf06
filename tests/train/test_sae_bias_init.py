"""A fresh SAE's decoder bias starts at the mean of its training activations (sparsify and SAELens do the
same); a fine-tuned SAE keeps the one it was trained with."""

import numpy as np
import torch

from tests.train.test_sae_task import sae_args
from train.config import parse_args
from train.trainer import Trainer


def test_a_fresh_sae_starts_its_decoder_bias_at_the_data_mean(source_lm, tmp_path):
    trainer = Trainer(parse_args(sae_args(source_lm, tmp_path / "sae", "sae-topk-tiny", "--steps", "4")))
    sae, store = trainer.model, trainer.task.train
    raw = store.data  # the harvested activations as stored (a memory-mapped array), averaged in float64 here
    mean = torch.from_numpy(np.asarray(raw[: min(len(raw), 65536)], dtype=np.float64)).mean(0)
    torch.testing.assert_close(sae.b_dec.double(), mean * sae.config.act_scale, atol=1e-5, rtol=1e-4)
    # the point of it: with no latent active, the mean reconstructs better than zero
    x = store.slice(0, 512) * sae.config.act_scale
    assert ((x - sae.b_dec.detach()) ** 2).sum() < (x ** 2).sum()


def test_fine_tuning_keeps_the_trained_decoder_bias(source_lm, tmp_path):
    first = Trainer(parse_args(sae_args(source_lm, tmp_path / "a", "sae-topk-tiny", "--steps", "3"))).run()
    from zoo import load

    trained = load(first["final"]).b_dec.detach().clone()
    again = Trainer(parse_args([first["final"], *sae_args(source_lm, tmp_path / "b")[1:], "--steps", "1"]))
    assert torch.equal(again.model.b_dec.detach(), trained)
