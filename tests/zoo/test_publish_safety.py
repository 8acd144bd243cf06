"""`zoo publish` uploads only checkpoint files from inside the folder, and never replaces files silently."""

import json
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from huggingface_hub import HfApi

from zoo import hub as zoo_hub
from zoo.hub import publish

WEIGHTS = bytes(range(256)) * 3  # stands in for a safetensors file: only the bytes matter here
CKPT = {"config.json": json.dumps({"model_type": "dummy"}), "model.safetensors": WEIGHTS,
        "README.md": "# dummy\n"}
TOKENIZER = {"tokenizer.json": "{}", "tokenizer_config.json": "{}", "special_tokens_map.json": "{}",
             "vocab.json": "{}", "merges.txt": "#version: 0.2\n", "generation_config.json": "{}"}
# Pickles and training state under names a deny list of extensions misses.
PICKLES = ("last.ckpt", "model.PT", "weights.pkl.gz", "state.joblib", "objects.npy", "model.pt.zip",
           "optimizer.pt", "train_config.json", "state.json", "metrics.jsonl")


@pytest.fixture
def repo_id() -> str:
    """A repo id no other test uses (the Hub is shared by the whole session)."""
    return f"zoo-tests/pub-{uuid.uuid4().hex[:8]}"


def write(folder: Path, files: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return folder


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    return write(tmp_path / "ckpt", CKPT)


def test_publish_uploads_only_the_allow_list(hub, checkpoint, repo_id, caplog):
    write(checkpoint, {**TOKENIZER, **{name: b"\x80\x04pickle" for name in PICKLES},
                       "checkpoints/step-000001/model.safetensors": WEIGHTS})
    with caplog.at_level(logging.WARNING, logger="zoo.hub"):
        publish(checkpoint, repo_id)
    assert sorted(hub.files(repo_id)) == sorted([*CKPT, *TOKENIZER])
    said = caplog.text
    assert all(name in said for name in PICKLES) and "checkpoints" in said


def test_a_symlink_is_never_followed(hub, checkpoint, repo_id, tmp_path, caplog):
    secret = write(tmp_path / "outside", {"secret.json": '{"token": "hf_secret"}'}) / "secret.json"
    (checkpoint / "tokenizer_config.json").symlink_to(secret)
    (checkpoint / "notes.txt").symlink_to("/etc/hostname")
    (checkpoint / "linked-dir").symlink_to(tmp_path / "outside", target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="zoo.hub"):
        publish(checkpoint, repo_id)
    assert sorted(hub.files(repo_id)) == sorted(CKPT)
    assert "hf_secret" not in "".join((hub.repo_dir(repo_id) / n).read_text(errors="replace") for n in CKPT)
    assert "tokenizer_config.json" in caplog.text and "symbolic link" in caplog.text


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_a_symlinked_checkpoint_file_is_refused_before_any_request(hub, checkpoint, repo_id, tmp_path, name):
    real = tmp_path / f"real-{name}"
    (checkpoint / name).rename(real)
    (checkpoint / name).symlink_to(real)
    hub.requests.clear()
    with pytest.raises(ValueError, match=rf"{name}.*symbolic link"):
        publish(checkpoint, repo_id)
    assert hub.requests.entries() == []


def test_sharded_weights_and_their_index_are_uploaded(hub, checkpoint, repo_id):
    (checkpoint / "model.safetensors").unlink()
    shards = {"model-00001-of-00002.safetensors": WEIGHTS, "model-00002-of-00002.safetensors": WEIGHTS[::-1]}
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    write(checkpoint, {**shards, "model.safetensors.index.json": json.dumps(index)})
    publish(checkpoint, repo_id)
    assert sorted(hub.files(repo_id)) == sorted(["config.json", "README.md", "model.safetensors.index.json", *shards])


def test_an_index_naming_a_missing_shard_is_refused(hub, checkpoint, repo_id):
    (checkpoint / "model.safetensors").unlink()
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors"}}
    write(checkpoint, {"model.safetensors.index.json": json.dumps(index)})
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors"):
        publish(checkpoint, repo_id)


def test_the_plan_says_what_is_left_out_and_why(checkpoint):
    write(checkpoint, {"optimizer.pt": b"x", "sub/config.json": "{}"})
    (checkpoint / "tokenizer.json").symlink_to(checkpoint / "config.json")
    plan = zoo_hub.publish_plan(checkpoint)
    assert sorted(plan.upload) == sorted(CKPT)
    assert set(plan.left_out) == {"optimizer.pt", "sub", "tokenizer.json"}
    assert "symbolic link" in plan.left_out["tokenizer.json"]
    assert "folder" in plan.left_out["sub"]


def test_the_publish_command_prints_what_it_left_out(hub, repo_id, tmp_path):
    import torch

    from zoo import load

    torch.manual_seed(0)
    folder = tmp_path / "final"
    load("lm-dense-tiny", n_layers=1, d_model=32).save_pretrained(folder)
    (folder / "last.ckpt").write_bytes(b"\x80\x04pickle")
    done = subprocess.run([sys.executable, "-m", "zoo", "publish", str(folder), repo_id], capture_output=True,
                          text=True, env={**os.environ, "HF_ENDPOINT": hub.url}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "last.ckpt" in done.stderr and "Traceback" not in done.stderr
    assert "last.ckpt" not in hub.files(repo_id)


# ---- an existing repo: nothing changes or goes stale without --overwrite ---------------------------------

def test_a_changed_card_or_tokenizer_is_refused_without_overwrite(hub, checkpoint, repo_id, tmp_path):
    hub.add_repo(repo_id, write(tmp_path / "remote", {"README.md": "# someone else's card\n",
                                                     "tokenizer.json": '{"old": 1}'}))
    sha = hub.commit_sha(repo_id)
    write(checkpoint, {"tokenizer.json": '{"new": 1}'})
    with pytest.raises(FileExistsError) as info:
        publish(checkpoint, repo_id)
    assert "README.md" in str(info.value) and "tokenizer.json" in str(info.value)
    assert "overwrite" in str(info.value)
    assert hub.commit_sha(repo_id) == sha
    assert (hub.repo_dir(repo_id) / "README.md").read_text() == "# someone else's card\n"


def test_files_that_would_go_stale_are_refused_without_overwrite(hub, checkpoint, repo_id, tmp_path):
    old = {"model-00001-of-00002.safetensors": WEIGHTS, "model.safetensors.index.json": "{}",
           "tokenizer.json": "{}"}
    hub.add_repo(repo_id, write(tmp_path / "remote", old))
    sha = hub.commit_sha(repo_id)
    with pytest.raises(FileExistsError) as info:
        publish(checkpoint, repo_id)
    assert all(name in str(info.value) for name in old)
    assert "stale" in str(info.value)
    assert hub.commit_sha(repo_id) == sha


def test_overwrite_replaces_and_deletes_stale_checkpoint_files_keeping_others(hub, checkpoint, repo_id, tmp_path):
    old = {"model-00001-of-00002.safetensors": WEIGHTS, "model.safetensors.index.json": "{}",
           "tokenizer.json": "{}", "README.md": "# old\n", "LICENSE": "MIT\n"}
    hub.add_repo(repo_id, write(tmp_path / "remote", old))
    publish(checkpoint, repo_id, overwrite=True)
    assert sorted(hub.files(repo_id)) == sorted([*CKPT, "LICENSE"])
    assert (hub.repo_dir(repo_id) / "README.md").read_text() == CKPT["README.md"]


def test_republishing_identical_files_needs_no_overwrite(hub, checkpoint, repo_id):
    publish(checkpoint, repo_id)
    sha = hub.commit_sha(repo_id)
    publish(checkpoint, repo_id)
    assert hub.commit_sha(repo_id) == sha  # nothing changed: no new commit
    assert sorted(HfApi().list_repo_files(repo_id)) == sorted(CKPT)


def test_unrelated_files_in_the_repo_do_not_block_a_first_publish(hub, checkpoint, repo_id, tmp_path):
    hub.add_repo(repo_id, write(tmp_path / "remote", {"LICENSE": "MIT\n", ".gitattributes": "*.bin lfs\n"}))
    publish(checkpoint, repo_id)
    assert sorted(hub.files(repo_id)) == sorted([*CKPT, "LICENSE", ".gitattributes"])
