"""transformers checkpoints in and out: every architecture the zoo imports, against transformers' own model.

The oracle is transformers' model class loading the very folder (`AutoModelForCausalLM.from_pretrained`):
same logits, same greedy generation; the exported folder is loaded in a subprocess whose import path
holds no zoo package.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import zoo
from tests import hf_models
from zoo.interop import export_checkpoint, to_transformers

ATOL = 1e-4


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hf")
    return {name: hf_models.save(name, root / name) for name in hf_models.ARCHITECTURES}


def _theirs(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _ids(batch=2, seq=20, seed=1):
    return torch.randint(0, hf_models.VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", hf_models.ARCHITECTURES)
def test_load_gives_the_logits_of_the_transformers_model(arch, folders):
    ours, theirs = zoo.load(folders[arch]), _theirs(folders[arch])
    assert type(ours).__name__ == "ZooLMForCausalLM"
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    with torch.no_grad():
        assert (ours(ids).logits - theirs(ids).logits).abs().max() <= ATOL
        a, b = ours(ids, attention_mask=mask).logits, theirs(ids, attention_mask=mask).logits
    assert (a[0, 5:] - b[0, 5:]).abs().max() <= ATOL and (a[1] - b[1]).abs().max() <= ATOL


@pytest.mark.parametrize("arch", hf_models.ARCHITECTURES)
def test_greedy_generation_equals_the_transformers_model(arch, folders):
    ours, theirs = zoo.load(folders[arch]), _theirs(folders[arch])
    ids = _ids(batch=1, seq=6)
    kw = dict(max_new_tokens=14, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kw), theirs.generate(ids, **kw))


_LOAD_WITHOUT_ZOO = textwrap.dedent("""
    import importlib.util, json, sys
    # No zoo on the path: drop the editable install's finder and the repository.
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()
                        and "editable" not in getattr(f, "__name__", "").lower()]
    sys.path[:] = [p for p in sys.path if p not in ("", ".", {repo!r})]
    for name in ("zoo", "models", "layers", "train"):
        assert importlib.util.find_spec(name) is None, name
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    ids = load_file({io!r})["ids"]
    out, names = {{}}, {{}}
    for key, folder in json.loads({folders!r}).items():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            out[key] = model(ids).logits.contiguous()
        names[key] = type(model).__name__
    save_file(out, {out!r})
    print(json.dumps(names))
