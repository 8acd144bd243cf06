"""The trainer, `zoo eval` and the SAE data on the model's own tokenizer: token caches per tokenizer, bits per
byte, checkpoints that carry the tokenizer, the interleaved validation split and how resumed runs keep theirs."""

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizer_fixtures import SENTENCES, bpe_tokenizer

import zoo
from train.config import parse_args
from train.data import SEPARATOR, TokenData, load_token_data, validation_blocks
from train.evaluate import evaluate_lm
from train.trainer import Trainer
from zoo.tokenizer import ByteTokenizer, byte_level_tokenizer, load_tokenizer, save_tokenizer

TINY = ["--set", "d_model=32", "--set", "n_layers=1", "--set", "n_heads=2", "--seq-len", "16",
        "--batch-size", "4", "--eval-batches", "2", "--warmup-steps", "1"]
ASCII = [s for s in SENTENCES if s.isascii()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A JSONL corpus of ASCII sentences (decoding any run of its tokens gives back its bytes exactly)."""
    path = tmp_path_factory.mktemp("corpus") / "c.jsonl"
    path.write_text("".join(json.dumps({"text": f"{s} ({i})"}) + "\n" for i, s in enumerate(ASCII * 10)))
    return path


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory) -> Path:
    """A fresh zoo LM of vocab_size 400 saved with a trained BPE tokenizer: a model that is not byte-level."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("bpe-model") / "lm"
    zoo.load("lm-dense-tiny", d_model=32, n_layers=1, n_heads=2, vocab_size=400).save_pretrained(folder)
    save_tokenizer(bpe_tokenizer(), folder)
    return folder


def run_config(model: str, out: Path, *args):
    return parse_args([model, *TINY, "--out", str(out), *args])


# ---- the validation split --------------------------------------------------------------------------------

def _block_ids(d: TokenData, batches) -> list[int]:
    return [int(row[0]) // d.block_len for batch in batches for row in batch]


@pytest.mark.parametrize("n_tokens", [8 * 20, 8 * 97 + 5, 8 * 400])
def test_validation_blocks_never_overlap_training_blocks_and_do_not_depend_on_the_seed(n_tokens):
    d = TokenData(np.arange(n_tokens, dtype=np.int64), seq_len=7, val_fraction=0.05)
    val = _block_ids(d, d.val_batches(3))
    blocks = n_tokens // 8
    assert len(val) == max(1, blocks // 20) and len(set(val)) == len(val)
    for seed in (0, 1, 7):  # one epoch of training batches visits exactly the other blocks, whatever the seed
        train = _block_ids(d, [d.train_batch(s, 1, seed=seed) for s in range(d.num_train_blocks)])
        assert sorted(train) == sorted(set(range(blocks)) - set(val))
    if blocks >= 20:
        assert val == list(range(19, blocks, 20))  # every 20th block: spread over the corpus, not its tail


def test_a_block_is_held_out_by_its_index_alone():
    # the same block index is held out in a short and a long corpus: the split is fixed across corpora lengths
    short, long = set(validation_blocks(100, 0.1)), set(validation_blocks(1000, 0.1))
    assert short == {i for i in long if i < 100} and len(long) == 100
    assert list(validation_blocks(10, 1 / 3)) == [2, 5, 8]  # floor((i+1)/3) > floor(i/3)
    assert list(validation_blocks(50, 0.05, "tail")) == [48, 49]


def test_the_bundled_corpus_validation_comes_from_all_of_it(tmp_path):
    d = load_token_data(seq_len=64, cache_dir=tmp_path)
    val = d.val_index
    blocks = d.num_train_blocks + d.num_val_blocks
    assert val[0] < blocks * 0.01 and val[-1] > blocks * 0.99  # the lexicon's first entries and its last
    tail = load_token_data(seq_len=64, cache_dir=tmp_path, val_split="tail")
    assert tail.num_val_blocks == d.num_val_blocks and tail.val_index[0] == blocks - d.num_val_blocks


# ---- token caches and tokenizers -------------------------------------------------------------------------

def test_two_tokenizers_never_share_a_token_cache(corpus, tmp_path):
    a, b = bpe_tokenizer(), bpe_tokenizer(vocab_size=380)
    a.name_or_path = b.name_or_path = "the/same-name"  # what the old cache key used
    with_a = load_token_data(str(corpus), seq_len=16, cache_dir=tmp_path, tokenizer=a)
    with_b = load_token_data(str(corpus), seq_len=16, cache_dir=tmp_path, tokenizer=b)
    assert with_a.cache_path != with_b.cache_path
    text = SEPARATOR.join(json.loads(line)["text"] for line in corpus.read_text().splitlines())
    assert with_a.tokens.tolist() == a.encode(text) and with_b.tokens.tolist() == b.encode(text)
    assert with_a.tokens.dtype == np.uint16
    # the byte tokenizer in either form gives the same ids: one cache, one uint8 array
    plain = load_token_data(str(corpus), seq_len=16, cache_dir=tmp_path, tokenizer=ByteTokenizer())
    fast = load_token_data(str(corpus), seq_len=16, cache_dir=tmp_path, tokenizer=byte_level_tokenizer())
    assert plain.cache_path == fast.cache_path and bytes(plain.tokens) == text.encode()


# ---- bits per byte ---------------------------------------------------------------------------------------

def _independent_loss(model, d: TokenData, batch_size: int, max_batches: int) -> float:
    total = 0.0
    for i, batch in enumerate(d.val_batches(batch_size)):
        if i >= max_batches:
            break
        with torch.no_grad():
            logits = model(input_ids=batch[:, :-1]).logits
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), batch[:, 1:].reshape(-1),
                                       reduction="sum"))
    return total


