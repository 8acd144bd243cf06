"""The open zoo from the command line and the Hub: transformers checkpoints through zoo info / convert / export /
publish, repo ids served by the loopback Hub, and zoo transformations (upcycling, Monarch) on imported models."""

from __future__ import annotations

import json
import uuid

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import zoo
from tests import hf_models
from tests.zoo.test_import_export import ATOL, _ids, run_without_zoo
from zoo.cli import main


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return hf_models.save("qwen2", tmp_path_factory.mktemp("qwen") / "q")


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return hf_models.save("mixtral", tmp_path_factory.mktemp("mixtral") / "m")


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_zoo_info_reads_a_transformers_folder(qwen, capsys):
    assert main(["info", str(qwen)]) == 0
    out = capsys.readouterr().out
    assert '"attention_bias": "qkv"' in out and '"total_params"' in out


def test_zoo_export_writes_what_transformers_alone_loads_and_the_tokenizer(qwen, tmp_path, capsys):
    assert main(["export", str(qwen), str(tmp_path / "out")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["architecture"] == "qwen2" and "tokenizer.json" in report["tokenizer_files"]
    theirs = AutoModelForCausalLM.from_pretrained(qwen).eval()
    names, logits = run_without_zoo({"q": tmp_path / "out"}, _ids(), tmp_path)
    assert names["q"] == "Qwen2ForCausalLM" and (logits["q"] - _logits(theirs, _ids())).abs().max() <= ATOL
    text = "the quick brown fox"
    assert AutoTokenizer.from_pretrained(tmp_path / "out")(text)["input_ids"] == \
        AutoTokenizer.from_pretrained(qwen)(text)["input_ids"]


def test_zoo_export_refuses_kinds_without_an_equivalent_by_name(tmp_path, capsys):
    zoo.load("lm-dense-tiny", n_layers=1, attention="performer").save_pretrained(tmp_path / "p")
    assert main(["export", str(tmp_path / "p"), str(tmp_path / "out")]) == 2
    assert "cannot express attention='performer'" in capsys.readouterr().err


def test_zoo_export_names_an_architecture_that_cannot_hold_the_model(qwen, tmp_path, capsys):
    assert main(["export", str(qwen), str(tmp_path / "out"), "--architecture", "gpt2"]) == 2
    assert "GPT2" in capsys.readouterr().err


def test_zoo_export_of_a_zoo_catalog_model_round_trips(tmp_path):
    torch.manual_seed(0)
    ours = zoo.load("moe-tiny", n_layers=1, d_model=64)
    ours.save_pretrained(tmp_path / "moe")
    assert main(["export", str(tmp_path / "moe"), str(tmp_path / "out")]) == 0
    names, logits = run_without_zoo({"m": tmp_path / "out"}, _ids(seq=12) % 256, tmp_path)
    assert names["m"] == "MixtralForCausalLM" and (logits["m"] - _logits(ours, _ids(seq=12) % 256)).abs().max() <= ATOL


def test_zoo_convert_swaps_attention_on_a_transformers_checkpoint(qwen, tmp_path, capsys):
    out = tmp_path / "local"
    assert main(["convert", str(qwen), "--to", "attention=local", "--option", "window=4", "--eval-batches", "2",
                 "--seq-len", "32", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(printed[printed.index("{"):])
    assert report["attention_after"] == "local" and report["max_logit_change"] > 0
    converted = zoo.load(out)
    assert converted.config.attention == "local" and converted.config.attention_kwargs == {"window": 4}
    assert converted.config.attention_bias == "qkv"  # the rest of the imported architecture is kept
    original = zoo.load(qwen)
    assert torch.equal(converted.blocks[0].attn.q_proj.bias, original.blocks[0].attn.q_proj.bias)


@pytest.mark.parametrize("to, options", [("moe", ["--experts", "4"]), ("monarch", ["--nblocks", "2"]),
                                         ("lowrank", ["--option", "rank=8"])])
def test_upcycling_and_projection_of_an_imported_model_use_its_tokenizer(qwen, tmp_path, capsys, to, options):
    assert main(["convert", str(qwen), "--to", to, *options, "--eval-batches", "2", "--seq-len", "32",
                 "--out", str(tmp_path / to)]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{"):])
    assert report["val_bpb_before"] > 0 and report["val_loss_after"] > 0
    converted = zoo.load(tmp_path / to)
    assert converted.config.attention_bias == "qkv"
    if to == "moe":
        assert converted.config.mlp == "moe"
        with torch.no_grad():  # upcycled experts are copies of the dense MLP: the function is unchanged
            assert (_logits(converted, _ids()) - _logits(zoo.load(qwen), _ids())).abs().max() <= ATOL
    # the converted checkpoint carries the imported model's tokenizer, not the byte tokenizer
    assert AutoTokenizer.from_pretrained(tmp_path / to)("hello world")["input_ids"] == \
        AutoTokenizer.from_pretrained(qwen)("hello world")["input_ids"]


def test_a_transformers_repo_on_the_hub_loads_by_repo_id(hub, hub_cache, mixtral):
    repo_id = f"zoo-tests/mixtral-{uuid.uuid4().hex[:8]}"
    hub.add_repo(repo_id, mixtral)
    ours = zoo.load(repo_id, num_experts_per_tok=1)
    assert ours.config.mlp_kwargs["num_experts_per_tok"] == 1
    theirs = AutoModelForCausalLM.from_pretrained(mixtral).eval()
    assert (_logits(zoo.load(repo_id), _ids()) - _logits(theirs, _ids())).abs().max() <= ATOL


def test_publish_either_form_and_load_it_back(hub, hub_cache, qwen, tmp_path):
    zoo_repo, hf_repo = (f"zoo-tests/{kind}-{uuid.uuid4().hex[:8]}" for kind in ("zoo", "hf"))
    zoo.load(qwen).save_pretrained(tmp_path / "zoo-form")
    assert main(["export", str(qwen), str(tmp_path / "hf-form")]) == 0
    assert main(["publish", str(tmp_path / "zoo-form"), zoo_repo]) == 0
    assert main(["publish", str(tmp_path / "hf-form"), hf_repo]) == 0
    assert {"config.json", "model.safetensors"} <= set(hub.files(hf_repo))
    theirs = _logits(AutoModelForCausalLM.from_pretrained(qwen).eval(), _ids())
    for repo in (zoo_repo, hf_repo):
        assert (_logits(zoo.load(repo), _ids()) - theirs).abs().max() <= ATOL


def test_zoo_train_fine_tunes_a_transformers_checkpoint_with_its_tokenizer(qwen, tmp_path):
    out = tmp_path / "runs"
    assert main(["train", str(qwen), "--steps", "3", "--seq-len", "32", "--batch-size", "2", "--eval-every", "3",
                 "--eval-batches", "1", "--warmup-steps", "1", "--out", str(out)]) == 0
    final = next(out.rglob("final"))
    tuned = zoo.load(final)
    assert tuned.config.attention_bias == "qkv" and tuned.config.vocab_size == hf_models.VOCAB
    assert AutoTokenizer.from_pretrained(final)("the lazy dog")["input_ids"] == \
        AutoTokenizer.from_pretrained(qwen)("the lazy dog")["input_ids"]
    before = zoo.load(qwen)
    assert not torch.equal(tuned.blocks[0].attn.q_proj.weight, before.blocks[0].attn.q_proj.weight)  # it trained
