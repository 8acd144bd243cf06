"""Decoding states (layers/attention/decoding.py): local attention decodes from a window of keys, Performer from a
running feature sum. The oracle is the full recomputation: the model's forward over the whole sequence without a
cache, at every position; the states' sizes are read off the cache to show they do not grow with the position."""

import inspect

import pytest
import torch
from transformers import StaticCache
from transformers.cache_utils import DynamicCache, DynamicLayer

import zoo
from layers.attention.decoding import BucketState, FeatureSumState, WindowAndSumState, WindowState
from layers.attention.lsh import LSHAttention, hash_buckets

SMALL = dict(n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=700)  # grouped-query heads: 2 queries per key head
WINDOW = 4
KINDS = {"local": {"window": WINDOW}, "performer": {"n_features": 16}, "lsh": {"n_buckets": 4, "chunk": 3},
         "scatterbrain": {"n_features": 16, "window": WINDOW}}
ATOL = 1e-4


def model(attention: str, **overrides):
    torch.manual_seed(0)
    return zoo.load("lm-dense-tiny", **{**SMALL, **overrides}, attention=attention,
                    attention_kwargs=KINDS.get(attention, {})).eval()


def left_padded(batch: int = 3, prompt: int = 6, total: int = 20, seed: int = 1):
    """Token ids (batch, total) and a padding mask whose row i starts with i padding positions."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 256, (batch, total), generator=g)
    mask = torch.ones_like(x)
    for i in range(batch):
        mask[i, :i] = 0
        x[i, :i] = 0
    return x, mask, prompt


def decode_token_by_token(m, x, mask, prompt, cache=None):
    """Logits of a prefill of `prompt` positions, then one position per step through the model's own cache
    (or `cache`)."""
    with torch.no_grad():
        out = m(x[:, :prompt], attention_mask=mask[:, :prompt], cache=cache, use_cache=True)
        steps = [out.logits]
        for t in range(prompt, x.shape[1]):
            out = m(x[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
    return torch.cat(steps, 1), out.cache


@pytest.mark.parametrize("attention", list(KINDS))
def test_decoding_with_the_state_equals_a_full_recomputation_at_every_position(attention):
    m = model(attention)
    x, mask, prompt = left_padded()
    steps, cache = decode_token_by_token(m, x, mask, prompt)
    with torch.no_grad():
        full = m(x, attention_mask=mask, use_cache=False).logits
    real = mask.bool()  # padding positions' outputs are never read
    torch.testing.assert_close(steps[real], full[real], atol=ATOL, rtol=ATOL)
    expected = {"local": WindowState, "performer": FeatureSumState, "lsh": BucketState,
                "scatterbrain": WindowAndSumState}[attention]
    assert all(type(layer) is expected for layer in cache.layers)
    assert cache.get_seq_length() == x.shape[1]


def test_the_local_cache_holds_at_most_window_keys_per_layer():
    m = model("local")
    x, mask, prompt = left_padded(total=3 * WINDOW + 5)
    _, cache = decode_token_by_token(m, x, mask, prompt)
    for layer in cache.layers:
        assert layer.keys.shape[-2] == layer.values.shape[-2] == WINDOW - 1  # the window's other keys
        assert layer.get_seq_length() == x.shape[1]  # positions still count on
    with torch.no_grad():  # a static cache keeps every key (the window state is not installed there)
        static = StaticCache(config=m.config, max_cache_len=x.shape[1])
        m(x, attention_mask=mask, cache=static, use_cache=True)
    n = x.shape[1]
    for layer, every in zip(cache.layers, static.layers, strict=True):  # the kept keys are the last ones
        torch.testing.assert_close(layer.keys, every.keys[:, :, n - WINDOW + 1:n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.values, every.values[:, :, n - WINDOW + 1:n], atol=1e-5, rtol=1e-5)


def test_the_performer_state_has_one_size_whatever_the_position():
    m = model("performer")
    sizes = []
    for total in (8, 40):
        x, mask, prompt = left_padded(total=total)
        _, cache = decode_token_by_token(m, x, mask, prompt)
        sizes.append([tuple(layer.sum.shape) for layer in cache.layers])
        assert all(layer.keys is None for layer in cache.layers)  # no key is kept
    assert sizes[0] == sizes[1] == [(3, 4, 16, m.config.d_model // 4 + 1)] * 2  # (batch, heads, features, d + 1)


def test_the_lsh_state_holds_at_most_chunk_keys_per_bucket_and_the_last_ones():
    m = model("lsh")
    x, mask, prompt = left_padded(total=40)
    _, cache = decode_token_by_token(m, x, mask, prompt)
    n_buckets, chunk = KINDS["lsh"]["n_buckets"], KINDS["lsh"]["chunk"]
    static = StaticCache(config=m.config, max_cache_len=x.shape[1])  # every key, computed the same way
    decode_token_by_token(m, x, mask, prompt, cache=static)
    for layer, every, block in zip(cache.layers, static.layers, m.blocks, strict=True):
        assert layer.keys.shape[-2] <= n_buckets * chunk < x.shape[1]
        rotations = block.attn.kernel.rotations.weight
        all_buckets = hash_buckets(every.keys, rotations)  # (b, kv_heads, n): every key's bucket
        for row in range(x.shape[0]):
            for head in range(m.config.n_kv_heads):
                pos = layer.pos[row, head]
                kept = sorted(pos[pos >= 0].tolist())
                expected = sorted(j for u in range(n_buckets)
                                  for j in [i for i in range(x.shape[1]) if all_buckets[row, head, i] == u][-chunk:])
                assert kept == expected  # the last `chunk` keys of each bucket, padding keys included
                torch.testing.assert_close(layer.keys[row, head][pos >= 0], every.keys[row, head, kept],
                                           atol=1e-5, rtol=1e-5)


@pytest.mark.skipif("n_hashes" not in inspect.signature(LSHAttention).parameters, reason="one hash round only")
def test_lsh_with_several_hash_rounds_decodes_from_the_union_of_their_buckets():
    torch.manual_seed(0)
    m = zoo.load("lm-dense-tiny", **SMALL, attention="lsh",
                 attention_kwargs={"n_buckets": 4, "chunk": 3, "n_hashes": 2}).eval()
    x, mask, prompt = left_padded(total=30)
    steps, cache = decode_token_by_token(m, x, mask, prompt)
    with torch.no_grad():
        full = m(x, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(steps[mask.bool()], full[mask.bool()], atol=ATOL, rtol=ATOL)
    assert all(type(layer) is BucketState and layer.keys.shape[-2] <= 2 * 4 * 3 for layer in cache.layers)


def test_a_long_performer_prefill_runs_in_groups_and_the_state_continues_it():
    m = model("performer", n_layers=1)
    x = torch.randint(0, 256, (1, 600), generator=torch.Generator().manual_seed(2))  # > INFERENCE_GROUP_ROWS
    steps, cache = decode_token_by_token(m, x, torch.ones_like(x), 596)
    with torch.no_grad():
        full = m(x, use_cache=False).logits
    torch.testing.assert_close(steps, full, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("attention", list(KINDS))
@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_generate_with_the_state_equals_generate_without_a_cache(attention, mode):
    m = model(attention)
    x, mask, prompt = left_padded()
    kwargs = dict(max_new_tokens=3 * WINDOW, do_sample=False, pad_token_id=0)
    if mode == "beam":
        kwargs.update(num_beams=3, num_return_sequences=2)
    runs = []
    for use_cache in (True, False):
        with torch.no_grad():
            runs.append(m.generate(x[:, :prompt], attention_mask=mask[:, :prompt], use_cache=use_cache, **kwargs))
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("attention", list(KINDS))
def test_rolling_back_decoded_positions_equals_never_having_decoded_them(attention):
    """What assisted decoding does: decode candidates, crop the rejected ones, continue."""
    m = model(attention)
    x, mask, prompt = left_padded(total=14)
    other = torch.randint(1, 256, (x.shape[0], 3), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache = DynamicCache(config=m.config)
        m(x[:, :prompt], attention_mask=mask[:, :prompt], cache=cache, use_cache=True)
        cache.activate_past_recording()
        t = prompt
        for _ in range(4):  # four rounds: 3 candidates of which 1 is kept, then continue
            kept = x[:, t:t + 1]
            candidates = torch.cat([kept, other[:, :2]], 1)
            m(candidates, attention_mask=torch.cat([mask[:, :t + 1], torch.ones_like(other[:, :2])], 1), cache=cache,
              use_cache=True)
            cache.crop(-2)
            t += 1
        rest = m(x[:, t:], attention_mask=mask, cache=cache, use_cache=True).logits
        full = m(x, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(rest, full[:, t:], atol=ATOL, rtol=ATOL)
    assert cache.get_seq_length() == x.shape[1]


def test_a_window_cache_refuses_a_rollback_it_cannot_undo():
    m = model("local")
    x = torch.randint(1, 256, (1, 12))
    with torch.no_grad():
        out = m(x, use_cache=True)
    with pytest.raises(RuntimeError, match="activate_past_recording"):
        out.cache.crop(-2)


def test_local_attention_weights_through_the_window_cache_cover_every_position():
    m = model("local")
    x = torch.randint(1, 256, (1, 12))
    with torch.no_grad():
        out = m(x[:, :10], use_cache=True)
        step = m(x[:, 10:11], cache=out.cache, use_cache=True, output_attentions=True)
        full = m(x[:, :11], use_cache=False, output_attentions=True)
    for w_step, w_full in zip(step.attentions, full.attentions, strict=True):
        assert w_step.shape[-1] == 11  # zeros on the keys the window no longer holds
        torch.testing.assert_close(w_step[:, :, -1], w_full[:, :, -1], atol=1e-5, rtol=1e-5)
        assert bool((w_step[..., : 11 - WINDOW] == 0).all())


SMYRF = "hashing" in inspect.signature(LSHAttention).parameters


@pytest.mark.parametrize("attention, kwargs", [
    ("dense", {}), ("scatterbrain", {"n_features": 16, "window": 4, "lsh_chunk": 4, "n_buckets": 2}),
    pytest.param("lsh", {"n_buckets": 4, "chunk": 3, "hashing": "smyrf"},
                 marks=pytest.mark.skipif(not SMYRF, reason="no SMYRF hashing"))])
def test_kinds_without_a_state_keep_every_key(attention, kwargs):
    """Dense attention needs every key (the baseline); Scatterbrain with an LSH support and SMYRF-hashed LSH keep
    them too, and still decode as the full recomputation."""
    torch.manual_seed(0)
    m = zoo.load("lm-dense-tiny", **SMALL, attention=attention, attention_kwargs=kwargs).eval()
    x, mask, prompt = left_padded(total=12)
    steps, cache = decode_token_by_token(m, x, mask, prompt)
    assert all(type(layer) is DynamicLayer and layer.keys.shape[-2] == 12 for layer in cache.layers)
    with torch.no_grad():
        full = m(x, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(steps[mask.bool()], full[mask.bool()], atol=ATOL, rtol=ATOL)


def test_the_scatterbrain_state_holds_the_window_and_one_sum():
    m = model("scatterbrain")
    x, mask, prompt = left_padded(total=30)
    _, cache = decode_token_by_token(m, x, mask, prompt)
    for layer in cache.layers:
        assert layer.keys.shape[-2] == WINDOW - 1
        assert tuple(layer.sum.shape) == (3, 4, 16, m.config.d_model // 4 + 1)
