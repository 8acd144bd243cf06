"""Argument checks shared by the structured linear kinds: errors name the field, the value and the rule."""

from __future__ import annotations


def check_int(name: str, value, what: str, minimum: int = 1) -> None:
    """ValueError naming the field unless `value` is an integer >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what}: {name}={value!r} is invalid: must be an integer >= {minimum}")
