"""Structured linears against nn.Linear (issue 6): forward+backward time and memory, side by side in one run.

Square layers with n = 1024, 2048, 4096 features on a (4096, n) fp32 input (batch*seq = 4096), on this
CPU. The peer is nn.Linear(n, n, bias=False). Every structured kind is set to the density of Monarch
with 4 blocks (about 1/4 of the dense weights):

- monarch:     nblocks=4
- pixelfly:    block_size=n/32, butterfly_size=4 (3/32 of the blocks) + rank 5n/64 (5/32): 1/4
- blocksparse: block_size=n/32, density=1/4 (random fixed mask)
- lowrank:     rank=n/8

Time: each round runs every kind once in a rotating order (forward, then backward with a fixed random
output gradient, into an input that requires grad, as inside a network); medians over the rounds.
The CPU time that other processes took during each measurement is recorded (/proc/stat minus ours).
Memory: one forward+backward in a fresh child process per (kind, n): the rise of the peak resident
set size (VmHWM, reset through /proc/self/clear_refs) over the resident size just before; and the
bytes autograd saves for the backward pass, parameters and the input excluded.

    python benchmarks/structured_layers.py                       # the numbers in BENCHMARKS.md
    python benchmarks/structured_layers.py --features 1024 --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from layers.structured import BlockSparseLinear, LowRankLinear, MonarchLinear, PixelflyLinear

KINDS = ("dense", "monarch", "pixelfly", "blocksparse", "lowrank")
_TICK = os.sysconf("SC_CLK_TCK")


def make_layer(kind: str, n: int) -> nn.Module:
    """The layer of `kind` with n inputs and outputs, at about 1/4 density for the structured kinds."""
    if kind == "dense":
        return nn.Linear(n, n, bias=False)
    if kind == "monarch":
        return MonarchLinear(n, n, nblocks=4)
    if kind == "pixelfly":
        return PixelflyLinear(n, n, block_size=n // 32, butterfly_size=4, rank=5 * n // 64)
    if kind == "blocksparse":
        return BlockSparseLinear(n, n, block_size=n // 32, density=0.25)
    if kind == "lowrank":
        return LowRankLinear(n, n, rank=n // 8)
    raise ValueError(f"unknown kind {kind!r}; known: {KINDS}")


def flops_per_row(layer: nn.Module) -> int:
    """Forward FLOPs per input row from the layer's structure (nn.Linear: 2 * in * out)."""
    if isinstance(layer, nn.Linear):
        return 2 * layer.in_features * layer.out_features
    return layer.flops_per_token()


# ---- measuring -------------------------------------------------------------------------------
def _cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process) so far."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / _TICK  # all but idle and iowait
    t = os.times()
    return busy, t.user + t.system


def time_step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> dict:
    """One forward and backward: wall seconds of each, and the cores other processes used meanwhile."""
    layer.zero_grad(set_to_none=True)
    x.grad = None
    gc.collect()
    busy0, ours0 = _cpu_seconds()
    t0 = time.perf_counter()
    y = layer(x)
    t1 = time.perf_counter()
    y.backward(grad)
    t2 = time.perf_counter()
    busy1, ours1 = _cpu_seconds()
    foreign = max(0.0, (busy1 - busy0) - (ours1 - ours0)) / (t2 - t0)
    return {"forward_s": t1 - t0, "step_s": t2 - t0, "foreign_cores": foreign}


