"""`local` attention against PyTorch's FlexAttention with a sliding-window block mask, compiled, on CPU (issue 18).

Per n (1k..32k), causal, batch 1, --heads heads of dimension 64, window 256 (the `small` budget), fp32:
- ours: `layers.attention.local.local_attention` on its automatic path (torch SDPA per query block, see
  layers/kernels.py) and its reference (all blocks' scores written out, the pre-issue-18 path);
- FlexAttention: `torch.compile(flex_attention)` with `create_block_mask` of the same window (128-blocks),
  compiled once per n (compile and mask-building seconds reported, not timed in the rounds).
Forward without grad (FlexAttention has no backward on CPU in torch 2.13: "FlexAttention does not support
backward on CPU"; recorded), and forward + backward of ours. Sides alternate within each of --repeats
rounds (order rotating); medians of CPU time of this process (one torch thread by default: the work done,
whatever else runs) and of wall time; ratios are paired per round. Outputs are checked equal first.
Peak memory above the inputs (torch.profiler's allocator total) of one no-grad call, beside fused dense SDPA's.

    python benchmarks/local_vs_flex.py --json benchmarks/results/local_vs_flex.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention_speed import peak_bytes  # noqa: E402

from layers.attention.local import local_attention, local_attention_reference  # noqa: E402

WINDOW, HEAD_DIM = 256, 64


def flex_runner(n: int, window: int):
    """(callable(q, k, v), seconds to build the block mask, seconds of the first (compiling) call)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def sliding(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    t0 = time.perf_counter()
    mask = create_block_mask(sliding, None, None, n, n, device="cpu", _compile=True)
    mask_s = time.perf_counter() - t0
    compiled = torch.compile(flex_attention, dynamic=False)
    return (lambda q, k, v: compiled(q, k, v, block_mask=mask)), mask_s


def timed(fn) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) of fn()."""
    c0, w0 = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c0, time.perf_counter() - w0


def measure(n: int, heads: int, repeats: int, flex: bool) -> dict:
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, heads, n, HEAD_DIM, generator=g) for _ in range(3))
    fwd = {"ours": lambda: local_attention(q, k, v, WINDOW),
           "ours-reference": lambda: local_attention_reference(q, k, v, WINDOW),
           "dense-sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
    result: dict = {"n": n}
    if flex:
        run_flex, result["flex_mask_seconds"] = flex_runner(n, WINDOW)
        t0 = time.perf_counter()
        with torch.no_grad():
            flex_out = run_flex(q, k, v)
        result["flex_compile_seconds"] = time.perf_counter() - t0
        with torch.no_grad():
            result["max_abs_diff_ours_vs_flex"] = (local_attention(q, k, v, WINDOW) - flex_out).abs().max().item()
        fwd["flex"] = lambda: run_flex(q, k, v)
        try:  # eager: a compiled call with other inputs would recompile and slow the timed ones
            from torch.nn.attention.flex_attention import flex_attention

            flex_attention(*(t.clone().requires_grad_() for t in (q, k, v))).sum().backward()
        except Exception as err:  # noqa: BLE001 - recorded as what happened
            result["flex_backward"] = f"{type(err).__name__}: {str(err).splitlines()[0][:150]}"
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

    def train(fn):
        def run():
            fn(qg, kg, vg, WINDOW).sum().backward()
            qg.grad = kg.grad = vg.grad = None
        return run

    bwd = {"ours": train(local_attention), "ours-reference": train(local_attention_reference)}
    cpu = {f"fwd/{m}": [] for m in fwd} | {f"fwdbwd/{m}": [] for m in bwd}
    wall = {key: [] for key in cpu}
    calls = {f"fwd/{m}": f for m, f in fwd.items()} | {f"fwdbwd/{m}": f for m, f in bwd.items()}
    with torch.no_grad():
        for f in fwd.values():
            f()
    for f in bwd.values():
        f()
    names = list(calls)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            with torch.set_grad_enabled(name.startswith("fwdbwd")):
                c, w = timed(calls[name])
            cpu[name].append(c)
            wall[name].append(w)
    result["cpu_seconds"], result["wall_seconds"] = cpu, wall
    with torch.no_grad():
        result["peak_bytes_no_grad"] = {m: peak_bytes(f) for m, f in fwd.items()}
    return result


def paired(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Median, min, max of b[i] / a[i] (how many times faster a is)."""
    r = sorted(y / x for x, y in zip(a, b, strict=True))
    return statistics.median(r), r[0], r[-1]


