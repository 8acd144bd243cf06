"""`zoo export CKPT OUT --to transformers`: a checkpoint that transformers alone loads (no zoo installed).

CKPT is a zoo checkpoint folder, a Hub repo id or a transformers folder; OUT receives config.json,
model.safetensors, generation_config.json and the model's tokenizer files, written by transformers'
own save_pretrained. The architecture is the first of Llama, Qwen2, Qwen3, Gemma, GPT-2, Mistral
(dense) or Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE (MoE) that computes what the model computes, or the
one `--architecture` names; a kind with no transformers equivalent (lsh / performer / scatterbrain
attention, structured linears, top-p or sigmoid routing...) is an error naming it. `--to zoo` writes
a zoo checkpoint instead (e.g. of an imported transformers model, to train or convert it further).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from zoo.cli import add_hub_flags
    from zoo.interop.architectures import ARCHITECTURES

    parser = argparse.ArgumentParser(prog="zoo export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="zoo checkpoint folder, transformers folder or Hub repo id")
    parser.add_argument("out", help="output folder (must not exist, or be empty)")
    parser.add_argument("--to", choices=["transformers", "zoo"], default="transformers",
                        help="the format of OUT (default: transformers)")
    parser.add_argument("--architecture", choices=sorted(ARCHITECTURES), default=None,
                        help="the transformers architecture to write (default: the first that holds the model)")
    parser.add_argument("--revision", default=None, help="Hub revision of CHECKPOINT")
    add_hub_flags(parser)
    args = parser.parse_args(argv)

    from zoo import load
    from zoo.interop import export_checkpoint
    from zoo.tokenizer import load_tokenizer, save_tokenizer

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder: choose a new output folder")
    model = load(args.checkpoint, revision=args.revision, force_download=args.force_download)
    if not hasattr(model, "lm_head"):
        raise ValueError(f"{args.checkpoint} is not a language model: only LMs export to transformers")
    tokenizer = load_tokenizer(args.checkpoint, revision=args.revision, force_download=args.force_download)
    if args.to == "zoo":
        model.save_pretrained(out, training={"exported from": str(args.checkpoint)})
        report = {"format": "zoo", "out": str(out)}
    else:
        report = {"format": "transformers", **export_checkpoint(model, out, architecture_name=args.architecture)}
    report["tokenizer_files"] = save_tokenizer(tokenizer, out, model_max_length=model.config.max_seq_len)
    print(json.dumps({"checkpoint": str(args.checkpoint), **report}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
