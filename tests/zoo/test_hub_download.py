"""A Hub model download fetches what the checkpoint needs, nothing else; --force-download repairs a bad cache."""

import json
import uuid
from pathlib import Path

import pytest
import torch

from zoo.cli import main
from zoo.hub import HubNotFoundError, download

WEIGHTS = bytes(range(256)) * 3  # stands in for a safetensors file: only the bytes matter here
BIG = bytes(1 << 20)  # what a download must not fetch
# Each with its own bytes: the client fetches a blob once however many files share it.
NEEDED = {name: json.dumps({"file": name}) for name in (
    "config.json", "README.md", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "generation_config.json")}
# Files a repo may hold beside its checkpoint: training state, evaluation output, other weights.
UNNEEDED = {"train_config.json": "{}", "results/eval.json": "{}", "optimizer.safetensors": BIG,
            "checkpoints/step-000100/model.safetensors": BIG, "checkpoints/step-000100/state.json": "{}",
            "onnx/model.onnx": BIG, "pytorch_model.bin": BIG}


@pytest.fixture
def repo_id() -> str:
    """A repo id no other test uses (the Hub is shared by the whole session)."""
    return f"zoo-tests/dl-{uuid.uuid4().hex[:8]}"


def write(folder: Path, files: dict) -> Path:
    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return folder


def fetched(hub) -> set[str]:
    """Repo paths whose bytes were downloaded (GET .../resolve/<rev>/<path>)."""
    return {path.split("/resolve/", 1)[1].split("/", 1)[1] for method, path in hub.requests.entries()
            if method == "GET" and "/resolve/" in path}


def files_in(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_download_fetches_config_weights_card_and_tokenizer_only(hub, repo_id, tmp_path):
    hub.add_repo(repo_id, write(tmp_path / "repo", {**NEEDED, "model.safetensors": WEIGHTS, **UNNEEDED}))
    hub.requests.clear()
    folder = download(repo_id, cache_dir=tmp_path / "cache")
    assert fetched(hub) == {*NEEDED, "model.safetensors"}
    assert files_in(folder) == {*NEEDED, "model.safetensors"}


def test_sharded_download_fetches_the_index_and_the_shards_it_names(hub, repo_id, tmp_path):
    shards = {"model-00001-of-00002.safetensors": WEIGHTS, "model-00002-of-00002.safetensors": WEIGHTS[::-1]}
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors",
                                            "c": "model-00001-of-00002.safetensors"}}
    hub.add_repo(repo_id, write(tmp_path / "repo", {
        **NEEDED, **shards, "model.safetensors.index.json": json.dumps(index),
        "model-00001-of-00003.safetensors": BIG, **UNNEEDED}))  # an older sharding the index no longer names
    hub.requests.clear()
    folder = download(repo_id, cache_dir=tmp_path / "cache")
    expected = {*NEEDED, *shards, "model.safetensors.index.json"}
    assert fetched(hub) == expected
    assert files_in(folder) == expected
    hub.requests.clear()
    assert download(repo_id, cache_dir=tmp_path / "cache") == folder
    assert hub.requests.entries() == []  # the cache answers every step


def test_a_cache_holding_only_the_config_is_completed(hub, repo_id, tmp_path):
    from huggingface_hub import hf_hub_download

    hub.add_repo(repo_id, write(tmp_path / "repo", {**NEEDED, "model.safetensors": WEIGHTS}))
    hf_hub_download(repo_id, "config.json", cache_dir=tmp_path / "cache")  # e.g. transformers' AutoConfig
    folder = download(repo_id, cache_dir=tmp_path / "cache")
    assert (folder / "model.safetensors").read_bytes() == WEIGHTS


def test_a_repo_without_config_downloads_no_weights(hub, repo_id, tmp_path):
    hub.add_repo(repo_id, write(tmp_path / "repo", {"model.safetensors": BIG, "README.md": "# no config\n"}))
    hub.requests.clear()
    with pytest.raises(HubNotFoundError, match="config.json"):
        download(repo_id, cache_dir=tmp_path / "cache")
    assert fetched(hub) == set()


def test_an_index_naming_a_missing_shard_names_it(hub, repo_id, tmp_path):
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    hub.add_repo(repo_id, write(tmp_path / "repo", {
        "config.json": "{}", "model.safetensors.index.json": json.dumps(index),
        "model-00001-of-00002.safetensors": WEIGHTS}))
    with pytest.raises(HubNotFoundError, match="model-00002-of-00002.safetensors"):
        download(repo_id, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("shard", ["../../etc/passwd.safetensors", "sub/*.safetensors", "weights.bin"])
def test_an_index_naming_anything_but_a_shard_file_is_refused(hub, repo_id, tmp_path, shard):
    index = {"weight_map": {"a": shard}}
    hub.add_repo(repo_id, write(tmp_path / "repo", {"config.json": "{}",
                                                    "model.safetensors.index.json": json.dumps(index)}))
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json.*weight_map"):
        download(repo_id, cache_dir=tmp_path / "cache")


# ---- --force-download --------------------------------------------------------------------------------

@pytest.fixture
def published_lm(hub, repo_id, tmp_path):
    from zoo import load

    torch.manual_seed(0)
    load("lm-dense-tiny", n_layers=1, d_model=32).save_pretrained(tmp_path / "lm")
    hub.add_repo(repo_id, tmp_path / "lm")
    return repo_id


def cached_weights(cache: Path) -> Path:
    (path,) = cache.rglob("snapshots/*/model.safetensors")
    return path


@pytest.mark.parametrize("command", [["info"], ["generate", "--prompt", "a", "--max-new-tokens", "2"]])
def test_a_corrupt_cached_file_names_force_download_which_repairs_it(hub, hub_cache, published_lm, command,
                                                                     capsys):
    name, *flags = command
    assert main([name, published_lm, *flags]) == 0
    with open(cached_weights(hub_cache), "r+b") as f:  # follows the snapshot's link into the blob store
        f.truncate(100)
    capsys.readouterr()
    assert main([name, published_lm, *flags]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "--force-download" in err and "Traceback" not in err
    hub.requests.clear()
    assert main([name, published_lm, *flags, "--force-download"]) == 0
    assert "model.safetensors" in fetched(hub)
    assert main([name, published_lm, *flags]) == 0  # repaired for good