def report(results: dict) -> str:
    lines = ["| n | ours (sdpa-blocks) | ours (reference) | FlexAttention (compiled) | dense SDPA | ours / flex: flex "
             "time / ours, paired median (min-max) | compile + mask (s) |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["sizes"]:
        c = {k: statistics.median(v) * 1e3 for k, v in r["cpu_seconds"].items()}
        flex = c.get("fwd/flex")
        ratio = paired(r["cpu_seconds"]["fwd/ours"], r["cpu_seconds"]["fwd/flex"]) if flex else None
        lines.append(f"| {r['n']} | {c['fwd/ours']:.1f} ms | {c['fwd/ours-reference']:.1f} ms | "
                     + (f"{flex:.1f} ms | " if flex else "- | ") + f"{c['fwd/dense-sdpa']:.1f} ms | "
                     + (f"**{ratio[0]:.2f}x** ({ratio[1]:.2f}-{ratio[2]:.2f}) | "
                        f"{r['flex_compile_seconds']:.0f} + {r['flex_mask_seconds']:.1f} |" if ratio else "- | - |"))
    lines += ["", "| n | fwd+bwd ours (sdpa-blocks) | fwd+bwd ours (reference) | reference / ours | peak MiB no grad: "
              "ours | reference | flex | dense SDPA | ours / SDPA |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["sizes"]:
        c = {k: statistics.median(v) * 1e3 for k, v in r["cpu_seconds"].items()}
        m = {k: v / 2**20 for k, v in r["peak_bytes_no_grad"].items()}
        ratio = paired(r["cpu_seconds"]["fwdbwd/ours"], r["cpu_seconds"]["fwdbwd/ours-reference"])
        lines.append(f"| {r['n']} | {c['fwdbwd/ours']:.1f} ms | {c['fwdbwd/ours-reference']:.1f} ms | "
                     f"{ratio[0]:.2f}x | "
                     f"{m['ours']:.1f} | {m['ours-reference']:.1f} | {m.get('flex', float('nan')):.1f} | "
                     f"{m['dense-sdpa']:.1f} | {m['ours'] / m['dense-sdpa']:.2f}x |")
    backward = {r.get("flex_backward") for r in results["sizes"]} - {None}
    if backward:
        lines.append(f"\nFlexAttention forward + backward on CPU: {'; '.join(sorted(backward))}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (no compiler here)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {"machine": {"cpu": platform.processor(), "cores": os.cpu_count(), "threads": args.threads,
                           "torch": torch.__version__, "loadavg_start": os.getloadavg(),
                           "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")},
               "command": " ".join(["python", *sys.argv]), "sizes": []}
    return run_sizes(results, args.sizes, lambda n: measure(n, args.heads, args.repeats, not args.no_flex), args.json,
                     report)


def run_sizes(results: dict, sizes: list[int], measure_one, json_path: str | None, render) -> int:
    """Measure each n into results["sizes"] (the JSON rewritten after each), then print render(results)."""
    for n in sizes:
        print(f"n = {n} ...", file=sys.stderr, flush=True)
        results["sizes"].append(measure_one(n))
        results["loadavg_end"] = os.getloadavg()
        if json_path:
            with open(json_path, "w") as f:
                json.dump(results, f, indent=2)
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
