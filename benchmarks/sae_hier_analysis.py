"""Why HierarchicalTopK decodes with fewer than k latents at its largest budget (issue 7, BENCHMARKS.md).

Reads the SAEs that `benchmarks/sae_quality.py --work DIR` trained (DIR/hier-topk/final and
DIR/topk-k64/final) and, on validation activations of their source LM, reports for each:
- how many of the top-64 pre-activations per token are positive (ReLU keeps only those), by rank;
- how often the least-squares coefficient of each ranked atom is negative when x - b_dec is fitted
  with the SAE's own top-64 atoms freely (a negative best coefficient is a correction ReLU cannot make);
- at each budget k: the FVU as trained, with the best single gain on the latents, and with each token's
  coefficients refitted by least squares on the same k atoms (free, and clamped at 0), next to the FVU
  of the TopK SAE trained at that k (DIR/topk-k{k}/final): is it the atoms the HierarchicalTopK SAE
  picks, or the values it gives them, that cost it against TopK?

    python benchmarks/sae_quality.py --steps 600 --work /tmp/sae-bench-quality-600
    python benchmarks/sae_hier_analysis.py --work /tmp/sae-bench-quality-600
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from train.sae_task import SAEData
from zoo import load

RANKS = (1, 8, 16, 32, 48, 64)


@torch.no_grad()
def analyse(sae, x: torch.Tensor, k: int, fit_rows: int) -> dict:
    """Positive fraction and negative-least-squares fraction of the top-k atoms, by rank."""
    xs = x.float() * sae.scale
    top = sae.pre_activations(xs).topk(k, dim=-1)
    positive = (top.values > 0).float()  # (rows, k)
    weight, r = sae.decoder_weight(), xs - sae.b_dec
    negative = torch.stack([
        (torch.linalg.lstsq(weight[top.indices[t]].T, r[t:t + 1].T).solution.squeeze(1) < 0).float()
        for t in range(min(fit_rows, x.shape[0]))])  # (fit_rows, k)
    return {"positive_per_token": float(positive.sum(1).mean()),
            "positive_by_rank": {rank: float(positive[:, rank - 1].mean()) for rank in RANKS if rank <= k},
            "negative_ls_by_rank": {rank: float(negative[:, rank - 1].mean()) for rank in RANKS if rank <= k}}


@torch.no_grad()
def refit(sae, x: torch.Tensor, k: int) -> dict:
    """FVU at budget k: as trained, with the best global gain, and with per-token least-squares values."""
    xs = x.float() * sae.scale
    r = xs - sae.b_dec
    top = sae.pre_activations(xs).topk(k, dim=-1)
    atoms = sae.decoder_weight()[top.indices]  # (rows, k, d)
    x_hat = (atoms * top.values.relu().unsqueeze(2)).sum(1)
    gain = float((r * x_hat).sum() / x_hat.square().sum())
    ls = torch.linalg.lstsq(atoms.transpose(1, 2), r.unsqueeze(2)).solution  # (rows, k, 1)
    variance = (xs - xs.mean(0)).square().sum()

    def fvu(fit: torch.Tensor) -> float:
        return float((r - fit).square().sum() / variance)

    return {"fvu": fvu(x_hat), "gain": gain, "fvu_gain": fvu(gain * x_hat), "fvu_ls": fvu((atoms * ls).sum(1)),
            "fvu_ls_nonneg": fvu((atoms * ls.clamp_min(0)).sum(1))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/sae-bench-quality", help="the --work folder of sae_quality.py")
    p.add_argument("--rows", type=int, default=4096, help="validation activations")
    p.add_argument("--fit-rows", type=int, default=256, help="activations fitted by least squares")
    p.add_argument("--ks", type=int, nargs="+", default=[8, 16, 32, 64], help="budgets of the refit table")
    args = p.parse_args(argv)
    x = None
    for label in ("hier-topk", "topk-k64"):
        sae = load(str(Path(args.work) / label / "final")).eval()
        if x is None:
            c = sae.config
            x = next(iter(SAEData(c.source_model, c.hook_point, None, c.context_size).val_store(args.rows)
                          .batches(args.rows)))
        result = analyse(sae, x, 64, args.fit_rows)
        print(f"{label}: {result['positive_per_token']:.1f} of the top 64 pre-activations positive per token")
        print("  rank:                      " + " ".join(f"{r:>6}" for r in result["positive_by_rank"]))
        print("  positive:                  " + " ".join(f"{v:6.3f}" for v in result["positive_by_rank"].values()))
        print("  least-squares coef. < 0:   " + " ".join(f"{v:6.3f}" for v in result["negative_ls_by_rank"].values()))
    hier = load(str(Path(args.work) / "hier-topk" / "final")).eval()
    print(f"\nFVU on {args.rows:,} validation activations (values refitted per token on the SAE's own top-k atoms)\n")
    print("| k | HierarchicalTopK | best gain (value) | least squares | least squares, >= 0 | TopK SAE at k |")
    print("|---:|---:|---:|---:|---:|---:|")
    for k in args.ks:
        h = refit(hier, x, k)
        topk = load(str(Path(args.work) / f"topk-k{k}" / "final")).eval()
        t = refit(topk, x, k)
        print(f"| {k} | {h['fvu']:.5f} | {h['fvu_gain']:.5f} ({h['gain']:.3f}) | {h['fvu_ls']:.5f} | "
              f"{h['fvu_ls_nonneg']:.5f} | {t['fvu']:.5f} (least squares {t['fvu_ls']:.5f}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
