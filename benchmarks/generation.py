"""Generation tokens/s of the tiny catalog LMs against transformers with the same weights (issue 18 item 5), one run.

For lm-dense-tiny, moe-fine-tiny (also without its shared expert, which makes it a Mixtral) and
lm-{local,lsh,performer,scatterbrain}-tiny (fresh seeded weights): new tokens/s of one greedy
`model.generate(prompt, max_new_tokens=N, do_sample=False, use_cache=True)` call at batch 1 and 8 (the call
`zoo generate` makes), wall time including the prompt's forward, with the cache each model builds itself (the
zoo: each attention kind's decoding state, layers/attention/decoding.py; transformers: its DynamicCache, a
sliding-window one for Mistral). The peer is `zoo.interop.to_transformers(model)`, the transformers class with
the very same weights wherever the kinds map (dense -> Llama, routed experts only -> Mixtral, local ->
Mistral's sliding window); models with no transformers equivalent (a shared expert, lsh, performer,
scatterbrain) are timed alone. The two sides' greedy ids are compared in every round.

Interleaved rounds: in each round every (model, batch) times the zoo and its peer back to back, the order
alternating between rounds; reported: median tokens/s per side and the median (min, max) of the per-round
ratios zoo / transformers. One torch thread by default (a 2-core machine shared with other jobs: the stable
comparison); the CPU share other processes took during the timed calls is kept in the JSON.

    python benchmarks/generation.py --json benchmarks/results/generation.json       # ~3-5 min
    python benchmarks/generation.py --rounds 1 --new-tokens 8 --models lm-dense-tiny  # seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep (see dense_vs_llama.py)

import torch  # noqa: E402
import transformers  # noqa: E402
from train_overhead import ForeignLoad, machine  # noqa: E402

import zoo  # noqa: E402
from zoo.interop import to_transformers  # noqa: E402

# moe-fine-tiny's shared expert has no transformers class with its softmax router (Mixtral has no shared expert,
# Qwen2-MoE gates it, DeepSeek-V2 does not renormalise): without it, its 64 fine-grained experts are Mixtral's.
MODELS = ["lm-dense-tiny", "moe-fine-tiny", "moe-fine-tiny:n_shared_experts=0", "lm-local-tiny", "lm-lsh-tiny",
          "lm-performer-tiny", "lm-scatterbrain-tiny"]


def load(spec: str):
    """zoo.load of "name" or "name:field=value,field=value" (config overrides, values read as JSON if they parse)."""
    name, _, rest = spec.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return zoo.load(name, **overrides)


def build(name: str, seed: int):
    """(zoo model, its transformers twin or None, why there is none)."""
    torch.manual_seed(seed)
    ours = load(name).eval()
    try:
        theirs = to_transformers(ours).eval()
    except ValueError as err:
        return ours, None, " ".join(str(err).split())[:300]
    return ours, theirs, None


def generate(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
    if out.shape != (prompt.shape[0], prompt.shape[1] + new_tokens):
        raise RuntimeError(f"generate returned {tuple(out.shape)}")
    return out


def timed(fn) -> dict:
    gc.collect()
    meter = ForeignLoad()
    meter.start()
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    result = {"s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
    meter.stop()
    result["foreign_cores"] = meter.cores
    return result, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = {**machine(), "transformers": transformers.__version__, "load_start": os.getloadavg()[0]}
    started = time.perf_counter()
    pairs = {}
    for name in args.models:
        ours, theirs, why = build(name, args.seed)
        pairs[name] = {"zoo": ours, "transformers": theirs, "peer": type(theirs).__name__ if theirs else None,
                       "no_peer": why}
    g = torch.Generator().manual_seed(args.seed + 1)
    prompts = {b: torch.randint(1, 256, (b, args.prompt_len), generator=g) for b in args.batches}
    results = {name: {b: {"zoo": [], "transformers": [], "ids_equal": []} for b in args.batches} for name in pairs}
    for pair in pairs.values():  # warm-up: a model's first generate call is slower
        for b in args.batches:
            for side in ("zoo", "transformers"):
                if pair[side] is not None:
                    generate(pair[side], prompts[b], min(args.new_tokens, 8))
    for r in range(args.rounds):
        for j, (name, pair) in enumerate(pairs.items()):
            for b in args.batches:
                order = ["zoo", "transformers"] if (r + j + b) % 2 == 0 else ["transformers", "zoo"]
                outs = {}
                for side in order:
                    if pair[side] is None:
                        continue
                    t, outs[side] = timed(lambda m=pair[side], x=prompts[b]: generate(m, x, args.new_tokens))
                    results[name][b][side].append({**t, "first": side == order[0]})
                if "transformers" in outs:
                    results[name][b]["ids_equal"].append(bool(torch.equal(outs["zoo"], outs["transformers"])))
                line = f"round {r + 1} {name} b{b}: zoo {results[name][b]['zoo'][-1]['s']:.2f} s"
                if "transformers" in outs:
                    line += f", {pair['peer']} {results[name][b]['transformers'][-1]['s']:.2f} s"
                print(line, file=sys.stderr, flush=True)
    info["load_end"] = os.getloadavg()[0]
    rows = []
    for name, pair in pairs.items():
        for b in args.batches:
            res = results[name][b]
            tokens = b * args.new_tokens
            zoo_tps = [tokens / t["s"] for t in res["zoo"]]
            row = {"model": name, "batch": b, "peer": pair["peer"], "no_peer": pair["no_peer"],
                   "zoo_tokens_per_s": statistics.median(zoo_tps), "zoo_rounds": zoo_tps}
            if res["transformers"]:
                hf_tps = [tokens / t["s"] for t in res["transformers"]]
                ratios = [a / c for a, c in zip(zoo_tps, hf_tps, strict=True)]
                row.update(transformers_tokens_per_s=statistics.median(hf_tps), transformers_rounds=hf_tps,
                           ratio_median=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
                           ids_equal=all(res["ids_equal"]))
            row["foreign_cores_max"] = max(t["foreign_cores"] for side in ("zoo", "transformers") for t in res[side])
            rows.append(row)
    lines = ["| model | batch | zoo tokens/s | transformers | tokens/s | zoo / transformers (min, max) | same ids |",
             "|---|---:|---:|---|---:|---:|---|"]
    for row in rows:
        if row["peer"]:
            lines.append(f"| {row['model']} | {row['batch']} | {row['zoo_tokens_per_s']:.0f} | {row['peer']} | "
                         f"{row['transformers_tokens_per_s']:.0f} | {row['ratio_median']:.2f}x "
                         f"({row['ratio_min']:.2f}, {row['ratio_max']:.2f}) | {'yes' if row['ids_equal'] else 'no'} |")
        else:
            lines.append(f"| {row['model']} | {row['batch']} | {row['zoo_tokens_per_s']:.0f} | none | - | - | - |")
    table = "\n".join(lines)
    print(table)
    no_peer = {row["model"]: row["no_peer"] for row in rows if row["no_peer"]}
    for name, why in no_peer.items():
        print(f"- {name}: no transformers peer ({why})")
    if args.json:
        command = " ".join(["python", "benchmarks/generation.py", *(sys.argv[1:] if argv is None else argv)])
        out = {"command": command, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "seconds": time.perf_counter() - started, "machine": info, "args": vars(args), "rows": rows,
               "markdown": table}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
