"""MoE layer speed and memory (issue 4): our MoEMLP against transformers' Mixtral sparse-MoE block, in one run.

For each (experts, k, expert width), hidden 512, 4096 tokens, fp32, forward + backward:
- transformers' MixtralSparseMoeBlock with each experts implementation (`eager`, `grouped_mm`,
  `batched_mm`, chosen through the config's `_experts_implementation`);
- our MoEMLP converted from that very block (`zoo.convert.moe_from_transformers`: same weights, same
  routing, outputs checked equal), on its automatic path and on the grouped_mm path.
The implementations alternate within each round (the order rotates) so that background load hits all
alike; the machine's fp32 matmul throughput (train.mfu.measure_matmul_flops) is measured in every
round too. Reported: median tokens/s, achieved FLOP/s as a fraction of that throughput, the dropped
tokens, and, each in a fresh subprocess, the peak memory of one forward + backward against the ideal.

    python benchmarks/moe_speed.py                    # both sizes, 7 rounds, memory included
    python benchmarks/moe_speed.py --rounds 3 --no-memory --json out.json

batched_mm gathers one weight matrix per (token, expert) pair; it runs in a subprocess with an
address-space limit (--batched-mm-limit-gib) so that its out-of-memory error cannot take the machine down.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as `import zoo` sets it (zoo/__init__.py); 0 opts out
import torch  # noqa: E402

HIDDEN, TOKENS = 512, 4096
SIZES = [(8, 2, 1024), (64, 8, 256)]
HF_IMPLS = ["eager", "grouped_mm", "batched_mm"]
ZOO_IMPLS = ["auto", "fused", "tiered", "grouped"]


# ---- the two layers ----------------------------------------------------------------------------
def make_block(num_experts: int, k: int, width: int, seed: int = 0):
    """transformers' Mixtral sparse-MoE block with normal(0, 0.02) weights."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=HIDDEN, intermediate_size=width, num_local_experts=num_experts,
                           num_experts_per_tok=k)
    config._experts_implementation = "grouped_mm"
    torch.manual_seed(seed)
    block = MixtralSparseMoeBlock(config)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return block.train()


def make_runner(name: str, block):
    """(layer, callable(x) running one forward + backward) for 'transformers-IMPL' or 'zoo-IMPL'."""
    family, impl = name.split("-", 1)
    if family == "transformers":
        def run(x):
            block.experts.config._experts_implementation = impl
            block(x).sum().backward()
        return block, run
    from zoo.convert import moe_from_transformers

    layer = moe_from_transformers(block)
    layer.experts.impl = impl

    def run(x):
        layer(x)[0].sum().backward()
    return layer, run


def clear_grads(module: torch.nn.Module, x: torch.Tensor) -> None:
    """Drop accumulated gradients (so every timed step allocates the same)."""
    for p in module.parameters():
        p.grad = None
    x.grad = None


# ---- speed -------------------------------------------------------------------------------------
def batched_mm_status(size: tuple[int, int, int], limit_gib: float) -> dict:
    """Run transformers' batched_mm once in a child with an address-space limit: tokens/s or the error."""
    cmd = [sys.executable, __file__, "--child", "speed", "--impl", "transformers-batched_mm",
           "--size", ",".join(map(str, size)), "--limit-gib", str(limit_gib)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1][:200]}


def time_sizes(size: tuple[int, int, int], rounds: int, impls: list[str]) -> dict:
    """Median seconds of one forward + backward per implementation, interleaved, plus matmul throughput."""
    from train.mfu import measure_matmul_flops

    block = make_block(*size)
    runners = {name: make_runner(name, block) for name in impls}
    x = torch.randn(1, TOKENS, HIDDEN, requires_grad=True)
    # Same function: our layer's output equals transformers' (grouped_mm) on this input.
    zoo_layer = next((runners[n][0] for n in runners if n.startswith("zoo-")), None)
    check = {}
    if zoo_layer is not None:
        with torch.no_grad():
            block.experts.config._experts_implementation = "grouped_mm"
            check["max_abs_diff_vs_transformers"] = (zoo_layer(x)[0] - block(x)).abs().max().item()
    for module, run in runners.values():  # warm-up
        run(x)
        clear_grads(module, x)
    times: dict[str, list[float]] = {name: [] for name in runners}
    cpu_times: dict[str, list[float]] = {name: [] for name in runners}
    peaks, cpu_peaks = [], []
    for r in range(rounds):
        order = list(runners)[r % len(runners):] + list(runners)[: r % len(runners)]
        for name in order:
            module, run = runners[name]
            start, cpu_start = time.perf_counter(), time.process_time()
            run(x)
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
            clear_grads(module, x)
        peaks.append(measure_matmul_flops(torch.device("cpu"), seconds=0.5))
        cpu_peaks.append(matmul_flops_per_cpu_second())
    result = {"times": times, "cpu_times": cpu_times, "matmul_flops": peaks,
              "matmul_flops_per_cpu_second": cpu_peaks, **check}
    if zoo_layer is not None:
        result["fwd_flops_per_token"] = zoo_layer.flops_per_token()
        with torch.no_grad():
            result["dropped_fraction"] = float(zoo_layer(x)[1].metrics["moe_dropped_fraction"])
        result["zoo_auto_path"] = zoo_layer.experts.last_impl
    return result


