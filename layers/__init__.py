"""Building blocks shared by every zoo model: norms, rotary embeddings, MLPs, attention, kernels.

Nothing here knows about config files, checkpoints or training. Importing `layers` imports every
family's package, so that each registers its kinds (`layers.mlp.KINDS["moe"]`,
`layers.linear.KINDS["monarch"]`, ...) before a config names them.
"""

from layers import attention, linear, mlp, moe, structured  # noqa: F401  (registration)
