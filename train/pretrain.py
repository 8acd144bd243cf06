"""`zoo train` / `python -m train.pretrain` / `torchrun --nproc-per-node N -m train.pretrain`: train a model."""

from __future__ import annotations

import sys

import torch.distributed as dist

from train.config import parse_args


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, train, print the summary; the exit code says how it went."""
    from train.trainer import Trainer, TrainingDiverged

    cfg = parse_args(argv, prog="zoo train" if argv is not None else "python -m train.pretrain")
    try:
        summary = Trainer(cfg).run()
    except TrainingDiverged as err:
        print(f"training stopped: {err}", file=sys.stderr)
        return 3
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if summary.get("interrupted"):
        return 130
    if "final" in summary:
        keys = ("steps", "tokens", "loss", "val_loss", "val_ppl", "tokens_per_s", "mfu", "final")
        print("done: " + ", ".join(f"{k}={summary[k]:.4g}" if isinstance(summary.get(k), float)
                                   else f"{k}={summary.get(k)}" for k in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