def matmul_flops_per_cpu_second(n: int = 1024, reps: int = 6) -> float:
    """FLOPs per CPU-second (all threads) of fp32 n^3 matmuls: the peak in the units of `cpu_times`.

    On a shared machine wall time also counts waiting for a descheduled OpenMP thread; CPU time counts the
    work done, so FLOPs / CPU-second against this is the efficiency that load does not move as much.
    """
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.process_time()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.process_time() - start)


# ---- memory ------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(name: str, size: tuple[int, int, int]) -> int:
    """Peak RSS increase (bytes) over one forward + backward, sampled every 0.5 ms in a thread."""
    block = make_block(*size)
    module, run = make_runner(name, block)
    x = torch.randn(1, TOKENS, HIDDEN, requires_grad=True)
    base, peak, done = _rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    run(x)
    done.set()
    thread.join()
    return max(peak[0], _rss_bytes()) - base


def ideal_memory(size: tuple[int, int, int]) -> int:
    """Bytes a forward + backward must hold at its peak, with the activations of the active experts only.

    Saved for backward: the expert inputs, the gate and up pre-activations and the expert outputs of the
    T * k assignments (T * k * (2 d + 2 width)); plus what backward writes: the weight gradients of all
    experts and the router, and the input gradient. fp32.
    """
    e, k, width = size
    activations = TOKENS * k * (2 * HIDDEN + 2 * width)
    gradients = 3 * e * width * HIDDEN + e * HIDDEN + TOKENS * HIDDEN
    return 4 * (activations + gradients)


def memory_in_child(name: str, size: tuple[int, int, int], limit_gib: float) -> dict:
    cmd = [sys.executable, __file__, "--child", "memory", "--impl", name, "--size", ",".join(map(str, size)),
           "--limit-gib", str(limit_gib)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1][:200]}


def child(args) -> int:
    """Subprocess entry: one measurement, printed as one JSON line."""
    limit = int(args.limit_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    size = tuple(int(v) for v in args.size.split(","))
    try:
        if args.child == "memory":
            print(json.dumps({"peak_bytes": peak_memory(args.impl, size)}))
        else:
            block = make_block(*size)
            module, run = make_runner(args.impl, block)
            x = torch.randn(1, TOKENS, HIDDEN, requires_grad=True)
            start = time.perf_counter()
            run(x)
            print(json.dumps({"seconds": time.perf_counter() - start}))
    except (RuntimeError, MemoryError) as err:
        wanted = re.search(r"allocate (\d+) bytes", str(err))
        message = (f"out of memory: one tensor of {int(wanted.group(1)) / 2**30:.0f} GiB (limit {args.limit_gib:g} GiB)"
                   if wanted else f"{type(err).__name__}: {str(err).splitlines()[0][:120]}")
        print(json.dumps({"error": message}))
    return 0


# ---- report ------------------------------------------------------------------------------------
def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import transformers

    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "loadavg_start": os.getloadavg()}