def test_bits_per_byte_of_the_byte_tokenizer_is_the_loss_over_ln2(tmp_path):
    torch.manual_seed(0)
    model = zoo.load("lm-dense-tiny", d_model=32, n_layers=1, n_heads=2)
    d = load_token_data(seq_len=32, cache_dir=tmp_path)
    result = evaluate_lm(model, d, 4, 3)
    assert result["val_bpb"] == pytest.approx(result["val_loss"] / math.log(2), rel=1e-12)
    assert result["val_bytes"] == result["val_tokens"] == 3 * 4 * 32


def test_bits_per_byte_of_a_bpe_model_counts_the_bytes_of_the_text(bpe_model, corpus, tmp_path):
    model, tok = zoo.load(bpe_model), load_tokenizer(bpe_model)
    d = load_token_data(str(corpus), seq_len=16, cache_dir=tmp_path, tokenizer=tok, val_fraction=0.25)
    result = evaluate_lm(model, d, 4, 2)
    # independent: the bytes of the decoded targets (ASCII text: decoding is exact) and F.cross_entropy
    targets = [row[1:].tolist() for batch in list(d.val_batches(4))[:2] for row in batch]
    n_bytes = sum(len(tok.decode(t).encode("utf-8")) for t in targets)
    assert n_bytes > 1.5 * result["val_tokens"]  # BPE tokens stand for several bytes each
    assert result["val_bytes"] == n_bytes
    nats = _independent_loss(model, d, 4, 2)
    assert result["val_bpb"] == pytest.approx(nats / (math.log(2) * n_bytes), rel=1e-5)
    assert result["val_loss"] == pytest.approx(nats / result["val_tokens"], rel=1e-5)


# ---- the trainer on the model's tokenizer ----------------------------------------------------------------

def test_the_trainer_uses_the_model_tokenizer_and_its_checkpoints_carry_it(bpe_model, corpus, tmp_path):
    from transformers import AutoTokenizer

    tok = bpe_tokenizer()
    cfg = run_config(str(bpe_model), tmp_path / "run", "--data", str(corpus), "--steps", "3", "--eval-every", "3",
                     "--checkpoint-every", "3")
    trainer = Trainer(cfg)
    text = SEPARATOR.join(json.loads(line)["text"] for line in corpus.read_text().splitlines())
    assert trainer.task.data.tokens.tolist() == tok.encode(text)  # BPE ids (up to 399), not bytes
    summary = trainer.run()
    final = Path(summary["final"])
    assert AutoTokenizer.from_pretrained(final).encode(SENTENCES[3]) == tok.encode(SENTENCES[3])
    step = tmp_path / "run" / "checkpoints" / "step-000003"
    assert "tokenizer.json" in json.loads((step / "manifest.json").read_text())["files"]
    assert load_tokenizer(step).encode(SENTENCES[0]) == tok.encode(SENTENCES[0])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = next(r for r in records if "val_loss" in r)
    assert val["val_bpb"] < val["val_loss"] / math.log(2)  # more than one byte per token
    assert "val_bpb" in (final / "README.md").read_text()


