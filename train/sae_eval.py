"""Evaluation of sparse autoencoders (`zoo eval` on an SAE checkpoint).

- L0: mean number of nonzero latents per token.
- FVU, the fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the
  evaluation activations (0 is perfect, 1 is no better than predicting the mean).
- Dead and dense latents: the fraction of latents that never fire on the evaluation tokens, and of
  those that fire on more than `dense_threshold` of them.
- Loss recovered: the source LM's next-token cross-entropy with the SAE's reconstruction spliced in
  at the hook point (ce_sae), against the clean LM (ce_clean) and the LM with that activation
  zeroed (ce_zero): (ce_zero - ce_sae) / (ce_zero - ce_clean); a perfect SAE recovers 1.0.

For HierarchicalTopK every budget k comes from the one SAE (`encode(x, k=...)`); for Matryoshka
every dictionary prefix. `plot_fvu_vs_l0` draws FVU against L0 for several SAEs in one PNG.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from models.losses import next_token_loss
from train.activations import edit_activation

DENSE_THRESHOLD = 0.1  # a latent firing on more than this fraction of tokens is "dense"


def fraction_of_variance_unexplained(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the rows of (rows, d) activations."""
    x, x_hat = x.detach().double(), x_hat.detach().double()
    return float((x - x_hat).square().sum() / (x - x.mean(0)).square().sum())


def loss_recovered(ce_clean: float, ce_sae: float, ce_zero: float) -> float:
    """(ce_zero - ce_sae) / (ce_zero - ce_clean): 1.0 when splicing the SAE in costs nothing."""
    return (ce_zero - ce_sae) / (ce_zero - ce_clean)


class ReconstructionStats:
    """Streaming sums for FVU, MSE, L0 and per-latent firing counts over batches of activations."""

    def __init__(self, d_sae: int):
        self.rows, self.sse, self.sq, self.l0 = 0, 0.0, 0.0, 0.0
        self.sum_x: torch.Tensor | None = None
        self.fired = torch.zeros(d_sae, dtype=torch.long)

    def update(self, x: torch.Tensor, x_hat: torch.Tensor, code) -> None:
        """Add a batch: raw activations x (rows, d), their reconstruction and the SparseCode used."""
        x, x_hat = x.double(), x_hat.double()
        self.rows += x.shape[0]
        self.sse += float((x - x_hat).square().sum())
        self.sq += float(x.square().sum())
        self.sum_x = x.sum(0) if self.sum_x is None else self.sum_x + x.sum(0)
        self.l0 += float((code.values != 0).sum())
        self.fired += code.fire_counts().cpu()

    def result(self, dense_threshold: float = DENSE_THRESHOLD) -> dict[str, float]:
        """fvu, mse (per token, raw units), l0, dead_frac, dense_frac, rows."""
        # sum ||x - mean||^2 = sum ||x||^2 - rows * ||mean||^2
        total = self.sq - float(self.sum_x.square().sum()) / self.rows
        freq = self.fired.double() / self.rows
        return {"fvu": self.sse / total, "mse": self.sse / self.rows, "l0": self.l0 / self.rows,
                "dead_frac": float((self.fired == 0).double().mean()),
                "dense_frac": float((freq > dense_threshold).double().mean()), "rows": self.rows}


