"""zoo.hub through the real huggingface_hub client against the loopback Hub of tests/hub_server.py."""

import json
import uuid
from pathlib import Path

import pytest
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError

from zoo.hub import HubNotFoundError, HubOfflineError, download, is_repo_id, publish

WEIGHTS = bytes(range(256)) * 3  # stands in for a safetensors file: only the bytes matter here


@pytest.fixture
def repo_id() -> str:
    """A repo id no other test uses (the Hub is shared by the whole session)."""
    return f"zoo-tests/ckpt-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """A tiny checkpoint folder: config.json, model.safetensors, README.md."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "dummy", "hidden_size": 8}))
    (folder / "model.safetensors").write_bytes(WEIGHTS)
    (folder / "README.md").write_text("# dummy\nTrained on nothing for 0 steps.\n")
    return folder


def same_files(a: Path, b: Path, names) -> bool:
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


CKPT_FILES = ("config.json", "model.safetensors", "README.md")


def test_download_gives_identical_files_in_a_snapshot_named_by_commit(hub, checkpoint, repo_id, tmp_path):
    sha = hub.add_repo(repo_id, checkpoint)
    folder = download(repo_id, cache_dir=tmp_path / "cache")
    assert same_files(folder, checkpoint, CKPT_FILES)
    assert folder.name == sha


def test_download_skips_files_outside_the_default_patterns(hub, checkpoint, repo_id, tmp_path):
    (checkpoint / "optimizer.pt").write_bytes(b"pickle")
    hub.add_repo(repo_id, checkpoint)
    folder = download(repo_id, cache_dir=tmp_path / "cache")
    assert (folder / "model.safetensors").is_file()
    assert not (folder / "optimizer.pt").exists()


def test_second_download_makes_no_request(hub, checkpoint, repo_id, tmp_path):
    hub.add_repo(repo_id, checkpoint)
    first = download(repo_id, cache_dir=tmp_path / "cache")
    hub.requests.clear()
    second = download(repo_id, cache_dir=tmp_path / "cache")
    assert second == first
    assert hub.requests.entries() == []


def test_cached_download_by_commit_sha_makes_no_request(hub, checkpoint, repo_id, tmp_path):
    sha = hub.add_repo(repo_id, checkpoint)
    download(repo_id, cache_dir=tmp_path / "cache")
    hub.requests.clear()
    assert download(repo_id, revision=sha, cache_dir=tmp_path / "cache").name == sha
    assert hub.requests.entries() == []


def test_force_download_asks_the_server_again(hub, checkpoint, repo_id, tmp_path):
    sha = hub.add_repo(repo_id, checkpoint)
    download(repo_id, cache_dir=tmp_path / "cache")
    hub.requests.clear()
    folder = download(repo_id, cache_dir=tmp_path / "cache", force_download=True)
    assert ("GET", f"/{repo_id}/resolve/{sha}/model.safetensors") in hub.requests.entries()
    assert same_files(folder, checkpoint, CKPT_FILES)


def test_download_of_a_dataset_repo(hub, repo_id, tmp_path):
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "train" / "part-0.jsonl").write_text('{"text": "hello"}\n')
    hub.add_repo(repo_id, data, repo_type="dataset")
    folder = download(repo_id, repo_type="dataset", cache_dir=tmp_path / "cache")
    assert (folder / "train" / "part-0.jsonl").read_text() == '{"text": "hello"}\n'
    assert ("GET", f"/api/datasets/{repo_id}/revision/main") in hub.requests.entries()


def test_missing_repo_raises_not_found_naming_repo_and_endpoint(hub, tmp_path):
    with pytest.raises(HubNotFoundError) as info:
        download("zoo-tests/no-such-repo", cache_dir=tmp_path / "cache")
    assert isinstance(info.value, FileNotFoundError)
    assert "zoo-tests/no-such-repo" in str(info.value) and hub.url in str(info.value)


def test_missing_revision_raises_not_found_naming_it(hub, checkpoint, repo_id, tmp_path):
    hub.add_repo(repo_id, checkpoint)
    with pytest.raises(HubNotFoundError, match="revision 'v9'"):
        download(repo_id, revision="v9", cache_dir=tmp_path / "cache")


