"""`zoo frontier`: the sparsity frontier (issue 17 item 3) under the protocol of train/protocol.py.

1. Trains the model of every LM family at one size (dense, MoE top-2, fine-grained MoE, top-p MoE, each
   attention kind, Monarch, Pixelfly) with the same steps, batch and sequence length (equal tokens) on
   the mixed corpus (train/corpus/mixed.jsonl.gz: no run repeats data): a learning-rate sweep (best of
   --lrs at the first seed, chosen on the selection half of the held-out blocks; while the best is the
   smallest or largest rate tried, up to --extend-edges more rates beyond it), then the other seeds at
   that rate. Each family is compared with dense, paired by seed, on the report half: the mean
   difference, its 95% t interval and a verdict.
2. A training-free frontier, no retraining: the trained dense model with each sparse attention kind at
   3 budgets (the catalog's budget x 0.5, 1, 2), projected onto Monarch matrices (2, 4, 8 blocks) and
   onto low-rank matrices (d/8, d/4, d/2); the trained MoE at k = 1..E experts per token; the trained
   top-p MoE at several thresholds (its mean k measured on held-out tokens).
3. SAE FVU against L0 for every SAE kind, trained briefly on the trained dense model's residual stream.

Writes OUT/frontier.json (every number), OUT/frontier.md (the tables), PNG plots (matplotlib, if
installed) of the held-out loss against active forward FLOPs per token and against measured training
tokens/s, the training-free curves and FVU against L0. Finished runs are kept in OUT/runs.json and skipped
when the command is run again with the same settings, so an interrupted frontier resumes.

    zoo frontier                                        # the full tiny frontier (1 h 50 min on 2 CPU cores)
    zoo frontier --families dense moe local --seeds 2 --steps 20   # a smoke run
    zoo frontier --size small                           # on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from train.protocol import Ledger, Protocol, compare, held_out_losses

MIXED_CORPUS = Path(__file__).parent / "corpus" / "mixed.jsonl.gz"
# family label -> catalog name at a size
FAMILIES = {"dense": "lm-dense-{size}", "moe": "moe-{size}", "moe-fine": "moe-fine-{size}",
            "moe-topp": "moe-topp-{size}", "local": "lm-local-{size}", "lsh": "lm-lsh-{size}",
            "performer": "lm-performer-{size}", "scatterbrain": "lm-scatterbrain-{size}",
            "monarch": "lm-monarch-{size}", "pixelfly": "lm-pixelfly-{size}"}
SAE_ENTRIES = ["sae-relu-tiny", "sae-topk-tiny", "sae-batchtopk-tiny", "sae-hier-topk-tiny", "sae-matryoshka-tiny"]
BUDGET_SCALES = (0.5, 1.0, 2.0)
TOP_PS = (0.2, 0.4, 0.6, 0.8, 0.95)


def _say(text: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {text}", flush=True)


def _option(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    if not key or not _:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zoo frontier", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", choices=["tiny", "small"], help="catalog size of every family")
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES), metavar="FAMILY",
                   help=f"families to train (default all: {' '.join(FAMILIES)}); dense is always trained")
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 per family (default 5)")
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3],
                   help="learning rates of the sweep at seed 0 (default 3e-4 1e-3 3e-3)")
    p.add_argument("--extend-edges", type=int, default=2, metavar="N",
                   help="while a family's best rate is the smallest or largest tried, try up to N more rates beyond "
                        "it on the 1-3-10 ladder (default 2; 0: the grid only)")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per run (default 150)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--warmup-steps", type=int, default=None, help="default: steps / 10")
    p.add_argument("--data", nargs="+", default=[str(MIXED_CORPUS)],
                   help="training data (default: the bundled mixed corpus, 23.75M byte tokens)")
    p.add_argument("--eval-blocks", type=int, default=128,
                   help="held-out blocks per half (selection / report), spread over the corpus (0: all)")
    p.add_argument("--set", dest="overrides", action="append", type=_option, default=[], metavar="KEY=VALUE",
                   help="a model config field for every LM family (e.g. n_layers=1 for a smoke run)")
    p.add_argument("--no-training-free", action="store_true", help="skip the training-free frontier")
    p.add_argument("--no-sae", action="store_true", help="skip the SAE frontier")
    p.add_argument("--sae-steps", type=int, default=150, help="training steps per SAE kind (default 150)")
    p.add_argument("--sae-width", type=int, default=None, help="SAE latents (default: the catalog's, 8x d_model)")
    p.add_argument("--out", default="runs/frontier", help="output folder (default runs/frontier)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    p.add_argument("--report-only", action="store_true",
                   help="train and measure nothing: the report of what the ledger holds (a frontier in progress "
                        "or interrupted); families without all their runs, and parts not measured, are listed "
                        "as missing")
    return p


class Missing(Exception):
    """--report-only: a run or measurement the ledger does not hold."""


class ReadOnlyLedger:
    """A view of a ledger (anything with `.runs`) whose missing keys raise Missing instead of running anything
    (--report-only; benchmarks/seed_claims.py reads finished families through it)."""

    def __init__(self, ledger):
        self.path, self.runs = getattr(ledger, "path", None), ledger.runs

    def get(self, key: str) -> dict | None:
        return self.runs.get(key)

    def run(self, key: str, fn) -> tuple[dict, bool]:
        if key not in self.runs:
            raise Missing(key)
        return self.runs[key], True


# ---- 2. training-free frontier ------------------------------------------------------------------------------

def _with_config(model, **fields):
    """A copy of `model` whose config has `fields` changed; the weights it shares with `model` are copied, the
    new kind's own buffers (random features, hash seeds) keep their initial values."""
    config = type(model.config).from_dict({**model.config.to_dict(), **fields})
    new = type(model)(config)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    params = {name for name, _ in new.named_parameters()}
    if unexpected or params & set(missing):
        raise ValueError(f"cannot carry the weights over to {fields}: missing parameters "
                         f"{sorted(params & set(missing))}, unexpected {unexpected}")
    return new.eval()


