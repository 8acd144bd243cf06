"""What the trainer trains on, per model family: batches, the loss of a batch, the step hook, evaluation.

The Trainer is the same for every family and knows each only through its record in FAMILIES,
chosen by the model config's `model_type` (torchtitan's ModelSpec idea):

- `task`: the Task class: `batch(step, rank, world)`, `loss(model, micro_batch, step_batch) -> StepLoss`,
  `after_step(model, optimizer, stats, step) -> dict` (once per optimizer step, after the gradients
  are reduced, with the step statistics summed over micro-batches and ranks), `evaluate(...)`,
  and `items_per_step`, `flops_per_item`, `description`, `unit`;
- `fsdp_units`: the submodules that FSDP shards one by one (the model itself is sharded last).

A new family is one Task class and one FAMILIES line ("module:Name" entries import on first use).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from layers.registry import Registry
from models.losses import next_token_loss
from train.config import TrainConfig
from train.data import load_token_data, tokens_needed
from train.evaluate import evaluate_lm

BUNDLED = "the bundled Jargon File 4.4.7 (public domain)"


@dataclass
class StepLoss:
    """What a task's loss gives the trainer for one micro-batch."""

    loss: torch.Tensor  # the main loss (logged as "loss")
    aux: dict = field(default_factory=dict)  # weighted auxiliary losses, added to the loss
    metrics: dict = field(default_factory=dict)  # 0-d tensors to log (mean over micro-batches and ranks)
    stats: dict = field(default_factory=dict)  # step statistics for after_step (models/base.py)


def lm_loss(model: nn.Module, batch: torch.Tensor) -> StepLoss:
    """Next-token cross-entropy of a (batch, seq_len+1) block, with what the layers reported."""
    out = model(input_ids=batch[:, :-1])
    return StepLoss(next_token_loss(out.logits, batch[:, 1:], shifted=True), dict(out.aux_losses or {}),
                    dict(out.metrics or {}), dict(out.step_stats or {}))


class LMTask:
    """Next-token prediction on packed blocks of the (bundled or given) corpus."""

    unit = "tokens"

    def __init__(self, cfg: TrainConfig, model: nn.Module):
        max_len = model.config.max_seq_len
        if cfg.seq_len > max_len:
            raise ValueError(f"--seq-len {cfg.seq_len} is larger than the model's context (max_seq_len={max_len}); "
                             f"lower --seq-len or pass --set max_seq_len={cfg.seq_len}")
        self.cfg = cfg
        self.tokenizer = model_tokenizer(cfg, model)
        self.data = load_token_data(cfg.data, seq_len=cfg.seq_len, val_fraction=cfg.val_fraction,
                                    tokenizer=self.tokenizer,
                                    **data_settings(cfg, cfg.steps * cfg.batch_size, cfg.eval_batches * cfg.batch_size))
        # A streamed corpus holds the tokens of --steps (and of the evaluations) only: they are fixed on resume.
        self.fixed_on_resume = ("steps", "eval_batches") if cfg.streaming else ()
        self.items_per_step = cfg.batch_size * cfg.seq_len
        self.flops_per_item = model.cost(cfg.seq_len)["flops_per_token"]
        self.description = ", ".join(cfg.data) if cfg.data else BUNDLED

    def batch(self, step: int, rank: int, world: int) -> torch.Tensor:
        """This rank's rows of global batch `step`: (batch_size / world, seq_len + 1) token ids."""
        return self.data.train_batch(step, self.cfg.batch_size, seed=self.cfg.seed, rank=rank, world_size=world)

    def loss(self, model: nn.Module, batch: torch.Tensor, step_batch: torch.Tensor | None = None) -> StepLoss:
        """The main loss, auxiliary losses, metrics and step statistics of one (micro-)batch."""
        return lm_loss(model, batch)

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, stats: dict, step: int) -> dict:
        """The model's per-step updates (router balance bias, projection redraws) from the global statistics,
        and the global tokens per expert of each MoE layer (for metrics.jsonl)."""
        record = dict(model.after_optimizer_step(stats, step) or {})
        loads = [stats[k].tolist() for k in sorted(stats, key=_layer_order) if k.endswith(".tokens_per_expert")]
        if loads:
            record["moe_tokens_per_expert"] = loads
        return record

    def evaluate(self, model: nn.Module, device: torch.device, autocast: torch.dtype | None) -> dict:
        """Validation loss, perplexity and bits per byte."""
        return evaluate_lm(model, self.data, self.cfg.batch_size, self.cfg.eval_batches, device, autocast)


def model_tokenizer(cfg: TrainConfig, model: nn.Module):
    """The tokenizer of the model the run starts from (zoo.tokenizer.load_tokenizer of --model), checked to
    give no id beyond the model's vocabulary."""
    from zoo.tokenizer import check_vocab, load_tokenizer

    tokenizer = load_tokenizer(cfg.model, force_download=cfg.force_download)
    check_vocab(model.config.vocab_size, tokenizer, f"--model {cfg.model}")
    return tokenizer


def data_settings(cfg: TrainConfig, train_blocks: int, val_blocks: int) -> dict:
    """load_token_data's keywords from the run's data settings; a streamed corpus is read up to the tokens of
    `train_blocks` train and `val_blocks` validation blocks (one epoch: a streamed run never repeats data)."""
    settings = {"text_column": cfg.text_column, "val_split": cfg.val_split or "interleaved",
                "data_config": cfg.data_config, "split": cfg.split, "streaming": cfg.streaming}
    if cfg.streaming:
        settings["max_tokens"] = tokens_needed(train_blocks, cfg.seq_len, cfg.val_fraction, settings["val_split"],
                                               val_blocks=max(1, val_blocks))
    return settings


def _layer_order(key: str) -> tuple:
    """Sort "blocks.10.mlp.x" after "blocks.9.mlp.x"."""
    return tuple(int(part) if part.isdigit() else part for part in key.split("."))


@dataclass(frozen=True)
class Family:
    """Everything the trainer needs from a model family."""

    task: type | str  # the Task class, or "module:Name"
    fsdp_units: str = "blocks"  # attribute holding the submodules FSDP shards one by one ("" for none)

    def make_task(self, cfg: TrainConfig, model: nn.Module):
        """The family's task for `model`."""
        task = self.task
        if isinstance(task, str):
            import importlib

            module, name = task.split(":")
            task = getattr(importlib.import_module(module), name)
        return task(cfg, model)

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        """The submodules to shard before the whole model."""
        return list(getattr(model, self.fsdp_units, [])) if self.fsdp_units else []


FAMILIES = Registry("training family (model_type)", {
    "zoo_lm": Family(LMTask),
    "zoo_sae": Family("train.sae_task:SAETask", fsdp_units=""),
})


def family_of(model: nn.Module) -> Family:
    """The family record of `model`, by its config's model_type."""
    return FAMILIES[model.config.model_type]


def make_task(cfg: TrainConfig, model: nn.Module):
    """The task that trains `model`, chosen by its config's model_type."""
    return family_of(model).make_task(cfg, model)
