"""Approximation quality of the attention kinds (issue 5): error against exact attention across temperatures.

Every kind gets the same budget B per query: Performer B random features, local a window of B
keys, LSH B keys (B - 1 of its bucket and itself), Scatterbrain B / 2 features plus B / 2 exact
keys (its window, or its LSH chunk). "Scatterbrain 2B" (B features + B keys) is also shown: the
reading where it gets the baselines' budgets added. The error is ||out - exact|| / ||exact||
over all heads, averaged over --draws random draws of features and hashes (seeded).

"lsh (smyrf)" and "scatterbrain (smyrf)" hash with SMYRF's asymmetric transform in --rounds rounds
(balanced clusters when non-causal) of 8 buckets, their chunk cut so that the rounds together
hold at most the same budget (each key counted once, so a little less). Recall@m: the
fraction of each query's m largest visible q.k (exact, from the dense scores) that a kind's
exact support holds (the same at every temperature: the hashes and windows do not depend on
the scale).

Inputs, each scaled by sqrt(t) on q and k (so logits scale by t, the inverse softmax temperature):
- random: q, k, v ~ N(0, 1), n = 1024, head_dim 64, causal and non-causal (no structure to find);
- heavy hitters: queries in 8 clusters (centre norm 3, noise 0.5 per coordinate), keys N(0, 1)
  except 2 per cluster of norm 2 sqrt(head_dim) along its centre, v ~ N(0, 1): a few keys take
  a large share of each query's softmax, the rest a diffuse remainder (sparse + low rank);
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


ROUNDS = 4  # SMYRF hash rounds (--rounds)
SMYRF_BUCKETS = 8


def buckets_for(n: int, chunk: int) -> int:
    """An even number of LSH buckets that hold about `chunk` keys each."""
    return max(2, 2 * round(n / chunk / 2))


def kinds_at_budget(budget: int, n: int, head_dim: int, rounds: int | None = None) -> dict[str, tuple[str, dict]]:
    """name -> (kind, kwargs) at `budget` entries per query (LSH buckets sized to hold about `budget` keys)."""
    rounds = rounds or ROUNDS
    half = budget // 2
    buckets = buckets_for(n, budget)
    chunk, half_chunk = max(1, (budget - 1) // rounds), max(1, (half - 1) // rounds)  # rounds * chunk + itself
    smyrf = dict(hashing="smyrf", n_hashes=rounds)
    return {
        "performer": ("performer", dict(n_features=budget)),
        "local": ("local", dict(window=budget)),
        "lsh": ("lsh", dict(n_buckets=buckets, chunk=budget - 1)),
        # 8 buckets: balanced rounds fill a small bucket from its neighbours, and causal rounds (a query reads
        # the `chunk` latest keys of its bucket) need buckets that hold them (8 recalled more than 16 or 64)
        "lsh (smyrf)": ("lsh", dict(n_buckets=SMYRF_BUCKETS, chunk=chunk, **smyrf)),
        "scatterbrain (smyrf)": ("scatterbrain", dict(n_features=half, window=0, lsh_chunk=half_chunk,
                                                      n_buckets=SMYRF_BUCKETS, **smyrf)),
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


SUPPORTS = ("local", "lsh", "lsh (smyrf)", "scatterbrain (local)", "scatterbrain (lsh)", "scatterbrain (smyrf)")


@torch.no_grad()
def support_of(module, q, k, causal: bool) -> torch.Tensor:
    """(b, h, q_len, k_len) bool: the pairs a kind computes exactly (its window, its hash chunks, itself)."""
    if hasattr(module, "support"):
        return module.support(q, k, causal)
    from layers.attention.local import in_window

    q_len, k_len = q.shape[-2], k.shape[-2]
    q_pos = torch.arange(k_len - q_len, k_len)[:, None]
    return in_window(q_pos, torch.arange(k_len)[None, :], module.window, causal, k_len).expand(
        q.shape[0], q.shape[1], q_len, k_len)


@torch.no_grad()
def recall_at(support: torch.Tensor, q: torch.Tensor, k: torch.Tensor, causal: bool,
              tops: tuple[int, ...]) -> dict[str, float]:
    """Over all queries: the mean fraction of its m largest visible q.k in `support` for each m in `tops`
    ("recall@m"), and the support's mean size ("keys")."""
    scores = q @ k.transpose(-1, -2)
    if causal:
        n = k.shape[-2]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    out = {"keys": support.sum(-1).float().mean().item()}
    for m in tops:
        top = scores.topk(m, dim=-1)
        visible = torch.isfinite(top.values)
        out[f"recall@{m}"] = ((support.gather(-1, top.indices) & visible).sum() / visible.sum()).item()
    return out


def recalls(q, k, causal: bool, budget: int, draws: int, tops: tuple[int, ...]) -> dict[str, dict]:
    """Recall@m and support size of every sparse part, averaged over the draws."""
    n, d = k.shape[-2], k.shape[-1]
    out = {}
    for name, (kind, kw) in kinds_at_budget(budget, n, d).items():
        if name not in SUPPORTS:
            continue
        got = []
        for seed in range(draws):
            torch.manual_seed(seed)
            got.append(recall_at(support_of(KINDS[kind](head_dim=d, **kw).eval(), q, k, causal), q, k, causal, tops))
        out[name] = {key: sum(g[key] for g in got) / len(got) for key in got[0]}
    return out