""")


def run_without_zoo(folders: dict, ids, tmp_path) -> tuple[dict, dict]:
    """({key: class name}, {key: logits of ids}) of each folder, from one Python process that cannot import the
    zoo (tested there: no zoo, models, layers or train package is importable)."""
    io, out = tmp_path / "ids.safetensors", tmp_path / "logits.safetensors"
    save_file({"ids": ids}, io)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = _LOAD_WITHOUT_ZOO.format(repo=repo, folders=json.dumps({k: str(v) for k, v in folders.items()}),
                                    io=str(io), out=str(out))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), load_file(out)


@pytest.fixture(scope="module")
def exported(folders, tmp_path_factory):
    """Each architecture's folder -> zoo.load -> a zoo checkpoint -> zoo.load -> export_checkpoint, then the
    exported folders loaded by transformers alone: (reports, class names, logits) by architecture."""
    root = tmp_path_factory.mktemp("exported")
    reports, targets = {}, {}
    for arch, folder in folders.items():
        zoo.load(folder).save_pretrained(root / arch / "zoo")  # a zoo checkpoint of the imported model
        reports[arch] = export_checkpoint(zoo.load(root / arch / "zoo"), root / arch / "out", tokenizer_from=folder)
        targets[arch] = root / arch / "out"
    names, logits = run_without_zoo(targets, _ids(), root)
    return reports, names, logits, targets


@pytest.mark.parametrize("arch", hf_models.ARCHITECTURES)
def test_save_load_export_and_a_transformers_only_load_keep_the_logits(arch, folders, exported):
    reports, names, logits, targets = exported
    theirs = _theirs(folders[arch])
    assert reports[arch]["architecture"] == arch
    assert json.loads((targets[arch] / "config.json").read_text())["model_type"] == arch
    assert names[arch] == type(theirs).__name__
    with torch.no_grad():
        assert (logits[arch] - theirs(_ids()).logits).abs().max() <= ATOL
    from transformers import AutoTokenizer  # the tokenizer travels too
    text = "the quick brown fox jumps"
    assert AutoTokenizer.from_pretrained(targets[arch])(text)["input_ids"] == \
        AutoTokenizer.from_pretrained(folders[arch])(text)["input_ids"]


def test_an_unsupported_architecture_is_named_with_the_supported_ones(tmp_path):
    from transformers import BertConfig

    BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=32).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"'bert' is not supported; supported: \[.*'gpt2'.*'llama'.*'mixtral'"):
        zoo.load(tmp_path)


def test_settings_the_zoo_cannot_compute_are_refused_by_name(tmp_path):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    OlmoeForCausalLM(OlmoeConfig(**hf_models.SMALL, **hf_models.MOE, clip_qkv=2.0)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"clip_qkv=2\.0"):
        zoo.load(tmp_path)


def test_no_code_from_a_checkpoint_runs(tmp_path):
    """A config asking for remote code (auto_map + a modeling file) is refused; the file never runs."""
    marker = tmp_path / "ran"
    (tmp_path / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "evil", "auto_map": {"AutoConfig": "modeling_evil.EvilConfig",
                                           "AutoModelForCausalLM": "modeling_evil.EvilModel"}}))
    with pytest.raises(ValueError, match="'evil' is not supported"):
        zoo.load(tmp_path)
    assert not marker.exists()


def test_missing_weights_are_an_error_not_random_values(folders, tmp_path):
    import shutil

    from safetensors.torch import load_file as read

    shutil.copytree(folders["llama"], tmp_path / "c", dirs_exist_ok=True)
    state = read(tmp_path / "c" / "model.safetensors")
    state.pop("model.layers.1.mlp.up_proj.weight")
    save_file(state, tmp_path / "c" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"up_proj"):
        zoo.load(tmp_path / "c")


# ---- every zoo transformation on an imported model ------------------------------------------------------

@pytest.mark.parametrize("arch", hf_models.MOE_ARCHITECTURES)
def test_k_and_top_p_on_an_imported_moe_change_routing_and_cost(arch, folders):
    base = zoo.load(folders[arch])
    k1 = zoo.load(folders[arch], num_experts_per_tok=1)
    moe_ids = [i for i, b in enumerate(base.blocks) if hasattr(b.mlp, "router")]
    per_layer = zoo.load(folders[arch], num_experts_per_tok_by_layer=[
        1 if i == moe_ids[0] else 2 for i in range(len(base.blocks))])
    top_p = zoo.load(folders[arch], moe_router="top_p", moe_top_p=0.3)
    ids = _ids()
    cost, cost1 = base.cost(), k1.cost()
    expert = base.blocks[-1].mlp.experts.params_per_expert()
    assert cost["total_params"] == cost1["total_params"]
    assert cost["active_params"] - cost1["active_params"] == len(moe_ids) * expert  # one expert fewer per MoE layer
    assert k1.cost()["flops_per_token"] <= per_layer.cost()["flops_per_token"] <= cost["flops_per_token"]
    assert [per_layer.blocks[i].mlp.router.num_experts_per_tok for i in moe_ids] == [1] + [2] * (len(moe_ids) - 1)
    with torch.no_grad():
        assert (k1(ids).logits - base(ids).logits).abs().max() > 1e-3  # the routing changed
    mean = top_p.cost(sample=ids)["active_params"]
    assert cost1["active_params"] <= mean <= cost["active_params"]


KIND_BUDGETS = {"local": {"window": 64}, "lsh": {}, "performer": {}, "scatterbrain": {}}


@pytest.mark.parametrize("arch", hf_models.ARCHITECTURES)
@pytest.mark.parametrize("kind", sorted(KIND_BUDGETS))
def test_every_attention_kind_swaps_onto_an_imported_model(arch, kind, folders):
    dense = zoo.load(folders[arch], attention="dense", attention_kwargs={})
    swapped = zoo.load(folders[arch], attention=kind, attention_kwargs=KIND_BUDGETS[kind])
    assert swapped.config.attention == kind
    ids = _ids()
    with torch.no_grad():
        a, b = swapped(ids).logits, dense(ids).logits
    assert torch.isfinite(a).all()
    if kind == "local":  # a window longer than the sequence is dense attention
        assert (a - b).abs().max() <= ATOL
    else:  # the same weights: only the attention changed
        assert (swapped.lm_head.weight == dense.lm_head.weight).all()
        assert (a - b).abs().max() > 0


@pytest.mark.parametrize("hook", ["blocks.0.hook_resid_post", "model.layers.0", "transformer.h.0", "blocks.0"])
def test_hook_points_under_transformers_and_transformer_lens_names_are_the_residual_stream(hook, folders):
    from train.activations import lm_activations

    arch = "gpt2" if hook.startswith("transformer.") else "qwen3"
    ids = _ids()
    with torch.no_grad():
        # after block 0 (transformers' last hidden state is after the final norm: not a block's output)
        want = _theirs(folders[arch])(ids, output_hidden_states=True).hidden_states[1]
    got = lm_activations(zoo.load(folders[arch]), ids, hook)
    assert (got - want).abs().max() <= ATOL


def test_transformer_lens_resid_pre_is_the_input_of_the_block(folders):
    from train.activations import lm_activations

    ids = _ids()
    with torch.no_grad():
        want = _theirs(folders["llama"])(ids, output_hidden_states=True).hidden_states[1]  # after block 0
    assert (lm_activations(zoo.load(folders["llama"]), ids, "blocks.1.hook_resid_pre") - want).abs().max() <= ATOL


@pytest.mark.parametrize("arch", hf_models.ARCHITECTURES)
def test_an_sae_trains_20_steps_on_an_imported_model_with_its_tokenizer(arch, folders, tmp_path):
    from train.config import parse_args
    from train.trainer import Trainer

    hook = "transformer.h.1" if arch == "gpt2" else "blocks.1.hook_resid_post"
    args = ["sae-topk-tiny", "--set", f"source_model={folders[arch]}", "--set", "d_in=32", "--set", "d_sae=128",
            "--set", "k=4", "--set", f"hook_point={hook}", "--seq-len", "32", "--batch-size", "8", "--steps", "20",
            "--eval-batches", "1", "--warmup-steps", "2", "--out", str(tmp_path / "sae")]
    summary = Trainer(parse_args(args)).run()
    sae = zoo.load(summary["final"])
    assert sae.config.hook_point == hook and sae.config.d_in == 32
    from zoo.tokenizer import load_tokenizer
    assert load_tokenizer(summary["final"])("the quick fox")["input_ids"] == \
        load_tokenizer(folders[arch])("the quick fox")["input_ids"]  # the SAE records its LM's tokenizer


def test_to_transformers_names_each_kind_it_cannot_express():
    for overrides, field in (({"attention": "lsh"}, "attention"), ({"linear": "monarch"}, "linear")):
        with pytest.raises(ValueError, match=f"cannot express {field}="):
            to_transformers(zoo.load("lm-dense-tiny", n_layers=1, **overrides))
    with pytest.raises(ValueError, match=r"mlp_kwargs.router='top_p'"):
        to_transformers(zoo.load("moe-topp-tiny", n_layers=1))
