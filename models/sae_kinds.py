"""The kinds of sparse autoencoder: each is one class in the `SAE_KINDS` registry.

| kind (class) | latents (training) | latents (inference, k=None) | main loss | SAELens |
|---|---|---|---|---|
| relu (ReLU) | ReLU | ReLU | MSE; aux "l1" = l1_coeff * sum_i z_i ||d_i|| | standard |
| topk (TopK) | top k per row | top k per row | MSE; aux "auxk" on dead latents (Gao et al. 2024) | topk |
| batchtopk (BatchTopK) | top k*rows of the batch | pre > learned threshold | MSE; aux "auxk" | jumprelu |
| hierarchical_topk (HierarchicalTopK) | top k per row, sorted | top k per row | prefix MSEs, j in [k_min, k] | topk |
| matryoshka (Matryoshka) | BatchTopK | pre > learned threshold | mean of each prefix's MSE alone | jumprelu |

A kind owns everything that makes it that kind: its selection of the code (`select`, in training and
at inference, with the budget override k), its loss and aux losses (`loss`, `forward`), the checks of
the config fields only it reads (`validate`), the default of `normalize_decoder`, its SAELens
architecture (`sae_lens_architecture`, `sae_lens_export`), where it is evaluated (`eval_budgets`), its
share of the per-step update (`step_stats`, `after_optimizer_step`) and its one-line `description`.
Kinds hold no state: the SAE module (`models.sae.SAE`) holds the weights and buffers and passes
itself in. Adding a kind is one subclass and one line:

    class Toy(TopK):
        description = "..."
    SAE_KINDS.register("toy", Toy)     # then SAEConfig(kind="toy") builds it
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from layers.registry import Registry
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
)

if TYPE_CHECKING:
    from models.sae import SAE, SAEConfig

HIER_LOSSES = ("log_area", "mean")


def check_field(ok: bool, name: str, value, allowed: str) -> None:
    """A ValueError naming config field `name`, its `value` and what is `allowed`, unless `ok`."""
    if not ok:
        raise ValueError(f"config field {name!r} = {value!r} is invalid: {allowed}")


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Squared error summed over features, averaged over rows."""
    return (x - x_hat).square().sum(-1).mean()


