"""The zoo's tokenizer: UTF-8 bytes, one token per byte, nothing to download."""

from __future__ import annotations

import torch

VOCAB_SIZE = 256


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
