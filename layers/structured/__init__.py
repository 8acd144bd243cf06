"""Structured nn.Linear drop-ins: Monarch, Pixelated Butterfly, block-sparse and low-rank.

Every kind is built as `Kind(in_features, out_features, bias=False, **kind_kwargs)`, runs on
(..., in_features), and has `to_dense()` (its (out, in) matrix), `flops_per_token()` (from its real
structure) and `init_weights_(std)` (a product with the scale of a dense layer of that std).
Importing this package registers the kinds in `layers.linear.KINDS`, so that a model config can
name them: `linear="monarch", linear_kwargs={"nblocks": 4}`.

- monarch: two block-diagonal factors and the Monarch permutation; `monarch_project` is the closed-form
  nearest Monarch matrix to a dense one.
- pixelfly: flat block butterfly blocks plus a low-rank term.
- blocksparse: a fixed random block mask.
- lowrank: U V; `lowrank_project` is the truncated SVD.
"""

from layers.linear import KINDS
from layers.structured.blocksparse import BlockSparseLinear, random_block_layout
from layers.structured.lowrank import LowRankLinear, lowrank_project
from layers.structured.monarch import MonarchLinear, monarch_project
from layers.structured.pixelfly import PixelflyLinear, flat_butterfly_layout, flat_butterfly_nnz_blocks

STRUCTURED_KINDS = {
    "monarch": MonarchLinear,
    "pixelfly": PixelflyLinear,
    "blocksparse": BlockSparseLinear,
    "lowrank": LowRankLinear,
}
for _name, _kind in STRUCTURED_KINDS.items():
    KINDS.register(_name, _kind)

__all__ = ["STRUCTURED_KINDS", "BlockSparseLinear", "LowRankLinear", "MonarchLinear", "PixelflyLinear",
           "flat_butterfly_layout", "flat_butterfly_nnz_blocks", "lowrank_project", "monarch_project",
           "random_block_layout"]
