"""The measurement protocol of issue 17: paired runs over seeds, intervals of paired differences, a small
learning-rate sweep per model chosen on a selection split, equal tokens, active FLOPs and measured
tokens/s per run, and a ledger of finished runs so that an interrupted protocol resumes.

- Held-out data: the trainer's validation blocks (interleaved through the corpus, the same for every seed
  and model) are split once more, alternately: even positions are the *selection* split (the learning
  rate is chosen on it), odd positions the *report* split (the numbers and intervals are computed on it).
- A model's learning rate is the best of `lrs` at the first seed (on the selection split); its other
  seeds run at that rate. Every run of one protocol has the same steps, batch and sequence length, so
  the same tokens.
- Paired comparison: for each seed, (model - baseline) on the report split, both at their own chosen
  learning rate and the same seed (hence the same batches); mean and a two-sided t interval.

The statistics are plain Python (no scipy): the Student t quantile is found by bisection on its CDF,
which is the regularized incomplete beta function (computed by its continued fraction).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# ---- statistics --------------------------------------------------------------------------------------------


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz), converging for x < (a+1)/(a+b+2)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            return h
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * betainc(df / 2, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


@functools.lru_cache(maxsize=1024)
def t_quantile(q: float, df: float) -> float:
    """The t with P(T <= t) = q (bisection on t_cdf to 1e-12)."""
    if not 0 < q < 1:
        raise ValueError(f"q must be in (0, 1), got {q}")
    if q < 0.5:
        return -t_quantile(1 - q, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < q:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < q else (low, mid)
        if high - low < 1e-12 * max(1.0, high):
            break
    return (low + high) / 2


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean of a_i - b_i with its two-sided `confidence` t interval and the paired t-test's p-value.

    n = 1 gives the difference with an infinite interval and p = nan; zero spread gives a zero-width interval.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"need two equally long, non-empty samples, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b, strict=True)]
    n = len(d)
    mean = sum(d) / n
    if n == 1:
        return {"n": 1, "mean": mean, "sd": float("nan"), "low": -math.inf, "high": math.inf, "p": float("nan"),
                "confidence": confidence}
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    se = sd / math.sqrt(n)
    half = t_quantile(0.5 + confidence / 2, n - 1) * se
    if se == 0:
        p = 1.0 if mean == 0 else 0.0
    else:
        p = 2 * (1 - t_cdf(abs(mean) / se, n - 1))
    return {"n": n, "mean": mean, "sd": sd, "low": mean - half, "high": mean + half, "p": p,
            "confidence": confidence}


def verdict(diff: dict, lower_is_better: bool = True) -> str:
    """'better' / 'worse' when the interval excludes 0, else 'no resolved difference'."""
    if diff["high"] < 0:
        return "better" if lower_is_better else "worse"
    if diff["low"] > 0:
        return "worse" if lower_is_better else "better"
    return "no resolved difference"


# ---- the ledger of finished runs -------------------------------------------------------------------------


class Ledger:
    """A JSON file of finished runs, key -> record; written atomically after every run (a crash loses at most
    the run in progress). A key already in it is skipped on rerun."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.runs: dict[str, dict] = {}
        if self.path.is_file():
            data = json.loads(self.path.read_text())
            self.runs = dict(data.get("runs", {}))

    def __contains__(self, key: str) -> bool:
        return key in self.runs

    def get(self, key: str) -> dict | None:
        return self.runs.get(key)

    def add(self, key: str, record: dict) -> None:
        self.runs[key] = record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"runs": self.runs}, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def run(self, key: str, fn: Callable[[], dict]) -> tuple[dict, bool]:
        """The record of `key`: from the ledger (skipped: True), else fn() recorded now (False)."""
        if key in self.runs:
            return self.runs[key], True
        record = fn()
        self.add(key, record)
        return record, False


# ---- one run under the protocol ----------------------------------------------------------------------------


CHECKOUT = Path(__file__).resolve().parents[1]


def portable_path(path: str) -> str:
    """`path` as "<zoo>/relative/path" when it lies inside this checkout (the bundled corpora), else unchanged."""
    try:
        return "<zoo>/" + Path(path).resolve().relative_to(CHECKOUT).as_posix()
    except (ValueError, OSError):
        return str(path)


@dataclass(frozen=True)
class RunSpec:
    """Everything that makes a run: two specs with the same key are the same run."""

    model: str  # catalog name
    lr: float
    seed: int
    steps: int
    batch_size: int
    seq_len: int
    data: tuple[str, ...] | None = None  # None: the bundled corpus
    overrides: tuple[tuple[str, object], ...] = ()  # model config fields
    warmup_steps: int = 0
    eval_blocks: int = 0  # held-out blocks per split, spread evenly (0: every one)

    def key(self) -> str:
        """The ledger key: every field, with data files inside this checkout named relative to it ("<zoo>/train/
        corpus/mixed.jsonl.gz"), so that a ledger resumes from another clone of the project."""
        fields = asdict(self)
        if fields["data"]:
            fields["data"] = [portable_path(d) for d in fields["data"]]
        return json.dumps(fields, sort_keys=True, default=str)

    def name(self) -> str:
        return f"{self.model}-lr{self.lr:g}-seed{self.seed}"


