"""`load()`: a catalog name, a local checkpoint folder or a Hub repo id -> a ready model.

Checkpoints are read by this module alone: config.json is parsed as JSON, weights come from
model.safetensors (or model.safetensors.index.json and the shards it names); nothing is unpickled
and no code from the checkpoint runs. A checkpoint costs no more than an error until it has proven
consistent: config.json is checked field by field (types, finite numbers, sizes), then the
safetensors headers are compared with the names, shapes and dtypes the config implies, computed on
the meta device without allocating (a build that outgrows what the weights file holds is stopped at
once); only then is the model built and only the expected tensors are read. Every problem is a
ValueError (FileNotFoundError for a missing file) naming the file and the field or tensor, and no
partially loaded model is ever returned.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import json
import math
import sys
import threading
import types
import typing
import warnings
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open
from torch.nn.modules import module as torch_module

from models.lm import drawn_buffers
from zoo import hub
from zoo.catalog import FAMILIES, get_entry
from zoo.interop import import_checkpoint, transformers_model_type

CONFIG_FILE, WEIGHTS_FILE, CARD_FILE, WEIGHTS_INDEX = "config.json", "model.safetensors", "README.md", hub.WEIGHTS_INDEX
MAX_JSON_BYTES = 16 << 20  # a config or an index is a few KB; more is not a checkpoint
MAX_JSON_DEPTH = 32  # config.json nests three levels (kind kwargs of kind kwargs)
MAX_INT = 2 ** 63 - 1  # no size or count of a model exceeds what an int64 holds
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}
_STORED_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                  "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                  "BOOL": torch.bool}
# Config failures a hostile config.json can provoke in a kind's validation or in a build on the meta device.
_BUILD_ERRORS = (StrictDataclassError, ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError,
                 ZeroDivisionError, RecursionError, RuntimeError, MemoryError, NotImplementedError)


def load(name_or_path: str, *, revision: str | None = None, force_download: bool = False,
         dtype: torch.dtype | str | None = None, **overrides):
    """Build a model from a catalog name (fresh weights), a checkpoint folder, or a Hub repo id.

    Keyword overrides replace config fields (validated), e.g. `load("lm-dense-tiny", n_layers=2)`.
    `dtype` (torch.float32 / bfloat16 / float16 / float64, their names, or "auto": the dtype config.json
    declares) is the dtype of the returned model's floating-point weights; float32 when not given.
    A Hub checkpoint is served from the local cache when it is there; `force_download=True` fetches it
    again (the error for an unreadable downloaded checkpoint says so).
    """
    dtype = requested_dtype(dtype)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return load_checkpoint(path, dtype=dtype, **overrides)
    try:
        entry = get_entry(str(name_or_path))
    except ValueError:
        if not hub.is_repo_id(str(name_or_path)):
            raise
        folder = hub.download(str(name_or_path), revision=revision, force_download=force_download)
        try:
            return load_checkpoint(folder, dtype=dtype, **overrides)
        except ValueError as err:  # a damaged cache reads as a damaged checkpoint: say how to fetch it again
            if force_download or hub.REDOWNLOAD_HINT in str(err):
                raise
            raise ValueError(f"{err}\n({hub.REDOWNLOAD_HINT})") from err
    config_cls, model_cls = FAMILIES[entry.family]
    config = make_config(config_cls, {**entry.config, "zoo_name": entry.name}, overrides, where=entry.name)
    return _in_dtype(build_model(model_cls, config, where=entry.name), dtype).eval()


def requested_dtype(dtype) -> torch.dtype | str | None:
    """A load() dtype argument as a torch floating dtype, "auto" or None; anything else is a ValueError."""
    if dtype is None or dtype == "auto":
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in FLOAT_DTYPES:
        return FLOAT_DTYPES[dtype.removeprefix("torch.")]
    if isinstance(dtype, torch.dtype) and dtype in FLOAT_DTYPES.values():
        return dtype
    raise ValueError(f"dtype={dtype!r} is invalid: one of {sorted(FLOAT_DTYPES)}, their torch dtypes, or 'auto'")


def _in_dtype(model, dtype: torch.dtype | None, declared: torch.dtype | None = None):
    """The model with floating-point weights in `dtype` ("auto": `declared`; None: float32); config.dtype says so."""
    dtype = (declared or torch.float32) if dtype == "auto" else (dtype or torch.float32)
    model.to(dtype)
    model.config.dtype = dtype
    return model


def _fields(config_cls) -> set[str]:
    return {f.name for f in dataclasses.fields(config_cls)}


def make_config(config_cls, fields: dict, overrides: dict, where: str):
    """config_cls(**fields, **overrides) with every problem turned into a ValueError naming `where`."""
    known = _fields(config_cls) | set(getattr(config_cls, "ALIASES", ()))
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"{key!r} is not a field of {config_cls.__name__} ({where}){hint}")
    try:
        return config_cls(**copy.deepcopy({**fields, **overrides}))
    except _BUILD_ERRORS as err:
        raise ValueError(f"invalid config for {where}: {err}") from err


def build_model(model_cls, config, where: str):
    """model_cls(config); a config that validates but cannot be built is a ValueError naming `where`."""
    try:
        return model_cls(config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"cannot build {model_cls.__name__} from {where}: {err}") from err


# ---- config.json --------------------------------------------------------------------------------------

def read_json(file: Path, what: str):
    """Parse a small JSON file strictly: size, UTF-8, depth, finite numbers, integers that fit int64."""
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: a zoo checkpoint folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    size = file.stat().st_size
    if size > MAX_JSON_BYTES:
        raise ValueError(f"{file} has {size:,} bytes; {what} is a few KB (at most {MAX_JSON_BYTES:,} accepted)")
    try:
        value = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{file} is not UTF-8 text: {err}") from err
    except RecursionError as err:
        raise ValueError(f"{file} is not valid JSON: nested too deeply") from err
    except ValueError as err:  # JSONDecodeError, and integers of more than 4300 digits
        raise ValueError(f"{file} is not valid JSON: {err}") from err
    _check_json_values(value, file)
    return value


def _check_json_values(value, file: Path) -> None:
    """Refuse NaN / Infinity, integers beyond int64 and nesting deeper than MAX_JSON_DEPTH, naming the field."""
    stack = [(value, "", 0)]
    while stack:
        item, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"{file}: field {path!r} is nested more than {MAX_JSON_DEPTH} levels deep")
        if isinstance(item, dict):
            stack.extend((v, f"{path}.{k}" if path else str(k), depth + 1) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(item))
        elif isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"{file}: field {path!r} = {item} is invalid: must be a finite number")
        elif isinstance(item, int) and not isinstance(item, bool) and abs(item) > MAX_INT:
            raise ValueError(f"{file}: field {path!r} = {str(item)[:20]}... ({len(str(abs(item)))} digits) is "
                             f"invalid: must be at most {MAX_INT}")


def read_config(folder: Path, **overrides):
    """Parse and validate folder/config.json into the zoo config class its model_type names."""
    file = folder / CONFIG_FILE
    raw = read_json(file, "a config")
    if not isinstance(raw, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(raw).__name__}")
    by_type = {cfg.model_type: (family, cfg) for family, (cfg, _) in FAMILIES.items()}
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in by_type:
        raise ValueError(f"{file}: field 'model_type' = {model_type!r} is not a zoo model type; "
                         f"known: {sorted(by_type)}")
    for name in ("dtype", "torch_dtype"):
        value = raw.get(name)
        if value is not None and (not isinstance(value, str) or value.removeprefix("torch.") not in FLOAT_DTYPES):
            raise ValueError(f"{file}: field {name!r} = {value!r} is invalid: one of {sorted(FLOAT_DTYPES)} or null")
    family, config_cls = by_type[model_type]
    # The versioned upgrade (models/versioning.py), the same that from_pretrained applies: an older
    # checkpoint's dict becomes today's, with the values that reproduce what it did.
    try:
        raw = config_cls.upgrade(raw)
    except _BUILD_ERRORS as err:
        raise ValueError(f"{file}: {err}") from err
    # Every field the zoo declares must then be present (a missing one would silently take a default) and
    # of its declared type (a config class need not check what its annotation says: "no" is truthy).
    declared = [f.name for f in dataclasses.fields(config_cls) if f.name in config_cls.__annotations__]
    missing = [name for name in declared if name not in raw]
    if missing:
        raise ValueError(f"{file} lacks the field(s) {missing} of {config_cls.__name__}")
    hints = _type_hints(config_cls)
    for name in declared:
        if name in hints and not _has_type(raw[name], hints[name]):
            raise ValueError(f"{file}: field {name!r} = {raw[name]!r} is invalid: must be {_describe(hints[name])}")
    raw.pop("model_type")
    return family, make_config(config_cls, raw, overrides, where=str(file))


def _type_hints(config_cls) -> dict:
    """The class's own field annotations, evaluated (one that does not evaluate is not checked)."""
    namespace = vars(sys.modules[config_cls.__module__])
    hints = {}
    for name, annotation in config_cls.__annotations__.items():
        try:
            hints[name] = eval(annotation, namespace) if isinstance(annotation, str) else annotation  # noqa: S307
        except Exception:  # noqa: BLE001, S112
            continue
    return hints


