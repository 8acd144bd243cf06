"""What the trainer trains on: a Task gives batches, the loss of a batch, and evaluation.

The Trainer is the same for every family; the task is chosen by the model's `model_type`.
`LMTask` (next-token prediction on a token corpus) serves every zoo LM; the SAE family adds
its own task (`TASKS["zoo_sae"]`, reconstruction of harvested LM activations).
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn

from train.config import TrainConfig
from train.data import load_token_data
from train.evaluate import evaluate_lm

BUNDLED = "the bundled Jargon File 4.4.7 (public domain)"


def lm_loss(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token cross-entropy of a (batch, seq_len+1) block, and the aux losses the layers reported."""
    out = model(input_ids=batch[:, :-1])
    ce = F.cross_entropy(out.logits.flatten(0, 1).float(), batch[:, 1:].flatten())
    return ce, dict(out.aux_losses or {})


class LMTask:
    """Next-token prediction on packed blocks of the (bundled or given) corpus."""

    unit = "tokens"

    def __init__(self, cfg: TrainConfig, model: nn.Module):
        max_len = model.config.max_seq_len
        if cfg.seq_len > max_len:
            raise ValueError(f"--seq-len {cfg.seq_len} is larger than the model's context (max_seq_len={max_len}); "
                             f"lower --seq-len or pass --set max_seq_len={cfg.seq_len}")
        self.cfg = cfg
        self.data = load_token_data(cfg.data, seq_len=cfg.seq_len, val_fraction=cfg.val_fraction)
        self.items_per_step = cfg.batch_size * cfg.seq_len
        self.flops_per_item = model.cost(cfg.seq_len)["flops_per_token"]
        self.description = ", ".join(cfg.data) if cfg.data else BUNDLED

    def batch(self, step: int, rank: int, world: int) -> torch.Tensor:
        """This rank's rows of global batch `step`: (batch_size / world, seq_len + 1) token ids."""
        return self.data.train_batch(step, self.cfg.batch_size, seed=self.cfg.seed, rank=rank, world_size=world)

    def loss(self, model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The main loss and the auxiliary losses of one (micro-)batch."""
        return lm_loss(model, batch)

    def evaluate(self, model: nn.Module, device: torch.device, autocast: torch.dtype | None) -> dict:
        """Validation loss and perplexity."""
        return evaluate_lm(model, self.data, self.cfg.batch_size, self.cfg.eval_batches, device, autocast)


# model_type -> Task class, or "module:Class" imported when first needed.
TASKS: dict[str, type | str] = {"zoo_lm": LMTask, "zoo_sae": "train.sae_task:SAETask"}


def make_task(cfg: TrainConfig, model: nn.Module):
    """The task that trains `model`, chosen by its config's model_type."""
    kind = model.config.model_type
    if kind not in TASKS:
        raise ValueError(f"no training task for model_type {kind!r}; known: {sorted(TASKS)}")
    task = TASKS[kind]
    if isinstance(task, str):
        module, name = task.split(":")
        task = getattr(importlib.import_module(module), name)
    return task(cfg, model)