def test_a_byte_level_run_writes_the_byte_tokenizer(tmp_path):
    summary = Trainer(run_config("lm-dense-tiny", tmp_path / "run", "--steps", "2", "--eval-every", "2")).run()
    final = Path(summary["final"])
    loaded = load_tokenizer(final)
    assert loaded.encode("hé 🙂") == list("hé 🙂".encode())
    assert summary["val_bpb"] == pytest.approx(summary["val_loss"] / math.log(2), rel=1e-12)


def test_a_model_smaller_than_its_tokenizer_is_refused(tmp_path, capsys):
    from zoo.cli import main

    folder = tmp_path / "small-vocab"
    zoo.load("lm-dense-tiny", d_model=32, n_layers=1, n_heads=2).save_pretrained(folder)  # vocab_size 256
    save_tokenizer(bpe_tokenizer(), folder)  # 400 ids
    code = main(["train", str(folder), *TINY, "--steps", "1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "ids up to 399" in err and "vocab_size is 256" in err and "Traceback" not in err
    assert main(["eval", str(folder), "--max-batches", "1", "--seq-len", "16"]) == 2
    assert "vocab_size is 256" in capsys.readouterr().err


def test_zoo_eval_reports_bits_per_byte_with_the_model_tokenizer(bpe_model, corpus, capsys):
    from zoo.cli import main

    assert main(["eval", str(bpe_model), "--data", str(corpus), "--seq-len", "16", "--batch-size", "4",
                 "--max-batches", "2", "--val-fraction", "0.25"]) == 0
    out = json.loads(capsys.readouterr().out)
    model, tok = zoo.load(bpe_model), bpe_tokenizer()
    d = load_token_data(str(corpus), seq_len=16, tokenizer=tok, val_fraction=0.25)
    expected = evaluate_lm(model, d, 4, 2)
    assert out["val_bpb"] == pytest.approx(expected["val_bpb"]) and out["val_loss"] == pytest.approx(
        expected["val_loss"])
    assert out["val_split"] == "interleaved" and out["tokenizer"] != "byte"


# ---- resuming keeps the split ----------------------------------------------------------------------------

def _make_old(run: Path) -> None:
    """Make a run's checkpoints look written before val_split existed (they held out the tail)."""
    for state in run.glob("checkpoints/step-*/state.json"):
        saved = json.loads(state.read_text())
        del saved["config"]["train"]["val_split"]
        state.write_text(json.dumps(saved))
        manifest = state.parent / "manifest.json"
        entries = json.loads(manifest.read_text())
        entries["files"]["state.json"] = {"bytes": state.stat().st_size,
                                          "sha256": hashlib.sha256(state.read_bytes()).hexdigest()}
        manifest.write_text(json.dumps(entries))


def test_resuming_keeps_the_run_split_and_an_old_run_keeps_the_tail(tmp_path):
    run = tmp_path / "run"
    first = run_config("lm-dense-tiny", run, "--steps", "2", "--checkpoint-every", "2", "--eval-every", "2")
    Trainer(first).run()
    resumed = Trainer(run_config("lm-dense-tiny", run, "--steps", "3", "--resume", str(run), "--eval-every", "3"))
    assert resumed.cfg.val_split == "interleaved" and resumed.task.data.val_split == "interleaved"
    resumed.close()

    _make_old(run)
    old = Trainer(run_config("lm-dense-tiny", run, "--steps", "3", "--resume", str(run), "--eval-every", "3"))
    assert old.cfg.val_split == "tail"
    d = old.task.data
    assert list(d.val_index) == list(range(d.num_train_blocks, d.num_train_blocks + d.num_val_blocks))
    old.run()
    assert json.loads((run / "train_config.json").read_text())["val_split"] == "tail"


def test_resuming_an_old_run_with_the_interleaved_split_is_refused_naming_it(tmp_path):
    run = tmp_path / "run"
    Trainer(run_config("lm-dense-tiny", run, "--steps", "2", "--checkpoint-every", "2", "--eval-every", "2")).run()
    _make_old(run)
    again = ["--steps", "3", "--resume", str(run), "--val-split", "interleaved"]
    with pytest.raises(ValueError, match=r"--val-split 'tail' -> 'interleaved'.*--allow-change val_split"):
        Trainer(run_config("lm-dense-tiny", run, *again))
    allowed = Trainer(run_config("lm-dense-tiny", run, *again, "--allow-change", "val_split", "--eval-every", "3"))
    assert allowed.task.data.val_split == "interleaved"
    allowed.run()
    changes = json.loads((run / "train_config.json").read_text())["changes_on_resume"]
    assert changes[-1]["changed"]["val_split"] == {"old": "tail", "new": "interleaved"}


def test_changing_the_text_column_on_resume_is_refused(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"first {i} " * 8, "body": f"second {i} " * 8}) + "\n"
                            for i in range(40)))
    run = tmp_path / "run"
    Trainer(run_config("lm-dense-tiny", run, "--steps", "2", "--data", str(data), "--eval-every", "2",
                       "--checkpoint-every", "2")).run()
    with pytest.raises(ValueError, match=r"--text-column 'text' -> 'body'"):
        Trainer(run_config("lm-dense-tiny", run, "--steps", "3", "--data", str(data), "--text-column", "body",
                           "--resume", str(run)))


