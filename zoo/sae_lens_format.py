"""Export to and import from the SAELens on-disk format, so a zoo SAE opens in SAELens and back.

A SAELens (>= 6) SAE folder holds `cfg.json` and `sae_weights.safetensors` with the tensors
W_enc (d_in, d_sae), b_enc (d_sae), W_dec (d_sae, d_in), b_dec (d_in) and, for "jumprelu",
threshold (d_sae). `cfg.json` names the inference `architecture` and the keys d_in, d_sae,
dtype, device, apply_b_dec_to_input, normalize_activations, reshape_activations, metadata
(model_name, hook_name, context_size, ...) plus, for "topk", k and rescale_acts_by_decoder_norm.

Each SAE kind names its architecture (`sae_lens_architecture`) and writes its extra keys and tensors
(`sae_lens_export`): relu is "standard"; topk and hierarchical_topk (at one budget k) are "topk";
batchtopk and matryoshka (their inference threshold) are "jumprelu". A kind without one is refused.

Our input scale (`act_scale`) is folded into the weights on export (SAELens then reads raw
activations, normalize_activations "none"); the zoo config travels in metadata["zoo_config"], so
importing an exported folder restores the whole config (kind, k range, prefixes, scale...; a plain topk
SAE takes the budget it was exported at, the kind's `sae_lens_import` says). Importing another
SAELens SAE folds its decoder row norms into the encoder wherever that leaves the outputs unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models.sae import SAE, SAE_KINDS, SAEConfig

CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"
# The zoo kind that stands for an SAE of each SAELens architecture that the zoo did not export.
IMPORTED_KINDS = {"standard": "relu", "topk": "topk", "jumprelu": "batchtopk"}
# Fields that import_sae_lens reads from the folder itself rather than from the zoo config it carries.
FROM_FOLDER = ("kind", "d_in", "d_sae", "normalize_decoder", "source_model", "hook_point", "context_size")
FORMAT_VERSION = "6.0.0"  # the SAELens cfg.json layout written here (architecture + metadata), SAELens >= 6


@torch.no_grad()
def export_sae_lens(sae: SAE, folder: str | Path, k: int | None = None) -> Path:
    """Write `sae` as a SAELens folder (cfg.json + sae_weights.safetensors); k picks a HierarchicalTopK budget."""
    c = sae.config
    s = sae.scale
    architecture = sae.kind.sae_lens_architecture
    if architecture is None:
        raise ValueError(f"the SAE kind {c.kind!r} has no SAELens architecture to export to")
    extra_cfg, extra_tensors = sae.kind.sae_lens_export(sae, k)
    # encode: ((s x - b) W_enc + b_enc) = (x - b/s)(s W_enc) + b_enc;  decode: (z W + b)/s = z (W/s) + b/s
    tensors = {"W_enc": sae.W_enc * s, "b_enc": sae.b_enc.clone(), "W_dec": sae.decoder_weight() / s,
               "b_dec": sae.b_dec / s, **extra_tensors}
    cfg = {"architecture": architecture, "d_in": c.d_in, "d_sae": c.d_sae, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           **extra_cfg}
    cfg["metadata"] = {"sae_lens_version": FORMAT_VERSION, "sae_lens_training_version": None,
                       "model_name": c.source_model, "hook_name": c.hook_point, "hook_head_index": None,
                       "context_size": c.context_size, "prepend_bos": False,
                       "zoo_config": c.to_dict() | {"model_type": c.model_type}}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({name: t.detach().float().contiguous().cpu() for name, t in tensors.items()}, folder / WEIGHTS_FILE)
    (folder / CFG_FILE).write_text(json.dumps(cfg, indent=2, default=str))
    return folder


def _uniform(norms: torch.Tensor) -> bool:
    return bool(torch.allclose(norms, norms.mean().expand_as(norms), rtol=1e-4))


@torch.no_grad()
def import_sae_lens(folder: str | Path) -> SAE:
    """Read a SAELens folder (architecture standard, topk or jumprelu) as a zoo SAE with the same outputs."""
    folder = Path(folder)
    cfg = json.loads((folder / CFG_FILE).read_text())
    w = load_file(folder / WEIGHTS_FILE)
    architecture = cfg.get("architecture", "standard")
    if architecture not in IMPORTED_KINDS:
        raise ValueError(f"{folder / CFG_FILE}: architecture {architecture!r} cannot be imported; "
                         f"supported: {', '.join(map(repr, IMPORTED_KINDS))}")
    for key, ok in (("normalize_activations", "none"), ("reshape_activations", "none")):
        if cfg.get(key, "none") != ok:
            raise ValueError(f"{folder / CFG_FILE}: {key} = {cfg[key]!r} is not supported; fold it into the "
                             f"weights in SAELens first (only {ok!r} imports)")
    w_enc, b_enc, w_dec, b_dec = (w[n].float() for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    threshold = w["threshold"].float().clamp_min(0) if architecture == "jumprelu" else None  # ReLU below 0 anyway
    if not cfg.get("apply_b_dec_to_input", True):  # x W + b_enc = (x - b_dec) W + (b_enc + b_dec W)
        b_enc = b_enc + b_dec @ w_enc
    meta = cfg.get("metadata") or {}
    zoo = dict(meta.get("zoo_config") or {})
    fields = {}
    if zoo:  # written by export_sae_lens: undo the scale folded in, which restores the weights exactly
        scale = zoo.get("act_scale") or 1.0
        w_enc, w_dec, b_dec = w_enc / scale, w_dec * scale, b_dec * scale
        kind, normalize = zoo["kind"], zoo["normalize_decoder"]
        names = set(SAEConfig.__annotations__) - set(FROM_FOLDER)  # the fields SAEConfig declares
        fields = SAE_KINDS[kind]().sae_lens_import({f: zoo[f] for f in names if f in zoo}, cfg)
    else:
        kind = IMPORTED_KINDS[architecture]
        norms = w_dec.norm(dim=1)
        # Latent i contributes z_i d_i = (z_i |d_i|)(d_i / |d_i|): scaling a latent by |d_i| > 0 keeps ReLU and
        # threshold decisions, and keeps top-k ones when every |d_i| is equal or SAELens ranked by z_i |d_i|.
        normalize = architecture == "jumprelu" or (architecture == "topk" and (
            cfg.get("rescale_acts_by_decoder_norm", False) or _uniform(norms)))
        if normalize:
            w_enc, b_enc, w_dec = w_enc * norms, b_enc * norms, w_dec / norms[:, None]
            threshold = threshold * norms if threshold is not None else None
        if architecture == "topk":
            fields["k"] = int(cfg["k"])
    fields.setdefault("k", min(32, int(cfg["d_sae"])))  # a JumpReLU SAE has no k: BatchTopK's training budget
    config = SAEConfig(**fields, kind=kind, d_in=int(cfg["d_in"]), d_sae=int(cfg["d_sae"]),
                       normalize_decoder=normalize, source_model=meta.get("model_name"),
                       hook_point=meta.get("hook_name") or "blocks.0",
                       context_size=int(meta.get("context_size") or 256))
    sae = SAE(config)
    for name, value in (("W_enc", w_enc), ("b_enc", b_enc), ("W_dec", w_dec), ("b_dec", b_dec)):
        getattr(sae, name).copy_(value)
    if threshold is not None:
        sae.threshold.copy_(threshold)
    return sae.eval()
