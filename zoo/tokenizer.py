"""Tokenizers of the zoo: the byte tokenizer, and the one function that gives a model source's tokenizer.

`ByteTokenizer` encodes text as its UTF-8 bytes (one token per byte, ids 0..255, no special tokens).
`byte_level_tokenizer()` is the same tokenizer as a `transformers` fast tokenizer (a `tokenizers`
byte-level BPE with 256 entries in GPT-2's bytes-to-unicode order and no merges), which every zoo
checkpoint carries as `tokenizer.json` + `tokenizer_config.json`, so that
`AutoTokenizer.from_pretrained(folder)` and `pipeline("text-generation", model=folder)` read it.

`load_tokenizer(name_or_path)` is the tokenizer of a model source: a folder (or Hub repo) that holds
tokenizer files gives `AutoTokenizer.from_pretrained` of it (never with remote code); a catalog name
or a zoo checkpoint without tokenizer files (written before checkpoints carried one) gives ByteTokenizer.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

VOCAB_SIZE = 256
# Files whose presence in a folder means it carries its own tokenizer (what AutoTokenizer reads).
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
# What load_tokenizer fetches of a Hub repo: the config (to tell a zoo checkpoint) and the tokenizer files.
HUB_TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                       "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model",
                       "chat_template.jinja")


class ByteTokenizer:
    """Encodes text as its UTF-8 bytes (ids 0..255) and decodes ids back to text."""

    vocab_size = VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`."""
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Text of `ids`; byte sequences that are not valid UTF-8 become U+FFFD."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        bad = [i for i in ids if not 0 <= int(i) < VOCAB_SIZE]
        if bad:
            raise ValueError(f"token ids must be in [0, {VOCAB_SIZE}), got {bad[:5]}")
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return VOCAB_SIZE


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes are themselves, the other 68 bytes
    take the characters from U+0100 on, in byte order (what `tokenizers`' ByteLevel pre-tokenizer emits)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def _byte_level_backend():
    """The `tokenizers.Tokenizer` whose ids are the UTF-8 bytes of the text (id = byte value)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def byte_level_tokenizer(model_max_length: int | None = None):
    """ByteTokenizer as a `transformers` PreTrainedTokenizerFast: the same ids, the same decoding, 256 ids,
    no special tokens (a pad token is not set either: ByteTokenizer has none)."""
    from transformers import PreTrainedTokenizerFast

    kwargs = {"model_max_length": model_max_length} if model_max_length else {}
    return PreTrainedTokenizerFast(tokenizer_object=_byte_level_backend(), **kwargs)


@lru_cache(maxsize=1)
def _byte_level_signature() -> str:
    return _backend_signature(json.loads(_byte_level_backend().to_str()))


def _backend_signature(spec: dict) -> str:
    """What decides a `tokenizers` tokenizer's ids and decoding (not truncation or padding settings)."""
    keys = ("added_tokens", "normalizer", "pre_tokenizer", "model", "post_processor", "decoder")
    parts = {k: spec.get(k) for k in keys}
    post = parts["post_processor"] or {}
    if (post.get("type") == "TemplateProcessing" and not post.get("special_tokens")
            and [list(item) for item in post.get("single", [])] == [["Sequence"]]):
        parts["post_processor"] = None  # what transformers sets when no special token is added: a no-op
    return json.dumps(parts, sort_keys=True)


def _backend(tokenizer: Any):
    """The `tokenizers.Tokenizer` behind a transformers fast tokenizer, or None."""
    return getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)


def is_byte_tokenizer(tokenizer: Any) -> bool:
    """Whether `tokenizer` gives exactly ByteTokenizer's ids: ByteTokenizer itself, or the byte-level fast
    tokenizer (with no tokens added and no special tokens inserted on encode)."""
    if isinstance(tokenizer, ByteTokenizer):
        return True
    backend = _backend(tokenizer)
    if backend is None or not hasattr(backend, "to_str") or tokenizer_size(tokenizer) != VOCAB_SIZE:
        return False
    return _backend_signature(json.loads(backend.to_str())) == _byte_level_signature()


