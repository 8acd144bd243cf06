"""Catalog entries of the dense LM family."""

from zoo.catalog import register

# Byte-level vocabulary (256) everywhere, so every LM trains on the bundled corpus as is.
LM_TINY = dict(vocab_size=256, d_model=256, n_layers=4, n_heads=4, max_seq_len=256)
LM_SMALL = dict(vocab_size=256, d_model=768, n_layers=12, n_heads=12, max_seq_len=1024)

register("lm-dense-tiny", "lm", "tiny", LM_TINY,
         "Dense decoder LM (RoPE, SwiGLU, RMSNorm), the baseline every sparse LM is compared with.")
register("lm-dense-small", "lm", "small", LM_SMALL,
         "Dense decoder LM at GPT-2-small scale (12 x 768), for GPUs.")
