"""Every seed claim of BENCHMARKS.md re-measured under the protocol (issue 17 item 6), with a verdict.

The frontier (`zoo frontier`) already trains every LM family under the protocol of train/protocol.py (a
learning-rate sweep at seed 0 chosen on the selection half of the held-out blocks, seeds 0..N-1 at that rate,
equal tokens). This script reads its ledger (never writes it), trains only what the claims need beyond it,
into its own ledger, and computes each claim's paired difference over seeds on the report half:

- MoE against dense at equal active FLOPs (moe, moe-fine, moe-topp): from the frontier's runs.
- Scatterbrain against its two parts at equal budget (local with the whole window budget, Performer with the
  whole feature budget) and against dense: from the frontier's runs.
- Monarch / Pixelfly against dense and against a dense LM of their parameter count (lm-dense-tiny at
  d_model 128, trained here under the same protocol: its own learning-rate sweep and seeds).
- MoE k at inference: moe-fine-tiny (trained at k = 8) evaluated at k = 4 and k = 16 against k = 8, paired by
  seed. The frontier keeps only seed 0's checkpoint, so seeds 1.. are trained again here at the frontier's
  chosen rate (the same specs) and kept.
- The SAE claims (HierarchicalTopK against per-k TopK, Matryoshka prefixes) come from benchmarks/sae_regime.py;
  its JSON is read if given (--sae-json) and its rows join the table.

    python benchmarks/seed_claims.py --frontier runs/frontier --out runs/claims

Writes OUT/claims.json and OUT/claims.md (the verdict table). Resumable: finished runs and evaluations are in
OUT/runs.json. Needs a frontier ledger with at least the dense, moe-fine, local, performer, scatterbrain,
monarch and pixelfly families (whatever is missing is reported as such, not guessed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.frontier import FAMILIES, Missing, ReadOnlyLedger  # noqa: E402
from train.protocol import Ledger, Protocol, held_out_losses, paired_difference, train_run, verdict  # noqa: E402

EQUAL_PARAMS_DENSE = {"d_model": 128}  # 0.89M parameters: the structured tiny LMs have 0.83-0.91M
K_TRAINED, K_OTHERS = 8, (4, 16)


def _say(text: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {text}", flush=True)


class ChainLedger:
    """Reads `first` (the frontier's ledger, never written), records new runs in `own`."""

    def __init__(self, first: Ledger, own: Ledger):
        self.first, self.own = first, own
        self.runs = {**first.runs, **own.runs}

    def run(self, key, fn):
        if key in self.first:
            return self.first.get(key), True
        record, skipped = self.own.run(key, fn)
        self.runs[key] = record
        return record, skipped


def frontier_settings(ledger: Ledger, frontier: Path | None = None) -> dict:
    """The protocol settings of the frontier's runs (all of them share steps, batch, data...). The learning-rate
    grid and its edge extensions come from the frontier's frontier.json when it has one; else the grid is the
    rates every model ran at seed 0, and extensions are the most any model ran beyond it."""
    specs = [r["spec"] for r in ledger.runs.values() if isinstance(r, dict) and "spec" in r]
    if not specs:
        raise SystemExit(f"{ledger.path} holds no training runs: run `zoo frontier` first")
    s = specs[0]
    per_model: dict[str, set] = {}
    for x in specs:
        if x["seed"] == 0:
            per_model.setdefault(x["model"], set()).add(x["lr"])
    lrs = sorted(set.intersection(*per_model.values()))
    extend = max(len(v) for v in per_model.values()) - len(lrs)
    report = frontier / "frontier.json" if frontier else None
    if report and report.is_file():
        written = json.loads(report.read_text()).get("settings", {})
        lrs, extend = sorted(written.get("lrs", lrs)), written.get("extend_edges", 0)
    seeds = sorted({x["seed"] for x in specs})
    return {"steps": s["steps"], "batch_size": s["batch_size"], "seq_len": s["seq_len"],
            "data": tuple(s["data"]) if s["data"] else None, "warmup_steps": s["warmup_steps"],
            "eval_blocks": s["eval_blocks"], "lrs": tuple(lrs), "extend_edges": extend, "seeds": tuple(seeds),
            "overrides": {k: v for k, v in s["overrides"]}}


def family_result(ledger, protocol: Protocol, model: str, overrides: dict | None = None) -> dict | None:
    """The frontier-style result of `model` (the protocol's own choice of rate, edge extensions included) if its
    sweep and seeds are all in the ledger, else None (the frontier's --set overrides are part of every spec:
    `overrides` is added to them)."""
    overrides = {**protocol.overrides, **(overrides or {})}
    reader = dataclasses.replace(protocol, ledger=ReadOnlyLedger(ledger), progress=lambda text: None)
    try:
        return reader.model(model, overrides)
    except Missing:
        return None


def by_seed(result: dict) -> dict[int, float]:
    return {r["spec"]["seed"]: r["report_loss"] for r in result["runs"]}


def outcome(v: str, expected: str, half_width: float) -> str:
    """What the measurement says of a claim: a direction claim is confirmed / contradicted / not resolved; an
    equivalence claim ('no resolved difference') is contradicted by a resolved difference, else only consistent
    with the data to within the interval (equivalence is never proven by a wide interval)."""
    if expected == "no resolved difference":
        return "contradicted" if v != expected else f"consistent (not resolved: +/-{half_width:.3f})"
    if v == expected:
        return "confirmed"
    return "not resolved" if v == "no resolved difference" else "contradicted"


def claim_row(claim: str, source: str, a: dict[int, float], b: dict[int, float], expected: str,
              lower_is_better: bool = True, unit: str = "nats/byte") -> dict:
    """`a - b` paired by seed; expected is what the paper / the old benchmark claimed ('better', 'worse' or
    'no resolved difference' for a claim of equal quality)."""
    seeds = sorted(set(a) & set(b))
    d = paired_difference([a[s] for s in seeds], [b[s] for s in seeds])
    v = verdict(d, lower_is_better)
    return {"claim": claim, "source": source, "seeds": seeds, "mean": d["mean"], "low": d["low"], "high": d["high"],
            "p": d["p"], "verdict": v, "expected": expected, "unit": unit,
            "outcome": outcome(v, expected, (d["high"] - d["low"]) / 2)}


def moe_k_claims(protocol: Protocol, ledger: ChainLedger, own: Ledger, work: Path, lr: float) -> list[dict]:
    """moe-fine-tiny at k = 4 / 16 against its trained k = 8, paired by seed (every seed's checkpoint kept)."""
    from train.data import load_token_data
    from zoo import load

    model = FAMILIES["moe-fine"].format(size="tiny")
    data = load_token_data(list(protocol.data) if protocol.data else None, seq_len=protocol.seq_len)
    losses: dict[int, dict[int, float]] = {k: {} for k in (K_TRAINED, *K_OTHERS)}
    for seed in protocol.seeds:
        spec = protocol.spec(model, lr, seed, protocol.overrides)
        kept = ledger.runs.get(spec.key())
        final = kept.get("final") if kept else None
        if not final or not Path(final).is_dir():  # the frontier removed it: train the same spec again, kept
            record, skipped = own.run("kept:" + spec.key(), lambda spec=spec: train_run(spec, work / "kept", True))
            _say(f"{spec.name()} (kept): report {record['report_loss']:.4f}{' (ledger)' if skipped else ''}")
            final = record["final"]
        for k in losses:
            key = json.dumps(["k", final, k, protocol.eval_blocks])
            row, _ = own.run(key, lambda k=k, final=final: held_out_losses(load(final, num_experts_per_tok=k),
                                                                          data, protocol.batch_size,
                                                                          protocol.eval_blocks))
            losses[k][seed] = row["report_loss"]
        _say(f"seed {seed}: " + ", ".join(f"k={k} {losses[k][seed]:.4f}" for k in losses))
    return [claim_row(f"moe-fine-tiny (trained at k=8) at k={k} instead of 8 is worse", "issue 4, MoE k table",
                      losses[k], losses[K_TRAINED], "worse") for k in K_OTHERS]


def sae_rows(path: Path) -> list[dict]:
    """The claims of benchmarks/sae_regime.py's JSON as rows of the table: the paired FVU difference (first - second,
    over seeds), with the FVU ratio and its interval in the outcome (rows already in the table's form pass as
    they are)."""
    data = json.loads(path.read_text())
    rows = []
    for r in data.get("claims") or data.get("verdicts") or []:
        if {"claim", "mean", "low", "high"} <= set(r):
            rows.append(r)
            continue
        if "diff" not in r:
            continue
        d = r["diff"]
        ratio = (f"FVU ratio {r['ratio_mean']:.3f} [{r['ratio_low']:.3f}, {r['ratio_high']:.3f}]"
                 if "ratio_mean" in r else "")
        outcome = {"better": "first better", "worse": "first worse"}.get(r.get("verdict"), "not resolved")
        rows.append({"claim": r["claim"], "source": r.get("earlier", "benchmarks/sae_regime.py"), "mean": d["mean"],
                     "low": d["low"], "high": d["high"], "p": d.get("p"), "n": d.get("n", r.get("n")),
                     "unit": "FVU", "verdict": r.get("verdict", ""),
                     "outcome": f"{outcome}: {ratio}" if ratio else outcome})
    return rows


def markdown(rows: list[dict], settings: dict, missing: list[str]) -> str:
    lines = [f"Protocol: {settings['steps']} steps x {settings['batch_size']} x {settings['seq_len']} tokens per run, "
             f"lr best of {list(settings['lrs'])} at seed 0, seeds {list(settings['seeds'])}; report half of the "
             "interleaved held-out blocks; difference = (first - second), 95% t interval over seeds.", "",
             "| claim | from | paired difference [95% CI] | p | n | measured | claim's outcome |",
             "|---|---|---:|---:|---:|---|---|"]
    for r in rows:
        p = "-" if r.get("p") is None or r["p"] != r["p"] else f"{r['p']:.3f}"
        n = len(r["seeds"]) if isinstance(r.get("seeds"), list) else r.get("n", "-")
        lines.append(f"| {r['claim']} | {r.get('source', '')} | {r['mean']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}] "
                     f"{r.get('unit', '')} | {p} | {n} | {r.get('verdict', '')} | **{r.get('outcome', '')}** |")
    if missing:
        lines += ["", "Not measured (not in the ledger): " + "; ".join(missing)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frontier", required=True, help="the output folder of `zoo frontier` (its runs.json is read)")
    p.add_argument("--out", default="runs/claims", help="output folder: runs.json (resumable), claims.json/.md")
    p.add_argument("--sae-json", default=None, help="benchmarks/sae_regime.py's JSON, whose claims join the table")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--no-train", action="store_true", help="only what the ledgers already hold")
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    first = Ledger(Path(args.frontier) / "runs.json")
    own = Ledger(out / "runs.json")
    ledger = ChainLedger(first, own)
    settings = frontier_settings(first, Path(args.frontier))
    protocol = Protocol(ledger=ledger, work=out / "lm", seeds=settings["seeds"], lrs=settings["lrs"],
                        extend=settings["extend_edges"],
                        steps=settings["steps"], batch_size=settings["batch_size"], seq_len=settings["seq_len"],
                        data=settings["data"], warmup_steps=settings["warmup_steps"],
                        eval_blocks=settings["eval_blocks"], progress=_say)
    protocol.overrides = settings["overrides"]  # the frontier's --set fields, in every spec
    fam = {f: family_result(ledger, protocol, FAMILIES[f].format(size="tiny")) for f in FAMILIES}
    missing = [f for f, r in fam.items() if r is None]
    rows: list[dict] = []
    dense = fam["dense"]
    if dense is None:
        raise SystemExit("the frontier ledger has no complete dense family yet")
    d = by_seed(dense)
    dense_flops = dense["runs"][0]["active_flops_per_token"]
    for f, claim in (("moe", "moe-tiny (top-2 of 8) beats dense at equal active FLOPs"),
                     ("moe-fine", "moe-fine-tiny (top-8 of 64 + shared) beats dense at equal active FLOPs"),
                     ("moe-topp", "moe-topp-tiny (top-p 0.4) matches dense with fewer active FLOPs")):
        if fam[f]:
            expected = "no resolved difference" if f == "moe-topp" else "better"
            row = claim_row(claim, "issue 4 / Switch, Mixtral, DeepSeek-MoE", by_seed(fam[f]), d, expected)
            flops = sum(r["active_flops_per_token"] for r in fam[f]["runs"]) / len(fam[f]["runs"])
            row["active_flops_ratio"] = flops / dense_flops  # top-p: the mean k measured on held-out tokens
            if f == "moe-topp" and flops >= dense_flops:  # the claim's other half
                row["outcome"] = f"contradicted: {flops / dense_flops:.2f}x dense's active FLOPs (measured mean k)"
            rows.append(row)
    if fam["scatterbrain"]:
        s = by_seed(fam["scatterbrain"])
        for part in ("local", "performer"):
            if fam[part]:
                rows.append(claim_row(f"scatterbrain (32 features + window 32) beats {part} at the same budget "
                                      f"({'window 64' if part == 'local' else '64 features'}) in training",
                                      "Scatterbrain paper", s, by_seed(fam[part]), "better"))
        rows.append(claim_row("scatterbrain is as good as dense attention in training", "issue 5 table", s, d,
                              "no resolved difference"))
    for f in ("local", "lsh", "performer"):
        if fam[f]:
            rows.append(claim_row(f"{f} attention is as good as dense in training", "issue 5 table",
                                  by_seed(fam[f]), d, "no resolved difference"))
    small_name = FAMILIES["dense"].format(size="tiny")
    small = family_result(ledger, protocol, small_name, EQUAL_PARAMS_DENSE)
    if small is None and not args.no_train:
        _say(f"training {small_name} with {EQUAL_PARAMS_DENSE} (the structured LMs' parameter count)")
        small = protocol.model(small_name, {**protocol.overrides, **EQUAL_PARAMS_DENSE})
    for f in ("monarch", "pixelfly"):
        if fam[f]:
            rows.append(claim_row(f"{f} beats lm-dense-tiny (3.3M params) at equal steps", "issue 6 table",
                                  by_seed(fam[f]), d, "better"))
            if small:
                rows.append(claim_row(f"{f} beats a dense LM of its parameter count (d_model 128)", "issue 6 table",
                                      by_seed(fam[f]), by_seed(small), "better"))
    if fam["moe-fine"] and not args.no_train:
        rows += moe_k_claims(protocol, ledger, own, out, fam["moe-fine"]["lr"])
    if args.sae_json and Path(args.sae_json).is_file():
        rows += sae_rows(Path(args.sae_json))
    report = {"settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()},
              "frontier": str(args.frontier), "claims": rows, "missing": missing,
              "equal_params_dense": None if small is None else {"lr": small["lr"], "report_losses": by_seed(small),
                                                                "total_params": small["runs"][0]["total_params"]},
              "written": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"}
    (out / "claims.json").write_text(json.dumps(report, indent=2, default=str))
    md = markdown(rows, settings, missing)
    (out / "claims.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
