"""Resumable training checkpoints: exact resume, RNG restore, corruption handling, pruning, atomicity."""

import hashlib
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from train import checkpoint
from train.checkpoint import TrainState, latest_checkpoint, load_checkpoint, save_checkpoint

VOCAB, DIM = 16, 8


class TiedLM(torch.nn.Module):
    """Embedding -> dropout -> linear head sharing the embedding matrix."""

    def __init__(self, vocab: int = VOCAB) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, DIM)
        self.drop = torch.nn.Dropout(0.2)
        self.head = torch.nn.Linear(DIM, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.embed(tokens)))  # (batch, seq, vocab)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_run() -> tuple[TiedLM, torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    model = TiedLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return model, optimizer, scheduler


def train(model, optimizer, scheduler, steps: int) -> list[float]:
    """A few steps whose losses depend on the python, numpy and torch RNGs and on the optimizer state."""
    losses = []
    for _ in range(steps):
        tokens = (torch.randint(0, VOCAB, (4, 8)) + random.randrange(VOCAB)) % VOCAB
        logits = model(tokens)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        loss = loss * (1 + 0.1 * float(np.random.rand()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


def save(run_dir: Path, step: int, keep_last: int = 3, **overrides) -> Path:
    model, optimizer, scheduler = make_run()
    kwargs = dict(model=model, optimizer=optimizer, scheduler=scheduler, data_state={"pos": step},
                  config={"name": "tiny"}, metrics={"loss": 1.0 / (step + 1)}, keep_last=keep_last)
    return save_checkpoint(run_dir, step, **{**kwargs, **overrides})


def step_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_resume_gives_bit_identical_losses(tmp_path):
    seed_all(0)
    model, optimizer, scheduler = make_run()
    full = train(model, optimizer, scheduler, 6)

    seed_all(0)
    first = make_run()
    assert train(*first, 3) == full[:3]
    path = save_checkpoint(tmp_path, 3, model=first[0], optimizer=first[1], scheduler=first[2],
                           data_state={"pos": 3}, config={}, metrics={})

    seed_all(123)  # a fresh process: different init, different RNG
    resumed = make_run()
    state = load_checkpoint(path, model=resumed[0], optimizer=resumed[1], scheduler=resumed[2])
    assert state.step == 3
    assert train(*resumed, 3) == full[3:]
    for a, b in zip(model.parameters(), resumed[0].parameters(), strict=True):
        assert torch.equal(a, b)

    seed_all(123)  # control: without the RNG the continuation differs, so the test above is meaningful
    no_rng = make_run()
    load_checkpoint(path, model=no_rng[0], optimizer=no_rng[1], scheduler=no_rng[2], restore_rng=False)
    assert train(*no_rng, 3) != full[3:]


def test_rng_states_are_restored(tmp_path):
    seed_all(7)
    _ = (torch.rand(3), np.random.rand(), random.random())  # move away from the seeded start
    path = save(tmp_path, 1)  # make_run() inside draws from torch RNG *before* the save
    expected = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)])
    seed_all(99)
    load_checkpoint(path, model=TiedLM())
    assert torch.equal(torch.rand(5), expected[0])
    assert np.array_equal(np.random.rand(5), expected[1])
    assert [random.random() for _ in range(5)] == expected[2]


def test_restore_rng_false_leaves_rng_alone(tmp_path):
    path, model = save(tmp_path, 1), TiedLM()
    seed_all(5)
    expected = torch.rand(3)
    seed_all(5)
    load_checkpoint(path, model=model, restore_rng=False)
    assert torch.equal(torch.rand(3), expected)


def test_tied_weights_are_saved_and_stay_tied(tmp_path):
    seed_all(0)
    model = TiedLM()
    path = save(tmp_path, 1, model=model)
    with safe_open(path / "model.safetensors", "pt") as f:
        assert set(f.keys()) == {"embed.weight", "head.weight"}
        assert torch.equal(f.get_tensor("head.weight"), model.embed.weight.detach())
    fresh = TiedLM()
    load_checkpoint(path, model=fresh)
    assert torch.equal(fresh.embed.weight, model.embed.weight)
    assert fresh.head.weight is fresh.embed.weight


def test_state_and_manifest_round_trip(tmp_path):
    path = save(tmp_path, 42, data_state={"shard": 2, "offset": [1, 2]}, config={"lr": 0.1},
                metrics={"loss": 2.5})
    assert path == tmp_path / "checkpoints" / "step-000042"
    assert latest_checkpoint(tmp_path) == path
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt",
                                      "state.json"}
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    state = load_checkpoint(path, model=TiedLM())
    assert state == TrainState(step=42, data_state={"shard": 2, "offset": [1, 2]}, config={"lr": 0.1},
                               metrics={"loss": 2.5}, path=path)


