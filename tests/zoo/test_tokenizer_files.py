"""Checkpoints carry their tokenizer: the byte tokenizer as a `tokenizers` byte-level tokenizer that equals
ByteTokenizer exactly, load_tokenizer for every kind of model source, and the byte counts behind bits per byte."""

import json
import uuid

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizer_fixtures import SENTENCES, bpe_tokenizer, wordpiece_tokenizer

import zoo
from zoo.generation import generate_text
from zoo.tokenizer import (
    ByteTokenizer,
    byte_level_tokenizer,
    check_vocab,
    is_byte_tokenizer,
    load_tokenizer,
    save_tokenizer,
    text_bytes,
    token_byte_lengths,
    tokenizer_id,
)

BYTE = ByteTokenizer()


@pytest.fixture(scope="module")
def fast():
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def zoo_folder(tmp_path_factory):
    """A zoo LM checkpoint with the byte tokenizer saved beside it (as the trainer writes it)."""
    torch.manual_seed(0)
    model = zoo.load("lm-dense-tiny", n_layers=1, d_model=32, n_heads=2)
    folder = tmp_path_factory.mktemp("ckpt") / "lm"
    model.save_pretrained(folder)
    written = save_tokenizer(BYTE, folder, model_max_length=model.config.max_seq_len)
    return model, folder, written


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory):
    """A folder holding a real (trained) BPE tokenizer, as a transformers checkpoint carries it."""
    folder = tmp_path_factory.mktemp("bpe") / "tok"
    tok = bpe_tokenizer()
    tok.save_pretrained(folder)
    return tok, folder


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_level_tokenizer_gives_the_utf8_bytes_of_any_text(fast, text):
    assert fast.encode(text) == list(text.encode("utf-8")) == BYTE.encode(text)
    assert fast.decode(fast.encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 255), max_size=40))
def test_byte_level_decoding_equals_byte_tokenizer_on_any_bytes(fast, ids):
    # invalid UTF-8 (lone continuation bytes, cut sequences) -> U+FFFD, exactly as bytes.decode(errors="replace")
    expected = bytes(ids).decode("utf-8", errors="replace")
    assert BYTE.decode(ids) == expected
    assert fast.decode(ids) == expected


def test_byte_level_tokenizer_has_no_special_tokens_and_256_ids(fast):
    assert fast.vocab_size == len(fast) == BYTE.vocab_size == 256
    assert fast.all_special_ids == [] and fast.eos_token_id is None and fast.bos_token_id is None
    assert fast("ab")["input_ids"] == [97, 98]  # no BOS / EOS added, as ByteTokenizer
    assert fast.convert_ids_to_tokens([32, 10, 255]) == ["Ġ", "Ċ", "ÿ"]  # GPT-2's bytes-to-unicode order


def test_a_saved_checkpoint_opens_with_auto_tokenizer_and_pipeline(zoo_folder):
    from transformers import AutoTokenizer, pipeline

    model, folder, written = zoo_folder
    assert set(written) >= {"tokenizer.json", "tokenizer_config.json"}
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    tok = AutoTokenizer.from_pretrained(folder)
    text = "naïve café 🙂\n\nhacker"
    assert tok.encode(text) == list(text.encode()) and tok.model_max_length == model.config.max_seq_len
    pipe = pipeline("text-generation", model=str(folder))
    out = pipe("The hacker", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert out == generate_text(model, "The hacker", max_new_tokens=8, greedy=True)


def test_load_tokenizer_of_each_kind_of_source(zoo_folder, bpe_folder, tmp_path):
    _, folder, _ = zoo_folder
    assert isinstance(load_tokenizer("lm-dense-tiny"), ByteTokenizer)  # a catalog name
    from_folder = load_tokenizer(folder)
    assert not isinstance(from_folder, ByteTokenizer) and is_byte_tokenizer(from_folder)
    bare = tmp_path / "old"  # a zoo checkpoint written before checkpoints carried a tokenizer
    bare.mkdir()
    (bare / "config.json").write_text((folder / "config.json").read_text())
    assert isinstance(load_tokenizer(bare), ByteTokenizer)
    tok, tok_folder = bpe_folder
    loaded = load_tokenizer(tok_folder)
    assert loaded.encode(SENTENCES[3]) == tok.encode(SENTENCES[3]) and len(loaded) == len(tok)
    assert loaded.eos_token == "<|endoftext|>"


def test_load_tokenizer_refuses_what_it_cannot_read(tmp_path):
    foreign = tmp_path / "foreign"  # a transformers folder of another architecture, without tokenizer files
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="no tokenizer files"):
        load_tokenizer(foreign)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    (broken / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    with pytest.raises(ValueError, match="broken"):
        load_tokenizer(broken)
    with pytest.raises(ValueError, match="not a model folder"):
        load_tokenizer("no such thing")


def test_remote_code_in_tokenizer_config_is_never_run(tmp_path, bpe_folder):
    _, tok_folder = bpe_folder
    folder = tmp_path / "remote"
    folder.mkdir()
    for p in tok_folder.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    marker = tmp_path / "ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nclass Evil: pass\n")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="Evil", auto_map={"AutoTokenizer": ["evil.Evil", None]})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    try:
        load_tokenizer(folder)
    except ValueError:
        pass  # refusing is fine; running the file is not
    assert not marker.exists()


