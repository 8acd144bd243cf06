"""The zoo LM and transformers' own architectures, both ways.

`to_transformers(model)` builds the transformers model (LlamaForCausalLM for a dense zoo LM,
MixtralForCausalLM for a softmax top-k MoE) with the very same weights: the oracle of the
transformers-compatibility tests and the peer of the side-by-side benchmarks. A kind with no
transformers equivalent is a ValueError naming it.
"""

from zoo.interop.llama import to_transformers, transformers_config

__all__ = ["to_transformers", "transformers_config"]
