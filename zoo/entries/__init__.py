"""Catalog entries, one module per family. Each module calls zoo.catalog.register at import."""

from zoo.entries import attention, lm, moe, sae, structured  # noqa: F401
