"""Validation loss, perplexity and bits per byte of a model on the validation split: `zoo eval CHECKPOINT`.

The text is tokenized with the model's own tokenizer (`zoo.tokenizer.load_tokenizer`); bits per byte
(bpb = summed loss in nats / (ln 2 * UTF-8 bytes of the text the predicted tokens stand for)) compares
models whose tokenizers differ.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from models.losses import next_token_loss
from zoo.cli import add_hub_flags, load_model
from zoo.tokenizer import bits_per_byte


@torch.no_grad()
def evaluate_lm(model, data, batch_size: int, max_batches: int = 0, device: str | torch.device = "cpu",
                autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Mean next-token cross-entropy over (up to max_batches of) the validation blocks, its exp, and the
    loss in bits per UTF-8 byte of the predicted text (val_bpb; when the data knows its tokenizer)."""
    was_training = model.training
    model.eval()
    total, count, num_bytes = 0.0, 0, 0
    device = torch.device(device)
    for i, batch in enumerate(data.val_batches(batch_size)):
        if max_batches and i >= max_batches:
            break
        targets = batch[:, 1:]
        counted = data.text_bytes(targets) if hasattr(data, "text_bytes") else None
        num_bytes = None if counted is None or num_bytes is None else num_bytes + counted
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(input_ids=batch[:, :-1]).logits
        loss = next_token_loss(logits, batch[:, 1:], shifted=True, reduction="sum")
        total += loss.item()
        count += targets.numel()
    model.train(was_training)
    mean = total / count
    result = {"val_loss": mean, "val_ppl": math.exp(min(mean, 50.0)), "val_tokens": count}
    if num_bytes:
        result.update(val_bpb=bits_per_byte(total, num_bytes), val_bytes=num_bytes)
    return result


def main(argv: list[str] | None = None) -> int:
    """`zoo eval`: print the validation loss, perplexity and bits per byte of a checkpoint as JSON."""
    from train.data import add_data_flags, data_options

    parser = argparse.ArgumentParser(prog="zoo eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="checkpoint folder, Hub repo id or catalog name")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per block (default: the model's max_seq_len, capped at 256)")
    parser.add_argument("--batch-size", type=int, default=16, help="blocks per forward (default 16)")
    parser.add_argument("--max-batches", type=int, default=0, help="validation batches (default 0: the whole split)")
    add_data_flags(parser)
    add_hub_flags(parser)
    args, extra = parser.parse_known_args(argv)  # an SAE checkpoint takes more flags (train.sae_eval)

    from train.data import load_token_data, tokens_needed
    from zoo.tokenizer import check_vocab, load_tokenizer, tokenizer_id

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
    tokenizer = load_tokenizer(args.model, force_download=args.force_download)
    check_vocab(model.config.vocab_size, tokenizer, f"zoo eval {args.model}")
    max_tokens = None
    if args.streaming:
        if not args.max_batches:
            raise ValueError("--streaming reads only the blocks evaluated: give --max-batches")
        max_tokens = tokens_needed(1, seq_len, args.val_fraction, args.val_split,
                                   val_blocks=args.max_batches * args.batch_size)
    data = load_token_data(args.data, seq_len=seq_len, val_fraction=args.val_fraction, tokenizer=tokenizer,
                           max_tokens=max_tokens, **data_options(args))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = evaluate_lm(model.to(device), data, args.batch_size, args.max_batches, device)
    print(json.dumps({"model": args.model, "seq_len": seq_len, "tokenizer": tokenizer_id(tokenizer),
                      "val_split": args.val_split, **result}, indent=2))
    return 0
