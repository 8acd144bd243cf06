"""The one next-token loss of the zoo (the LM's forward, the trainer, evaluation and SAE metrics use it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, *, shifted: bool = False,
                    reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of (batch, seq, vocab) logits against token ids (batch, seq), computed in fp32.

    Unless `shifted`, position t predicts labels[t + 1] (labels are the input ids themselves, as in
    transformers); labels equal to -100 are ignored. reduction: "mean" over the counted tokens, or "sum".
    """
    if not shifted:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction=reduction)
