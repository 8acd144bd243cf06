import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models.lm import ZooLM, ZooLMConfig


def tiny(**kw) -> ZooLM:
    torch.manual_seed(0)
    cfg = dict(d_model=64, n_layers=2, n_heads=4, max_seq_len=64) | kw
    return ZooLM(ZooLMConfig(**cfg)).eval()


@pytest.mark.parametrize(
    "bad, field",
    [({"d_model": 66}, "d_model"), ({"n_kv_heads": 3}, "n_kv_heads"), ({"attention": "nope"}, "attention"),
     ({"n_layers": 0}, "n_layers"), ({"norm_eps": -1.0}, "norm_eps")],
)
def test_bad_config_names_the_field(bad, field):
    with pytest.raises(Exception, match=field):
        ZooLMConfig(**bad)


def test_unknown_kind_lists_the_known_ones():
    with pytest.raises(Exception, match="swiglu"):
        ZooLMConfig(mlp="nope")


def test_future_tokens_do_not_change_past_logits():
    m = tiny()
    x = torch.randint(0, 256, (1, 20))
    y = x.clone()
    y[0, 12:] = (y[0, 12:] + 1) % 256
    torch.testing.assert_close(m(x).logits[:, :12], m(y).logits[:, :12])


def test_kv_cache_decoding_equals_full_forward():
    m = tiny()
    x = torch.randint(0, 256, (2, 12))
    full = m(x).logits
    out = m(x[:, :5], use_cache=True)
    steps = [out.logits]
    for t in range(5, 12):
        out = m(x[:, t : t + 1], cache=out.cache, use_cache=True)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_greedy_generate_same_with_and_without_cache():
    m = tiny()
    x = torch.randint(0, 256, (1, 6))
    a = m.generate(x, max_new_tokens=15, do_sample=False, use_cache=True, pad_token_id=0)
    b = m.generate(x, max_new_tokens=15, do_sample=False, use_cache=False, pad_token_id=0)
    assert a.shape == (1, 21)
    assert torch.equal(a, b)


def test_sampling_is_seeded_and_in_vocab():
    m = tiny()
    x = torch.randint(0, 256, (1, 6))
    torch.manual_seed(3)
    a = m.generate(x, max_new_tokens=20, do_sample=True, top_k=50, pad_token_id=0)
    torch.manual_seed(3)
    b = m.generate(x, max_new_tokens=20, do_sample=True, top_k=50, pad_token_id=0)
    assert torch.equal(a, b) and a.min() >= 0 and a.max() < 256


def test_left_padded_batch_generates_like_single_prompts():
    m = tiny()
    short, long = torch.randint(0, 256, (1, 4)), torch.randint(0, 256, (1, 7))
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    out = m.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    alone = m.generate(short, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(out[0, 3:], alone[0])
    assert torch.equal(out[1], m.generate(long, max_new_tokens=8, do_sample=False, pad_token_id=0)[0])


def test_too_long_input_is_a_clear_error():
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny()(torch.zeros(1, 65, dtype=torch.long))


def test_tied_embeddings_share_one_tensor_and_untied_do_not():
    tied = tiny()
    assert tied.lm_head.weight.data_ptr() == tied.embed.weight.data_ptr()
    m = tiny(tie_word_embeddings=False)
    assert m.lm_head.weight.data_ptr() != m.embed.weight.data_ptr()


def test_cost_counts_parameters_and_matches_measured_matmul_flops():
    m = tiny(n_kv_heads=2)
    seq = 32
    cost = m.cost(seq)
    assert cost["total_params"] == sum(p.numel() for p in m.parameters())
    assert cost["active_params"] == cost["total_params"]
    counter = FlopCounterMode(display=False)
    with counter:
        m(torch.randint(0, 256, (1, seq)))
    counts = counter.get_flop_counts()["Global"]
    matmul = sum(v for op, v in counts.items() if "mm" in str(op)) / seq  # projections and LM head
    attn_core = sum(b.attn.n_heads * b.attn.kernel.flops_per_token(seq) for b in m.blocks)
    gate_products = sum(b.mlp.up.out_features for b in m.blocks)
    assert cost["flops_per_token"] - attn_core - gate_products == pytest.approx(matmul, rel=1e-6)
