"""The common trainer: data pipeline, training loop, checkpoints, logging, entry points."""
