"""The common training loop: one process or many (torchrun), resumable, logged, and published at the end.

Read top to bottom: `Trainer.__init__` sets up (distributed, data, model, optimizer, resume),
`Trainer.run` loops over optimizer steps, `Trainer.step` is one step, the rest is bookkeeping.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from torch import nn
from tqdm import tqdm

from models.base import merge_step_stats, stat_reduction
from train.checkpoint import (
    CheckpointWriteError,
    NonFiniteWeightsError,
    clean_stale_temp,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    saved_train_settings,
    write_error,
)
from train.config import LEGACY_VALUES, TrainConfig, check_resume_changes, resume_changes
from train.mfu import measure_matmul_flops, mfu
from train.run_folder import LOG_FILE, RunFolderLocked, RunLock, truncate_log
from train.tasks import family_of
from zoo.tokenizer import save_tokenizer


def _say(message: str) -> None:
    """A status line on stderr that does not break the progress bar."""
    tqdm.write(message, file=sys.stderr)


class TrainingDiverged(RuntimeError):
    """The loss, the gradient norm or the weights became NaN or infinite; nothing non-finite was applied or saved."""


def setup_distributed(device: str | None) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); joins the torchrun process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return rank, world, dev


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices, none on norms, biases and embeddings."""
    no_decay_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and id(p) not in no_decay_ids else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine decay to cfg.min_lr_ratio at cfg.steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


@contextlib.contextmanager
def flushing_subnormals(device: torch.device):
    """On CPU, subnormal floats flushed to zero inside the block, the process's setting restored after.

    Subnormals cost x86 CPUs tens of cycles per operation: the tiny LMs' runs at lr 1e-2 (peaked softmaxes) took
    1.5-2.5x the CPU time of other rates until they were flushed (BENCHMARKS.md, the sparsity frontier)."""
    if device.type != "cpu":
        yield
        return
    was_on = float(torch.tensor([1e-39]) * 1.0) == 0.0  # a subnormal reads as zero: flushing is on already
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(was_on)


