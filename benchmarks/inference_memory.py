"""Inference memory of the sparse attention kinds at long n against fused SDPA, and what it costs (issue 18 item 3).

Per n (default 16k and 32k), causal, batch 1, --heads heads of dimension 64, fp32, the `small` budgets of
benchmarks/attention_speed.py, one torch thread. For each kind, its automatic inference path (local: SDPA per
query block in groups of rows; performer and scatterbrain's window: groups of positions with a running feature
state; lsh: groups of sorted query blocks merged flash-style) and the one-pass form it replaced (local:
`local_attention_reference`; performer, scatterbrain: INFERENCE_GROUP_ROWS above n, one group; lsh: its autograd
form, every tile at once); dense SDPA beside them. Reported: peak memory above the inputs of one no-grad call
(torch.profiler's allocator total, as attention_speed.py measures it), the median CPU time of interleaved rounds
(the ratio of the grouped path to the one-pass form is its time cost), and the peak of one forward + backward
(training) beside it.

    python benchmarks/inference_memory.py --json benchmarks/results/inference_memory.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention_speed import BUDGETS, peak_bytes  # noqa: E402
from local_vs_flex import run_sizes  # noqa: E402

from layers.attention import KINDS, local, lsh, performer, scatterbrain  # noqa: E402


class OnePass:
    """Context: the kinds' one-pass inference forms: local's reference, performer and scatterbrain in one group,
    lsh's autograd form (all tiles at once, as before issue 18)."""

    GROUPED = (performer, lsh, scatterbrain)

    def __enter__(self):
        self.saved = local.kernels.local_attention_path, [m.INFERENCE_GROUP_ROWS for m in self.GROUPED]
        local.kernels.local_attention_path = lambda q, mask: "reference"
        for m in self.GROUPED:
            m.INFERENCE_GROUP_ROWS = 1 << 40
        lsh.INFERENCE_GROUP_ROWS = 0  # lsh: the autograd form, the one that ran before

    def __exit__(self, *exc):
        local.kernels.local_attention_path, rows = self.saved
        for m, r in zip(self.GROUPED, rows, strict=True):
            m.INFERENCE_GROUP_ROWS = r


def calls(n: int, heads: int) -> dict:
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, heads, n, 64, generator=g) for _ in range(3))
    torch.manual_seed(0)
    out = {"dense (SDPA)": (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), None)}
    for name, (kind, kw) in BUDGETS.items():
        module = KINDS[kind](head_dim=64, **kw).eval()
        out[name] = ((lambda m: lambda: m(q, k, v, causal=True))(module), module)
    return out, (q, k, v)


def training_step(module, q, k, v) -> None:
    """One forward + backward of `module` (None: dense SDPA) on copies of q, k, v that need gradients."""
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    if module is None:
        F.scaled_dot_product_attention(qg, kg, vg, is_causal=True).sum().backward()
    else:
        module(qg, kg, vg, causal=True).sum().backward()


def measure(n: int, heads: int, repeats: int) -> dict:
    fns, (q, k, v) = calls(n, heads)
    variants = {}
    for name, (fn, _) in fns.items():
        variants[name] = (fn, False)
        if name in ("local", "performer", "lsh", "scatterbrain"):
            variants[f"{name} (one pass)"] = (fn, True)

    def run(fn, one_pass):
        with torch.no_grad():
            if one_pass:
                with OnePass():
                    return fn()
            return fn()

    cpu = {name: [] for name in variants}
    names = list(variants)
    for name in names:
        run(*variants[name])
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            c = time.process_time()
            run(*variants[name])
            cpu[name].append(time.process_time() - c)
    peak = {name: peak_bytes(lambda v=v: run(*v)) for name, v in variants.items()}
    train = {name: peak_bytes(lambda m=module: training_step(m, q, k, v)) for name, (_, module) in fns.items()}
    return {"n": n, "cpu_seconds": cpu, "peak_bytes_no_grad": peak, "peak_bytes_fwd_bwd": train}


def report(results: dict) -> str:
    lines = ["| n | kind | inference peak MiB | / dense SDPA | CPU ms (median) | time vs one pass | training peak MiB "
             "(fwd+bwd) | / SDPA's |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in results["sizes"]:
        p = r["peak_bytes_no_grad"]
        c = {k: statistics.median(v) for k, v in r["cpu_seconds"].items()}
        t = r["peak_bytes_fwd_bwd"]
        for name in p:
            base = name.split(" (one pass)")[0]
            vs = f"{c[name] / c[base + ' (one pass)']:.2f}x" if base + " (one pass)" in c and name == base else ""
            tr = (f"{t[base] / 2**20:.1f} | {t[base] / t['dense (SDPA)']:.1f}x" if name == base else " | ")
            lines.append(f"| {r['n']} | {name} | {p[name] / 2**20:.1f} | {p[name] / p['dense (SDPA)']:.2f}x | "
                         f"{c[name] * 1e3:.0f} | {vs} | {tr} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {"command": " ".join(["python", *sys.argv]), "loadavg_start": os.getloadavg(), "torch": torch.__version__,
               "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "sizes": []}
    return run_sizes(results, args.n, lambda n: measure(n, args.heads, args.repeats), args.json, report)


if __name__ == "__main__":
    sys.exit(main())