def tokenizer_size(tokenizer: Any) -> int:
    """The number of ids a tokenizer can give: its vocabulary and added tokens."""
    size = int(getattr(tokenizer, "vocab_size", 0) or 0)
    try:
        size = max(size, len(tokenizer))
    except TypeError:
        pass
    return size


def tokenizer_id(tokenizer: Any) -> str:
    """A string that differs for any two tokenizers that give different ids (it names a token cache).

    The byte tokenizer in either form is "byte"; a fast tokenizer is named by a hash of the parts of its
    tokenizer.json that decide the ids and of whether encode adds special tokens; another tokenizer by its
    class, name, size and a hash of its vocabulary.
    """
    if is_byte_tokenizer(tokenizer):
        return "byte"
    cls = type(tokenizer)
    what = f"{cls.__module__}.{cls.__qualname__}"
    digest = hashlib.sha256()
    backend = _backend(tokenizer)
    if backend is not None and hasattr(backend, "to_str"):
        digest.update(_backend_signature(json.loads(backend.to_str())).encode())
    elif hasattr(tokenizer, "get_vocab"):
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    else:
        digest.update(f"{what}:{getattr(tokenizer, 'name_or_path', '')}".encode())
    digest.update(repr(encode_settings(tokenizer)).encode())
    return f"{what}:{tokenizer_size(tokenizer)}:{digest.hexdigest()[:24]}"


def encode_settings(tokenizer: Any) -> tuple:
    """The settings outside tokenizer.json that change what `encode` gives (special tokens added)."""
    return tuple(getattr(tokenizer, name, None) for name in ("add_bos_token", "add_eos_token"))


def encode(tokenizer: Any, text: str) -> list[int]:
    """The ids of `text` (with the special tokens the tokenizer adds, e.g. a BOS)."""
    return list(tokenizer.encode(text))


def decode(tokenizer: Any, ids: Sequence[int] | torch.Tensor) -> str:
    """The text of `ids`, special tokens left out (ByteTokenizer has none)."""
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.decode(ids)
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def token_byte_lengths(tokenizer: Any) -> np.ndarray | None:
    """The number of UTF-8 bytes of text each id stands for (special tokens: 0), or None where tokens do not
    map to bytes one by one (then count bytes by decoding: see `text_bytes`).

    Exact for the byte tokenizer and for byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, ...), whose
    tokens are strings of bytes in the bytes-to-unicode alphabet.
    """
    size = tokenizer_size(tokenizer)
    if is_byte_tokenizer(tokenizer):
        return np.ones(VOCAB_SIZE, dtype=np.int64)
    backend = _backend(tokenizer)
    if backend is None or not hasattr(backend, "to_str"):
        return None
    spec = json.loads(backend.to_str())
    if (spec.get("decoder") or {}).get("type") != "ByteLevel" or spec.get("normalizer"):
        return None
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    lengths = np.zeros(size, dtype=np.int64)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = {t["id"]: t for t in spec.get("added_tokens") or []}
    for token, index in backend.get_vocab(with_added_tokens=True).items():
        if index >= size or index in special:
            continue
        if index in added:  # added tokens are plain text, not byte-level strings
            lengths[index] = 0 if added[index].get("special") else len(token.encode("utf-8"))
        elif all(c in byte_of for c in token):
            lengths[index] = len(token)
        else:
            return None
    return lengths


def text_bytes(tokenizer: Any, ids: torch.Tensor, lengths: np.ndarray | None) -> int:
    """UTF-8 bytes of the text that the ids of `ids` (any shape) stand for: by the byte-length table when
    there is one, else by decoding each row (special tokens left out)."""
    if lengths is not None:
        return int(lengths[ids.reshape(-1).cpu().numpy()].sum())
    rows = ids.reshape(-1, ids.shape[-1]) if ids.ndim else ids.reshape(1, 1)
    return sum(len(decode(tokenizer, row).encode("utf-8")) for row in rows)