class HeldOut:
    """Every other validation block of `data` (parity 0: the selection split, 1: the report split), at most
    `max_blocks` of them spread evenly over the corpus (0: all), with the interface evaluate_lm reads."""

    def __init__(self, data, parity: int, max_blocks: int = 0):
        import numpy as np

        index = np.asarray(data.val_index)[parity::2]
        if max_blocks and len(index) > max_blocks:
            index = index[np.linspace(0, len(index) - 1, max_blocks).round().astype(np.int64)]
        self.data, self.index = data, index

    def val_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        for start in range(0, len(self.index), batch_size):
            yield self.data._blocks(self.index[start:start + batch_size])

    def text_bytes(self, ids: torch.Tensor) -> int | None:
        return self.data.text_bytes(ids)


def held_out_losses(model, data, batch_size: int, max_blocks: int = 0) -> dict:
    """Validation loss on the selection split and on the report split (both nats per token)."""
    from train.evaluate import evaluate_lm

    select = evaluate_lm(model, HeldOut(data, 0, max_blocks), batch_size)
    report = evaluate_lm(model, HeldOut(data, 1, max_blocks), batch_size)
    return {"select_loss": select["val_loss"], "report_loss": report["val_loss"],
            "select_tokens": select["val_tokens"], "report_tokens": report["val_tokens"]}


