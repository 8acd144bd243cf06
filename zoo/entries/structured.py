"""Catalog entries of the structured-matrix LMs: Monarch and Pixelated Butterfly projections."""

from zoo.catalog import register
from zoo.entries.lm import LM_SMALL, LM_TINY

# Every projection (attention q/k/v/o and the SwiGLU gate/up/down) is structured; each kind keeps
# about a quarter of the dense parameters and FLOPs of those projections.
MONARCH = dict(linear="monarch", linear_kwargs={"nblocks": 4}, linear_targets="all")
PIXELFLY_TINY = dict(linear="pixelfly", linear_kwargs={"block_size": 16, "butterfly_size": 4, "rank": 8},
                     linear_targets="all")
PIXELFLY_SMALL = dict(linear="pixelfly", linear_kwargs={"block_size": 64, "butterfly_size": 4, "rank": 16},
                      linear_targets="all")

register("lm-monarch-tiny", "lm", "tiny", {**LM_TINY, **MONARCH},
         "lm-dense-tiny with Monarch projections (4 blocks): ~1/4 of the projection parameters and FLOPs.")
register("lm-monarch-small", "lm", "small", {**LM_SMALL, **MONARCH},
         "lm-dense-small with Monarch projections (4 blocks), for GPUs.")
register("lm-pixelfly-tiny", "lm", "tiny", {**LM_TINY, **PIXELFLY_TINY},
         "lm-dense-tiny with Pixelated Butterfly projections (16x16 flat butterfly blocks + rank 8).")
register("lm-pixelfly-small", "lm", "small", {**LM_SMALL, **PIXELFLY_SMALL},
         "lm-dense-small with Pixelated Butterfly projections (64x64 flat butterfly blocks + rank 16), for GPUs.")