@torch.no_grad()
def top_values(pre: torch.Tensor, n: int) -> torch.Tensor:
    """The n largest entries of (rows, latents) `pre` (all of them if it has fewer), in no order.

    Exact, in two stages like `batch_topk_code`: each row's 4 * ceil(n / rows) largest, then the n largest
    of those; if some row had all its candidates picked it might own more, and one top-k over all decides.
    """
    rows, latents = pre.shape
    n = min(n, pre.numel())
    if n == 0:
        return pre.new_zeros(0)
    per_row = min(latents, 4 * -(-n // rows))
    if per_row < latents:
        candidates = pre.topk(per_row, dim=1, sorted=False).values  # (rows, per_row)
        picked = candidates.flatten().topk(n, sorted=False).values
        if not bool((candidates.min(dim=1).values >= picked.min()).any()):
            return picked
    return pre.flatten().topk(n, sorted=False).values


def at_least(pre: torch.Tensor, threshold: torch.Tensor) -> SparseCode:
    """Every pre-activation >= the 0-d `threshold` (ties at the threshold are all kept)."""
    return threshold_code(pre, torch.nextafter(threshold, threshold.new_tensor(float("-inf"))))


@dataclass
class Reconstruction:
    """A kind's forward on scaled rows: x_hat (rows, d_in) in scaled units, the main loss, weighted aux
    losses, 0-d metrics to log and the step statistics (models/base.py)."""

    x_hat: torch.Tensor
    loss: torch.Tensor
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


class SAEKind:
    """One kind of SAE. The defaults: a sparse code (the kind's `select`) of the encoder's pre-activations,
    decoded by the whole dictionary, MSE loss, AuxK on the dead latents; evaluated at its own budget."""

    description: ClassVar[str] = ""  # one line, for `zoo info` / `zoo list` style listings
    normalize_decoder: ClassVar[bool] = True  # the default of config.normalize_decoder
    sae_lens_architecture: ClassVar[str | None] = None  # the SAELens architecture it exports to; None: none
    # Its own options, given as config.kind_kwargs: name -> (check(value) -> bool, what is allowed).
    OPTIONS: ClassVar[dict] = {}

    # ---- config ---------------------------------------------------------------------------------
    def validate(self, config: SAEConfig) -> None:
        """Check the config fields that only this kind reads (a ValueError naming the field)."""

    def check_options(self, options: dict) -> None:
        """A ValueError naming the first unknown or invalid entry of config.kind_kwargs."""
        check_field(isinstance(options, dict), "kind_kwargs", options, "must be a dict of the kind's options")
        for name, value in options.items():
            check_field(name in self.OPTIONS, "kind_kwargs", options,
                        f"{name!r} is not an option of {type(self).__name__}; known: {sorted(self.OPTIONS)}")
            ok, allowed = self.OPTIONS[name]
            check_field(ok(value), f"kind_kwargs.{name}", value, allowed)

    def option(self, config: SAEConfig, name: str, default):
        """The value of the kind's option `name` in config.kind_kwargs."""
        return config.kind_kwargs.get(name, default)

    def active_latents(self, config: SAEConfig) -> int:
        """Latents decoded per token at the configured budget (for cost())."""
        return config.k

    def eval_budgets(self, config: SAEConfig) -> list[dict]:
        """Where `zoo eval` measures it: a list of reconstruct() keyword sets ({} = its own budget)."""
        return [{}]

    def batch_selection_size(self, config: SAEConfig, rows: int) -> int | None:
        """How many entries its training selection keeps over a batch of `rows` rows, when it selects over the
        whole batch (then a caller with a larger global batch passes `batch_threshold`); None: per row."""
        return None

    # ---- the code -------------------------------------------------------------------------------
    def select(self, sae: SAE, pre: torch.Tensor, k: int | None = None,
               batch_threshold: torch.Tensor | None = None) -> SparseCode:
        """The support of the code of (rows, d_sae) pre-activations (no grad), by mode and budget k."""
        raise NotImplementedError(f"{type(self).__name__} must define select()")

    # ---- training -------------------------------------------------------------------------------
    def forward(self, sae: SAE, x_scaled: torch.Tensor, k: int | None = None,
                batch_threshold: torch.Tensor | None = None) -> Reconstruction:
        """Reconstruct scaled rows (rows, d_in): select on pre-activations without autograd, make the selected
        ones differentiable, decode, take `loss` and (in training) AuxK. Changes no state."""
        x_in = x_scaled - sae.b_dec
        with torch.no_grad():
            pre = sae.pre_activations(x_scaled)  # (rows, d_sae): ranks every latent, no autograd graph
        code = self.select(sae, pre, k, batch_threshold)
        code = code.with_values(gather_linear(x_in, sae.W_enc, sae.b_enc, code).relu())
        w_dec = sae.decoder_weight()
        x_hat, loss = self.loss(sae, x_scaled, code, w_dec)
        aux = {}
        if sae.training and sae.config.auxk_coeff > 0:
            aux["auxk"] = sae.config.auxk_coeff * auxk_loss(sae, x_in, pre, x_scaled - x_hat.detach(), w_dec)
        return Reconstruction(x_hat, loss, aux, {"l0": code.l0().detach()}, self.step_stats(sae, code, k))

    def loss(self, sae: SAE, x_scaled: torch.Tensor, code: SparseCode,
             w_dec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_hat (rows, d_in) of the code and the main loss (MSE by default)."""
        x_hat = sparse_decode(code, w_dec) + sae.b_dec
        return x_hat, mse(x_scaled, x_hat)

    def step_stats(self, sae: SAE, code: SparseCode, k: int | None) -> dict[str, torch.Tensor]:
        """What the per-step update needs from this forward: per-latent fire counts and the row count."""
        return {"fire_counts": code.fire_counts(),
                "rows": torch.tensor(code.num_rows, dtype=torch.long, device=code.values.device)}

    def after_optimizer_step(self, sae: SAE, stats: dict[str, torch.Tensor]) -> dict[str, float]:
        """The kind's own update once per optimizer step, from the global `stats`; returns metrics."""
        return {}

    # ---- SAELens --------------------------------------------------------------------------------
    def sae_lens_export(self, sae: SAE, k: int | None) -> tuple[dict, dict[str, torch.Tensor]]:
        """The extra cfg.json keys and tensors of its SAELens architecture (k: the budget to export at)."""
        return {}, {}

    def sae_lens_import(self, fields: dict, cfg: dict) -> dict:
        """The config fields of a folder it exported (`fields` from the zoo config, `cfg` its cfg.json)."""
        return fields


def auxk_loss(sae: SAE, x_in: torch.Tensor, pre: torch.Tensor, residual: torch.Tensor,
              w_dec: torch.Tensor) -> torch.Tensor:
    """AuxK: the top dead latents reconstruct the residual the live ones left (Gao et al. 2024, A.2)."""
    dead = sae.tokens_since_fired >= sae.config.dead_tokens
    if not bool(dead.any()):
        return residual.new_zeros(())
    code = masked_topk_code(pre, dead, sae.config.auxk_k or sae.config.d_in // 2)
    code = code.with_values(gather_linear(x_in, sae.W_enc, sae.b_enc, code).relu())
    return mse(residual, sparse_decode(code, w_dec))


class ReLU(SAEKind):
    """ReLU latents trained densely with a decoder-norm-weighted L1 penalty; decoder rows free (norm 0.1 at init)."""

    description = "ReLU latents, decoder-norm-weighted L1 penalty"
    normalize_decoder = False
    sae_lens_architecture = "standard"

    def validate(self, config: SAEConfig) -> None:
        """l1_coeff >= 0."""
        check_field(config.l1_coeff >= 0, "l1_coeff", config.l1_coeff, "must be >= 0")

    def active_latents(self, config: SAEConfig) -> int:
        """ReLU decodes densely: every latent."""
        return config.d_sae

    def select(self, sae, pre, k=None, batch_threshold=None) -> SparseCode:
        """The positive pre-activations; with k, the k largest of them per row."""
        return threshold_code(pre, 0.0) if k is None else topk_code(pre.relu(), k)

    def forward(self, sae, x_scaled, k=None, batch_threshold=None) -> Reconstruction:
        """Dense: z = relu(pre) (rows, d_sae); MSE and the L1 penalty z_i ||d_i||. k plays no part in training."""
        z = sae.pre_activations(x_scaled).relu()
        x_hat = z @ sae.W_dec + sae.b_dec
        l1 = (z * sae.W_dec.norm(dim=1)).sum(-1).mean()
        fired = (z > 0).detach()
        stats = {"fire_counts": fired.sum(0),
                 "rows": torch.tensor(z.shape[0], dtype=torch.long, device=z.device)}
        return Reconstruction(x_hat, mse(x_scaled, x_hat), {"l1": sae.config.l1_coeff * l1},
                              {"l0": fired.sum(-1).float().mean()}, stats)


class TopK(SAEKind):
    """The k largest latents of every row (Gao et al. 2024), AuxK on the dead latents."""

    description = "k largest latents per token, AuxK on dead latents"
    sae_lens_architecture = "topk"
    sorted: ClassVar[bool] = False  # order each row's entries by decreasing value (nested prefixes)

    def select(self, sae, pre, k=None, batch_threshold=None) -> SparseCode:
        """The k (default config.k) largest pre-activations of every row."""
        return topk_code(pre, k or sae.config.k, sorted=self.sorted)

    def sae_lens_export(self, sae, k):
        """SAELens "topk" at budget k (default config.k); the decoder rows are unit norm already."""
        return {"k": k or sae.config.k, "rescale_acts_by_decoder_norm": False}, {}

    def sae_lens_import(self, fields, cfg):
        """The budget it was exported at."""
        return {**fields, "k": int(cfg["k"])}


class HierarchicalTopK(TopK):
    """One SAE for every budget j in [k_min, k]: each row's top-k sorted, every top-j prefix trained."""

    description = "one SAE trained for every budget in [k_min, k]: nested top-j prefixes"
    sorted = True

    def validate(self, config: SAEConfig) -> None:
        """k_min <= k, hier_loss one of HIER_LOSSES."""
        check_field(config.k_min <= config.k, "k_min", config.k_min, f"must be <= k={config.k}")
        check_field(config.hier_loss in HIER_LOSSES, "hier_loss", config.hier_loss, f"one of {HIER_LOSSES}")

    def eval_budgets(self, config: SAEConfig) -> list[dict]:
        """Every power of two in [k_min, k], and k."""
        ks = sorted({2**i for i in range(config.k.bit_length()) if config.k_min <= 2**i <= config.k} | {config.k})
        return [{"k": k} for k in ks]

    def loss(self, sae, x_scaled, code, w_dec):
        """x_hat at budget k, and the errors of the top-j prefixes, j in [k_min, k], combined by hier_loss."""
        rows = code.num_rows
        k = code.values.numel() // max(rows, 1)  # = min(k, d_sae)
        first = min(sae.config.k_min, k) - 1
        budgets = torch.zeros(k, device=x_scaled.device)
        if sae.config.hier_loss == "mean":
            budgets[first:] = 1 / (k - first)  # the mean over the budgets j = k_min .. k
            combine = prefix_loss
        else:  # log_area: weights 1/j on j = k_min .. k, summing to 1
            budgets[first:] = 1 / torch.arange(first + 1, k + 1, device=x_scaled.device, dtype=budgets.dtype)
            budgets /= budgets.sum()
            combine = log_area_loss
        loss = combine(x_scaled - sae.b_dec, code.values.view(rows, k), code.cols.view(rows, k), w_dec, budgets)
        return sparse_decode(code, w_dec) + sae.b_dec, loss

    def sae_lens_import(self, fields, cfg):
        """Its whole budget range (SAELens read it at one budget)."""
        return fields


class BatchTopK(SAEKind):
    """Training keeps the k * rows largest pre-activations of the batch (k per row on average); inference keeps
    those above a threshold learned during training (an EMA of the smallest value kept)."""

    description = "k * batch largest latents per batch in training, a learned threshold at inference"
    sae_lens_architecture = "jumprelu"

    def validate(self, config: SAEConfig) -> None:
        """threshold_momentum in (0, 1]."""
        check_field(0 < config.threshold_momentum <= 1, "threshold_momentum", config.threshold_momentum,
                    "must be in (0, 1]")

    def batch_selection_size(self, config, rows):
        """k entries per row of the batch."""
        return config.k * rows

    def select(self, sae, pre, k=None, batch_threshold=None) -> SparseCode:
        """Training: pre >= batch_threshold, by default the (k * rows)-th largest value of these rows. Inference:
        pre > the learned threshold (BatchTopK over the rows while none is learned). k: the top k per row.

        Ties: every entry equal to the threshold is kept, so values tied exactly at the (k * rows)-th place
        give a few more than k * rows entries; a threshold from the global batch keeps the same entries
        whichever micro-batch or rank holds them, which is what makes accumulation and DDP exact.
        """
        if k is not None:
            return topk_code(pre, k)
        if sae.training:
            if batch_threshold is None:
                batch_threshold = top_values(pre, self.batch_selection_size(sae.config, pre.shape[0])).min()
            return at_least(pre, batch_threshold.to(pre))
        if not bool((sae.threshold > 0).any()):  # no threshold estimated yet
            return batch_topk_code(pre, sae.config.k)
        return threshold_code(pre, sae.threshold)

    def step_stats(self, sae, code, k):
        """Also "threshold_min", the smallest positive value the training selection kept (inf if none)."""
        stats = super().step_stats(sae, code, k)
        if sae.training and k is None:
            values = code.values.detach()
            positive = torch.cat([values.masked_fill(values <= 0, float("inf")), values.new_full((1,), float("inf"))])
            stats["threshold_min"] = positive.min()
        return stats

    def after_optimizer_step(self, sae, stats):
        """The threshold EMA towards the global smallest kept value; it starts at the first step's value."""
        smallest = stats.get("threshold_min")
        if smallest is None or not bool(torch.isfinite(smallest)):
            return {}
        smallest = smallest.to(sae.threshold)
        if bool((sae.threshold == 0).all()):
            sae.threshold.fill_(smallest)
        else:
            sae.threshold.lerp_(smallest.expand_as(sae.threshold), sae.config.threshold_momentum)
        return {}

    def sae_lens_export(self, sae, k):
        """SAELens "jumprelu" with the learned threshold (refused while there is none)."""
        if not bool((sae.threshold > 0).any()):
            raise ValueError(f"the {sae.config.kind} SAE has no inference threshold yet (train it first): SAELens "
                             f"would read it as a JumpReLU SAE with threshold 0")
        return {}, {"threshold": sae.threshold.clone()}


class Matryoshka(BatchTopK):
    """Nested dictionary prefixes (matryoshka_widths), each trained to reconstruct alone, with BatchTopK."""

    description = "nested dictionary prefixes, each trained to reconstruct alone, with BatchTopK"

    def validate(self, config: SAEConfig) -> None:
        """BatchTopK's fields, and matryoshka_widths: increasing positive sizes ending at d_sae."""
        super().validate(config)
        w = config.matryoshka_widths
        check_field(len(w) >= 1 and all(isinstance(v, int) and v >= 1 for v in w), "matryoshka_widths", w,
                    "a non-empty list of positive prefix sizes")
        check_field(all(a < b for a, b in zip(w, w[1:], strict=False)), "matryoshka_widths", w, "must increase")
        check_field(w[-1] == config.d_sae, "matryoshka_widths", w, f"must end at d_sae={config.d_sae}")

    def eval_budgets(self, config: SAEConfig) -> list[dict]:
        """Every prefix."""
        return [{"width": w} for w in config.matryoshka_widths]

    def loss(self, sae, x_scaled, code, w_dec):
        """x_hat of the whole dictionary, and the mean over prefixes of the error of decoding with it alone."""
        x_hat, losses, start = sae.b_dec.expand_as(x_scaled), [], 0
        for width in sae.config.matryoshka_widths:
            part = code.select((code.cols >= start) & (code.cols < width))
            x_hat = x_hat + sparse_decode(part, w_dec)
            losses.append(mse(x_scaled, x_hat))
            start = width
        return x_hat, torch.stack(losses).mean()


SAE_KINDS = Registry("SAE kind")
SAE_KINDS.register("relu", ReLU)
SAE_KINDS.register("topk", TopK)
SAE_KINDS.register("batchtopk", BatchTopK)
SAE_KINDS.register("hierarchical_topk", HierarchicalTopK)
SAE_KINDS.register("matryoshka", Matryoshka)


def kind_descriptions() -> dict[str, str]:
    """name -> one-line description of every registered SAE kind (those a test or plugin added included)."""
    return {name: kind.description for name, kind in sorted(SAE_KINDS.items())}
