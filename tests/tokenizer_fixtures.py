"""Small real tokenizers for tests, trained here on a few sentences (nothing is downloaded).

`bpe_tokenizer()` is a byte-level BPE (GPT-2 style) with an end-of-text special token; `wordpiece_tokenizer()`
is a WordPiece tokenizer with a lowercasing normalizer (its tokens do not map to bytes one by one).
Both are transformers PreTrainedTokenizerFast objects, saved with save_pretrained as a Hub folder would hold.
"""

from __future__ import annotations

SENTENCES = [
    "The hacker wrote a small program in the night.",
    "Hackers love clever programs, elegant hacks and long nights.",
    "A kludge is a clumsy solution that works anyway.",
    "Zürich, Ærøskøbing and 東京 are places; naïve café owners smile 🙂.",
    "The quick brown fox jumps over the lazy dog again and again.",
] * 4


def bpe_tokenizer(vocab_size: int = 400):
    """A byte-level BPE trained on SENTENCES, eos "<|endoftext|>" (id 0), wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


def wordpiece_tokenizer(vocab_size: int = 300):
    """A lowercasing WordPiece trained on SENTENCES, with [UNK] and [PAD], wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=["[UNK]", "[PAD]"],
                                        show_progress=False)
    backend.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")
