"""Approximation quality of the attention kinds (issue 5): error against exact attention across temperatures.

Every kind gets the same budget B per query: Performer B random features, local a window of B
keys, LSH B keys (B - 1 of its bucket and itself), Scatterbrain B / 2 features plus B / 2 exact
keys (its window, or its LSH chunk). "Scatterbrain 2B" (B features + B keys) is also shown: the
reading where it gets the baselines' budgets added. The error is ||out - exact|| / ||exact||
over all heads, averaged over --draws random draws of features and hashes (seeded).

Inputs, each scaled by sqrt(t) on q and k (so logits scale by t, the inverse softmax temperature):
- random: q, k, v ~ N(0, 1), n = 1024, head_dim 64, causal and non-causal;
- real: q, k (after RoPE) and v of every layer and head of a trained lm-dense-tiny on validation
  text (n = 256, causal), e.g. the dense run of benchmarks/attention_quality.py.

    python benchmarks/attention_approximation.py --checkpoint /tmp/attn-quality/lm-dense-tiny/final
    python benchmarks/attention_approximation.py --checkpoint CKPT --json a.json \
        --plot benchmarks/plots/attention_approximation.png

Prints Markdown tables for BENCHMARKS.md with, per temperature, Scatterbrain's error over the
better of its two components (target <= 0.5, and never > 1).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch

from layers.attention import KINDS
from layers.attention.dense import sdpa_attention

TEMPERATURES = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0]


def kinds_at_budget(budget: int, n: int, head_dim: int) -> dict[str, tuple[str, dict]]:
    """name -> (kind, kwargs) at `budget` entries per query (LSH buckets sized to hold about `budget` keys)."""
    half = budget // 2
    buckets = max(2, 2 * round(n / budget / 2))
    return {
        "performer": ("performer", dict(n_features=budget)),
        "local": ("local", dict(window=budget)),
        "lsh": ("lsh", dict(n_buckets=buckets, chunk=budget - 1)),
        "scatterbrain (local)": ("scatterbrain", dict(n_features=half, window=half)),
        "scatterbrain (lsh)": ("scatterbrain", dict(n_features=half, window=0, lsh_chunk=half - 1,
                                                    n_buckets=buckets)),
        "scatterbrain 2B (local)": ("scatterbrain", dict(n_features=budget, window=budget)),
        "scatterbrain 2B (lsh)": ("scatterbrain", dict(n_features=budget, window=0, lsh_chunk=budget - 1,
                                                       n_buckets=buckets)),
    }


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def entropy(q: torch.Tensor, k: torch.Tensor, causal: bool) -> float:
    """Mean entropy (nats) of the exact attention rows, computed in query blocks."""
    total, rows = 0.0, 0
    n = k.shape[-2]
    for s in range(0, q.shape[-2], 256):
        logits = q[:, :, s : s + 256] @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if causal:
            pos = torch.arange(s, min(s + 256, n))[:, None]
            logits = logits.masked_fill(pos < torch.arange(n)[None, :], float("-inf"))
        p = logits.softmax(-1)
        total += -(p * p.clamp_min(1e-30).log()).sum().item()
        rows += p.shape[0] * p.shape[1] * p.shape[2]
    return total / rows


def sweep(q, k, v, causal: bool, budget: int, draws: int) -> list[dict]:
    """Errors of every kind at every temperature."""
    n, d = k.shape[-2], k.shape[-1]
    rows = []
    for t in TEMPERATURES:
        qt, kt = q * math.sqrt(t), k * math.sqrt(t)
        ref = sdpa_attention(qt, kt, v, causal=causal)
        row = {"temperature_scale": t, "entropy": entropy(qt, kt, causal)}
        for name, (kind, kw) in kinds_at_budget(budget, n, d).items():
            errs = []
            for seed in range(draws):
                torch.manual_seed(seed)
                module = KINDS[kind](head_dim=d, **kw).eval()
                with torch.no_grad():
                    errs.append(relative_error(module(qt, kt, v, causal=causal), ref))
            row[name] = sum(errs) / len(errs)
        rows.append(row)
    return rows


@torch.no_grad()
def real_qkv(checkpoint: str, n_texts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (texts * layers, heads, 256, head_dim) that a trained LM's attention saw on validation text."""
    from train.data import load_token_data
    from zoo import load

    model = load(checkpoint).eval()
    data = load_token_data(None, seq_len=model.config.max_seq_len, val_fraction=0.05)
    batch = next(iter(data.val_batches(n_texts)))[:, :-1]
    seen = []
    hooks = [b.attn.kernel.register_forward_hook(lambda m, args, out: seen.append(args)) for b in model.blocks]
    model(input_ids=batch)
    for h in hooks:
        h.remove()
    q, k, v = (torch.cat([s[i] for s in seen]) for i in range(3))
    return q, k, v


