"""The sparse-autoencoder family: ONE SAE module whose `kind` picks the sparsity and the loss.

| kind | latents (training) | latents (inference, k=None) | main loss |
|---|---|---|---|
| relu | ReLU | ReLU | MSE; aux "l1" = l1_coeff * sum_i z_i ||d_i|| (decoder-norm-weighted L1) |
| topk | top k per row | top k per row | MSE; aux "auxk" on dead latents (Gao et al. 2024) |
| batchtopk | top k*rows of the batch | pre > learned threshold | MSE; aux "auxk" |
| hierarchical_topk | top k per row, sorted | top k per row | the top-j prefix MSEs, j in [k_min, k], by `hier_loss` |
| matryoshka | BatchTopK | pre > learned threshold | mean over prefixes of the MSE of decoding with that prefix alone |

Every SAE reads raw activations x (..., d_in): `encode` multiplies them by `config.act_scale` (chosen
so that the training activations have unit mean squared norm), `decode` divides by it again, so
the scaling is invisible outside. `encode(x, k=...)` changes the budget at inference. Weights
follow SAELens's layout (W_enc (d_in, d_sae), W_dec (d_sae, d_in), b_enc, b_dec), which makes
`zoo.sae_lens_format` a renaming. Except for relu, decoder rows are unit norm: decoding divides
W_dec by its row norms, so the gradient has no component along the rows, and every training
forward first renormalises W_dec in place, so the norms the optimizer moved are reset each step.

Dead latents: every training forward counts the tokens since each latent last fired; a latent silent
for `dead_tokens` tokens is dead. AuxK (`auxk_coeff`, not for relu) trains the dead latents to
reconstruct what the live ones missed; resampling (`resample_every` steps, any kind; the trainer calls
`resample_dead`) points them at inputs the SAE reconstructs badly.
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

from layers.sparse_activations import (
    SparseCode,
    batch_topk_code,
    gather_linear,
    log_area_loss,
    masked_topk_code,
    prefix_loss,
    sparse_decode,
    threshold_code,
    topk_code,
    topk_dense,
)
from models.base import ZooPreTrainedModel

KINDS = {
    "relu": "ReLU latents, decoder-norm-weighted L1 penalty",
    "topk": "k largest latents per token, AuxK on dead latents",
    "batchtopk": "k * batch largest latents per batch in training, a learned threshold at inference",
    "hierarchical_topk": "one SAE trained for every budget in [k_min, k]: nested top-j prefixes",
    "matryoshka": "nested dictionary prefixes, each trained to reconstruct alone, with BatchTopK",
}
THRESHOLD_KINDS = ("batchtopk", "matryoshka")
HIER_LOSSES = ("log_area", "mean")
RELU_DECODER_INIT_NORM = 0.1  # decoder row norm at init for relu SAEs (Anthropic's April 2024 update)
RESAMPLE_CHUNK_ROWS = 4096  # rows reconstructed at once when resample_dead measures errors


def _check(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"config field {name!r} = {value!r} is invalid: {allowed}")


@strict
class SAEConfig(PreTrainedConfig):
    """Config of a sparse autoencoder: its kind, sizes, sparsity, losses and the LM layer it reads."""

    model_type = "zoo_sae"
    # Fields that checkpoints written before they existed lack, with the value that reproduces those checkpoints.
    FIELDS_ADDED_LATER = {"hier_loss": "mean", "resample_every": 0}

    kind: str = "topk"
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
    normalize_decoder: bool | None = None  # unit-norm decoder rows; None: all kinds but relu
    act_scale: float | None = None  # input scale to unit mean squared norm; None: not estimated yet (1.0)
    source_model: str | None = None  # the LM whose activations the SAE reads (catalog name, folder, Hub id)
    hook_point: str = "blocks.2"  # module path in the source LM; "NAME" its output, "NAME:input" its input
    context_size: int = 256  # tokens per sequence when the activations were harvested
    zoo_name: str | None = None  # the catalog entry this config came from, if any

    def __post_init__(self, **kwargs):
        if self.normalize_decoder is None:
            self.normalize_decoder = self.kind != "relu"
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Checks every field; the error names the field, the value and what is allowed."""
        _check(self.kind in KINDS, "kind", self.kind, f"known kinds: {sorted(KINDS)}")
        for name in ("d_in", "d_sae", "k", "k_min", "dead_tokens", "context_size", "resample_every"):
            value, least = getattr(self, name), 0 if name == "resample_every" else 1  # resample_every 0: never
            _check(isinstance(value, int) and not isinstance(value, bool), name, value, "must be an integer")
            _check(value >= least, name, value, f"must be >= {least}")
        _check(self.k <= self.d_sae, "k", self.k, f"must be <= d_sae={self.d_sae}")
        _check(self.k_min <= self.k, "k_min", self.k_min, f"must be <= k={self.k}")
        _check(self.hier_loss in HIER_LOSSES, "hier_loss", self.hier_loss, f"one of {HIER_LOSSES}")
        if self.auxk_k is not None:
            _check(self.auxk_k >= 1, "auxk_k", self.auxk_k, "must be >= 1 or null (d_in // 2)")
        for name in ("l1_coeff", "auxk_coeff"):
            _check(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")
        _check(0 < self.threshold_momentum <= 1, "threshold_momentum", self.threshold_momentum, "must be in (0, 1]")
        if self.act_scale is not None:
            _check(self.act_scale > 0, "act_scale", self.act_scale, "must be > 0 or null")
        _check(isinstance(self.hook_point, str) and bool(self.hook_point), "hook_point", self.hook_point,
               "a module path of the source LM, e.g. 'blocks.2' (its output) or 'blocks.2:input'")
        if self.kind == "matryoshka":
            w = self.matryoshka_widths
            _check(len(w) >= 1 and all(isinstance(v, int) and v >= 1 for v in w), "matryoshka_widths", w,
                   "a non-empty list of positive prefix sizes")
            _check(all(a < b for a, b in zip(w, w[1:], strict=False)), "matryoshka_widths", w, "must increase")
            _check(w[-1] == self.d_sae, "matryoshka_widths", w, f"must end at d_sae={self.d_sae}")


@dataclass
class SAEOutput(ModelOutput):
    """Reconstruction x_hat (..., d_in), the main loss, weighted aux losses, mean L0 and per-latent fire counts."""

    x_hat: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] | None = None
    l0: torch.Tensor | None = None
    fire_counts: torch.Tensor | None = None


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Squared error summed over features, averaged over rows."""
    return (x - x_hat).square().sum(-1).mean()


class SAE(ZooPreTrainedModel):
    """Sparse autoencoder over (..., d_in) activations; `config.kind` picks sparsity and loss (see module doc)."""

    config_class = SAEConfig
    base_model_prefix = "sae"
    main_input_name = "x"

    def __init__(self, config: SAEConfig):
        super().__init__(config)
        c = config
        self.W_enc = nn.Parameter(torch.empty(c.d_in, c.d_sae))
        self.b_enc = nn.Parameter(torch.empty(c.d_sae))
        self.W_dec = nn.Parameter(torch.empty(c.d_sae, c.d_in))
        self.b_dec = nn.Parameter(torch.empty(c.d_in))
        # Training tokens since each latent last fired (dead-latent tracking), and the inference threshold
        # of the BatchTopK kinds. Both are checkpointed, so a resumed run continues exactly.
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

    def pre_activations(self, x_scaled: torch.Tensor) -> torch.Tensor:
        """(rows, d_sae) encoder pre-activations of scaled inputs, with the decoder bias subtracted first."""
        return (x_scaled - self.b_dec) @ self.W_enc + self.b_enc

    def select(self, pre: torch.Tensor, k: int | None = None) -> SparseCode:
        """The support of the code for (rows, d_sae) pre-activations, by kind, mode and budget k."""
        kind = self.config.kind
        if k is not None:
            return topk_code(pre, k, sorted=kind == "hierarchical_topk")
        if kind in ("topk", "hierarchical_topk"):
            return topk_code(pre, self.config.k, sorted=kind == "hierarchical_topk")
        if kind in THRESHOLD_KINDS:
            if self.training or not bool((self.threshold > 0).any()):  # no threshold estimated yet
                return batch_topk_code(pre, self.config.k)
            return threshold_code(pre, self.threshold)
        return threshold_code(pre, 0.0)  # relu

    def encode(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Dense latents (..., d_sae) of raw activations x (..., d_in); k overrides the budget (top k per token)."""
        self._check_input(x, k)
        lead = x.shape[:-1]
        x_scaled = x.reshape(-1, self.config.d_in).float() * self.scale
        pre = self.pre_activations(x_scaled)
        if self.config.kind == "relu":
            z = pre.relu()
            z = topk_dense(z, k) if k is not None else z
        else:
            code = self.select(pre.detach(), k)
            z = code.with_values(pre[code.rows, code.cols].relu()).to_dense()
        return z.reshape(*lead, self.config.d_sae)

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
        x_scaled = x.reshape(-1, self.config.d_in).float() * self.scale
        pre = self.pre_activations(x_scaled)
        if self.config.kind == "relu":
            code = threshold_code(pre, 0.0) if k is None else topk_code(pre.relu(), k)
        else:
            code = self.select(pre, k)
        code = code.with_values(code.values.relu())
        if width is not None:
            code = code.select(code.cols < width)
        return (sparse_decode(code, self.decoder_weight()) + self.b_dec) / self.scale, code

    # ---- training forward -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor, k: int | None = None) -> SAEOutput:
        """Reconstruct raw activations x (..., d_in); returns x_hat, the main loss and the weighted aux losses.

        In training mode it also renormalises the decoder, counts tokens since each latent fired and
        updates the BatchTopK threshold.
        """
        self._check_input(x, k)
        if self.training and self.config.normalize_decoder:
            with torch.no_grad():
                self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))
        lead = x.shape[:-1]
        device_type = x.device.type
        with torch.autocast(device_type, enabled=False):  # SAEs train in fp32 (sparse kernels, small losses)
            x_scaled = x.reshape(-1, self.config.d_in).float() * self.scale  # (rows, d_in)
            if self.config.kind == "relu":
                x_hat, loss, aux, l0, fired = self._relu_forward(x_scaled)
            else:
                x_hat, loss, aux, l0, fired = self._sparse_forward(x_scaled, k)
        if self.training:
            self._track_dead_latents(fired, rows=x_scaled.shape[0])
        x_hat = (x_hat / self.scale).reshape(*lead, self.config.d_in)
        return SAEOutput(x_hat=x_hat, loss=loss, aux_losses=aux, l0=l0, fire_counts=fired)

    def _relu_forward(self, x_scaled: torch.Tensor):
        z = self.pre_activations(x_scaled).relu()  # (rows, d_sae), dense
        x_hat = z @ self.W_dec + self.b_dec
        l1 = (z * self.W_dec.norm(dim=1)).sum(-1).mean()
        fired = (z > 0).sum(0)
        return x_hat, mse(x_scaled, x_hat), {"l1": self.config.l1_coeff * l1}, (z > 0).sum(-1).float().mean(), fired

    def _sparse_forward(self, x_scaled: torch.Tensor, k: int | None):
        c = self.config
        x_in = x_scaled - self.b_dec
        with torch.no_grad():
            pre = x_in @ self.W_enc + self.b_enc  # (rows, d_sae): ranks every latent, no autograd graph
        code = self.select(pre, k)
        code = code.with_values(gather_linear(x_in, self.W_enc, self.b_enc, code).relu())
        w_dec = self.decoder_weight()
        if c.kind == "hierarchical_topk":
            x_hat, loss = self._hierarchical(x_scaled, code, w_dec)
        elif c.kind == "matryoshka":
            x_hat, loss = self._matryoshka(x_scaled, code, w_dec)
        else:
            x_hat = sparse_decode(code, w_dec) + self.b_dec
            loss = mse(x_scaled, x_hat)
        aux = {}
        if self.training and c.auxk_coeff > 0:
            aux["auxk"] = c.auxk_coeff * self._auxk(x_in, pre, x_scaled - x_hat.detach(), w_dec)
        if self.training and c.kind in THRESHOLD_KINDS and k is None:
            self._update_threshold(code.values.detach())
        return x_hat, loss, aux, code.l0(), code.fire_counts()

    def _hierarchical(self, x_scaled, code: SparseCode, w_dec):
        """x_hat at budget k, and the errors of the top-j prefixes, j in [k_min, k], combined by hier_loss."""
        rows = code.num_rows
        k = code.values.numel() // max(rows, 1)  # = min(k, d_sae)
        first = min(self.config.k_min, k) - 1
        budgets = torch.zeros(k, device=x_scaled.device)
        if self.config.hier_loss == "mean":
            budgets[first:] = 1 / (k - first)  # the mean over the budgets j = k_min .. k
            combine = prefix_loss
        else:  # log_area: weights 1/j on j = k_min .. k, summing to 1
            budgets[first:] = 1 / torch.arange(first + 1, k + 1, device=x_scaled.device, dtype=budgets.dtype)
            budgets /= budgets.sum()
            combine = log_area_loss
        loss = combine(x_scaled - self.b_dec, code.values.view(rows, k), code.cols.view(rows, k), w_dec, budgets)
        return sparse_decode(code, w_dec) + self.b_dec, loss

    def _matryoshka(self, x_scaled, code: SparseCode, w_dec):
        """x_hat of the whole dictionary, and the mean over prefixes of the error of decoding with it alone."""
        x_hat, losses, start = self.b_dec.expand_as(x_scaled), [], 0
        for width in self.config.matryoshka_widths:
            part = code.select((code.cols >= start) & (code.cols < width))
            x_hat = x_hat + sparse_decode(part, w_dec)
            losses.append(mse(x_scaled, x_hat))
            start = width
        return x_hat, torch.stack(losses).mean()

    def _auxk(self, x_in, pre, residual, w_dec) -> torch.Tensor:
        """AuxK: the top dead latents reconstruct the residual the live ones left (Gao et al. 2024, A.2)."""
        dead = self.tokens_since_fired >= self.config.dead_tokens
        if not bool(dead.any()):
            return residual.new_zeros(())
        code = masked_topk_code(pre, dead, self.config.auxk_k or self.config.d_in // 2)
        code = code.with_values(gather_linear(x_in, self.W_enc, self.b_enc, code).relu())
        return mse(residual, sparse_decode(code, w_dec))

    @torch.no_grad()
    def _update_threshold(self, values: torch.Tensor) -> None:
        """EMA of the smallest positive value BatchTopK kept; starts at the first batch's value."""
        positive = values[values > 0]
        if positive.numel() == 0:
            return
        smallest = positive.min()
        if bool((self.threshold == 0).all()):
            self.threshold.fill_(smallest)
        else:
            self.threshold.lerp_(smallest.expand_as(self.threshold), self.config.threshold_momentum)

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
    def _track_dead_latents(self, fire_counts: torch.Tensor, rows: int) -> None:
        self.tokens_since_fired.add_(rows)
        self.tokens_since_fired.masked_fill_(fire_counts > 0, 0)

    # ---- bookkeeping ----------------------------------------------------------------------------
    def dead_fraction(self) -> float:
        """Fraction of latents that have not fired for dead_tokens training tokens."""
        return float((self.tokens_since_fired >= self.config.dead_tokens).float().mean())

    def cost(self, seq_len: int | None = None) -> dict[str, float]:
        """total_params, active_params and forward flops_per_token at the current k (seq_len does not matter)."""
        c = self.config
        total = sum(p.numel() for p in self.parameters())
        active_latents = c.d_sae if c.kind == "relu" else c.k  # ReLU decodes densely
        # The encoder is dense (every pre-activation is needed to rank the latents); the decoder reads
        # only the rows of the active latents.
        active = c.d_in * c.d_sae + c.d_sae + active_latents * c.d_in + c.d_in
        flops = 2 * c.d_in * c.d_sae + 2 * active_latents * c.d_in
        return {"total_params": total, "active_params": active, "flops_per_token": flops,
                "seq_len": seq_len or c.context_size}


# `import models.sae` (and so `import zoo`) makes AutoConfig / AutoModel read SAE checkpoint folders.
AutoConfig.register(SAEConfig.model_type, SAEConfig, exist_ok=True)
AutoModel.register(SAEConfig, SAE, exist_ok=True)
