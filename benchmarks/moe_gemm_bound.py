"""How far the fine-grained MoE layer can go on this CPU with torch's GEMMs (issue 18 item 4).

At (64 experts, top-8, width 256), hidden 512, 4,096 tokens, the fused CPU path (`impl="fused"`,
layers/moe/experts.py) runs nine GEMMs per expert in one forward + backward: gate, up and down forward;
d down-weight, d act, d gate-weight, d up-weight and two into d rows backward, each over that expert's
~512 rows. This script times, interleaved in rounds, on the same routing:

- `reference`: 1024^3 fp32 matmuls, the "peak" every of-peak number in BENCHMARKS.md divides by;
- `gemms`: only those nine GEMMs per expert, on preallocated contiguous operands of the real shapes (no
  gather, no SwiGLU, no scatter), one expert after another with all threads;
- `gemms-split`: the same, with the experts split over the threads as the fused path runs them (each thread
  one-threaded, `layers.kernels.run_split`): the most the fused path could reach if everything else were free;
- `stacked`: the same FLOPs as three calls per projection over ALL rows at once (as if every expert's rows
  shared one weight): what "bigger GEMM calls" would buy at most;
- `layer`: the zoo MoE layer itself (forward + backward, its CPU default path).

Each is reported as expert-GEMM FLOPs per CPU-second (all threads) against the reference; the layer also
as a multiple of the `gemms-split` time (how much of it is GEMM). With --profile, then a torch.profiler table of
the layer alone over 3 forward + backward steps (self CPU time per op: the wall-time split).

    python benchmarks/moe_gemm_bound.py --rounds 5 --json benchmarks/results/moe_gemm_bound.json
    python benchmarks/moe_gemm_bound.py --rounds 1 --profile
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as `import zoo` sets it (zoo/__init__.py); 0 opts out
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_speed import HIDDEN, TOKENS, make_block, make_runner, matmul_flops_per_cpu_second  # noqa: E402

from layers import kernels  # noqa: E402
from layers.moe.experts import _split_bounds  # noqa: E402


def routed_rows(block, x: torch.Tensor, k: int) -> list[int]:
    """Rows per expert of block's router on x (top-k of its logits; dropless)."""
    with torch.no_grad():
        logits = x.reshape(-1, x.shape[-1]) @ block.gate.weight.t()
        experts = logits.topk(k, dim=-1).indices
    return torch.bincount(experts.flatten(), minlength=block.gate.weight.shape[0]).tolist()


def gemm_operands(rows: list[int], d: int, width: int) -> list[dict]:
    return [{"x": torch.randn(r, d), "g": torch.randn(r, width), "gy": torch.randn(r, d), "h": torch.randn(r, width),
             "wg": torch.randn(width, d), "wu": torch.randn(width, d), "wd": torch.randn(width, d),
             "dwd": torch.empty(width, d), "dwg": torch.empty(width, d), "dwu": torch.empty(width, d),
             "dx": torch.empty(r, d)} for r in rows if r]


def run_gemms(ops: list[dict]) -> None:
    """The fused path's nine GEMMs per expert (same shapes and transposes), nothing else."""
    for o in ops:
        torch.mm(o["x"], o["wg"].t(), out=o["g"])  # gate
        torch.mm(o["x"], o["wu"].t(), out=o["h"])  # up
        torch.mm(o["h"], o["wd"], out=o["gy"])  # down
        torch.mm(o["h"].t(), o["gy"], out=o["dwd"])  # d w_down
        torch.mm(o["gy"], o["wd"].t(), out=o["h"])  # d act
        torch.mm(o["g"].t(), o["x"], out=o["dwg"])  # d w_gate
        torch.mm(o["h"].t(), o["x"], out=o["dwu"])  # d w_up
        torch.mm(o["g"], o["wg"], out=o["dx"]).addmm_(o["h"], o["wu"])  # d rows


def split_ops(ops: list[dict], n: int) -> list[list[dict]]:
    """The experts' operands in the fused path's n parts (layers/moe/experts.py, _split_bounds)."""
    bounds, start = [], 0
    for e, o in enumerate(ops):
        bounds.append((e, start, start + o["x"].shape[0]))
        start = bounds[-1][2]
    return [[ops[e] for e, _, _ in part] for part in _split_bounds(bounds, n)]


def stacked_operands(total_rows: int, d: int, width: int) -> dict:
    return gemm_operands([total_rows], d, width)[0]


def cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="write every measurement here")
    p.add_argument("--profile", action="store_true", help="then profile the layer alone (3 steps, torch.profiler)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    block = make_block(args.experts, args.k, args.width)
    layer, run_layer = make_runner("zoo-auto", block)
    x = torch.randn(1, TOKENS, HIDDEN, requires_grad=True)
    rows = routed_rows(block, x, args.k)
    ops = gemm_operands(rows, HIDDEN, args.width)
    stacked = stacked_operands(sum(rows), HIDDEN, args.width)
    flops = 9 * 2 * HIDDEN * args.width * sum(rows)  # nine GEMMs of 2 * d * width FLOPs per row

    def layer_step():
        run_layer(x)
        for q in (*layer.parameters(), x):
            q.grad = None

    parts = split_ops(ops, kernels.cpu_expert_workers(x, len(ops), sum(rows)))
    sides = {"gemms": lambda: run_gemms(ops), "gemms-split": lambda: kernels.run_split(run_gemms, parts),
             "stacked": lambda: run_gemms([stacked]), "layer": layer_step}
    for fn in sides.values():  # warm-up
        fn()
    cpu = {name: [] for name in sides}
    refs = []
    for r in range(args.rounds):
        order = list(sides)[r % len(sides):] + list(sides)[:r % len(sides)]
        for name in order:
            cpu[name].append(cpu_seconds(sides[name]))
        refs.append(matmul_flops_per_cpu_second())
    ref = statistics.median(refs)
    of_peak = {name: flops / statistics.median(ts) / ref for name, ts in cpu.items()}
    paired = [lay / gem for lay, gem in zip(cpu["layer"], cpu["gemms-split"], strict=True)]
    result = {"size": [args.experts, args.k, args.width], "hidden": HIDDEN, "tokens": TOKENS, "threads": args.threads,
              "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
              "rows_per_expert": {"min": min(rows), "median": statistics.median(rows), "max": max(rows)},
              "expert_gemm_flops": flops, "reference_flops_per_cpu_s": refs, "cpu_seconds": cpu,
              "of_peak_per_cpu_s": of_peak, "layer_over_gemms_split_cpu": paired,
              "layer_path": getattr(layer.experts, "last_impl", None)}
    print(f"({args.experts}, {args.k}, {args.width}), hidden {HIDDEN}, {TOKENS} tokens, {args.threads} threads, "
          f"{args.rounds} rounds, THP_MEM_ALLOC_ENABLE={os.environ['THP_MEM_ALLOC_ENABLE']};\n"
          f"  rows per expert {min(rows)}-{max(rows)}; reference {ref / 1e9:.1f} GFLOP/CPU-s")
    for name in sides:
        print(f"  {name:11s} {statistics.median(cpu[name]) * 1e3:8.1f} ms CPU   {of_peak[name]:6.1%} of the reference")
    print(f"  layer / gemms-split (CPU, paired per round): median {statistics.median(paired):.2f}, "
          f"{min(paired):.2f}-{max(paired):.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                layer_step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=40))
    return 0


if __name__ == "__main__":
    sys.exit(main())
