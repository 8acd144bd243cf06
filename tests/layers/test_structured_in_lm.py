"""Structured kinds inside the zoo LM: config, catalog entries, generate, save/load, transformers."""

import pytest
import torch

from models.lm import ZooLMConfig
from zoo import load

CATALOG_NAMES = ["lm-monarch-tiny", "lm-pixelfly-tiny"]


def test_config_accepts_the_kinds_and_lists_them_on_a_typo():
    assert ZooLMConfig(linear="monarch", linear_kwargs={"nblocks": 4}).linear == "monarch"
    with pytest.raises(Exception, match="monarch") as info:
        ZooLMConfig(linear="monarc")
    assert "pixelfly" in str(info.value)


@pytest.mark.parametrize("name", CATALOG_NAMES)
def test_catalog_model_runs_forward_and_generate_with_structured_projections(name):
    torch.manual_seed(0)
    model = load(name, n_layers=2)
    kind = model.config.linear
    assert type(model.blocks[0].mlp.up).__name__.lower().startswith(kind)
    assert type(model.blocks[0].attn.q_proj).__name__.lower().startswith(kind)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 12, 256) and torch.isfinite(logits).all()
    out = model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 11)


@pytest.mark.parametrize("name", CATALOG_NAMES)
def test_structured_lm_has_fewer_parameters_and_flops_than_dense(name):
    dense, sparse = load("lm-dense-tiny").cost(), load(name).cost()
    assert sparse["total_params"] < 0.35 * dense["total_params"]
    assert sparse["flops_per_token"] < 0.45 * dense["flops_per_token"]


def test_init_gives_structured_projections_the_dense_scale():
    torch.manual_seed(1)
    model = load("lm-monarch-tiny", n_layers=1)
    std = model.blocks[0].mlp.up.to_dense().detach().std().item()
    assert 0.016 < std < 0.024  # init_std = 0.02, as nn.Linear gets


@pytest.mark.parametrize("name, extra", [("lm-monarch-tiny", {"linear_targets": "mlp"}),
                                         ("lm-pixelfly-tiny", {}),
                                         ("lm-dense-tiny", {"linear": "blocksparse",
                                                            "linear_kwargs": {"block_size": 16, "density": 0.25}}),
                                         ("lm-dense-tiny", {"linear": "lowrank", "linear_kwargs": {"rank": 16},
                                                            "linear_targets": "attn"})])
def test_save_load_round_trip_gives_identical_logits(tmp_path, name, extra):
    torch.manual_seed(2)
    model = load(name, n_layers=1, **extra)
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        want = model(ids).logits
        assert torch.equal(load(str(tmp_path))(ids).logits, want)
        from transformers import AutoModelForCausalLM

        assert torch.equal(AutoModelForCausalLM.from_pretrained(str(tmp_path))(ids).logits, want)
