"""Tiny transformers checkpoints of every architecture the zoo imports: what a Hub download gives, without one.

Each is built from its own transformers config class with random weights (norm scales and biases
perturbed too, so that a wrongly mapped norm or bias shows), saved with `save_pretrained` together
with a small real tokenizer (a `tokenizers` BPE trained here on a few sentences).
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=48, max_position_embeddings=128, bos_token_id=None, eos_token_id=None,
             pad_token_id=None)
MOE = dict(num_experts=4, num_experts_per_tok=2)


def configs() -> dict:
    """model_type -> a tiny transformers config of that architecture."""
    import transformers as T

    return {
        "llama": T.LlamaConfig(**SMALL, tie_word_embeddings=False,
                               rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 16}),
        "mistral": T.MistralConfig(**SMALL, sliding_window=8),  # a window shorter than the test sequences
        "qwen2": T.Qwen2Config(**SMALL, tie_word_embeddings=True),
        "qwen3": T.Qwen3Config(**SMALL, head_dim=16),  # head_dim * heads != hidden_size
        "gemma": T.GemmaConfig(**SMALL, head_dim=8),
        "gpt2": T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                             bos_token_id=None, eos_token_id=None),
        "mixtral": T.MixtralConfig(**{k: v for k, v in SMALL.items()}, num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": T.Qwen2MoeConfig(**SMALL, **MOE, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                                      mlp_only_layers=[0]),
        "qwen3_moe": T.Qwen3MoeConfig(**SMALL, **MOE, moe_intermediate_size=16, head_dim=8, norm_topk_prob=True),
        "olmoe": T.OlmoeConfig(**SMALL, **MOE),
        "deepseek_v3": T.DeepseekV3Config(
            **{**SMALL, "num_key_value_heads": 4, "num_hidden_layers": 3}, n_routed_experts=4, num_experts_per_tok=2,
            n_group=2, topk_group=1, first_k_dense_replace=1, n_shared_experts=1, moe_intermediate_size=16,
            routed_scaling_factor=2.5, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=4, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                           "original_max_position_embeddings": 32, "mscale": 1.0,
                                           "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}),
        "deepseek_v2": T.DeepseekV2Config(  # V2-Lite's layout: no query rank
            **{**SMALL, "num_key_value_heads": 4, "num_hidden_layers": 3}, n_routed_experts=4, num_experts_per_tok=2,
            topk_method="group_limited_greedy", n_group=2, topk_group=1, first_k_dense_replace=1, n_shared_experts=2,
            moe_intermediate_size=16, routed_scaling_factor=1.5, q_lora_rank=None, kv_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8),
    }


ARCHITECTURES = tuple(configs())
MOE_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "deepseek_v2")


def tiny_tokenizer():
    """A real fast tokenizer with fewer ids than VOCAB (BPE trained on a few sentences; transformers may add
    special tokens of the architecture when it loads it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    text = ["the quick brown fox jumps over the lazy dog", "sparse models route tokens to experts",
            "attention is all you need", "hello world"] * 10
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=VOCAB - 16, special_tokens=["<unk>", "<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def build(model_type: str, seed: int = 0):
    """The tiny transformers model of `model_type`, in eval mode, every parameter perturbed."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(configs()[model_type]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for name, b in model.named_buffers():  # DeepSeek's routing correction bias is a (saved) buffer
            if name.endswith("e_score_correction_bias"):
                b.add_(torch.randn_like(b) * 0.1)
    return model


def save(model_type: str, folder: Path, seed: int = 0) -> Path:
    """Save the tiny model of `model_type` and the tiny tokenizer into `folder` (what a Hub snapshot holds)."""
    build(model_type, seed).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder
