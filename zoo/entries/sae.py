"""Catalog entries of the sparse-autoencoder family, each reading the residual stream of lm-dense-tiny.

Train the LM first (`zoo train lm-dense-tiny` writes runs/lm-dense-tiny/final), then the SAE
(`zoo train sae-topk-tiny`); `--set source_model=FOLDER` points an SAE at another LM checkpoint and
`--set hook_point=blocks.1.mlp` at another layer.
"""

from zoo.catalog import register

# lm-dense-tiny: d_model 256, 4 blocks. The SAEs read the residual stream after block 2 and have
# 8x as many latents as it has dimensions.
SAE_TINY = dict(d_in=256, d_sae=2048, source_model="runs/lm-dense-tiny/final", hook_point="blocks.2",
                context_size=256, dead_tokens=250_000)

register("sae-relu-tiny", "sae", "tiny", {**SAE_TINY, "kind": "relu", "l1_coeff": 0.3},
         "ReLU SAE with a decoder-norm-weighted L1 penalty on lm-dense-tiny's residual stream (block 2).")
register("sae-topk-tiny", "sae", "tiny", {**SAE_TINY, "kind": "topk", "k": 32},
         "TopK SAE (k=32, AuxK, unit-norm decoder) on lm-dense-tiny's residual stream (block 2).")
register("sae-batchtopk-tiny", "sae", "tiny", {**SAE_TINY, "kind": "batchtopk", "k": 32},
         "BatchTopK SAE (k=32 per token on average, learned threshold) on lm-dense-tiny (block 2).")
# hier_loss "mean": the paper's loss, the arithmetic mean of the prefix errors over k = 1..64 (issue 17);
# `--set hier_loss=log_area` is the 1/j-weighted geometric mean. A checkpoint keeps the hier_loss it stores.
register("sae-hier-topk-tiny", "sae", "tiny",
         {**SAE_TINY, "kind": "hierarchical_topk", "k": 64, "k_min": 1, "hier_loss": "mean"},
         "HierarchicalTopK SAE: one SAE for every budget k in 1..64 (the paper's mean loss), on lm-dense-tiny "
         "(block 2).")
register("sae-matryoshka-tiny", "sae", "tiny",
         {**SAE_TINY, "kind": "matryoshka", "k": 32, "matryoshka_widths": [128, 512, 2048]},
         "Matryoshka BatchTopK SAE (prefixes of 128, 512, 2048 latents) on lm-dense-tiny (block 2).")
