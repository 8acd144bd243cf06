"""SAEs in a regime like the papers' (issue 17 items 5 and 6): a wider source LM, a 16x dictionary,
k <= ~5% of the width, fresh tokens, and every SAE claim of BENCHMARKS.md re-measured under the protocol.

1. The corpus (default: the bundled mixed corpus) is split by document, alternately, into two files: the
   LM trains on one, the SAEs read the other (`OUT/corpus/{lm,sae}.jsonl.gz`), so no SAE activation
   comes from a position the LM was trained on (nor from a document it saw).
2. The source LM: `lm-dense-tiny` widened (default d_model 640, 2 blocks, 10 heads), trained by the common
   Trainer through `train.protocol.train_run` (held-out losses on the selection / report halves).
3. The SAEs: read the residual stream at `--hook` (default: the last block's output), `--expansion` x the
   width latents, trained by the common Trainer from their catalog entries on activations harvested once
   per seed from the SAE half's train blocks: `steps x batch x seq_len` activations, one pass, no batch
   repeated (`fresh` in the JSON checks it), held-out FVU on activations of its validation blocks (the
   same rows for every SAE and seed). For every seed: TopK at each of `--ks`, ONE HierarchicalTopK SAE
   (k_min 1, k = max(ks)) with the paper's mean loss evaluated at each k, the same with the log-area loss,
   and a Matryoshka BatchTopK SAE (prefixes width/16, width/4, width) against TopK SAEs of each prefix's
   width at the prefix's measured L0 (rounded).
4. The verdicts: paired differences over the seeds (same seed = same activations in the same order),
   mean and 95% t interval (`train.protocol.paired_difference`, `verdict`).

Every finished run goes into a ledger (`OUT/runs.json`, `train.protocol.Ledger`): rerunning the same
command skips it, so an interrupted run resumes; `--stop-at HH:MM` (UTC) starts no new SAE run after
that time and reports the seeds that are complete; `--report-only` writes the report from the ledger.

    python benchmarks/sae_regime.py --out /work/sae-regime-out --threads 1 \
        --json benchmarks/results/sae_regime.json --md benchmarks/results/sae_regime_tables.md
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MIXED_CORPUS = REPO / "train" / "corpus" / "mixed.jsonl.gz"


def _say(text: str) -> None:
    print(f"[{datetime.now(timezone.utc):%H:%M:%S}] {text}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/work/sae-regime-out", help="work folder: corpus halves, ledger, runs, cache")
    p.add_argument("--corpus", default=str(MIXED_CORPUS), help="JSONL(.gz) corpus with a 'text' field")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--more-threads", default=None, metavar="HH:MM=N",
                   help="from this UTC time on, runs that start use N threads (e.g. 17:50=2)")
    p.add_argument("--cache", default=None, help="ZOO_CACHE for tokens and activations (default OUT/cache)")
    # the source LM
    p.add_argument("--lm-model", default="lm-dense-tiny")
    p.add_argument("--d-model", type=int, default=640)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--n-heads", type=int, default=10)
    p.add_argument("--lm-steps", type=int, default=400)
    p.add_argument("--lm-batch", type=int, default=8, help="sequences per LM step")
    p.add_argument("--lm-lr", type=float, default=1e-3)
    p.add_argument("--lm-eval-blocks", type=int, default=64, help="held-out blocks per half for the LM's losses")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--hook", default=None, help="hook point (default: blocks.<n_layers - 1>, the last block's output)")
    # the SAEs
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--expansion", type=int, default=16, help="latents per input dimension")
    p.add_argument("--ks", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--sae-steps", type=int, default=150)
    p.add_argument("--sae-batch", type=int, default=4, help="sequences of seq_len activations per SAE step")
    p.add_argument("--sae-lr", type=float, default=2e-3)
    p.add_argument("--eval-batches", type=int, default=8,
                   help="held-out activations: eval_batches x sae_batch x seq_len")
    p.add_argument("--no-log-area", action="store_true", help="skip the log-area HierarchicalTopK SAEs")
    p.add_argument("--no-matryoshka", action="store_true")
    p.add_argument("--stop-at", default=None, help="HH:MM UTC: start no new SAE run after it")
    p.add_argument("--report-only", action="store_true", help="write the report from the ledger, train nothing")
    p.add_argument("--keep-runs", action="store_true", help="keep the SAE run folders (default: removed)")
    p.add_argument("--json", default=None, help="write the report here (default OUT/sae_regime.json)")
    p.add_argument("--md", default=None, help="write the Markdown tables here (default OUT/sae_regime.md)")
    return p


# ---- 1. the corpus halves --------------------------------------------------------------------------------


def split_corpus(source: str | Path, folder: Path) -> dict:
    """Documents 0, 2, 4, ... -> folder/lm.jsonl.gz, 1, 3, 5, ... -> folder/sae.jsonl.gz (written once).

    Returns the two paths and their document and byte counts. An existing pair is kept as it is (its
    modification times name the token caches and the activation stores built from it)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"lm": folder / "lm.jsonl.gz", "sae": folder / "sae.jsonl.gz"}
    meta_path = folder / "split.json"
    if all(p.is_file() for p in paths.values()) and meta_path.is_file():
        return json.loads(meta_path.read_text())
    opener = gzip.open if str(source).endswith(".gz") else open
    counts = {side: {"documents": 0, "bytes": 0} for side in paths}
    tmp = {side: Path(tempfile.mkstemp(dir=folder, suffix=".tmp")[1]) for side in paths}
    outs = {side: gzip.open(tmp[side], "wt", encoding="utf-8") for side in paths}
    with opener(source, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            side = "lm" if i % 2 == 0 else "sae"
            doc = json.loads(line)
            outs[side].write(json.dumps(doc, ensure_ascii=False) + "\n")
            counts[side]["documents"] += 1
            counts[side]["bytes"] += len(doc["text"].encode())
    for side in paths:
        outs[side].close()
        os.replace(tmp[side], paths[side])
    meta = {"source": str(source), "rule": "document i -> lm if i is even, else sae",
            **{f"{side}_file": str(paths[side]) for side in paths}, "counts": counts}
    meta_path.write_text(json.dumps(meta, indent=1))
    return meta


def corpus_texts(path: str | Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


# ---- 2. the source LM ------------------------------------------------------------------------------------


def lm_spec(args, lm_file: str):
    from train.protocol import RunSpec

    overrides = {"d_model": args.d_model, "n_layers": args.n_layers, "n_heads": args.n_heads,
                 "max_seq_len": args.seq_len}
    return RunSpec(model=args.lm_model, lr=args.lm_lr, seed=0, steps=args.lm_steps, batch_size=args.lm_batch,
                   seq_len=args.seq_len, data=(lm_file,), overrides=tuple(sorted(overrides.items())),
                   warmup_steps=max(1, args.lm_steps // 10), eval_blocks=args.lm_eval_blocks)


# ---- 3. the SAEs -----------------------------------------------------------------------------------------


def sae_plan(args, d_in: int) -> list[dict]:
    """The SAE runs of one seed, in order: name, catalog entry, config sets, and where to evaluate it.

    A "k_from" run takes its k from an earlier run's measured L0 (the Matryoshka prefix it is compared with)."""
    width = args.expansion * d_in
    kmax = max(args.ks)
    plan = [{"name": f"topk-k{kmax}", "entry": "sae-topk-tiny", "sets": {"k": kmax}, "eval": [{}]},
            {"name": "hier-mean", "entry": "sae-hier-topk-tiny", "sets": {"k": kmax, "k_min": 1, "hier_loss": "mean"},
             "eval": [{"k": k} for k in sorted(args.ks)]}]
    plan += [{"name": f"topk-k{k}", "entry": "sae-topk-tiny", "sets": {"k": k}, "eval": [{}]}
             for k in sorted(args.ks) if k != kmax]
    if not args.no_matryoshka:
        widths = [width // 16, width // 4, width]
        plan.append({"name": "matryoshka", "entry": "sae-matryoshka-tiny",
                     "sets": {"k": kmax, "matryoshka_widths": json.dumps(widths)},
                     "eval": [{"width": w} for w in widths]})
        plan += [{"name": f"topk-w{w}", "entry": "sae-topk-tiny", "sets": {"d_sae": w}, "eval": [{}],
                  "k_from": ("matryoshka", w)} for w in widths[:-1]]
    if not args.no_log_area:
        plan.append({"name": "hier-log_area", "entry": "sae-hier-topk-tiny",
                     "sets": {"k": kmax, "k_min": 1, "hier_loss": "log_area"},
                     "eval": [{"k": k} for k in sorted(args.ks)]})
    return plan


def _budget_key(budget: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(budget.items())) or "own"


def train_sae(args, item: dict, seed: int, source: str, hook: str, d_in: int, sae_file: str, work: Path) -> dict:
    """Train one SAE with the common Trainer, evaluate it on the held-out activations; its ledger record."""
    from train.config import parse_args
    from train.sae_eval import reconstruction_metrics
    from train.trainer import Trainer

    sets = {"source_model": source, "hook_point": hook, "d_in": d_in, "d_sae": args.expansion * d_in,
            "context_size": args.seq_len, **item["sets"]}
    out = work / f"seed{seed}" / item["name"]
    shutil.rmtree(out, ignore_errors=True)
    argv = [item["entry"], *sum((["--set", f"{k}={v}"] for k, v in sets.items()), []),
            "--data", sae_file, "--steps", str(args.sae_steps), "--batch-size", str(args.sae_batch),
            "--seq-len", str(args.seq_len), "--lr", str(args.sae_lr), "--warmup-steps",
            str(max(1, args.sae_steps // 10)), "--weight-decay", "0", "--seed", str(seed),
            "--eval-every", str(args.sae_steps), "--checkpoint-every", str(args.sae_steps), "--keep-last", "1",
            "--eval-batches", str(args.eval_batches), "--log-every", str(max(1, args.sae_steps // 4)),
            "--out", str(out)]
    start, cpu = time.perf_counter(), time.process_time()
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
        trainer = Trainer(parse_args(argv))
        summary = trainer.run()
    if summary.get("interrupted"):
        raise KeyboardInterrupt(f"seed {seed} {item['name']} interrupted")
    train_seconds = time.perf_counter() - start
    sae, task = trainer.model, trainer.task
    evals = {_budget_key(b): reconstruction_metrics(sae, task.val.batches(4096), **b) for b in item["eval"]}
    data = task.sae_data.data
    items_per_step = task.items_per_step
    if args.sae_steps * items_per_step > task.train.rows:  # the store would serve some rows twice
        raise RuntimeError(f"{item['name']}: {args.sae_steps * items_per_step} activations asked of a store of "
                           f"{task.train.rows}: the SAE half of the corpus is too small for one pass")
    fresh = {"store_rows": task.train.rows, "rows_read": args.sae_steps * items_per_step,
             "passes_over_store": args.sae_steps * items_per_step / task.train.rows,
             "sae_train_blocks_available": int(data.num_train_blocks),
             "blocks_harvested": -(-task.train.rows // args.seq_len), "val_rows": task.val.rows,
             "corpus": sae_file}
    record = {"name": item["name"], "seed": seed, "argv": argv, "sets": sets, "evals": evals,
              "trainer_final": {k: v for k, v in summary.items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool)},
              "activations": summary["tokens"], "acts_per_s": summary["tokens_per_s"],
              "train_seconds": train_seconds, "wall_seconds": time.perf_counter() - start,
              "cpu_seconds": time.process_time() - cpu, "threads": _threads(),
              "loadavg": os.getloadavg()[0], "fresh": fresh,
              "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}
    if not args.keep_runs:
        shutil.rmtree(out, ignore_errors=True)
    return record


def _threads() -> int:
    import torch

    return torch.get_num_threads()


# ---- 4. claims and verdicts ------------------------------------------------------------------------------


def _fvu(record: dict, key: str = "own") -> float:
    return record["evals"][key]["fvu"]


def claim_rows(runs: dict, args, d_in: int) -> list[dict]:
    """Every claim as paired differences over the seeds where both sides finished."""
    from train.protocol import paired_difference, verdict

    width = args.expansion * d_in
    kmax = max(args.ks)
    rows = []

    def add(claim: str, earlier: str, a: dict, b: dict, measure: str = "fvu", a_label: str = "", b_label: str = ""):
        seeds = sorted(set(a) & set(b))
        if not seeds:
            return
        xa, xb = [a[s] for s in seeds], [b[s] for s in seeds]
        diff = paired_difference(xa, xb)
        ratios = [x / y for x, y in zip(xa, xb, strict=True)]
        ratio = paired_difference(ratios, [1.0] * len(ratios))
        within = ("within 5% (interval below +5%)" if ratio["high"] < 0.05 else
                  "more than 5% worse (interval above +5%)" if ratio["low"] > 0.05 else "not resolved at 5%")
        rows.append({"claim": claim, "earlier": earlier, "measure": measure, "a": a_label, "b": b_label,
                     "seeds": seeds, "n": len(seeds), "a_mean": sum(xa) / len(xa), "b_mean": sum(xb) / len(xb),
                     "a_values": xa, "b_values": xb, "diff": diff, "verdict": verdict(diff),
                     "ratio_mean": 1 + ratio["mean"], "ratio_low": 1 + ratio["low"], "ratio_high": 1 + ratio["high"],
                     "within_5pct": within})

    def by_seed(name: str, key: str = "own", field: str = "fvu") -> dict:
        return {r["seed"]: r["evals"][key][field] for r in runs.values() if r["name"] == name}

    for loss in ("mean", "log_area"):
        for k in sorted(args.ks):
            add(f"HierarchicalTopK ({loss} loss, one SAE k=1..{kmax}) at k={k} vs TopK trained at k={k}",
                "BENCHMARKS.md: within 5% of each TopK (met at 200 steps, not at 600/1200 at the ends of the range); "
                "the paper: Pareto-better at every k",
                by_seed(f"hier-{loss}", f"k={k}"), by_seed(f"topk-k{k}"), a_label=f"hier-{loss}@k{k}",
                b_label=f"topk-k{k}")
    for k in sorted(args.ks):
        add(f"log-area loss vs the paper's mean loss (HierarchicalTopK) at k={k}",
            "BENCHMARKS.md: log-area 11-20% lower FVU at every k at 200 steps, 2-14% lower at k=4..32 at 600 steps",
            by_seed("hier-log_area", f"k={k}"), by_seed("hier-mean", f"k={k}"), a_label=f"hier-log_area@k{k}",
            b_label=f"hier-mean@k{k}")
    widths = [width // 16, width // 4, width]
    earlier = {widths[0]: "BENCHMARKS.md: smallest prefix better (0.82x at 200 steps), tie at 600 steps",
               widths[1]: "BENCHMARKS.md: tie (1.03x at 200 steps, 1.11x at 600)",
               widths[2]: "BENCHMARKS.md: whole dictionary 20-24% worse (1.21x at 200 steps, 1.24x at 600)"}
    for w in widths:
        other = f"topk-k{kmax}" if w == width else f"topk-w{w}"
        add(f"Matryoshka prefix of {w} latents vs a TopK SAE of {w} latents at the prefix's L0",
            earlier[w], by_seed("matryoshka", f"width={w}"), by_seed(other), a_label=f"matryoshka@{w}",
            b_label=other)
    return rows


def _fmt(x: float, digits: int = 4) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown(report: dict) -> str:
    lm, s, t = report["lm"], report["settings"], report["timing"]
    lines = [f"Command: `{report['command']}`", "",
             f"Machine: {report['machine']}; SAE runs {t.get('first_sae_finished', '-')} - "
             f"{t.get('last_sae_finished', '-')}; load average during the runs "
             f"{t.get('loadavg_min', math.nan):.1f}-{t.get('loadavg_max', math.nan):.1f}.",
             "",
             f"Source LM: `{s['lm_model']}` with d_model {s['d_model']}, {s['n_layers']} blocks, {s['n_heads']} heads "
             f"({lm['total_params'] / 1e6:.1f}M parameters), {lm['tokens']:,} byte tokens of the LM half "
             f"({s['lm_steps']} steps x {s['lm_batch']} x {s['seq_len']}, lr {s['lm_lr']}), held-out loss "
             f"{lm['report_loss']:.4f} nats/token (report half; selection half {lm['select_loss']:.4f}), "
             f"{lm['tokens_per_s']:,.0f} tokens/s at {lm['threads']} thread(s), {lm['wall_seconds']:.0f} s.",
             f"Hook point `{report['hook']}` (d {report['d_in']}); SAEs of {report['d_sae']:,} latents "
             f"({s['expansion']}x), k in {s['ks']} (max k = {max(s['ks']) / report['d_in']:.1%} of the width), "
             f"{s['sae_steps']} steps x {s['sae_batch'] * s['seq_len']:,} activations = "
             f"{s['sae_steps'] * s['sae_batch'] * s['seq_len']:,} fresh activations per SAE (one pass, no repeats: "
             f"max passes over a store {report['fresh']['max_passes']:.2f}), lr {s['sae_lr']}, "
             f"held-out FVU on {report['fresh']['val_rows']:,} activations of the SAE half's validation blocks.",
             f"Seeds complete: {report['complete_seeds']} of {s['seeds']} planned.", ""]
    topk = report.get("topk_kmax")
    if topk:
        lines += [f"**TopK FVU at k = {max(s['ks'])}** ({s['expansion']}x dictionary, held out): "
                  f"mean {topk['mean']:.4f} over "
                  f"{topk['n']} seeds (min {topk['min']:.4f}, max {topk['max']:.4f}).", ""]
    lines += ["| claim | A mean | B mean | A - B (mean) | 95% interval | A / B | n | verdict | within 5%? |",
              "|---|---:|---:|---:|---|---:|---:|---|---|"]
    for r in report["claims"]:
        d = r["diff"]
        lines.append(f"| {r['claim']} | {_fmt(r['a_mean'])} | {_fmt(r['b_mean'])} | {d['mean']:+.4f} | "
                     f"[{d['low']:+.4f}, {d['high']:+.4f}] | {r['ratio_mean']:.3f} [{r['ratio_low']:.3f}, "
                     f"{r['ratio_high']:.3f}] | {r['n']} | {r['verdict']} | {r['within_5pct']} |")
    lines += ["", "Per SAE (means over its finished seeds):", "",
              "| SAE | budget | FVU | L0 | dead frac | activations/s | CPU s | seeds |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in report["per_sae"]:
        lines.append(f"| {row['name']} | {row['budget']} | {row['fvu']:.4f} | {row['l0']:.1f} | "
                     f"{row['dead_frac']:.3f} | "
                     f"{row['acts_per_s']:,.0f} | {row['cpu_seconds']:.0f} | {row['n']} |")
    return "\n".join(lines)


def settings_tail(args, hook: str, lm_key: str) -> list:
    """What every SAE run of one setting shares: the last fields of its ledger key."""
    return [args.expansion, args.sae_steps, args.sae_batch, args.seq_len, args.sae_lr, args.eval_batches, hook, lm_key]


def sae_key(item: dict, seed: int, sets: dict, tail: list) -> str:
    return json.dumps(["sae", item["name"], seed, item["entry"], sorted(sets.items()), *tail], default=str)


def build_report(args, argv, ledger, lm_record: dict, hook: str, d_in: int, plan: list[dict], tail: list) -> dict:
    """The report of this setting's runs (the ledger may hold runs of other settings: other steps, another LM)."""
    mine = json.dumps(tail, default=str)
    sae_runs = {k: v for k, v in ledger.runs.items()
                if k.startswith('["sae"') and json.dumps(json.loads(k)[5:], default=str) == mine}
    names = [p["name"] for p in plan]
    by_seed: dict[int, set] = {}
    for r in sae_runs.values():
        by_seed.setdefault(r["seed"], set()).add(r["name"])
    complete = sorted(s for s, got in by_seed.items() if s < args.seeds and set(names) <= got)
    # every finished run counts: a claim pairs the seeds where both of its sides finished (its n)
    runs = {k: v for k, v in sae_runs.items() if v["seed"] < args.seeds and v["name"] in names}
    per_sae = []
    for item in plan:
        recs = [r for r in runs.values() if r["name"] == item["name"]]
        if not recs:
            continue
        for b in item["eval"]:
            key = _budget_key(b)
            def mean(field: str, key: str = key, recs: list = recs) -> float:
                return sum(r["evals"][key][field] for r in recs) / len(recs)

            budget = key if key != "own" else f"k={recs[0]['sets'].get('k')}"
            per_sae.append({"name": item["name"], "budget": budget,
                            "fvu": mean("fvu"), "l0": mean("l0"), "dead_frac": mean("dead_frac"),
                            "acts_per_s": sum(r["acts_per_s"] for r in recs) / len(recs),
                            "cpu_seconds": sum(r["cpu_seconds"] for r in recs) / len(recs), "n": len(recs)})
    kmax = max(args.ks)
    tk = [r["evals"]["own"]["fvu"] for r in runs.values() if r["name"] == f"topk-k{kmax}"]
    finished = sorted(r["finished"] for r in sae_runs.values())
    loads = [r["loadavg"] for r in sae_runs.values()]
    import torch

    return {"command": " ".join(["python benchmarks/sae_regime.py", *argv]),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                       f"{args.threads} thread(s), written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
            "settings": {k: v for k, v in vars(args).items()}, "lm": lm_record, "hook": hook, "d_in": d_in,
            "d_sae": args.expansion * d_in, "complete_seeds": complete,
            "topk_kmax": {"n": len(tk), "mean": sum(tk) / len(tk), "min": min(tk), "max": max(tk), "values": tk}
            if tk else None,
            "fresh": {"max_passes": max((r["fresh"]["passes_over_store"] for r in sae_runs.values()), default=0.0),
                      "val_rows": next((r["fresh"]["val_rows"] for r in sae_runs.values()), 0)},
            "claims": claim_rows(runs, args, d_in), "per_sae": per_sae, "runs": sae_runs,
            "timing": {"first_sae_finished": finished[0] if finished else None,
                       "last_sae_finished": finished[-1] if finished else None,
                       "loadavg_min": min(loads, default=float("nan")), "loadavg_max": max(loads, default=float("nan")),
                       "sae_cpu_seconds": sum(r["cpu_seconds"] for r in sae_runs.values()),
                       "sae_wall_seconds": sum(r["wall_seconds"] for r in sae_runs.values())}}


def _past(stop_at: str | None) -> bool:
    if not stop_at:
        return False
    now = datetime.now(timezone.utc)
    hh, mm = (int(x) for x in stop_at.split(":"))
    return (now.hour, now.minute) >= (hh, mm)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ["ZOO_CACHE"] = str(Path(args.cache) if args.cache else out / "cache")
    import torch

    torch.set_num_threads(args.threads)
    if args.more_threads and _past(args.more_threads.split("=")[0]):
        torch.set_num_threads(int(args.more_threads.split("=")[1]))
    from train.protocol import Ledger, train_run

    ledger = Ledger(out / "runs.json")
    split = split_corpus(args.corpus, out / "corpus")
    _say(f"corpus halves: {split['counts']}")
    spec = lm_spec(args, split["lm_file"])
    if spec.key() not in ledger and args.report_only:
        raise SystemExit("--report-only: the source LM is not in the ledger")
    _say(f"source LM {spec.name()} ({dict(spec.overrides)}), {spec.steps} x {spec.batch_size} x {spec.seq_len} tokens")
    lm_record, skipped = ledger.run(spec.key(), lambda: train_run(spec, out / "lm", keep_final=True))
    how = "ledger" if skipped else f"{lm_record['wall_seconds']:.0f} s"
    _say(f"source LM: report loss {lm_record['report_loss']:.4f}, {lm_record['tokens_per_s']:,.0f} tokens/s ({how})")
    hook = args.hook or f"blocks.{args.n_layers - 1}"
    d_in = args.d_model
    plan = sae_plan(args, d_in)
    work = out / "sae"
    tail = settings_tail(args, hook, spec.key())
    stopped = False
    for seed in range(args.seeds):
        if args.report_only or stopped:
            break
        for item in plan:
            sets = dict(item["sets"])
            if "k_from" in item:
                src, width = item["k_from"]
                src_item = next(p for p in plan if p["name"] == src)  # this setting's run of it, this seed
                src_rec = ledger.get(sae_key(src_item, seed, src_item["sets"], tail))
                if src_rec is None:
                    continue
                sets["k"] = max(1, round(src_rec["evals"][f"width={width}"]["l0"]))
            item = {**item, "sets": sets}
            key = sae_key(item, seed, sets, tail)
            if args.more_threads and _past(args.more_threads.split("=")[0]):
                torch.set_num_threads(int(args.more_threads.split("=")[1]))
            if key not in ledger and _past(args.stop_at):
                _say(f"--stop-at {args.stop_at}: starting no new run")
                stopped = True
                break
            record, skipped = ledger.run(key, lambda item=item, seed=seed: train_sae(
                args, item, seed, lm_record["final"], hook, d_in, split["sae_file"], work))
            evals = ", ".join(f"{b}: FVU {m['fvu']:.4f} L0 {m['l0']:.1f}" for b, m in record["evals"].items())
            how = "ledger" if skipped else f"{record['wall_seconds']:.0f} s, {record['acts_per_s']:,.0f} act/s"
            _say(f"seed {seed} {item['name']}: {evals} ({how})")
    report = build_report(args, argv, ledger, lm_record, hook, d_in, plan, tail)
    json_path = Path(args.json) if args.json else out / "sae_regime.json"
    md_path = Path(args.md) if args.md else out / "sae_regime.md"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1, default=str))
    md = markdown(report)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(md + "\n")
    print(md)
    _say(f"wrote {json_path}, {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
