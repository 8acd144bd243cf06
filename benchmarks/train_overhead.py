"""Trainer overhead (issue 3): tokens/s of our Trainer against a minimal hand-written loop, in one run.

Both train the same catalog model with the same seed, batches, AdamW groups, LR schedule and
gradient clipping, and must end at the same loss. They run in one process, alternating so that
CPU frequency and other processes hit both alike:

- `--mode interleaved` (default): inside each Trainer run, one hand-loop step runs before every
  Trainer step, so that each pair of steps sees the same machine (right on a shared machine);
- `--mode runs`: whole runs alternate, hand, Trainer, Trainer, hand, ... (cleaner on a quiet one).

Each loop is timed over the same window of steps after a few warm-up steps; a Trainer step is
timed from the start of its step() to the start of the next, so its progress bar, metrics log and
NaN check count. Evaluation, checkpoint and final save are timed one by one, and a run with the
TrainConfig defaults (300 steps, evaluation and checkpoint every 100) is projected from them.

    python benchmarks/train_overhead.py                      # lm-dense-tiny, batch 16, seq 256
    python benchmarks/train_overhead.py --mode runs --rounds 5 --json out.json

Prints a Markdown table for BENCHMARKS.md. MFU = tokens/s x 3 x forward FLOPs per token
(model.cost) / the machine's measured fp32 matmul FLOP/s (train.mfu.measure_matmul_flops).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from train.config import TrainConfig
from train.data import load_token_data
from train.mfu import measure_matmul_flops, mfu
from train.trainer import Trainer, lr_factor, param_groups
from zoo import load

_TICK = os.sysconf("SC_CLK_TCK")


# ---- measuring -------------------------------------------------------------------------------
def _cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process) so far."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...: busy is all but idle and iowait
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / _TICK
    t = os.times()
    return busy, t.user + t.system


class ForeignLoad:
    """Mean number of CPU cores that other processes kept busy between start() and stop()."""

    def __init__(self):
        self.cores = 0.0
        self._t0 = (0.0, 0.0, 0.0)

    def start(self) -> None:
        """Open the window."""
        self._t0 = (time.perf_counter(), *_cpu_seconds())

    def stop(self) -> None:
        """Close the window."""
        wall = time.perf_counter() - self._t0[0]
        busy, ours = _cpu_seconds()
        self.cores = max(0.0, (busy - self._t0[1]) - (ours - self._t0[2])) / max(wall, 1e-9)


@dataclass
class RunResult:
    """One run of one loop: the time of each step and, for the Trainer, the time of its extras."""

    kind: str  # "hand" or "trainer"
    step_s: list[float]  # every step; a Trainer step lasts until the next step starts (bookkeeping included)
    last_loss: float  # training loss of the last measured step: both loops must agree
    foreign_cores: float  # other processes, during the measured window
    setup_s: float = 0.0
    eval_s: list[float] = field(default_factory=list)
    checkpoint_s: list[float] = field(default_factory=list)
    save_final_s: float = 0.0
    trainer_mfu: float | None = None  # what the Trainer itself reports in its summary


def _quiet(enabled: bool) -> contextlib.AbstractContextManager:
    """Send stdout/stderr (progress bar, log lines) to /dev/null: they are still written, not shown."""
    stack = contextlib.ExitStack()
    if enabled:
        devnull = stack.enter_context(open(os.devnull, "w"))
        stack.enter_context(contextlib.redirect_stdout(devnull))
        stack.enter_context(contextlib.redirect_stderr(devnull))
    return stack


# ---- (a) the hand-written loop ----------------------------------------------------------------
class HandLoop:
    """The minimal loop: forward, cross-entropy, backward, clip, AdamW step. Nothing else."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        torch.manual_seed(cfg.seed)  # the same fresh weights as the Trainer's
        self.model = load(cfg.model, **cfg.model_overrides).train()
        self.data = load_token_data(cfg.data, seq_len=cfg.seq_len, val_fraction=cfg.val_fraction)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)

    def step(self, step: int) -> torch.Tensor:
        """Optimizer step number `step`; returns its loss (not synchronised)."""
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg)
        batch = self.data.train_batch(step, cfg.batch_size, seed=cfg.seed)  # (batch, seq_len + 1)
        logits = self.model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss


def hand_run(cfg: TrainConfig, warmup: int, measured: int) -> RunResult:
    """cfg.steps steps of the hand loop, each timed."""
    loop, load_meter, step_s, last = HandLoop(cfg), ForeignLoad(), [], 0.0
    for step in range(cfg.steps):
        if step == warmup:
            load_meter.start()
        t = time.perf_counter()
        loss = loop.step(step)
        step_s.append(time.perf_counter() - t)
        if step == warmup + measured - 1:
            load_meter.stop()
            last = loss.item()
    return RunResult("hand", step_s, last, load_meter.cores)


