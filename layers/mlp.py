"""MLP kinds, chosen by name in a model config (`mlp="swiglu"`; MoE registers `moe`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from layers.linear import make_linear
from layers.registry import Registry

# Activations by name; the transformers names (hidden_act) they stand for are in ACTIVATION_ALIASES.
ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,  # exact (erf)
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's gelu_new, Gemma's gelu_pytorch_tanh
    "relu": F.relu,
}
ACTIVATION_ALIASES = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                      "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu"}


def get_activation(name: str):
    """The activation function called `name` (a key of ACTIVATIONS)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class SwiGLU(nn.Module):
    """down(act(gate(x)) * up(x)), the LLaMA-style gated MLP (act = silu; gelu_tanh is Gemma's GeGLU)."""

    def __init__(self, d_model: int, d_ff: int, linear: str = "dense", linear_kwargs: dict | None = None,
                 layer_idx: int | None = None, activation: str = "silu"):
        super().__init__()
        kw = linear_kwargs or {}
        self.act = get_activation(activation)
        self.activation = activation
        self.gate = make_linear(linear, d_model, d_ff, **kw)
        self.up = make_linear(linear, d_model, d_ff, **kw)
        self.down = make_linear(linear, d_ff, d_model, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.gate(x)) * self.up(x))

    def flops_per_token(self) -> int:
        """Forward FLOPs per token: the three projections plus the gate's elementwise product."""
        d_ff = self.up.out_features
        return self.gate.flops_per_token() + self.up.flops_per_token() + self.down.flops_per_token() + d_ff


class FFN(nn.Module):
    """down(act(up(x))), the two-layer MLP of GPT-2 (act = gelu_tanh, with biases)."""

    def __init__(self, d_model: int, d_ff: int, linear: str = "dense", linear_kwargs: dict | None = None,
                 layer_idx: int | None = None, activation: str = "gelu_tanh", bias: bool = True):
        super().__init__()
        kw = linear_kwargs or {}
        self.act = get_activation(activation)
        self.activation = activation
        self.up = make_linear(linear, d_model, d_ff, bias=bias, **kw)
        self.down = make_linear(linear, d_ff, d_model, bias=bias, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))

    def flops_per_token(self) -> int:
        """Forward FLOPs per token: the two projections (the activation is not counted, as for SwiGLU's)."""
        return self.up.flops_per_token() + self.down.flops_per_token()


KINDS = Registry("MLP kind", {"swiglu": SwiGLU, "ffn": FFN})
