"""Dense-to-structured conversion of a trained LM: `zoo convert CKPT --to monarch --nblocks 4 --layers mlp`.

Each projection in scope is replaced by its nearest structured matrix in Frobenius norm (a closed
form: per-slab rank-1 SVD for Monarch, truncated SVD for low-rank); everything else is copied.
The report gives the relative Frobenius error ||W - W'|| / ||W|| of every converted projection.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from layers.structured import lowrank_project, monarch_project
from zoo.convert import register_converter
from zoo.loading import make_config

SCOPES = ("mlp", "attn", "all")
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate", "up", "down")


def projections(model: nn.Module, layers: str) -> list[str]:
    """Qualified names of the projections that `layers` ("mlp", "attn" or "all") covers, block by block."""
    names = []
    for i, block in enumerate(model.blocks):
        if layers in ("attn", "all"):
            names += [f"blocks.{i}.attn.{p}" for p in ATTENTION_PROJECTIONS]
        if layers in ("mlp", "all"):
            missing = [p for p in MLP_PROJECTIONS if not hasattr(block.mlp, p)]
            if missing:
                raise ValueError(f"--layers {layers}: the MLP of block {i} ({type(block.mlp).__name__}) has no "
                                 f"{missing} projections; structured conversion supports mlp='swiglu'")
            names += [f"blocks.{i}.mlp.{p}" for p in MLP_PROJECTIONS]
    return names


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) matrix of any linear kind: nn.Linear's weight or a structured layer's to_dense()."""
    return module.to_dense() if hasattr(module, "to_dense") else module.weight


def config_fields(config) -> dict:
    """The zoo-declared fields of a config, by name."""
    cls = type(config)
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(cls) if f.name in cls.__annotations__}


@torch.no_grad()
def convert_linears(model: nn.Module, kind: str, kind_kwargs: dict, layers: str,
                    project: Callable[[torch.Tensor, torch.Tensor | None], nn.Module]) -> tuple[nn.Module, dict]:
    """A copy of `model` whose projections in `layers` are `project(W, bias)`, and the per-layer errors."""
    if layers not in SCOPES:
        raise ValueError(f"layers={layers!r} is invalid: one of {SCOPES}")
    config = model.config
    # One config holds one linear kind: projections outside the scope must be dense in the source.
    if config.linear != "dense" and layers != "all" and config.linear_targets != layers:
        raise ValueError(f"the checkpoint's {config.linear_targets!r} projections are {config.linear!r}; converting "
                         f"only {layers!r} would mix two structured kinds: use --layers all or "
                         f"--layers {config.linear_targets}")
    new_config = make_config(type(config), config_fields(config),
                             {"linear": kind, "linear_kwargs": dict(kind_kwargs), "linear_targets": layers,
                              "zoo_name": None}, where=f"conversion to {kind}")
    converted = type(model)(new_config)
    names = projections(model, layers)
    prefixes = [model.module_key(name) + "." for name in names]  # the state dict's names of those modules
    kept = {key: value for key, value in model.state_dict().items() if not key.startswith(tuple(prefixes))}
    missing, unexpected = converted.load_state_dict(kept, strict=False)
    stray = [key for key in missing if not key.startswith(tuple(prefixes))]
    if stray or unexpected:
        raise ValueError(f"conversion to {kind}: tensors that do not match between the models: "
                         f"missing {stray[:8]}, unexpected {unexpected[:8]}")
    errors = {}
    for name in names:
        source = model.get_submodule(name)
        weight = dense_weight(source)
        target = converted.get_submodule(name)
        target.load_state_dict(project(weight.float(), getattr(source, "bias", None)).state_dict())
        errors[name] = float(torch.linalg.norm(weight - dense_weight(target)) / torch.linalg.norm(weight))
    before, after = model.cost(), converted.cost()
    report = {
        "kind": kind, "kind_kwargs": dict(kind_kwargs), "layers": layers,
        "relative_frobenius_error": errors,
        "mean_relative_frobenius_error": sum(errors.values()) / len(errors),
        "params_before": before["total_params"], "params_after": after["total_params"],
        "flops_per_token_before": before["flops_per_token"], "flops_per_token_after": after["flops_per_token"],
    }
    return converted.to(next(model.parameters()).device).eval(), report


@register_converter("monarch")
def to_monarch(model: nn.Module, nblocks: int = 4, layers: str = "all") -> tuple[nn.Module, dict]:
    """Project the projections in `layers` onto Monarch matrices with `nblocks` blocks (the paper's closed form)."""
    return convert_linears(model, "monarch", {"nblocks": nblocks}, layers,
                           lambda w, b: monarch_project(w, nblocks, b))


@register_converter("lowrank")
def to_lowrank(model: nn.Module, rank: int = 64, layers: str = "all") -> tuple[nn.Module, dict]:
    """Replace the projections in `layers` by their rank-`rank` truncated SVD."""
    return convert_linears(model, "lowrank", {"rank": rank}, layers, lambda w, b: lowrank_project(w, rank, b))
