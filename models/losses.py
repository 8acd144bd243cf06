"""The one next-token loss of the zoo: transformers' causal-LM loss (what `model.loss_function` is in the LM's
forward, with shift_labels and num_items_in_batch), used by the trainer, evaluation and the SAE metrics."""

from __future__ import annotations

import torch
from transformers.loss.loss_utils import ForCausalLMLoss

IGNORE_INDEX = -100


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, *, shifted: bool = False,
                    reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of (batch, seq, vocab) logits against token ids (batch, seq), computed in fp32.

    Unless `shifted`, position t predicts labels[t + 1] (labels are the input ids themselves, as in
    transformers); labels equal to -100 are ignored. reduction: "mean" over the counted tokens, or "sum".
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r} must be 'mean' or 'sum'")
    return ForCausalLMLoss(logits.contiguous(), None if shifted else labels, logits.shape[-1],
                           num_items_in_batch=1 if reduction == "sum" else None, ignore_index=IGNORE_INDEX,
                           shift_labels=labels.contiguous() if shifted else None)
