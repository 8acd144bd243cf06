"""A hostile or malformed checkpoint costs no more than a clear error (issue 16 items 10, 11): config.json
is checked field by field, the safetensors header against the model the config implies (built on the meta
device, stopped as soon as it outgrows the file), and only expected tensors are ever read."""

import contextlib
import json
import resource
import signal
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from zoo import load


@contextlib.contextmanager
def within(seconds: int):
    """Fail (instead of hanging the suite) when a load takes minutes: the defect being pinned."""
    def expired(signum, frame):
        raise TimeoutError(f"still loading after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture
def lm_folder(tmp_path) -> Path:
    torch.manual_seed(0)
    load("lm-dense-tiny", n_layers=1, d_model=32).save_pretrained(tmp_path / "lm")
    return tmp_path / "lm"


@pytest.fixture
def sae_folder(tmp_path) -> Path:
    torch.manual_seed(0)
    load("sae-topk-tiny", d_in=16, d_sae=64, k=4).save_pretrained(tmp_path / "sae")
    return tmp_path / "sae"


def edit_config(folder: Path, **fields) -> Path:
    file = folder / "config.json"
    config = json.loads(file.read_text())
    config.update(fields)
    file.write_text(json.dumps(config))
    return file


# ---- item 10: sizes the weights cannot back ------------------------------------------------------------

@pytest.mark.parametrize("fields", [
    {"d_model": 10_000_000, "n_heads": 2, "d_ff": None},
    {"vocab_size": 1_000_000_000},
    {"n_layers": 1_000_000},
    {"mlp": "moe", "mlp_kwargs": {"num_experts": 1_000_000, "num_experts_per_tok": 2}},
    {"attention": "local", "attention_kwargs": {"window": 1_000_000_000}, "n_layers": 100_000},
], ids=["d_model", "vocab", "layers", "experts", "window+layers"])
def test_a_config_larger_than_its_weights_is_an_error_at_once(lm_folder, fields):
    file = edit_config(lm_folder, **fields)
    before = peak_rss_mib()
    with within(60), pytest.raises(ValueError, match=str(file)):
        load(lm_folder)
    assert peak_rss_mib() - before < 500, "nothing was allocated for the model the config describes"


@pytest.mark.parametrize("fields", [{"d_sae": 1_000_000_000}, {"d_in": 1_000_000_000},
                                    {"d_sae": 1_000_000_000, "k": 1_000_000}])
def test_an_sae_config_larger_than_its_weights_is_an_error_at_once(sae_folder, fields):
    file = edit_config(sae_folder, **fields)
    before = peak_rss_mib()
    with within(60), pytest.raises(ValueError, match=str(file)):
        load(sae_folder)
    assert peak_rss_mib() - before < 500


def write_with_extra_tensor(source: Path, out: Path, name: str, shape: tuple[int, ...]) -> None:
    """The tensors of `source` plus one declared F32 tensor whose bytes are a hole in a sparse file."""
    tensors = load_file(source)
    header, offset, blobs = {}, 0, []
    for key, tensor in tensors.items():
        data = tensor.contiguous().numpy().tobytes()
        header[key] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    size = 4 * int(torch.tensor(shape).prod())
    header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(out, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))
        f.truncate(8 + len(text) + offset + size)  # the hole costs no disk


def test_an_unexpected_huge_tensor_is_refused_from_the_header_without_reading_it(lm_folder, monkeypatch):
    import zoo.loading

    weights = lm_folder / "model.safetensors"
    write_with_extra_tensor(weights, lm_folder / "hostile.safetensors", "junk", (1 << 18, 1 << 10))  # 1 GiB
    (lm_folder / "hostile.safetensors").replace(weights)
    read = []

    class Recording:  # safe_open, noting which tensors are read
        def __init__(self, *args, **kwargs):
            self.inner = real(*args, **kwargs)

        def __enter__(self):
            self.file = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def get_tensor(self, name):
            read.append(name)
            return self.file.get_tensor(name)

        def __getattr__(self, name):
            return getattr(self.file, name)

    real = zoo.loading.safe_open
    monkeypatch.setattr(zoo.loading, "safe_open", Recording)
    with pytest.raises(ValueError, match=r"model\.safetensors does not match .*unexpected tensors \['junk'\]"):
        load(lm_folder)
    assert read == [], "no tensor is read before the header matches"


# ---- item 11: malformed config fields ---------------------------------------------------------------

@pytest.mark.parametrize("fields, field", [
    ({"model_type": ["zoo_lm"]}, "model_type"),
    ({"dtype": "float99"}, "dtype"),
    ({"rope_theta": float("nan")}, "rope_theta"),
    ({"norm_eps": float("inf")}, "norm_eps"),
    ({"init_std": float("-inf")}, "init_std"),
    ({"attention_kwargs": {"window": float("nan")}}, "attention_kwargs.window"),
    ({"d_model": 10 ** 4000}, "d_model"),
    ({"n_layers": "2"}, "n_layers"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
])
def test_a_malformed_lm_config_field_is_a_value_error_naming_file_and_field(lm_folder, fields, field):
    file = edit_config(lm_folder, **fields)
    with pytest.raises(ValueError, match=rf"{file}.*'{field}'"):
        load(lm_folder)


@pytest.mark.parametrize("fields, field", [
    ({"normalize_decoder": "no"}, "normalize_decoder"),
    ({"act_scale": float("nan")}, "act_scale"),
    ({"matryoshka_widths": ["a"]}, "matryoshka_widths"),
    ({"k": 2.5}, "k"),
])
def test_a_wrongly_typed_sae_field_is_a_value_error_naming_file_and_field(sae_folder, fields, field):
    file = edit_config(sae_folder, **fields)
    with pytest.raises(ValueError, match=rf"{file}.*'{field}'"):
        load(sae_folder)


def test_deeply_nested_json_is_a_value_error(lm_folder):
    file = lm_folder / "config.json"
    file.write_text('{"model_type": "zoo_lm", "attention_kwargs": ' + '{"a": ' * 100_000 + "1" + "}" * 100_001)
    with pytest.raises(ValueError, match=rf"{file} is not valid JSON: nested too deeply"):
        load(lm_folder)


def test_a_5000_digit_integer_is_a_value_error_naming_the_file(lm_folder):
    file = lm_folder / "config.json"
    file.write_text(file.read_text().replace('"d_model": 32', '"d_model": ' + "9" * 5000))
    with pytest.raises(ValueError, match=rf"{file} is not valid JSON"):
        load(lm_folder)


# ---- item 11: weights in another dtype ----------------------------------------------------------------

def test_float16_weights_under_a_float32_config_are_cast_with_a_warning(lm_folder):
    weights = lm_folder / "model.safetensors"
    reference = load(lm_folder)
    save_file({k: v.half() for k, v in load_file(weights).items()}, weights)
    with pytest.warns(UserWarning, match=r"another dtype .* are cast"):
        model = load(lm_folder)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    for (name, ours), theirs in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(ours, theirs.half().float(), msg=name)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_or_bool_weights_are_refused(lm_folder, dtype):
    weights = lm_folder / "model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name].to(dtype)
    save_file(tensors, weights)
    with pytest.raises(ValueError, match=rf"tensor '{name}' is stored as {dtype} but .* needs float values"):
        load(lm_folder)
