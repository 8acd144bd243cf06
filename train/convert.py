"""`zoo convert CKPT --to KIND`: convert a trained checkpoint, measure validation loss before and after.

Optionally fine-tunes the converted model briefly with the common trainer and measures again.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _option(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv: list[str] | None = None) -> int:
    """Convert, evaluate, save (and optionally fine-tune); prints a JSON report."""
    from zoo.cli import add_hub_flags
    from zoo.convert import CONVERTERS

    parser = argparse.ArgumentParser(prog="zoo convert", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoint", help="a trained checkpoint folder (or Hub repo id)")
    parser.add_argument("--to", required=True, help=f"target kind, one of {sorted(CONVERTERS) or '(none yet)'}; "
                        f"attention=KIND swaps the attention kind (its options: --option window=64 ...)")
    parser.add_argument("--out", default=None, help="folder for the converted checkpoint (default CKPT-to-KIND)")
    parser.add_argument("--experts", type=int, default=None, help="moe: number of experts")
    parser.add_argument("--nblocks", type=int, default=None, help="monarch: number of blocks")
    parser.add_argument("--layers", choices=["mlp", "attn", "all"], default=None,
                        help="structured kinds: which projections to convert")
    parser.add_argument("--option", action="append", type=_option, default=[], metavar="KEY=VALUE",
                        help="any other converter option (repeatable)")
    parser.add_argument("--finetune-steps", type=int, default=0, help="fine-tune this many steps afterwards")
    parser.add_argument("--eval-batches", type=int, default=20, help="validation batches per evaluation")
    parser.add_argument("--seq-len", type=int, default=None, help="evaluation sequence length")
    add_hub_flags(parser)
    args = parser.parse_args(argv)
    target, _, kind = args.to.partition("=")  # attention=scatterbrain: the converter and its kind
    if target not in CONVERTERS:
        raise ValueError(f"--to {args.to!r}: known conversions are {sorted(CONVERTERS)}")

    from train.data import load_token_data
    from train.evaluate import evaluate_lm
    from zoo import load
    from zoo.tokenizer import check_vocab, load_tokenizer, save_tokenizer

    model = load(args.checkpoint, force_download=args.force_download)
    seq_len = args.seq_len or min(model.config.max_seq_len, 256)
    tokenizer = load_tokenizer(args.checkpoint, force_download=args.force_download)  # the model's own
    check_vocab(model.config.vocab_size, tokenizer, f"zoo convert {args.checkpoint}")
    data = load_token_data(None, seq_len=seq_len, tokenizer=tokenizer)
    measured = evaluate_lm(model, data, 16, args.eval_batches)
    before = measured["val_loss"]
    options = {k: v for k, v in (("num_experts", args.experts), ("nblocks", args.nblocks),
                                 ("layers", args.layers)) if v is not None}
    options.update(dict(args.option))
    if kind:
        options["kind"] = kind
    converted, report = CONVERTERS[target](model, **options)
    measured_after = evaluate_lm(converted, data, 16, args.eval_batches)
    after = measured_after["val_loss"]
    bpb = {f"val_bpb_{when}": m["val_bpb"] for when, m in (("before", measured), ("after", measured_after))
           if "val_bpb" in m}
    out = Path(args.out or f"{str(args.checkpoint).rstrip('/')}-to-{args.to.replace('=', '-')}")
    converted.save_pretrained(out, training={"converted from": str(args.checkpoint), "conversion": args.to,
                                             "val_loss before": round(before, 5), "val_loss after": round(after, 5),
                                             **{k.replace("_", " "): round(v, 5) for k, v in bpb.items()}})
    save_tokenizer(tokenizer, out, model_max_length=getattr(converted.config, "max_seq_len", None))
    from zoo.interop import describe_import

    imported = describe_import(args.checkpoint) if Path(args.checkpoint).is_dir() else None
    result = {"checkpoint": str(args.checkpoint), **({"imported": imported} if imported else {}),
              "to": args.to, "out": str(out), "options": options,
              "val_loss_before": before, "val_loss_after": after, **bpb, **report}
    if args.finetune_steps:
        from train.config import TrainConfig
        from train.trainer import Trainer

        summary = Trainer(TrainConfig(model=str(out), out=str(out) + "-finetune", steps=args.finetune_steps,
                                      seq_len=seq_len, eval_every=args.finetune_steps,
                                      checkpoint_every=args.finetune_steps, eval_batches=args.eval_batches)).run()
        result["val_loss_after_finetune"] = summary["val_loss"]
        result["finetuned"] = summary["final"]
    print(json.dumps(result, indent=2, default=str))
    return 0
