"""`zoo quickstart`: the main job in one command.

Trains lm-dense-tiny on the bundled corpus for a short run with the common trainer, saves the
Hub checkpoint, loads it back with `zoo.load`, and prints a generated sample.
"""

from __future__ import annotations

import argparse
import time

STEPS = 150


def main(argv: list[str] | None = None) -> int:
    """Run the quickstart; --steps / --out change the run."""
    parser = argparse.ArgumentParser(prog="zoo quickstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=STEPS, help=f"optimizer steps (default {STEPS})")
    parser.add_argument("--out", default="runs/quickstart", help="run folder (default runs/quickstart)")
    parser.add_argument("--prompt", default="The hacker ", help="prompt for the sample")
    args = parser.parse_args(argv)

    from train.config import TrainConfig
    from train.trainer import Trainer
    from zoo import load, load_tokenizer
    from zoo.generation import generate_text

    start = time.perf_counter()
    cfg = TrainConfig(model="lm-dense-tiny", out=args.out, steps=args.steps, batch_size=16, seq_len=256,
                      eval_every=max(1, args.steps // 2), checkpoint_every=max(1, args.steps // 2),
                      warmup_steps=min(30, args.steps // 5), log_every=25, eval_batches=8)
    summary = Trainer(cfg).run()
    if summary.get("interrupted"):
        return 128 + summary.get("signal", 2)  # 130 after Ctrl-C, 143 after SIGTERM
    print(f"\ntrained {summary['steps']} steps ({summary['tokens']:,} tokens) in {summary['seconds']:.0f} s: "
          f"train loss {summary['loss']:.3f}, validation loss {summary['val_loss']:.3f} "
          f"(perplexity {summary['val_ppl']:.2f}, {summary['val_bpb']:.3f} bits per byte), "
          f"{summary['tokens_per_s']:.0f} tokens/s, "
          f"MFU {summary['mfu']:.1%}")
    print(f"saved the checkpoint to {summary['final']}")
    model = load(summary["final"])
    tokenizer = load_tokenizer(summary["final"])  # the tokenizer the run trained with, saved beside the weights
    print(f"loaded it back with zoo.load({summary['final']!r}): {model.cost()['total_params']:,} parameters")
    print("sample:\n" + "-" * 60)
    print(generate_text(model, args.prompt, max_new_tokens=300, temperature=0.8, top_k=40, tokenizer=tokenizer))
    print("-" * 60 + f"\nquickstart finished in {time.perf_counter() - start:.0f} s")
    return 0
