"""Does decoding take time independent of position? (issue 18 item 5) ms per generated token of each attention kind
of the tiny catalog LMs with the KV cache, at early and late positions, one run.

The cache is the one the model builds (each attention kind's decoding state, layers/attention/decoding.py: a
window of keys for local, a running feature sum for performer, every key for dense / lsh / scatterbrain); the
table also gives what that cache holds per layer after the last step at the latest position.

For each of lm-dense-tiny and lm-{local,lsh,performer,scatterbrain}-tiny (fresh seeded weights, max_seq_len raised
to fit), batch --batch: prefill `p` tokens, then time --tokens greedy decoding steps with the model's cache
(`model(ids, cache=cache, use_cache=True)`), for each p in --positions; kinds alternate within each
of --rounds rounds. Reported: median ms/token per position and the ratio late / early (1.0 = independent of
position). One torch thread, CPU time of this process.

    python benchmarks/decode_position.py --json benchmarks/results/decode_position.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from zoo import load  # noqa: E402

KINDS = ["dense", "local", "lsh", "performer", "scatterbrain"]


def held(cache) -> str:
    """What the cache's first layer holds: its keys, or a state's tensor shape."""
    layer = cache.layers[0]
    if getattr(layer, "keys", None) is not None:
        return f"{layer.keys.shape[-2]} keys ({type(layer).__name__})"
    state = getattr(layer, "sum", None)
    return f"sum {'x'.join(map(str, state.shape[1:]))} ({type(layer).__name__})" if state is not None else "?"


def decode_ms(model, prompt: torch.Tensor, tokens: int) -> tuple[float, str]:
    """CPU ms per decoding step after a prefill of `prompt` (batch, p), and what the cache then holds."""
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
        start = time.process_time()
        for _ in range(tokens):
            out = model(nxt, cache=cache, use_cache=True)
            cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
        return (time.process_time() - start) / tokens * 1e3, held(cache)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--positions", type=int, nargs="+", default=[256, 2048])
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    models = {}
    for kind in KINDS:
        torch.manual_seed(0)
        name = "lm-dense-tiny" if kind == "dense" else f"lm-{kind}-tiny"
        models[kind] = load(name, max_seq_len=max(args.positions) + args.tokens + 1).eval()
    g = torch.Generator().manual_seed(0)
    prompts = {pos: torch.randint(0, 256, (args.batch, pos), generator=g) for pos in args.positions}
    ms = {kind: {pos: [] for pos in args.positions} for kind in KINDS}
    holds = {kind: {} for kind in KINDS}
    for r in range(args.rounds):
        for kind in KINDS[r % len(KINDS):] + KINDS[: r % len(KINDS)]:
            for pos in args.positions:
                t, holds[kind][pos] = decode_ms(models[kind], prompts[pos], args.tokens)
                ms[kind][pos].append(t)
    early, late = min(args.positions), max(args.positions)
    print("| kind | " + " | ".join(f"ms/token at {pos}" for pos in args.positions) + f" | {late} / {early} | "
          f"cache per layer after {late} + {args.tokens} |")
    print("|---|" + "---:|" * (len(args.positions) + 1) + "---|")
    for kind in KINDS:
        med = {pos: statistics.median(v) for pos, v in ms[kind].items()}
        print(f"| {kind} | " + " | ".join(f"{med[pos]:.2f}" for pos in args.positions) +
              f" | {med[late] / med[early]:.2f}x | {holds[kind][late]} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(["python", *sys.argv]), "args": vars(args), "ms_per_token": ms,
                       "cache_holds": holds}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
