"""SAE evaluation: FVU, loss recovered, dead/dense fractions on constructed cases, and the plot."""

import pytest
import torch

from models.sae import SAE, SAEConfig
from train.sae_eval import (
    ce_metrics,
    fraction_of_variance_unexplained,
    loss_recovered,
    plot_fvu_vs_l0,
    reconstruction_metrics,
)
from zoo import load

D = 16


def perfect_sae(d: int = D) -> SAE:
    """ReLU SAE that reconstructs exactly: latents relu(x) and relu(-x), atoms +e_i and -e_i."""
    sae = SAE(SAEConfig(kind="relu", d_in=d, d_sae=2 * d, k=1))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_(), sae.b_dec.zero_()
    return sae.eval()


def test_fvu_equals_its_formula_on_a_constructed_case():
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0]])  # mean (1, 0): total variance 1 + 1 = 2
    assert fraction_of_variance_unexplained(x, x) == 0.0
    assert fraction_of_variance_unexplained(x, x.mean(0).expand_as(x)) == pytest.approx(1.0)
    assert fraction_of_variance_unexplained(x, torch.tensor([[0.0, 1.0], [2.0, 0.0]])) == pytest.approx(0.5)


def test_streaming_metrics_equal_the_whole_set_formulas():
    torch.manual_seed(0)
    sae = SAE(SAEConfig(kind="topk", d_in=D, d_sae=64, k=3)).eval()
    x = torch.randn(100, D) * 2 + 1
    metrics = reconstruction_metrics(sae, x.split(32))
    x_hat = sae.decode(sae.encode(x))
    assert metrics["fvu"] == pytest.approx(fraction_of_variance_unexplained(x, x_hat), rel=1e-5)
    assert metrics["mse"] == pytest.approx(float((x - x_hat).square().sum(-1).mean()), rel=1e-5)
    assert metrics["l0"] == pytest.approx(float((sae.encode(x) != 0).sum(-1).float().mean()))
    assert reconstruction_metrics(perfect_sae(), x.split(32))["fvu"] == pytest.approx(0.0, abs=1e-10)


def test_dead_and_dense_fractions_on_a_constructed_case():
    sae = SAE(SAEConfig(kind="topk", d_in=D, d_sae=10, k=1)).eval()
    with torch.no_grad():
        sae.b_enc.copy_(torch.tensor([100.0] + [0.0] * 9))  # latent 0 wins every token
    metrics = reconstruction_metrics(sae, [torch.randn(50, D)])
    assert metrics["dense_frac"] == pytest.approx(0.1) and metrics["dead_frac"] == pytest.approx(0.9)


def test_loss_recovered_formula_and_a_perfect_sae_recovers_everything():
    assert loss_recovered(ce_clean=2.0, ce_sae=3.0, ce_zero=5.0) == pytest.approx(2 / 3)
    torch.manual_seed(0)
    lm = load("lm-dense-tiny", d_model=D, n_layers=2, n_heads=2, max_seq_len=64, init_std=0.5)
    tokens = [torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))]
    ce = ce_metrics(lm, perfect_sae(), "blocks.0", tokens)
    assert abs(ce["ce_zero"] - ce["ce_clean"]) > 0.05, "zero-ablation must matter for the ratio to mean something"
    assert ce["ce_sae"] == pytest.approx(ce["ce_clean"], abs=1e-5)
    assert ce["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    bad = SAE(SAEConfig(kind="topk", d_in=D, d_sae=32, k=1)).eval()
    assert ce_metrics(lm, bad, "blocks.0", tokens)["ce_loss_recovered"] < 0.99


def test_plot_of_fvu_against_l0_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_fvu_vs_l0({"hierarchical_topk (one SAE)": [(8, 0.4), (16, 0.3), (32, 0.2)],
                           "topk (separate SAEs)": [(8, 0.41), (16, 0.29)]}, tmp_path / "p.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
