"""Harvesting LM activations through hooks into the on-disk store, and reading batches back."""

import numpy as np
import pytest
import torch

from train.activations import ActivationStore, edit_activation, harvest, lm_activations
from zoo import load

D = 32


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return load("lm-dense-tiny", d_model=D, n_layers=2, n_heads=2, max_seq_len=64)


def token_batches(n: int = 4, batch: int = 3, seq: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 256, (batch, seq), generator=g) for _ in range(n)]


def block0_by_hand(lm, ids: torch.Tensor) -> torch.Tensor:
    """The residual stream after block 0, computed from the LM's parts without any hook."""
    x = lm.embed(ids)
    cos, sin = lm.rotary(torch.arange(ids.shape[1]).expand_as(ids), x.dtype)
    return lm.blocks[0](x, cos, sin)


def sort_rows(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    return a[np.lexsort(a.T[::-1])]


def test_harvest_returns_the_activations_of_a_direct_forward_pass(lm, tmp_path):
    batches = token_batches()
    with torch.no_grad():
        direct = torch.cat([block0_by_hand(lm, ids).reshape(-1, D) for ids in batches])
    store = harvest(lm, "blocks.0", batches, rows=len(direct), folder=tmp_path / "s", dtype="float32",
                    shuffle_rows=40, seed=0)
    assert (store.rows, store.d) == tuple(direct.shape)
    np.testing.assert_allclose(sort_rows(store.data), sort_rows(direct.numpy()), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(store.data), direct.numpy()), "the shuffle buffer reordered the rows"
    # the scale that gives unit mean squared norm
    assert store.act_scale ** 2 * float(direct.square().sum(-1).mean()) == pytest.approx(1.0, rel=1e-5)


def test_input_hook_points_and_float16_stores(lm, tmp_path):
    ids = token_batches(1)[0]
    with torch.no_grad():
        after_block0 = block0_by_hand(lm, ids)
    torch.testing.assert_close(lm_activations(lm, ids, "blocks.1:input"), after_block0)
    store = harvest(lm, "blocks.1:input", [ids], rows=ids.numel(), folder=tmp_path / "h", shuffle_rows=10_000)
    assert store.data.dtype == np.float16
    np.testing.assert_allclose(sort_rows(store.data), sort_rows(after_block0.reshape(-1, D).numpy()), rtol=2e-3,
                               atol=2e-3)
    with pytest.raises(ValueError, match="no module 'blocks.9'"):
        lm_activations(lm, ids, "blocks.9")


def test_harvest_from_a_transformers_causal_lm(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=D, n_head=2, vocab_size=256, n_positions=64)).eval()
    ids = token_batches(1)[0]
    with torch.no_grad():
        hidden = gpt2(input_ids=ids, output_hidden_states=True).hidden_states[1]  # after block 0
    torch.testing.assert_close(lm_activations(gpt2, ids, "transformer.h.0"), hidden)
    store = harvest(gpt2, "transformer.h.0", [ids], rows=ids.numel(), folder=tmp_path / "g", dtype="float32")
    np.testing.assert_allclose(sort_rows(store.data), sort_rows(hidden.reshape(-1, D).numpy()), rtol=1e-5,
                               atol=1e-5)


def test_edit_activation_splices_a_replacement_into_the_forward_pass(lm):
    ids = token_batches(1)[0]
    with torch.no_grad():
        clean = lm(input_ids=ids).logits
        with edit_activation(lm, "blocks.0", lambda a: a.clone()):
            same = lm(input_ids=ids).logits
        with edit_activation(lm, "blocks.1", torch.zeros_like):  # the last block: the head sees norm(0) = 0
            zeroed = lm(input_ids=ids).logits
        after = lm(input_ids=ids).logits
    torch.testing.assert_close(same, clean)
    assert torch.count_nonzero(zeroed) == 0
    torch.testing.assert_close(after, clean)  # the hook is gone after the with block


def test_store_batches_are_a_pure_function_of_seed_and_step(lm, tmp_path):
    store = harvest(lm, "blocks.0", token_batches(4, batch=4, seq=16), rows=256, folder=tmp_path / "b")
    again = ActivationStore(tmp_path / "b")
    torch.testing.assert_close(store.batch(5, 32, seed=1), again.batch(5, 32, seed=1))
    assert not torch.equal(store.batch(5, 32, seed=1), store.batch(6, 32, seed=1))
    assert not torch.equal(store.batch(5, 32, seed=1), store.batch(5, 32, seed=2))
    # one epoch (8 chunks of 32) visits every row once; two ranks split each batch
    epoch = torch.cat([store.batch(s, 32, seed=1) for s in range(8)])
    np.testing.assert_array_equal(sort_rows(epoch), sort_rows(store.slice(0, 256)))
    halves = torch.cat([store.batch(3, 32, seed=1, rank=r, world=2) for r in range(2)])
    torch.testing.assert_close(halves, store.batch(3, 32, seed=1))