def _scaled(budget: dict, scale: float) -> dict:
    return {k: (v if k == "n_buckets" or not isinstance(v, int) else max(1, int(round(v * scale))))
            for k, v in budget.items()}


def training_free(dense_final: str, moe_final: str | None, topp_final: str | None, data, args, ledger) -> list[dict]:
    """Rows {knob, setting, report_loss, select_loss, flops_per_token, active_params}."""
    from zoo import load
    from zoo.convert import CONVERTERS
    from zoo.entries.attention import BUDGETS

    rows: list[dict] = []

    def measure(knob: str, setting: str, make, source: str, sample: bool = False) -> None:
        key = json.dumps(["free", source, knob, setting, args.eval_blocks, args.seq_len, args.data])

        def run() -> dict:
            model = make()
            losses = held_out_losses(model, data, args.batch_size, args.eval_blocks)
            ids = next(iter(data.val_batches(args.batch_size)))[:, :-1] if sample else None
            cost = model.cost(args.seq_len, sample=ids)
            return {"knob": knob, "setting": setting, **losses, "flops_per_token": cost["flops_per_token"],
                    "active_params": cost["active_params"], "total_params": cost["total_params"]}

        try:
            row, skipped = ledger.run(key, run)
        except ValueError as e:  # a setting this model's shape does not allow (e.g. blocks not dividing d)
            _say(f"training-free {knob} {setting}: skipped ({e})")
            return
        rows.append(row)
        _say(f"training-free {knob} {setting}: report {row['report_loss']:.4f}, "
             f"{row['flops_per_token'] / 1e6:.2f}M FLOPs/token{' (ledger)' if skipped else ''}")

    dense = load(dense_final)
    measure("dense", "trained", lambda: dense, dense_final)
    for kind, budget in BUDGETS[args.size].items():
        for scale in BUDGET_SCALES:
            b = _scaled(budget, scale)
            measure(f"attention {kind}", ", ".join(f"{k}={v}" for k, v in b.items()),
                    lambda kind=kind, b=b: _with_config(dense, attention=kind, attention_kwargs=b), dense_final)
    for nblocks in (2, 4, 8):
        measure("monarch projection", f"nblocks={nblocks}",
                lambda n=nblocks: CONVERTERS["monarch"](load(dense_final), nblocks=n)[0], dense_final)
    d = dense.config.d_model
    for rank in (d // 8, d // 4, d // 2):
        measure("low-rank projection", f"rank={rank}",
                lambda r=rank: CONVERTERS["lowrank"](load(dense_final), rank=r)[0], dense_final)
    if moe_final:
        experts = load(moe_final).config.mlp_kwargs["num_experts"]
        for k in range(1, experts + 1):
            measure("MoE k", f"k={k}", lambda k=k: load(moe_final, num_experts_per_tok=k), moe_final)
    if topp_final:
        for top_p in TOP_PS:
            def make(p=top_p):
                model = load(topp_final)
                model.set_top_p(p)
                return model
            measure("MoE top-p", f"top_p={top_p}", make, topp_final, sample=True)
    return rows


# ---- 3. SAE frontier --------------------------------------------------------------------------------------

def sae_frontier(dense_final: str, args, ledger) -> dict[str, list[dict]]:
    """entry -> [{budget, l0, fvu}] for every SAE kind, trained on the dense model's middle residual stream."""
    from train.config import parse_args
    from train.sae_eval import default_budgets, reconstruction_metrics
    from train.trainer import Trainer
    from zoo import load

    lm = load(dense_final).config
    width = args.sae_width or 8 * lm.d_model
    sets = {"source_model": dense_final, "d_in": lm.d_model, "hook_point": f"blocks.{lm.n_layers // 2}",
            "d_sae": width, "context_size": args.seq_len}
    out: dict[str, list[dict]] = {}
    for entry in SAE_ENTRIES:
        extra = {"matryoshka_widths": json.dumps([width // 16, width // 4, width])} if "matryoshka" in entry else {}
        flags = sum((["--set", f"{k}={v}"] for k, v in {**sets, **extra}.items()), [])
        argv = [entry, *flags, "--steps", str(args.sae_steps), "--eval-every", str(args.sae_steps),
                "--checkpoint-every", str(args.sae_steps), "--eval-batches", "2", "--warmup-steps",
                str(max(1, args.sae_steps // 10)), "--weight-decay", "0", "--lr", "2e-3",
                "--out", str(Path(args.out) / "sae" / entry), "--log-every", str(max(1, args.sae_steps // 4)),
                *sum((["--data", d] for d in args.data), [])]
        key = json.dumps(["sae", argv])

        def run(argv=argv) -> dict:
            start = time.perf_counter()
            with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
                trainer = Trainer(parse_args(argv))
                trainer.run()
            sae = trainer.model
            points = []
            for budget in default_budgets(sae):
                m = reconstruction_metrics(sae, trainer.task.val.batches(4096), **budget)
                points.append({"budget": budget, "l0": m["l0"], "fvu": m["fvu"]})
            return {"points": points, "seconds": time.perf_counter() - start}

        record, skipped = ledger.run(key, run)
        out[entry] = record["points"]
        best = min(record["points"], key=lambda p: p["fvu"])
        how = "ledger" if skipped else f"{record['seconds']:.0f} s"
        _say(f"SAE {entry}: {len(record['points'])} budgets, best FVU {best['fvu']:.4f} at L0 {best['l0']:.1f} ({how})")
    return out


# ---- report -------------------------------------------------------------------------------------------------

def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def summarise(results: dict[str, dict], comparisons: dict[str, dict]) -> list[dict]:
    """One row per family: chosen lr, mean report loss, cost, tokens/s, paired difference to dense."""
    rows = []
    for family, r in results.items():
        runs = r["runs"]
        rows.append({"family": family, "model": runs[0]["spec"]["model"], "lr": r["lr"], "sweep": r["sweep"],
                     "lr_at_edge": bool(r.get("at_edge")),
                     "seeds": len(runs), "report_loss": _mean([x["report_loss"] for x in runs]),
                     "report_losses": [x["report_loss"] for x in runs],
                     "flops_per_token": runs[0]["active_flops_per_token"],
                     "active_params": runs[0]["active_params"], "total_params": runs[0]["total_params"],
                     "tokens": runs[0]["tokens"], "tokens_per_s": _mean([x["tokens_per_s"] for x in runs]),
                     "seconds_per_run": _mean([x["wall_seconds"] for x in runs]),
                     "busy_runs": sum(bool(x.get("machine_busy")) for x in runs),
                     "vs_dense": comparisons.get(family)})
    return rows


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Markdown lines of a table."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _family_cells(r: dict) -> list[str]:
    v = r["vs_dense"]
    lr = f"{r['lr']:g}" + (" (edge)" if r.get("lr_at_edge") else "")
    return [r["family"], f"`{r['model']}`", lr, f"{r['report_loss']:.4f}",
            "-" if v is None else f"{v['mean']:+.4f} [{v['low']:+.4f}, {v['high']:+.4f}]",
            "-" if v is None or math.isnan(v["p"]) else f"{v['p']:.3f}", "-" if v is None else v["verdict"],
            f"{r['flops_per_token'] / 1e6:.2f}M", f"{r['active_params'] / 1e6:.2f}M / {r['total_params'] / 1e6:.2f}M",
            f"{r['tokens_per_s']:,.0f}", f"{r['seconds_per_run']:.0f}"]


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"Frontier at `{s['size']}`: {s['steps']} steps x {s['batch_size']} x {s['seq_len']} tokens per run "
             f"({s['tokens_per_run']:,} tokens), data {', '.join(Path(d).name for d in s['data'])}, lr chosen from "
             f"{s['lrs']} (+ up to {s.get('extend_edges', 0)} rates beyond an edge; \"(edge)\": still the smallest or "
             f"largest tried) at seed 0 on the selection half, seeds 0..{s['seeds'] - 1}; loss on the report half "
             f"({s['eval_blocks'] or 'all'} blocks), nats per byte token. {report['machine']}.", ""]
    lines += _table(["family", "model", "lr", "report loss (mean)", "vs dense: mean [95% CI]", "p", "verdict",
                     "active FLOPs/token (fwd)", "active / total params", "tokens/s", "s/run"],
                    [_family_cells(r) for r in report["families"]])
    if report.get("training_free"):
        lines += ["", "Training-free frontier (no retraining; dense = the trained dense model at seed 0):", ""]
        lines += _table(["knob", "setting", "report loss", "fwd FLOPs/token", "active params"],
                        [[r["knob"], r["setting"], f"{r['report_loss']:.4f}", f"{r['flops_per_token'] / 1e6:.2f}M",
                          f"{r['active_params'] / 1e6:.2f}M"] for r in report["training_free"]])
    if report.get("sae"):
        lines += ["", "SAE FVU against L0 (each kind trained on the dense model's residual stream):", ""]
        lines += _table(["SAE", "budget", "L0", "FVU"],
                        [[f"`{entry}`", ", ".join(f"{k}={v}" for k, v in pt["budget"].items()) or "-",
                          f"{pt['l0']:.1f}", f"{pt['fvu']:.4f}"]
                         for entry, points in report["sae"].items() for pt in points])
    if report.get("missing"):
        lines += ["", "Not in the ledger yet (`--report-only` of a frontier in progress): "
                  + "; ".join(report["missing"]) + "."]
    t = report["timing"]
    lines += ["", f"Time: {t['seconds']:.0f} s this invocation ({t['trained']} runs trained, {t['skipped']} from the "
                  f"ledger); {t['seconds_per_training_run']:.1f} s per training run on average as measured "
                  f"({t['idle_seconds_per_training_run']:.1f} s of CPU time per thread); the "
                  f"{t.get('training_runs', t['planned_training_runs'])} training runs: "
                  f"{t['estimated_training_seconds'] / 60:.0f} min at the "
                  f"measured rate, {t['estimated_training_seconds_idle'] / 60:.0f} min on an idle machine with "
                  "perfect thread scaling."]
    return "\n".join(lines)


def plots(report: dict, out: Path) -> list[str]:
    """PNG plots; [] with a message when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _say("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    written = []
    fams = report["families"]
    for x_key, x_label, name in (("flops_per_token", "active forward FLOPs per token", "frontier_flops.png"),
                                 ("tokens_per_s", "measured training tokens/s", "frontier_tokens_per_s.png")):
        fig, ax = plt.subplots(figsize=(7, 5))
        for r in fams:
            ys = r["report_losses"]
            err = 0.0
            if len(ys) > 1:
                from train.protocol import t_quantile
                sd = math.sqrt(sum((y - r["report_loss"]) ** 2 for y in ys) / (len(ys) - 1))
                err = t_quantile(0.975, len(ys) - 1) * sd / math.sqrt(len(ys))
            ax.errorbar(r[x_key], r["report_loss"], yerr=err, fmt="o", capsize=3)
            ax.annotate(r["family"], (r[x_key], r["report_loss"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel(x_label)
        ax.set_ylabel("held-out loss (report half; mean, 95% CI over seeds)")
        ax.set_title(f"sparsity frontier, {report['settings']['size']}, {report['settings']['tokens_per_run']:,} "
                     "tokens per run")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        written.append(str(out / name))
    if report.get("training_free"):
        fig, ax = plt.subplots(figsize=(7, 5))
        knobs: dict[str, list[dict]] = {}
        for r in report["training_free"]:
            knobs.setdefault(r["knob"], []).append(r)
        for knob, rs in knobs.items():
            rs = sorted(rs, key=lambda r: r["flops_per_token"])
            ax.plot([r["flops_per_token"] for r in rs], [r["report_loss"] for r in rs], "o-", label=knob)
        ax.set_xscale("log")
        ax.set_xlabel("forward FLOPs per token")
        ax.set_ylabel("held-out loss (report half)")
        ax.set_title("training-free frontier")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "frontier_training_free.png", dpi=120)
        plt.close(fig)
        written.append(str(out / "frontier_training_free.png"))
    if report.get("sae"):
        from train.sae_eval import plot_fvu_vs_l0
        curves = {entry: [(p["l0"], p["fvu"]) for p in points] for entry, points in report["sae"].items()}
        written.append(str(plot_fvu_vs_l0(curves, out / "frontier_sae_fvu_vs_l0.png", title="SAE FVU against L0")))
    return written


# ---- main -----------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    from train.data import load_token_data

    overrides = dict(args.overrides)
    families = ["dense", *[f for f in args.families if f != "dense"]]
    ledger = Ledger(out / "runs.json")
    if args.report_only:
        ledger = ReadOnlyLedger(ledger)
    protocol = Protocol(ledger=ledger, work=out / "lm", seeds=tuple(range(args.seeds)), lrs=tuple(args.lrs),
                        extend=args.extend_edges,
                        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, data=tuple(args.data),
                        warmup_steps=args.warmup_steps if args.warmup_steps is not None else args.steps // 10,
                        eval_blocks=args.eval_blocks, progress=_say)
    planned = protocol.planned_runs(len(families))
    _say(f"{len(families)} families x ({len(args.lrs)} learning rates + {args.seeds - 1} more seed(s)) = {planned} "
         f"training runs (+ up to {args.extend_edges} per family beyond a grid edge) of "
         f"{args.steps * args.batch_size * args.seq_len:,} tokens; ledger {ledger.path} holds "
         f"{len(ledger.runs)} finished runs")
    data = load_token_data(args.data, seq_len=args.seq_len)  # tokenized once, before any run
    results: dict[str, dict] = {}
    missing: list[str] = []
    for i, family in enumerate(families):
        name = FAMILIES[family].format(size=args.size)
        _say(f"family {i + 1}/{len(families)}: {family} ({name})")
        try:
            results[family] = protocol.model(name, overrides)
        except Missing:
            missing.append(f"family {family}: not all of its runs are in the ledger")
            _say(missing[-1])
            continue
        trained = [r["wall_seconds"] for res in results.values() for r in res["runs"]]
        if protocol.done:
            left = planned - protocol.done - protocol.skipped
            _say(f"{protocol.done + protocol.skipped}/{planned} runs done; about "
                 f"{left * _mean(trained) / 60:.0f} min of training left at {_mean(trained):.0f} s per run")
    if "dense" not in results:
        raise SystemExit(f"the ledger {ledger.path} does not hold every dense run yet: nothing to compare with")
    comparisons = compare(results, "dense")
    first = {f: r["runs"][0].get("final") for f, r in results.items()}
    free, sae = [], {}
    try:
        if not args.no_training_free:
            free = training_free(first["dense"], first.get("moe"), first.get("moe-topp"), data, args, ledger)
    except Missing:
        free = []
        missing.append("the training-free frontier")
    try:
        if not args.no_sae and args.size == "tiny":
            sae = sae_frontier(first["dense"], args, ledger)
    except Missing:
        sae = {}
        missing.append("the SAE frontier")
    all_runs = [r for res in results.values() for r in res["runs"]]
    sweep_runs = [ledger.get(protocol.spec(FAMILIES[f].format(size=args.size), lr, protocol.seeds[0],
                                           overrides).key()) for f in families for lr in args.lrs]
    measured = [r for r in [*all_runs, *sweep_runs] if r]
    per_run = _mean([r["wall_seconds"] for r in measured])  # (the sweep's rejected rates included)
    # CPU seconds (all threads) over the threads used: the wall time the runs would take on an idle machine
    # (perfect thread scaling assumed, so a lower bound); the wall times above are this machine's, as busy as it was.
    idle_per_run = _mean([r.get("cpu_seconds", r["wall_seconds"]) / max(1, min(r.get("threads", 1), os.cpu_count()))
                          for r in measured])
    n_runs = (protocol.done + protocol.skipped) or planned
    report = {"settings": {**{k: v for k, v in vars(args).items() if k != "overrides"}, "overrides": overrides,
                           "tokens_per_run": args.steps * args.batch_size * args.seq_len},
              "machine": f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
                         f"load average {os.getloadavg()[0]:.1f} at the end, "
                         f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
              "command": " ".join(["zoo frontier", *(argv if argv is not None else sys.argv[1:])]),
              "families": summarise(results, comparisons), "training_free": free, "sae": sae,
              "missing": missing,
              "timing": {"seconds": time.perf_counter() - started, "trained": protocol.done,
                         "skipped": protocol.skipped, "planned_training_runs": planned,
                         "training_runs": n_runs,  # the planned ones and the sweeps' edge extensions
                         "seconds_per_training_run": per_run, "idle_seconds_per_training_run": idle_per_run,
                         "estimated_training_seconds": n_runs * per_run,
                         "estimated_training_seconds_idle": n_runs * idle_per_run,
                         "per_family_seconds": {f: _mean([r["wall_seconds"] for r in res["runs"]])
                                                for f, res in results.items()},
                         "per_family_cpu_seconds": {f: _mean([r.get("cpu_seconds", math.nan) for r in res["runs"]])
                                                    for f, res in results.items()}}}
    report["plots"] = [] if args.no_plots else plots(report, out)
    (out / "frontier.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "frontier.md").write_text(markdown(report) + "\n")
    print(markdown(report))
    _say(f"wrote {out / 'frontier.json'}, {out / 'frontier.md'}" + "".join(f", {p}" for p in report["plots"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