# ---- (b) our Trainer ---------------------------------------------------------------------------
def trainer_run(cfg: TrainConfig, warmup: int, measured: int, quiet: bool,
                companion: HandLoop | None = None) -> tuple[RunResult, RunResult | None]:
    """Trainer(cfg).run(), timed from outside; with a companion, one hand step runs before each Trainer step."""
    t0 = time.perf_counter()
    with _quiet(quiet):
        trainer = Trainer(cfg)
    setup_s = time.perf_counter() - t0
    load_meter, starts, trainer_s, hand_s, losses = ForeignLoad(), [], [], [], {}
    timings: dict[str, list[float]] = {"evaluate": [], "checkpoint": [], "save_final": []}
    step, methods = trainer.step, {name: getattr(trainer, name) for name in timings}

    def timed_step() -> dict:
        k, now = len(starts), time.perf_counter()
        if starts:
            trainer_s.append(now - starts[-1])  # the previous Trainer step and its bookkeeping
        if k == warmup:
            load_meter.start()
        elif k == warmup + measured:
            load_meter.stop()
        if companion is not None:
            loss = companion.step(k)
            hand_s.append(time.perf_counter() - now)
            losses["hand", k] = loss
        starts.append(time.perf_counter())
        record = step()
        losses["trainer", k] = record["loss"]
        return record

    def timed(name: str):
        def call(*args, **kwargs):
            t = time.perf_counter()
            try:
                return methods[name](*args, **kwargs)
            finally:
                timings[name].append(time.perf_counter() - t)
        return call

    trainer.step = timed_step  # instance attributes: run() calls self.step(), self.checkpoint(), ...
    for name in timings:
        setattr(trainer, name, timed(name))
    with _quiet(quiet):
        summary = trainer.run()
    last = warmup + measured - 1
    result = RunResult("trainer", trainer_s, losses["trainer", last], load_meter.cores, setup_s,
                       timings["evaluate"], timings["checkpoint"], sum(timings["save_final"]), summary.get("mfu"))
    hand = None if companion is None else RunResult("hand", hand_s, losses["hand", last].item(), load_meter.cores)
    return result, hand


# ---- reporting ---------------------------------------------------------------------------------
def machine() -> dict:
    """CPU model, cores, torch version and threads of this machine."""
    name = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    return {"cpu": name, "nproc": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version()}


def _events(steps: int, every: int) -> int:
    """How often an every-N action fires in a run of `steps` steps (the Trainer also fires at the end)."""
    return len({s for s in range(1, steps + 1) if s % every == 0 or s == steps})


def summarize(rounds: list[tuple[RunResult, RunResult]], cfg: TrainConfig, window: slice, peaks: list[float],
              flops_per_token: float) -> dict:
    """Medians over rounds, ratio estimates, MFU and a projection of a default-length Trainer run."""
    tokens = cfg.batch_size * cfg.seq_len
    peak = statistics.median(peaks)
    out: dict = {"peak_matmul_flops": peak, "peak_samples": len(peaks), "flops_per_token": flops_per_token,
                 "tokens_per_step": tokens}
    for i, kind in enumerate(("hand", "trainer")):
        runs = [pair[i] for pair in rounds]
        per_round = [len(r.step_s[window]) * tokens / sum(r.step_s[window]) for r in runs]
        steps = [s for r in runs for s in r.step_s[window]]
        out[kind] = {"tokens_per_s": statistics.median(per_round), "tokens_per_s_rounds": per_round,
                     "step_s_median": statistics.median(steps), "step_s_p10": statistics.quantiles(steps, n=10)[0],
                     "foreign_cores": [r.foreign_cores for r in runs], "last_loss": [r.last_loss for r in runs]}
        out[kind]["mfu"] = mfu(out[kind]["tokens_per_s"], flops_per_token, peak)
    h, t = out["hand"], out["trainer"]
    out["ratio"] = t["tokens_per_s"] / h["tokens_per_s"]
    out["ratio_rounds"] = [b / a for a, b in zip(h["tokens_per_s_rounds"], t["tokens_per_s_rounds"], strict=True)]
    # step k of the hand loop against step k of the Trainer (neighbours in time when interleaved)
    out["ratio_steps_median"] = statistics.median(a / b for hand, trainer in rounds
                                                  for a, b in zip(hand.step_s[window], trainer.step_s[window],
                                                                  strict=True))
    out["ratio_step_p10"] = h["step_s_p10"] / t["step_s_p10"]
    trainers = [pair[1] for pair in rounds]
    t.update({"setup_s": statistics.median(r.setup_s for r in trainers),
              "evaluate_s": statistics.median(s for r in trainers for s in r.eval_s),
              "checkpoint_s": statistics.median(s for r in trainers for s in r.checkpoint_s),
              "save_final_s": statistics.median(r.save_final_s for r in trainers)})
    # A run with TrainConfig's defaults: its steps at the measured speed, its evaluations and checkpoints,
    # the final save and the peak measurement run() starts with (measure_matmul_flops' default 0.5 s).
    d = TrainConfig()
    n_eval, n_ckpt = _events(d.steps, d.eval_every), _events(d.steps, d.checkpoint_every)
    extra_s = n_eval * t["evaluate_s"] + n_ckpt * t["checkpoint_s"] + t["save_final_s"] + 0.5
    projected = d.steps * tokens / (d.steps * tokens / t["tokens_per_s"] + extra_s)
    out["default_run"] = {"steps": d.steps, "evaluations": n_eval, "eval_batches": d.eval_batches,
                          "checkpoints": n_ckpt, "extra_s": extra_s, "tokens_per_s": projected,
                          "ratio": projected / h["tokens_per_s"], "mfu": mfu(projected, flops_per_token, peak)}
    return out


