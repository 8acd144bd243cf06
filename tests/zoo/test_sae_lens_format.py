"""Export to / import from the SAELens on-disk format; checked with SAELens itself when it is installed."""

import json

import pytest
import torch

from models.sae import SAE, SAEConfig
from zoo.sae_lens_format import export_sae_lens, import_sae_lens

D, D_SAE = 16, 64
KINDS = ["relu", "topk", "batchtopk", "hierarchical_topk", "matryoshka"]


def trained(kind: str) -> SAE:
    """An SAE of `kind` after two training steps (BatchTopK kinds then have a threshold), in eval mode."""
    torch.manual_seed(0)
    extra = {"matryoshka_widths": [16, D_SAE]} if kind == "matryoshka" else {}
    sae = SAE(SAEConfig(kind=kind, d_in=D, d_sae=D_SAE, k=4, act_scale=0.25, hook_point="blocks.1",
                        source_model="runs/lm/final", **extra)).train()
    with torch.no_grad():
        sae.b_dec.normal_()
        if kind == "relu":
            sae.W_dec.mul_(torch.linspace(0.5, 2.0, D_SAE)[:, None])
    for step in range(2):
        sae.after_optimizer_step(sae(torch.randn(64, D) * 4).step_stats, step + 1)
    return sae.eval()


def x() -> torch.Tensor:
    return torch.randn(50, D, generator=torch.Generator().manual_seed(3)) * 4


@pytest.mark.parametrize("kind", KINDS)
def test_export_then_import_gives_back_the_same_sae(kind, tmp_path):
    sae = trained(kind)
    export_sae_lens(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == {"relu": "standard", "batchtopk": "jumprelu", "matryoshka": "jumprelu"}.get(
        kind, "topk")
    assert cfg["metadata"]["hook_name"] == "blocks.1" and cfg["normalize_activations"] == "none"
    back = import_sae_lens(tmp_path)
    assert back.config.kind == kind and back.config.act_scale == 0.25
    torch.testing.assert_close(back.reconstruct(x())[0], sae.reconstruct(x())[0], rtol=1e-4, atol=1e-4)


def test_import_refuses_what_it_cannot_represent(tmp_path):
    export_sae_lens(trained("topk"), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(ValueError, match="architecture 'gated'"):
        import_sae_lens(tmp_path)


@pytest.fixture(scope="module")
def sae_lens():
    return pytest.importorskip("sae_lens")


@pytest.mark.parametrize("kind", KINDS)
def test_saelens_opens_an_exported_sae_with_the_same_outputs(kind, sae_lens, tmp_path):
    sae = trained(kind)
    k = 2 if kind == "hierarchical_topk" else None  # a HierarchicalTopK SAE is exported at one budget
    export_sae_lens(sae, tmp_path, k=k)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x()), sae.encode(x(), k=k), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(theirs.decode(theirs.encode(x())), sae.decode(sae.encode(x(), k=k)),
                                   rtol=1e-4, atol=1e-4)


def test_a_saelens_trained_topk_sae_imports_with_the_same_outputs(sae_lens, tmp_path):
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(0)
    theirs = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=D_SAE, k=4))  # ranks by z_i |d_i|
    opt = torch.optim.Adam(theirs.parameters(), lr=0.05)
    for _ in range(3):  # decoder norms drift apart
        out = theirs.training_forward_pass(TrainStepInput(x(), {}, None, 0, False))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    norms = theirs.W_dec.norm(dim=1)
    assert norms.max() / norms.min() > 1.01
    theirs.save_model(str(tmp_path))
    ours = import_sae_lens(tmp_path)
    assert ours.config.kind == "topk" and ours.config.normalize_decoder
    with torch.no_grad():
        torch.testing.assert_close(ours.decode(ours.encode(x())), theirs.decode(theirs.encode(x())),
                                   rtol=1e-4, atol=1e-4)


def test_export_refuses_a_batchtopk_sae_without_a_learned_threshold(tmp_path):
    untrained = SAE(SAEConfig(kind="batchtopk", d_in=D, d_sae=D_SAE, k=4))
    with pytest.raises(ValueError, match="no inference threshold"):
        export_sae_lens(untrained, tmp_path)


def test_import_restores_the_whole_zoo_config(tmp_path):
    sae = SAE(SAEConfig(kind="hierarchical_topk", d_in=D, d_sae=D_SAE, k=8, k_min=2, hier_loss="mean",
                        resample_every=7, dead_tokens=123))
    export_sae_lens(sae, tmp_path, k=4)
    back = import_sae_lens(tmp_path).config
    assert (back.k, back.k_min, back.hier_loss, back.resample_every, back.dead_tokens) == (8, 2, "mean", 7, 123)
    sae = SAE(SAEConfig(kind="topk", d_in=D, d_sae=D_SAE, k=8))
    export_sae_lens(sae, tmp_path, k=4)
    assert import_sae_lens(tmp_path).config.k == 4, "a plain TopK SAE takes the budget it was exported at"
