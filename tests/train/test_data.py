"""Tests of the trainer's data pipeline: loading, caching, packing, deterministic batches and errors."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest
import torch

from train import data as data_mod
from train.data import BUNDLED_CORPUS, SEPARATOR, TokenData, load_token_data
from zoo.tokenizer import ByteTokenizer


@pytest.fixture(autouse=True)
def _no_home_cache(tmp_path, monkeypatch):
    """Anything that falls back to the default cache dir lands in tmp_path, not ~/.cache."""
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "zoo_cache"))


@pytest.fixture(scope="module")
def bundled(tmp_path_factory) -> TokenData:
    return load_token_data(seq_len=64, cache_dir=tmp_path_factory.mktemp("cache"))


def _stream(n: int, val_split: str = "interleaved") -> TokenData:
    """TokenData over the tokens 0..n-1 (as int64, so every token says where it sits in the stream)."""
    return TokenData(np.arange(n, dtype=np.int64), seq_len=7, val_fraction=0.25, val_split=val_split)


def _text(ids: torch.Tensor) -> str:
    return ByteTokenizer().decode(ids)


def test_bundled_corpus_first_block_is_the_jargon_file(bundled):
    with gzip.open(BUNDLED_CORPUS, "rb") as f:
        raw = f.read()
    first = bundled.tokens[: bundled.block_len]
    assert bytes(first) == raw[: bundled.block_len]
    assert "The Jargon File" in _text(torch.from_numpy(np.array(first)))
    assert len(bundled.tokens) == len(raw)
    assert bundled.tokens.dtype == np.uint8
    blocks = len(raw) // bundled.block_len
    assert bundled.num_train_blocks + bundled.num_val_blocks == blocks
    assert bundled.num_val_blocks == int(blocks * 0.05)


def test_batch_rows_are_train_blocks_of_the_stream(bundled):
    x = bundled.train_batch(step=3, batch_size=4)
    assert x.dtype == torch.long and x.shape == (4, 65)
    blocks = np.asarray(bundled.tokens[: (bundled.num_train_blocks + bundled.num_val_blocks) * 65]).reshape(-1, 65)
    train_blocks = blocks[[i for i in range(len(blocks)) if (i + 1) % 20]]  # every 20th block is held out
    for row in x.numpy():
        assert np.all(train_blocks == row, axis=1).any()
    assert bundled.tokens_per_step(4) == 4 * 64


def test_targets_are_inputs_shifted_by_one():
    x = _stream(400).train_batch(2, 5)
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)


def test_batches_are_a_pure_function_of_seed_and_step(bundled, tmp_path):
    a = bundled.train_batch(5, 8, seed=1)
    assert torch.equal(a, bundled.train_batch(5, 8, seed=1))
    assert not torch.equal(a, bundled.train_batch(6, 8, seed=1))
    assert not torch.equal(a, bundled.train_batch(5, 8, seed=2))
    bundled.train_batch(10_000, 8, seed=1)  # move the permutation cache to another epoch and back
    fresh = load_token_data(seq_len=64, cache_dir=tmp_path)
    assert torch.equal(a, fresh.train_batch(5, 8, seed=1))


def test_ranks_split_the_global_batch():
    d = _stream(400)
    whole = d.train_batch(7, 6, seed=3)
    parts = [d.train_batch(7, 6, seed=3, rank=r, world_size=2) for r in range(2)]
    assert all(p.shape == (3, 8) for p in parts)
    assert torch.equal(torch.cat(parts), whole)


def test_batch_size_not_divisible_by_world_size_names_both():
    with pytest.raises(ValueError, match=r"batch_size=5.*world_size=2"):
        _stream(400).train_batch(0, 5, world_size=2)


@pytest.mark.parametrize(("val_split", "expected_val"), [
    ("interleaved", [3, 7, 11, 15, 19, 23, 27, 31, 35, 39, 43, 47]),  # every 4th block at val_fraction 0.25
    ("tail", list(range(38, 50))),  # the split of runs made before the interleaved one
])
def test_train_and_val_blocks_are_disjoint_and_tile_the_stream(val_split, expected_val):
    d = _stream(403, val_split)  # 50 blocks of 8, 3 tail tokens dropped
    assert (d.num_train_blocks, d.num_val_blocks) == (38, 12)
    train = torch.cat([d.train_batch(0, d.num_train_blocks)])
    val = torch.cat(list(d.val_batches(5)))
    assert [len(v) for v in d.val_batches(5)] == [5, 5, 2]
    # every block is 8 consecutive stream positions starting at a multiple of 8
    for block in torch.cat([train, val]):
        assert block[0] % 8 == 0 and torch.equal(block, block[0] + torch.arange(8))
    train_starts = set((train[:, 0] // 8).tolist())
    val_starts = (val[:, 0] // 8).tolist()
    assert val_starts == expected_val and train_starts == set(range(50)) - set(expected_val)
    assert torch.equal(val, torch.cat(list(d.val_batches(5))))  # same order every time


def test_an_epoch_visits_every_train_block_once_then_reshuffles():
    d = _stream(8 * 40, "tail")  # 30 train blocks, the first 30 of the stream
    assert d.num_train_blocks == 30
    # batches of 4 cross the epoch boundary inside step 7 (samples 28..31)
    samples = torch.cat([d.train_batch(s, 4, seed=9) for s in range(15)])[:, 0] // 8
    first, second = samples[:30].tolist(), samples[30:60].tolist()
    assert sorted(first) == list(range(30)) and sorted(second) == list(range(30))
    assert first != second
    assert first == np.random.default_rng([9, 0]).permutation(30).tolist()


def _write(path, kind: str, docs: list[str]) -> None:
    if kind == "txt":
        path.write_text(docs[0], encoding="utf-8")
    elif kind == "jsonl":
        path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    else:
        pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
        pq.write_table(pa.table({"text": docs, "id": list(range(len(docs)))}), path)


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_local_files_load(tmp_path, kind):
    many = ["alpha " * 5, "beta β " * 4, "gamma"]
    docs = ["one document, naïve café ünïcode. " * 3] if kind == "txt" else many
    path = tmp_path / f"corpus.{kind}"
    _write(path, kind, docs)
    d = load_token_data(str(path), seq_len=4, cache_dir=tmp_path / "cache", val_fraction=0.3)
    expected = SEPARATOR.join(docs).encode("utf-8")
    assert bytes(d.tokens) == expected
    blocks = torch.cat([d.train_batch(0, d.num_train_blocks)] + list(d.val_batches(100)))
    assert sorted(bytes(b.tolist()) for b in blocks) == sorted(
        expected[i * 5:(i + 1) * 5] for i in range(len(expected) // 5))


def test_glob_and_list_sources_join_files_in_order(tmp_path):
    for name, text in [("b.txt", "second file"), ("a.txt", "first file"), ("c.jsonl", None)]:
        if text:
            (tmp_path / name).write_text(text)
    _write(tmp_path / "c.jsonl", "jsonl", ["third"])
    d = load_token_data(str(tmp_path / "*.txt"), seq_len=2, cache_dir=tmp_path / "cache")
    assert bytes(d.tokens).decode() == f"first file{SEPARATOR}second file"
    d = load_token_data([tmp_path / "b.txt", tmp_path / "c.jsonl"], seq_len=2, cache_dir=tmp_path / "cache")
    assert bytes(d.tokens).decode() == f"second file{SEPARATOR}third"


def test_cache_is_reused_then_invalidated_when_the_file_changes(tmp_path, monkeypatch):
    path = tmp_path / "c.txt"
    path.write_text("one two three four five six seven eight nine ten")
    first = load_token_data(str(path), seq_len=4, cache_dir=tmp_path / "cache")
    mtime = os.stat(first.cache_path).st_mtime_ns

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(data_mod, "_tokenize", no_tokenizing)
    second = load_token_data(str(path), seq_len=8, cache_dir=tmp_path / "cache")
    assert second.cache_path == first.cache_path and os.stat(second.cache_path).st_mtime_ns == mtime
    assert bytes(second.tokens) == path.read_bytes()
    monkeypatch.undo()

    path.write_text("completely different words here, and more of them")
    third = load_token_data(str(path), seq_len=4, cache_dir=tmp_path / "cache")
    assert third.cache_path != first.cache_path
    assert bytes(third.tokens) == path.read_bytes()
    assert not list((tmp_path / "cache").glob("*.tmp"))


class _WordTokenizer:
    """A toy tokenizer with a vocabulary too large for uint8: one id per character, offset by 300."""

    vocab_size = 600

    def encode(self, text: str) -> list[int]:
        return [300 + min(ord(c), 299) for c in text]


def test_other_tokenizers_get_their_own_cache_and_a_wide_enough_dtype(tmp_path):
    path = tmp_path / "c.jsonl"
    _write(path, "jsonl", ["abc", "de"])
    as_bytes = load_token_data(str(path), seq_len=2, cache_dir=tmp_path)
    as_words = load_token_data(str(path), seq_len=2, cache_dir=tmp_path, tokenizer=_WordTokenizer())
    assert as_words.cache_path != as_bytes.cache_path
    assert as_words.tokens.dtype == np.uint16
    assert as_words.tokens.tolist() == _WordTokenizer().encode(f"abc{SEPARATOR}de")


def test_a_corrupt_cache_file_is_not_trusted(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("some text long enough for two blocks")
    d = load_token_data(str(path), seq_len=4, cache_dir=tmp_path / "cache")
    d.cache_path.write_bytes(d.cache_path.read_bytes()[:20])
    again = load_token_data(str(path), seq_len=4, cache_dir=tmp_path / "cache")
    assert bytes(again.tokens) == path.read_bytes()


def test_missing_path_and_empty_glob_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_token_data(str(tmp_path / "nope.txt"), cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"\*\.parquet"):
        load_token_data(str(tmp_path / "*.parquet"), cache_dir=tmp_path)


def test_unsupported_extension_lists_the_supported_ones(tmp_path):
    (tmp_path / "c.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"c\.csv.*\.txt.*\.jsonl.*\.parquet"):
        load_token_data(str(tmp_path / "c.csv"), cache_dir=tmp_path)


def test_missing_text_column_lists_the_columns(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "hello", "title": "t"}) + "\n")
    with pytest.raises(ValueError, match=r"'text'.*body.*title"):
        load_token_data(str(tmp_path / "c.jsonl"), cache_dir=tmp_path)


def test_empty_corpus_is_an_error(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(ValueError, match="empty"):
        load_token_data(str(tmp_path / "c.jsonl"), cache_dir=tmp_path)


def test_too_short_corpus_gives_token_counts(tmp_path):
    (tmp_path / "c.txt").write_text("x" * 19)
    with pytest.raises(ValueError, match=r"19 tokens.*at least 20"):
        load_token_data(str(tmp_path / "c.txt"), seq_len=9, cache_dir=tmp_path)
    assert load_token_data(str(tmp_path / "c.txt"), seq_len=8, cache_dir=tmp_path).num_train_blocks == 1


def test_seq_len_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="seq_len"):
        load_token_data(seq_len=0, cache_dir=tmp_path)


def test_unreachable_hub_dataset_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(RuntimeError, match=r"no-such-org/no-such-dataset.*HF_HUB_OFFLINE"):
        load_token_data("no-such-org/no-such-dataset", cache_dir=tmp_path)
