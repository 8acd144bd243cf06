"""The common trainer: data pipeline, training loop, checkpoints, logging, entry points."""

import zoo  # noqa: F401  (first, so that zoo's CPU allocator default is set before torch loads)
