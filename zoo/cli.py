"""The `zoo` command line: list, info, generate, and (from the trainer) train, eval, publish."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EPILOG = """examples:
  zoo list                           every catalog model
  zoo list 'lm-*'                    glob filter
  zoo info lm-dense-tiny             config and cost of a model
  zoo generate runs/lm-dense-tiny/final --prompt "hacker"
  zoo quickstart                     train lm-dense-tiny briefly, save, load back, generate
  zoo train --help                   the trainer's flags
"""


def _fmt(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:g}"


def cmd_list(args: argparse.Namespace) -> int:
    """Print the catalog as a table."""
    from zoo.catalog import list_models

    entries = list_models(args.pattern)
    if not entries:
        print(f"no catalog name matches {args.pattern!r}", file=sys.stderr)
        return 1
    width = max(len(e.name) for e in entries)
    print(f"{'name':<{width}}  family  size   description")
    for e in entries:
        print(f"{e.name:<{width}}  {e.family:<6}  {e.size:<5}  {e.description}")
    return 0


def load_model(args: argparse.Namespace):
    """zoo.load(args.model), passing --force-download (an unreadable Hub checkpoint's error names the flag)."""
    from zoo.loading import load

    return load(args.model, force_download=args.force_download)


def add_hub_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of a command that may load a model from the Hub."""
    parser.add_argument("--force-download", action="store_true",
                        help="download a Hub checkpoint again even if it is cached (repairs a damaged cache)")


def cmd_info(args: argparse.Namespace) -> int:
    """Print a model's config and cost."""
    from layers.kernels import describe
    from zoo.interop import describe_import

    model = load_model(args)
    cost = model.cost(args.seq_len)
    imported = describe_import(args.model) if Path(args.model).is_dir() else None
    # Exact numbers under "cost" (for scripts), rounded ones under "cost_readable" (for people).
    print(json.dumps({**({"imported": imported} if imported else {}), "config": model.config.to_diff_dict(),
                      "cost": cost,
                      "cost_readable": {k: (_fmt(v) if k != "seq_len" else v) for k, v in cost.items()},
                      "kernels": describe()}, indent=2, default=str))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Print a continuation of the prompt."""
    from zoo.generation import generate_text
    from zoo.tokenizer import load_tokenizer

    model = load_model(args)
    tokenizer = load_tokenizer(args.model, force_download=args.force_download)  # the model's own
    print(generate_text(model, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, greedy=args.greedy, seed=args.seed, tokenizer=tokenizer))
    return 0


# Commands that live in the trainer, which sits above zoo in the import order: imported only when asked for.
TRAINER_COMMANDS = {
    "train": ("train.pretrain", "train a model (see `zoo train --help`)"),
    "eval": ("train.evaluate", "validation loss / perplexity of a checkpoint"),
    "publish": ("train.publish", "push a checkpoint folder to the Hugging Face Hub"),
    "quickstart": ("train.quickstart", "train lm-dense-tiny briefly, save, load back, generate"),
    "convert": ("train.convert", "convert a checkpoint to another kind (e.g. --to moe, --to monarch)"),
    "frontier": ("train.frontier", "train every LM family under the protocol; loss vs FLOPs and tokens/s (issue 17)"),
    "export": ("zoo.export", "write a checkpoint as a transformers folder (or a zoo one: --to zoo)"),
}


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `zoo`."""
    parser = argparse.ArgumentParser(
        prog="zoo", description="The sparse model zoo: catalog, checkpoints, generation and training.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="list catalog models (optionally matching a glob)")
    p.add_argument("pattern", nargs="?", default="*", help="glob on the name, e.g. 'lm-*' (default: all)")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("info", help="show the config and cost of a catalog name, folder or Hub repo")
    p.add_argument("model", help="catalog name, checkpoint folder or Hub repo id")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length for the FLOPs figure")
    add_hub_flags(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="continue a prompt with a model")
    p.add_argument("model", help="catalog name (random weights), checkpoint folder or Hub repo id")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200,
                   help="tokens to generate (default 200; bytes for the byte tokenizer)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens (default 50)")
    p.add_argument("--greedy", action="store_true", help="take the likeliest token every step")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    add_hub_flags(p)
    p.set_defaults(func=cmd_generate)

    for name, (_, text) in TRAINER_COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)  # listed in --help; main() dispatches them
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `zoo` console script."""
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else None
    from safetensors import SafetensorError

    try:
        if command in TRAINER_COMMANDS:
            import importlib

            return importlib.import_module(TRAINER_COMMANDS[command][0]).main(argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except (ValueError, OSError, SafetensorError) as err:  # bad input, a missing file, a failed write
        print(f"zoo {command}: error: {err}", file=sys.stderr)
        return EXIT_WRITE_FAILED if _is_write_error(err) else EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"zoo {command}: interrupted", file=sys.stderr)
        return 130


EXIT_BAD_INPUT, EXIT_WRITE_FAILED = 2, 4  # as `zoo train` (train/pretrain.py)


def _is_write_error(err: BaseException) -> bool:
    """A checkpoint that could not be written (the trainer's error), or a full disk / quota."""
    import errno

    from train.checkpoint import CheckpointWriteError  # the CLI may import train inside a command

    return (isinstance(err, CheckpointWriteError) or getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
            or "No space left on device" in str(err))


if __name__ == "__main__":
    sys.exit(main())