def test_help_explains_the_data_flags(capsys):
    from zoo.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--data-config", "--split", "--streaming", "--text-column", "--val-split"):
        assert flag in text
    assert "interleaved" in text and "tail" in text and "only the tokens the run needs" in text
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(flag in text for flag in ("--text-column", "--val-split", "--split", "--streaming"))


def test_the_sae_data_reads_the_text_column_and_records_the_split(source_lm, tmp_path):
    from train.sae_task import SAEData

    data = tmp_path / "d.jsonl"
    docs = [f"the body of document {i}, long enough to fill blocks" for i in range(30)]
    data.write_text("".join(json.dumps({"title": "t", "body": d}) + "\n" for d in docs))
    sae_data = SAEData(str(source_lm), "blocks.1", [str(data)], 32, text_column="body")
    assert bytes(sae_data.data.tokens) == SEPARATOR.join(docs).encode()
    assert sae_data.identity["val_split"] == "interleaved"
    tail = SAEData(str(source_lm), "blocks.1", [str(data)], 32, text_column="body", val_split="tail")
    assert tail.identity != sae_data.identity  # another split: another activation cache


def test_zoo_convert_evaluates_with_the_model_tokenizer_and_writes_it(bpe_model, tmp_path, capsys):
    from zoo.cli import main

    out = tmp_path / "converted"
    assert main(["convert", str(bpe_model), "--to", "moe", "--experts", "2", "--eval-batches", "2",
                 "--seq-len", "16", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    tok = bpe_tokenizer()
    d = load_token_data(seq_len=16, tokenizer=tok)  # the bundled corpus, in the model's BPE tokens
    expected = evaluate_lm(zoo.load(bpe_model), d, 16, 2)
    assert report["val_loss_before"] == pytest.approx(expected["val_loss"], rel=1e-5)
    assert report["val_bpb_before"] == pytest.approx(expected["val_bpb"], rel=1e-5)
    assert load_tokenizer(out).encode(SENTENCES[3]) == tok.encode(SENTENCES[3])
    assert "val bpb after" in (out / "README.md").read_text()


def test_an_sae_source_lm_brings_its_tokenizer(bpe_model, corpus):
    from train.sae_task import SAEData

    sae_data = SAEData(str(bpe_model), "blocks.0", [str(corpus)], 16)
    text = SEPARATOR.join(json.loads(line)["text"] for line in corpus.read_text().splitlines())
    assert sae_data.data.tokens.tolist() == bpe_tokenizer().encode(text)
    assert sae_data.data.tokens.max() >= 256  # BPE ids, not bytes
    store = sae_data.val_store(32)
    assert store.rows == 32 and store.d == 32
