"""The one place that decides which fast kernel runs.

Every fast path (flash-attn, megablocks) has a pure-PyTorch reference with the same semantics.
Set ZOO_FORCE_REFERENCE=1 to run the reference everywhere (parity tests, debugging).
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache

import torch

FLASH_ATTN_DTYPES = (torch.float16, torch.bfloat16)


def force_reference() -> bool:
    """True when ZOO_FORCE_REFERENCE asks for the pure-PyTorch path everywhere."""
    return os.environ.get("ZOO_FORCE_REFERENCE", "").lower() in ("1", "true", "yes")


@cache
def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def flash_attn_installed() -> bool:
    """True when the flash-attn package can be imported."""
    return _installed("flash_attn")


def megablocks_installed() -> bool:
    """True when megablocks and grouped_gemm (which its dropless MoE needs) can be imported."""
    return _installed("megablocks") and _installed("grouped_gemm")


def can_use_flash_attn(q: torch.Tensor, *, dropout: float = 0.0) -> bool:
    """Can flash-attn run on this (batch, heads, seq, head_dim) query?"""
    return (
        not force_reference()
        and q.is_cuda
        and q.dtype in FLASH_ATTN_DTYPES
        and q.shape[-1] <= 256
        and q.shape[-1] % 8 == 0
        and dropout == 0.0
        and flash_attn_installed()
    )


def can_use_megablocks(x: torch.Tensor) -> bool:
    """Can megablocks' kernels run on this tensor?"""
    return not force_reference() and x.is_cuda and megablocks_installed()


def describe() -> dict[str, bool]:
    """Which fast kernels this process could use (for `zoo info` and logs)."""
    return {
        "cuda": torch.cuda.is_available(),
        "flash_attn_installed": flash_attn_installed(),
        "megablocks_installed": megablocks_installed(),
        "force_reference": force_reference(),
    }