def report(results: dict) -> str:
    """Markdown tables for BENCHMARKS.md."""
    lines = []
    for key, r in results["sizes"].items():
        med = {name: statistics.median(ts) for name, ts in r["times"].items()}
        peak = statistics.median(r["matmul_flops"])
        hf = {n: TOKENS / t for n, t in med.items() if n.startswith("transformers")}
        bm = r.get("batched_mm", {})
        if "seconds" in bm:
            hf["transformers-batched_mm"] = TOKENS / bm["seconds"]
        best_hf = max(hf, key=hf.get)
        diff = r.get("max_abs_diff_vs_transformers", float("nan"))
        lines += [f"\n**{key}** (experts, k, expert width); hidden {HIDDEN}, {TOKENS} tokens, fp32, forward + "
                  f"backward; matmul peak {peak / 1e9:.1f} GFLOP/s (median of {len(r['matmul_flops'])}); our output "
                  f"vs transformers: max |diff| {diff:.1e}; dropped tokens: {r.get('dropped_fraction', 0):.0%}\n",
                  "| implementation | tokens/s (median) | vs fastest transformers | achieved GFLOP/s | of peak |",
                  "|---|---|---|---|---|"]
        rows = {**{n: TOKENS / t for n, t in med.items()}, **hf}
        for name in [f"transformers-{i}" for i in HF_IMPLS] + [n for n in r["times"] if n.startswith("zoo-")]:
            if name not in rows:
                if name == "transformers-batched_mm" and "error" in bm:
                    lines.append(f"| {name} | {bm['error']} | | | |")
                continue
            tps = rows[name]
            flops = 3 * r["fwd_flops_per_token"] * tps
            label = name + (f" ({r['zoo_auto_path']})" if name == "zoo-auto" else "")
            lines.append(f"| {label} | {tps:,.0f} | {tps / hf[best_hf]:.2f}x | {flops / 1e9:.1f} | "
                         f"{flops / peak:.0%} |")
        if "cpu_times" in r:
            cpu_peak = statistics.median(r["matmul_flops_per_cpu_second"])
            lines += ["", f"Per CPU-second (all threads; waiting for a descheduled thread not counted): matmul peak "
                      f"{cpu_peak / 1e9:.1f} GFLOP per CPU-s", "", "| implementation | tokens per CPU-s | vs "
                      f"{best_hf} | of peak |", "|---|---|---|---|"]
            for name, ts in r["cpu_times"].items():
                tps = TOKENS / statistics.median(ts)
                ref = TOKENS / statistics.median(r["cpu_times"][best_hf]) if best_hf in r["cpu_times"] else float("nan")
                lines.append(f"| {name} | {tps:,.0f} | {tps / ref:.2f}x | "
                             f"{3 * r['fwd_flops_per_token'] * tps / cpu_peak:.0%} |")
        for zoo in [n for n in ("zoo-auto", "zoo-fused") if n in r["times"]] if best_hf in r["times"] else []:
            ratios = sorted(h / z for z, h in zip(r["times"][zoo], r["times"][best_hf], strict=True))
            lines.append(f"\n{zoo} / {best_hf}, paired per round: median {statistics.median(ratios):.2f}x, "
                         f"min {ratios[0]:.2f}x, max {ratios[-1]:.2f}x over {len(ratios)} rounds")
        if "memory" in r:
            lines += ["", "| implementation | peak memory of fwd+bwd (MiB) | ideal (MiB) | ratio |",
                      "|---|---|---|---|"]
            ideal = r["ideal_memory"]
            for name, m in r["memory"].items():
                if "peak_bytes" in m:
                    lines.append(f"| {name} | {m['peak_bytes'] / 2**20:,.0f} | {ideal / 2**20:,.0f} | "
                                 f"{m['peak_bytes'] / ideal:.2f} |")
                else:
                    lines.append(f"| {name} | {m['error']} | {ideal / 2**20:,.0f} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sizes", nargs="+", default=[",".join(map(str, s)) for s in SIZES],
                        help="experts,k,width triples")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--impls", nargs="+", default=None, help="only these (e.g. transformers-grouped_mm zoo-fused)")
    parser.add_argument("--no-batched-mm", action="store_true", help="skip transformers' batched_mm")
    parser.add_argument("--batched-mm-limit-gib", type=float, default=16.0)
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--child", choices=["memory", "speed"], help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--limit-gib", type=float, default=16.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    results = {"machine": machine(), "command": " ".join(["python", *sys.argv]), "sizes": {}}
    if args.threads:
        torch.set_num_threads(args.threads)
    impls = args.impls or [f"transformers-{i}" for i in HF_IMPLS if i != "batched_mm"] + [f"zoo-{i}" for i in ZOO_IMPLS]
    for text in args.sizes:
        size = tuple(int(v) for v in text.split(","))
        print(f"timing {size} ...", file=sys.stderr, flush=True)
        r = time_sizes(size, args.rounds, impls)
        if not args.no_batched_mm:
            r["batched_mm"] = batched_mm_status(size, args.batched_mm_limit_gib)
        if not args.no_memory:
            r["ideal_memory"] = ideal_memory(size)
            r["memory"] = {name: memory_in_child(name, size, args.batched_mm_limit_gib) for name in impls}
        results["sizes"][str(size)] = r
    results["machine"]["loadavg_end"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    print(f"machine: {json.dumps(results['machine'])}\ncommand: {results['command']}")
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
