"""Sparsity knobs on imported transformers checkpoints (issue 15): MoE k / top-p and attention swaps, training-free.

What it does, in one process:

1. Trains two small models with transformers' OWN classes and a plain torch AdamW loop (linear warm-up,
   cosine decay, gradient clipping 1.0) on the training split of the bundled corpus (byte tokens):
   a `MixtralForCausalLM` (d_model 128, 4 layers, 8 experts, top-2; its loss adds
   router_aux_loss_coef x Mixtral's load-balancing loss, as Mixtral's own loss does) and a dense
   `LlamaForCausalLM` of the same shape whose MLP width equals Mixtral's two active experts (so the two
   have the same active parameters). Each is `save_pretrained`-ed with the byte tokenizer
   (`zoo.tokenizer.save_tokenizer`): such a folder is what a Hub download of a transformers checkpoint
   gives. A folder whose training.json records the same settings is reused (no retraining; --retrain).
2. Imports each with `zoo.load(folder)` and records the max |logit difference| against the transformers
   model on validation blocks (and both sides' validation loss).
3. MoE table: validation loss and bits per byte against active parameters and forward FLOPs per token
   (`model.cost()`) for k = 1..E (`zoo.load(folder, num_experts_per_tok=k)`) and for top-p routing
   (`zoo.load(folder, moe_router="top_p", moe_top_p=p, num_experts_per_tok=E)`: the smallest set of
   experts whose router mass reaches p, at most E), whose mean active parameters are measured with
   `cost(sample=ids)` on the evaluated validation blocks. The same validation batches for every row.
4. Attention table on the imported Llama: each attention kind at 3 budgets (lsh: 5)
   (`zoo.load(folder, attention=KIND, attention_kwargs=...)`, training-free; random projections drawn
   from a fixed seed): max and mean |logit change| against the dense import on the first validation
   batches, and the validation loss / bpb on the same batches as the MoE table.

Results go to --json (default benchmarks/results/imported_sparsity.json); a Markdown section for
BENCHMARKS.md is printed, and written into BENCHMARKS.md with --write-md (replacing this section only).

    python benchmarks/imported_sparsity.py --write-md      # ~12-15 min on a busy 2-core machine
    python benchmarks/imported_sparsity.py --smoke         # toy sizes, ~1 min, nothing written to BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: idle threads sleep

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SECTION = "## Sparsity knobs on imported transformers checkpoints (issue 15)"
DEFAULT_JSON = REPO / "benchmarks" / "results" / "imported_sparsity.json"
DEFAULT_WORK = REPO / "runs" / "imported_sparsity"
TOP_PS = (0.3, 0.5, 0.7, 0.9, 0.95)
# kind -> budgets (small to large) at seq_len 128, head_dim 32
ATTENTION_BUDGETS = {
    "local": [{"window": 16}, {"window": 32}, {"window": 64}],
    # lsh: a query sees only keys of its own bucket, so the number of buckets is the budget that matters
    # (fewer buckets: more keys seen); chunk (keys of its bucket per query) swept at 4 buckets
    "lsh": [{"n_buckets": 8, "chunk": 64}, {"n_buckets": 4, "chunk": 16}, {"n_buckets": 4, "chunk": 32},
            {"n_buckets": 4, "chunk": 64}, {"n_buckets": 2, "chunk": 64}],
    "performer": [{"n_features": 16}, {"n_features": 64}, {"n_features": 256}],
    "scatterbrain": [{"n_features": 16, "window": 16}, {"n_features": 32, "window": 32},
                     {"n_features": 64, "window": 64}],
}
VERBOSE = True


def say(text: str) -> None:
    if VERBOSE:
        print(f"[{datetime.now(timezone.utc):%H:%M:%S}] {text}", flush=True)


def machine() -> dict:
    import transformers
    from train_overhead import machine as _machine

    info = _machine()
    info["transformers"] = transformers.__version__
    with open("/proc/loadavg") as f:
        info["loadavg_at_start"] = float(f.read().split()[0])
    return info


# ---- 1. training transformers' own classes ------------------------------------------------------------------

def model_settings(args) -> dict[str, dict]:
    """arch -> transformers config kwargs (byte vocabulary)."""
    common = dict(vocab_size=256, hidden_size=args.d_model, num_hidden_layers=args.layers,
                  num_attention_heads=args.heads, num_key_value_heads=args.heads,
                  max_position_embeddings=args.seq_len, tie_word_embeddings=False, rms_norm_eps=1e-5)
    return {
        "mixtral": {**common, "intermediate_size": args.expert_width, "num_local_experts": args.experts,
                    "num_experts_per_tok": args.top_k, "router_aux_loss_coef": 0.01},
        # dense MLP as wide as the top-k active experts: the same active parameters as Mixtral at top_k
        "llama": {**common, "intermediate_size": args.expert_width * args.top_k},
    }


def build_transformers(arch: str, config_kwargs: dict, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    if arch == "mixtral":
        return MixtralForCausalLM(MixtralConfig(**config_kwargs))
    return LlamaForCausalLM(LlamaConfig(**config_kwargs))


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_transformers(arch: str, folder: Path, config_kwargs: dict, data, *, steps: int, batch_size: int,
                       lr: float, seed: int = 0, retrain: bool = False, log_every: int = 25) -> dict:
    """Train transformers' class with a plain AdamW loop and save_pretrained it with the byte tokenizer;
    a folder holding a finished run of the same settings is reused. Returns its training.json record."""
    from zoo.tokenizer import ByteTokenizer, save_tokenizer

    settings = {"arch": arch, "config": config_kwargs, "steps": steps, "batch_size": batch_size, "lr": lr,
                "seed": seed, "seq_len": data.seq_len}
    record_path = folder / "training.json"
    if not retrain and record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("settings") == settings and (folder / "model.safetensors").is_file():
            say(f"{arch}: reusing the finished training in {folder} ({record['wall_s']:.0f} s when trained)")
            return {**record, "reused": True}
    model = build_transformers(arch, config_kwargs, seed)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    losses: list[float] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        batch = data.train_batch(step, batch_size, seed=seed)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        out = model(input_ids=inputs, output_router_logits=True) if arch == "mixtral" else model(input_ids=inputs)
        ce = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), targets.reshape(-1))
        loss = ce + config_kwargs["router_aux_loss_coef"] * out.aux_loss if arch == "mixtral" else ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(ce.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            elapsed = time.perf_counter() - start
            say(f"{arch}: step {step + 1}/{steps}, train CE {sum(losses[-log_every:]) / len(losses[-log_every:]):.4f}, "
                f"{elapsed:.0f} s, ~{elapsed / (step + 1) * (steps - step - 1):.0f} s left")
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    save_tokenizer(ByteTokenizer(), folder, model_max_length=data.seq_len)
    record = {"settings": settings, "wall_s": wall, "cpu_s": cpu, "tokens": steps * batch_size * data.seq_len,
              "final_train_ce": sum(losses[-log_every:]) / len(losses[-log_every:]), "first_train_ce": losses[0],
              "total_params": sum(p.numel() for p in model.parameters())}
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    say(f"{arch}: trained {steps} steps in {wall:.0f} s, saved to {folder}")
    return {**record, "reused": False}


# ---- 2. import and parity -----------------------------------------------------------------------------------

def val_inputs(data, batch_size: int, batches: int) -> list[torch.Tensor]:
    """The first `batches` validation batches' input ids."""
    out = []
    for i, batch in enumerate(data.val_batches(batch_size)):
        if i >= batches:
            break
        out.append(batch[:, :-1])
    return out


