"""The catalog: list_models(), load(name, **overrides) and register()."""

import pytest
import torch

from zoo import CATALOG, list_models, load, register
from zoo.catalog import FAMILIES

SEQ = 8


def forward_check(family: str, model) -> None:
    """Run a short input through a freshly built catalog model and check the output's shape and values."""
    if family == "lm":
        ids = torch.randint(0, model.config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = model(ids).logits
        assert logits.shape == (2, SEQ, model.config.vocab_size)
        assert torch.isfinite(logits).all()
    elif family == "sae":
        x = torch.randn(2, SEQ, model.config.d_in, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            latents = model.encode(x)
            x_hat = model.decode(latents)
        assert latents.shape == (2, SEQ, model.config.d_sae)
        assert x_hat.shape == x.shape and torch.isfinite(x_hat).all()
    else:
        pytest.fail(f"tests/zoo/test_catalog.py has no forward check for family {family!r}: add one")


def test_list_models_returns_every_catalog_name_with_family_and_size():
    entries = list_models()
    assert sorted(e.name for e in entries) == sorted(CATALOG)
    for e in entries:
        assert e.family in FAMILIES
        assert e.size in ("tiny", "small", "base")


def test_list_models_filters_by_glob():
    entries = list_models("lm-*")
    assert entries, "the catalog has LM entries"
    assert {e.name for e in entries} == {n for n in CATALOG if n.startswith("lm-")}
    assert list_models("*-tiny") == [CATALOG[n] for n in sorted(CATALOG) if n.endswith("-tiny")]
    assert list_models("no-such-model-*") == []


def test_unknown_name_suggests_close_names():
    with pytest.raises(ValueError, match="lm-dense-tiny") as info:
        load("lm-dense-tiy")
    assert "Did you mean" in str(info.value)


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_every_catalog_name_builds_and_runs_forward(name):
    model = load(name)
    assert not model.training, "load() returns a model in eval mode"
    forward_check(CATALOG[name].family, model)
    assert model.config.zoo_name == name


def test_override_changes_the_built_model():
    model = load("lm-dense-tiny", n_layers=2)
    assert len(model.blocks) == 2
    assert model.config.n_layers == 2
    assert len(load("lm-dense-tiny").blocks) == CATALOG["lm-dense-tiny"].config["n_layers"] != 2


def test_override_does_not_change_the_catalog_entry():
    before = dict(CATALOG["lm-dense-tiny"].config)
    load("lm-dense-tiny", n_layers=1, d_model=64)
    assert CATALOG["lm-dense-tiny"].config == before


def test_unknown_override_field_suggests_the_close_field():
    with pytest.raises(ValueError, match="n_layerz") as info:
        load("lm-dense-tiny", n_layerz=2)
    assert "'n_layers'" in str(info.value)


@pytest.mark.parametrize(
    "overrides, field",
    [({"n_layers": "x"}, "n_layers"), ({"d_model": 66, "n_heads": 4}, "d_model"), ({"n_heads": 0}, "n_heads"),
     ({"attention": "nope"}, "attention"), ({"tie_word_embeddings": "no"}, "tie_word_embeddings"),
     ({"mlp_kwargs": [1]}, "mlp_kwargs"), ({"zoo_name": 3}, "zoo_name")],
)
def test_bad_override_is_a_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        load("lm-dense-tiny", **overrides)


def test_register_refuses_a_duplicate_name():
    before = CATALOG["lm-dense-tiny"]
    with pytest.raises(ValueError, match="already registered"):
        register("lm-dense-tiny", "lm", "tiny", {"n_layers": 1}, "a clash")
    assert CATALOG["lm-dense-tiny"] is before


def test_register_refuses_an_unknown_family():
    with pytest.raises(ValueError, match="unknown model family") as info:
        register("zz-test-nofamily", "no-such-family", "tiny", {}, "bad family")
    assert "'lm'" in str(info.value), "the error lists the known families"
    assert "zz-test-nofamily" not in CATALOG


def test_register_refuses_an_unknown_size():
    with pytest.raises(ValueError, match="size"):
        register("zz-test-badsize", "lm", "huge", {}, "bad size")
    assert "zz-test-badsize" not in CATALOG


def test_registered_entry_is_listed_and_loadable():
    name = "zz-test-lm-registered"
    try:
        register(name, "lm", "tiny", {"d_model": 64, "n_layers": 1, "n_heads": 2}, "registered by a test")
        assert [e.name for e in list_models("zz-test-*")] == [name]
        model = load(name)
        assert model.config.d_model == 64 and len(model.blocks) == 1
    finally:
        CATALOG.pop(name, None)
