"""--force-download on every command that loads a Hub checkpoint (zoo eval / train / convert), and the
hint for Python users of zoo.load: a damaged cache is repaired by fetching it again (issue 16 item 13)."""

import uuid

import pytest
import torch

from zoo.cli import main


@pytest.fixture
def published_lm(hub, tmp_path):
    from zoo import load

    repo_id = f"zoo-tests/fd-{uuid.uuid4().hex[:8]}"
    torch.manual_seed(0)
    load("lm-dense-tiny", n_layers=1, d_model=32).save_pretrained(tmp_path / "lm")
    hub.add_repo(repo_id, tmp_path / "lm")
    return repo_id


def damage_the_cached_weights(cache) -> None:
    (path,) = cache.rglob("snapshots/*/model.safetensors")
    with open(path, "r+b") as f:  # follows the snapshot's link into the blob store
        f.truncate(100)


SMALL = ["--seq-len", "16", "--batch-size", "2"]
COMMANDS = {
    "eval": lambda out: ["eval", *SMALL, "--max-batches", "1"],
    "train": lambda out: ["train", *SMALL, "--steps", "1", "--eval-batches", "1", "--out", str(out)],
    "convert": lambda out: ["convert", "--to", "moe", "--experts", "2", "--eval-batches", "1", "--seq-len", "16",
                            "--out", str(out)],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_damaged_cache_names_force_download_which_repairs_it(hub, hub_cache, published_lm, command, tmp_path,
                                                               capsys):
    name, *flags = COMMANDS[command](tmp_path / "first")
    assert main([name, published_lm, *flags]) == 0
    damage_the_cached_weights(hub_cache)
    capsys.readouterr()
    name, *flags = COMMANDS[command](tmp_path / "second")
    assert main([name, published_lm, *flags]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "--force-download" in err and "Traceback" not in err
    name, *flags = COMMANDS[command](tmp_path / "third")
    assert main([name, published_lm, *flags, "--force-download"]) == 0


def test_zoo_load_of_a_damaged_cached_checkpoint_says_force_download_in_python(hub, hub_cache, published_lm):
    from zoo import load

    load(published_lm)
    damage_the_cached_weights(hub_cache)
    with pytest.raises(ValueError, match=r"model\.safetensors(.|\n)*force_download=True"):
        load(published_lm)
    assert load(published_lm, force_download=True) is not None
