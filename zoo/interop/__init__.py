"""The zoo LM and transformers' own architectures, both ways.

`import_checkpoint(folder)` (what `zoo.load` does with a transformers folder or Hub repo) gives a zoo
LM whose logits equal the transformers model's; `to_transformers(model)` builds the transformers
model (Llama, Qwen2, Qwen3, Gemma, GPT-2, Mistral for dense LMs; Mixtral, Qwen2-MoE, Qwen3-MoE,
OLMoE for MoE) with the very same weights, and `export_checkpoint` saves it (`zoo export`). A kind
with no transformers equivalent is a ValueError naming it. The per-architecture tables are in
zoo/interop/architectures.py.
"""

from zoo.interop.architectures import ARCHITECTURES
from zoo.interop.checkpoints import (
    describe_import,
    export_checkpoint,
    from_transformers_model,
    import_checkpoint,
    to_transformers,
    transformers_config,
    transformers_model_type,
)

__all__ = ["ARCHITECTURES", "describe_import", "export_checkpoint", "from_transformers_model",
           "import_checkpoint", "to_transformers", "transformers_config", "transformers_model_type"]
