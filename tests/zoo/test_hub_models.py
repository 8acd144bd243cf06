"""Real zoo models on the loopback Hub: zoo.load("org/name") and `zoo publish`, through the real client."""

import uuid
from pathlib import Path

import pytest
import torch

from zoo import load
from zoo.cli import main


def tokens() -> torch.Tensor:
    return torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(2))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens()).logits


@pytest.fixture
def repo_id() -> str:
    """A repo id no other test uses (the Hub is shared by the whole session)."""
    return f"zoo-tests/lm-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small fresh LM and its checkpoint folder."""
    torch.manual_seed(0)
    model = load("lm-dense-tiny", n_layers=1, d_model=64)
    folder = tmp_path_factory.mktemp("hub-ckpt") / "lm"
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """A second LM of the same shape with different weights (to see a checkpoint being replaced)."""
    torch.manual_seed(1)
    model = load("lm-dense-tiny", n_layers=1, d_model=64)
    folder = tmp_path_factory.mktemp("hub-ckpt-other") / "lm"
    model.save_pretrained(folder)
    return model, folder


def test_load_repo_id_gives_identical_logits(hub, hub_cache, saved, repo_id):
    model, folder = saved
    hub.add_repo(repo_id, folder)
    loaded = load(repo_id)
    assert torch.equal(logits(loaded), logits(model))
    assert any(method == "GET" and path.endswith("/model.safetensors") for method, path in hub.requests.entries())
    assert hub_cache.is_dir() and any(hub_cache.rglob("model.safetensors")), "downloaded into the cache"


def test_second_load_makes_no_http_request(hub, hub_cache, saved, repo_id):
    model, folder = saved
    hub.add_repo(repo_id, folder)
    load(repo_id)
    hub.requests.clear()
    again = load(repo_id)
    assert hub.requests.entries() == []
    assert torch.equal(logits(again), logits(model))


def test_load_at_a_commit_sha(hub, hub_cache, saved, repo_id):
    model, folder = saved
    sha = hub.add_repo(repo_id, folder)
    loaded = load(repo_id, revision=sha)
    assert torch.equal(logits(loaded), logits(model))
    hub.requests.clear()
    load(repo_id, revision=sha)  # a commit sha never moves: the cache answers
    assert hub.requests.entries() == []


def test_load_unknown_repo_is_a_clear_error(hub, hub_cache, repo_id):
    with pytest.raises(FileNotFoundError, match=repo_id):
        load(repo_id)


def test_load_repo_applies_overrides(hub, hub_cache, saved, repo_id):
    _, folder = saved
    hub.add_repo(repo_id, folder)
    assert load(repo_id, max_seq_len=16).config.max_seq_len == 16


def test_publish_uploads_a_loadable_checkpoint(hub, hub_cache, saved, repo_id, capsys):
    model, folder = saved
    assert main(["publish", str(folder), repo_id]) == 0
    assert repo_id in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "README.md"} <= set(hub.files(repo_id))
    for name in ("config.json", "model.safetensors"):
        assert (hub.repo_dir(repo_id) / name).read_bytes() == (folder / name).read_bytes()
    assert torch.equal(logits(load(repo_id)), logits(model))


def test_publish_again_needs_overwrite(hub, hub_cache, saved, other, repo_id, capsys):
    _, folder = saved
    assert main(["publish", str(folder), repo_id]) == 0
    capsys.readouterr()
    before = (hub.repo_dir(repo_id) / "model.safetensors").read_bytes()

    assert main(["publish", str(other[1]), repo_id]) == 2
    err = capsys.readouterr().err
    assert "overwrite" in err and repo_id in err
    assert (hub.repo_dir(repo_id) / "model.safetensors").read_bytes() == before, "nothing was replaced"

    assert main(["publish", str(other[1]), repo_id, "--overwrite"]) == 0
    replaced = load(repo_id, force_download=True)
    assert torch.equal(logits(replaced), logits(other[0]))


def test_publish_of_a_folder_that_does_not_load_sends_nothing(hub, hub_cache, saved, repo_id, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((saved[1] / "config.json").read_bytes())
    hub.requests.clear()
    assert main(["publish", str(broken), repo_id]) == 2
    assert "model.safetensors" in capsys.readouterr().err
    assert hub.requests.entries() == []
    assert not hub.repo_dir(repo_id).exists()


def test_publish_never_uploads_pickles(hub, hub_cache, saved, repo_id, tmp_path):
    folder = Path(tmp_path / "with-state")
    folder.mkdir()
    for p in saved[1].iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "optimizer.pt").write_bytes(b"not really a pickle")
    assert main(["publish", str(folder), repo_id]) == 0
    files = set(hub.files(repo_id))
    assert "model.safetensors" in files and "optimizer.pt" not in files
