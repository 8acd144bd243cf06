"""Model conversions: pure functions from one model to another, with a report of what changed.

`CONVERTERS[name](model, **options) -> (new_model, report)` turns a trained zoo LM into another
kind (`moe`: dense-to-MoE upcycling; `monarch`: dense-to-Monarch projection, ...). `zoo convert`
(train/convert.py) runs them on checkpoints and measures validation loss before and after.
Each family's module registers its converters here with `register_converter`.
"""

from __future__ import annotations

from collections.abc import Callable

from layers.registry import Registry

CONVERTERS = Registry("conversion")


def register_converter(name: str) -> Callable:
    """Decorator: make `fn(model, **options) -> (model, report)` available as `zoo convert --to NAME`."""
    return CONVERTERS.register(name)


from zoo.convert import structured  # noqa: E402,F401

# isort: split
from zoo.convert import attention, moe  # noqa: E402,F401
from zoo.convert.moe import moe_from_transformers  # noqa: E402,F401
