"""Property: whatever config.json or safetensors header a checkpoint folder holds, zoo.load either returns a
model or raises the documented error (ValueError, FileNotFoundError) naming the file, quickly and without
allocating for sizes the weights do not back; never another exception (issue 16)."""

import json
import resource
import shutil
import struct
import tempfile
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zoo import load

FUZZ = settings(max_examples=120, deadline=timedelta(seconds=5), derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """A tiny LM, a tiny MoE LM and a tiny SAE checkpoint to mutate."""
    root = tmp_path_factory.mktemp("fuzz-bases")
    torch.manual_seed(0)
    load("lm-dense-tiny", n_layers=1, d_model=16, d_ff=32).save_pretrained(root / "lm")
    load("moe-tiny", n_layers=1, d_model=16, d_ff=32).save_pretrained(root / "moe")
    load("sae-topk-tiny", d_in=8, d_sae=32, k=4).save_pretrained(root / "sae")
    return {p.name: p for p in root.iterdir()}


def copy_of(base: Path) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="zoo-fuzz-"))
    shutil.copytree(base, folder, dirs_exist_ok=True)
    return folder


def loads_or_names_the_folder(folder: Path) -> None:
    """The property itself."""
    try:
        model = load(folder)
    except (ValueError, FileNotFoundError) as err:
        assert str(folder) in str(err), f"the error does not name the checkpoint: {err}"
    else:
        assert isinstance(model, torch.nn.Module)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ---- config.json ---------------------------------------------------------------------------------------

HUGE = st.sampled_from([0, -1, 1, 2, 3, 7, 10 ** 6, 10 ** 7, 10 ** 9, 10 ** 12, 2 ** 31, 2 ** 63 - 1, 2 ** 63,
                        10 ** 30, 10 ** 400])
SCALARS = st.one_of(st.none(), st.booleans(), HUGE, st.integers(-5, 100),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                    st.sampled_from(["dense", "local", "moe", "topk", "relu", "float16", "float99", "zoo_lm",
                                     "zoo_sae", "auto", "blocks.0", ""]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)


@st.composite
def config_edits(draw, fields: list[str]):
    """(field -> new value, fields to delete); kind kwargs get plausible option names."""
    names = st.sampled_from([*fields, "num_experts", "extra_field", "__class__"])
    edits = draw(st.dictionaries(names, VALUES, max_size=4))
    for kwargs in ("attention_kwargs", "mlp_kwargs", "kind_kwargs"):
        if kwargs in fields and draw(st.booleans()):
            options = st.sampled_from(["window", "num_experts", "num_experts_per_tok", "router", "block_size",
                                       "n_buckets", "rank", "features", "top_p", "x"])
            edits[kwargs] = draw(st.dictionaries(options, VALUES, max_size=3))
    nest = draw(st.sampled_from([None] * 10 + [40, 2000]))  # a field nested this deep (built in the test:
    deleted = draw(st.lists(st.sampled_from(fields), max_size=2))  # hypothesis could not print it)
    return edits, deleted, (draw(st.sampled_from(fields)), nest)


@pytest.mark.parametrize("base_name", ["lm", "moe", "sae"])
def test_any_config_json_loads_or_is_a_clear_error(bases, base_name):
    fields = sorted(json.loads((bases[base_name] / "config.json").read_text()))

    @FUZZ
    @given(config_edits(fields), st.sampled_from([None] * 10 + ["cut", "not utf-8"]))
    def check(change, garble):
        edits, deleted, (nested, depth) = change
        if depth:
            edits = {**edits, nested: "__deep__"}
        folder = copy_of(bases[base_name])
        file = folder / "config.json"
        config = {k: v for k, v in json.loads(file.read_text()).items() if k not in deleted}
        text = json.dumps({**config, **edits}).encode()  # NaN / Infinity written as JSON's extensions
        text = text.replace(b'"__deep__"', b'{"a": ' * (depth or 0) + b"1" + b"}" * (depth or 0))
        if garble == "cut":
            text = text[: len(text) // 2]
        elif garble == "not utf-8":
            text = b"\xff\xfe" + text
        file.write_bytes(text)
        loads_or_names_the_folder(folder)

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    check()
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 1024, "memory stayed bounded"


# ---- safetensors headers -------------------------------------------------------------------------------

def split(file: Path) -> tuple[dict, bytes]:
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join(header: dict, data: bytes, length: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text) if length is None else length) + text + data


DIMS = st.one_of(st.integers(0, 64), st.sampled_from([2 ** 31, 2 ** 40, 2 ** 62, 2 ** 64 - 1]))


@st.composite
def header_edits(draw, names: list[str]):
    """A list of (kind, tensor name, value) edits of a safetensors header."""
    edit = st.one_of(
        st.tuples(st.just("shape"), st.sampled_from(names), st.lists(DIMS, max_size=4)),
        st.tuples(st.just("dtype"), st.sampled_from(names),
                  st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "I8", "BOOL", "U8", "F8_E4M3", "XYZ", 3])),
        st.tuples(st.just("offsets"), st.sampled_from(names),
                  st.lists(st.one_of(st.integers(0, 10 ** 6), st.sampled_from([2 ** 40, 2 ** 64 - 1, -1])),
                           min_size=0, max_size=3)),
        st.tuples(st.just("rename"), st.sampled_from(names), st.text(max_size=12)),
        st.tuples(st.just("drop"), st.sampled_from(names), st.none()),
        st.tuples(st.just("add"), st.text(max_size=12), st.lists(DIMS, max_size=3)),
        st.tuples(st.just("metadata"), st.just("__metadata__"), VALUES),
    )
    return draw(st.lists(edit, min_size=1, max_size=3))


