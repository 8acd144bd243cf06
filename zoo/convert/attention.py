"""`attention`: a training-free swap of the attention kind of a trained (or imported) LM.

The projections, norms and MLPs are kept; only the kind that turns q, k, v into the output changes
(`zoo convert CKPT --to attention=scatterbrain --option n_features=64`). Kinds with random
projections (lsh, performer, scatterbrain) draw theirs afresh: no checkpoint of another kind holds one.
"""

from __future__ import annotations

import torch

from layers.attention import KINDS
from models.lm import ZooLMForCausalLM, drawn_buffers
from zoo.convert import register_converter
from zoo.convert.moe import _max_logit_diff


@torch.no_grad()
def swap_attention(model: ZooLMForCausalLM, kind: str, **kind_kwargs) -> tuple[ZooLMForCausalLM, dict]:
    """The model with attention kind `kind` (options `kind_kwargs`) and every other weight unchanged."""
    KINDS.check(kind, "attention")
    fields = {**model.config.to_dict(), "attention": kind, "attention_kwargs": dict(kind_kwargs)}
    for name in ("model_type", "transformers_version", "architectures", "dtype", "torch_dtype"):
        fields.pop(name, None)
    config = type(model.config)(**{k: v for k, v in fields.items() if k in type(model.config).__dataclass_fields__})
    new = type(model)(config).to(model.embed.weight.dtype)
    missing, unexpected = new.load_state_dict(
        {k: v for k, v in model.state_dict().items() if k not in drawn_buffers(model)}, strict=False)
    missing = set(missing) - drawn_buffers(new)
    if config.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing or unexpected:
        raise ValueError(f"swapping attention to {kind!r} left weights unmatched: missing {sorted(missing)[:6]}, "
                         f"unexpected {sorted(unexpected)[:6]}")
    new.tie_weights()
    new.eval()
    return new, {"attention_before": model.config.attention, "attention_after": kind,
                 "attention_kwargs": dict(kind_kwargs), "max_logit_change": _max_logit_diff(model.eval(), new)}


@register_converter("attention")
def to_attention(model: ZooLMForCausalLM, kind: str = "dense", **kind_kwargs) -> tuple[ZooLMForCausalLM, dict]:
    """`zoo convert --to attention=KIND`: swap the attention kind (training-free)."""
    return swap_attention(model, kind, **kind_kwargs)
