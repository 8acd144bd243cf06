"""Catalog entries, one module per family. Each module calls zoo.catalog.register at import."""

from zoo.entries import lm  # noqa: F401
