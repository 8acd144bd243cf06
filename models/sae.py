"""The sparse-autoencoder family: ONE SAE module; `config.kind` names its kind, a class in
`models.sae_kinds.SAE_KINDS` that owns the selection, the loss, its fields, its SAELens architecture and
its evaluation budgets (the table of kinds is there).

Every SAE reads raw activations x (..., d_in): `encode` multiplies them by `config.act_scale` (chosen
so that the training activations have unit mean squared norm), `decode` divides by it again, so
the scaling is invisible outside. `encode(x, k=...)` changes the budget at inference. Weights
follow SAELens's layout (W_enc (d_in, d_sae), W_dec (d_sae, d_in), b_enc, b_dec), which makes
`zoo.sae_lens_format` a renaming. Where `normalize_decoder` (every kind but relu by default), decoding
divides W_dec by its row norms, so the gradient has no component along the rows.

The forward is pure (models/base.py): it returns the losses, `metrics` ("l0") and `step_stats`
(per-latent fire counts, rows, BatchTopK's smallest kept value), and the trainer calls
`after_optimizer_step` once per optimizer step with their sums over micro-batches and ranks. That
hook renormalises the stored decoder rows the optimizer moved, counts the tokens since each latent
last fired (a latent silent for `dead_tokens` tokens is dead) and moves BatchTopK's inference
threshold. AuxK (`auxk_coeff`, not for relu) trains the dead latents to reconstruct what the live ones
missed; resampling (`resample_every` steps, any kind; the trainer's task calls `resample_dead`) points
them at inputs the SAE reconstructs badly.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig
from transformers import initialization as init
from transformers.utils import ModelOutput

from layers.sparse_activations import SparseCode, sparse_decode
from models.base import ZooPreTrainedModel
from models.sae_kinds import HIER_LOSSES, SAE_KINDS, SAEKind, check_field, kind_descriptions, mse
from models.sae_kinds import top_values as largest_entries  # `top_values` is also forward's keyword
from models.versioning import VersionedConfig

# name -> kind class (each with its `description`); the registry itself, so kinds added later show too.
KINDS = SAE_KINDS
RELU_DECODER_INIT_NORM = 0.1  # decoder row norm at init without normalize_decoder (Anthropic's April 2024 update)
RESAMPLE_CHUNK_ROWS = 4096  # rows reconstructed at once when resample_dead measures errors

__all__ = ["HIER_LOSSES", "KINDS", "SAE", "SAEConfig", "SAEKind", "SAEOutput", "SAE_KINDS", "kind_descriptions",
           "mse"]


def _upgrade_v0(raw: dict) -> dict:
    """Version 0 -> 1: fields added after the first checkpoints get the values those checkpoints trained with."""
    return {"hier_loss": "mean", "resample_every": 0, "kind_kwargs": {}, **raw}


@strict
class SAEConfig(VersionedConfig, PreTrainedConfig):
    """Config of a sparse autoencoder: its kind, sizes, sparsity, losses and the LM layer it reads."""

    model_type = "zoo_sae"
    UPGRADES = (_upgrade_v0,)

    kind: str = "topk"  # a name in SAE_KINDS
    kind_kwargs: dict = field(default_factory=dict)  # options of the kind itself (its OPTIONS), if it has any
    d_in: int = 256
    d_sae: int = 2048
    k: int = 32  # latents per token (topk kinds); the largest budget of hierarchical_topk
    k_min: int = 1  # hierarchical_topk: the smallest budget whose prefix is trained
    # hierarchical_topk: how the prefix MSEs E_j (j = k_min..k) make one loss. "log_area": their geometric
    # mean weighted by 1/j (the area under log E against log j: every budget's relative error counts);
    # "mean": their arithmetic mean (the HierarchicalTopK paper), dominated by the smallest budgets.
    hier_loss: str = "log_area"
    matryoshka_widths: list[int] = field(default_factory=list)  # matryoshka: nested prefix sizes, ending at d_sae
    l1_coeff: float = 0.3  # relu: weight of the decoder-norm-weighted L1 penalty (inputs have unit mean sq. norm)
    auxk_coeff: float = 1 / 32  # weight of the AuxK loss (0 disables it); not for relu
    auxk_k: int | None = None  # dead latents used by AuxK per token; None: d_in // 2
    dead_tokens: int = 10_000_000  # a latent is dead after this many training tokens without firing
    resample_every: int = 0  # every this many training steps, resample the dead latents (0: never)
    threshold_momentum: float = 0.1  # batchtopk / matryoshka: EMA rate of the inference threshold (per step)
    normalize_decoder: bool | None = None  # unit-norm decoder rows; None: the kind's default (all but relu)
    act_scale: float | None = None  # input scale to unit mean squared norm; None: not estimated yet (1.0)
    source_model: str | None = None  # the LM whose activations the SAE reads (catalog name, folder, Hub id)
    hook_point: str = "blocks.2"  # module path in the source LM; "NAME" its output, "NAME:input" its input
    context_size: int = 256  # tokens per sequence when the activations were harvested
    zoo_name: str | None = None  # the catalog entry this config came from, if any
    config_version: int = 1  # the layout of this config (models/versioning.py); older dicts are upgraded

    def __post_init__(self, **kwargs):
        if self.normalize_decoder is None and self.kind in SAE_KINDS:  # an unknown kind: validation names it
            self.normalize_decoder = SAE_KINDS[self.kind].normalize_decoder
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Checks every field; the error names the field, the value and what is allowed."""
        SAE_KINDS.check(self.kind, "kind")
        for name in ("d_in", "d_sae", "k", "k_min", "dead_tokens", "context_size", "resample_every"):
            value, least = getattr(self, name), 0 if name == "resample_every" else 1  # resample_every 0: never
            check_field(isinstance(value, int) and not isinstance(value, bool), name, value, "must be an integer")
            check_field(value >= least, name, value, f"must be >= {least}")
        check_field(self.k <= self.d_sae, "k", self.k, f"must be <= d_sae={self.d_sae}")
        if self.auxk_k is not None:
            check_field(self.auxk_k >= 1, "auxk_k", self.auxk_k, "must be >= 1 or null (d_in // 2)")
        check_field(self.auxk_coeff >= 0, "auxk_coeff", self.auxk_coeff, "must be >= 0")
        if self.act_scale is not None:
            check_field(self.act_scale > 0, "act_scale", self.act_scale, "must be > 0 or null")
        check_field(isinstance(self.hook_point, str) and bool(self.hook_point), "hook_point", self.hook_point,
                    "a module path of the source LM, e.g. 'blocks.2' (its output) or 'blocks.2:input'")
        kind = SAE_KINDS[self.kind]()
        kind.check_options(self.kind_kwargs)  # its own options
        kind.validate(self)  # the fields only the kind reads


