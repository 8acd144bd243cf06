"""SAE training throughput and FVU after the same steps: ours against EleutherAI sparsify and SAELens, one run.

Every side trains a TopK SAE (d_in 512, 16x expansion, k 32, AuxK 1/32, batch 4096 activations, fp32, Adam at
one constant learning rate: no warmup, no decay, as sparsify's step is driven here) on the same batches of
the same on-disk store: our side is `train.trainer.Trainer` on the catalog entry `sae-topk-tiny` with
overrides and its SAE training defaults otherwise (SAETask reads the store that it harvested from the source
LM); sparsify's side is its `SparseCoder` and the per-step work of its `Trainer.fit` (see sparsify_trainer);
SAELens's side is `sae_lens.training.sae_trainer.SAETrainer` stepping `TopKTrainingSAE` (dense decode; also
its `use_sparse_activations=True` variant). The sides alternate in windows (rotated each round), each after
warm-up steps; each window reports activations/s; the table gives medians and, since a faster trainer that
learns worse is not faster, every side's FVU on the held-out validation activations after the same steps
(and, with --fvu-steps N, of ours and sparsify after N steps, trained on untimed).

The source LM is lm-dense-tiny at d_model 512 with fresh (seeded) weights: throughput does not depend
on what the activations mean, and no trained 512-wide LM exists in the catalog.

    python benchmarks/sae_throughput.py                     # 3 rounds x 8 timed steps per side
    python benchmarks/sae_throughput.py --rounds 5 --fvu-steps 200 --json /tmp/sae_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from train.config import parse_args
from train.trainer import Trainer
from zoo import load

SPARSIFY = "sparsify SparseCoder (its training step, Adam)"


def _window(step, steps: int) -> dict:
    """Run `steps` calls of step(); wall seconds, this process's CPU seconds and the load average around it."""
    load_before = os.getloadavg()[0]
    cpu0, t0 = time.process_time(), time.perf_counter()
    for _ in range(steps):
        step()
    wall = time.perf_counter() - t0
    return {"wall": wall, "cpu": time.process_time() - cpu0, "load": (load_before + os.getloadavg()[0]) / 2}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a Markdown table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--expansion", type=int, default=16)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--sequences", type=int, default=16, help="sequences per step: batch = sequences * seq_len")
    p.add_argument("--steps", type=int, default=8, help="timed steps per window")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each window")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--work", default="/tmp/sae-bench-throughput", help="folder for the source LM and runs")
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.add_argument("--no-sparsify", action="store_true", help="skip EleutherAI sparsify (pip install eai-sparsify)")
    p.add_argument("--fvu-steps", type=int, default=0,
                   help="then train ours and sparsify on (untimed) to this many steps and report their FVU there too")
    args = p.parse_args(argv)

    from sae_lens import __version__ as sae_lens_version
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    work = Path(args.work)
    d_sae, batch = args.d_in * args.expansion, args.sequences * args.seq_len
    timed_steps = args.rounds * (args.steps + args.warmup)  # the steps each side takes in the timed rounds
    total_steps = max(timed_steps, args.fvu_steps)
    source = work / f"lm-d{args.d_in}"
    if not (source / "model.safetensors").exists():
        torch.manual_seed(0)
        load("lm-dense-tiny", d_model=args.d_in, n_heads=8).save_pretrained(source)

    # ---- ours: the common Trainer on the catalog entry, its SAETask harvesting the store -------------------
    # The store holds the rows of timed_steps batches (later steps cycle over it, the same batches on every
    # side). A constant learning rate (no warmup, no cosine decay), as the other sides; the rest are the SAE
    # training defaults (clipping at 1.0 never binds here, the betas and weight decay change no digit that
    # matters: BENCHMARKS.md, "SAE training against EleutherAI sparsify").
    cfg = parse_args(["sae-topk-tiny", "--set", f"source_model={source}", "--set", f"d_in={args.d_in}",
                      "--set", f"d_sae={d_sae}", "--set", f"k={args.k}", "--set", "hook_point=blocks.0",
                      "--seq-len", str(args.seq_len), "--batch-size", str(args.sequences),
                      "--steps", str(timed_steps + 1), "--lr", str(args.lr), "--warmup-steps", "0",
                      "--min-lr-ratio", "1", "--out", str(work / "ours"), "--eval-batches", "3"])
    start = time.perf_counter()
    ours = Trainer(cfg)
    print(f"our Trainer ready in {time.perf_counter() - start:.0f} s (includes the harvest, cached after)")
    store = ours.task.train

    def our_step():
        ours.step()
        ours.step_done += 1
    our_step.reconstruct = lambda x: ours.model.reconstruct(x)[0]

    # ---- SAELens: its trainer on the same store's batches -------------------------------------------------
    def lens_trainer(sparse: bool):
        torch.manual_seed(0)
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=args.d_in, d_sae=d_sae, k=args.k,
                                                     use_sparse_activations=sparse))
        trainer_cfg = SAETrainerConfig(total_training_samples=total_steps * batch, train_batch_size_samples=batch,
                                       lr=args.lr, lr_end=args.lr, lr_warm_up_steps=0, lr_scheduler_name="constant",
                                       logger=LoggingConfig(log_to_wandb=False))
        batches = (store.batch(s, batch, seed=0) for s in range(10**9))
        trainer = SAETrainer(trainer_cfg, sae, data_provider=batches)
        trainer.sae.to("cpu")

        def step():
            trainer.step(next(batches))
            trainer.n_training_steps += 1
        step.reconstruct = lambda x: trainer.sae.decode(trainer.sae.encode(x))
        return step

    # ---- EleutherAI sparsify: its SparseCoder and the per-step work of its Trainer.fit ----------------------
    def sparsify_trainer():
        """sparsify's training step on the same batches: b_dec = batch mean on the first step, unit-norm decoder
        rows, forward with the dead mask (AuxK at our coefficient, 1/32), loss fvu + alpha * auxk, backward,
        gradient parallel to the decoder rows removed, optimizer step, dead-latent counts. Its Trainer wraps
        exactly this around a model's forward hooks (no activation store), so it is driven directly here.
        Adam at our learning rate (sparsify's `optimizer="adam"`; its default signum is another optimizer)."""
        from sparsify import SparseCoder, SparseCoderConfig

        torch.manual_seed(0)
        sae = SparseCoder(args.d_in, SparseCoderConfig(expansion_factor=args.expansion, k=args.k), device="cpu")
        opt = torch.optim.Adam(sae.parameters(), lr=args.lr)
        since_fired = torch.zeros(sae.num_latents, dtype=torch.long)
        batches = (store.batch(s, batch, seed=0) for s in range(10**9))
        first = [True]

        def step():
            x = next(batches).float()
            if first[0]:
                sae.b_dec.data = x.mean(0)
                first[0] = False
            sae.set_decoder_norm_to_unit_norm()
            out = sae(x, dead_mask=since_fired > 250_000)
            (out.fvu + out.auxk_loss / 32).backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                since_fired.add_(x.shape[0])
                since_fired[out.latent_indices.flatten()] = 0
        step.reconstruct = lambda x: sae(x).sae_out
        return step

    sides = {"ours (Trainer + SAETask)": our_step, "SAELens SAETrainer (dense)": lens_trainer(False),
             "SAELens SAETrainer (use_sparse_activations)": lens_trainer(True)}
    if not args.no_sparsify:
        sides[SPARSIFY] = sparsify_trainer()
    results: dict[str, list[dict]] = {name: [] for name in sides}
    names = list(sides)
    failed: dict[str, str] = {}
    for r in range(args.rounds):
        order = [n for n in names[r % len(names):] + names[:r % len(names)] if n not in failed]
        for name in order:
            try:
                _window(sides[name], args.warmup)
            except (RuntimeError, NotImplementedError) as err:  # e.g. SAELens's sparse path on CPU
                failed[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:100]}"
                print(f"round {r + 1} {name}: fails: {failed[name]}", flush=True)
                continue
            w = _window(sides[name], args.steps)
            w["acts_per_s"] = args.steps * batch / w["wall"]
            results[name].append(w)
            print(f"round {r + 1} {name}: {w['acts_per_s']:.0f} activations/s "
                  f"(cpu {w['cpu'] / w['wall']:.2f} cores, load {w['load']:.1f})", flush=True)

    # ---- FVU after the same steps, on the held-out validation activations ----------------------------------
    held_out = torch.cat(list(ours.task.val.batches(batch))).float()
    steps_taken = {name: (args.steps + args.warmup) * len(results[name]) for name in names if name not in failed}

    @torch.no_grad()
    def fvu_of(name):
        sae = ours.model
        sae.eval()
        try:
            x_hat = torch.cat([sides[name].reconstruct(x) for x in held_out.split(batch)])
        finally:
            sae.train()
        return float((x_hat - held_out).pow(2).sum() / (held_out - held_out.mean(0)).pow(2).sum())

    fvu = {name: {"steps": steps_taken[name], "fvu": fvu_of(name)} for name in steps_taken}
    print("FVU on the held-out validation activations: " + ", ".join(
        f"{name}: {v['fvu']:.4f} after {v['steps']} steps" for name, v in fvu.items()), flush=True)
    fvu_later = {}
    if args.fvu_steps > timed_steps:
        for name in [n for n in (names[0], SPARSIFY) if n in steps_taken]:
            for _ in range(args.fvu_steps - steps_taken[name]):
                sides[name]()
            fvu_later[name] = {"steps": args.fvu_steps, "fvu": fvu_of(name)}
        print(f"FVU after {args.fvu_steps} steps: " + ", ".join(f"{n}: {v['fvu']:.4f}" for n, v in fvu_later.items()))

    base = statistics.median(w["acts_per_s"] for w in results[names[0]])
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\nTopK SAE d_in {args.d_in}, d_sae {d_sae}, k {args.k}, batch {batch} activations, fp32; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), sae-lens {sae_lens_version}; {when}; {args.rounds} rounds x "
          f"{args.steps} timed steps per side\n")
    later = f" | FVU after {args.fvu_steps} steps" if fvu_later else ""
    print(f"| trainer | activations/s (median) | per round | ours / this (median) | ours / this (paired rounds) "
          f"| FVU after the same {timed_steps} steps{later} |")
    print("|---|---|---|---|---|---|" + ("---|" if fvu_later else ""))
    for name in names:
        rates = [w["acts_per_s"] for w in results[name]]
        if not rates:
            print(f"| {name} | fails: {failed[name]} | | | |" + (" |" if fvu_later else ""))
            continue
        med = statistics.median(rates)
        paired = [a["acts_per_s"] / b["acts_per_s"] for a, b in zip(results[names[0]], results[name], strict=False)]
        end = f" | {fvu_later[name]['fvu']:.4f}" if name in fvu_later else (" |" if fvu_later else "")
        print(f"| {name} | {med:,.0f} | {', '.join(f'{v:,.0f}' for v in rates)} | {base / med:.2f}x | "
              f"{statistics.median(paired):.2f}x ({min(paired):.2f}-{max(paired):.2f}) | {fvu[name]['fvu']:.4f}{end} |")
    if args.json:
        raw = {"args": vars(args), "results": results, "failed": failed, "when": when, "fvu_held_out": fvu,
               "fvu_held_out_later": fvu_later, "train_settings": {k: getattr(cfg, k) for k in (
                   "lr", "warmup_steps", "min_lr_ratio", "betas", "weight_decay", "grad_clip")}}
        Path(args.json).write_text(json.dumps(raw, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
