"""Speed and memory of the attention kinds against dense SDPA (issue 5), n = 1k..32k, on this machine.

Causal forward (inference, no grad), batch 1, --heads heads of dimension 64, float32, the `small`
catalog budgets (local window 256, LSH 8 buckets x 128, Performer 256 features, Scatterbrain
128 features + window 128). Per n, every kind runs --repeats times, round-robin (A B C ... B C A
...); the median CPU time of this process is reported (with one torch thread it is the work done,
whatever the load; on a shared machine wall time is mostly a measure of the others), with the
median wall time and the CPU share other processes took meanwhile in --json. Peak memory
is measured separately under torch.profiler (the CPU allocator's running total, above what was
allocated before the call: output and temporaries). Two dense references: PyTorch's SDPA as it
runs here (its fused flash kernel on CPU: O(n) memory) and SDPA's math backend (the n x n
scores, what an unfused dense attention allocates), the latter up to --math-max.

    python benchmarks/attention_speed.py --json s.json --plot benchmarks/plots/attention_speed.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from layers.attention import KINDS

BUDGETS = {
    "local": ("local", dict(window=256)),
    "lsh": ("lsh", dict(n_buckets=8, chunk=128)),
    "performer": ("performer", dict(n_features=256)),
    "scatterbrain": ("scatterbrain", dict(n_features=128, window=128)),
}
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the machine, CPU seconds of this process)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / _TICK
    return busy, time.process_time()


def timed(fn) -> tuple[float, float, float]:
    """(wall seconds of fn(), CPU seconds this process spent, cores other processes kept busy meanwhile)."""
    busy0, ours0 = cpu_seconds()
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    busy1, ours1 = cpu_seconds()
    return wall, ours1 - ours0, max(0.0, (busy1 - busy0) - (ours1 - ours0)) / max(wall, 1e-9)


def peak_bytes(fn) -> int:
    """Largest CPU-allocator total during fn() above the total before it (torch.profiler memory events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = [e["args"] for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    if not events:
        return 0
    before = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - before


def runners(n: int, heads: int, math_max: int) -> tuple[dict, tuple]:
    """name -> zero-argument callable running that attention on fresh (1, heads, n, 64) inputs."""
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, heads, n, 64, generator=g) for _ in range(3))
    torch.manual_seed(0)
    fns = {"dense (SDPA)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
    if n <= math_max:
        def math_sdpa():
            with sdpa_kernel(SDPBackend.MATH):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        fns["dense (SDPA math)"] = math_sdpa
    for name, (kind, kw) in BUDGETS.items():
        module = KINDS[kind](head_dim=64, **kw).eval()
        fns[name] = (lambda m: lambda: m(q, k, v, causal=True))(module)
    return fns, (q, k, v)


@torch.no_grad()
def measure(ns: list[int], heads: int, repeats: int, math_max: int) -> list[dict]:
    rows = []
    warm = False
    for n in ns:
        fns, _ = runners(n, heads, math_max)
        if not warm:
            for fn in fns.values():
                fn()
            warm = True
        times = {name: [] for name in fns}
        cpu = {name: [] for name in fns}
        foreign = {name: [] for name in fns}
        names = list(fns)
        for r in range(repeats):
            order = names[r % len(names):] + names[: r % len(names)]  # rotate who goes first
            for name in order:
                wall, ours, other = timed(fns[name])
                times[name].append(wall)
                cpu[name].append(ours)
                foreign[name].append(other)
        for name in names:
            rows.append({"n": n, "kind": name, "wall_s": statistics.median(times[name]), "walls_s": times[name],
                         "time_s": statistics.median(cpu[name]), "cpus_s": cpu[name],
                         "foreign_cores": statistics.median(foreign[name]), "peak_bytes": peak_bytes(fns[name])})
            print(f"n={n} {name}: cpu {rows[-1]['time_s'] * 1e3:.1f} ms, wall {rows[-1]['wall_s'] * 1e3:.1f} ms, "
                  f"{rows[-1]['peak_bytes'] / 2**20:.1f} MiB, "
                  f"others busy {rows[-1]['foreign_cores']:.2f} cores", flush=True)
    return rows


def tables(rows: list[dict]) -> str:
    """Markdown: time and memory per n, ratios to dense SDPA, crossover, growth and the memory at 16k."""
    ns = sorted({r["n"] for r in rows})
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    at = {(r["n"], r["kind"]): r for r in rows}
    out = ["CPU time of this process (median), ratio to dense SDPA:", "",
           "| n | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for n in ns:
        cells = []
        for kind in kinds:
            r = at.get((n, kind))
            if r is None:
                cells.append("-")
                continue
            ratio = r["time_s"] / at[(n, "dense (SDPA)")]["time_s"]
            cells.append(f"{r['time_s'] * 1e3:.0f} ms ({ratio:.2f}x)")
        out.append(f"| {n} | " + " | ".join(cells) + " |")
    out += ["", "Peak memory above the inputs (output + temporaries), ratio to dense SDPA:", "",
            "| n | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for n in ns:
        cells = []
        for kind in kinds:
            r = at.get((n, kind))
            if r is None:
                cells.append("-")
                continue
            ratio = r["peak_bytes"] / max(at[(n, "dense (SDPA)")]["peak_bytes"], 1)
            cells.append(f"{r['peak_bytes'] / 2**20:.1f} MiB ({ratio:.2f}x)")
        out.append(f"| {n} | " + " | ".join(cells) + " |")
    out += ["", "| kind | crossover: faster than dense SDPA from n | time(32k) / time(16k) | "
            "log-log slope of time, n >= 4096 | memory at 16k / dense SDPA | memory at 16k / dense math |",
            "|---|---|---|---|---|---|"]
    big, mid = ns[-1], ns[-2] if len(ns) > 1 else ns[-1]
    for kind in kinds:
        faster = [n for n in ns if (n, kind) in at and at[(n, kind)]["time_s"] < at[(n, "dense (SDPA)")]["time_s"]]
        # the crossover: the smallest n from which the kind is faster at every larger n measured
        from_here = [n for n in faster if all(m in faster for m in ns if m >= n)]
        crossover = "-" if kind.startswith("dense") else (str(from_here[0]) if from_here else f"none up to {big}")
        growth = at[(big, kind)]["time_s"] / at[(mid, kind)]["time_s"] if (big, kind) in at else float("nan")
        largest = max(n for n, k in at if k == kind)
        growth_text = f"{growth:.2f}" if (big, kind) in at else f"- (measured up to {largest})"
        m16 = at.get((16384, kind))
        vs_sdpa = m16["peak_bytes"] / at[(16384, "dense (SDPA)")]["peak_bytes"] if m16 else float("nan")
        math16 = at.get((16384, "dense (SDPA math)"))
        vs_math = m16["peak_bytes"] / math16["peak_bytes"] if m16 and math16 else float("nan")
        out.append(f"| {kind} | {crossover} | {growth_text} | {slope(rows, kind):.2f} | {vs_sdpa:.2f} | "
                   f"{vs_math:.3f} |")
    return "\n".join(out)


def slope(rows: list[dict], kind: str, from_n: int = 4096) -> float:
    """Least-squares slope of log(time) against log(n) for n >= from_n: 1 is linear, 2 quadratic."""
    pts = [(math.log(r["n"]), math.log(r["time_s"])) for r in rows if r["kind"] == kind and r["n"] >= from_n]
    if len(pts) < 2:
        return float("nan")
    mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def plot(rows: list[dict], path: str) -> None:
    """Time and peak memory against n, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(8.4, 3.4))
    for kind in dict.fromkeys(r["kind"] for r in rows):
        pts = sorted((r["n"], r["time_s"], r["peak_bytes"]) for r in rows if r["kind"] == kind)
        style = "--" if kind.startswith("dense") else "-"
        a.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3, label=kind)
        b.plot([p[0] for p in pts], [p[2] / 2**20 for p in pts], style, marker="o", ms=3, label=kind)
    for ax, label in ((a, "forward CPU time (s)"), (b, "peak memory above inputs (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length n")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    a.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--math-max", type=int, default=16384, help="largest n for the n x n math backend")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--json")
    parser.add_argument("--plot")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = datetime.now(timezone.utc)
    load = os.getloadavg()
    rows = measure(args.n, args.heads, args.repeats, args.math_max)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} "
               f"torch threads, torch {torch.__version__}")
    print(f"\nCausal attention forward, batch 1 x {args.heads} heads x head_dim 64, float32, no grad; median of "
          f"{args.repeats}. {machine}. {started:%Y-%m-%d %H:%M} UTC; load average at start {load[0]:.1f}.\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"started": started.isoformat(), "machine": machine,
                                               "args": vars(args), "rows": rows}, indent=2))
    print(tables(rows))
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