def test_load_tokenizer_of_a_hub_repo_through_the_loopback_hub(hub, hub_cache, bpe_folder, tmp_path):
    tok, tok_folder = bpe_folder
    repo = f"zoo-tests/tok-{uuid.uuid4().hex[:8]}"
    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    for p in tok_folder.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "model.safetensors").write_bytes(b"not fetched for a tokenizer")
    hub.add_repo(repo, folder)
    hub.requests.clear()
    loaded = load_tokenizer(repo)
    assert loaded.encode(SENTENCES[0]) == tok.encode(SENTENCES[0])
    fetched = [path for method, path in hub.requests.entries() if method == "GET" and "/resolve/" in path]
    assert fetched and not any(path.endswith("model.safetensors") for path in fetched)


def test_load_tokenizer_of_a_zoo_hub_repo_without_tokenizer_is_the_byte_tokenizer(hub, hub_cache, zoo_folder,
                                                                                tmp_path):
    _, folder, _ = zoo_folder
    old = tmp_path / "old"
    old.mkdir()
    for name in ("config.json", "model.safetensors"):
        (old / name).write_bytes((folder / name).read_bytes())
    repo = f"zoo-tests/old-{uuid.uuid4().hex[:8]}"
    hub.add_repo(repo, old)
    assert isinstance(load_tokenizer(repo), ByteTokenizer)


def test_tokenizer_ids_tell_apart_tokenizers_that_give_other_ids(fast, bpe_folder):
    tok, _ = bpe_folder
    assert tokenizer_id(BYTE) == tokenizer_id(fast) == "byte"  # the same ids: one token cache
    other = bpe_tokenizer(vocab_size=380)
    assert tokenizer_id(tok) != tokenizer_id(other)
    assert tokenizer_id(tok) != tokenizer_id(wordpiece_tokenizer())
    assert tokenizer_id(tok) == tokenizer_id(bpe_tokenizer())  # trained the same way: the same tokenizer
    same_size = bpe_tokenizer()
    same_size.backend_tokenizer.decoder = None  # same vocabulary, other decoding
    assert tokenizer_id(same_size) != tokenizer_id(tok)


def test_byte_lengths_of_a_byte_level_bpe_add_up_to_the_text():
    tok = bpe_tokenizer()
    lengths = token_byte_lengths(tok)
    assert lengths is not None and lengths[tok.eos_token_id] == 0
    text = "\n\n".join(SENTENCES) + " 東京 🙂 ünseen wörds"
    ids = tok.encode(text)
    assert len(ids) < len(text.encode())  # merges happened: tokens of several bytes
    assert int(lengths[ids].sum()) == len(text.encode("utf-8"))  # the oracle: the text's own UTF-8 length
    assert text_bytes(tok, torch.tensor(ids), lengths) == len(text.encode("utf-8"))


def test_byte_counts_of_a_tokenizer_without_byte_tokens_come_from_decoding():
    tok = wordpiece_tokenizer()
    assert token_byte_lengths(tok) is None
    ids = torch.tensor([tok.encode("the hacker wrote a program"), tok.encode("a kludge works anyway!")[:5]],
                       dtype=torch.long)
    expected = sum(len(tok.decode(row, skip_special_tokens=True).encode()) for row in ids.tolist())
    assert text_bytes(tok, ids, None) == expected == len("the hacker wrote a program") + len(
        tok.decode(ids[1].tolist(), skip_special_tokens=True))
    assert np.array_equal(token_byte_lengths(BYTE), np.ones(256))


def test_a_tokenizer_larger_than_the_vocabulary_is_refused():
    check_vocab(256, BYTE, "here")
    check_vocab(512, bpe_tokenizer(), "here")
    with pytest.raises(ValueError, match=r"ids up to 399.*vocab_size is 256"):
        check_vocab(256, bpe_tokenizer(), "here")


def test_generate_with_a_real_tokenizer_decodes_with_it(bpe_folder):
    tok, _ = bpe_folder
    torch.manual_seed(0)
    model = zoo.load("lm-dense-tiny", n_layers=1, d_model=32, n_heads=2, vocab_size=len(tok))
    text = generate_text(model, "The hacker", max_new_tokens=6, greedy=True, tokenizer=tok)
    ids = tok.encode("The hacker")
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
    assert text == tok.decode(out[0], skip_special_tokens=True) and text.startswith("The hacker")
    with pytest.raises(ValueError, match="vocab_size is 256"):
        generate_text(zoo.load("lm-dense-tiny", n_layers=1), "The hacker", tokenizer=tok)


def test_zoo_generate_uses_the_checkpoint_tokenizer(bpe_folder, tmp_path, capsys):
    from zoo.cli import main

    tok, tok_folder = bpe_folder
    torch.manual_seed(0)
    model = zoo.load("lm-dense-tiny", n_layers=1, d_model=32, n_heads=2, vocab_size=len(tok))
    folder = tmp_path / "bpe-lm"
    model.save_pretrained(folder)
    save_tokenizer(load_tokenizer(tok_folder), folder)
    assert main(["generate", str(folder), "--prompt", "The hacker", "--greedy", "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    assert printed == generate_text(model, "The hacker", max_new_tokens=5, greedy=True, tokenizer=tok)
