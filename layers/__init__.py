"""Building blocks shared by every zoo model: norms, rotary embeddings, MLPs, attention, kernels.

Nothing here knows about config files, checkpoints or training.
"""