@dataclass
class SAEOutput(ModelOutput):
    """Reconstruction x_hat (..., d_in), the main loss, weighted aux losses, 0-d `metrics` to log ("l0") and
    the `step_stats` of this forward for `SAE.after_optimizer_step` (see models/base.py). A forward called
    with `top_values=n` returns only `top_values`."""

    x_hat: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] | None = None
    metrics: dict[str, torch.Tensor] | None = None
    step_stats: dict[str, torch.Tensor] | None = None
    top_values: torch.Tensor | None = None


class SAE(ZooPreTrainedModel):
    """Sparse autoencoder over (..., d_in) activations; `self.kind` (from config.kind) picks sparsity and loss."""

    config_class = SAEConfig
    base_model_prefix = "sae"
    main_input_name = "x"

    def __init__(self, config: SAEConfig):
        super().__init__(config)
        c = config
        self.kind: SAEKind = SAE_KINDS[c.kind]()
        self.W_enc = nn.Parameter(torch.empty(c.d_in, c.d_sae))
        self.b_enc = nn.Parameter(torch.empty(c.d_sae))
        self.W_dec = nn.Parameter(torch.empty(c.d_sae, c.d_in))
        self.b_dec = nn.Parameter(torch.empty(c.d_in))
        # Training tokens since each latent last fired (dead-latent tracking), and the inference threshold
        # of the BatchTopK kinds. Both are checkpointed, so a resumed run continues exactly; only
        # after_optimizer_step (and resample_dead) writes them.
        self.register_buffer("tokens_since_fired", torch.zeros(c.d_sae, dtype=torch.long))
        self.register_buffer("threshold", torch.zeros(c.d_sae))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if module is not self:
            return
        w = torch.randn_like(self.W_dec)
        w = w / w.norm(dim=1, keepdim=True)
        if not self.config.normalize_decoder:
            w = w * RELU_DECODER_INIT_NORM
        init.copy_(self.W_dec, w)
        init.copy_(self.W_enc, w.t())  # encoder initialised as the decoder's transpose
        init.zeros_(self.b_enc)
        init.zeros_(self.b_dec)
        init.zeros_(self.tokens_since_fired)
        init.zeros_(self.threshold)

    # ---- the pieces -----------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        """The input scale: raw activations * scale have unit mean squared norm."""
        return self.config.act_scale or 1.0

    def decoder_weight(self) -> torch.Tensor:
        """(d_sae, d_in) decoder used for decoding: W_dec with unit-norm rows unless normalize_decoder is off."""
        if not self.config.normalize_decoder:
            return self.W_dec
        return self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    def _check_input(self, x: torch.Tensor, k: int | None) -> None:
        """A ValueError for activations of the wrong width or a budget that is not a positive integer."""
        if x.shape[-1:] != (self.config.d_in,):
            raise ValueError(f"the SAE reads activations of width d_in={self.config.d_in} in the last dimension; "
                             f"got a tensor of shape {tuple(x.shape)}")
        if k is not None and (isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1):
            raise ValueError(f"k (the number of latents per token) must be a positive integer or None; got {k!r}")

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, d_in) float32 rows of raw activations x (..., d_in), times the input scale."""
        return x.reshape(-1, self.config.d_in).float() * self.scale

    def pre_activations(self, x_scaled: torch.Tensor) -> torch.Tensor:
        """(rows, d_sae) encoder pre-activations of scaled inputs, with the decoder bias subtracted first."""
        return (x_scaled - self.b_dec) @ self.W_enc + self.b_enc

    def select(self, pre: torch.Tensor, k: int | None = None) -> SparseCode:
        """The support of the code for (rows, d_sae) pre-activations, by kind, mode and budget k."""
        return self.kind.select(self, pre, k)

    def batch_selection_size(self, rows: int) -> int | None:
        """Entries the training selection keeps over `rows` rows when it selects over the batch; None: per row."""
        return self.kind.batch_selection_size(self.config, rows)

    def encode(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Dense latents (..., d_sae) of raw activations x (..., d_in); k overrides the budget (top k per token)."""
        self._check_input(x, k)
        pre = self.pre_activations(self._scaled(x))
        code = self.select(pre.detach(), k)
        z = code.with_values(pre[code.rows, code.cols].relu()).to_dense()
        return z.reshape(*x.shape[:-1], self.config.d_sae)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw-unit reconstruction (..., d_in) of dense latents (..., d_sae)."""
        if latents.shape[-1:] != (self.config.d_sae,):
            raise ValueError(f"decode takes dense latents of width d_sae={self.config.d_sae} in the last dimension; "
                             f"got a tensor of shape {tuple(latents.shape)}")
        return (latents @ self.decoder_weight() + self.b_dec) / self.scale

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, k: int | None = None, width: int | None = None) -> tuple[torch.Tensor,
                                                                                                    SparseCode]:
        """decode(encode(x, k)) through the sparse path, optionally with only the first `width` latents
        (a Matryoshka prefix); returns x_hat (rows, d_in) in raw units and the code it used."""
        self._check_input(x, k)
        code = self.select(self.pre_activations(self._scaled(x)), k)
        code = code.with_values(code.values.relu())
        if width is not None:
            code = code.select(code.cols < width)
        return (sparse_decode(code, self.decoder_weight()) + self.b_dec) / self.scale, code

    # ---- training -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, k: int | None = None, *, batch_threshold: torch.Tensor | None = None,
                top_values: int | None = None) -> SAEOutput:
        """Reconstruct raw activations x (..., d_in): x_hat, the main loss, weighted aux losses, metrics, step_stats.

        Changes no state. `batch_threshold` (0-d): the training selection of a kind that selects over the
        batch (BatchTopK) keeps pre >= it, a threshold computed over a larger (global) batch than x.
        `top_values=n` ranks instead: SAEOutput(top_values=the n largest pre-activations of x), no grad.
        """
        self._check_input(x, k)
        with torch.autocast(x.device.type, enabled=False):  # SAEs train in fp32 (sparse kernels, small losses)
            x_scaled = self._scaled(x)  # (rows, d_in)
            if top_values is not None:
                with torch.no_grad():
                    return SAEOutput(top_values=largest_entries(self.pre_activations(x_scaled), top_values))
            out = self.kind.forward(self, x_scaled, k, batch_threshold)
        x_hat = (out.x_hat / self.scale).reshape(*x.shape[:-1], self.config.d_in)
        return SAEOutput(x_hat=x_hat, loss=out.loss, aux_losses=out.aux, metrics=out.metrics, step_stats=out.stats)

    @torch.no_grad()
    def after_optimizer_step(self, stats: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        """Once per optimizer step, from the step's global `stats`: unit-norm decoder rows (normalize_decoder),
        tokens since each latent fired, the kind's own update (BatchTopK's threshold); returns dead_frac."""
        if self.config.normalize_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))
        if "fire_counts" in stats:
            self.tokens_since_fired.add_(stats["rows"].to(self.tokens_since_fired))
            self.tokens_since_fired.masked_fill_(stats["fire_counts"].to(self.tokens_since_fired.device) > 0, 0)
        return {**self.kind.after_optimizer_step(self, stats), "dead_frac": self.dead_fraction()}

    @torch.no_grad()
    def resample_dead(self, x: torch.Tensor, optimizer: torch.optim.Optimizer | None = None,
                      generator: torch.Generator | None = None, dead: torch.Tensor | None = None) -> int:
        """Give every dead latent a new direction: an input its SAE reconstructs badly (Anthropic, 2023).

        For each dead latent (`dead`, a (d_sae,) bool mask; default: silent for dead_tokens tokens) one row
        of the raw activations x (rows, d_in) is drawn, with probability proportional to the square of its
        reconstruction error. With r = that row, scaled, minus b_dec: the decoder row becomes r / |r|, the
        encoder column r / |r| times 0.2 x the mean encoder-column norm of the live latents, the encoder
        bias 0, and the latent's silent-token count 0. The AdamW moments of those entries are zeroed so
        the old statistics do not push the new weights. Returns how many latents were resampled.
        """
        self._check_input(x, None)
        dead = (self.tokens_since_fired >= self.config.dead_tokens) if dead is None else dead
        ids = dead.nonzero().squeeze(1)
        if ids.numel() == 0:
            return 0
        x = x.reshape(-1, self.config.d_in)
        was_training = self.training
        self.eval()
        try:  # the errors in chunks: a relu code is dense, and x may be a whole global batch
            error = torch.cat([(self.reconstruct(part)[0] - part.float()).double().square().sum(-1)
                               for part in x.split(RESAMPLE_CHUNK_ROWS)])
        finally:
            self.train(was_training)
        if not bool((error > 0).any()):
            error = torch.ones_like(error)
        weights = error.square().cpu()  # float64: squares of large errors stay finite
        rows = torch.multinomial(weights, ids.numel(), replacement=True, generator=generator).to(x.device)
        directions = x[rows].float() * self.scale - self.b_dec
        directions = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-8)
        live = ~dead
        enc_norm = self.W_enc[:, live].norm(dim=0).mean() if bool(live.any()) else self.W_enc.norm(dim=0).mean()
        dec_norm = 1.0 if self.config.normalize_decoder else RELU_DECODER_INIT_NORM
        self.W_dec[ids] = directions * dec_norm
        self.W_enc[:, ids] = (directions * 0.2 * enc_norm).t()
        self.b_enc[ids] = 0
        self.tokens_since_fired[ids] = 0
        if optimizer is not None:
            for param, index in ((self.W_dec, (ids,)), (self.W_enc, (slice(None), ids)), (self.b_enc, (ids,))):
                for moment in optimizer.state.get(param, {}).values():
                    if torch.is_tensor(moment) and moment.shape == param.shape:
                        moment[index] = 0
        return int(ids.numel())

    @torch.no_grad()
    def start_from_data(self, x: torch.Tensor, scale_rows: int = 4096) -> float:
        """The data-dependent start of a fresh SAE from raw activations x (rows, d_in); returns the encoder scale.

        The decoder bias starts at the mean of x (scaled), so the latents code the deviations from it from
        the first step (as sparsify and SAELens do). With normalize_decoder, the encoder (the decoder's
        transpose at init) is then multiplied by the one factor c that reconstructs the first `scale_rows`
        rows best in least squares: c = sum <x - b_dec, y> / sum |y|^2, y the decoding of the unscaled code.
        A positive factor with b_enc = 0 changes no kind's selection, only the code's size; the transposed
        decoder overshoots, since the selected rows all lean towards x and their decodings add up (c = 0.65
        for TopK at k 32 of 8192 latents on 512-wide activations; sparsify's encoder starts at about 0.58 of
        its unit-norm decoder, the norm of PyTorch's default Linear init). Unscaled, the FVU after 51 steps
        was 0.253 against sparsify's 0.225 at the same settings; scaled, 0.225 (issue 18).
        """
        self._check_input(x, None)
        x = x.reshape(-1, self.config.d_in)
        x_scaled = self._scaled(x)
        self.b_dec.copy_(x_scaled.double().mean(0).to(self.b_dec))
        if not self.config.normalize_decoder:
            return 1.0
        part = x_scaled[:scale_rows] - self.b_dec
        code = self.select(self.pre_activations(x_scaled[:scale_rows]))
        y = sparse_decode(code.with_values(code.values.relu()), self.decoder_weight())
        c = float((part * y).sum() / y.square().sum().clamp_min(1e-30))
        if not (0 < c < float("inf")):
            return 1.0
        self.W_enc.mul_(c)
        self.b_enc.mul_(c)
        return c

    # ---- bookkeeping ----------------------------------------------------------------------------
    def dead_fraction(self) -> float:
        """Fraction of latents that have not fired for dead_tokens training tokens."""
        return float((self.tokens_since_fired >= self.config.dead_tokens).float().mean())

    def cost(self, seq_len: int | None = None) -> dict[str, float]:
        """total_params, active_params and forward flops_per_token at the current k (seq_len does not matter)."""
        c = self.config
        total = sum(p.numel() for p in self.parameters())
        active_latents = self.kind.active_latents(c)
        # The encoder is dense (every pre-activation is needed to rank the latents); the decoder reads
        # only the rows of the active latents.
        active = c.d_in * c.d_sae + c.d_sae + active_latents * c.d_in + c.d_in
        flops = 2 * c.d_in * c.d_sae + 2 * active_latents * c.d_in
        return {"total_params": total, "active_params": active, "flops_per_token": flops,
                "seq_len": seq_len or c.context_size}


# `import models.sae` (and so `import zoo`) makes AutoConfig / AutoModel read SAE checkpoint folders.
AutoConfig.register(SAEConfig.model_type, SAEConfig, exist_ok=True)
AutoModel.register(SAEConfig, SAE, exist_ok=True)
