"""`zoo convert --to monarch|lowrank`: shapes kept, checkpoint loads, reported errors match to_dense()."""

import json

import pytest
import torch

from models.lm import checkpoint_key
from train.convert import main as convert
from zoo import load
from zoo.convert import CONVERTERS


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory):
    """A tiny dense LM (one block, d_model 64) saved as a checkpoint."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("dense") / "ckpt"
    load("lm-dense-tiny", n_layers=1, d_model=64).save_pretrained(folder)
    return folder


def run_convert(capsys, *argv: str) -> dict:
    assert convert([*argv, "--eval-batches", "2", "--seq-len", "32"]) == 0
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):])


def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    weight, approx = weight.detach(), approx.detach()
    return float(torch.linalg.norm(weight - approx) / torch.linalg.norm(weight))


@pytest.mark.parametrize("layers, converted", [("mlp", ("gate", "up", "down")),
                                               ("all", ("q_proj", "k_proj", "v_proj", "o_proj", "gate", "up", "down"))])
def test_monarch_conversion_loads_and_reports_the_error_of_each_projection(dense_checkpoint, tmp_path, capsys,
                                                                          layers, converted):
    out = tmp_path / "monarch"
    report = run_convert(capsys, str(dense_checkpoint), "--to", "monarch", "--nblocks", "4", "--layers", layers,
                         "--out", str(out))
    source, model = load(str(dense_checkpoint)), load(str(out))
    assert (model.config.linear, model.config.linear_kwargs, model.config.linear_targets) == (
        "monarch", {"nblocks": 4}, layers)
    errors = report["relative_frobenius_error"]
    # the report names projections as checkpoints do ("blocks.0.mlp.up", without the backbone's "model.")
    assert sorted(errors) == sorted(checkpoint_key(n) for n, _ in model.named_modules()
                                    if n.rsplit(".", 1)[-1] in converted)
    for name, error in errors.items():
        weight = source.get_submodule(name).weight
        structured = model.get_submodule(name)
        assert type(structured).__name__ == "MonarchLinear"
        assert structured.to_dense().shape == weight.shape
        assert error == pytest.approx(relative_error(weight, structured.to_dense()), rel=1e-4)
        assert 0 < error < 1  # the projection is better than the zero matrix, and not exact on random weights
    # everything outside the scope is copied unchanged
    if layers == "mlp":
        assert torch.equal(model.blocks[0].attn.q_proj.weight, source.blocks[0].attn.q_proj.weight)
    assert torch.equal(model.embed.weight, source.embed.weight)
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert model(ids).logits.shape == source(ids).logits.shape
    assert report["params_after"] < report["params_before"]
    assert all(torch.isfinite(torch.tensor(report[k])) for k in ("val_loss_before", "val_loss_after"))


def test_converting_a_monarch_model_back_to_monarch_is_exact(dense_checkpoint, tmp_path, capsys):
    first = tmp_path / "once"
    run_convert(capsys, str(dense_checkpoint), "--to", "monarch", "--nblocks", "4", "--out", str(first))
    report = run_convert(capsys, str(first), "--to", "monarch", "--nblocks", "4", "--out", str(tmp_path / "twice"))
    assert max(report["relative_frobenius_error"].values()) < 1e-5
    assert report["val_loss_after"] == pytest.approx(report["val_loss_before"], abs=1e-4)


def test_lowrank_conversion_with_finetune_writes_loadable_checkpoints(dense_checkpoint, tmp_path, capsys):
    out = tmp_path / "lowrank"
    report = run_convert(capsys, str(dense_checkpoint), "--to", "lowrank", "--option", "rank=64", "--layers", "attn",
                         "--out", str(out), "--finetune-steps", "1")
    assert max(report["relative_frobenius_error"].values()) < 1e-5  # rank 64 = full rank at d_model 64
    assert report["val_loss_after"] == pytest.approx(report["val_loss_before"], abs=1e-4)
    assert load(report["finetuned"]).config.linear == "lowrank"
    assert torch.isfinite(torch.tensor(report["val_loss_after_finetune"]))


def test_converting_part_of_a_structured_model_to_another_kind_is_refused():
    source = load("lm-dense-tiny", n_layers=1, d_model=64, linear="lowrank", linear_kwargs={"rank": 8},
                  linear_targets="attn")
    with pytest.raises(ValueError, match="mix two structured kinds"):
        CONVERTERS["monarch"](source, nblocks=4, layers="mlp")
    converted, report = CONVERTERS["monarch"](source, nblocks=4, layers="all")  # lowrank -> monarch via to_dense
    assert converted.config.linear_targets == "all" and len(report["relative_frobenius_error"]) == 7
