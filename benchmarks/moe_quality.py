"""MoE quality (issue 4): MoE against the dense LM at the same active FLOPs and training tokens, and loss vs k.

1. Trains lm-dense-tiny, moe-tiny, moe-fine-tiny (and moe-topp-tiny) with the common Trainer, same seed,
   same batches, same schedule (default 300 steps x 16 x 256 tokens on the bundled corpus), and reports
   the validation loss of each with its active FLOPs per token (model.cost) and its parameters.
2. Loads the trained moe-fine-tiny with `load(checkpoint, num_experts_per_tok=k)` for k = 1, 2, 4, 8, 16
   (trained at k = 8) and reports its validation loss and active FLOPs per token at each k.

    python benchmarks/moe_quality.py --threads 1           # ~1 h on 2 shared CPU cores
    python benchmarks/moe_quality.py --steps 100 --models lm-dense-tiny moe-tiny --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from train.config import TrainConfig
from train.data import load_token_data
from train.evaluate import evaluate_lm
from train.trainer import Trainer
from zoo import load

MODELS = ["lm-dense-tiny", "moe-tiny", "moe-fine-tiny", "moe-topp-tiny"]
KS = [1, 2, 4, 8, 16]


def train(name: str, out: Path, args) -> dict:
    """Train one catalog model; returns its summary plus its cost at the training sequence length."""
    cfg = TrainConfig(model=name, out=str(out / name), steps=args.steps, batch_size=args.batch_size,
                      seq_len=args.seq_len, eval_every=args.steps, checkpoint_every=args.steps,
                      eval_batches=args.eval_batches, seed=args.seed, log_every=max(args.steps // 10, 1))
    start = time.perf_counter()
    trainer = Trainer(cfg)
    summary = trainer.run()
    model = trainer.model
    moe_metrics = {k: v for k, v in summary.items() if k.startswith("moe_") and isinstance(v, float)}
    return {"val_loss": summary["val_loss"], "train_loss": summary["loss"], "tokens": summary["tokens"],
            "tokens_per_s": summary["tokens_per_s"], "seconds": time.perf_counter() - start,
            "final": summary["final"], "cost": model.cost(args.seq_len), "moe_metrics": moe_metrics}


def loss_vs_k(final: str, args) -> list[dict]:
    """Validation loss and active FLOPs of a trained MoE checkpoint loaded at each inference-time k."""
    data = load_token_data(None, seq_len=args.seq_len)
    rows = []
    for k in KS:
        model = load(final, num_experts_per_tok=k)
        result = evaluate_lm(model, data, args.batch_size, args.eval_batches)
        cost = model.cost(args.seq_len)
        rows.append({"k": k, "val_loss": result["val_loss"], "flops_per_token": cost["flops_per_token"],
                     "active_params": cost["active_params"]})
    return rows


def report(results: dict) -> str:
    """Markdown tables for BENCHMARKS.md."""
    lines = ["| model | val loss | train loss | active FLOPs/token (fwd) | active / total params | tokens | "
             "tokens/s | mean active experts |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results["runs"].items():
        c = r["cost"]
        k = r["moe_metrics"].get("moe_active_experts")
        lines.append(f"| {name} | {r['val_loss']:.4f} | {r['train_loss']:.4f} | {c['flops_per_token'] / 1e6:.2f}M | "
                     f"{c['active_params'] / 1e6:.2f}M / {c['total_params'] / 1e6:.2f}M | {r['tokens']:,} | "
                     f"{r['tokens_per_s']:,.0f} | {'' if k is None else f'{k:.2f}'} |")
    if results.get("loss_vs_k"):
        lines += ["", "moe-fine-tiny (trained at k = 8) loaded with `num_experts_per_tok=k`:", "",
                  "| k | val loss | active FLOPs/token (fwd) | active params |", "|---|---|---|---|"]
        for row in results["loss_vs_k"]:
            lines.append(f"| {row['k']} | {row['val_loss']:.4f} | {row['flops_per_token'] / 1e6:.2f}M | "
                         f"{row['active_params'] / 1e6:.2f}M |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-batches", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="run folders (default: a temp folder)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 is faster when other jobs share the CPU)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or tempfile.mkdtemp(prefix="moe-quality-"))
    results = {"machine": {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                           "torch": torch.__version__, "loadavg_start": os.getloadavg(),
                           "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")},
               "command": " ".join(["python", *sys.argv]), "runs": {}}
    for name in args.models:
        results["runs"][name] = train(name, out, args)
        print(f"{name}: val_loss {results['runs'][name]['val_loss']:.4f}", file=sys.stderr, flush=True)
    if "moe-fine-tiny" in results["runs"]:
        results["loss_vs_k"] = loss_vs_k(results["runs"]["moe-fine-tiny"]["final"], args)
    results["machine"]["loadavg_end"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    print(f"machine: {json.dumps(results['machine'])}\ncommand: {results['command']}")
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
