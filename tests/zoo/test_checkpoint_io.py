"""Checkpoint folders: save_pretrained -> load round trips, transformers' Auto classes, and bad checkpoints."""

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

import zoo
from models.lm import ZooLM, ZooLMConfig
from zoo import load

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


def small_lm(**overrides) -> ZooLM:
    torch.manual_seed(0)
    return load("lm-dense-tiny", n_layers=1, d_model=64, **overrides)


def tokens(seq: int = 10) -> torch.Tensor:
    return torch.randint(0, 256, (2, seq), generator=torch.Generator().manual_seed(1))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[ZooLM, Path]:
    """A small LM and the checkpoint folder it saved (shared: tests that change files work on a copy)."""
    model = small_lm()
    folder = tmp_path_factory.mktemp("ckpt") / "lm"
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture
def ckpt(saved, tmp_path) -> Path:
    """A private copy of the saved checkpoint, free to damage."""
    return Path(shutil.copytree(saved[1], tmp_path / "ckpt"))


def edit_config(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


# ---- round trips -----------------------------------------------------------------------------------------


def test_round_trip_gives_identical_logits(saved):
    model, folder = saved
    loaded = load(str(folder))
    assert isinstance(loaded, ZooLM) and not loaded.training
    ids = tokens()
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    assert loaded.lm_head.weight.data_ptr() == loaded.embed.weight.data_ptr(), "tied weights stay tied"


def test_round_trip_untied_embeddings_gives_identical_logits(tmp_path):
    model = small_lm(tie_word_embeddings=False)
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" in load_file(tmp_path / "model.safetensors")
    loaded = load(str(tmp_path))
    assert not loaded.config.tie_word_embeddings
    assert not torch.equal(loaded.lm_head.weight, loaded.embed.weight)
    ids = tokens()
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_round_trip_keeps_every_tensor(saved):
    model, folder = saved
    loaded = load(folder)
    expected, got = model.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_folder_holds_config_weights_card_and_no_pickle(saved):
    model, folder = saved
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "README.md"} <= names
    assert not {p for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES}
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "zoo_lm" and config["n_layers"] == 1 and config["d_model"] == 64
    card = (folder / "README.md").read_text()
    total = sum(p.numel() for p in model.parameters())
    assert f"{total:,}" in card, "the model card states the parameter count"


def test_overrides_apply_to_a_checkpoint(saved):
    _, folder = saved
    assert load(folder, max_seq_len=32).config.max_seq_len == 32
    with pytest.raises(ValueError, match="n_layers"):
        load(folder, n_layers=3)  # the weights hold one block


# ---- transformers ---------------------------------------------------------------------------------------


def test_auto_classes_load_the_folder_with_identical_logits(saved):
    model, folder = saved
    assert zoo.load is load  # `import zoo` is what registers the Auto classes
    config = AutoConfig.from_pretrained(folder)
    assert isinstance(config, ZooLMConfig) and config.n_layers == 1
    auto = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert isinstance(auto, ZooLM)
    ids = tokens()
    assert torch.equal(logits(auto, ids), logits(model, ids))


def test_auto_classes_load_untied_embeddings(tmp_path):
    model = small_lm(tie_word_embeddings=False)
    model.save_pretrained(tmp_path)
    auto = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = tokens()
    assert torch.equal(logits(auto, ids), logits(model, ids))