class Trainer:
    """Trains one zoo model by the settings of a TrainConfig."""

    def __init__(self, cfg: TrainConfig):
        from zoo import load  # zoo sits below train in the import order

        self.cfg = cfg
        self.rank, self.world, self.device = setup_distributed(cfg.device)
        self.is_main = self.rank == 0
        self.run_dir = cfg.run_dir
        if cfg.batch_size % self.world:
            raise ValueError(f"--batch-size {cfg.batch_size} does not divide across {self.world} ranks")
        if (cfg.batch_size // self.world) % cfg.grad_accum:
            raise ValueError(f"the per-rank batch {cfg.batch_size // self.world} does not divide into "
                             f"--grad-accum {cfg.grad_accum} micro-batches")
        if cfg.val_split is None:  # a new run holds out interleaved blocks; a resumed one keeps its split
            cfg.val_split = resumed_val_split(cfg.resume)
        torch.manual_seed(cfg.seed)  # fresh weights are a function of the seed, the same on every rank
        self.model = load(cfg.model, force_download=cfg.force_download, **cfg.model_overrides)
        self.family = family_of(self.model)  # all the trainer knows of the model's family
        self.task = self.family.make_task(cfg, self.model)  # batches, loss, step hook and evaluation
        self.model.to(self.device).train()
        self.fsdp = self.world > 1 and cfg.fsdp
        self.step_done = 0
        self.last_checkpoint: Path | None = None
        self.metrics: dict = {}
        self.started = False  # the loop has begun: signals save a checkpoint from then on
        self.tokens_done = 0  # training items (tokens) seen, across resumes with other batch sizes
        self.changes: list[dict] = []  # settings changed on resume, with --allow-change or freely (history)
        self.resume_note: dict | None = None  # this resume's changes, for metrics.jsonl
        self.lock = self._lock_run_folder()  # before anything in the folder is read or written
        try:
            self._set_up(cfg)
        except BaseException:
            self.close()
            raise

    def _set_up(self, cfg: TrainConfig) -> None:
        """Resume point, sharding, optimizer, scheduler, restored state, DDP / compile wrappers."""
        if self.is_main:
            clean_stale_temp(self.run_dir)  # what crashed saves of earlier runs left (SIGKILL, full disk)
        resume_from = self._find_resume_point(Path(cfg.resume)) if cfg.resume else None
        if resume_from:
            self._compare_settings(resume_from)
        if self.fsdp:
            # fully_shard replaces the parameters by shards: restore whole weights before sharding,
            # and build the optimizer on the shards after.
            if resume_from:
                self._restore(resume_from, with_optimizer=False)
            from torch.distributed.fsdp import fully_shard

            for unit in self.family.shard_units(self.model):
                fully_shard(unit)
            fully_shard(self.model)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr,
                                           betas=cfg.betas, fused=self.device.type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        if resume_from:
            settings = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
            if not self.fsdp:
                self._restore(resume_from, with_optimizer=True)
            else:
                self.scheduler.load_state_dict(torch.load(resume_from / "scheduler.pt", weights_only=True))
            self._apply_settings(settings)
        self.train_model = self.model
        if self.world > 1 and not self.fsdp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)
        self.autocast = torch.bfloat16 if self.device.type == "cuda" else None
        self.stop_requested: int = 0  # the number of the signal that asked to stop

    def close(self) -> None:
        """Release the run folder (also done at the end of `run` and when the Trainer is dropped)."""
        if self.lock is not None:
            self.lock.release()

    # ---- setup -------------------------------------------------------------------------------
    def _lock_run_folder(self) -> RunLock | None:
        """Rank 0 locks the run folder for the life of the run; every rank learns whether it could."""
        lock, error = None, None
        if self.is_main:
            try:
                lock = RunLock(self.run_dir)
            except RunFolderLocked as err:
                error = err
        if self._max_over_ranks(int(error is not None)):
            raise error or RunFolderLocked(f"rank 0 could not lock the run folder {self.run_dir}; its error says why")
        return lock

    def _find_resume_point(self, run_dir: Path) -> Path | None:
        path = latest_checkpoint(run_dir)
        if path is None and self.is_main:
            _say(f"--resume {run_dir}: no valid checkpoint there; starting from step 0")
            truncate_log(self.run_dir, 0)  # the steps logged by the run that saved nothing start again
        return path

    def _compare_settings(self, path: Path) -> None:
        """Refuse a resume whose settings or model config differ from the checkpoint's in a way that breaks
        exactness, unless --allow-change names the field; note every change that is applied."""
        state = json.loads((path / "state.json").read_text())
        saved, step = state.get("config") or {}, state["step"]
        config = self.model.config
        fields = {f.name for f in dataclasses.fields(type(config)) if f.name in type(config).__annotations__}
        model_now = {name: getattr(config, name) for name in fields - {"zoo_name"}}
        changes = resume_changes(saved.get("train") or {}, self.cfg, saved.get("model") or {}, model_now)
        check_resume_changes(changes, self.cfg, path, fields, fixed=getattr(self.task, "fixed_on_resume", ()))
        self.changes = list(saved.get("changes") or [])  # the history up to this checkpoint
        if changes:
            note = {name: {"old": old, "new": new} for name, (old, new) in changes.items()}
            self.changes.append({"step": step, "checkpoint": path.name, "changed": note})
            self.resume_note = {"resumed_at_step": step, "checkpoint": str(path), "changed": note}
            if self.is_main:
                _say(f"resuming from step {step} with changed settings: "
                     + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
                     + (f" (the cosine schedule now ends at step {self.cfg.steps})" if "steps" in changes else ""))

    def _apply_settings(self, settings: list[dict]) -> None:
        """After a restore: this run's optimizer settings (the restored state holds the checkpoint's) and the
        learning rate of the next step by this run's schedule. Unchanged settings give the restored values."""
        for group, setting in zip(self.optimizer.param_groups, settings, strict=True):
            group.update(setting)
        self.scheduler.base_lrs = [group["initial_lr"] for group in self.optimizer.param_groups]
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = base * lr_factor(self.scheduler.last_epoch, self.cfg)  # as LambdaLR computes it
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _restore(self, path: Path, with_optimizer: bool) -> None:
        state = load_checkpoint(path, model=self.model, optimizer=self.optimizer if with_optimizer else None,
                                scheduler=self.scheduler if with_optimizer else None, map_location=self.device)
        self.step_done = state.step
        self.metrics = dict(state.metrics)
        self.last_checkpoint = path
        self.tokens_done = state.data_state.get("tokens")
        if self.tokens_done is None:  # written before tokens were counted: by the settings it was trained with
            train = state.config.get("train") or {}
            per_step = train.get("batch_size", self.cfg.batch_size) * train.get("seq_len", self.cfg.seq_len)
            self.tokens_done = state.step * per_step
        if self.is_main:
            truncate_log(self.run_dir, state.step)
            _say(f"resumed from {path} (step {state.step})"
                 + ("" if with_optimizer else "; under --fsdp the AdamW moments start afresh"))

    # ---- the loop ----------------------------------------------------------------------------
    def run(self) -> dict:
        """Train to cfg.steps, evaluating, checkpointing and logging on the way; returns the summary.

        Ctrl-C or SIGTERM (what Slurm and Kubernetes send before a kill) finishes the step, saves a
        checkpoint and returns {"interrupted": True, "signal": number}; a second one stops at once.
        """
        try:
            with flushing_subnormals(self.device):
                return self._run()
        finally:
            self.close()

    def _run(self) -> dict:
        cfg = self.cfg
        if self.is_main:
            settings = {**cfg.to_dict(), **({"changes_on_resume": self.changes} if self.changes else {})}
            (self.run_dir / "train_config.json").write_text(json.dumps(settings, indent=2))
        self.wandb = self._start_wandb() if cfg.wandb_project and self.is_main else None
        if self.resume_note:
            self._log(self.resume_note)
        peak = measure_matmul_flops(self.device) if self.is_main else 0.0
        handled = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
        previous = {signum: signal.signal(signum, self._on_signal) for signum in handled}
        bar = tqdm(total=cfg.steps, initial=self.step_done, disable=not self.is_main, dynamic_ncols=True,
                   desc=Path(cfg.model).name, unit="step")
        tokens_per_step = self.task.items_per_step
        start_step, start_time = self.step_done, time.perf_counter()
        self.started = True
        try:
            while self.step_done < cfg.steps:
                record = self.step()
                self.step_done += 1
                self.tokens_done += tokens_per_step
                elapsed = time.perf_counter() - start_time
                record["tokens_per_s"] = (self.step_done - start_step) * tokens_per_step / elapsed
                if self.step_done % cfg.eval_every == 0 or self.step_done == cfg.steps:
                    record.update(self.evaluate())
                self.metrics.update(record)
                self._log(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                **({"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {}))
                bar.update(1)
                if self.step_done % cfg.checkpoint_every == 0 or self.step_done == cfg.steps:
                    self.checkpoint()
                if signum := self._stop_signal():
                    if self.last_checkpoint is None or not self.last_checkpoint.name.endswith(f"{self.step_done:06d}"):
                        self.checkpoint()
                    if self.is_main:
                        _say(f"{_signal_name(signum)}: saved {self.last_checkpoint}; exiting with code "
                             f"{128 + signum}; continue with --resume {self.run_dir}")
                    return {"interrupted": True, "signal": signum, "step": self.step_done,
                            "checkpoint": str(self.last_checkpoint)}
        finally:
            bar.close()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        elapsed = time.perf_counter() - start_time
        tokens_per_s = (self.step_done - start_step) * tokens_per_step / max(elapsed, 1e-9)
        if self.is_main:  # measured again at the end: one 0.5 s window can fall on a busy moment
            peak = max(peak, measure_matmul_flops(self.device))
        summary = {**self.metrics, "steps": self.step_done, "tokens": self.tokens_done,
                   "tokens_per_s": tokens_per_s, "seconds": elapsed, "world_size": self.world,
                   "device": self._device_name(),
                   "mfu": mfu(tokens_per_s, self.task.flops_per_item, peak) if peak else None,
                   "peak_matmul_flops": peak}
        model = self._unsharded_model()
        if self.is_main:
            summary["final"] = str(self.save_final(model, summary))
            self._log({"summary": summary})
        if self.wandb is not None:
            self.wandb.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float))})
            self.wandb.finish()
        return summary

    def step(self) -> dict:
        """One optimizer step over this rank's share of global batch number self.step_done."""
        cfg = self.cfg
        batch = self.task.batch(self.step_done, self.rank, self.world).to(self.device)
        micro_batches = batch.chunk(cfg.grad_accum)
        totals: dict[str, float] = {}
        stats: dict[str, torch.Tensor] = {}
        for i, micro in enumerate(micro_batches):
            sync = i == len(micro_batches) - 1
            ctx = self.train_model.no_sync() if (not sync and hasattr(self.train_model, "no_sync")) else _null()
            with ctx, torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                out = self.task.loss(self.train_model, micro, batch)
                loss = out.loss + sum(out.aux.values())
            (loss / cfg.grad_accum).backward()
            for name, value in {"loss": out.loss, "total_loss": loss, **out.aux, **out.metrics}.items():
                totals[name] = totals.get(name, 0.0) + value.detach().float().item() / cfg.grad_accum
            merge_step_stats(stats, out.stats)
        totals = self._mean_over_ranks(totals)
        # The global gradient norm (the same on every rank: gradients are reduced by now), clipped unless
        # --grad-clip 0. A non-finite loss or norm stops the run before the update touches the weights.
        norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or float("inf")))
        if not all(math.isfinite(v) for v in totals.values()):
            self._diverged(f"the loss is {totals['total_loss']}")
        if not math.isfinite(norm):
            self._diverged(f"the gradient norm is {norm} (the loss is finite, {totals['total_loss']:.4g})")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # The step hook: once per optimizer step, with the statistics of the whole global batch.
        extra = self.task.after_step(self.model, self.optimizer, self._reduce_over_ranks(stats), self.step_done + 1)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        return {"step": self.step_done + 1, **totals, "grad_norm": norm, "lr": lr, **(extra or {})}

    def _diverged(self, what: str, step: int | None = None):
        """Raise TrainingDiverged at `step` (default: the one being taken), naming the last checkpoint (finite)."""
        if step is None:
            step, done = self.step_done + 1, "the update was not applied"
        else:
            done = "it was not saved"
        where = self.last_checkpoint or "none yet"
        raise TrainingDiverged(f"{what} at step {step}; {done}, and nothing non-finite was saved. Last good "
                               f"checkpoint: {where}. Lower --lr or raise --warmup-steps, then --resume {self.run_dir}")

    def evaluate(self) -> dict:
        """Validation loss and perplexity (every rank computes the same numbers)."""
        return self.task.evaluate(self.train_model, self.device, self.autocast)

    # ---- checkpoints ---------------------------------------------------------------------------
    def checkpoint(self) -> None:
        """Save a resumable checkpoint of the state after self.step_done steps (rank 0 writes)."""
        model = self._unsharded_model()  # collective under FSDP: every rank takes part
        error: BaseException | None = None
        if self.is_main:
            try:
                # Under FSDP the optimizer state is sharded; it is not saved (resume restarts the moments).
                self.last_checkpoint = save_checkpoint(
                    self.run_dir, self.step_done, model=model, optimizer=None if self.fsdp else self.optimizer,
                    scheduler=self.scheduler,
                    data_state={"next_step": self.step_done, "seed": self.cfg.seed, "tokens": self.tokens_done},
                    config={"train": self.cfg.to_dict(), "model": self.model.config.to_dict(),
                            "changes": self.changes},
                    metrics=self.metrics, keep_last=self.cfg.keep_last,
                    tokenizer=getattr(self.task, "tokenizer", None))
            except Exception as err:  # noqa: BLE001 -- every rank must learn of it, then it is raised
                error = err
        # In place of a barrier: every rank learns whether rank 0 saved, so none waits for a rank that died.
        code = 0 if error is None else 2 if isinstance(error, NonFiniteWeightsError) else 1
        code = self._max_over_ranks(code)
        if code == 2:  # the weights went bad after the last finite checkpoint (an update or the step hook)
            self._diverged(f"the weights became non-finite ({error or 'on rank 0'})", step=self.step_done)
        if error is not None:
            raise error
        if code:
            raise CheckpointWriteError(f"rank 0 could not save the checkpoint of step {self.step_done} "
                                       f"in {self.run_dir}; its error says why")

    def save_final(self, model: nn.Module, summary: dict) -> Path:
        """Write the Hub checkpoint (config, safetensors, model card) to RUN/final, atomically."""
        final = self.run_dir / "final"
        tmp = self.run_dir / f".tmp-final-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        training = {
            "data": self.task.description,
            "steps": summary["steps"], "tokens": summary["tokens"],
            "batch_size": self.cfg.batch_size, "seq_len": self.cfg.seq_len, "lr": self.cfg.lr,
            "validation split": f"{self.cfg.val_split} blocks, val_fraction {self.cfg.val_fraction}",
            "hardware": f"{summary['device']} x {self.world}",
            **({"changed on resume": {f"at step {c['step']}": {k: f"{v['old']} -> {v['new']}" for k, v in
                                                               c["changed"].items()} for c in self.changes}}
               if self.changes else {}),
            "final metrics": {k: round(v, 5) for k, v in summary.items()
                              if k in ("loss", "val_loss", "val_ppl", "val_bpb", "tokens_per_s") and v is not None},
        }
        try:
            model.save_pretrained(tmp, training=training)
            if getattr(self.task, "tokenizer", None) is not None:  # the tokenizer the run trained with
                save_tokenizer(self.task.tokenizer, tmp, model_max_length=getattr(model.config, "max_seq_len", None))
            if final.exists():
                old = self.run_dir / f".tmp-old-final-{os.getpid()}"
                final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old)
            else:
                tmp.rename(final)
        except (OSError, RuntimeError, SafetensorError) as err:  # a full disk shows as any of these
            shutil.rmtree(tmp, ignore_errors=True)
            raise write_error(err, self.run_dir, str(final), "the final checkpoint") from err
        return final

    # ---- logging -------------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        if not self.is_main:
            return
        with open(self.run_dir / LOG_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float))}  # lists stay in the file
        if "step" in record and (record["step"] % self.cfg.log_every == 0 or "val_loss" in record):
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in scalars.items()))
        if self.wandb is not None and "step" in record:
            self.wandb.log(scalars, step=record["step"])

    def _start_wandb(self):
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        id_file = self.run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        return wandb.init(project=self.cfg.wandb_project, dir=str(self.run_dir), id=run_id, resume="allow",
                          mode=mode, config={"train": self.cfg.to_dict(), "model": self.model.config.to_dict()})

    def _device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return f"cpu ({torch.get_num_threads()} threads)"

    # ---- distributed helpers -------------------------------------------------------------------
    def _mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        if self.world == 1:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: v / self.world for k, v in zip(values, t.tolist(), strict=False)}

    def _reduce_over_ranks(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Step statistics summed (or min / max reduced, by name) over the ranks."""
        if self.world == 1:
            return stats
        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        for name in sorted(stats):  # the same order on every rank
            dist.all_reduce(stats[name], op=ops[stat_reduction(name)])
        return stats

    def _max_over_ranks(self, value: int) -> int:
        """The largest of the ranks' values (a collective: every rank calls it at the same point)."""
        if self.world == 1:
            return value
        t = torch.tensor([float(value)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def _unsharded_model(self) -> nn.Module:
        """The model with whole weights: itself, or under FSDP a copy built from the gathered weights."""
        if not self.fsdp:
            return self.model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        copy = type(self.model)(self.model.config)
        if self.is_main:
            copy.load_state_dict(full)
        return copy

    def _on_signal(self, signum, frame) -> None:
        """Ctrl-C / SIGTERM: stop after this step with a checkpoint; a second one stops at once."""
        name = _signal_name(signum)
        if self.stop_requested:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            _say(f"a second {name}: stopping now without saving (the last checkpoint is "
                 f"{self.last_checkpoint or 'none'})")
            raise SystemExit(128 + signum)
        self.stop_requested = signum
        if self.is_main:
            _say(f"{name}: finishing this step, saving a checkpoint and exiting with code {128 + signum} "
                 f"({name} again to stop at once)")

    def _stop_signal(self) -> int:
        """The signal that asked this run to stop (on any rank), or 0: every rank stops at the same step."""
        return self._max_over_ranks(int(self.stop_requested))


def resumed_val_split(resume: str | None) -> str:
    """The validation split of the run `--resume` continues: the one its newest checkpoint recorded, "tail" for
    a run made before the split was recorded (it held out the contiguous tail); "interleaved" for a new run."""
    saved = saved_train_settings(resume) if resume else None
    if saved is None:
        return "interleaved"
    return saved.get("val_split") or LEGACY_VALUES["val_split"]


def _signal_name(signum: int) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
