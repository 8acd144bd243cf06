"""Catalog entries of the sparse and low-rank attention LMs: the dense LM with another attention kind.

Budgets per query: `tiny` (context 256, head_dim 64) gives each kind about 64 keys or features,
Scatterbrain splitting the same budget between features and its exact window; `small` (context
1024) gives about 256.
"""

from zoo.catalog import register
from zoo.entries.lm import LM_SMALL, LM_TINY

BUDGETS = {
    "tiny": {
        "local": {"window": 64},
        "lsh": {"n_buckets": 4, "chunk": 64},
        "performer": {"n_features": 64},
        "scatterbrain": {"n_features": 32, "window": 32},
    },
    "small": {
        "local": {"window": 256},
        "lsh": {"n_buckets": 8, "chunk": 128},
        "performer": {"n_features": 256},
        "scatterbrain": {"n_features": 128, "window": 128},
    },
}

DESCRIPTIONS = {
    "local": "Sliding-window attention (window {window}), O(n * window): never an n x n matrix.",
    "lsh": "LSH attention: {n_buckets} angular-LSH buckets, {chunk} keys of its bucket per query (Reformer/SMYRF).",
    "performer": "Performer (FAVOR+) attention with {n_features} positive orthogonal random features, linear in n.",
    "scatterbrain": "Scatterbrain attention: Performer ({n_features} features) plus exact attention on a "
                    "{window}-wide window, no pair counted twice.",
}

for size, base in (("tiny", LM_TINY), ("small", LM_SMALL)):
    for kind, budget in BUDGETS[size].items():
        suffix = "" if size == "tiny" else " At GPT-2-small scale, for GPUs."
        register(f"lm-{kind}-{size}", "lm", size, {**base, "attention": kind, "attention_kwargs": budget},
                 DESCRIPTIONS[kind].format(**budget) + suffix)
