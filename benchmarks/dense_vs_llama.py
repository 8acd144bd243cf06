"""Zoo LMs against transformers' own classes (issue 14): training and `generate` tokens/s, same weights, one run.

Two pairs, each built from one catalog model: `zoo.load(name)` and `zoo.interop.to_transformers(model)`,
which gives the transformers class with the very same weights (checked before timing: the logits agree
to < 1e-4, and the first training loss is the same):

- `lm-dense-tiny` against `LlamaForCausalLM` (the issue's target: the zoo is not slower, >= 1.0x);
- `moe-tiny` against `MixtralForCausalLM` (reported), transformers' default experts implementation.

Measurements, per pair:

- train: tokens/s of training steps, forward + backward + AdamW step on a (batch, seq_len + 1) block of
  random tokens made before timing (no data loading, no gradient clipping). The zoo side computes its loss
  as the Trainer does (cross-entropy + the layers' weighted aux losses, then its step hook); Mixtral adds
  `router_aux_loss_coef` x its load-balancing loss (`output_router_logits=True`), as its own loss does.
- generate bN: new tokens/s of one `model.generate(prompt, max_new_tokens=N, do_sample=False,
  use_cache=True)` call (greedy, dynamic KV cache) from a fixed random prompt; the wall time includes
  the prompt's forward. The generated ids of the two sides are compared (equal weights: equal ids).

Both sides run in this process with the same threads and dtype (fp32). Interleaved rounds: in every
round each measurement times the zoo and transformers back to back, the order alternating between
rounds and measurements, so both see the same machine state. Reported per measurement: the median
tokens/s of each side over the rounds and the median (min, max) of the per-round ratios zoo /
transformers, the ratio of the best rounds, and the median ratio over the quiet rounds; the JSON also
keeps the CPU time of this process and the CPU share other processes took during every timed call
(/proc/stat).

Every measurement runs at 2 torch threads and at 1 (`--threads`), in the same rounds: on a 2-core
machine that other jobs share, two threads wait for each other whenever the other core is taken, so
the 2-thread rows measure the load as much as the code and the 1-thread rows are the stable
comparison. The script sets OMP_WAIT_POLICY=PASSIVE unless it is set already: with OpenMP's spinning
default, one 2-thread generate call took 0.5 s or 30 s depending on the other jobs.

    python benchmarks/dense_vs_llama.py --json benchmarks/results/dense_vs_llama.json    # ~6-10 min
    python benchmarks/dense_vs_llama.py --quick                                         # ~1 min
    python benchmarks/dense_vs_llama.py --profile moe-tiny --profile-batch 1            # where the time goes

Prints a Markdown table for BENCHMARKS.md, with the machine and the command.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import gc
import io
import json
import math
import os
import pstats
import statistics
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "benchmarks"):  # the zoo packages, and benchmarks/train_overhead.py
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. With spinning (OpenMP's
# default) and the other core taken by another process, a 2-thread op waits for a time slice, and one
# generate call takes 5-30 s instead of 0.5-1 s. An OMP_WAIT_POLICY already set is kept.
OMP_WAIT_POLICY = os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from train_overhead import ForeignLoad, machine  # noqa: E402

import zoo  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.tasks import lm_loss  # noqa: E402
from zoo.interop import to_transformers  # noqa: E402

PAIRS = {"lm-dense-tiny": "LlamaForCausalLM", "moe-tiny": "MixtralForCausalLM"}
TARGETS = {"lm-dense-tiny": 1.0}  # zoo / transformers must be >= this; the others are reported
LOGIT_TOLERANCE = 1e-4
QUIET_CORES = 0.25  # a round is quiet when other processes kept fewer cores than this busy during both calls


@dataclass
class Settings:
    """What one run measures (the presets below, then any flag given on the command line)."""

    batch_size: int = 16  # training batch, as the Trainer's default for lm-dense-tiny
    seq_len: int = 256
    train_steps: int = 2  # timed training steps per side per round
    warmup_steps: int = 1  # untimed training steps per side before the first round
    gen_batches: list[int] = field(default_factory=lambda: [1, 8])
    new_tokens: int = 200
    prompt_len: int = 16
    rounds: int = 5
    threads: list[int] = field(default_factory=lambda: [2, 1])
    seed: int = 0
    overrides: dict = field(default_factory=dict)  # config overrides of both catalog models (--smoke)


PRESETS = {
    "default": Settings(),
    "quick": Settings(batch_size=8, seq_len=128, train_steps=1, new_tokens=100, rounds=3),
    "smoke": Settings(batch_size=2, seq_len=16, train_steps=1, new_tokens=5, prompt_len=4, rounds=1,
                      overrides={"n_layers": 1}),
}


@dataclass
class Side:
    """One model of a pair, for one measurement: what each round timed."""

    seconds: list[float] = field(default_factory=list)  # wall time of the timed call(s)
    cpu_seconds: list[float] = field(default_factory=list)  # CPU time of this process in them
    foreign_cores: list[float] = field(default_factory=list)  # other processes' CPU cores meanwhile


# ---- the two sides -------------------------------------------------------------------------------
class Pair:
    """A zoo LM and its transformers twin: untouched copies for generate, training copies with optimizers."""

    def __init__(self, name: str, settings: Settings):
        torch.manual_seed(settings.seed)
        self.name, self.peer, self.overrides = name, PAIRS[name], dict(settings.overrides)
        self.zoo = zoo.load(name, **settings.overrides).eval()
        self.hf = to_transformers(self.zoo).eval()
        if type(self.hf).__name__ != self.peer:
            raise RuntimeError(f"to_transformers({name}) gave {type(self.hf).__name__}, expected {self.peer}")
        self.moe = self.zoo.config.mlp == "moe"
        # Training changes the weights: generate keeps comparing the equal, untrained ones.
        self.train_zoo, self.train_hf = copy.deepcopy(self.zoo).train(), copy.deepcopy(self.hf).train()
        lr = TrainConfig.lr
        self.opt_zoo = torch.optim.AdamW(self.train_zoo.parameters(), lr=lr)
        self.opt_hf = torch.optim.AdamW(self.train_hf.parameters(), lr=lr)
        self.steps = 0
        g = torch.Generator().manual_seed(settings.seed + 1)
        vocab = self.zoo.config.vocab_size
        self.batches = [torch.randint(0, vocab, (settings.batch_size, settings.seq_len + 1), generator=g)
                        for _ in range(2)]
        self.prompts = {b: torch.randint(0, vocab, (b, settings.prompt_len), generator=g)
                        for b in settings.gen_batches}

    def describe(self) -> dict:
        cost = self.zoo.cost(self.zoo.config.max_seq_len)
        c = self.hf.config
        return {"zoo": self.name, "transformers": self.peer, "overrides": self.overrides,
                "total_params": cost["total_params"], "active_params": cost["active_params"],
                "attn_implementation": c._attn_implementation,
                "experts_implementation": getattr(c, "_experts_implementation", None) if self.moe else None}

    # -- training --
    def zoo_loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        out = lm_loss(self.train_zoo, batch)  # what the Trainer computes
        return out.loss, out.loss + sum(out.aux.values()), out.stats

    def hf_loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kw = {"output_router_logits": True} if self.moe else {}
        out = self.train_hf(input_ids=batch[:, :-1], **kw)
        ce = F.cross_entropy(out.logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        aux = self.train_hf.config.router_aux_loss_coef * out.aux_loss if self.moe else 0.0
        return ce, ce + aux

    def train_zoo_steps(self, n: int) -> None:
        for i in range(n):
            _, loss, stats = self.zoo_loss(self.batches[(self.steps + i) % 2])
            loss.backward()
            self.opt_zoo.step()
            self.opt_zoo.zero_grad(set_to_none=True)
            self.train_zoo.after_optimizer_step(stats, self.steps + i + 1)

    def train_hf_steps(self, n: int) -> None:
        for i in range(n):
            _, loss = self.hf_loss(self.batches[(self.steps + i) % 2])
            loss.backward()
            self.opt_hf.step()
            self.opt_hf.zero_grad(set_to_none=True)

    # -- generate --
    def generate(self, side: str, batch: int, new_tokens: int) -> torch.Tensor:
        model = self.zoo if side == "zoo" else self.hf
        prompt = self.prompts[batch]
        out = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, use_cache=True)
        if out.shape != (batch, prompt.shape[1] + new_tokens):
            raise RuntimeError(f"{side} generate returned shape {tuple(out.shape)}, expected "
                               f"{(batch, prompt.shape[1] + new_tokens)}")
        return out

    # -- checks before timing --
    @torch.no_grad()
    def check(self, settings: Settings) -> dict:
        """Same function: eval logits, the first training loss (before any step), greedy ids."""
        x = torch.randint(0, self.zoo.config.vocab_size, (2, settings.seq_len),
                          generator=torch.Generator().manual_seed(settings.seed + 2))
        ours, theirs = self.zoo(input_ids=x).logits, self.hf(input_ids=x).logits
        diff = (ours - theirs).abs().max().item()
        ce_zoo = self.zoo_loss(self.batches[0])[0].item()
        ce_hf = self.hf_loss(self.batches[0])[0].item()
        return {"logits_max_abs_diff": diff, "logits_max_abs": ours.abs().max().item(),
                "logits_shape": list(ours.shape), "first_train_ce": {"zoo": ce_zoo, "transformers": ce_hf,
                                                                     "abs_diff": abs(ce_zoo - ce_hf)}}


def first_difference(a: torch.Tensor, b: torch.Tensor) -> list[int] | None:
    """[row, position] of the first generated id where a and b differ, or None."""
    if torch.equal(a, b):
        return None
    rows, cols = (a != b).nonzero(as_tuple=True)
    i = int(torch.argmin(cols * a.shape[0] + rows))
    return [int(rows[i]), int(cols[i])]


# ---- timing ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Measurement:
    """What one row of the table times: training steps or one generate call, at a thread count."""

    kind: str  # "train" or "generate"
    batch: int
    threads: int

    @property
    def key(self) -> str:
        return f"{'train' if self.kind == 'train' else f'generate_b{self.batch}'}/{self.threads}t"

    def tokens(self, settings: Settings) -> int:
        """Tokens one timed call processes (training) or generates."""
        if self.kind == "train":
            return settings.train_steps * self.batch * settings.seq_len
        return self.batch * settings.new_tokens


def measurements(settings: Settings) -> list[Measurement]:
    return [m for t in settings.threads
            for m in [Measurement("train", settings.batch_size, t)]
            + [Measurement("generate", b, t) for b in settings.gen_batches]]


def timed(fn, side: Side) -> None:
    """Run fn() once, appending its wall time, this process's CPU time and the others' load to side."""
    gc.collect()
    meter = ForeignLoad()
    meter.start()
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    side.seconds.append(time.perf_counter() - wall)
    side.cpu_seconds.append(time.process_time() - cpu)
    meter.stop()
    side.foreign_cores.append(meter.cores)


def calls_of(pair: Pair, m: Measurement, settings: Settings, outs: dict) -> dict:
    """The call each side times for measurement m; generate calls put their ids into outs."""
    if m.kind == "train":
        return {"zoo": lambda: pair.train_zoo_steps(settings.train_steps),
                "transformers": lambda: pair.train_hf_steps(settings.train_steps)}

    def generate(side: str):
        return lambda: outs.__setitem__(side, pair.generate(side, m.batch, settings.new_tokens))

    return {side: generate(side) for side in ("zoo", "transformers")}


def warm_up(pair: Pair, settings: Settings) -> None:
    """Untimed training steps and a short generate call of each side, at each thread count."""
    for t in settings.threads:
        torch.set_num_threads(t)
        pair.train_zoo_steps(settings.warmup_steps)
        pair.train_hf_steps(settings.warmup_steps)
        pair.steps += settings.warmup_steps
        for b in settings.gen_batches:  # a model's first generate call is slower (allocations, lazy setup)
            for side in ("zoo", "transformers"):
                pair.generate(side, b, min(settings.new_tokens, 8))


def run_pair(pair: Pair, settings: Settings, log) -> dict:
    """Warm up, then the interleaved rounds of every measurement of one pair."""
    todo = measurements(settings)
    sides = {m: {"zoo": Side(), "transformers": Side()} for m in todo}
    first: dict[Measurement, list[str]] = {m: [] for m in todo}
    generated: dict[Measurement, list[dict]] = {m: [] for m in todo if m.kind == "generate"}
    warm_up(pair, settings)
    for r in range(settings.rounds):
        for j, m in enumerate(todo):
            torch.set_num_threads(m.threads)
            order = ["zoo", "transformers"] if (r + j) % 2 == 0 else ["transformers", "zoo"]
            first[m].append(order[0])
            outs: dict[str, torch.Tensor] = {}
            calls = calls_of(pair, m, settings, outs)
            for side in order:
                timed(calls[side], sides[m][side])
            if m.kind == "train":
                pair.steps += settings.train_steps
            else:
                diff = first_difference(outs["zoo"], outs["transformers"])
                generated[m].append({"equal": diff is None, "first_difference": diff,
                                     "zoo_ids_row0": outs["zoo"][0].tolist()})
            z, t = (sides[m][side].seconds[-1] for side in ("zoo", "transformers"))
            log(f"{pair.name} round {r + 1}/{settings.rounds} {m.key}: zoo {z:.2f} s, transformers {t:.2f} s "
                f"(zoo/transformers speed {t / z:.3f}); other processes "
                f"{max(sides[m][side].foreign_cores[-1] for side in sides[m]):.2f} cores")
    return {m.key: summarize(pair, settings, m, sides[m], first[m], generated.get(m)) for m in todo}


def summarize(pair: Pair, settings: Settings, m: Measurement, by_side: dict, first: list[str],
              generated: list[dict] | None) -> dict:
    """Medians, paired per-round ratios and the checks of one measurement."""
    tokens = m.tokens(settings)
    entry: dict = {**asdict(m), "tokens_per_call": tokens, "first": first}
    for name, side in by_side.items():
        per_round = [tokens / t for t in side.seconds]
        entry[name] = {"tokens_per_s": statistics.median(per_round), "tokens_per_s_rounds": per_round,
                       "tokens_per_s_best": max(per_round),
                       "tokens_per_cpu_s": statistics.median(tokens / c for c in side.cpu_seconds), **asdict(side)}
    zoo_side, hf_side = entry["zoo"], entry["transformers"]
    ratios = [a / b for a, b in zip(zoo_side["tokens_per_s_rounds"], hf_side["tokens_per_s_rounds"], strict=True)]
    entry["ratio"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": ratios,
                      "of_medians": zoo_side["tokens_per_s"] / hf_side["tokens_per_s"],
                      "of_best": zoo_side["tokens_per_s_best"] / hf_side["tokens_per_s_best"],
                      "cpu_time": zoo_side["tokens_per_cpu_s"] / hf_side["tokens_per_cpu_s"]}
    quiet = [r for r, a, b in zip(ratios, zoo_side["foreign_cores"], hf_side["foreign_cores"], strict=True)
             if max(a, b) < QUIET_CORES]
    entry["ratio"].update(quiet_rounds=len(quiet), quiet_median=statistics.median(quiet) if quiet else None)
    if generated is not None:
        entry["generated_ids_equal"] = all(c["equal"] for c in generated)
        entry["first_difference"] = next((c["first_difference"] for c in generated if not c["equal"]), None)
        entry["zoo_ids_row0"] = generated[-1]["zoo_ids_row0"]
    target = TARGETS.get(pair.name)
    entry["target"] = target
    entry["target_met"] = None if target is None else entry["ratio"]["median"] >= target
    return entry


# ---- profile -----------------------------------------------------------------------------------------
def profile(name: str, batch: int, settings: Settings, rows: int) -> None:
    """One generate call of each side under torch.profiler (ops) and cProfile (Python), printed."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    settings.gen_batches = [batch]
    pair = Pair(name, settings)
    for side in ("zoo", "transformers"):
        pair.generate(side, batch, settings.new_tokens)  # warm-up
        wall = time.perf_counter()
        pair.generate(side, batch, settings.new_tokens)
        wall = time.perf_counter() - wall
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            pair.generate(side, batch, settings.new_tokens)
        print(f"\n## {side}: {name}, batch {batch}, {settings.new_tokens} new tokens: {wall:.3f} s unprofiled "
              f"({1e3 * wall / settings.new_tokens:.2f} ms per token)\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
        stats = io.StringIO()
        cp = cProfile.Profile()
        cp.enable()
        pair.generate(side, batch, settings.new_tokens)
        cp.disable()
        pstats.Stats(cp, stream=stats).sort_stats("tottime").print_stats(rows)
        print(stats.getvalue())


# ---- report ------------------------------------------------------------------------------------------
def verdict(entry: dict) -> str:
    if entry["target"] is None:
        return "reported"
    return f">= {entry['target']:.1f}x: {'met' if entry['target_met'] else '**not met**'}"


def markdown(results: dict) -> str:
    """The result table and its notes, ready for BENCHMARKS.md."""
    s, info = results["settings"], results["machine"]
    lines = ["| zoo model | transformers class | measurement | threads | zoo tokens/s | transformers tokens/s | "
             "zoo / transformers: median of rounds | min - max | best / best | quiet rounds: median (n) | target | "
             "same greedy ids |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for p in results["pairs"]:
        for e in p["measurements"].values():
            what = (f"train {e['batch']} x {s['seq_len']}" if e["kind"] == "train"
                    else f"generate batch {e['batch']}, {s['new_tokens']} new")
            r = e["ratio"]
            quiet = "-" if r["quiet_median"] is None else f"{r['quiet_median']:.3f} ({r['quiet_rounds']})"
            same = "-" if "generated_ids_equal" not in e else ("yes" if e["generated_ids_equal"]
                                                                  else f"no (first at {e['first_difference']})")
            lines.append(f"| `{p['zoo']}` | `{p['transformers']}` | {what} | {e['threads']} | "
                         f"{e['zoo']['tokens_per_s']:,.0f} | {e['transformers']['tokens_per_s']:,.0f} | "
                         f"**{r['median']:.3f}** | {r['min']:.3f} - {r['max']:.3f} | {r['of_best']:.3f} | "
                         f"{quiet} | {verdict(e)} | {same} |")
    loads = [c for p in results["pairs"] for e in p["measurements"].values()
             for side in ("zoo", "transformers") for c in e[side]["foreign_cores"]]
    experts = [p["experts_implementation"] for p in results["pairs"] if p["experts_implementation"]]
    threads = " and ".join(str(t) for t in s["threads"])
    notes = [
        f"Machine: {info['cpu']}, {info['nproc']} CPUs, fp32, {threads} torch threads (OMP_WAIT_POLICY="
        f"{info['omp_wait_policy']}); torch {info['torch']}, "
        f"transformers {info['transformers']}, Python {info['python']}; {results['date']}, "
        f"{results['seconds']:.0f} s; load average {info['load_start']:.2f} at start, {info['load_end']:.2f} at "
        f"end; other processes kept {statistics.median(loads):.2f} cores busy (median over the timed calls, "
        f"max {max(loads):.2f}).",
        f"Command: `{results['command']}`.",
        f"{s['rounds']} interleaved rounds; in each, every measurement times both sides back to back, the order "
        f"alternating. train: {s['train_steps']} steps per side per round (forward + backward + AdamW, "
        f"{s['batch_size']} x {s['seq_len']} tokens, after {s['warmup_steps']} warm-up step(s)); generate: one "
        f"greedy `generate(max_new_tokens={s['new_tokens']}, do_sample=False, use_cache=True)` call per side "
        f"per round from a {s['prompt_len']}-token prompt (tokens/s = batch x new tokens / wall time, the "
        f"prompt's forward included). best / best: the ratio of each side's fastest round; quiet rounds: those in "
        f"which other processes kept < {QUIET_CORES} cores busy during both calls.",
        "Same function on both sides (`zoo.interop.to_transformers`, same weights): logits max abs diff "
        + ", ".join(f"{p['zoo']} {p['check']['logits_max_abs_diff']:.1e}" for p in results["pairs"])
        + f" (tolerance {results['logit_tolerance']:g}); first training cross-entropy "
        + ", ".join(f"{p['zoo']} {p['check']['first_train_ce']['zoo']:.6f} vs "
                    f"{p['check']['first_train_ce']['transformers']:.6f}" for p in results["pairs"])
        + "; attention SDPA on both sides" + (f"; Mixtral experts `{experts[0]}`" if experts else "") + ".",
        "Ratio by CPU time of this process (tokens per CPU-second, zoo / transformers): "
        + ", ".join(f"{p['zoo']} {k} {e['ratio']['cpu_time']:.3f}" for p in results["pairs"]
                    for k, e in p["measurements"].items()) + ".",
    ]
    if s["overrides"]:
        notes.append(f"Config overrides of both models: {s['overrides']}.")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Settings]:
    d = PRESETS["default"]
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(textwrap.fill(par, 100) for par in (
            "Measures, for lm-dense-tiny vs LlamaForCausalLM and moe-tiny vs MixtralForCausalLM (same weights, "
            "logits checked equal first): train = tokens/s of forward + backward + AdamW steps on random tokens; "
            "generate = new tokens/s of greedy generate(do_sample=False, use_cache=True) from a fixed prompt, "
            "ids compared. Interleaved rounds, zoo and transformers back to back; the table gives median "
            "tokens/s and the median (min, max) of the per-round ratios zoo / transformers.",
            f"Defaults: {describe(d)}; 16 x 256 is the Trainer's default batch for lm-dense-tiny. --quick and "
            "--smoke set smaller sizes (flags given with a preset override it). `--profile moe-tiny` shows where "
            "generate's time goes.")),
    )
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help=f"a ~1 minute run: {describe(PRESETS['quick'])}")
    preset.add_argument("--smoke", action="store_true",
                        help=f"seconds, for the test (checks the script, not speed): {describe(PRESETS['smoke'])}")
    p.add_argument("--models", nargs="+", choices=list(PAIRS), default=list(PAIRS),
                   help="which pairs to run (default: both)")
    p.add_argument("--batch-size", type=int, help=f"training batch size (default {d.batch_size})")
    p.add_argument("--seq-len", type=int, help=f"training sequence length (default {d.seq_len})")
    p.add_argument("--train-steps", type=int, help=f"timed training steps per side per round (default {d.train_steps})")
    p.add_argument("--warmup-steps", type=int,
                   help=f"untimed training steps per side and thread count first (default {d.warmup_steps})")
    p.add_argument("--gen-batches", type=int, nargs="+", help=f"generate batch sizes (default {d.gen_batches})")
    p.add_argument("--new-tokens", type=int, help=f"max_new_tokens of each generate call (default {d.new_tokens})")
    p.add_argument("--prompt-len", type=int, help=f"prompt length of each generate call (default {d.prompt_len})")
    p.add_argument("--rounds", type=int, help=f"interleaved rounds (default {d.rounds})")
    p.add_argument("--threads", type=int, nargs="+",
                   help=f"torch.set_num_threads values; each is its own set of rows, in the same rounds "
                        f"(default {d.threads})")
    p.add_argument("--seed", type=int, help=f"seed of the weights, batches and prompts (default {d.seed})")
    p.add_argument("--json", metavar="PATH", help="write every measurement to this JSON file")
    p.add_argument("--profile", choices=list(PAIRS), metavar="MODEL",
                   help="instead of the benchmark: profile one generate call of each side of this pair "
                        "(torch.profiler ops, then cProfile Python functions) and print the tables")
    p.add_argument("--profile-batch", type=int, default=1, help="generate batch size for --profile (default 1)")
    p.add_argument("--profile-rows", type=int, default=25, help="rows of each --profile table (default 25)")
    p.add_argument("--quiet", action="store_true", help="no per-round lines on stderr")
    args = p.parse_args(argv)
    settings = copy.deepcopy(PRESETS["smoke" if args.smoke else "quick" if args.quick else "default"])
    for name in ("batch_size", "seq_len", "train_steps", "warmup_steps", "gen_batches", "new_tokens",
                 "prompt_len", "rounds", "threads", "seed"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    if min(settings.batch_size, settings.seq_len, settings.train_steps, settings.new_tokens, settings.prompt_len,
           settings.rounds, *settings.threads, *settings.gen_batches) < 1 or settings.warmup_steps < 0:
        p.error("sizes, steps, rounds and threads must be >= 1 (--warmup-steps >= 0)")
    return args, settings


def describe(s: Settings) -> str:
    text = (f"{s.batch_size} x {s.seq_len}, {s.train_steps} step(s), {s.new_tokens} new tokens from {s.prompt_len}, "
            f"{s.rounds} round(s), threads {' '.join(map(str, s.threads))}")
    return text + "".join(f", {k}={v}" for k, v in s.overrides.items())


def main(argv: list[str] | None = None) -> int:
    args, settings = parse_args(argv)
    torch.set_num_threads(settings.threads[0])
    if args.profile:
        profile(args.profile, args.profile_batch, settings, args.profile_rows)
        return 0

    def log(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    info = {**machine(), "transformers": transformers.__version__, "omp_wait_policy": OMP_WAIT_POLICY,
            "load_start": os.getloadavg()[0]}
    command = "python benchmarks/dense_vs_llama.py" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None
                                                                                 else argv))
    log(f"# {info['cpu']}, {info['nproc']} CPUs, torch {info['torch']}, threads {settings.threads}, transformers "
        f"{info['transformers']}, load average {info['load_start']:.2f}")
    started = time.perf_counter()
    pairs = []
    for name in args.models:
        pair = Pair(name, settings)
        check = pair.check(settings)
        log(f"{name} vs {pair.peer}: logits max abs diff {check['logits_max_abs_diff']:.2e}, first training CE "
            f"{check['first_train_ce']['zoo']:.6f} / {check['first_train_ce']['transformers']:.6f}")
        if not check["logits_max_abs_diff"] < LOGIT_TOLERANCE:
            print(f"error: {name} and {pair.peer} do not compute the same logits (max abs diff "
                  f"{check['logits_max_abs_diff']:.3e} >= {LOGIT_TOLERANCE}): timing them would compare "
                  "different functions", file=sys.stderr)
            return 1
        pairs.append({**pair.describe(), "check": check, "measurements": run_pair(pair, settings, log)})
        del pair
    info["load_end"] = os.getloadavg()[0]
    results = {"command": command, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "seconds": time.perf_counter() - started, "machine": info, "settings": asdict(settings),
               "logit_tolerance": LOGIT_TOLERANCE, "pairs": pairs}
    table = markdown(results)
    results["markdown"] = table
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    bad = [f"{p['zoo']} {m}" for p in pairs for m, e in p["measurements"].items()
           if not all(math.isfinite(e[s]["tokens_per_s"]) for s in ("zoo", "transformers"))]
    if bad:
        print(f"error: non-finite tokens/s in {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