def _has_type(value, hint) -> bool:
    """Whether a JSON value fits a field annotation (int, float, bool, str, dict, list[X], unions, None)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if hint is list or origin is list:
        return isinstance(value, list) and all(_has_type(v, args[0]) for v in value) if args else isinstance(
            value, list)
    return True  # an annotation this check does not know: the config class validates it


def _describe(hint) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "an object",
             type(None): "null"}
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}s" if typing.get_args(hint) else "a list"
    return names.get(hint, getattr(hint, "__name__", str(hint)))


# ---- the weights files --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """A tensor as a safetensors header declares it: its stored name, shape, dtype and file."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path


def weight_files(folder: Path) -> list[Path]:
    """model.safetensors, or the shards model.safetensors.index.json names (checked to exist)."""
    single, index = folder / WEIGHTS_FILE, folder / WEIGHTS_INDEX
    if single.is_file() or not index.is_file():
        if not single.is_file():
            raise FileNotFoundError(f"{single} is missing: a zoo checkpoint folder holds {CONFIG_FILE} and "
                                    f"{WEIGHTS_FILE} (or {WEIGHTS_INDEX} and the shards it names)")
        return [single]
    read_json(index, "a weights index")  # size, depth and numbers first
    shards = [folder / name for name in hub.shard_names(index)]
    missing = [p.name for p in shards if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{index} names shards that are missing from {folder}: {missing[:8]}")
    return shards


def read_headers(files: list[Path]) -> list[StoredTensor]:
    """Every tensor's name, shape and dtype from the safetensors headers, without reading any tensor data.

    Shards must each hold exactly the tensors the index assigns to them.
    """
    index = files[0].parent / WEIGHTS_INDEX if files[0].name != WEIGHTS_FILE else None
    weight_map = read_json(index, "a weights index")["weight_map"] if index else {}
    found: list[StoredTensor] = []
    for file in files:
        here = []
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    part = f.get_slice(key)
                    stored = part.get_dtype()
                    if stored not in _STORED_DTYPES:
                        raise ValueError(f"{file}: tensor {key!r} has dtype {stored}, which zoo checkpoints do not "
                                         f"use (floats, integers or bool: {sorted(_STORED_DTYPES)})")
                    here.append(StoredTensor(key, tuple(part.get_shape()), _STORED_DTYPES[stored], file))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupt?): {err}") from err
        if index:
            names, meant = {t.name for t in here}, {k for k, v in weight_map.items() if v == file.name}
            if names != meant:
                raise ValueError(f"{file} does not hold what {index} says: tensors not in the index "
                                 f"{sorted(names - meant)[:8]}, tensors the index puts there but missing "
                                 f"{sorted(meant - names)[:8]}")
        found += here
    return found


