"""The attention kinds inside the LM: every catalog entry decodes with the KV cache as without, and round-trips."""

import pytest
import torch

from zoo import list_models, load

NAMES = [e.name for e in list_models("lm-*") if e.config.get("attention", "dense") != "dense"]
# `small` entries keep their attention budget; one layer keeps the test fast.
SHRINK = {"tiny": {}, "small": {"n_layers": 1}}


def build(name: str, **overrides):
    torch.manual_seed(0)
    size = name.rsplit("-", 1)[1]
    return load(name, **{**SHRINK[size], **overrides})


def test_every_kind_has_a_tiny_and_a_small_entry():
    assert {n.split("-")[1] for n in NAMES} == {"local", "lsh", "performer", "scatterbrain"}
    assert len(NAMES) == 8


@pytest.mark.parametrize("name", NAMES)
def test_greedy_generation_with_the_kv_cache_equals_without(name):
    model = build(name)
    length = 70 if name.endswith("-tiny") else 20  # past the tiny windows; small budgets are tested below
    prompt = torch.randint(1, 256, (1, length), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with_cache = model.generate(prompt, use_cache=True, **kw)
    assert with_cache.shape == (1, length + 8)
    assert torch.equal(with_cache, model.generate(prompt, use_cache=False, **kw))


SMALL_BUDGETS = [("lm-local-tiny", {"window": 5}), ("lm-lsh-tiny", {"n_buckets": 4, "chunk": 3}),
                 ("lm-scatterbrain-tiny", {"n_features": 8, "window": 3, "lsh_chunk": 3})]


@pytest.mark.parametrize("name, budget", SMALL_BUDGETS)
def test_cached_decoding_equals_a_full_forward_with_small_budgets(name, budget):
    model = build(name, n_layers=2, attention_kwargs=budget)
    x = torch.randint(1, 256, (2, 30), generator=torch.Generator().manual_seed(2))
    full = model(x).logits
    out = model(x[:, :9], use_cache=True)
    steps = [out.logits]
    for t in range(9, 30):
        out = model(x[:, t : t + 1], cache=out.cache, use_cache=True)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", [n for n in NAMES if n.endswith("-tiny")])
def test_left_padded_batch_generates_like_single_prompts(name):
    model = build(name, n_layers=2)
    g = torch.Generator().manual_seed(3)
    short, long = torch.randint(1, 256, (1, 4), generator=g), torch.randint(1, 256, (1, 7), generator=g)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    out = model.generate(batch, attention_mask=mask, **kw)
    assert torch.equal(out[0, 3:], model.generate(short, **kw)[0])
    assert torch.equal(out[1], model.generate(long, **kw)[0])


@pytest.mark.parametrize("name", ["lm-lsh-tiny", "lm-performer-tiny", "lm-scatterbrain-tiny"])
def test_saved_random_projections_reload_to_identical_logits(name, tmp_path):
    model = build(name, n_layers=2)
    model.train()
    x = torch.randint(1, 256, (1, 40), generator=torch.Generator().manual_seed(4))
    for kind in (b.attn.kernel for b in model.blocks):
        for proj in (getattr(kind, "features", None), getattr(kind, "rotations", None)):
            if proj is not None:
                proj.redraw_every = 1  # a trained model's projection is a redrawn one
    model(x)
    model.eval()
    model.save_pretrained(tmp_path)
    torch.manual_seed(123)  # a fresh model would draw other projections
    again = load(str(tmp_path))
    assert torch.equal(again(x).logits, model(x).logits)