def heavy_hitter_qkv(n: int, heads: int, d: int = 64, clusters: int = 8, per_cluster: int = 2,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(1, heads, n, d) q, k, v: clustered queries, a few large-norm keys along the cluster centres (see above)."""
    g = torch.Generator().manual_seed(seed)
    qs, ks = [], []
    for _ in range(heads):
        centres = torch.nn.functional.normalize(torch.randn(clusters, d, generator=g), dim=-1)
        q = centres[torch.randint(0, clusters, (n,), generator=g)] * 3 + 0.5 * torch.randn(n, d, generator=g)
        k = torch.randn(n, d, generator=g)
        heavy = torch.randperm(n, generator=g)[: clusters * per_cluster]
        k[heavy] = centres.repeat(per_cluster, 1) * 2 * math.sqrt(d) + 0.5 * torch.randn(len(heavy), d, generator=g)
        qs.append(q)
        ks.append(k)
    v = torch.randn(1, heads, n, d, generator=g)
    return torch.stack(qs)[None], torch.stack(ks)[None], v


def recall_table(found: dict[str, dict]) -> str:
    """Markdown: recall@m of the largest q.k and exact keys per query of each sparse support."""
    cols = [c for c in next(iter(found.values())) if c != "keys"]
    lines = ["| support | " + " | ".join(cols) + " | exact keys per query |", "|---|" + "---|" * (len(cols) + 1)]
    lines += [f"| {name} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + f" | {r['keys']:.1f} |"
              for name, r in found.items()]
    return "\n".join(lines)


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
         ("scatterbrain (smyrf)", "performer", "lsh (smyrf)"),
         ("scatterbrain 2B (local)", "performer", "local"), ("scatterbrain 2B (lsh)", "performer", "lsh")]


def plot(results: dict, path: str) -> None:
    """One panel per input set: error against the logit scale, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.4), sharey=True)
    for ax, (title, rows) in zip(axes, results.items(), strict=True):
        ts = [r["temperature_scale"] for r in rows]
        for name in ("performer", "local", "lsh", "lsh (smyrf)", "scatterbrain (local)", "scatterbrain (lsh)",
                     "scatterbrain (smyrf)"):
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
    global ROUNDS  # --rounds sets the module's default, which kinds_at_budget reads
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a trained lm-dense-tiny checkpoint for the real q/k/v")
    parser.add_argument("--n", type=int, default=1024, help="sequence length of the random inputs")
    parser.add_argument("--budget", type=int, default=64, help="entries per query, random inputs")
    parser.add_argument("--real-budget", type=int, default=32, help="entries per query, real inputs (n = 256)")
    parser.add_argument("--heads", type=int, default=4, help="random heads")
    parser.add_argument("--texts", type=int, default=2, help="validation texts for the real inputs")
    parser.add_argument("--draws", type=int, default=2, help="feature / hash draws averaged")
    parser.add_argument("--no-random", action="store_true", help="no i.i.d. Gaussian q/k/v")
    parser.add_argument("--no-heavy", action="store_true", help="no heavy-hitter q/k/v")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="SMYRF hash rounds")
    parser.add_argument("--top", default="2,8", help="the m of recall@m, comma-separated")
    parser.add_argument("--json")
    parser.add_argument("--plot")
    args = parser.parse_args(argv)
    started = datetime.now(timezone.utc)
    ROUNDS = args.rounds
    results, found = {}, {}
    inputs = []  # (title, q, k, v, causal, budget)
    if not args.no_random:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, args.heads, args.n, 64, generator=g) for _ in range(3))
        inputs += [(f"random, causal (n={args.n}, B={args.budget})", q, k, v, True, args.budget),
                   (f"random, non-causal (n={args.n}, B={args.budget})", q, k, v, False, args.budget)]
    if not args.no_heavy:
        q, k, v = heavy_hitter_qkv(args.n, args.heads)
        inputs += [(f"heavy hitters, causal (n={args.n}, B={args.budget})", q, k, v, True, args.budget),
                   (f"heavy hitters, non-causal (n={args.n}, B={args.budget})", q, k, v, False, args.budget)]
    if args.checkpoint:
        rq, rk, rv = real_qkv(args.checkpoint, args.texts)
        inputs.append((f"lm-dense-tiny q/k/v, causal (n={rk.shape[-2]}, B={args.real_budget})", rq, rk, rv, True,
                       args.real_budget))
    for title, q, k, v, causal, budget in inputs:
        results[title] = sweep(q, k, v, causal, budget, args.draws)
        found[title] = recalls(q, k, causal, budget, args.draws, tuple(int(m) for m in args.top.split(",")))
        print(f"[{datetime.now(timezone.utc):%H:%M:%S}] {title} done", flush=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    print(f"Approximation error vs exact attention. {machine}. {started:%Y-%m-%d %H:%M} UTC. "
          f"Mean of {args.draws} draws.\n")
    for title, rows in results.items():
        print(f"#### {title}\n")
        print(table(rows, PAIRS) + "\n")
        print(recall_table(found[title]) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"started": started.isoformat(), "machine": machine,
                                               "args": vars(args), "results": results, "recall": found}, indent=2))
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
