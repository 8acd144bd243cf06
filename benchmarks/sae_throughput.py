"""SAE training throughput (issue 7): a TopK SAE in our Trainer against SAELens's TopK trainer, one run.

Both train a TopK SAE (d_in 512, 16x expansion, k 32, batch 4096 activations, fp32, Adam(W), grad
clipping 1.0, a LR schedule) on the same activations, read from the same on-disk store: our side is
`train.trainer.Trainer` on the catalog entry `sae-topk-tiny` with overrides (SAETask reads the store
that it harvested from the source LM), SAELens's side is `sae_lens.training.sae_trainer.SAETrainer`
stepping `TopKTrainingSAE` on batches of that store (SAELens defaults: dense decode; also its
`use_sparse_activations=True` variant). The sides alternate in windows (ours, SAELens, SAELens-sparse,
then rotated), each after warm-up steps; each window reports activations/s; the table gives medians.

The source LM is lm-dense-tiny at d_model 512 with fresh (seeded) weights: throughput does not depend
on what the activations mean, and no trained 512-wide LM exists in the catalog.

    python benchmarks/sae_throughput.py                     # 3 rounds x 8 timed steps per side
    python benchmarks/sae_throughput.py --rounds 5 --json /tmp/sae_throughput.json
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
    args = p.parse_args(argv)

    from sae_lens import __version__ as sae_lens_version
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    work = Path(args.work)
    d_sae, batch = args.d_in * args.expansion, args.sequences * args.seq_len
    total_steps = args.rounds * (args.steps + args.warmup) + 1
    source = work / f"lm-d{args.d_in}"
    if not (source / "model.safetensors").exists():
        torch.manual_seed(0)
        load("lm-dense-tiny", d_model=args.d_in, n_heads=8).save_pretrained(source)

    # ---- ours: the common Trainer on the catalog entry, its SAETask harvesting the store -------------------
    cfg = parse_args(["sae-topk-tiny", "--set", f"source_model={source}", "--set", f"d_in={args.d_in}",
                      "--set", f"d_sae={d_sae}", "--set", f"k={args.k}", "--set", "hook_point=blocks.0",
                      "--seq-len", str(args.seq_len), "--batch-size", str(args.sequences),
                      "--steps", str(total_steps), "--lr", str(args.lr), "--warmup-steps", "5",
                      "--out", str(work / "ours"), "--eval-batches", "1"])
    start = time.perf_counter()
    ours = Trainer(cfg)
    print(f"our Trainer ready in {time.perf_counter() - start:.0f} s (includes the harvest, cached after)")
    store = ours.task.train

    def our_step():
        ours.step()
        ours.step_done += 1

    # ---- SAELens: its trainer on the same store's batches -------------------------------------------------
    def lens_trainer(sparse: bool):
        torch.manual_seed(0)
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=args.d_in, d_sae=d_sae, k=args.k,
                                                     use_sparse_activations=sparse))
        trainer_cfg = SAETrainerConfig(total_training_samples=total_steps * batch, train_batch_size_samples=batch,
                                       lr=args.lr, lr_end=args.lr, lr_warm_up_steps=5, lr_scheduler_name="constant",
                                       logger=LoggingConfig(log_to_wandb=False))
        batches = (store.batch(s, batch, seed=0) for s in range(10**9))
        trainer = SAETrainer(trainer_cfg, sae, data_provider=batches)
        trainer.sae.to("cpu")

        def step():
            trainer.step(next(batches))
            trainer.n_training_steps += 1
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
        step.sae = sae
        return step

    sides = {"ours (Trainer + SAETask)": our_step, "SAELens SAETrainer (dense)": lens_trainer(False),
             "SAELens SAETrainer (use_sparse_activations)": lens_trainer(True)}
    if not args.no_sparsify:
        sides["sparsify SparseCoder (its training step, Adam)"] = sparsify_trainer()
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

    # ---- FVU after the same steps, on one held-out batch of the store --------------------------------------
    held_out = store.batch(10**6, batch, seed=1).float()
    fvu = {}
    with torch.no_grad():
        def fvu_of(x_hat):
            return float((x_hat - held_out).pow(2).sum() / (held_out - held_out.mean(0)).pow(2).sum())
        sae = ours.model
        sae.eval()
        fvu[names[0]] = fvu_of(sae.reconstruct(held_out)[0])
        sp = sides.get("sparsify SparseCoder (its training step, Adam)")
        if sp is not None:
            fvu["sparsify SparseCoder (its training step, Adam)"] = float(sp.sae(held_out).fvu)
    print("FVU on a held-out batch after the same steps: " + ", ".join(f"{k}: {v:.4f}" for k, v in fvu.items()))

    base = statistics.median(w["acts_per_s"] for w in results[names[0]])
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\nTopK SAE d_in {args.d_in}, d_sae {d_sae}, k {args.k}, batch {batch} activations, fp32; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), sae-lens {sae_lens_version}; {when}; {args.rounds} rounds x "
          f"{args.steps} timed steps per side\n")
    print("| trainer | activations/s (median) | per round | ours / this |")
    print("|---|---|---|---|")
    for name in names:
        rates = [w["acts_per_s"] for w in results[name]]
        if not rates:
            print(f"| {name} | fails: {failed[name]} | | |")
            continue
        med = statistics.median(rates)
        print(f"| {name} | {med:,.0f} | {', '.join(f'{v:,.0f}' for v in rates)} | {base / med:.2f}x |")
    if args.json:
        raw = {"args": vars(args), "results": results, "failed": failed, "when": when, "fvu_held_out": fvu}
        Path(args.json).write_text(json.dumps(raw, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
