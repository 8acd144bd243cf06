"""Does decoding take time independent of position? (issue 18 item 5) ms per generated token of each attention kind
of the tiny catalog LMs with the KV cache, at early and late positions, one run.

For each of lm-dense-tiny and lm-{local,lsh,performer,scatterbrain}-tiny (fresh seeded weights, max_seq_len raised
to fit), batch --batch: prefill `p` tokens, then time --tokens greedy decoding steps with the model's cache
(`model(ids, past_key_values=cache, use_cache=True)`), for each p in --positions; kinds alternate within each
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

import torch

from zoo import load

KINDS = ["dense", "local", "lsh", "performer", "scatterbrain"]


def decode_ms(model, prompt: torch.Tensor, tokens: int) -> float:
    """CPU ms per decoding step after a prefill of `prompt` (batch, p)."""
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        start = time.process_time()
        for _ in range(tokens):
            out = model(nxt, past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return (time.process_time() - start) / tokens * 1e3


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
    for r in range(args.rounds):
        for kind in KINDS[r % len(KINDS):] + KINDS[: r % len(KINDS)]:
            for pos in args.positions:
                ms[kind][pos].append(decode_ms(models[kind], prompts[pos], args.tokens))
    early, late = min(args.positions), max(args.positions)
    print("| kind | " + " | ".join(f"ms/token at {pos}" for pos in args.positions) + f" | {late} / {early} |")
    print("|---|" + "---:|" * (len(args.positions) + 1))
    for kind in KINDS:
        med = {pos: statistics.median(v) for pos, v in ms[kind].items()}
        print(f"| {kind} | " + " | ".join(f"{med[pos]:.2f}" for pos in args.positions) +
              f" | {med[late] / med[early]:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(["python", *sys.argv]), "args": vars(args), "ms_per_token": ms}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