def test_latest_checkpoint_of_empty_run_is_none(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints" / ".tmp-step-000005-1").mkdir(parents=True)
    assert latest_checkpoint(tmp_path) is None


def test_flipped_byte_is_skipped_with_a_warning(tmp_path):
    good, bad = save(tmp_path, 1), save(tmp_path, 2)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"step-000002.*model\.safetensors sha256"):
        assert latest_checkpoint(tmp_path) == good


def test_missing_manifest_is_skipped(tmp_path):
    good, bad = save(tmp_path, 1), save(tmp_path, 2)
    (bad / "manifest.json").unlink()
    with pytest.warns(UserWarning, match=r"step-000002.*manifest\.json is missing"):
        assert latest_checkpoint(tmp_path) == good


def test_truncated_file_is_skipped(tmp_path):
    good, bad = save(tmp_path, 1), save(tmp_path, 2)
    with open(bad / "optimizer.pt", "r+b") as f:
        f.truncate(10)
    with pytest.warns(UserWarning, match=r"step-000002.*optimizer\.pt has 10 bytes"):
        assert latest_checkpoint(tmp_path) == good


def test_leftover_tmp_folder_is_ignored(tmp_path):
    good = save(tmp_path, 1)
    tmp = tmp_path / "checkpoints" / ".tmp-step-000002-99999"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"half")
    assert latest_checkpoint(tmp_path) == good


def test_loading_a_corrupt_checkpoint_names_the_file(tmp_path):
    path = save(tmp_path, 1)
    (path / "rng.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"step-000001.*rng\.pt"):
        load_checkpoint(path, model=TiedLM())


def test_loading_into_a_different_model_names_the_keys(tmp_path):
    path = save(tmp_path, 1)
    with pytest.raises(ValueError, match=r"embed\.weight: file has shape \(16, 8\), model expects \(32, 8\)"):
        load_checkpoint(path, model=TiedLM(vocab=32))
    with pytest.raises(ValueError, match=r"missing keys \['weight'\].*unexpected keys \['embed\.weight'"):
        load_checkpoint(path, model=torch.nn.Linear(2, 2, bias=False))


def test_keep_last_keeps_the_newest(tmp_path):
    for step in range(1, 6):
        save(tmp_path, step, keep_last=2)
    assert step_names(tmp_path) == ["step-000004", "step-000005"]


def test_keep_last_counts_only_valid_checkpoints(tmp_path):
    save(tmp_path, 1, keep_last=2)
    bad = save(tmp_path, 2, keep_last=2)
    (bad / "manifest.json").unlink()
    save(tmp_path, 3, keep_last=2)
    assert step_names(tmp_path) == ["step-000001", "step-000002", "step-000003"]


def test_saving_an_existing_step_raises_and_keeps_the_old_bytes(tmp_path):
    path = save(tmp_path, 1)
    before = tree_bytes(path)
    with pytest.raises(FileExistsError, match="step-000001"):
        save(tmp_path, 1, metrics={"loss": 123.0})
    assert tree_bytes(path) == before
    assert step_names(tmp_path) == ["step-000001"]


def test_crash_mid_save_leaves_previous_checkpoint_latest(tmp_path, monkeypatch):
    good = save(tmp_path, 1)
    real_save, calls = torch.save, []

    def crash_after_first(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) > 1:
            raise OSError("disk full")
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", crash_after_first)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, 2)
    monkeypatch.undo()
    assert len(calls) == 2  # rng.pt written, then the crash
    assert step_names(tmp_path) == ["step-000001"]  # no final folder, temp folder cleaned up
    assert latest_checkpoint(tmp_path) == good
    retry = save(tmp_path, 2)  # the failed attempt does not block a retry
    assert latest_checkpoint(tmp_path) == retry


def test_stale_tmp_folders_are_removed_fresh_ones_kept(tmp_path):
    root = tmp_path / "checkpoints"
    stale, fresh = root / ".tmp-step-000007-11111", root / ".tmp-step-000009-22222"
    for folder in (stale, fresh):
        folder.mkdir(parents=True)
    old, future = time.time() - 3600, time.time() + 3600
    os.utime(stale, (old, old))
    os.utime(fresh, (future, future))
    save(tmp_path, 8)
    assert step_names(tmp_path) == [".tmp-step-000009-22222", "step-000008"]


def test_cuda_rng_of_another_machine_is_reported_not_silently_dropped(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(checkpoint.torch.cuda, "device_count", lambda: 2)
    fake_states = [torch.zeros(16, dtype=torch.uint8)] * 2
    monkeypatch.setattr(checkpoint.torch.cuda, "get_rng_state_all", lambda: fake_states)
    path = save(tmp_path, 1)
    monkeypatch.undo()
    if torch.cuda.device_count() == 2:
        pytest.skip("this machine has exactly the 2 CUDA devices the fake checkpoint claims")
    with pytest.warns(UserWarning, match="2 CUDA RNG states"):
        load_checkpoint(path, model=TiedLM())