# ---- the model the config describes, on the meta device -------------------------------------------------

class _OutgrowsTheFile(Exception):
    """A meta build registered more parameters (or elements) than the weights file could possibly hold."""


@contextlib.contextmanager
def _bounded_build(max_params: int, max_elements: int, max_modules: int):
    """Stop a model build (this thread's) as soon as it outgrows the bounds: a config of a few bytes can ask
    for a million layers, whose mere Python objects take minutes to create."""
    me, count = threading.get_ident(), {"params": 0, "elements": 0, "modules": 0}

    def on_parameter(module, name, param):
        if threading.get_ident() == me and param is not None:
            count["params"] += 1
            count["elements"] += param.numel()
            if count["params"] > max_params or count["elements"] > max_elements:
                raise _OutgrowsTheFile(f"{count['params']} parameters of {count['elements']:,} elements so far")

    def on_module(module, name, submodule):
        if threading.get_ident() == me:
            count["modules"] += 1
            if count["modules"] > max_modules:
                raise _OutgrowsTheFile(f"{count['modules']} modules so far")

    handles = [torch_module.register_module_parameter_registration_hook(on_parameter),
               torch_module.register_module_module_registration_hook(on_module)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def expected_tensors(model_cls, config, stored: dict, where: str,
                     swaps_attention: bool = False) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The state dict (on the meta device) that `config` implies, without the tied copies that are stored
    once (nor, when the overrides swap the attention kind, the random projections that kind draws), and the
    names of those left out (a file may hold them; they are not read)."""
    elements = sum(math.prod(t.shape) for t in stored.values())
    tied = getattr(model_cls, "_tied_weights_keys", None) or {}
    try:
        with _bounded_build(max_params=2 * (len(stored) + len(tied)) + 16, max_elements=3 * elements + (1 << 20),
                            max_modules=32 * (len(stored) + 1) + 256), torch.device("meta"):
            model = model_cls(config)
    except _OutgrowsTheFile as err:
        raise ValueError(f"{where} describes a model larger than its weights file(s) hold ({len(stored)} tensors "
                         f"of {elements:,} elements in all): the build was stopped at {err}") from None
    except _BUILD_ERRORS as err:
        raise ValueError(f"cannot build {model_cls.__name__} from {where}: {type(err).__name__}: {err}") from err
    expected = model.state_dict()
    copies = set(tied) if getattr(config, "tie_word_embeddings", False) else set()
    # Random projections (lsh / performer / scatterbrain) that a checkpoint of another attention kind cannot
    # hold: drawn at build time. Only a kind swapped on by the overrides may lack them.
    copies |= drawn_buffers(model) if swaps_attention else set()
    return {k: v for k, v in expected.items() if k not in copies}, copies


def _kind(dtype: torch.dtype) -> str:
    return "bool" if dtype == torch.bool else "float" if dtype.is_floating_point else "integer"


def _stored_name(module_name: str, to_module) -> str:
    """The name under which a checkpoint stores the module's tensor `module_name` (`to_module` inverted)."""
    shorter = module_name.split(".", 1)[-1]
    return shorter if shorter != module_name and to_module(shorter) == module_name else module_name


def check_against(stored: dict[str, StoredTensor], expected: dict[str, torch.Tensor], copies: set[str],
                  weights: str, against: str, declared: torch.dtype, to_module) -> None:
    """Refuse missing, unexpected, wrongly shaped or wrongly kinded tensors; warn of floats stored in another dtype.

    `stored` and `expected` are keyed by the module's names; messages give the stored names.
    """
    missing = sorted(_stored_name(key, to_module) for key in set(expected) - set(stored))
    unexpected = sorted(stored[key].name for key in set(stored) - set(expected) - copies)
    if missing or unexpected:
        raise ValueError(f"{weights} does not match {against}: missing tensors {missing[:8]}, "
                         f"unexpected tensors {unexpected[:8]}")
    cast = []
    for key, want in expected.items():
        have = stored[key]
        if have.shape != tuple(want.shape):
            raise ValueError(f"{have.file}: tensor {have.name!r} has shape {have.shape} but {against} "
                             f"needs {tuple(want.shape)}")
        if _kind(have.dtype) != _kind(want.dtype):
            raise ValueError(f"{have.file}: tensor {have.name!r} is stored as {have.dtype} but {against} needs "
                             f"{_kind(want.dtype)} values")
        if have.dtype != (declared if want.dtype.is_floating_point else want.dtype):
            cast.append(f"{have.name} ({have.dtype})")
    if cast:
        warnings.warn(f"{weights}: tensors stored in another dtype than {against} declares ({declared}) are cast: "
                      f"{', '.join(cast[:5])}{', ...' if len(cast) > 5 else ''}", stacklevel=3)


def load_checkpoint(folder: str | Path, *, dtype: torch.dtype | str | None = None, **overrides):
    """Load a checkpoint folder (config.json + model.safetensors or sharded weights), strictly."""
    folder = Path(folder)
    dtype = requested_dtype(dtype)
    read_json(folder / CONFIG_FILE, "a config")  # strictly, before anything else parses it
    if transformers_model_type(folder) is not None:  # a transformers checkpoint (Llama, Qwen, Mixtral...)
        return import_checkpoint(folder, dtype=dtype if isinstance(dtype, torch.dtype) else None, **overrides)
    family, config = read_config(folder, **overrides)
    declared = config.dtype if isinstance(config.dtype, torch.dtype) else torch.float32
    files = weight_files(folder)
    weights = str(files[0] if len(files) == 1 else folder / WEIGHTS_INDEX)
    if not (folder / CARD_FILE).is_file():
        warnings.warn(f"{folder / CARD_FILE} (the model card) is missing; loading anyway", stacklevel=2)
    model_cls = FAMILIES[family][1]
    # Stored names -> the module's names (the LM keeps the names it had before its backbone / head split).
    to_module = getattr(model_cls, "module_key", None) or (lambda key: key)
    stored: dict[str, StoredTensor] = {}
    for tensor in read_headers(files):
        key = to_module(tensor.name)
        if key in stored:
            raise ValueError(f"{weights}: tensor {key!r} is stored twice ({stored[key].name!r}, {tensor.name!r})")
        stored[key] = tensor
    # What the weights are checked against: config.json, as changed by the overrides if any.
    against = f"{folder / CONFIG_FILE}" + (f" with the overrides {overrides}" if overrides else "")
    swaps = "attention" in overrides and overrides["attention"] != read_json(folder / CONFIG_FILE, "a config").get(
        "attention")
    expected, copies = expected_tensors(model_cls, config, stored, against, swaps_attention=swaps)
    check_against(stored, expected, copies, weights, against, declared, to_module)
    model = build_model(model_cls, config, where=against)  # allocates what the files were shown to hold
    params = model.state_dict()
    by_file: dict[Path, list[str]] = {}
    for key in expected:
        by_file.setdefault(stored[key].file, []).append(key)
    file = files[0]
    try:
        with torch.no_grad():
            for file, keys in by_file.items():
                with safe_open(str(file), framework="pt") as f:
                    for key in keys:  # only the expected tensors are read
                        params[key].copy_(f.get_tensor(stored[key].name))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupt?): {err}") from err
    model.tie_weights()
    return _in_dtype(model, dtype, declared).eval()
