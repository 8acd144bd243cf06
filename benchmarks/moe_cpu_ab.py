"""A/B checks behind the fused CPU MoE path's choices (BENCHMARKS.md, issue 18 item 4), at (64, 8, 256).

Each mode times transformers' Mixtral block converted to the zoo layer (benchmarks/moe_speed.py), forward + backward,
hidden 512, 4096 tokens, 2 threads, the two sides alternating within one process (or, for --mode thp, in
alternating fresh processes, since torch reads THP_MEM_ALLOC_ENABLE once when it loads):

- `split`: experts split over the threads (kernels.run_split) against one expert at a time with both threads;
- `small`: forward only at few tokens, split against not (the reason for kernels.CPU_SPLIT_MIN_ROWS);
- `revision`: the fused autograd function of this checkout against the one at git revision --rev;
- `thp`: huge pages on against off (CPU time per step and its share of the 1024^3 matmul reference).

    python benchmarks/moe_cpu_ab.py --mode split --rounds 6
    python benchmarks/moe_cpu_ab.py --mode small
    python benchmarks/moe_cpu_ab.py --mode revision --rev f5de49a --rounds 10
    python benchmarks/moe_cpu_ab.py --mode thp --pairs 4
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as `import zoo` sets it; --mode thp sets it per process
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_speed import HIDDEN, TOKENS, make_block, make_runner, matmul_flops_per_cpu_second  # noqa: E402

import layers.moe.experts as experts_module  # noqa: E402
from layers import kernels  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FLOPS = 9 * 2 * HIDDEN * 256 * TOKENS * 8  # the nine expert GEMMs of a forward + backward at (64, 8, 256)


def cpu_of(fn) -> float:
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    fn()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime


def interleaved(sides: dict, rounds: int) -> dict:
    """CPU seconds of each side per round, the order alternating."""
    for fn in sides.values():
        fn()
    out = {name: [] for name in sides}
    for r in range(rounds):
        for name in (list(sides) if r % 2 else list(sides)[::-1]):
            out[name].append(cpu_of(sides[name]))
    return out


def report(cpu: dict, a: str, b: str) -> None:
    for name, ts in cpu.items():
        print(f"  {name:14s} median {statistics.median(ts) * 1e3:7.1f} ms CPU")
    paired = sorted(x / y for x, y in zip(cpu[a], cpu[b], strict=True))
    print(f"  {a} / {b} paired: median {statistics.median(paired):.3f}, {paired[0]:.3f}-{paired[-1]:.3f}")


def layer_step(layer, run):
    x = torch.randn(1, TOKENS, HIDDEN, requires_grad=True, generator=torch.Generator().manual_seed(0))

    def step():
        run(x)
        for q in (*layer.parameters(), x):
            q.grad = None
    return step


def fused_fn_at(rev: str):
    """_FusedSwiGLUExpertsFn as layers/moe/experts.py defined it at git revision `rev`."""
    source = subprocess.run(["git", "show", f"{rev}:layers/moe/experts.py"], capture_output=True, text=True,
                            cwd=ROOT, check=True).stdout
    module = types.ModuleType(f"experts_at_{rev}")
    exec(compile(source, f"{rev}:layers/moe/experts.py", "exec"), module.__dict__)  # noqa: S102
    return module._FusedSwiGLUExpertsFn


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["split", "small", "revision", "thp"], required=True)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--rev", default="HEAD~1", help="--mode revision: the git revision to compare against")
    p.add_argument("--pairs", type=int, default=4, help="--mode thp: alternating pairs of processes")
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 128, 256, 512], help="--mode small")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    if args.mode == "thp" and not args.child:
        for _ in range(args.pairs):
            for value in ("0", "1"):
                env = {**os.environ, "THP_MEM_ALLOC_ENABLE": value}
                out = subprocess.run([sys.executable, __file__, "--mode", "thp", "--child", "--rounds", "4"],
                                     capture_output=True, text=True, env=env, check=True).stdout.strip()
                print(f"  THP_MEM_ALLOC_ENABLE={value}: {out}")
        return 0
    layer, run = make_runner("zoo-auto", make_block(64, 8, 256))
    step = layer_step(layer, run)
    real_workers, min_rows_default = kernels.cpu_expert_workers, kernels.CPU_SPLIT_MIN_ROWS
    if args.mode == "thp":
        cpu, refs = [], []
        step()
        for _ in range(args.rounds):
            cpu.append(cpu_of(step))
            refs.append(matmul_flops_per_cpu_second())
        share = FLOPS / statistics.median(cpu) / statistics.median(refs)
        print(f"CPU {statistics.median(cpu):.3f} s a step, {share:.1%} of the matmul reference per CPU-second")
    elif args.mode == "split":
        def with_workers(fn):
            def side():
                kernels.cpu_expert_workers = fn
                step()
            return side
        report(interleaved({"split": with_workers(real_workers),
                            "one-at-a-time": with_workers(lambda x, n, r: 1)}, args.rounds), "split", "one-at-a-time")
    elif args.mode == "revision":
        fns = {"this checkout": experts_module._FusedSwiGLUExpertsFn, args.rev: fused_fn_at(args.rev)}

        def with_fn(fn):
            def side():
                experts_module._FusedSwiGLUExpertsFn = fn
                step()
            return side
        report(interleaved({name: with_fn(fn) for name, fn in fns.items()}, args.rounds), "this checkout", args.rev)
    else:
        for n in args.tokens:
            x = torch.randn(n, HIDDEN)
            walls = {}
            for name, min_rows in (("split", 0), ("not split", 10**9)):  # the threshold off / never met
                kernels.CPU_SPLIT_MIN_ROWS = min_rows
                with torch.no_grad():
                    layer(x)
                    ts = []
                    for _ in range(20):
                        t = time.perf_counter()
                        layer(x)
                        ts.append(time.perf_counter() - t)
                walls[name] = statistics.median(ts) * 1e3
            print(f"  {n} tokens ({n * 8 // 64} rows per expert): split {walls['split']:.1f} ms, "
                  f"not split {walls['not split']:.1f} ms (forward, wall, median of 20)")
    kernels.cpu_expert_workers, kernels.CPU_SPLIT_MIN_ROWS = real_workers, min_rows_default
    return 0


if __name__ == "__main__":
    sys.exit(main())
