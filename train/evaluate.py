"""Validation loss and perplexity of a model on the validation split: `zoo eval CHECKPOINT`."""

from __future__ import annotations

import argparse
import json
import math

import torch

from models.losses import next_token_loss
from zoo.cli import add_hub_flags, load_model


@torch.no_grad()
def evaluate_lm(model, data, batch_size: int, max_batches: int = 0, device: str | torch.device = "cpu",
                autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Mean next-token cross-entropy over (up to max_batches of) the validation blocks, and its exp."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = torch.device(device)
    for i, batch in enumerate(data.val_batches(batch_size)):
        if max_batches and i >= max_batches:
            break
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(input_ids=batch[:, :-1]).logits
        loss = next_token_loss(logits, batch[:, 1:], shifted=True, reduction="sum")
        total += loss.item()
        count += batch[:, 1:].numel()
    model.train(was_training)
    mean = total / count
    return {"val_loss": mean, "val_ppl": math.exp(min(mean, 50.0)), "val_tokens": count}


def main(argv: list[str] | None = None) -> int:
    """`zoo eval`: print the validation loss and perplexity of a checkpoint as JSON."""
    parser = argparse.ArgumentParser(prog="zoo eval", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("model", help="checkpoint folder, Hub repo id or catalog name")
    parser.add_argument("--data", nargs="+", default=None, 
                        help="files/globs or a Hub dataset (default: bundled corpus)")
    parser.add_argument("--seq-len", type=int, default=None, help="default: the model's max_seq_len, capped at 256")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-batches", type=int, default=0, help="0: the whole validation split")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="must match the training run's")
    add_hub_flags(parser)
    args, extra = parser.parse_known_args(argv)  # an SAE checkpoint takes more flags (train.sae_eval)

    from train.data import load_token_data

    model = load_model(args)
    if model.config.model_type == "zoo_sae":
        from train.sae_eval import main as evaluate_sae

        # Its own parser reads the rest of the flags; --force-download was spent on loading the SAE.
        return evaluate_sae([a for a in argv or [] if a != "--force-download"], model=model)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    seq_len = args.seq_len or min(model.config.max_seq_len, 256)
    if seq_len > model.config.max_seq_len:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's max_seq_len={model.config.max_seq_len}")
    data = load_token_data(args.data, seq_len=seq_len, val_fraction=args.val_fraction)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = evaluate_lm(model.to(device), data, args.batch_size, args.max_batches, device)
    print(json.dumps({"model": args.model, "seq_len": seq_len, **result}, indent=2))
    return 0