def test_greedy_generate_through_auto_model_follows_the_argmax(saved):
    _, folder = saved
    auto = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt = tokens(5)[:1]
    out = auto.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                        pad_token_id=0)
    assert out.shape == (1, 11)
    assert torch.equal(out[:, :5], prompt)
    seq = prompt  # greedy decoding by hand: full forward each step, append the argmax
    for _ in range(6):
        seq = torch.cat([seq, logits(auto, seq)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)


# ---- bad checkpoints --------------------------------------------------------------------------------------


def _truncate(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def _garbage(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 40)


def _shape_mismatch(folder: Path) -> None:
    edit_config(folder, lambda c: c.update(d_ff=c["d_ff"] + 64))


def _extra_tensor(folder: Path) -> None:
    tensors = load_file(folder / "model.safetensors")
    tensors["blocks.0.extra.weight"] = torch.zeros(3)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _missing_tensor(folder: Path) -> None:
    tensors = load_file(folder / "model.safetensors")
    del tensors["norm.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


BAD_CHECKPOINTS = {
    # case: (how to damage the folder, the error class, a regex the message must match)
    "missing config.json": (lambda f: (f / "config.json").unlink(), FileNotFoundError, r"config\.json"),
    "missing model.safetensors": (lambda f: (f / "model.safetensors").unlink(), FileNotFoundError,
                                  r"model\.safetensors"),
    "truncated weights": (_truncate, ValueError, r"model\.safetensors"),
    "garbage weights": (_garbage, ValueError, r"model\.safetensors"),
    "config not JSON": (lambda f: (f / "config.json").write_text("{not json"), ValueError, r"config\.json.*JSON"),
    "config not an object": (lambda f: (f / "config.json").write_text("[1, 2]"), ValueError, r"config\.json"),
    "unknown model_type": (lambda f: edit_config(f, lambda c: c.update(model_type="bert")), ValueError,
                           r"'bert' is not supported; supported: \[.*'llama'"),
    "zoo config labelled llama": (lambda f: edit_config(f, lambda c: c.update(model_type="llama")), ValueError,
                                  r"config\.json is not a valid transformers 'llama' config"),
    "missing field": (lambda f: edit_config(f, lambda c: c.pop("d_model")), ValueError, r"d_model"),
    "wrong-typed field": (lambda f: edit_config(f, lambda c: c.update(n_layers="four")), ValueError,
                          r"n_layers.*four"),
    "kwargs field not a mapping": (lambda f: edit_config(f, lambda c: c.update(mlp_kwargs=[1])), ValueError,
                                   r"config\.json"),
    "bad field value": (lambda f: edit_config(f, lambda c: c.update(n_heads=3)), ValueError, r"d_model|n_heads"),
    "weights do not match the config": (_shape_mismatch, ValueError, r"blocks\.0\.mlp\..*shape"),
    "extra tensor": (_extra_tensor, ValueError, r"unexpected.*blocks\.0\.extra\.weight"),
    "missing tensor": (_missing_tensor, ValueError, r"missing.*norm\.weight"),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_a_clear_error(case, ckpt):
    damage, error, message = BAD_CHECKPOINTS[case]
    damage(ckpt)
    with pytest.raises(error, match=message):
        load(str(ckpt))


def test_a_config_newer_than_the_code_is_a_clear_error(ckpt):
    edit_config(ckpt, lambda c: c.update(config_version=99))
    with pytest.raises(ValueError, match="config_version.*newer than this code"):
        load(ckpt)


def test_missing_model_card_warns_but_loads(ckpt, saved):
    (ckpt / "README.md").unlink()
    with pytest.warns(UserWarning, match="README.md"):
        model = load(ckpt)
    ids = tokens()
    assert torch.equal(logits(model, ids), logits(saved[0], ids))


# ---- no pickle, ever ---------------------------------------------------------------------------------------


class _Trap:
    """Unpickling this creates the file `marker`: proof that someone unpickled it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def trapped(ckpt, tmp_path) -> tuple[Path, Path]:
    """The checkpoint with pickle files next to it that leave a marker file if anything unpickles them."""
    marker = tmp_path / "unpickled"
    for name in ("pytorch_model.bin", "training_state.pt", "optimizer.pt"):
        (ckpt / name).write_bytes(pickle.dumps(_Trap(marker)))
    return ckpt, marker


def test_load_ignores_pickle_files_and_never_unpickles(trapped, saved, monkeypatch):
    folder, marker = trapped

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called while loading a checkpoint")

    monkeypatch.setattr(torch, "load", refuse)
    model = load(folder)
    assert not marker.exists()
    ids = tokens()
    assert torch.equal(logits(model, ids), logits(saved[0], ids))


def test_pickle_alone_is_not_a_checkpoint(trapped):
    folder, marker = trapped
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        load(folder)
    assert not marker.exists()


def test_auto_model_prefers_safetensors_over_pickle(trapped, saved):
    folder, marker = trapped
    auto = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert not marker.exists()
    ids = tokens()
    assert torch.equal(logits(auto, ids), logits(saved[0], ids))


# The config fields of each config version. A field added (or removed) needs a new version whose upgrade
# (models/versioning.py) turns older dicts into the new layout with the values that reproduce them, or
# published checkpoints stop loading or change meaning; tests/zoo/test_legacy_checkpoints.py checks them.
FIELDS_BY_VERSION = {
    "ZooLMConfig": {
        1: {"attention", "attention_kwargs", "config_version", "d_ff", "d_model", "init_std", "linear",
            "linear_kwargs", "linear_targets", "max_seq_len", "mlp", "mlp_kwargs", "n_heads", "n_kv_heads",
            "n_layers", "norm_eps", "rope_theta", "tie_word_embeddings", "use_cache", "vocab_size", "zoo_name"},
        2: {"attention", "attention_bias", "attention_kwargs", "config_version", "d_ff", "d_model",
            "dense_mlp_layers", "embedding_scale", "head_dim", "init_std", "linear", "linear_kwargs",
            "linear_targets", "max_seq_len", "mla", "mlp", "mlp_kwargs", "n_heads", "n_kv_heads", "n_layers", "norm",
            "norm_eps", "position", "qk_norm", "rope_kwargs", "rope_theta", "tie_word_embeddings", "use_cache",
            "vocab_size", "zoo_name"},
    },
    "SAEConfig": {
        0: {"act_scale", "auxk_coeff", "auxk_k", "context_size", "d_in", "d_sae", "dead_tokens", "hier_loss",
            "hook_point", "k", "k_min", "kind", "l1_coeff", "matryoshka_widths", "normalize_decoder",
            "resample_every", "source_model", "threshold_momentum", "zoo_name"},
        1: {"act_scale", "auxk_coeff", "auxk_k", "config_version", "context_size", "d_in", "d_sae", "dead_tokens",
            "hier_loss", "hook_point", "k", "k_min", "kind", "kind_kwargs", "l1_coeff", "matryoshka_widths",
            "normalize_decoder", "resample_every", "source_model", "threshold_momentum", "zoo_name"},
    },
}


def test_a_config_field_change_comes_with_a_version_and_its_upgrade():
    import dataclasses

    from models.sae import SAEConfig

    for cls in (ZooLMConfig, SAEConfig):
        declared = {f.name for f in dataclasses.fields(cls) if f.name in cls.__annotations__}
        version = cls.current_version() if hasattr(cls, "current_version") else 0
        assert declared == FIELDS_BY_VERSION[cls.__name__][version], (cls.__name__, version)
