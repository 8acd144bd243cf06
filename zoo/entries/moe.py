"""Catalog entries of the Mixture-of-Experts LMs: the dense LM with mlp="moe".

Each entry matches the active FLOPs of its dense baseline (lm-dense-tiny / lm-dense-small, MLP width
d_ff = 704 / 2048): top-2 of 8 experts of half width (granularity 2); 8 of 64 experts of 1/8 width
plus one shared expert of that width, with d_ff chosen so that the 9 active experts sum to ~d_ff.
"""

from zoo.catalog import register
from zoo.entries.lm import LM_SMALL, LM_TINY

COARSE = dict(mlp="moe", mlp_kwargs=dict(num_experts=8, num_experts_per_tok=2, granularity=2))
FINE = dict(mlp="moe", mlp_kwargs=dict(num_experts=64, num_experts_per_tok=8, granularity=8, n_shared_experts=1))
# Top-p ("Harder Tasks Need More Experts"): p = 0.4, 1 to 4 experts, their entropy loss keeps k small.
TOP_P = dict(mlp="moe", mlp_kwargs=dict(num_experts=8, num_experts_per_tok=4, granularity=2, router="top_p",
                                        router_kwargs={"top_p": 0.4, "min_experts_per_tok": 1},
                                        router_entropy_loss_coef=1e-4))
FINE_D_FF = {"tiny": 640, "small": 1792}  # expert width 80 / 224; 9 active experts = 720 / 2016

for size, base in (("tiny", LM_TINY), ("small", LM_SMALL)):
    suffix = "" if size == "tiny" else " At GPT-2-small scale, for GPUs."
    register(f"moe-{size}", "lm", size, {**base, **COARSE},
             "Mixture of Experts: 8 SwiGLU experts of half width, top-2 softmax routing (Mixtral style), dropless; "
             "the dense model's active FLOPs." + suffix)
    register(f"moe-fine-{size}", "lm", size, {**base, **FINE, "d_ff": FINE_D_FF[size]},
             "Fine-grained MoE (DeepSeek-MoE style): 64 experts of 1/8 width, top-8, plus 1 shared expert; "
             "k can be changed at load time." + suffix)
    register(f"moe-topp-{size}", "lm", size, {**base, **TOP_P},
             "Dynamic top-p MoE: each token takes experts until their probability reaches 0.4 (1 to 4 of 8 "
             "half-width experts)." + suffix)
