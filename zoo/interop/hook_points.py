"""Hook points of the zoo LM under the names other tools give them: transformers' module names and
TransformerLens' hook names, translated to the zoo's module paths (what train/activations.py hooks).

    transformers          model.layers.3  /  transformer.h.3        -> blocks.3 (the residual stream after it)
                          model.layers.3.self_attn / .mlp / .input_layernorm / .post_attention_layernorm
                          transformer.h.3.attn / .mlp / .ln_1 / .ln_2, model.embed_tokens, model.norm, transformer.ln_f
    TransformerLens       blocks.3.hook_resid_pre -> blocks.3:input    blocks.3.hook_resid_post -> blocks.3
                          blocks.3.hook_resid_mid -> blocks.3.mlp_norm:input
                          blocks.3.hook_attn_out -> blocks.3.attn      blocks.3.hook_mlp_out -> blocks.3.mlp
                          hook_embed -> embed                           ln_final.hook_normalized -> norm
A zoo name ("blocks.3", "blocks.3.mlp:input", "model.blocks.3") is returned as it is.
"""

from __future__ import annotations

import re

_BLOCK_PARTS = {"self_attn": "attn", "attn": "attn", "mlp": "mlp", "input_layernorm": "attn_norm",
                "post_attention_layernorm": "mlp_norm", "ln_1": "attn_norm", "ln_2": "mlp_norm",
                "block_sparse_moe": "mlp"}
_LENS = {"hook_resid_pre": ":input", "hook_resid_post": "", "hook_resid_mid": ".mlp_norm:input",
         "hook_attn_out": ".attn", "hook_mlp_out": ".mlp"}
_WHOLE = {"model.embed_tokens": "embed", "transformer.wte": "embed", "hook_embed": "embed", "model.norm": "norm",
          "transformer.ln_f": "norm", "ln_final.hook_normalized": "norm", "ln_final": "norm"}
_HF_BLOCK = re.compile(r"^(?:model\.layers|transformer\.h)\.(\d+)(?:\.(\w+))?$")
_LENS_BLOCK = re.compile(r"^blocks\.(\d+)\.(hook_\w+)$")


def zoo_hook_point(hook_point: str) -> str:
    """The zoo LM's name of `hook_point` (see the module docstring); a ValueError for an unknown hook name."""
    name, sep, where = hook_point.partition(":")
    suffix = sep + where
    if name in _WHOLE:
        return _WHOLE[name] + suffix
    match = _HF_BLOCK.match(name)
    if match:
        index, part = match.groups()
        if part is not None and part not in _BLOCK_PARTS:
            raise ValueError(f"hook point {hook_point!r}: no zoo equivalent of {part!r}; known parts: "
                             f"{sorted(_BLOCK_PARTS)}")
        return f"blocks.{index}" + (f".{_BLOCK_PARTS[part]}" if part else "") + suffix
    match = _LENS_BLOCK.match(name)
    if match:
        index, hook = match.groups()
        if hook not in _LENS:
            raise ValueError(f"hook point {hook_point!r}: TransformerLens hook {hook!r} has no zoo equivalent; "
                             f"known: {sorted(_LENS)}")
        if suffix:
            raise ValueError(f"hook point {hook_point!r}: a TransformerLens hook names its side itself")
        return f"blocks.{index}{_LENS[hook]}"
    return hook_point