def train_run(spec: RunSpec, work: Path, keep_final: bool = True, quiet: bool = True) -> dict:
    """Train `spec` with the common Trainer in work/<name> and return its record: held-out losses, tokens,
    measured tokens/s, active FLOPs and parameters (model.cost at seq_len), wall time, whether the machine
    was busy, and the final checkpoint (kept if keep_final, else removed with the run folder)."""
    from train import mfu
    from train.config import TrainConfig
    from train.trainer import Trainer

    out = work / spec.name()
    shutil.rmtree(out, ignore_errors=True)  # a run interrupted before it reached the ledger starts afresh
    cfg = TrainConfig(model=spec.model, model_overrides=dict(spec.overrides), out=str(out), steps=spec.steps,
                      batch_size=spec.batch_size, seq_len=spec.seq_len, lr=spec.lr, seed=spec.seed,
                      data=list(spec.data) if spec.data else None, warmup_steps=spec.warmup_steps,
                      val_split="interleaved",
                      eval_every=spec.steps, checkpoint_every=spec.steps, eval_batches=1, keep_last=1,
                      log_every=max(1, spec.steps // 4))
    start, cpu_start = time.perf_counter(), time.process_time()
    with open(os.devnull, "w") as sink, contextlib.ExitStack() as stack:
        if quiet:  # the trainer's progress bar and log lines
            stack.enter_context(contextlib.redirect_stderr(sink))
            stack.enter_context(contextlib.redirect_stdout(sink))
        trainer = Trainer(cfg)
        summary = trainer.run()
    if summary.get("interrupted"):
        raise KeyboardInterrupt(f"{spec.name()} interrupted at step {summary.get('step')}")
    model = trainer.model
    losses = held_out_losses(model, trainer.task.data, spec.batch_size, spec.eval_blocks)
    cost = model.cost(spec.seq_len)  # top-p routing: its largest k (the worst case)
    if getattr(model.config, "mlp", None) == "moe":  # MoE: the mean k measured on held-out tokens
        sample = next(HeldOut(trainer.task.data, 1, max_blocks=spec.batch_size).val_batches(spec.batch_size))
        measured = model.cost(spec.seq_len, sample=sample[:, :-1])
        cost = {**measured, "worst_case_flops_per_token": cost["flops_per_token"]}
    peak = mfu.last_peak()
    record = {"spec": asdict(spec), **losses, "train_loss": summary.get("loss"), "tokens": summary["tokens"],
              "tokens_per_s": summary["tokens_per_s"], "train_seconds": summary["seconds"],
              "wall_seconds": time.perf_counter() - start, "threads": torch.get_num_threads(),
              "cpu_seconds": time.process_time() - cpu_start,  # all threads: what the run costs on a busy machine
              "mfu": summary.get("mfu"),
              "machine_busy": bool(peak and peak.busy), "active_flops_per_token": cost["flops_per_token"],
              "active_params": cost["active_params"], "total_params": cost["total_params"],
              "worst_case_flops_per_token": cost.get("worst_case_flops_per_token", cost["flops_per_token"]),
              "loadavg": os.getloadavg()[0], "final": summary["final"] if keep_final else None}
    for path in out.iterdir():  # the resumable checkpoints are not needed once the run is in the ledger
        if path.name != "final" or not keep_final:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return record


@dataclass
class Protocol:
    """A learning-rate sweep at the first seed, then the other seeds at the chosen rate, for each model."""

    ledger: Ledger
    work: Path
    seeds: Sequence[int] = (0, 1, 2, 3, 4)
    lrs: Sequence[float] = (1e-3, 3e-3, 1e-2)
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 256
    data: tuple[str, ...] | None = None
    warmup_steps: int = 30
    eval_blocks: int = 0
    extend: int = 0  # at most this many more rates beyond the grid's edge while the best rate is at an edge
    progress: Callable[[str], None] = print
    runner: Callable[[RunSpec, Path, bool], dict] = field(default=lambda spec, work, keep: train_run(spec, work, keep))
    done: int = 0
    skipped: int = 0

    def spec(self, model: str, lr: float, seed: int, overrides: dict | None = None) -> RunSpec:
        return RunSpec(model=model, lr=lr, seed=seed, steps=self.steps, batch_size=self.batch_size,
                       seq_len=self.seq_len, data=self.data, overrides=tuple(sorted((overrides or {}).items())),
                       warmup_steps=self.warmup_steps, eval_blocks=self.eval_blocks)

    def planned_runs(self, n_models: int) -> int:
        """Runs without edge extensions (each extension adds one run to its model)."""
        return n_models * (len(self.lrs) + len(self.seeds) - 1)

    def _run(self, spec: RunSpec, keep: bool) -> dict:
        started = time.perf_counter()
        record, skipped = self.ledger.run(spec.key(), lambda: self.runner(spec, self.work, keep))
        self.skipped += skipped
        self.done += not skipped
        how = "in the ledger, skipped" if skipped else f"{time.perf_counter() - started:.0f} s"
        self.progress(f"{spec.name()}: select {record['select_loss']:.4f}, report {record['report_loss']:.4f}, "
                      f"{record['tokens_per_s']:,.0f} tokens/s ({how})")
        return record

    def model(self, model: str, overrides: dict | None = None) -> dict:
        """Sweep, choose, run the seeds: {"lr": chosen, "sweep": {lr: select_loss}, "runs": [record per seed],
        "at_edge": whether the chosen rate is still the smallest or largest one tried}.

        While the best rate of the sweep is its smallest or largest, up to `extend` more rates are tried
        beyond it, one step of the 1-3-10 ladder at a time (1e-3 -> 3e-4, 3e-3 -> 1e-2)."""
        first, rest = self.seeds[0], self.seeds[1:]
        sweep = {lr: self._run(self.spec(model, lr, first, overrides), keep=True) for lr in self.lrs}

        def best() -> float:
            return min(sweep, key=lambda x: sweep[x]["select_loss"])

        for _ in range(self.extend):
            lr = best()
            if len(sweep) < 2 or min(sweep) < lr < max(sweep):
                break
            beyond = next_rate(lr, up=lr == max(sweep))
            self.progress(f"{model}: the best rate {lr:g} is at the edge of {sorted(sweep)}; trying {beyond:g}")
            sweep[beyond] = self._run(self.spec(model, beyond, first, overrides), keep=True)
        lr = best()
        for x in sweep:  # only the chosen rate's checkpoint is used later (the training-free frontier)
            final = sweep[x].get("final")
            if x != lr and final and Path(final).is_dir():
                shutil.rmtree(Path(final).parent, ignore_errors=True)
        runs = [sweep[lr]] + [self._run(self.spec(model, lr, seed, overrides), keep=False) for seed in rest]
        return {"lr": lr, "sweep": {str(x): sweep[x]["select_loss"] for x in sorted(sweep)}, "runs": runs,
                "at_edge": len(sweep) > 1 and lr in (min(sweep), max(sweep))}


def next_rate(lr: float, up: bool) -> float:
    """The next learning rate of the 1-3-10 ladder (half decades, one significant digit) above or below `lr`."""
    rung = round(2 * math.log10(lr)) + (1 if up else -1)
    return float(f"{10 ** (rung / 2):.1g}")


def compare(results: dict[str, dict], baseline: str, confidence: float = 0.95) -> dict[str, dict]:
    """Each model's paired report-loss difference to `baseline` (same seeds), with its interval and verdict."""
    base = {r["spec"]["seed"]: r["report_loss"] for r in results[baseline]["runs"]}
    out = {}
    for name, result in results.items():
        if name == baseline:
            continue
        mine = {r["spec"]["seed"]: r["report_loss"] for r in result["runs"]}
        seeds = sorted(set(base) & set(mine))
        diff = paired_difference([mine[s] for s in seeds], [base[s] for s in seeds], confidence)
        out[name] = {**diff, "verdict": verdict(diff), "seeds": seeds}
    return out
