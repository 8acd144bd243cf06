"""Checkpoints written by earlier code (tests/fixtures/legacy, made at commit a3c5fca by
tests/fixtures/make_legacy_checkpoints.py) load to the outputs that code computed, through both
`zoo.load` and transformers' Auto classes."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM

import zoo

LEGACY = Path(__file__).parent.parent / "fixtures" / "legacy"
FOLDERS = sorted(p.name for p in LEGACY.iterdir() if p.is_dir())


def outputs(model, expected: dict) -> dict:
    with torch.no_grad():
        if "x" in expected:
            out = model(expected["x"])
            return {"x_hat": out.x_hat, "latents": model.encode(expected["x"]), "loss": out.loss}
        return {"logits": model(input_ids=expected["input_ids"]).logits}


def test_every_tiny_catalog_entry_has_a_legacy_checkpoint():
    tiny = {e.name for e in zoo.list_models() if e.size == "tiny"}
    assert tiny <= set(FOLDERS)


@pytest.mark.parametrize("name", FOLDERS)
@pytest.mark.parametrize("loader", ["zoo.load", "auto"])
def test_legacy_checkpoint_loads_to_the_outputs_it_was_saved_with(name, loader):
    folder = LEGACY / name
    expected = load_file(str(folder / "expected.safetensors"))
    if loader == "zoo.load":
        model = zoo.load(str(folder))
    else:
        auto = AutoModel if name.startswith("sae") else AutoModelForCausalLM
        model = auto.from_pretrained(str(folder)).eval()
    for key, value in outputs(model, expected).items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6, msg=f"{name}: {key} differs")


@pytest.mark.parametrize("loader", ["zoo.load", "auto"])
def test_a_checkpoint_older_than_a_field_gets_the_value_it_was_trained_with(loader):
    folder = LEGACY / "sae-hier-topk-tiny-before-hier_loss"
    model = zoo.load(str(folder)) if loader == "zoo.load" else AutoModel.from_pretrained(str(folder))
    assert model.config.hier_loss == "mean"
    assert model.config.resample_every == 0
