"""The trainer's task for sparse autoencoders: reconstruct activations harvested from the source LM.

`zoo train sae-topk-tiny` builds the SAE, then `SAETask` loads its `source_model`, harvests the
activations at its `hook_point` over the corpus into an on-disk store (cached in
`$ZOO_CACHE/activations`, so runs with the same LM, layer, corpus and sizes share it), records the
scale that gives them unit mean squared norm in the SAE's config (`act_scale`), and serves
batches of `batch_size * seq_len` activations whose order is a pure function of (seed, step).
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
from torch import nn

from train.activations import ActivationStore, cached_harvest, load_source_lm
from train.config import TrainConfig
from train.data import load_token_data
from train.sae_eval import ce_metrics, reconstruction_metrics
from train.tasks import StepLoss, data_settings

HARVEST_BATCH = 16  # sequences per LM forward while harvesting
CE_EVAL_BATCHES = 2  # validation batches of sequences for the loss-recovered metrics during training
EVAL_ROWS = 4096  # activations per SAE batch during evaluation
B_DEC_INIT_ROWS = 65536  # activations whose mean starts a fresh SAE's decoder bias


class SAEData:
    """The source LM, the token corpus and the activation stores of one SAE setting (LM, layer, corpus)."""

    def __init__(self, source: str | None, hook_point: str, data: list[str] | None, seq_len: int,
                 val_fraction: float = 0.05, seed: int = 0, device: str | torch.device | None = None,
                 **data_options):
        if not source:
            raise ValueError("the SAE has no source_model: pass --set source_model=FOLDER (an LM checkpoint, "
                             "e.g. runs/lm-dense-tiny/final after `zoo train lm-dense-tiny`)")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.source, self.hook_point, self.seed = source, hook_point, seed
        self.lm, tokenizer, lm_identity = load_source_lm(source, seed=seed, device=self.device)
        self.lm.requires_grad_(False)
        self.tokenizer = tokenizer
        # data_options: load_token_data's keywords (val_split, text_column, Hub config / split, streaming...)
        self.data = load_token_data(data, seq_len=seq_len, val_fraction=val_fraction, tokenizer=tokenizer,
                                    **data_options)
        self.seq_len = seq_len
        # The corpus file names the tokens (source, tokenizer, column, split); val_split which blocks are held out.
        self.identity = {"source": lm_identity, "corpus": self.data.cache_path.name if self.data.cache_path else None,
                         "seq_len": seq_len, "val_fraction": val_fraction, "val_split": self.data.val_split}

    def train_store(self, rows: int, dtype: str = "float16") -> ActivationStore:
        """`rows` activations of the train split (at most one pass over it; batches cycle over the store)."""
        rows = min(rows, self.data.num_train_blocks * self.seq_len)

        def blocks():
            for i in itertools.count():
                yield self.data.train_batch(i, HARVEST_BATCH, seed=self.seed)[:, :-1]

        return cached_harvest(self.lm, self.hook_point, {**self.identity, "split": "train"}, blocks, rows,
                              dtype=dtype, seed=self.seed)

    def val_store(self, rows: int = 0) -> ActivationStore:
        """The activations of the first validation blocks (`rows` of them; 0: the whole split), in float32."""
        available = self.data.num_val_blocks * self.seq_len
        rows = min(rows, available) if rows else available
        blocks = lambda: (b[:, :-1] for b in self.data.val_batches(HARVEST_BATCH))  # noqa: E731
        return cached_harvest(self.lm, self.hook_point, {**self.identity, "split": "val"}, blocks, rows,
                              dtype="float32", seed=self.seed)

    def val_token_batches(self, batch_size: int, max_batches: int = 0) -> list[torch.Tensor]:
        """The first `max_batches` (0: all) validation batches of (batch, seq_len + 1) token blocks."""
        batches = self.data.val_batches(batch_size)
        return list(itertools.islice(batches, max_batches) if max_batches else batches)


@torch.no_grad()
def global_batch_threshold(model: nn.Module, step_batch: torch.Tensor, micro_rows: int) -> torch.Tensor | None:
    """The training-selection threshold of this step's global batch, or None where none is needed.

    A kind that keeps the n = k * global_rows largest pre-activations of the batch (BatchTopK, Matryoshka)
    would keep other entries if it selected in each micro-batch or on each rank alone. The threshold is the
    n-th largest pre-activation of the global batch: this rank ranks its step_batch (rows, d_in) in the
    micro-batches of `micro_rows` rows the trainer makes of it (the same matmul shapes as the micro-batch
    forwards, so the same floats) and keeps its n largest; under DDP the ranks gather theirs (every rank
    holds as many rows). Every micro-batch then keeps pre >= threshold: ties at it are all kept, on every
    rank alike. None, and the forward ranks its own rows (the same thing), for one process without
    micro-batches or a kind that selects per row. `model` may be a DDP wrapper: it is only called.
    """
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    global_rows = step_batch.numel() // step_batch.shape[-1] * world
    n = getattr(model, "module", model).batch_selection_size(global_rows)
    if n is None or (world == 1 and micro_rows == len(step_batch)):
        return None
    candidates = torch.cat([model(chunk, top_values=n).top_values for chunk in step_batch.split(micro_rows)])
    candidates = candidates.topk(min(n, candidates.numel()), sorted=False).values  # this rank's n largest
    if world > 1:  # every rank sends n values (padded with -inf) and ranks the same n * world
        padded = candidates.new_full((n,), float("-inf"))
        padded[:candidates.numel()] = candidates
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded)
        candidates = torch.cat(gathered).topk(n, sorted=False).values
    return candidates.min()


class SAETask:
    """Reconstruction of harvested LM activations: batches of batch_size * seq_len activation vectors."""

    unit = "activations"
    # The activation store is sized by --steps: a different --steps on resume would change the batches.
    fixed_on_resume = ("steps",)

    def __init__(self, cfg: TrainConfig, model: nn.Module):
        c = model.config
        self.cfg = cfg
        self.items_per_step = cfg.batch_size * cfg.seq_len
        val_rows = cfg.eval_batches * cfg.batch_size * cfg.seq_len
        blocks = -(-cfg.steps * self.items_per_step // cfg.seq_len)  # the train blocks the store is harvested from
        val_blocks = max(val_rows // cfg.seq_len, CE_EVAL_BATCHES * cfg.batch_size)
        self.sae_data = SAEData(c.source_model, c.hook_point, cfg.data, cfg.seq_len, cfg.val_fraction,
                                seed=cfg.seed, device=cfg.device, **data_settings(cfg, blocks, val_blocks))
        self.tokenizer = self.sae_data.tokenizer  # written into the SAE's checkpoints: the tokens it was trained on
        self._threshold_cache: tuple | None = None  # (step_batch, weight versions, threshold): _step_threshold
        self.train = self.sae_data.train_store(cfg.steps * self.items_per_step)
        self.val = self.sae_data.val_store(val_rows)
        if self.train.d != c.d_in:
            raise ValueError(f"the activations at hook_point {c.hook_point!r} of {c.source_model!r} have "
                             f"{self.train.d} dimensions but the SAE's d_in is {c.d_in}; "
                             f"pass --set d_in={self.train.d}")
        if cfg.fsdp and c.resample_every:
            raise ValueError("resample_every rewrites whole rows of the SAE's weights, which --fsdp shards; "
                             "train without --fsdp (DDP keeps whole weights) or --set resample_every=0")
        c.context_size = cfg.seq_len
        if c.act_scale is None:  # fine-tuning keeps the scale the SAE was trained with
            c.act_scale = self.train.act_scale
            # A fresh SAE starts from the data (SAE.start_from_data): its decoder bias at the mean of the first
            # rows, its encoder at the scale that reconstructs them best (a resumed run loads its own weights over
            # this; fine-tuning keeps the trained ones).
            model.start_from_data(self.train.slice(0, min(self.train.rows, B_DEC_INIT_ROWS)).to(model.b_dec.device))
        self.flops_per_item = model.cost()["flops_per_token"]
        corpus = ", ".join(cfg.data) if cfg.data else "the bundled Jargon File 4.4.7 (public domain)"
        self.description = (f"{self.train.rows:,} activations of {c.source_model} at {c.hook_point} "
                            f"on {corpus} (seq_len {cfg.seq_len})")

    def batch(self, step: int, rank: int, world: int) -> torch.Tensor:
        """This rank's rows of global batch `step`: (batch_size * seq_len / world, d_in) float32 activations."""
        return self.train.batch(step, self.items_per_step, seed=self.cfg.seed, rank=rank, world=world)

    def loss(self, model: nn.Module, micro_batch: torch.Tensor, step_batch: torch.Tensor | None = None) -> StepLoss:
        """The reconstruction loss of one micro-batch, the SAE's weighted aux losses, its L0 and step statistics.

        A kind that selects over the batch (BatchTopK, Matryoshka) selects over the whole global batch of the
        step (`step_batch` on every rank; default: the micro-batch is the step): see global_batch_threshold.
        """
        step_batch = micro_batch if step_batch is None else step_batch
        out = model(micro_batch, batch_threshold=self._step_threshold(model, step_batch, len(micro_batch)))
        return StepLoss(out.loss, dict(out.aux_losses or {}), dict(out.metrics or {}), dict(out.step_stats or {}))

    def _step_threshold(self, model: nn.Module, step_batch: torch.Tensor, micro_rows: int) -> torch.Tensor | None:
        """global_batch_threshold, once per step: cached for the step_batch tensor and the weights' versions."""
        sae = getattr(model, "module", model)
        versions = tuple(p._version for p in (sae.W_enc, sae.b_enc, sae.b_dec))
        cached = self._threshold_cache
        if cached is not None and cached[0] is step_batch and cached[1] == versions:
            return cached[2]
        threshold = global_batch_threshold(model, step_batch, micro_rows)
        self._threshold_cache = (step_batch, versions, threshold)
        return threshold

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, stats: dict, step: int) -> dict:
        """After optimizer step `step` (1-based): the SAE's per-step update from the global `stats` (decoder
        renormalisation, dead-latent counts, threshold), then, every resample_every steps, resampling.

        Not in the last resample_every steps of the run: a resampled latent fires on about half of the
        inputs until training makes it selective, so it needs those steps. The dead-latent counts come from
        the global statistics, so they are the same on every rank; the rows come from the whole global
        batch of that step and the draw from (seed, step), and rank 0's new rows are broadcast, so all
        ranks make the same change.
        """
        metrics = model.after_optimizer_step(stats, step)
        every = model.config.resample_every
        if not every or step % every or step > self.cfg.steps - every:
            return metrics
        dead = model.tokens_since_fired >= model.config.dead_tokens
        x = self.train.batch(step - 1, self.items_per_step, seed=self.cfg.seed).to(model.W_dec.device)
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        resampled = model.resample_dead(x, optimizer, generator, dead)
        if resampled and dist.is_available() and dist.is_initialized():
            for param in (model.W_enc, model.b_enc, model.W_dec):  # rank 0's draw, bit for bit, on every rank
                dist.broadcast(param.data, src=0)
        return {**metrics, "resampled": resampled}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device, autocast: torch.dtype | None) -> dict:
        """Validation reconstruction loss, FVU, L0, dead/dense fractions and loss recovered."""
        sae = getattr(model, "module", model)
        was_training = sae.training
        sae.eval()
        loss_sum = sum(float(sae(x.to(device)).loss) * len(x) for x in self.val.batches(EVAL_ROWS))
        rec = reconstruction_metrics(sae, self.val.batches(EVAL_ROWS))
        tokens = self.sae_data.val_token_batches(self.cfg.batch_size, CE_EVAL_BATCHES)
        ce = ce_metrics(self.sae_data.lm, sae, sae.config.hook_point, tokens)
        sae.train(was_training)
        return {"val_loss": loss_sum / self.val.rows, "val_fvu": rec["fvu"], "val_l0": rec["l0"],
                "val_dead_frac": rec["dead_frac"], "val_dense_frac": rec["dense_frac"],
                "dead_frac": sae.dead_fraction(), "val_ce_loss_recovered": ce["ce_loss_recovered"],
                "val_ce_sae": ce["ce_sae"], "val_ce_clean": ce["ce_clean"]}
