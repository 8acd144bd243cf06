"""SAE quality (issue 7): one HierarchicalTopK SAE at k = 8, 16, 32, 64 against four TopK SAEs trained
separately at those k, and Matryoshka prefixes against TopK SAEs of the prefix sizes, in one run.

Two HierarchicalTopK SAEs are trained: the catalog's (hier_loss="log_area", the 1/j-weighted geometric
mean of the prefix errors) and the paper's loss (hier_loss="mean", the arithmetic mean); the verdict is
on the catalog's.

Every SAE is trained by the common Trainer from its catalog entry on the same activations: the residual
stream after block 2 of a trained lm-dense-tiny (`zoo train lm-dense-tiny --steps 300 --out /tmp/sae-src`),
harvested once into the activation store and read in the same (seed, step) order, with the same steps,
batch, learning rate and schedule. So "the same total activations" holds exactly. Evaluation is on the
validation split's activations (FVU, L0, dead/dense fractions) and on validation sequences (loss
recovered with the SAE spliced in).

    python benchmarks/sae_quality.py --source /tmp/sae-src/final          # ~200 steps per SAE
    python benchmarks/sae_quality.py --steps 400 --json /tmp/sae_quality.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from train.config import parse_args
from train.sae_eval import ce_metrics, plot_fvu_vs_l0, reconstruction_metrics
from train.trainer import Trainer


def main(argv: list[str] | None = None) -> int:
    """Train the SAEs, evaluate them, print Markdown tables, write the FVU-vs-L0 plot."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="/tmp/sae-src/final", help="the trained lm-dense-tiny checkpoint")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ks", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches of 16 x 256 activations")
    p.add_argument("--ce-batches", type=int, default=4, help="validation batches of 16 sequences for loss recovered")
    p.add_argument("--work", default="/tmp/sae-bench-quality")
    p.add_argument("--plot", default="benchmarks/plots/sae_fvu_vs_l0.png")
    p.add_argument("--json", default=None)
    p.add_argument("--hier-vs-topk-only", action="store_true",
                   help="train only the catalog's HierarchicalTopK SAE and the per-k TopK SAEs (no mean-loss "
                        "HierarchicalTopK, no Matryoshka): the verdict's SAEs, for long runs")
    args = p.parse_args(argv)
    work = Path(args.work)
    common = ["--set", f"source_model={args.source}", "--steps", str(args.steps), "--lr", str(args.lr),
              "--warmup-steps", "20", "--weight-decay", "0", "--eval-every", str(args.steps),
              "--checkpoint-every", str(args.steps), "--eval-batches", str(args.eval_batches), "--log-every", "50"]
    trained: dict[str, dict] = {}

    def train(label: str, entry: str, *sets: str) -> Trainer:
        cfg = parse_args([entry, *common, *sum((["--set", s] for s in sets), []), "--out", str(work / label)])
        start = time.perf_counter()
        trainer = Trainer(cfg)
        summary = trainer.run()
        trained[label] = {"seconds": time.perf_counter() - start, "train_acts_per_s": summary["tokens_per_s"],
                          "activations": summary["tokens"]}
        print(f"trained {label} in {trained[label]['seconds']:.0f} s", flush=True)
        return trainer

    def evaluate(trainer: Trainer, **budget) -> dict:
        sae, task = trainer.model, trainer.task
        metrics = reconstruction_metrics(sae, task.val.batches(4096), **budget)
        tokens = task.sae_data.val_token_batches(16, args.ce_batches)
        metrics.update(ce_metrics(task.sae_data.lm, sae, sae.config.hook_point, tokens, **budget))
        return metrics

    # ---- HierarchicalTopK against separate TopK SAEs -------------------------------------------------------
    budgets = sorted({1, 2, 4, *args.ks})
    hier = train("hier-topk", "sae-hier-topk-tiny", f"k={max(args.ks)}", "k_min=1")
    hier_curve = {k: evaluate(hier, k=k) for k in budgets}
    mean_curve = {}
    if not args.hier_vs_topk_only:
        hier_mean = train("hier-topk-mean", "sae-hier-topk-tiny", f"k={max(args.ks)}", "k_min=1", "hier_loss=mean")
        mean_curve = {k: evaluate(hier_mean, k=k) for k in budgets}
    topk = {k: evaluate(train(f"topk-k{k}", "sae-topk-tiny", f"k={k}")) for k in args.ks}

    # ---- Matryoshka prefixes against TopK SAEs of the prefix sizes ---------------------------------------
    prefix, by_width, widths = {}, {}, []
    if not args.hier_vs_topk_only:
        matryoshka = train("matryoshka", "sae-matryoshka-tiny")
        widths = matryoshka.model.config.matryoshka_widths
        prefix = {w: evaluate(matryoshka, width=w) for w in widths}
    for w in widths:  # a TopK SAE with w latents and the prefix's L0 (rounded)
        k = max(1, round(prefix[w]["l0"]))
        by_width[w] = evaluate(train(f"topk-w{w}-k{k}", "sae-topk-tiny", f"d_sae={w}", f"k={k}"))
        by_width[w]["k"] = k

    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\n{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; {when}; source "
          f"{args.source} @ blocks.2 (d 256), 2048 latents unless noted, {args.steps} steps x 4096 activations "
          f"each, lr {args.lr}; eval {hier.task.val.rows:,} validation activations\n")
    print("| k | HierarchicalTopK FVU (log_area) | TopK (separate) FVU | hier / topk | hier L0 | hier loss rec. | "
          "topk loss rec. | verdict (within 5%) | paper's mean loss: FVU | its / topk | its L0 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for k in args.ks:
        h, t, m = hier_curve[k], topk[k], mean_curve.get(k, {"fvu": float("nan"), "l0": float("nan")})
        ratio = h["fvu"] / t["fvu"]
        verdict = "met" if ratio <= 1.05 else "NOT met"
        print(f"| {k} | {h['fvu']:.4f} | {t['fvu']:.4f} | {ratio:.3f} | {h['l0']:.1f} | "
              f"{h['ce_loss_recovered']:.3f} | {t['ce_loss_recovered']:.3f} | {verdict} | {m['fvu']:.4f} | "
              f"{m['fvu'] / t['fvu']:.3f} | {m['l0']:.1f} |")
    if widths:
        print("\n| prefix width | Matryoshka prefix FVU | its L0 | TopK SAE (width, k) FVU | matryoshka / topk | "
              "prefix loss rec. | topk loss rec. |")
        print("|---|---|---|---|---|---|---|")
    for w in widths:
        m, t = prefix[w], by_width[w]
        print(f"| {w} | {m['fvu']:.4f} | {m['l0']:.1f} | {t['fvu']:.4f} (k={t['k']}) | {m['fvu'] / t['fvu']:.3f} | "
              f"{m['ce_loss_recovered']:.3f} | {t['ce_loss_recovered']:.3f} |")
    print("\n| SAE | train seconds | activations/s | dead frac | dense frac |")
    print("|---|---|---|---|---|")
    finals = {"hier-topk": hier_curve[max(args.ks)], "hier-topk-mean": mean_curve.get(max(args.ks), {}),
              **{f"topk-k{k}": topk[k] for k in args.ks},
              "matryoshka": prefix[widths[-1]] if widths else {},
              **{f"topk-w{w}-k{by_width[w]['k']}": by_width[w] for w in widths}}
    for label, info in trained.items():
        f = finals.get(label, {})
        print(f"| {label} | {info['seconds']:.0f} | {info['train_acts_per_s']:,.0f} | "
              f"{f.get('dead_frac', float('nan')):.3f} | {f.get('dense_frac', float('nan')):.3f} |")
    curves = {f"HierarchicalTopK, log-area loss (one SAE, k = 1..{max(args.ks)})":
              [(r["l0"], r["fvu"]) for r in hier_curve.values()],
              "HierarchicalTopK, the paper's mean loss (one SAE)": [(r["l0"], r["fvu"]) for r in mean_curve.values()],
              "TopK (one SAE per k)": [(t["l0"], t["fvu"]) for t in topk.values()],
              f"Matryoshka prefixes {'/'.join(map(str, widths))} (one SAE)": [(m["l0"], m["fvu"])
                                                                           for m in prefix.values()]}
    curves = {name: points for name, points in curves.items() if points}
    title = f"lm-dense-tiny block 2, 2048 latents, {args.steps} x 4096 activations"
    print(f"\nplot: {plot_fvu_vs_l0(curves, args.plot, title=title)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "when": when, "hier": hier_curve,
                                               "hier_mean": mean_curve, "topk": topk,
                                               "matryoshka": prefix, "topk_by_width": by_width,
                                               "trained": trained}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
