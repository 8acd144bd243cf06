"""`load()`: a catalog name, a local checkpoint folder or a Hub repo id -> a ready model.

Checkpoints are read by this module alone: config.json is parsed as JSON, weights come from
model.safetensors; nothing is unpickled and no code from the checkpoint runs. Every problem is
a clear error naming the file or field, and no partially loaded model is ever returned.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import warnings
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open

from zoo import hub
from zoo.catalog import FAMILIES, get_entry

CONFIG_FILE, WEIGHTS_FILE, CARD_FILE = "config.json", "model.safetensors", "README.md"


def load(name_or_path: str, *, revision: str | None = None, force_download: bool = False, **overrides):
    """Build a model from a catalog name (fresh weights), a checkpoint folder, or a Hub repo id.

    Keyword overrides replace config fields (validated), e.g. `load("lm-dense-tiny", n_layers=2)`.
    A Hub checkpoint is served from the local cache when it is there; `force_download=True` fetches it
    again (the error for an unreadable downloaded checkpoint says so).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return load_checkpoint(path, **overrides)
    try:
        entry = get_entry(str(name_or_path))
    except ValueError:
        if not hub.is_repo_id(str(name_or_path)):
            raise
        folder = hub.download(str(name_or_path), revision=revision, force_download=force_download)
        try:
            return load_checkpoint(folder, **overrides)
        except ValueError as err:  # a damaged cache reads as a damaged checkpoint: say how to fetch it again
            if force_download or hub.REDOWNLOAD_HINT in str(err):
                raise
            raise ValueError(f"{err}\n({hub.REDOWNLOAD_HINT})") from err
    config_cls, model_cls = FAMILIES[entry.family]
    config = make_config(config_cls, {**entry.config, "zoo_name": entry.name}, overrides, where=entry.name)
    return build_model(model_cls, config, where=entry.name).eval()


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
    except (StrictDataclassError, ValueError, TypeError) as err:
        raise ValueError(f"invalid config for {where}: {err}") from err


def build_model(model_cls, config, where: str):
    """model_cls(config); a config that validates but cannot be built is a ValueError naming `where`."""
    try:
        return model_cls(config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"cannot build {model_cls.__name__} from {where}: {err}") from err


def read_config(folder: Path, **overrides):
    """Parse and validate folder/config.json into the zoo config class its model_type names."""
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: a zoo checkpoint folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(raw).__name__}")
    by_type = {cfg.model_type: (family, cfg) for family, (cfg, _) in FAMILIES.items()}
    model_type = raw.get("model_type")
    if model_type not in by_type:
        raise ValueError(f"{file}: field 'model_type' = {model_type!r} is not a zoo model type; "
                         f"known: {sorted(by_type)}")
    family, config_cls = by_type[model_type]
    # The versioned upgrade (models/versioning.py), the same that from_pretrained applies: an older
    # checkpoint's dict becomes today's, with the values that reproduce what it did.
    try:
        raw = config_cls.upgrade(raw)
    except (ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"{file}: {err}") from err
    # Every field the zoo declares must then be present: a missing one would silently take a default.
    declared = [f.name for f in dataclasses.fields(config_cls) if f.name in config_cls.__annotations__]
    missing = [name for name in declared if name not in raw]
    if missing:
        raise ValueError(f"{file} lacks the field(s) {missing} of {config_cls.__name__}")
    raw.pop("model_type")
    return family, make_config(config_cls, raw, overrides, where=str(file))


def load_checkpoint(folder: str | Path, **overrides):
    """Load a checkpoint folder (config.json + model.safetensors), strictly."""
    folder = Path(folder)
    family, config = read_config(folder, **overrides)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing: a zoo checkpoint folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    if not (folder / CARD_FILE).is_file():
        warnings.warn(f"{folder / CARD_FILE} (the model card) is missing; loading anyway", stacklevel=2)
    try:
        with safe_open(str(weights), framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{weights} is not a readable safetensors file (truncated or corrupt?): {err}") from err
    # What the weights are checked against: config.json, as changed by the overrides if any.
    against = f"{folder / CONFIG_FILE}" + (f" with the overrides {overrides}" if overrides else "")
    model = build_model(FAMILIES[family][1], config, where=against)
    # Stored names -> the module's names (the LM keeps the names it had before its backbone / head split).
    to_module = getattr(model, "module_key", None)
    if to_module is not None:
        tensors = {to_module(key): tensor for key, tensor in tensors.items()}
    expected = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        for target in getattr(model, "_tied_weights_keys", {}) or {}:
            expected.pop(target, None)  # stored once, under its source name
            tensors.pop(target, None)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{weights} does not match {against}: missing tensors {missing[:8]}, "
                         f"unexpected tensors {unexpected[:8]}")
    for key, tensor in tensors.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(f"{weights}: tensor {key!r} has shape {tuple(tensor.shape)} but {against} "
                             f"needs {tuple(expected[key].shape)}")
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(tensors[key])
    model.tie_weights()
    return model.eval()
