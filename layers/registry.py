"""The one registry type of the zoo: name -> class (or "module:Name", imported on first use).

Every family keeps one: attention kinds, MLP kinds, linear kinds, routers, SAE kinds, converters,
training families. Looking up an unknown name raises `UnknownName`, a ValueError (and KeyError)
whose message lists the known names:

    ROUTERS = Registry("router")
    ROUTERS.register("top_p", TopPRouter)        # or @ROUTERS.register("top_p") on the class
    ROUTERS["top_p"]                             # -> TopPRouter
    ROUTERS["top_q"]                             # UnknownName: unknown router 'top_q'; known: [...]
"""

from __future__ import annotations

import importlib
from typing import Any


class UnknownName(ValueError, KeyError):
    """A name that a registry does not hold (a ValueError, and a KeyError for dict-style callers)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(dict):
    """A dict of name -> object with one error for unknown names and lazy "module:Name" entries."""

    def __init__(self, what: str, entries: dict | None = None):
        super().__init__()
        self.what = what
        for name, obj in (entries or {}).items():
            self.register(name, obj)

    def register(self, name: str, obj: Any = None, *, replace: bool = False):
        """Add `obj` under `name`; without obj, a decorator that registers what it decorates."""
        if obj is None:
            def decorator(target):
                self.register(name, target, replace=replace)
                return target
            return decorator
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.what} name must be a non-empty string, got {name!r}")
        if name in self and not replace and dict.__getitem__(self, name) is not obj:
            raise ValueError(f"{self.what} {name!r} is already registered (pass replace=True to replace it)")
        super().__setitem__(name, obj)
        return obj

    def __getitem__(self, name: str):
        try:
            obj = super().__getitem__(name)
        except (KeyError, TypeError):
            raise UnknownName(f"unknown {self.what} {name!r}; known: {sorted(self)}") from None
        if isinstance(obj, str) and ":" in obj:  # "module:Name", imported when first needed
            module, attr = obj.split(":")
            obj = getattr(importlib.import_module(module), attr)
            super().__setitem__(name, obj)
        return obj

    def get(self, name: str, default: Any = None):
        return self[name] if name in self else default

    def check(self, name: Any, field: str) -> None:
        """A ValueError naming the config `field` when `name` is not registered."""
        if not isinstance(name, str) or name not in self:
            raise ValueError(f"config field {field!r} = {name!r} is invalid: unknown {self.what}; "
                             f"known: {sorted(self)}")

    def items(self):  # resolve lazy entries for callers that iterate
        return [(name, self[name]) for name in self]

    def values(self):
        return [self[name] for name in self]



def check_kwargs(cls: type, kwargs: dict, field: str, reserved: tuple[str, ...] = ()) -> None:
    """A ValueError naming config `field` when `kwargs` has a key that cls's constructor does not take.

    `reserved` are the keywords the caller passes itself (sizes, layer_idx...), not allowed in kwargs.
    """
    import inspect

    if not isinstance(kwargs, dict):
        raise ValueError(f"config field {field!r} = {kwargs!r} is invalid: must be a dict of keyword arguments")
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return  # the class validates its own keywords
    known = [n for n, p in params.items() if n != "self" and n not in reserved
             and p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise ValueError(f"config field {field!r} has unknown option(s) {unknown} for {cls.__name__}; "
                         f"known: {sorted(known)}")
