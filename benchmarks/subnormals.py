"""Does flushing subnormal floats speed up a CPU training run? One frontier run with and without it.

    python benchmarks/subnormals.py 0 lm-dense-tiny 0.01    # keep subnormals
    python benchmarks/subnormals.py 1 lm-dense-tiny 0.01    # flush them (what the trainer now does on CPU)

Arguments: flush (0/1), catalog model, learning rate; the frontier's settings otherwise (150 steps x 8 x 256,
seed 0, the mixed corpus, 2 threads). Prints tokens/s, training seconds and the held-out losses as JSON. The
trainer flushes subnormals itself while it trains, so flush 0 patches that out for the comparison.
"""

import contextlib
import json
import sys
import tempfile
from pathlib import Path

import torch

from train import trainer
from train.protocol import RunSpec, train_run

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    flush, model, lr = sys.argv[1] == "1", sys.argv[2], float(sys.argv[3])
    torch.set_num_threads(2)
    if not flush:
        trainer.flushing_subnormals = lambda device: contextlib.nullcontext()
    spec = RunSpec(model=model, lr=lr, seed=0, steps=150, batch_size=8, seq_len=256,
                   data=(str(ROOT / "train" / "corpus" / "mixed.jsonl.gz"),), warmup_steps=15, eval_blocks=128)
    with tempfile.TemporaryDirectory() as work:
        r = train_run(spec, Path(work), keep_final=False)
    print(json.dumps({"flush": flush, "model": model, "lr": lr, "tokens_per_s": r["tokens_per_s"],
                      "train_seconds": r["train_seconds"], "select": r["select_loss"], "report": r["report_loss"],
                      "load": r["loadavg"]}))


if __name__ == "__main__":
    main()
