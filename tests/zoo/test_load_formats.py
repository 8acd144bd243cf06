"""zoo.load in the dtype asked for, and sharded checkpoints (model.safetensors.index.json + shards) through
zoo.load, the Hub and zoo publish (issue 14's zoo.load items)."""

import json
import uuid

import pytest
import torch
from transformers import AutoModelForCausalLM

from zoo import load


@pytest.fixture
def lm():
    torch.manual_seed(0)
    return load("lm-dense-tiny", n_layers=2, d_model=32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, "bfloat16", torch.float16, torch.float64])
def test_a_folder_loads_in_the_dtype_asked_for(lm, tmp_path, dtype):
    lm.save_pretrained(tmp_path / "lm")
    model = load(tmp_path / "lm", dtype=dtype)
    want = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    assert {p.dtype for p in model.parameters()} == {want} and model.config.dtype == want
    for (name, ours), theirs in zip(model.state_dict().items(), lm.state_dict().values(), strict=True):
        torch.testing.assert_close(ours, theirs.to(want), msg=name)


def test_a_catalog_model_loads_in_the_dtype_asked_for():
    model = load("lm-dense-tiny", n_layers=1, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and model.config.dtype == torch.bfloat16


def test_auto_is_the_dtype_the_config_declares_and_the_default_is_float32(lm, tmp_path):
    lm.to(torch.bfloat16).save_pretrained(tmp_path / "lm")
    assert json.loads((tmp_path / "lm" / "config.json").read_text())["dtype"] == "bfloat16"
    assert {p.dtype for p in load(tmp_path / "lm", dtype="auto").parameters()} == {torch.bfloat16}
    assert {p.dtype for p in load(tmp_path / "lm").parameters()} == {torch.float32}


def test_an_unknown_dtype_is_a_value_error(lm, tmp_path):
    lm.save_pretrained(tmp_path / "lm")
    with pytest.raises(ValueError, match="dtype=torch.int8 is invalid"):
        load(tmp_path / "lm", dtype=torch.int8)


def sharded(model, folder):
    model.save_pretrained(folder, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
    return folder


def test_a_sharded_lm_checkpoint_loads_with_the_same_outputs(lm, tmp_path):
    folder = sharded(lm, tmp_path / "lm")
    x = torch.randint(0, 256, (2, 16))
    ours, theirs = load(folder), AutoModelForCausalLM.from_pretrained(folder)
    torch.testing.assert_close(ours(x).logits, lm(x).logits)
    torch.testing.assert_close(theirs(x).logits, lm(x).logits)


def test_a_sharded_sae_checkpoint_loads_with_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    sae = load("sae-topk-tiny", d_in=32, d_sae=256, k=4)
    folder = sharded(sae, tmp_path / "sae")
    x = torch.randn(5, 32)
    torch.testing.assert_close(load(folder).decode(load(folder).encode(x)), sae.decode(sae.encode(x)))


def test_a_shard_holding_a_tensor_the_index_does_not_name_is_refused(lm, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = sharded(lm, tmp_path / "lm")
    shard = sorted(folder.glob("model-*-of-*.safetensors"))[0]
    save_file({**load_file(shard), "junk": torch.zeros(2)}, shard)
    with pytest.raises(ValueError, match=r"tensors not in the index \['junk'\]"):
        load(folder)


def test_an_index_naming_a_missing_shard_is_a_file_not_found_error(lm, tmp_path):
    folder = sharded(lm, tmp_path / "lm")
    shard = sorted(folder.glob("model-*-of-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load(folder)


def test_zoo_publish_accepts_a_sharded_folder_and_the_hub_copy_loads(hub, hub_cache, lm, tmp_path, capsys):
    from train.publish import main as publish

    folder = sharded(lm, tmp_path / "lm")
    repo_id = f"zoo-tests/shards-{uuid.uuid4().hex[:8]}"
    assert publish([str(folder), repo_id]) == 0
    x = torch.randint(0, 256, (1, 16))
    torch.testing.assert_close(load(repo_id)(x).logits, lm(x).logits)