def saved_for_backward_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward pass, except parameters and x."""
    skip = {p.untyped_storage().data_ptr() for p in layer.parameters()} | {x.untyped_storage().data_ptr()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(seen.values())


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_child(kind: str, n: int, tokens: int) -> dict:
    """In a fresh process: peak RSS rise of one forward+backward, and the saved-for-backward bytes."""
    torch.manual_seed(0)
    layer = make_layer(kind, n)
    x = torch.randn(tokens, n, requires_grad=True)
    grad = torch.randn(tokens, n)
    saved = saved_for_backward_bytes(layer, x)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set size (VmHWM) to the current one
    before = _status_kib("VmRSS")
    layer(x).backward(grad)
    peak = _status_kib("VmHWM")
    return {"peak_rise_mib": (peak - before) / 1024, "saved_mib": saved / 2**20,
            "params_mib": sum(p.numel() * p.element_size() for p in layer.parameters()) / 2**20}


def measure_memory(kind: str, n: int, tokens: int) -> dict:
    """memory_child in a subprocess, so that no allocation of another measurement is counted."""
    out = subprocess.run([sys.executable, __file__, "--memory-child", kind, str(n), str(tokens)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- reporting ---------------------------------------------------------------------------------
def machine() -> dict:
    """CPU model, cores, torch version and threads of this machine."""
    name = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    return {"cpu": name, "nproc": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version()}


def summarize(times: dict, memory: dict, info: dict, tokens: int) -> list[dict]:
    """One row per (n, kind): medians, speedup over nn.Linear, achieved GFLOP/s, memory."""
    rows = []
    for (n, kind), runs in times.items():
        step = statistics.median(r["step_s"] for r in runs)
        dense_step = statistics.median(r["step_s"] for r in times[(n, "dense")])
        dense_fwd = statistics.median(r["forward_s"] for r in times[(n, "dense")])
        fwd = statistics.median(r["forward_s"] for r in runs)
        gflop = 3 * info[(n, kind)]["flops_per_row"] * tokens / 1e9  # forward + backward = 3x forward
        rows.append({"n": n, "kind": kind, **info[(n, kind)], **memory.get((n, kind), {}),
                     "forward_ms": 1000 * fwd, "step_ms": 1000 * step, "speedup": dense_step / step,
                     "forward_speedup": dense_fwd / fwd, "gflop_step": gflop, "gflops_per_s": gflop / step,
                     "foreign_cores": statistics.median(r["foreign_cores"] for r in runs), "rounds": len(runs)})
    return rows


def markdown(rows: list[dict]) -> str:
    """The two tables for BENCHMARKS.md: time and memory."""
    lines = ["| n | kind | weights | density | GFLOP fwd+bwd | fwd ms | fwd+bwd ms | speedup fwd+bwd (fwd) "
             "| GFLOP/s | other procs (cores) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']} | {r['kind']} | {r['params'] / 1e6:.2f}M | {r['density']:.3f} | "
                     f"{r['gflop_step']:.1f} | {r['forward_ms']:.0f} | {r['step_ms']:.0f} | "
                     f"**{r['speedup']:.2f}x** ({r['forward_speedup']:.2f}x) | {r['gflops_per_s']:.0f} | "
                     f"{r['foreign_cores']:.2f} |")
    lines += ["", "| n | kind | parameters MiB | saved for backward MiB | peak RSS rise, fwd+bwd MiB |",
              "|---|---|---|---|---|"]
    for r in rows:
        if "saved_mib" in r:
            lines.append(f"| {r['n']} | {r['kind']} | {r['params_mib']:.1f} | {r['saved_mib']:.1f} | "
                         f"{r['peak_rise_mib']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Time every kind at every size in alternation, measure memory, print the tables."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--tokens", type=int, default=4096, help="rows of the input (batch * seq)")
    p.add_argument("--rounds", type=int, default=5, help="measured rounds per size (after one warm-up round)")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    p.add_argument("--json", default=None, help="also write every measurement to this JSON file")
    p.add_argument("--memory-child", nargs=3, metavar=("KIND", "N", "TOKENS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        kind, n, tokens = args.memory_child
        print(json.dumps(memory_child(kind, int(n), int(tokens))))
        return 0
    kinds = ["dense"] + [k for k in args.kinds if k != "dense"]
    info_m = machine()
    load_start = os.getloadavg()
    print(f"# {info_m['cpu']}, {info_m['nproc']} CPUs, torch {info_m['torch']} ({info_m['threads']} threads), "
          f"load average {load_start[0]:.2f}", file=sys.stderr)
    started = time.perf_counter()
    times: dict = {}
    info: dict = {}
    for n in args.features:
        torch.manual_seed(0)
        layers = {kind: make_layer(kind, n) for kind in kinds}
        for kind, layer in layers.items():
            weights = sum(p.numel() for p in layer.parameters())
            info[(n, kind)] = {"params": weights, "density": weights / n**2, "flops_per_row": flops_per_row(layer)}
        x = torch.randn(args.tokens, n, requires_grad=True)
        grad = torch.randn(args.tokens, n)
        for r in range(args.rounds + 1):  # round 0 warms up
            order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
            for kind in order:
                result = time_step(layers[kind], x, grad)
                if r:
                    times.setdefault((n, kind), []).append(result)
                print(f"n={n} round {r}{' (warm-up)' if not r else ''} {kind:11s} fwd {result['forward_s']:.3f} s, "
                      f"fwd+bwd {result['step_s']:.3f} s, other processes {result['foreign_cores']:.2f} cores",
                      file=sys.stderr)
        del layers, x, grad
    memory = {}
    if not args.no_memory:
        for n in args.features:
            for kind in kinds:
                memory[(n, kind)] = measure_memory(kind, n, args.tokens)
                print(f"memory n={n} {kind}: {memory[(n, kind)]}", file=sys.stderr)
    rows = summarize(times, memory, info, args.tokens)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_end = os.getloadavg()
    print(f"# {when}, {time.perf_counter() - started:.0f} s, {info_m['cpu']} ({info_m['nproc']} CPUs, "
          f"{info_m['threads']} threads), torch {info_m['torch']}, fp32, {args.tokens} rows; "
          f"load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end\n")
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "machine": info_m, "date": when,
                                               "load_average": [load_start, load_end], "rows": rows,
                                               "runs": {f"{n}/{k}": v for (n, k), v in times.items()}},
                                              indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