def test_repo_without_config_raises_not_found(hub, checkpoint, repo_id, tmp_path):
    (checkpoint / "config.json").unlink()
    hub.add_repo(repo_id, checkpoint)
    with pytest.raises(HubNotFoundError, match="config.json"):
        download(repo_id, cache_dir=tmp_path / "cache")


def test_offline_with_cold_cache_raises_without_a_request(hub, checkpoint, repo_id, tmp_path, monkeypatch):
    hub.add_repo(repo_id, checkpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.requests.clear()
    with pytest.raises(HubOfflineError, match="HF_HUB_OFFLINE"):
        download(repo_id, cache_dir=tmp_path / "cache")
    assert hub.requests.entries() == []


def test_offline_with_warm_cache_serves_the_cache(hub, checkpoint, repo_id, tmp_path, monkeypatch):
    hub.add_repo(repo_id, checkpoint)
    online = download(repo_id, cache_dir=tmp_path / "cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.requests.clear()
    assert download(repo_id, cache_dir=tmp_path / "cache") == online
    assert hub.requests.entries() == []


def test_publish_then_download_round_trip(hub, checkpoint, repo_id, tmp_path):
    url = publish(checkpoint, repo_id)
    sha = hub.commit_sha(repo_id)
    assert url == f"{hub.url}/{repo_id}/commit/{sha}"
    folder = download(repo_id, cache_dir=tmp_path / "cache")
    assert folder.name == sha
    assert same_files(folder, checkpoint, CKPT_FILES)


def test_publish_never_uploads_pickles(hub, checkpoint, repo_id):
    (checkpoint / "optimizer.pt").write_bytes(b"pickle")
    publish(checkpoint, repo_id)
    assert sorted(HfApi().list_repo_files(repo_id)) == sorted(CKPT_FILES)


def test_publish_onto_a_checkpoint_without_overwrite_raises(hub, checkpoint, repo_id):
    publish(checkpoint, repo_id)
    sha = hub.commit_sha(repo_id)
    (checkpoint / "model.safetensors").write_bytes(b"new weights")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        publish(checkpoint, repo_id)
    assert hub.commit_sha(repo_id) == sha
    assert (hub.repo_dir(repo_id) / "model.safetensors").read_bytes() == WEIGHTS


def test_publish_with_overwrite_replaces_the_weights(hub, checkpoint, repo_id, tmp_path):
    publish(checkpoint, repo_id)
    old_sha = hub.commit_sha(repo_id)
    (checkpoint / "model.safetensors").write_bytes(b"new weights")
    publish(checkpoint, repo_id, overwrite=True)
    assert hub.commit_sha(repo_id) != old_sha
    folder = download(repo_id, cache_dir=tmp_path / "cache")
    assert (folder / "model.safetensors").read_bytes() == b"new weights"


def test_publish_of_a_folder_without_weights_names_the_file(hub, checkpoint, repo_id):
    (checkpoint / "model.safetensors").unlink()
    hub.requests.clear()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        publish(checkpoint, repo_id)
    assert hub.requests.entries() == []  # checked before any repo is created


def test_hub_server_answers_client_existence_checks(hub, checkpoint, repo_id):
    api = HfApi()
    assert not api.repo_exists(repo_id)
    hub.add_repo(repo_id, checkpoint)
    assert api.repo_exists(repo_id)
    assert api.file_exists(repo_id, "config.json")
    assert not api.file_exists(repo_id, "nope.json")


def test_hub_server_errors_map_to_client_exceptions(hub, checkpoint, repo_id, tmp_path):
    hub.add_repo(repo_id, checkpoint)
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(repo_id, "nope.json", cache_dir=tmp_path / "cache")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("zoo-tests/no-such-repo", "config.json", cache_dir=tmp_path / "cache")
    path = hf_hub_download(repo_id, "model.safetensors", cache_dir=tmp_path / "cache")
    assert Path(path).read_bytes() == WEIGHTS


@pytest.mark.parametrize(
    ("text", "expected"),
    [("someone/moe-fine-tiny", True), ("moe-fine-tiny", False), ("runs/x/final", False),
     ("./local", False), ("a/../b", False), ("org/na--me", False)],
)
def test_is_repo_id(text, expected):
    assert is_repo_id(text) is expected


def test_is_repo_id_is_false_for_an_existing_local_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "final").mkdir(parents=True)
    assert not is_repo_id("runs/final")
