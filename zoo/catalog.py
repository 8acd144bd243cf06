"""The catalog: every named model as data (name -> family, size, config, description).

Families register their entries here; `zoo.load(name)` builds one with fresh weights.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field

from layers.registry import Registry
from models.lm import ZooLM, ZooLMConfig
from models.sae import SAE, SAEConfig

# family -> (config class, model class). A checkpoint's config.json `model_type` picks the same pair.
FAMILIES = Registry("model family", {"lm": (ZooLMConfig, ZooLM), "sae": (SAEConfig, SAE)})


@dataclass(frozen=True)
class Entry:
    """One catalog model: its name, family, size class, config fields and a one-line description."""

    name: str
    family: str
    size: str
    config: dict = field(default_factory=dict)
    description: str = ""


CATALOG: dict[str, Entry] = {}


def register(name: str, family: str, size: str, config: dict, description: str, *, replace: bool = False) -> Entry:
    """Add a named model to the catalog (ValueError on a duplicate name unless replace=True)."""
    FAMILIES.check(family, f"family of {name!r}")
    if size not in ("tiny", "small", "base"):
        raise ValueError(f"size {size!r} of {name!r} must be one of 'tiny', 'small', 'base'")
    if name in CATALOG and not replace:
        raise ValueError(f"catalog name {name!r} is already registered")
    entry = Entry(name, family, size, dict(config), description)
    CATALOG[name] = entry
    return entry


def list_models(pattern: str = "*") -> list[Entry]:
    """Catalog entries whose name matches the glob `pattern`, sorted by name."""
    return [CATALOG[n] for n in sorted(CATALOG) if fnmatch.fnmatchcase(n, pattern)]


def get_entry(name: str) -> Entry:
    """The entry called `name`, or a ValueError that suggests close names."""
    if name in CATALOG:
        return CATALOG[name]
    close = difflib.get_close_matches(name, list(CATALOG), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ValueError(f"{name!r} is not a catalog name, a local checkpoint folder or a Hub repo id.{hint} "
                     f"`zoo list` shows the catalog.")


# The entries themselves live in zoo/entries/, one module per family; importing it registers them.
import zoo.entries  # noqa: E402,F401
