"""Linear kinds: drop-in replacements for nn.Linear, chosen by name in a model config.

Only `dense` exists here; the structured kinds (Monarch, Pixelfly, block-sparse, low-rank)
register themselves into KINDS from `layers.structured`.
"""

from __future__ import annotations

from torch import nn

from layers.registry import Registry


class DenseLinear(nn.Linear):
    """nn.Linear that reports its own cost."""

    def flops_per_token(self) -> int:
        """Forward FLOPs for one input row (a multiply-add counts 2)."""
        return 2 * self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)


KINDS = Registry("linear kind", {"dense": DenseLinear})


def make_linear(kind: str, in_features: int, out_features: int, bias: bool = False, **kwargs) -> nn.Module:
    """Build the linear kind `kind` (a name in KINDS) with the given shape."""
    return KINDS[kind](in_features, out_features, bias=bias, **kwargs)
