"""Attention kinds in training (issue 5): validation loss of each tiny LM at equal steps, against lm-dense-tiny.

Every model trains with the same TrainConfig (bundled corpus, same seed, batches, schedule and
steps) through the common Trainer, one after the other in one process; the validation loss is the
Trainer's final evaluation, then the whole validation split is evaluated once more. The runs'
final checkpoints stay in --out (the dense one feeds benchmarks/attention_approximation.py).

    python benchmarks/attention_quality.py --json q.json            # 200 steps of 8 x 256 tokens, 1 thread
    python benchmarks/attention_quality.py --reuse --json q.json    # re-evaluate finished runs in --out

Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from train.config import TrainConfig
from train.evaluate import evaluate_lm
from train.trainer import Trainer

MODELS = ["lm-dense-tiny", "lm-local-tiny", "lm-lsh-tiny", "lm-performer-tiny", "lm-scatterbrain-tiny"]


def train_one(name: str, args: argparse.Namespace, seed: int) -> dict:
    """Train `name` with the shared settings; its final metrics, wall time and full-split validation loss.

    With --reuse, a run folder that already holds a final checkpoint of these settings is evaluated, not retrained.
    """
    out = Path(args.out) / (name if seed == 0 else f"{name}-seed{seed}")
    cfg = TrainConfig(model=name, steps=args.steps, batch_size=args.batch_size, out=str(out), seed=seed,
                      eval_every=args.steps, checkpoint_every=args.steps, keep_last=1, log_every=50)
    if args.reuse and finished(cfg):
        return reuse_one(name, cfg, seed)
    start = time.perf_counter()
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        trainer = Trainer(cfg)
        summary = trainer.run()
        full = evaluate_lm(trainer.model, trainer.task.data, cfg.batch_size, 0)
    wall = time.perf_counter() - start
    model = trainer.model
    return row(name, seed, cfg, summary, full, wall, model)


def finished(cfg: TrainConfig) -> bool:
    """True when cfg.run_dir holds a final checkpoint trained with these settings (the folder aside)."""
    saved = cfg.run_dir / "train_config.json"
    if not (cfg.run_dir / "final" / "model.safetensors").is_file() or not saved.is_file():
        return False
    ours, theirs = json.loads(json.dumps(cfg.to_dict())), json.loads(saved.read_text())
    ours.pop("out")
    theirs.pop("out", None)
    return ours == theirs


def reuse_one(name: str, cfg: TrainConfig, seed: int) -> dict:
    """The row of a finished run: its logged summary, and its final checkpoint evaluated on the full split."""
    from train.data import load_token_data
    from zoo import load

    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines() if line]
    summary = next(r["summary"] for r in reversed(records) if "summary" in r)
    model = load(str(cfg.run_dir / "final"))
    data = load_token_data(cfg.data, seq_len=cfg.seq_len, val_fraction=cfg.val_fraction)
    full = evaluate_lm(model, data, cfg.batch_size, 0)
    return row(name, seed, cfg, summary, full, summary["seconds"], model)


def row(name: str, seed: int, cfg: TrainConfig, summary: dict, full: dict, wall: float, model) -> dict:
    """One table row."""
    return {"model": name, "seed": seed, "steps": summary["steps"], "train_loss": summary["loss"],
            "val_loss": summary["val_loss"], "val_loss_full": full["val_loss"], "val_tokens": full["val_tokens"],
            "tokens_per_s": summary["tokens_per_s"], "wall_s": wall, "final": summary["final"],
            "attention": model.config.attention, "attention_kwargs": model.config.attention_kwargs,
            "flops_per_token": model.cost(cfg.seq_len)["flops_per_token"]}


def table(rows: list[dict]) -> str:
    """Markdown table, each model against the dense baseline of the same seed."""
    dense = {r["seed"]: r["val_loss_full"] for r in rows if r["model"] == "lm-dense-tiny"}
    lines = ["| model | attention budget | seed | train loss | val loss (full split) | vs dense | "
             "fwd FLOPs/token @256 | tokens/s | wall |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        delta = r["val_loss_full"] - dense.get(r["seed"], float("nan"))
        budget = ", ".join(f"{k}={v}" for k, v in r["attention_kwargs"].items()) or "-"
        lines.append(f"| `{r['model']}` | {budget} | {r['seed']} | {r['train_loss']:.3f} | {r['val_loss_full']:.4f} | "
                     f"{delta:+.4f} | {r['flops_per_token'] / 1e6:.2f}M | {r['tokens_per_s']:.0f} | "
                     f"{r['wall_s'] / 60:.1f} min |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences of 256 tokens per step")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--out", default="/tmp/attn-quality")
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--dense-seeds", type=int, default=2, help="dense runs with seeds 0..N-1 (the noise scale)")
    parser.add_argument("--reuse", action="store_true", help="evaluate finished runs in --out instead of retraining")
    parser.add_argument("--json", help="write the raw results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = datetime.now(timezone.utc)
    rows = []
    for name in args.models:
        seeds = range(args.dense_seeds) if name == "lm-dense-tiny" else [0]
        for seed in seeds:
            rows.append(train_one(name, args, seed))
            print(f"{name} seed {seed}: val {rows[-1]['val_loss_full']:.4f} ({rows[-1]['wall_s'] / 60:.1f} min)",
                  file=sys.stderr, flush=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    print(f"\nAttention kinds in training: {args.steps} steps each, batch {args.batch_size} x 256 tokens, "
          f"lr 3e-3, bundled corpus, {torch.get_num_threads()} torch threads. {machine}. "
          f"Started {started:%Y-%m-%d %H:%M} UTC.\n")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"started": started.isoformat(), "machine": machine,
                                               "steps": args.steps, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