def markdown(s: dict, cfg: TrainConfig, args: argparse.Namespace) -> str:
    """The result table and its notes, ready for BENCHMARKS.md."""
    h, t, d = s["hand"], s["trainer"], s["default_run"]
    rows = [
        ("hand-written loop (forward, CE, backward, clip, AdamW)", h["tokens_per_s"], 1.0, h["step_s_median"],
         h["mfu"]),
        ("Trainer, training steps (no evaluation/checkpoint inside the window)", t["tokens_per_s"], s["ratio"],
         t["step_s_median"], t["mfu"]),
        (f"Trainer, projected {d['steps']}-step default run ({d['evaluations']} evaluations of "
         f"{d['eval_batches']} batches, {d['checkpoints']} checkpoints, final save)",
         d["tokens_per_s"], d["ratio"], None, d["mfu"]),
    ]
    lines = ["| loop | tokens/s | vs. hand loop | step (median) | MFU |", "|---|---:|---:|---:|---:|"]
    for name, tps, ratio, step, util in rows:
        step_text = f"{step * 1e3:.0f} ms" if step is not None else "-"
        lines.append(f"| {name} | {tps:,.0f} | {ratio:.3f} | {step_text} | {util:.1%} |")
    per_round = ", ".join(f"{a:,.0f} / {b:,.0f}" for a, b in zip(h["tokens_per_s_rounds"], t["tokens_per_s_rounds"],
                                                                  strict=True))
    how = ("one hand step before each Trainer step, inside each Trainer run" if args.mode == "interleaved"
           else "whole runs alternating hand, Trainer, Trainer, hand, ...")
    dropped = f"; {s['rounds_dropped']} noisier round(s) were run and dropped" if s["rounds_dropped"] else ""
    notes = [
        f"Mode `{args.mode}` ({how}). tokens/s: median of {len(h['tokens_per_s_rounds'])} rounds, each over "
        f"{args.steps} steps after {args.warmup} warm-up steps ({cfg.batch_size} x {cfg.seq_len} = "
        f"{s['tokens_per_step']:,} tokens/step); per round, hand / Trainer: {per_round}.",
        f"Other estimates of the ratio: median of the per-round ratios {statistics.median(s['ratio_rounds']):.3f}; "
        f"median of the step-by-step time ratios {s['ratio_steps_median']:.3f}; ratio of the 10th-percentile "
        f"step times {s['ratio_step_p10']:.3f}.",
        f"Trainer extras (median): evaluation ({cfg.eval_batches} batches) {t['evaluate_s']:.2f} s, "
        f"checkpoint {t['checkpoint_s']:.2f} s, final Hub save {t['save_final_s']:.2f} s, "
        f"Trainer() setup {t['setup_s']:.2f} s; the projection adds {d['extra_s']:.1f} s to {d['steps']} steps.",
        f"MFU: tokens/s x 3 x {s['flops_per_token'] / 1e6:.2f} MFLOP/token (forward, model.cost) / "
        f"{s['peak_matmul_flops'] / 1e9:.0f} GFLOP/s (fp32 1024^3 matmul, median of {s['peak_samples']}).",
        f"Same work: last measured training loss hand {h['last_loss'][0]:.6f}, Trainer {t['last_loss'][0]:.6f}.",
        f"Other processes kept {max(t['foreign_cores']):.2f} CPU cores busy on average in the noisiest kept "
        f"window (/proc/stat minus this process){dropped}.",
    ]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the hand loop and the Trainer side by side and print the comparison."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="lm-dense-tiny", help="catalog name")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=3, help="steps before the measured window, per run")
    p.add_argument("--steps", type=int, default=40, help="measured steps per run")
    p.add_argument("--rounds", type=int, default=3, help="runs of each loop")
    p.add_argument("--mode", choices=("interleaved", "runs"), default="interleaved",
                   help="alternate step by step inside one Trainer run, or alternate whole runs")
    p.add_argument("--max-foreign", type=float, default=0.15,
                   help="a round in which other processes kept more CPU cores busy than this is re-run")
    p.add_argument("--retries", type=int, default=2, help="extra rounds allowed to replace noisy ones")
    p.add_argument("--eval-every", type=int, default=TrainConfig.eval_every,
                   help="the Trainer's cadence; fires inside the window only if below warmup + steps")
    p.add_argument("--checkpoint-every", type=int, default=TrainConfig.checkpoint_every)
    p.add_argument("--workdir", default=None, help="where the Trainer's run folders go (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write every measurement to this JSON file")
    p.add_argument("--verbose", action="store_true", help="show the Trainer's progress bar and log lines")
    args = p.parse_args(argv)
    if args.steps < 2 or args.warmup < 0 or args.rounds < 1:
        p.error("need --steps >= 2, --warmup >= 0 and --rounds >= 1")

    info, load1 = machine(), os.getloadavg()[0]
    print(f"# {info['cpu']}, {info['nproc']} CPUs, torch {info['torch']} ({info['threads']} threads), "
          f"load average {load1:.2f}", file=sys.stderr)
    workdir = tempfile.TemporaryDirectory(prefix="train_overhead-", dir=args.workdir)
    # One step after the window: it carries the Trainer's final evaluation and checkpoint.
    base = dict(model=args.model, steps=args.warmup + args.steps + 1, batch_size=args.batch_size,
                seq_len=args.seq_len, lr=args.lr, seed=args.seed, eval_every=args.eval_every,
                checkpoint_every=args.checkpoint_every)
    cfg = TrainConfig(**base)
    load_token_data(cfg.data, seq_len=cfg.seq_len)  # tokenize into the cache now, not inside a timed run
    flops_per_token = load(args.model).cost(args.seq_len)["flops_per_token"]

    rounds: list[tuple[float, tuple[RunResult, RunResult]]] = []  # (noise, (hand, trainer))
    peaks: list[float] = []
    started = time.perf_counter()
    while (sum(noise <= args.max_foreign for noise, _ in rounds) < args.rounds
           and len(rounds) < args.rounds + args.retries):
        r = len(rounds)
        peaks.append(measure_matmul_flops(torch.device("cpu")))
        out = str(Path(workdir.name) / f"round{r}")
        gc.collect()
        if args.mode == "interleaved":
            trainer, hand = trainer_run(TrainConfig(**base, out=out), args.warmup, args.steps, not args.verbose,
                                        companion=HandLoop(cfg))
        else:  # A B, B A, ...: neither always goes first
            first_hand = r % 2 == 0
            hand = hand_run(cfg, args.warmup, args.steps) if first_hand else None
            trainer, _ = trainer_run(TrainConfig(**base, out=out), args.warmup, args.steps, not args.verbose)
            hand = hand or hand_run(cfg, args.warmup, args.steps)
        noise = max(hand.foreign_cores, trainer.foreign_cores)
        window = slice(args.warmup, args.warmup + args.steps)
        speeds = [args.steps * cfg.batch_size * cfg.seq_len / sum(x.step_s[window]) for x in (hand, trainer)]
        print(f"round {r + 1}: hand {speeds[0]:,.0f}, Trainer {speeds[1]:,.0f} tokens/s; other processes "
              f"{noise:.2f} cores" + (" (too busy: kept only if the retries run out)" if noise > args.max_foreign
                                      else ""), file=sys.stderr)
        rounds.append((noise, (hand, trainer)))
    workdir.cleanup()
    # The quiet rounds; if too few, the least noisy of the rest fill up (and the notes say so).
    by_noise = sorted(range(len(rounds)), key=lambda i: (rounds[i][0] > args.max_foreign, rounds[i][0]))
    kept = [rounds[i][1] for i in sorted(by_noise[:args.rounds])]

    summary = summarize(kept, cfg, slice(args.warmup, args.warmup + args.steps), peaks, flops_per_token)
    summary["rounds_dropped"] = len(rounds) - len(kept)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# {args.model}, {when}, {time.perf_counter() - started:.0f} s, load average at start {load1:.2f}\n")
    print(markdown(summary, cfg, args))
    if args.json:
        raw = [{"foreign_cores": noise, "hand": dataclasses.asdict(a), "trainer": dataclasses.asdict(b)}
               for noise, (a, b) in rounds]
        Path(args.json).write_text(json.dumps({"args": vars(args), "machine": info, "date": when,
                                               "summary": summary, "rounds": raw}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