@torch.no_grad()
def logits_on(model, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    model.eval()
    return [model(input_ids=ids).logits.float() for ids in inputs]


def logit_change(logits: list[torch.Tensor], reference: list[torch.Tensor]) -> dict:
    diffs = [(a - b).abs() for a, b in zip(logits, reference, strict=True)]
    return {"max_abs_logit_change": max(d.max().item() for d in diffs),
            "mean_abs_logit_change": sum(d.sum().item() for d in diffs) / sum(d.numel() for d in diffs)}


def import_parity(folder: Path, data, batch_size: int, batches: int, eval_batches: int) -> dict:
    """zoo.load(folder) against transformers' AutoModelForCausalLM.from_pretrained(folder): logits and val loss."""
    from transformers import AutoModelForCausalLM

    import zoo
    from train.evaluate import evaluate_lm
    from zoo.tokenizer import is_byte_tokenizer, load_tokenizer

    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    lm = zoo.load(str(folder)).eval()
    inputs = val_inputs(data, batch_size, batches)
    diff = logit_change(logits_on(lm, inputs), logits_on(hf, inputs))
    hf_eval = evaluate_lm(hf, data, batch_size, eval_batches)
    zoo_eval = evaluate_lm(lm, data, batch_size, eval_batches)
    tokenizer = load_tokenizer(str(folder))
    return {"architecture": type(hf).__name__, "zoo_class": type(lm).__name__,
            "max_abs_logit_diff": diff["max_abs_logit_change"], "mean_abs_logit_diff": diff["mean_abs_logit_change"],
            "transformers_val_loss": hf_eval["val_loss"], "zoo_val_loss": zoo_eval["val_loss"],
            "tokenizer_is_bytes": bool(is_byte_tokenizer(tokenizer)), "compared_sequences": sum(len(x) for x in inputs)}


# ---- 3. MoE table -------------------------------------------------------------------------------------------

def _row(model, data, batch_size: int, eval_batches: int, sample: torch.Tensor | None) -> dict:
    from train.evaluate import evaluate_lm

    ev = evaluate_lm(model, data, batch_size, eval_batches)
    cost = model.cost(data.seq_len, sample=sample)
    return {"val_loss": ev["val_loss"], "val_bpb": ev.get("val_bpb"), "val_tokens": ev["val_tokens"],
            "active_params": cost["active_params"], "total_params": cost["total_params"],
            "flops_per_token": cost["flops_per_token"]}


def moe_table(folder: Path, data, *, ks, top_ps, batch_size: int, eval_batches: int) -> list[dict]:
    """Rows {setting, k | top_p, val_loss, val_bpb, active_params, flops_per_token, mean_k}."""
    import zoo

    experts = zoo.load(str(folder)).config.mlp_kwargs["num_experts"]
    sample = torch.cat(val_inputs(data, batch_size, eval_batches))  # the evaluated blocks
    rows = []
    for k in ks:
        start = time.perf_counter()
        model = zoo.load(str(folder), num_experts_per_tok=k)
        row = {"setting": f"top-k k={k}", "router": "softmax_topk", "k": k,
               **_row(model, data, batch_size, eval_batches, None), "mean_k": float(k)}
        rows.append(row)
        say(f"MoE k={k}: val_loss {row['val_loss']:.4f}, bpb {row['val_bpb']:.4f}, "
            f"active {row['active_params'] / 1e6:.3f}M ({time.perf_counter() - start:.0f} s)")
    for p in top_ps:
        start = time.perf_counter()
        model = zoo.load(str(folder), moe_router="top_p", moe_top_p=p, num_experts_per_tok=experts)
        row = {"setting": f"top-p p={p}", "router": "top_p", "top_p": p, "max_k": experts,
               **_row(model, data, batch_size, eval_batches, sample)}
        row["mean_k"] = mean_k(model, row["active_params"], folder)
        rows.append(row)
        say(f"MoE top-p {p}: val_loss {row['val_loss']:.4f}, bpb {row['val_bpb']:.4f}, "
            f"mean active {row['active_params'] / 1e6:.3f}M (mean k {row['mean_k']:.2f}; "
            f"{time.perf_counter() - start:.0f} s)")
    return rows


def mean_k(model, active_params: float, folder: Path) -> float:
    """The mean experts per token that active_params stands for: interpolated from the k = 1 and k = 2 costs."""
    import zoo

    one = zoo.load(str(folder), num_experts_per_tok=1).cost()["active_params"]
    two = zoo.load(str(folder), num_experts_per_tok=2).cost()["active_params"]
    return 1 + (active_params - one) / (two - one)


# ---- 4. attention table -------------------------------------------------------------------------------------

def attention_table(folder: Path, data, *, budgets: dict, batch_size: int, eval_batches: int,
                    logit_batches: int, seed: int = 0) -> list[dict]:
    """Rows {kind, budget, max/mean_abs_logit_change, val_loss, val_bpb, flops_per_token}; the first is dense."""
    import zoo

    dense = zoo.load(str(folder))
    inputs = val_inputs(data, batch_size, logit_batches)
    reference = logits_on(dense, inputs)
    rows = [{"kind": "dense", "budget": {}, "max_abs_logit_change": 0.0, "mean_abs_logit_change": 0.0,
             **_row(dense, data, batch_size, eval_batches, None)}]
    say(f"attention dense: val_loss {rows[0]['val_loss']:.4f}")
    for kind, options in budgets.items():
        for budget in options:
            start = time.perf_counter()
            torch.manual_seed(seed)  # the random projections of lsh / performer / scatterbrain
            model = zoo.load(str(folder), attention=kind, attention_kwargs=dict(budget))
            row = {"kind": kind, "budget": dict(budget), **logit_change(logits_on(model, inputs), reference),
                   **_row(model, data, batch_size, eval_batches, None)}
            rows.append(row)
            say(f"attention {kind} {budget}: max |dlogit| {row['max_abs_logit_change']:.3f}, "
                f"mean {row['mean_abs_logit_change']:.4f}, val_loss {row['val_loss']:.4f} "
                f"({time.perf_counter() - start:.0f} s)")
    return rows


# ---- 5. report ----------------------------------------------------------------------------------------------

def _budget(b: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in b.items()) or "-"


def markdown(report: dict) -> str:
    s, m = report["settings"], report["machine"]
    moe, llama = report["trainings"]["mixtral"], report["trainings"]["llama"]
    pm, pl = report["parity"]["mixtral"], report["parity"]["llama"]
    lines = [SECTION, "", "```bash", report["command"], "```", "",
             f"Run {report['started']} - {report['finished']} ({report['wall_s'] / 60:.1f} min in all; "
             f"training {moe['wall_s']:.0f} s Mixtral + {llama['wall_s']:.0f} s Llama"
             f"{' (reused from an earlier run of the same settings)' if moe.get('reused') else ''}). "
             f"Machine: {m['cpu']}, {m['nproc']} vCPUs shared with other sessions (load average "
             f"{m['loadavg_at_start']:.1f} at start), {m['threads']} torch threads, fp32, torch {m['torch']}, "
             f"transformers {m['transformers']}, `OMP_WAIT_POLICY=PASSIVE`.", "",
             "**What was trained.** These two models stand for \"a transformers checkpoint from the Hub\": no "
             "download is possible here, so each was trained with transformers' own class "
             "(`MixtralForCausalLM`, `LlamaForCausalLM`) by a plain torch AdamW loop (lr "
             f"{s['lr']}, warm-up then cosine to 10%, clip 1.0, weight decay 0.1) for {s['steps']} steps of "
             f"{s['batch_size']} x {s['seq_len']} byte tokens ({moe['tokens'] / 1e6:.2f}M tokens) of the bundled "
             "corpus's training split, then `save_pretrained` with the byte tokenizer "
             "(`zoo.tokenizer.save_tokenizer`). Mixtral: d_model "
             f"{s['d_model']}, {s['layers']} layers, {s['heads']} heads, {s['experts']} experts of width "
             f"{s['expert_width']}, top-{s['top_k']}, {moe['total_params'] / 1e6:.2f}M parameters (final train CE "
             f"{moe['final_train_ce']:.3f}). Llama: the same shape with one MLP of width "
             f"{s['expert_width'] * s['top_k']} (= Mixtral's active experts), {llama['total_params'] / 1e6:.2f}M "
             f"parameters (final train CE {llama['final_train_ce']:.3f}). Validation: the first "
             f"{s['eval_batches'] * s['batch_size']} interleaved held-out blocks "
             f"({report['moe'][0]['val_tokens']:,} tokens), the same for every row.", "",
             f"**Import.** `zoo.load(folder)` gives `{pm['zoo_class']}`; max |logit difference| against "
             f"transformers on {pm['compared_sequences']} validation sequences: Mixtral "
             f"{pm['max_abs_logit_diff']:.1e}, "
             f"Llama {pl['max_abs_logit_diff']:.1e}; validation loss transformers / zoo: Mixtral "
             f"{pm['transformers_val_loss']:.4f} / {pm['zoo_val_loss']:.4f}, Llama {pl['transformers_val_loss']:.4f} / "
             f"{pl['zoo_val_loss']:.4f}.", "",
             "**MoE: k and top-p on the imported Mixtral** (training-free; top-p: `moe_router=\"top_p\"`, at most "
             f"{s['experts']} experts, mean active parameters measured with `cost(sample=...)` on the evaluated "
             "blocks; FLOPs/token at seq_len "
             f"{s['seq_len']}, LM head included). The dense Llama of equal active parameters to k = {s['top_k']}: "
             f"val loss {report['attention'][0]['val_loss']:.4f}, bpb {report['attention'][0]['val_bpb']:.4f}.", "",
             "| setting | mean experts/token | active params | FLOPs/token | val loss | val bpb |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in report["moe"]:
        trained = " (as trained)" if r.get("k") == s["top_k"] else ""
        lines.append(f"| {r['setting']}{trained} | {r['mean_k']:.2f} | {r['active_params'] / 1e6:.3f}M | "
                     f"{r['flops_per_token'] / 1e6:.2f}M | {r['val_loss']:.4f} | {r['val_bpb']:.4f} |")
    lines += ["", "**Attention kinds swapped onto the imported Llama** (training-free, "
              "`zoo.load(folder, attention=KIND, attention_kwargs=...)`; random projections drawn with seed "
              f"{s['seed']}; logit change against the dense import on {s['logit_batches'] * s['batch_size']} "
              f"validation sequences of {s['seq_len']} tokens).", "",
              "| kind | budget | max abs logit change | mean abs logit change | val loss | val bpb | FLOPs/token |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for r in report["attention"]:
        lines.append(f"| {r['kind']} | {_budget(r['budget'])} | {r['max_abs_logit_change']:.3f} | "
                     f"{r['mean_abs_logit_change']:.4f} | {r['val_loss']:.4f} | {r['val_bpb']:.4f} | "
                     f"{r['flops_per_token'] / 1e6:.2f}M |")
    if report.get("reading"):
        lines += ["", report["reading"]]
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    """Put `text` (starting with SECTION) into the Markdown file: replace the section if there, else append."""
    content = path.read_text(encoding="utf-8")
    if SECTION in content:
        start = content.index(SECTION)
        nxt = content.find("\n## ", start + len(SECTION))
        end = len(content) if nxt < 0 else nxt + 1
        content = content[:start] + text + ("\n" if nxt >= 0 else "") + content[end:]
    else:
        content = content.rstrip("\n") + "\n\n" + text
    path.write_text(content, encoding="utf-8")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=DEFAULT_JSON,
                   help=f"results JSON (default {DEFAULT_JSON.relative_to(REPO)})")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK,
                   help="folder of the trained checkpoints (reused when their settings match; "
                        "default runs/imported_sparsity)")
    p.add_argument("--retrain", action="store_true", help="train again even if a finished training is there")
    p.add_argument("--steps", type=int, default=500, help="AdamW steps per model (default 500)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--expert-width", type=int, default=256, help="Mixtral expert MLP width (Llama's is top-k x this)")
    p.add_argument("--top-k", type=int, default=2, help="Mixtral's trained experts per token")
    p.add_argument("--eval-batches", type=int, default=24, help="validation batches per row (default 24)")
    p.add_argument("--logit-batches", type=int, default=2, help="validation batches for the logit changes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write-md", action="store_true", help="write the section into BENCHMARKS.md")
    p.add_argument("--smoke", action="store_true", help="toy sizes (d 32, 2 layers, 4 experts, 10 steps, seq 32)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--from-json", action="store_true",
                   help="measure nothing: print (and with --write-md write) the section from --json, whose "
                        "'reading' field holds the hand-written reading of the numbers")
    return p


def main(argv: list[str] | None = None) -> int:
    global VERBOSE
    args = build_parser().parse_args(argv)
    VERBOSE = not args.quiet
    if args.smoke:
        args.steps, args.seq_len, args.d_model, args.layers, args.heads = 10, 32, 32, 2, 2
        args.experts, args.expert_width, args.eval_batches, args.batch_size = 4, 32, 2, 4
        if args.work == DEFAULT_WORK:
            args.work = DEFAULT_WORK.with_name("imported_sparsity_smoke")
        if args.json == DEFAULT_JSON:
            args.json = args.work / "results.json"
    if args.from_json:
        text = markdown(json.loads(args.json.read_text()))
        print(text)
        if args.write_md:
            write_section(REPO / "BENCHMARKS.md", text)
        return 0
    torch.set_num_threads(args.threads)
    from train.data import load_token_data
    from zoo.tokenizer import ByteTokenizer

    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    info = machine()
    data = load_token_data(None, seq_len=args.seq_len, tokenizer=ByteTokenizer())
    say(f"data: {data.num_train_blocks} train / {data.num_val_blocks} validation blocks of {args.seq_len}")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    configs = model_settings(args)
    trainings, parity = {}, {}
    for arch in ("mixtral", "llama"):
        trainings[arch] = train_transformers(arch, args.work / arch, configs[arch], data, steps=args.steps,
                                             batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                             retrain=args.retrain)
        parity[arch] = import_parity(args.work / arch, data, args.batch_size, args.logit_batches, args.eval_batches)
        say(f"{arch}: zoo.load max |logit diff| {parity[arch]['max_abs_logit_diff']:.2e}, val loss transformers "
            f"{parity[arch]['transformers_val_loss']:.4f} / zoo {parity[arch]['zoo_val_loss']:.4f}")
    moe = moe_table(args.work / "mixtral", data, ks=range(1, args.experts + 1), top_ps=TOP_PS,
                    batch_size=args.batch_size, eval_batches=args.eval_batches)
    budgets = ATTENTION_BUDGETS
    if args.smoke:  # budgets that fit seq_len 32
        budgets = {kind: [{k: (v if k == "n_buckets" else max(1, v // 4)) for k, v in b.items()} for b in opts[:1]]
                   for kind, opts in ATTENTION_BUDGETS.items()}
    attention = attention_table(args.work / "llama", data, budgets=budgets, batch_size=args.batch_size,
                                eval_batches=args.eval_batches, logit_batches=args.logit_batches, seed=args.seed)
    given = argv if argv is not None else sys.argv[1:]
    command = "python benchmarks/imported_sparsity.py" + "".join(f" {a}" for a in given)
    report = {"command": command, "started": f"{started:%Y-%m-%d %H:%M} UTC",
              "finished": f"{datetime.now(timezone.utc):%H:%M} UTC", "wall_s": time.perf_counter() - t0,
              "machine": info, "settings": settings, "trainings": trainings, "parity": parity, "moe": moe,
              "attention": attention}
    old = json.loads(args.json.read_text()) if args.json.is_file() else {}
    if old.get("reading"):  # the hand-written reading of an earlier run of the same script is kept
        report["reading"] = old["reading"]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    print(text)
    if args.write_md and not args.smoke:
        write_section(REPO / "BENCHMARKS.md", text)
        say("wrote the section into BENCHMARKS.md")
    say(f"done in {report['wall_s']:.0f} s; results in {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
