"""The zoo LM where transformers looks: its own LlamaForCausalLM / MixtralForCausalLM with the same weights
(zoo.interop.to_transformers) is the oracle for logits, hidden states, attentions, losses, generation and
caches; the sparse kinds are checked against a full recomputation."""

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, StaticCache

import zoo
from models.lm import ZooLMConfig, ZooLMForCausalLM, ZooLMModel
from zoo.interop import to_transformers

SMALL = dict(n_layers=2, n_kv_heads=2, max_seq_len=64)
ATOL = 1e-5


def pair(name: str = "lm-dense-tiny", attn: str = "eager", **overrides):
    """(zoo LM, transformers model) with the same weights, in eval mode."""
    torch.manual_seed(0)
    ours = zoo.load(name, **{**SMALL, **overrides}).eval()
    theirs = to_transformers(ours, attn_implementation=attn)
    return ours, theirs


MODELS = ["lm-dense-tiny", "moe-tiny"]


@pytest.mark.parametrize("name", MODELS)
def test_logits_hidden_states_and_attentions_equal_transformers(name):
    ours, theirs = pair(name)
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        a = ours(x, output_hidden_states=True, output_attentions=True)
        b = theirs(x, output_hidden_states=True, output_attentions=True)
    torch.testing.assert_close(a.logits, b.logits, atol=ATOL, rtol=ATOL)
    assert len(a.hidden_states) == len(b.hidden_states) == 3
    for h_ours, h_theirs in zip(a.hidden_states, b.hidden_states, strict=True):
        torch.testing.assert_close(h_ours, h_theirs, atol=ATOL, rtol=ATOL)
    assert len(a.attentions) == len(b.attentions) == 2
    for w_ours, w_theirs in zip(a.attentions, b.attentions, strict=True):
        torch.testing.assert_close(w_ours, w_theirs, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("name", MODELS)
def test_loss_with_labels_shift_labels_and_num_items_equals_transformers(name):
    ours, theirs = pair(name)
    x = torch.randint(0, 256, (2, 12))
    labels = x.clone()
    labels[0, :4] = -100
    shift = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    shift[1, 3] = -100  # differs from labels: shows that shift_labels is the one used
    with torch.no_grad():
        for kwargs in ({"labels": labels}, {"labels": labels, "shift_labels": shift},
                       {"labels": labels, "num_items_in_batch": 7}):
            a, b = ours(x, **kwargs), theirs(x, **kwargs)
            aux = sum(a.aux_losses.values()) if a.aux_losses else 0.0
            torch.testing.assert_close(a.loss - aux, b.loss, atol=ATOL, rtol=ATOL)
    if name == "moe-tiny":  # the router's balance and z losses are part of the loss fine-tuning minimises
        assert set(a.aux_losses) == {"moe_balance_loss", "moe_z_loss"} and float(aux) > 0


def test_router_logits_on_request_equal_mixtrals():
    ours, theirs = pair("moe-tiny")
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        a = ours(x, output_router_logits=True)
        b = theirs(x, output_router_logits=True)
    assert len(a.router_logits) == len(b.router_logits) == 2
    for r_ours, r_theirs in zip(a.router_logits, b.router_logits, strict=True):
        torch.testing.assert_close(r_ours, r_theirs.view_as(r_ours).float(), atol=ATOL, rtol=ATOL)
    assert ours(x).router_logits is None


def test_return_dict_false_gives_the_tuple_transformers_gives():
    ours, theirs = pair()
    x = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        a, b = ours(x, return_dict=False, use_cache=False), theirs(x, return_dict=False, use_cache=False)
    assert isinstance(a, tuple) and len(a) == len(b)
    torch.testing.assert_close(a[0], b[0], atol=ATOL, rtol=ATOL)
    with torch.no_grad():
        loss, logits = ours(x, labels=x, return_dict=False, use_cache=False)[:2]
    assert loss.dim() == 0 and logits.shape == (1, 8, 256)


def test_eager_and_sdpa_select_the_two_dense_paths_and_agree():
    ours, _ = pair()
    x = torch.randint(0, 256, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :5] = 0
    with torch.no_grad():
        ours.set_attn_implementation("sdpa")
        sdpa = ours(x, attention_mask=mask).logits
        ours.set_attn_implementation("eager")
        eager = ours(x, attention_mask=mask).logits
    assert ours.config._attn_implementation == "eager"
    torch.testing.assert_close(eager, sdpa, atol=ATOL, rtol=ATOL)


def test_use_cache_is_a_config_field_and_past_key_values_is_its_alias():
    assert ZooLMConfig(use_cache=False).use_cache is False and ZooLMConfig().use_cache is True
    ours, _ = pair()
    x = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        first = ours(x[:, :4])
        assert first.cache is not None  # use_cache defaults to True, as in transformers
        ours.config.use_cache = False
        assert ours(x[:, :4]).cache is None
        via_alias = ours(x[:, 4:], past_key_values=first.cache, use_cache=True)
        full = ours(x, use_cache=False)
    torch.testing.assert_close(via_alias.logits, full.logits[:, 4:], atol=ATOL, rtol=ATOL)
    with pytest.raises(ValueError, match="not both"):
        ours(x[:, 4:], cache=first.cache, past_key_values=type(first.cache)(config=ours.config))


def test_4d_causal_masks_are_honoured_and_other_4d_masks_refused():
    ours, _ = pair()
    x = torch.randint(0, 256, (2, 6))
    pad = torch.ones(2, 6, dtype=torch.bool)
    pad[1, :2] = False
    causal = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    four_d = causal[None, None] & pad[:, None, None, :]  # (2, 1, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, attention_mask=four_d).logits[0], ours(x, attention_mask=pad).logits[0])
        additive = torch.zeros(2, 1, 6, 6).masked_fill(~four_d, torch.finfo(torch.float32).min)
        torch.testing.assert_close(ours(x, attention_mask=additive).logits[1, 2:],
                                   ours(x, attention_mask=pad).logits[1, 2:])
    with pytest.raises(ValueError, match="not a causal mask with key padding"):
        ours(x, attention_mask=torch.ones(2, 1, 6, 6, dtype=torch.bool))  # bidirectional: refused


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("mode", ["greedy", "sample", "beam", "static", "assisted"])
def test_generate_equals_transformers(name, mode):
    ours, theirs = pair(name)
    x = torch.randint(0, 256, (2, 7))
    kwargs = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
    if mode == "sample":
        kwargs.update(do_sample=True, top_k=20)
    if mode == "beam":
        kwargs.update(num_beams=3)
    if mode == "static":
        kwargs.update(cache_implementation="static")
    outs = []
    for model in (ours, theirs):
        torch.manual_seed(123)
        extra = {"assistant_model": model} if mode == "assisted" else {}
        with torch.no_grad():
            outs.append(model.generate(x if mode != "assisted" else x[:1], **kwargs, **extra))
    assert torch.equal(outs[0], outs[1]), mode


@pytest.mark.parametrize("name", MODELS)
def test_left_padded_batches_generate_as_transformers_does(name):
    ours, theirs = pair(name)
    x = torch.randint(1, 256, (2, 9))
    mask = torch.ones_like(x)
    x[1, :3], mask[1, :3] = 0, 0
    outs = []
    for model in (ours, theirs):
        with torch.no_grad():
            outs.append(model.generate(x, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0))
    assert torch.equal(outs[0], outs[1])


def test_generate_returns_attentions_and_hidden_states_in_a_dict():
    ours, theirs = pair()
    x = torch.randint(0, 256, (1, 5))
    kwargs = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_attentions=True,
                  output_hidden_states=True, output_scores=True, pad_token_id=0)
    with torch.no_grad():
        a, b = ours.generate(x, **kwargs), theirs.generate(x, **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    assert len(a.attentions) == len(b.attentions) == 4
    for step_ours, step_theirs in zip(a.attentions, b.attentions, strict=True):
        for w_ours, w_theirs in zip(step_ours, step_theirs, strict=True):
            torch.testing.assert_close(w_ours, w_theirs, atol=ATOL, rtol=ATOL)
    for s_ours, s_theirs in zip(a.scores, b.scores, strict=True):
        torch.testing.assert_close(s_ours, s_theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_continuing_from_a_cache_equals_a_full_forward(cache):
    ours, _ = pair()
    x = torch.randint(0, 256, (2, 14))
    kv = StaticCache(config=ours.config, max_cache_len=32) if cache == "static" else None
    with torch.no_grad():
        out = ours(x[:, :6], cache=kv, use_cache=True)
        steps = [out.logits]
        for t in range(6, 14):
            out = ours(x[:, t:t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
        full = ours(x, use_cache=False).logits
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("attention, kwargs", [
    ("local", {"window": 4}), ("lsh", {"n_buckets": 2, "chunk": 4}), ("performer", {"n_features": 16}),
    ("scatterbrain", {"n_features": 16, "window": 4})])
def test_sparse_kinds_decode_from_a_static_cache_as_a_full_recomputation(attention, kwargs):
    torch.manual_seed(0)
    ours = zoo.load("lm-dense-tiny", **SMALL, attention=attention, attention_kwargs=kwargs).eval()
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        out = ours(x[:, :5], cache=StaticCache(config=ours.config, max_cache_len=16), use_cache=True)
        steps = [out.logits]
        for t in range(5, 12):
            out = ours(x[:, t:t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
        full = [ours(x[:, :t + 1], use_cache=False).logits[:, -1:] for t in range(4, 12)]
    torch.testing.assert_close(torch.cat(steps, 1)[:, 4:], torch.cat(full, 1), atol=1e-4, rtol=1e-4)


def test_kinds_that_never_form_attention_weights_say_so():
    torch.manual_seed(0)
    ours = zoo.load("lm-dense-tiny", **SMALL, attention="performer", attention_kwargs={"n_features": 16}).eval()
    with pytest.raises(ValueError, match="'performer' never forms attention weights.*dense.*local"):
        ours(torch.randint(0, 256, (1, 6)), output_attentions=True)


def test_local_attention_weights_are_the_ones_it_uses():
    torch.manual_seed(0)
    ours = zoo.load("lm-dense-tiny", **SMALL, attention="local", attention_kwargs={"window": 3}).eval()
    x = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        out = ours(x, output_attentions=True)
    w = out.attentions[0]  # (1, heads, 8, 8): each query sees itself and the 2 keys before it
    assert w.shape == (1, 4, 8, 8)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 4, 8))
    allowed = torch.tril(torch.ones(8, 8)) - torch.tril(torch.ones(8, 8), diagonal=-3)
    assert bool((w[..., allowed == 0] == 0).all()) and bool((w[..., allowed == 1] > 0).all())


@pytest.mark.parametrize("overrides", [
    {}, {"attention": "local", "attention_kwargs": {"window": 4}},
    {"attention": "lsh", "attention_kwargs": {"n_buckets": 2, "chunk": 4}},
    {"attention": "performer", "attention_kwargs": {"n_features": 16}},
    {"attention": "scatterbrain", "attention_kwargs": {"n_features": 16, "window": 4}},
    {"mlp": "moe", "d_ff": 64}, {"linear": "monarch", "linear_kwargs": {"nblocks": 4}}],
    ids=["dense", "local", "lsh", "performer", "scatterbrain", "moe", "monarch"])
def test_gradient_checkpointing_gives_the_same_gradients(overrides):
    torch.manual_seed(0)
    model = zoo.load("lm-dense-tiny", **SMALL, **overrides).train()
    x = torch.randint(0, 256, (2, 16))

    def grads():
        model.zero_grad()
        out = model(x, labels=x, use_cache=False)
        out.loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_backbone_and_head_split_as_transformers_models_have_it(tmp_path):
    ours, _ = pair()
    assert isinstance(ours, ZooLMForCausalLM) and isinstance(ours.base_model, ZooLMModel)
    assert ours.base_model is ours.model and ours.base_model is not ours
    ours.save_pretrained(tmp_path)
    backbone = AutoModel.from_pretrained(tmp_path).eval()
    causal = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(backbone, ZooLMModel) and isinstance(causal, ZooLMForCausalLM)
    x = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(backbone(x).last_hidden_state, ours(x, output_hidden_states=True).hidden_states[-1])
        torch.testing.assert_close(causal(x).logits, ours(x).logits)


def test_lsh_attention_weights_are_the_ones_it_uses():
    from layers.attention.common import repeat_kv_heads
    from layers.attention.lsh import LSHAttention

    torch.manual_seed(0)
    kind = LSHAttention(8, n_buckets=4, chunk=4)
    q, k, v = torch.randn(2, 2, 11, 8), torch.randn(2, 1, 11, 8), torch.randn(2, 1, 11, 8)
    out, weights = kind(q, k, v, causal=True, return_weights=True)
    torch.testing.assert_close(out, kind(q, k, v, causal=True))
    _, v_rep = repeat_kv_heads(q, k, v)
    torch.testing.assert_close(weights @ v_rep, out, atol=1e-6, rtol=1e-5)  # the weights produce the output
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 11))
    assert bool((weights.triu(1) == 0).all())  # causal
    assert int((weights > 0).sum(-1).max()) <= 4 + 1  # its chunk plus itself


@pytest.mark.parametrize("attention, kwargs", [("performer", {"n_features": 16}), ("lsh", {"n_buckets": 4}),
                                               ("scatterbrain", {"n_features": 16, "window": 4})])
def test_a_dense_checkpoint_loaded_with_a_random_projection_kind_initialises_its_buffers(attention, kwargs, tmp_path):
    torch.manual_seed(0)
    zoo.load("lm-dense-tiny", **SMALL).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attention=attention, attention_kwargs=kwargs)
    projections = [m for m in model.modules() if type(m).__name__ == "RandomProjection"]
    assert projections
    for projection in projections:  # drawn from its seed, not uninitialised memory
        assert bool(torch.isfinite(projection.weight).all())
        torch.testing.assert_close(projection.weight, projection.draw(0))
    half = AutoModelForCausalLM.from_pretrained(tmp_path, attention=attention, attention_kwargs=kwargs,
                                                dtype=torch.float16)  # QR has no CPU half kernel: drawn in fp32
    assert all(m.weight.dtype == torch.float16 for m in half.modules() if type(m).__name__ == "RandomProjection")


@pytest.mark.parametrize("attention, kwargs", [
    ("local", {"window": 4}), ("lsh", {"n_buckets": 2, "chunk": 4}), ("performer", {"n_features": 16}),
    ("scatterbrain", {"n_features": 16, "window": 4})])
def test_sparse_kinds_generate_with_a_cache_as_without_one(attention, kwargs):
    """The full recomputation (use_cache=False re-reads the whole sequence each step) is the oracle."""
    torch.manual_seed(0)
    ours = zoo.load("lm-dense-tiny", **SMALL, attention=attention, attention_kwargs=kwargs).eval()
    x = torch.randint(1, 256, (2, 6))
    mask = torch.ones_like(x)
    mask[1, :2] = 0
    runs = []
    for use_cache in (True, False):
        with torch.no_grad():
            runs.append(ours.generate(x, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                                      use_cache=use_cache))
    assert torch.equal(runs[0], runs[1])


def test_a_cache_that_drops_keys_is_refused_not_misread():
    from transformers.cache_utils import Cache, DynamicSlidingWindowLayer

    ours, _ = pair()
    cache = Cache(layers=[DynamicSlidingWindowLayer(sliding_window=4) for _ in range(2)])
    x = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        out = ours(x[:, :6], cache=cache, use_cache=True)
        with pytest.raises(ValueError, match=r"returned 4 keys but 7 exist.*\(sliding-window caches\)"):
            ours(x[:, 6:7], cache=out.cache, use_cache=True)
