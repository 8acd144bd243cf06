"""One versioned upgrade of config dicts, applied by every path that reads a checkpoint's config.json.

A config class lists `UPGRADES`: function i turns a version-i dict into a version-(i + 1) dict.
`config_version` is written into every config.json; a dict without it is version 0 (written
before versions existed). `zoo.load` and transformers' `from_pretrained` / `from_dict` /
`from_json_file` all go through `upgrade`, so an old checkpoint means the same thing however it
is opened. Add a field with a default that changes what old checkpoints did? Bump the version
and add an upgrade that sets the old behaviour.
"""

from __future__ import annotations

from collections.abc import Callable

VERSION_KEY = "config_version"


class VersionedConfig:
    """Mixin for a PreTrainedConfig: `upgrade(raw)` brings a config dict to the current version."""

    UPGRADES: tuple[Callable[[dict], dict], ...] = ()

    @classmethod
    def current_version(cls) -> int:
        """The version this code writes."""
        return len(cls.UPGRADES)

    @classmethod
    def upgrade(cls, raw: dict) -> dict:
        """A copy of the config dict `raw` at the current version (a ValueError for a newer or bad version)."""
        raw = dict(raw)
        version = raw.get(VERSION_KEY, 0)
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"config field {VERSION_KEY!r} = {version!r} is invalid: must be an integer >= 0")
        if version > cls.current_version():
            raise ValueError(f"config field {VERSION_KEY!r} = {version} is newer than this code understands "
                             f"({cls.current_version()}): upgrade the zoo (pip install -U sparse-model-zoo)")
        for step in cls.UPGRADES[version:]:
            raw = step(raw)
        raw[VERSION_KEY] = cls.current_version()
        return raw

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """transformers' from_dict on the upgraded dict (AutoConfig / from_pretrained come here)."""
        return super().from_dict(cls.upgrade(config_dict), **kwargs)

    @classmethod
    def from_json_file(cls, json_file):
        """transformers' from_json_file on the upgraded dict."""
        return cls(**cls.upgrade(cls._dict_from_json_file(json_file)))


def fill_missing(defaults: dict) -> Callable[[dict], dict]:
    """An upgrade step that adds the fields of `defaults` that a dict lacks (fields added later)."""
    def step(raw: dict) -> dict:
        return {**defaults, **raw}
    return step