def _unwrap(model: nn.Module) -> nn.Module:
    """The SAE itself inside DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


@torch.no_grad()
def reconstruction_metrics(sae: nn.Module, batches: Iterable[torch.Tensor], k: int | None = None,
                           width: int | None = None, dense_threshold: float = DENSE_THRESHOLD) -> dict[str, float]:
    """FVU, MSE, L0, dead and dense fractions of the SAE (at budget k / prefix width) over activation batches."""
    sae = _unwrap(sae)
    was_training = sae.training
    sae.eval()
    device = sae.W_dec.device
    stats = ReconstructionStats(sae.config.d_sae)
    for x in batches:
        x = x.to(device)
        x_hat, code = sae.reconstruct(x, k=k, width=width)
        stats.update(x, x_hat, code)
    sae.train(was_training)
    return stats.result(dense_threshold)


def _ce_sum(lm: nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> float:
    logits = lm(input_ids=ids).logits
    return float(next_token_loss(logits, targets, shifted=True, reduction="sum"))


@torch.no_grad()
def ce_metrics(lm: nn.Module, sae: nn.Module, hook_point: str, token_batches: Iterable[torch.Tensor],
               k: int | None = None, width: int | None = None) -> dict[str, float]:
    """Cross-entropy of the LM clean, with the SAE spliced in at hook_point, and with that activation zeroed."""
    sae = _unwrap(sae)
    was_training = sae.training
    sae.eval()
    device = next(lm.parameters()).device

    def spliced(a: torch.Tensor) -> torch.Tensor:
        return sae.reconstruct(a.to(sae.W_dec.device), k=k, width=width)[0].view_as(a).to(a.dtype)

    totals = {"ce_clean": 0.0, "ce_sae": 0.0, "ce_zero": 0.0}
    count = 0
    for block in token_batches:
        block = block.to(device)
        ids, targets = block[:, :-1], block[:, 1:]

        totals["ce_clean"] += _ce_sum(lm, ids, targets)
        with edit_activation(lm, hook_point, spliced):
            totals["ce_sae"] += _ce_sum(lm, ids, targets)
        with edit_activation(lm, hook_point, torch.zeros_like):
            totals["ce_zero"] += _ce_sum(lm, ids, targets)
        count += targets.numel()
    sae.train(was_training)
    out = {name: total / count for name, total in totals.items()}
    out["ce_loss_recovered"] = loss_recovered(out["ce_clean"], out["ce_sae"], out["ce_zero"])
    return out


def default_budgets(sae: nn.Module) -> list[dict]:
    """Where to evaluate an SAE: its kind's `eval_budgets` (HierarchicalTopK: every power of two in [k_min, k]
    and k; Matryoshka: every prefix; the others: their own budget)."""
    sae = _unwrap(sae)
    return sae.kind.eval_budgets(sae.config)


def plot_fvu_vs_l0(curves: dict[str, list[tuple[float, float]]], path: str | Path, title: str = "") -> Path:
    """PNG of FVU against L0, one line (or point) per label; `curves` maps label -> [(l0, fvu), ...]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    for label, points in curves.items():
        points = sorted(points)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel("FVU (fraction of variance unexplained)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None, model: nn.Module | None = None) -> int:
    """`zoo eval SAE`: L0, FVU, dead/dense fractions and loss recovered (per budget) as JSON, optionally a plot."""
    from train.data import add_data_flags, data_options

    parser = argparse.ArgumentParser(prog="zoo eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="SAE checkpoint folder, Hub repo id or catalog name")
    parser.add_argument("--seq-len", type=int, default=None, help="default: the SAE's context_size")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per LM batch")
    parser.add_argument("--max-batches", type=int, default=8, help="validation batches of sequences (0: all)")
    add_data_flags(parser)
    parser.add_argument("--source-model", default=None, help="the LM the SAE reads (default: its config's)")
    parser.add_argument("--k", type=int, nargs="+", default=None, help="budgets to evaluate (top-k per token)")
    parser.add_argument("--widths", type=int, nargs="+", default=None, help="dictionary prefixes to evaluate")
    parser.add_argument("--compare", nargs="+", default=[], help="other SAE checkpoints to evaluate and plot")
    parser.add_argument("--plot", default=None, help="write a PNG of FVU against L0 here")
    parser.add_argument("--seed", type=int, default=0, help="seed of the harvest (shuffle, fresh source LMs)")
    args = parser.parse_args(argv)
    if args.streaming:
        raise ValueError("zoo eval of an SAE does not stream: drop --streaming (--max-batches bounds the work)")

    from train.sae_task import SAEData
    from zoo import load

    sae = model if model is not None else load(args.model)
    seq_len = args.seq_len or sae.config.context_size
    source = args.source_model or sae.config.source_model
    data = SAEData(source, sae.config.hook_point, args.data, seq_len, args.val_fraction, seed=args.seed,
                   **data_options(args))
    val_rows = args.max_batches * args.batch_size * seq_len if args.max_batches else 0
    store = data.val_store(val_rows)
    token_batches = data.val_token_batches(args.batch_size, args.max_batches)
    budgets = [{"k": k} for k in args.k or []] + [{"width": w} for w in args.widths or []]

    def evaluate(one: nn.Module, where: list[dict]) -> list[dict]:
        one = one.to(data.device)
        rows = []
        for budget in where:
            metrics = reconstruction_metrics(one, store.batches(4096), **budget)
            metrics.update(ce_metrics(data.lm, one, one.config.hook_point, token_batches, **budget))
            rows.append({**budget, **metrics})
        return rows

    result = {"model": args.model, "kind": sae.config.kind, "source_model": source,
              "hook_point": sae.config.hook_point, "seq_len": seq_len,
              "budgets": evaluate(sae, budgets or default_budgets(sae))}
    if args.compare:
        result["compare"] = {path: evaluate(load(path), [{}]) for path in args.compare}
    if args.plot:  # this SAE's budgets as one curve, the compared SAEs as one curve per kind
        curves = {f"{sae.config.kind} (one SAE)": [(r["l0"], r["fvu"]) for r in result["budgets"]]}
        for path, rows in result.get("compare", {}).items():
            kind = json.loads((Path(path) / "config.json").read_text())["kind"] if Path(path).is_dir() else path
            curves.setdefault(f"{kind} (separate SAEs)", []).extend((r["l0"], r["fvu"]) for r in rows)
        result["plot"] = str(plot_fvu_vs_l0(curves, args.plot, title=f"{source} @ {sae.config.hook_point}"))
    print(json.dumps(result, indent=2))
    return 0