@pytest.mark.parametrize("base_name", ["lm", "sae"])
def test_any_safetensors_header_loads_or_is_a_clear_error(bases, base_name):
    header0, data0 = split(bases[base_name] / "model.safetensors")
    names = sorted(k for k in header0 if k != "__metadata__")

    @FUZZ
    @given(header_edits(names), st.sampled_from([None] * 8 + ["length", "truncated", "padded"]),
           st.integers(0, 10 ** 7))
    def check(edits, damage, number):
        header, data = json.loads(json.dumps(header0)), data0
        for kind, name, value in edits:
            entry = header.get(name)
            if kind == "rename" and entry is not None:
                header[value] = header.pop(name)
            elif kind == "drop":
                header.pop(name, None)
            elif kind == "add":
                size = 4
                for dim in value:
                    size *= dim
                header[name] = {"dtype": "F32", "shape": value, "data_offsets": [len(data), len(data) + size]}
            elif kind == "metadata":
                header["__metadata__"] = value
            elif isinstance(entry, dict):
                entry[{"shape": "shape", "dtype": "dtype", "offsets": "data_offsets"}[kind]] = value
        blob = join(header, data, length=number if damage == "length" else None)
        if damage == "truncated":
            blob = blob[: number % max(1, len(blob))]
        elif damage == "padded":
            blob = blob + bytes(number % 4096)
        folder = copy_of(bases[base_name])
        (folder / "model.safetensors").write_bytes(blob)
        loads_or_names_the_folder(folder)

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    check()
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 1024, "memory stayed bounded"


STORED = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
                          torch.int8, torch.uint8, torch.bool])


@st.composite
def tensor_edits(draw, names: list[str]):
    """Edits that keep the file a valid safetensors file: rename, drop, reshape, cast, add."""
    edit = st.one_of(
        st.tuples(st.just("rename"), st.sampled_from(names), st.sampled_from([*names, "x", "blocks.9.w", ""])),
        st.tuples(st.just("drop"), st.sampled_from(names), st.none()),
        st.tuples(st.just("flatten"), st.sampled_from(names), st.none()),
        st.tuples(st.just("cast"), st.sampled_from(names), STORED),
        st.tuples(st.just("add"), st.sampled_from(["extra", "lm_head.weight", "model.embed.weight", *names]),
                  st.lists(st.integers(0, 40), max_size=3)),
    )
    return draw(st.lists(edit, min_size=1, max_size=3))


@pytest.mark.parametrize("base_name", ["lm", "moe", "sae"])
def test_valid_safetensors_with_other_names_shapes_and_dtypes_load_or_are_a_clear_error(bases, base_name):
    from safetensors.torch import load_file, save_file

    tensors0 = load_file(bases[base_name] / "model.safetensors")
    names = sorted(tensors0)

    @FUZZ
    @given(tensor_edits(names))
    def check(edits):
        tensors = dict(tensors0)
        for kind, name, value in edits:
            if kind == "add":
                tensors[name] = torch.zeros(value)
            elif name not in tensors:
                continue
            elif kind == "rename":
                tensors[value] = tensors.pop(name)
            elif kind == "drop":
                tensors.pop(name)
            elif kind == "flatten":
                tensors[name] = tensors[name].reshape(-1)
            elif kind == "cast":
                tensors[name] = tensors[name].to(value)
        folder = copy_of(bases[base_name])
        save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a cast is warned of, and allowed
            loads_or_names_the_folder(folder)

    check()