def table(rows: list[dict], pairs: list[tuple[str, str, str]]) -> str:
    """Markdown: errors per temperature, and Scatterbrain over the better of its two components."""
    names = [n for n in rows[0] if n not in ("temperature_scale", "entropy")]
    head = "| logit scale t | entropy (nats) | " + " | ".join(names) + " | " + " | ".join(
        f"{sb} / min({a}, {b})" for sb, a, b in pairs) + " |"
    lines = [head, "|" + "---|" * (2 + len(names) + len(pairs))]
    for r in rows:
        ratios = [r[sb] / min(r[a], r[b]) for sb, a, b in pairs]
        lines.append(f"| {r['temperature_scale']:g} | {r['entropy']:.2f} | "
                     + " | ".join(f"{r[n]:.3f}" for n in names) + " | "
                     + " | ".join(f"**{x:.2f}**" for x in ratios) + " |")
    return "\n".join(lines)


PAIRS = [("scatterbrain (local)", "performer", "local"), ("scatterbrain (lsh)", "performer", "lsh"),
         ("scatterbrain 2B (local)", "performer", "local"), ("scatterbrain 2B (lsh)", "performer", "lsh")]


def plot(results: dict, path: str) -> None:
    """One panel per input set: error against the logit scale, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.4), sharey=True)
    for ax, (title, rows) in zip(axes, results.items(), strict=True):
        ts = [r["temperature_scale"] for r in rows]
        for name in ("performer", "local", "lsh", "scatterbrain (local)", "scatterbrain (lsh)"):
            ax.plot(ts, [r[name] for r in rows], marker="o", ms=3, label=name,
                    linestyle="-" if "scatterbrain" in name else "--")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("logit scale t (1 / temperature)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("relative error vs exact")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a trained lm-dense-tiny checkpoint for the real q/k/v")
    parser.add_argument("--n", type=int, default=1024, help="sequence length of the random inputs")
    parser.add_argument("--budget", type=int, default=64, help="entries per query, random inputs")
    parser.add_argument("--real-budget", type=int, default=32, help="entries per query, real inputs (n = 256)")
    parser.add_argument("--heads", type=int, default=4, help="random heads")
    parser.add_argument("--texts", type=int, default=2, help="validation texts for the real inputs")
    parser.add_argument("--draws", type=int, default=2, help="feature / hash draws averaged")
    parser.add_argument("--no-random", action="store_true", help="only the real q/k/v")
    parser.add_argument("--json")
    parser.add_argument("--plot")
    args = parser.parse_args(argv)
    started = datetime.now(timezone.utc)
    results = {}
    if not args.no_random:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, args.heads, args.n, 64, generator=g) for _ in range(3))
        results[f"random, causal (n={args.n}, B={args.budget})"] = sweep(q, k, v, True, args.budget, args.draws)
        results[f"random, non-causal (n={args.n}, B={args.budget})"] = sweep(q, k, v, False, args.budget, args.draws)
    if args.checkpoint:
        rq, rk, rv = real_qkv(args.checkpoint, args.texts)
        results[f"lm-dense-tiny q/k/v, causal (n=256, B={args.real_budget})"] = sweep(
            rq, rk, rv, True, args.real_budget, args.draws)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    print(f"Approximation error vs exact attention. {machine}. {started:%Y-%m-%d %H:%M} UTC. "
          f"Mean of {args.draws} draws.\n")
    for title, rows in results.items():
        print(f"#### {title}\n")
        print(table(rows, PAIRS) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"started": started.isoformat(), "machine": machine,
                                               "args": vars(args), "results": results}, indent=2))
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
