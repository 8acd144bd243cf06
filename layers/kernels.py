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


HAS_GROUPED_MM = hasattr(torch.nn.functional, "grouped_mm")
MOE_IMPLS = ("auto", "padded", "tiered", "grouped", "megablocks")
# Below this many routed rows (decoding: batch x k), "auto" on CPU takes grouped_mm: tiered's per-tier weight
# copies cost more than the matmuls there (dense_vs_llama.py profile: 19.6 vs 10.5 ms/token at batch 8).
CPU_GROUPED_MAX_ROWS = 256


def can_use_grouped_mm(x: torch.Tensor, *row_widths: int) -> bool:
    """Can torch's grouped_mm run on rows of x with these widths (16-byte aligned; on CUDA bf16 on sm80+)?"""
    ok = HAS_GROUPED_MM and all(n * x.element_size() % 16 == 0 for n in row_widths)
    if x.is_cuda:
        ok = ok and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return ok


def moe_experts_layout(x: torch.Tensor, impl: str, d_model: int, width: int, capacity: int | None,
                       rows: int | None = None) -> str:
    """How the routed experts run on x: "megablocks", or a dispatch layout "padded", "tiered" or "grouped".

    `impl` "auto" takes megablocks' kernels on CUDA half precision when installed (and dropless), torch's
    grouped_mm on other CUDA tensors it supports and on CPU for few routed `rows` (decoding), else "tiered"
    (at training sizes on CPU grouped ties with tiered in BENCHMARKS.md and takes more memory). An explicit
    impl that cannot run here is a RuntimeError.
    """
    if impl not in MOE_IMPLS:
        raise ValueError(f"unknown experts impl {impl!r}; known: {MOE_IMPLS}")
    grouped_ok = can_use_grouped_mm(x, d_model, width)
    if impl == "grouped" and not grouped_ok or impl == "megablocks" and not x.is_cuda:
        raise RuntimeError(f"impl={impl!r} cannot run here: grouped needs torch.nn.functional.grouped_mm "
                           f"and 16-byte-aligned rows; megablocks needs CUDA")
    if impl != "auto":
        return impl
    if capacity is None and x.dtype in (torch.bfloat16, torch.float16) and can_use_megablocks(x):
        return "megablocks"
    if grouped_ok and (x.is_cuda or (rows is not None and rows <= CPU_GROUPED_MAX_ROWS and capacity is None)):
        return "grouped"
    return "tiered"


def describe() -> dict[str, bool]:
    """Which fast kernels this process could use (for `zoo info` and logs)."""
    return {
        "cuda": torch.cuda.is_available(),
        "flash_attn_installed": flash_attn_installed(),
        "megablocks_installed": megablocks_installed(),
        "force_reference": force_reference(),
    }
