"""sae-hier-topk-tiny trains with the HierarchicalTopK paper's mean loss by default (issue 17 item 5)."""

import json
from pathlib import Path

import pytest
import torch

import zoo

LEGACY = Path(__file__).parents[1] / "fixtures" / "legacy"


def test_the_catalog_entry_uses_the_papers_mean_loss_and_log_area_stays_an_option():
    assert zoo.load("sae-hier-topk-tiny", d_sae=64).config.hier_loss == "mean"
    assert zoo.load("sae-hier-topk-tiny", d_sae=64, hier_loss="log_area").config.hier_loss == "log_area"


def test_the_default_loss_is_the_arithmetic_mean_of_the_prefix_errors_computed_by_dense_decoding():
    torch.manual_seed(0)
    sae = zoo.load("sae-hier-topk-tiny", d_in=8, d_sae=32, k=4, k_min=1, auxk_coeff=0.0, act_scale=1.0).train()
    x = torch.randn(16, 8)
    loss = sae(x).loss
    with torch.no_grad():  # the oracle: decode each top-j prefix densely, squared error summed per row, mean over rows
        errors = [((x - sae.decode(sae.encode(x, k=j))) ** 2).sum(-1).mean() for j in range(1, 5)]
    torch.testing.assert_close(loss, torch.stack(errors).mean(), rtol=1e-5, atol=1e-6)


def test_a_legacy_checkpoint_trained_with_log_area_keeps_it():
    folder = LEGACY / "sae-hier-topk-tiny"
    assert json.loads((folder / "config.json").read_text())["hier_loss"] == "log_area"
    assert zoo.load(str(folder)).config.hier_loss == "log_area"


@pytest.mark.parametrize("name", ["sae-hier-topk-tiny-before-hier_loss"])
def test_a_checkpoint_from_before_the_field_still_gets_the_mean_it_was_trained_with(name):
    assert zoo.load(str(LEGACY / name)).config.hier_loss == "mean"
