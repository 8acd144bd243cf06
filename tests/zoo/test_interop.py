"""zoo LM -> transformers' Llama / Mixtral with the same weights: the oracle of the compatibility tests."""

import pytest
import torch

import zoo
from zoo.interop import to_transformers


@pytest.mark.parametrize("name, cls", [("lm-dense-tiny", "LlamaForCausalLM"), ("moe-tiny", "MixtralForCausalLM")])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_transformers_model_with_our_weights_gives_our_logits(name, cls, kv_heads):
    torch.manual_seed(0)
    model = zoo.load(name, n_layers=2, n_kv_heads=kv_heads, tie_word_embeddings=kv_heads == 4)
    theirs = to_transformers(model)
    assert type(theirs).__name__ == cls
    x = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides, field", [
    ({"attention": "lsh"}, "attention"),
    ({"attention": "performer"}, "attention"),
    ({"linear": "monarch", "linear_kwargs": {"nblocks": 4}}, "linear"),
])
def test_kinds_without_a_transformers_equivalent_are_refused_by_name(overrides, field):
    with pytest.raises(ValueError, match=f"cannot express {field}="):
        to_transformers(zoo.load("lm-dense-tiny", n_layers=1, **overrides))


def test_moe_settings_mixtral_cannot_express_are_refused():
    with pytest.raises(ValueError, match="mlp_kwargs.router='top_p'"):
        to_transformers(zoo.load("moe-topp-tiny", n_layers=1))
    with pytest.raises(ValueError, match="n_shared_experts"):
        to_transformers(zoo.load("moe-fine-tiny", n_layers=1))