def bits_per_byte(total_nats: float, num_bytes: int) -> float:
    """Summed cross-entropy (nats) over the tokens of a text, in bits per UTF-8 byte of that text."""
    return total_nats / (math.log(2) * num_bytes) if num_bytes else float("nan")


def check_vocab(vocab_size: int, tokenizer: Any, where: str) -> None:
    """Refuse a tokenizer that gives ids the model has no embedding for (ValueError naming both sizes)."""
    size = tokenizer_size(tokenizer)
    if size > vocab_size:
        raise ValueError(f"{where}: the tokenizer gives ids up to {size - 1}, but the model's vocab_size is "
                         f"{vocab_size}: its tokens would index past the embedding. Use the model's own "
                         f"tokenizer, or a model with vocab_size >= {size} (e.g. --set vocab_size={size})")


# ---- the tokenizer of a model source ----------------------------------------------------------------------

def has_tokenizer_files(folder: str | os.PathLike) -> bool:
    """Whether a folder carries its own tokenizer."""
    return any((Path(folder) / name).is_file() for name in TOKENIZER_MARKERS)


def _zoo_model_type(folder: Path) -> str | None:
    """The zoo model_type of a checkpoint folder's config.json, or None (not a zoo checkpoint)."""
    from zoo.catalog import FAMILIES

    try:
        model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return model_type if model_type in {cfg.model_type for cfg, _ in FAMILIES.values()} else None


def _from_folder(folder: Path, where: str):
    if has_tokenizer_files(folder):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as err:
            raise ValueError(f"{where}: cannot read its tokenizer files: {type(err).__name__}: {err}") from err
    if _zoo_model_type(folder) is not None:
        return ByteTokenizer()  # a zoo checkpoint written before checkpoints carried their tokenizer
    raise ValueError(f"{where} holds no tokenizer files ({', '.join(TOKENIZER_MARKERS)}) and is not a zoo "
                     "checkpoint: save the model's tokenizer there (tokenizer.save_pretrained(folder))")


def load_tokenizer(name_or_path: str | os.PathLike, revision: str | None = None, force_download: bool = False):
    """The tokenizer of a model source.

    - a folder with tokenizer files (a zoo or transformers checkpoint): AutoTokenizer.from_pretrained of it
      (no remote code is run);
    - a zoo checkpoint folder without tokenizer files, or a catalog name: ByteTokenizer;
    - a Hub repo id: its config and tokenizer files are fetched (the cache first) and read as a folder.
    """
    from zoo import hub
    from zoo.catalog import CATALOG

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _from_folder(path, f"model folder {path}")
    name = str(name_or_path)
    if name in CATALOG:
        return ByteTokenizer()
    if not hub.is_repo_id(name):
        raise ValueError(f"{name!r} is not a model folder, a catalog name or a Hub repo id")
    folder = hub.download(name, revision=revision, force_download=force_download,
                          allow_patterns=list(HUB_TOKENIZER_FILES))
    return _from_folder(folder, f"Hub repo {name!r}")


def save_tokenizer(tokenizer: Any, folder: str | os.PathLike, model_max_length: int | None = None) -> list[str]:
    """Write `tokenizer` into a checkpoint folder (tokenizer.json, tokenizer_config.json, ...), ByteTokenizer
    as its byte-level fast form; returns the names of the files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer, ByteTokenizer):
        tokenizer = byte_level_tokenizer(model_max_length)
    written = tokenizer.save_pretrained(str(folder))
    config = folder / "tokenizer_config.json"
    if is_byte_tokenizer(tokenizer) and config.is_file():
        # "PreTrainedTokenizerFast" is the class name every transformers version knows (5.x reads it as
        # its TokenizersBackend), so that older readers of the checkpoint load it too.
        settings = json.loads(config.read_text(encoding="utf-8"))
        settings["tokenizer_class"] = "PreTrainedTokenizerFast"
        config.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    return sorted(Path(f).name for f in written if Path(f).is_file())
