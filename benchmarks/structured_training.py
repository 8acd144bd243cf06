"""Training quality of the structured LMs (issue 6), side by side with the same TrainConfig.

Trains, one after the other with the same data, seed, steps, batch, schedule and optimizer:

- lm-dense-tiny                        the dense baseline (equal steps)
- lm-dense-tiny --set d_model=128      a dense LM with about the parameter count of the structured ones
- lm-monarch-tiny                      every projection a Monarch matrix with 4 blocks
- lm-pixelfly-tiny                     every projection flat block butterfly (16x16 blocks) + rank 8

and reports the validation loss on the whole validation split, parameters, FLOPs per token and
tokens/s (tokens/s depend on how busy the machine is; the loss does not). Then the dense-to-sparse
path: the trained lm-dense-tiny is projected onto Monarch matrices with `zoo convert` (--layers mlp
and all), evaluated, and fine-tuned for --finetune-steps steps with the same trainer.

    python benchmarks/structured_training.py                     # the numbers in BENCHMARKS.md
    python benchmarks/structured_training.py --steps 50 --finetune-steps 10 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from train.config import TrainConfig
from train.convert import main as convert
from train.data import load_token_data
from train.trainer import Trainer
from zoo import load

# (label, catalog name, model config overrides)
MODELS = [
    ("lm-dense-tiny", "lm-dense-tiny", {}),
    ("dense, same params (d_model=128)", "lm-dense-tiny", {"d_model": 128}),
    ("lm-monarch-tiny", "lm-monarch-tiny", {}),
    ("lm-pixelfly-tiny", "lm-pixelfly-tiny", {}),
]


def train(name: str, overrides: dict, out: Path, args: argparse.Namespace, lr: float | None = None) -> dict:
    """Train one model with the shared settings (or another learning rate); its summary plus cost."""
    cfg = TrainConfig(model=name, model_overrides=overrides, out=str(out), steps=args.steps,
                      batch_size=args.batch_size, seq_len=args.seq_len, lr=lr or args.lr, seed=args.seed,
                      eval_every=args.steps, checkpoint_every=args.steps, eval_batches=0)
    summary = Trainer(cfg).run()
    cost = load(name, **overrides).cost(args.seq_len)
    return {"val_loss": summary["val_loss"], "train_loss": summary.get("loss"), "tokens_per_s": summary["tokens_per_s"],
            "seconds": summary["seconds"], "params": cost["total_params"], "flops_per_token": cost["flops_per_token"],
            "final": summary["final"]}


def convert_report(argv: list[str]) -> dict:
    """Run `zoo convert` and return its JSON report."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        convert(argv)
    text = buffer.getvalue()
    return json.loads(text[text.index("{"):])


def markdown(trained: list[dict], conversions: list[dict], args: argparse.Namespace) -> str:
    """Tables for BENCHMARKS.md."""
    base = next((r for r in trained if r["label"] == "lm-dense-tiny"), trained[0])
    lines = [f"{args.steps} steps x {args.batch_size} x {args.seq_len} tokens, lr {args.lr} unless given, "
             f"seed {args.seed}, validation loss on the whole validation split (nats/byte)", "",
             f"| model | params | fwd FLOPs/token | val loss | vs {base['label']} | tokens/s (busy machine) |",
             "|---|---|---|---|---|---|"]
    for r in trained:
        lines.append(f"| {r['label']} | {r['params'] / 1e6:.2f}M | {r['flops_per_token'] / 1e6:.2f}M | "
                     f"{r['val_loss']:.4f} | {r['val_loss'] - base['val_loss']:+.4f} | {r['tokens_per_s']:,.0f} |")
    if conversions:
        lines += ["", f"Dense-to-Monarch projection of the trained lm-dense-tiny (`zoo convert --to monarch "
                      f"--nblocks 4`), then {args.finetune_steps} fine-tuning steps:", "",
                  "| --layers | params | mean rel. Frobenius error | val loss before | after projection "
                  "| after fine-tune |", "|---|---|---|---|---|---|"]
        for c in conversions:
            lines.append(f"| {c['layers']} | {c['params_after'] / 1e6:.2f}M | "
                         f"{c['mean_relative_frobenius_error']:.3f} | "
                         f"{c['val_loss_before']:.4f} | {c['val_loss_after']:.4f} | "
                         f"{c.get('val_loss_after_finetune', float('nan')):.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Train the four LMs, convert the dense one, print the tables."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--finetune-steps", type=int, default=100, help="0 skips the conversion experiment")
    p.add_argument("--dense-lrs", type=float, nargs="*", default=[],
                   help="also train lm-dense-tiny at these learning rates (is a gap only a learning-rate effect?)")
    p.add_argument("--skip-main", action="store_true", help="train only the --dense-lrs runs")
    p.add_argument("--workdir", default=None, help="where run folders go and stay (default: a temp dir, removed)")
    p.add_argument("--json", default=None, help="also write every result to this JSON file")
    args = p.parse_args(argv)

    load_start = os.getloadavg()[0]
    started = time.perf_counter()
    workdir = None if args.workdir else tempfile.TemporaryDirectory(prefix="structured_training-")
    root = Path(args.workdir) if args.workdir else Path(workdir.name)
    root.mkdir(parents=True, exist_ok=True)
    load_token_data(None, seq_len=args.seq_len)  # tokenize once, before any run
    trained = []
    runs = [] if args.skip_main else [(label, name, overrides, None) for label, name, overrides in MODELS]
    runs += [(f"lm-dense-tiny, lr {lr:g}", "lm-dense-tiny", {}, lr) for lr in args.dense_lrs]
    for i, (label, name, overrides, lr) in enumerate(runs):
        result = train(name, overrides, root / f"run{i}", args, lr)
        trained.append({"label": label, "name": name, "overrides": overrides, "lr": lr or args.lr, **result})
        print(f"{label}: val loss {result['val_loss']:.4f}, {result['params']:,} params, "
              f"{result['tokens_per_s']:,.0f} tokens/s", file=sys.stderr)
    conversions = []
    if args.finetune_steps and not args.skip_main:
        dense_final = trained[0]["final"]
        for layers in ("mlp", "all"):
            conversions.append(convert_report([dense_final, "--to", "monarch", "--nblocks", "4", "--layers", layers,
                                               "--out", str(root / f"monarch-{layers}"), "--eval-batches", "0",
                                               "--seq-len", str(args.seq_len),
                                               "--finetune-steps", str(args.finetune_steps)]))
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# {when}, {time.perf_counter() - started:.0f} s, load average {load_start:.2f} at start, "
          f"{os.getloadavg()[0]:.2f} at end\n")
    print(markdown(trained, conversions, args))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "date": when, "trained": trained,
                                               "conversions": conversions}, indent=2, default=str))
    if workdir:
        workdir.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
